//! Rollout: allocate → sample → verify, for one RL step.
//!
//! Each generation batch draws `prompts_per_step` training problems and allocates rollouts per prompt: uniform
//! (`group_size`), Mixed-CUTS (`g_std` with the rollout decoding, `g_cuts` with CUTS), or HORA over the
//! `prompts_per_step × group_size` budget — from an in-step probe (`n0` rollouts per prompt, then
//! `hora_allocate_after_probe`) or from each prompt's history of earlier steps (`forkrl_rollout::PromptStatsStore`, keyed
//! by [`prompt_id`]; prompts recur across the epochs of a dataset), then `hora_allocate`; a prompt allocated 0 is
//! skipped this step. Rows are
//! sampled with the KV-cache sampler on an autodiff-free snapshot of the policy, each with its own (seed, row,
//! position) stream, and verified by the task. With DAPO dynamic sampling, generation batches are drawn until
//! `prompts_per_step` groups with mixed outcomes are kept.

use burn::module::Module;
use forkrl_core::{SeedStream, derive_seed};
use forkrl_rollout::{
    BetaPosterior, Decoding, DynamicSampler, HoraConfig, PosteriorSource, PromptStatsStore, hora_allocate,
    hora_allocate_after_probe,
};

use crate::{
    Result, TrainerError,
    batch::{Rollout, RolloutBatch},
    config::CheckedConfig,
    model::{
        Vocab,
        policy::Policy,
        sampler::{self, SampleRow, SamplerConfig},
    },
    rl::imax::{self, PrefixIds},
    tasks::{Problem, Task},
};

/// The rollouts of one prompt.
#[derive(Debug, Clone)]
pub struct Group {
    /// Its rollouts (at least one).
    pub rollouts: Vec<Rollout>,
    /// The problem they answer.
    pub problem: Problem,
}

/// The id of a prompt in HORA's history: a hash of its token ids (stable across runs and resumptions).
pub fn prompt_id(prompt: &[u32]) -> u64 {
    prompt.iter().fold(forkrl_core::numeric::splitmix64(prompt.len() as u64), |h, &t| {
        forkrl_core::numeric::splitmix64(h ^ u64::from(t))
    })
}

/// Samples the RL batch of step `step` (1-based); `history` is HORA's per-prompt record of earlier steps (read only
/// with `source = { kind = "history" }`).
///
/// # Errors
/// [`forkrl_core::Error::SamplingExhausted`] when dynamic sampling gives up; tokenizer and sampler errors.
pub fn rollout(
    policy: &Policy,
    vocab: &Vocab,
    task: &Task,
    config: &CheckedConfig,
    step: usize,
    history: Option<&PromptStatsStore>,
) -> Result<RolloutBatch> {
    let draw = |n: usize, seed: u64| task.sample(n, seed);
    rollout_from(policy, vocab, &draw, config, step, history)
}

