//! ReasonMaxxer's offline stage in the trainer (`[rl.reasonmaxxer]`; the library side is
//! `forkrl_advantage::reasonmaxxer`, spec `../shared/methods/sparse-selection-and-distillation.md` §1). It replaces the
//! RL phase: after SFT, the policy as it stands is the frozen **base**.
//!
//! 1. **Data** ([`ReasonMaxxerData::build`], once, from the base): `problems` training problems × `rollouts_per_problem`
//!    base rollouts at the rollout decoding; the problems with both outcomes, the `keep_problems` closest to pass
//!    rate ½ (ties: shorter mean response), or all of them (the paper's rule); the shortest `trim_fraction` of their
//!    rollouts; advantages `clip((r − r̄)/max(pstd, ε), ±c)` on what is left.
//! 2. **Gate**: the base's entropy of every response position at `gate_temperature` (1), τ from `tau` or the target
//!    `gated_fraction` (RECONSTRUCTION), `D = {H > τ}` (or every generated token with `variant = "fullseq"`).
//! 3. **Training** ([`step_loss`]): `rl.steps` optimiser steps of `batch_size` sequences (shuffled per epoch, or the
//!    released curriculum order), loss `Σ c_t CE_t + Σ a_t KL(p_base ‖ p_θ)_t` with the library's coefficients
//!    (sequence mean of the decision and anchor token means), at temperature 1, from the student's full logits and
//!    the base's (`[n, W, V]`: meant for the built-in tasks' small vocabularies).
//!
//! The base is saved as `checkpoints/reference` and the data rebuilt from it on resume (every draw is seeded), so a
//! resumed run repeats the uninterrupted one.

use burn::tensor::{Device, Int, Tensor, TensorData, activation::log_softmax};
use forkrl_advantage::{
    DecisionObjective, DecisionRows, apply_delta_hinge, apply_neg_prob_floor, decision_gate, delta_hinge_loss_host,
    gate_threshold, reasonmaxxer_advantages, reasonmaxxer_coefficients,
};
use forkrl_core::{SeedStream, derive_seed};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::{
    Result, TrainerError,
    batch::{Rollout, RolloutBatch},
    config::{CheckedConfig, ReasonMaxxerSetup},
    host_f32,
    model::{Vocab, ids_tensor, policy::Policy, token_stats_host},
    rl::rollout::{Group, sample_each},
    tasks::Task,
};

/// The offline training set: kept base rollouts, their advantages and decision sets.
#[derive(Debug, Clone)]
pub struct ReasonMaxxerData {
    /// The kept rollouts, one group per kept problem.
    pub batch: RolloutBatch,
    /// `[N]`: the advantages.
    pub advantages: Vec<f32>,
    /// `[N, W]`: the decision set `D`.
    pub decision: Vec<bool>,
    /// `[N, W]`: positions whose target exists (prompt and response, no padding).
    pub valid: Vec<bool>,
    /// The gate τ (positive rollouts) and τ_neg.
    pub tau: (f32, f32),
    /// `#D / #generated` over the kept rollouts.
    pub gated_fraction: f64,
    /// Problems drawn, problems kept.
    pub problems: (usize, usize),
    /// Mean reward of the kept rollouts.
    pub mean_reward: f64,
    /// The curriculum order (signal clarity, descending) when it is on.
    curriculum: Option<Vec<usize>>,
}

/// The kept groups: both outcomes present, the `keep` closest to pass rate ½ (ties: shorter mean response, then
/// order); all of them when `keep` is `None`.
fn select(groups: Vec<Group>, keep: Option<usize>) -> Vec<Group> {
    let rate = |g: &Group| g.rollouts.iter().filter(|r| r.reward > 0.0).count() as f64 / g.rollouts.len() as f64;
    let length =
        |g: &Group| g.rollouts.iter().map(|r| r.response.len()).sum::<usize>() as f64 / g.rollouts.len() as f64;
    let mut mixed: Vec<(usize, Group)> =
        groups.into_iter().enumerate().filter(|(_, g)| (0.0..1.0).contains(&rate(g)) && rate(g) > 0.0).collect();
    if let Some(k) = keep {
        mixed.sort_by(|(i, a), (j, b)| {
            (rate(a) - 0.5).abs().total_cmp(&(rate(b) - 0.5).abs()).then(length(a).total_cmp(&length(b))).then(i.cmp(j))
        });
        mixed.truncate(k);
        mixed.sort_by_key(|(i, _)| *i);
    }
    mixed.into_iter().map(|(_, g)| g).collect()
}

