//! HEAL in the trainer (`[rl.heal]`; the library side is `forkrl_advantage::heal`, spec
//! `../shared/methods/exploration-extras.md` §1): few-shot RL on a target domain mixed with selected general-domain
//! data, and the entropy-dynamics-alignment (EDA) reward.
//!
//! - **Data** ([`HealData::build`], once, with the policy as RL starts): `target_problems` problems of the main task
//!   (the target domain, few-shot); `general_pool` candidates of the `general` task, each sampled
//!   `selection_rollouts` times and scored `c(x) = (1 − 2|acc − ½|) · diversity` (the mean of each rollout's top-20 %
//!   token entropies at the rollout temperature); the `general_keep` best are the general set. Both sets are kept in
//!   checkpoints.
//! - **Batches**: `round(general_share · prompts_per_step)` problems from the general set, the rest from the target
//!   set, drawn with replacement by the run seed (RECONSTRUCTION: the paper's mixing ratio is not published).
//! - **Reward**: `r = r_acc + eda_coef · r_EDA`, with `r_EDA` from every rollout's response entropies against the whole
//!   batch's (the official reward manager's rule), before the group advantages. The official code pays nothing to
//!   responses of at most 50 tokens (`min_len`); the built-in tasks' responses are shorter, so set `min_len` below
//!   them (e.g. 2) to see the reward there.
//!
//! Evaluation stays on the main task's held-out set: the target domain.

use std::collections::HashSet;

use forkrl_advantage::{eda_rewards, heal_selection_score, select_top_k};
use forkrl_core::{SeedStream, derive_seed};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{
    Result, TrainerError,
    batch::RolloutBatch,
    config::{CheckedConfig, HealSetup},
    model::{Vocab, policy::Policy, token_stats_host},
    rl::rollout::sample_each,
    tasks::{Problem, Task},
};

/// HEAL's two problem sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealData {
    /// The target domain's few problems.
    pub target: Vec<Problem>,
    /// The selected general-domain problems, best first.
    pub general: Vec<Problem>,
    /// Their selection scores `c(x)`, in the same order.
    pub scores: Vec<f64>,
}

impl HealData {
    /// Draws the target set and selects the general set with `policy`.
    ///
    /// # Errors
    /// Task, sampler and forward errors.
    pub fn build(
        policy: &Policy,
        vocab: &Vocab,
        task: &Task,
        config: &CheckedConfig,
        setup: &HealSetup,
    ) -> Result<Self> {
        let seed = config.run.seed;
        let target = task.sample(setup.target_problems, derive_seed(seed, SeedStream::Heal, &[0]))?;
        let general_task = Task::new(&setup.general)?;
        let pool = general_task.sample(setup.general_pool, derive_seed(seed, SeedStream::Heal, &[1]))?;
        let draw = derive_seed(seed, SeedStream::Heal, &[2]);
        let groups = sample_each(policy, vocab, &pool, config, setup.selection_rollouts, draw)?;
        // One scoring pass over every candidate's rollouts, `log_prob_micro_batch_size` rows at a time.
        let sizes: Vec<usize> = groups.iter().map(|g| g.rollouts.len()).collect();
        let rollouts = groups.iter().flat_map(|g| g.rollouts.iter().cloned()).collect();
        let all = RolloutBatch::new(0, rollouts, sizes, vocab.pad)?;
        let micro = config.log_prob_micro_batch_size().unwrap_or(64);
        let (entropy, _) = token_stats_host(policy, all.ids(), all.width(), config.temperature(), micro)?;
        let mut scored = Vec::with_capacity(groups.len());
        let mut row = 0;
        for g in &groups {
            let n = g.rollouts.len();
            let acc = g.rollouts.iter().filter(|r| r.reward > 0.0).count() as f64 / n as f64;
            let trajectories: Vec<Vec<f32>> =
                (row..row + n).map(|r| all.response_values(&entropy, r)).filter(|t| !t.is_empty()).collect();
            row += n;
            let views: Vec<&[f32]> = trajectories.iter().map(Vec::as_slice).collect();
            let score = if views.is_empty() { 0.0 } else { heal_selection_score(acc, &views, setup.eda.top_fraction)? };
            scored.push((g.problem.clone(), score));
        }
        let order = select_top_k(&scored.iter().map(|(_, s)| *s).collect::<Vec<_>>(), setup.general_keep);
        if target.is_empty() || order.is_empty() {
            return Err(TrainerError::Stage {
                stage: "heal",
                reason: "HEAL needs at least one target and one general problem".into(),
            });
        }
        Ok(Self {
            target,
            general: order.iter().map(|&i| scored[i].0.clone()).collect(),
            scores: order.iter().map(|&i| scored[i].1).collect(),
        })
    }

    /// The problems of generation batch `seed`: `general_share` of `n` from the general set, the rest from the
    /// target set (all from the other set when one is empty, as in a hand-edited checkpoint; none when both are).
    pub fn draw(&self, n: usize, general_share: f64, seed: u64) -> Vec<Problem> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let k = match (self.general.is_empty(), self.target.is_empty()) {
            (true, true) => return Vec::new(),
            (true, false) => 0,
            (false, true) => n,
            (false, false) => ((general_share * n as f64).round() as usize).min(n),
        };
        let mut out: Vec<Problem> =
            (0..k).map(|_| self.general[rng.random_range(0..self.general.len())].clone()).collect();
        out.extend((k..n).map(|_| self.target[rng.random_range(0..self.target.len())].clone()));
        out
    }

    /// The prompts of the general set (a batch's general rows are recognised by them).
    pub fn general_prompts(&self) -> HashSet<&str> {
        self.general.iter().map(|p| p.prompt.as_str()).collect()
    }
}

/// `(r_EDA per row, general per row)` of a batch, from the rollout policy's entropies `[B, W]`.
///
/// # Errors
/// [`TrainerError::Stage`] for a batch without its problems; the library's errors.
pub fn eda(batch: &RolloutBatch, entropy: &[f32], data: &HealData, setup: &HealSetup) -> Result<(Vec<f32>, Vec<bool>)> {
    let problems = batch.problems.as_ref().ok_or_else(|| TrainerError::Stage {
        stage: "score",
        reason: "HEAL's reward needs the batch's problems (a batch from Trainer::rollout)".into(),
    })?;
    let general_prompts = data.general_prompts();
    let general: Vec<bool> =
        batch.group_of().iter().map(|&g| general_prompts.contains(problems[g].prompt.as_str())).collect();
    let sequences: Vec<Vec<f32>> = (0..batch.len()).map(|r| batch.response_values(entropy, r)).collect();
    let views: Vec<&[f32]> = sequences.iter().map(Vec::as_slice).collect();
    Ok((eda_rewards(&views, &general, &setup.eda)?, general))
}