/// [`rollout`] with the problems of each generation batch from `draw(n, seed)` instead of the task (HEAL's mixed
/// target / general sets).
///
/// # Errors
/// As [`rollout`].
pub fn rollout_from(
    policy: &Policy,
    vocab: &Vocab,
    draw: &dyn Fn(usize, u64) -> Result<Vec<Problem>>,
    config: &CheckedConfig,
    step: usize,
    history: Option<&PromptStatsStore>,
) -> Result<RolloutBatch> {
    let rl = &config.rl;
    let seed = config.run.seed;
    let roll = |attempt: u64| -> Result<Vec<Group>> {
        let indices = [step as u64, attempt];
        let prompt_seed = derive_seed(seed, SeedStream::RlPrompts, &indices);
        let mut problems = draw(rl.prompts_per_step, prompt_seed)?;
        let sampling = derive_seed(seed, SeedStream::RolloutSampling, &indices);
        let prefixes = match &rl.imax {
            Some(imax) => {
                // IMAX: each prompt `prefixes_per_prompt` times, each copy with its own prefix and group.
                let n = problems.len();
                problems =
                    problems.into_iter().flat_map(|p| std::iter::repeat_n(p, imax.prefixes_per_prompt)).collect();
                Some((PrefixIds::new(policy, imax), imax::assign(n, imax, prompt_seed)))
            }
            None => None,
        };
        let prefixes = prefixes.as_ref().map(|(ids, assigned)| (ids, assigned.as_slice()));
        sample_groups(policy, vocab, &problems, config, (sampling, prefixes), history)
    };
    let (groups, frac_zero_std) = match rl.dynamic_sampling {
        None => (roll(0)?, None),
        Some(ds) => {
            let mut sampler = DynamicSampler::new(rl.prompts_per_step, ds);
            let mut attempt = 0;
            loop {
                let batch = roll(attempt)?;
                let acc: Vec<f32> = batch.iter().flat_map(|g| g.rollouts.iter().map(|r| r.reward)).collect();
                let sizes: Vec<usize> = batch.iter().map(|g| g.rollouts.len()).collect();
                if let Some(kept) = sampler.add_batch(batch, &acc, &sizes)? {
                    break (kept, Some(sampler.frac_zero_std()));
                }
                attempt += 1;
            }
        }
    };
    let sizes: Vec<usize> = groups.iter().map(|g| g.rollouts.len()).collect();
    let problems: Vec<Problem> = groups.iter().map(|g| g.problem.clone()).collect();
    let rollouts = groups.into_iter().flat_map(|g| g.rollouts).collect();
    let mut batch = RolloutBatch::new(step, rollouts, sizes, vocab.pad)?;
    batch.frac_zero_std_before_filter = frac_zero_std;
    batch.problems = Some(problems);
    Ok(batch)
}

/// Samples and verifies the groups of one generation batch. Row ids run over the batch, so every rollout has its own
/// stream of `seed`. With `prefixes` (IMAX), problem `i`'s prompt starts with soft prefix `assigned[i]`.
///
/// # Errors
/// Tokenizer, sampler and allocation errors.
pub fn sample_groups(
    policy: &Policy,
    vocab: &Vocab,
    problems: &[Problem],
    config: &CheckedConfig,
    (seed, prefixes): (u64, Option<(&PrefixIds, &[usize])>),
    history: Option<&PromptStatsStore>,
) -> Result<Vec<Group>> {
    let rl = &config.rl;
    let mut prompts: Vec<Vec<u32>> = problems.iter().map(|p| vocab.encode(&p.prompt)).collect::<Result<_>>()?;
    if let Some((ids, assigned)) = prefixes {
        for (prompt, &k) in prompts.iter_mut().zip(assigned) {
            *prompt = ids.prefixed(prompt, k);
        }
    }
    let ops = match &rl.mixed_cuts {
        Some(m) => m.operators(rl.decoding),
        None => vec![rl.decoding; rl.group_size],
    };
    let mut sampler = RowSampler::new(policy, vocab, problems, &prompts, config, seed);
    let counts: Vec<usize> = match &rl.hora {
        None => vec![rl.group_size; problems.len()],
        Some(h) => hora_counts(&mut sampler, h, &ops, rl.group_size, history)?,
    };
    let rest: Vec<(usize, Decoding)> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| (sampler.per_prompt[i].len()..c).map(move |j| (i, j)))
        .map(|(i, j)| (i, ops[j % ops.len()]))
        .collect();
    sampler.run(&rest)?;
    Ok(sampler.into_groups())
}

/// `n` rollouts of every problem at the rollout decoding, without an allocation scheme (HORA, Mixed-CUTS): the
/// offline draws of ReasonMaxxer's base rollouts and HEAL's selection rollouts.
///
/// # Errors
/// Tokenizer and sampler errors.
pub fn sample_each(
    policy: &Policy,
    vocab: &Vocab,
    problems: &[Problem],
    config: &CheckedConfig,
    n: usize,
    seed: u64,
) -> Result<Vec<Group>> {
    let prompts: Vec<Vec<u32>> = problems.iter().map(|p| vocab.encode(&p.prompt)).collect::<Result<_>>()?;
    let mut sampler = RowSampler::new(policy, vocab, problems, &prompts, config, seed);
    let requests: Vec<(usize, Decoding)> =
        (0..problems.len()).flat_map(|i| std::iter::repeat_n((i, config.rl.decoding), n)).collect();
    sampler.run(&requests)?;
    Ok(sampler.into_groups())
}