/// The shortest `fraction` of all rollouts (non-truncated first on ties, then order); empty groups are dropped.
fn trim(groups: Vec<Group>, fraction: f64) -> Vec<Group> {
    if fraction >= 1.0 {
        return groups;
    }
    let mut all: Vec<(usize, usize, usize, bool)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, grp)| grp.rollouts.iter().enumerate().map(move |(r, x)| (x.response.len(), g, r, x.truncated)))
        .collect();
    all.sort_by_key(|&(len, g, r, truncated)| (len, truncated, g, r));
    let n = ((all.len() as f64 * fraction).round() as usize).max(1);
    let mut kept = vec![Vec::new(); groups.len()];
    for &(_, g, r, _) in &all[..n.min(all.len())] {
        kept[g].push(r);
    }
    groups
        .into_iter()
        .zip(kept)
        .filter_map(|(mut grp, mut rows)| {
            rows.sort_unstable();
            let keep: Vec<Rollout> = rows.into_iter().map(|r| grp.rollouts[r].clone()).collect();
            grp.rollouts = keep;
            (!grp.rollouts.is_empty()).then_some(grp)
        })
        .collect()
}

impl ReasonMaxxerData {
    /// Draws, selects, trims, scores and gates the offline set from the `base` policy.
    ///
    /// # Errors
    /// [`TrainerError::Stage`] when no problem has both outcomes; sampler, forward and library errors.
    pub fn build(
        base: &Policy,
        vocab: &Vocab,
        task: &Task,
        config: &CheckedConfig,
        setup: &ReasonMaxxerSetup,
    ) -> Result<Self> {
        let seed = config.run.seed;
        let problems = task.sample(setup.problems, derive_seed(seed, SeedStream::ReasonMaxxer, &[0]))?;
        let draw = derive_seed(seed, SeedStream::ReasonMaxxer, &[1]);
        let groups = sample_each(base, vocab, &problems, config, setup.rollouts_per_problem, draw)?;
        let kept = trim(select(groups, setup.keep_problems), setup.trim_fraction);
        let kept_problems = kept.len();
        if kept.is_empty() {
            return Err(TrainerError::Stage {
                stage: "reasonmaxxer",
                reason: format!(
                    "none of the {} problems has both a correct and a wrong base rollout (raise rl.reasonmaxxer.problems \
                     or rollouts_per_problem, or start from another checkpoint)",
                    setup.problems
                ),
            });
        }
        let sizes: Vec<usize> = kept.iter().map(|g| g.rollouts.len()).collect();
        let rollouts: Vec<Rollout> = kept.into_iter().flat_map(|g| g.rollouts).collect();
        let batch = RolloutBatch::new(0, rollouts, sizes, vocab.pad)?;
        let mut data = Self::from_batch(base, batch, config, setup)?;
        data.problems = (setup.problems, kept_problems);
        Ok(data)
    }