/// Samples requested rows and files them under their prompt.
struct RowSampler<'a> {
    snapshot: Policy,
    vocab: &'a Vocab,
    problems: &'a [Problem],
    prompts: &'a [Vec<u32>],
    config: SamplerConfig,
    next_id: u64,
    per_prompt: Vec<Vec<Rollout>>,
}

impl<'a> RowSampler<'a> {
    fn new(
        policy: &Policy,
        vocab: &'a Vocab,
        problems: &'a [Problem],
        prompts: &'a [Vec<u32>],
        config: &CheckedConfig,
        seed: u64,
    ) -> Self {
        Self {
            snapshot: policy.valid(),
            vocab,
            problems,
            prompts,
            config: vocab.sampler_config(config.rl.max_response_len, seed),
            next_id: 0,
            per_prompt: vec![Vec::new(); problems.len()],
        }
    }

    /// The sampled groups, in problem order; a problem with no rollout is left out.
    fn into_groups(self) -> Vec<Group> {
        self.per_prompt
            .into_iter()
            .zip(self.problems)
            .filter(|(rows, _)| !rows.is_empty())
            .map(|(rollouts, problem)| Group { rollouts, problem: problem.clone() })
            .collect()
    }

    /// One sampler call for `(prompt index, decoding)` requests.
    fn run(&mut self, requests: &[(usize, Decoding)]) -> Result<()> {
        let rows: Vec<SampleRow<'_>> = requests
            .iter()
            .enumerate()
            .map(|(k, &(i, op))| SampleRow { prompt: &self.prompts[i], op, row_id: self.next_id + k as u64 })
            .collect();
        self.next_id += requests.len() as u64;
        let out = sampler::generate_rows(&self.snapshot, &rows, &self.config)?;
        for (&(i, _), (response, truncated)) in requests.iter().zip(out.tokens.into_iter().zip(out.truncated)) {
            let reward = self.problems[i].reward(&self.vocab.text(&response));
            self.per_prompt[i].push(Rollout { prompt: self.prompts[i].clone(), response, truncated, reward });
        }
        Ok(())
    }
}

/// HORA's rollouts per prompt: from `n0` probe rollouts per prompt in this step, or from the prompts' history.
fn hora_counts(
    sampler: &mut RowSampler<'_>,
    h: &HoraConfig,
    ops: &[Decoding],
    group_size: usize,
    history: Option<&PromptStatsStore>,
) -> Result<Vec<usize>> {
    let n = sampler.problems.len();
    let max = h.max_per_prompt.unwrap_or(4 * group_size);
    match h.source {
        PosteriorSource::Probe { n0 } => {
            let probe: Vec<(usize, Decoding)> =
                (0..n).flat_map(|i| (0..n0).map(move |j| (i, j))).map(|(i, j)| (i, ops[j % ops.len()])).collect();
            sampler.run(&probe)?;
            let posteriors: Vec<BetaPosterior> = sampler
                .per_prompt
                .iter()
                .map(|rows| {
                    let hits = rows.iter().filter(|r| r.reward > 0.0).count() as f64;
                    BetaPosterior::from_counts(hits, rows.len() as f64 - hits, h.prior_a, h.prior_b)
                })
                .collect::<std::result::Result<_, _>>()?;
            Ok(hora_allocate_after_probe(&posteriors, n * group_size, n0, h.min_per_prompt, max)?.counts)
        }
        PosteriorSource::History { .. } => {
            let store = history.ok_or_else(|| TrainerError::Stage {
                stage: "rollout",
                reason: "HORA with source = history needs the trainer's prompt history".into(),
            })?;
            let posteriors: Vec<BetaPosterior> = sampler
                .prompts
                .iter()
                .map(|p| {
                    let s = store.get(prompt_id(p));
                    BetaPosterior::from_counts(s.successes, s.failures, h.prior_a, h.prior_b)
                })
                .collect::<std::result::Result<_, _>>()?;
            Ok(hora_allocate(&posteriors, n * group_size, h.min_per_prompt, max)?.counts)
        }
    }
}