    /// The offline set of a caller's own rollouts (`batch`: groups of base rollouts with their rewards), gated and
    /// scored with the `base` policy: everything [`ReasonMaxxerData::build`] does after drawing and selecting.
    ///
    /// # Errors
    /// Forward and library errors.
    pub fn from_batch(
        base: &Policy,
        batch: RolloutBatch,
        config: &CheckedConfig,
        setup: &ReasonMaxxerSetup,
    ) -> Result<Self> {
        let loss = &setup.loss;
        let advantages = reasonmaxxer_advantages(&batch.rewards, batch.group_sizes(), loss.adv_clip, loss.adv_eps)?;
        let (w, mask) = (batch.width(), batch.response_mask());
        let micro = config.log_prob_micro_batch_size().unwrap_or(batch.len());
        let (entropy, _) = token_stats_host(base, batch.ids(), w, loss.gate_temperature, micro)?;
        let tau = match loss.tau {
            Some(t) => t,
            None => gate_threshold(&entropy, mask, loss.gated_fraction)?,
        };
        let tau = (tau, loss.tau_neg.unwrap_or(tau));
        let decision = decision_gate(&entropy, mask, &batch.rewards, w, tau, loss.variant)?;
        let generated = mask.iter().filter(|&&m| m).count().max(1);
        let gated_fraction = decision.iter().filter(|&&d| d).count() as f64 / generated as f64;
        let valid: Vec<bool> = batch
            .rollouts()
            .iter()
            .flat_map(|r| {
                let n = r.prompt.len() + r.response.len();
                (0..w).map(move |t| t + 1 < n)
            })
            .collect();
        let curriculum = setup.curriculum.then(|| {
            let clarity = |r: usize| {
                let gated = decision[r * w..(r + 1) * w].iter().filter(|&&d| d).count() as f64;
                f64::from(advantages[r].abs()) * gated / batch.rollouts()[r].response.len().max(1) as f64
            };
            let mut order: Vec<usize> = (0..batch.len()).collect();
            order.sort_by(|&a, &b| clarity(b).total_cmp(&clarity(a)).then(a.cmp(&b)));
            order
        });
        let mean_reward = batch.rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / batch.len() as f64;
        let groups = batch.group_sizes().len();
        Ok(Self {
            batch,
            advantages,
            decision,
            valid,
            tau,
            gated_fraction,
            problems: (groups, groups),
            mean_reward,
            curriculum,
        })
    }

    /// The rows of optimiser step `step` (1-based): positions `(step − 1)·bs ..` of the epoch orders laid end to end
    /// (each epoch shuffled by the run seed, or the curriculum order).
    pub fn rows(&self, step: usize, batch_size: usize, seed: u64) -> Vec<usize> {
        let n = self.batch.len();
        let order = |epoch: usize| -> Vec<usize> {
            match &self.curriculum {
                Some(order) => order.clone(),
                None => {
                    let mut order: Vec<usize> = (0..n).collect();
                    let s = derive_seed(seed, SeedStream::ReasonMaxxer, &[2, epoch as u64]);
                    order.shuffle(&mut ChaCha8Rng::seed_from_u64(s));
                    order
                }
            }
        };
        // A step spans at most two epochs' orders when batch_size ≤ n; each is drawn once.
        let mut current: Option<(usize, Vec<usize>)> = None;
        (0..batch_size)
            .map(|j| {
                let p = (step - 1) * batch_size + j;
                let (epoch, at) = (p / n, p % n);
                if current.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    current = Some((epoch, order(epoch)));
                }
                current.as_ref().map_or(at, |(_, o)| o[at])
            })
            .collect()
    }
}

/// One step's loss and its parts.
#[derive(Debug)]
pub struct StepLoss {
    /// `Σ c_t CE_t + Σ a_t KL_t` with a graph.
    pub loss: Tensor<1>,
    /// The decision part, the anchor's mean KL over anchor positions, and the mean `log π_θ − log π_base` on positive
    /// and negative decision tokens (`dlogp_plus`, `dlogp_minus`; NaN without such tokens).
    pub parts: (f64, f64, f64, f64),
}

/// The loss of the rows `rows` of `data` for `policy` against the frozen `base`.
///
/// # Errors
/// The forwards' and the library's errors.
pub fn step_loss(
    policy: &Policy,
    base: &Policy,
    data: &ReasonMaxxerData,
    rows: &[usize],
    setup: &ReasonMaxxerSetup,
    device: &Device,
) -> Result<StepLoss> {
    let (w, n) = (data.batch.width(), rows.len());
    let v = policy.vocab_size();
    let pick = |x: &[bool]| data.batch.gather_rows(x, rows);
    let (decision, valid, generated) = (pick(&data.decision), pick(&data.valid), pick(data.batch.response_mask()));
    let advantages: Vec<f32> = rows.iter().map(|&r| data.advantages[r]).collect();
    let view =
        DecisionRows { decision: &decision, valid: &valid, generated: &generated, advantages: &advantages, width: w };
    let mut c = reasonmaxxer_coefficients(&view, &setup.loss)?;
    let seqs: Vec<Vec<u32>> = rows.iter().map(|&r| data.batch.ids()[r].clone()).collect();
    let ids = ids_tensor(&seqs, device);
    let targets: Tensor<3, Int> = ids.clone().narrow(1, 1, w).reshape([n, w, 1]);
    let lp = log_softmax(policy.forward(ids.narrow(1, 0, w))?, 2);
    let base_ids = ids_tensor(&seqs, &base.device()).narrow(1, 0, w);
    let lb_host = host_f32(log_softmax(base.forward(base_ids)?, 2))?;
    let lb = Tensor::<3>::from_data(TensorData::new(lb_host.clone(), [n, w, v]), device);
    let token_lp = lp.clone().gather(2, targets).reshape([n, w]);
    let kl = lb.clone().exp().mul(lb.sub(lp)).sum_dim(2).reshape([n, w]);
    let token_lp_host = host_f32(token_lp.clone().detach())?;
    apply_neg_prob_floor(&mut c.ce, &token_lp_host, setup.loss.neg_prob_floor)?;
    // `log p_base(y_t)` of every target (for Δ_t: the hinge and the diagnostics).
    let base_lp: Vec<f32> = (0..n * w).map(|t| lb_host[t * v + seqs[t / w][t % w + 1] as usize]).collect();
    let hinge = setup.loss.decision_objective == DecisionObjective::DeltaHinge;
    let margins = (setup.loss.hinge_margin_pos, setup.loss.hinge_margin_neg);
    if hinge {
        apply_delta_hinge(&mut c.ce, &token_lp_host, &base_lp, margins)?;
    }
    let tensor = |x: Vec<f32>| Tensor::<2>::from_data(TensorData::new(x, [n, w]), device);
    let dec = token_lp.clone().neg().mul(tensor(c.ce.clone())).sum();
    let anchor = kl.clone().mul(tensor(c.kl.clone())).sum();
    let loss = dec.clone().add(anchor);
    // Diagnostics on the host.
    let (token_lp, kl) = (token_lp_host, host_f32(kl.detach())?);
    let (mut plus, mut minus, mut anchor_sum) = ((0.0f64, 0usize), (0.0f64, 0usize), (0.0f64, 0usize));
    for t in 0..n * w {
        if c.effective[t] {
            let delta = f64::from(token_lp[t]) - f64::from(base_lp[t]);
            let s = if advantages[t / w] > 0.0 { &mut plus } else { &mut minus };
            (s.0, s.1) = (s.0 + delta, s.1 + 1);
        } else if c.kl[t] > 0.0 {
            (anchor_sum.0, anchor_sum.1) = (anchor_sum.0 + f64::from(kl[t]), anchor_sum.1 + 1);
        }
    }
    let mean = |(s, k): (f64, usize)| if k == 0 { f64::NAN } else { s / k as f64 };
    let mut dec_value = f64::from(crate::finite_scalar("ReasonMaxxer decision loss", &dec)?);
    if hinge {
        // The hinge's own value (its surrogate `Σ c·CE` differs from it by a constant).
        dec_value = delta_hinge_loss_host(&c.ce, &token_lp, &base_lp, margins);
    }
    Ok(StepLoss { loss, parts: (dec_value, mean(anchor_sum), mean(plus), mean(minus)) })
}
