//! Score: what the update needs besides the rollouts, computed once per batch before any update.
//!
//! 1. The rollout policy's entropy and log-prob of every target token at the rollout temperature (`log π_old`, and the
//!    inputs of EAPO / OPEFO), in one pass over the logits, without a graph; the reference policy's log-probs when the
//!    KL loss or KL in the reward is on.
//! 2. The reward the advantages see: the verifier's, plus DAPO's overlong penalty `R_len(|y|)`, minus `β·Σ_t kl_t` with
//!    KL in the reward (verl `apply_kl_penalty`; the sequence's token rewards summed, as verl's outcome estimators do).
//! 3. Group advantages from it (`forkrl_advantage::group_advantages`: GRPO, Dr. GRPO or RLOO).
//! 4. Token weighting (`forkrl_advantage::TokenWeighting`; SHEAR reads the rollout policy's last-layer hidden states),
//!    or GRPO-VPS's process advantages from probe rollouts ([`crate::rl::vps`]).
//! 5. The loss rows: per-query reward balance (`forkrl_advantage::balance_per_query`) and overlong filtering drop rows
//!    from the loss.
//! 6. With on-policy distillation ([`crate::rl::distill`]): the teacher's log-probs, the per-position reverse KL, the
//!    rock-token bypass weights and the distillation token advantages (in place of token weighting); full-bypass
//!    positions leave the loss rows. With SORT ([`crate::rl::sort`]): the repair prompts' reference rows and weights.

use forkrl_advantage::{
    BonusTarget, RolloutView, balance_per_query, group_advantages, kl::kl_value, ugttt_token_advantages,
};
use forkrl_entropy::OnlineRockDetector;

use crate::{
    Result,
    batch::{RolloutBatch, Scores},
    config::HealSetup,
    config::{Balance, CheckedConfig},
    host_f32,
    model::{Vocab, ids_tensor, policy::Policy, token_stats_host},
    rl::{
        distill,
        heal::{self, HealData},
        sort,
        ugttt::{self, Adapters},
        vps,
    },
};

/// What scoring reads besides the rollout policy and the batch: the frozen policies (autodiff-free) and the state
/// carried across steps.
#[derive(Debug, Default)]
pub struct ScoreContext<'a> {
    /// The reference policy: needed when the KL loss or KL in the reward is on.
    pub reference: Option<&'a Policy>,
    /// The distillation teacher: needed when `rl.distillation` is on.
    pub teacher: Option<&'a Policy>,
    /// The online rock-token detector (distillation with a bypass and no fixed rock set).
    pub rock_detector: Option<&'a mut OnlineRockDetector>,
    /// HEAL's setup and problem sets (when `rl.heal` is on): the EDA reward joins the reward.
    pub heal: Option<(&'a HealSetup, &'a HealData)>,
    /// UG-TTT's adapters (when `rl.ugttt` is on).
    pub adapters: Option<&'a Adapters>,
    /// The current β of KL in the reward.
    pub kl_coef: f64,
}

/// Scores `batch` with the rollout policy `policy` (an autodiff-free snapshot) and `ctx`.
///
/// # Errors
/// The errors of the advantage estimator, the forwards, the overlong penalty and the token weighting;
/// [`crate::TrainerError::Stage`] when a policy the configuration needs is missing from `ctx`.
pub fn score(
    policy: &Policy,
    vocab: &Vocab,
    config: &CheckedConfig,
    batch: &mut RolloutBatch,
    ctx: ScoreContext<'_>,
) -> Result<()> {
    let (reference, kl_coef) = (ctx.reference, ctx.kl_coef);
    let rl = &config.rl;
    let (w, temperature) = (batch.width(), config.temperature());
    let micro = config.log_prob_micro_batch_size().unwrap_or(batch.len());
    let no_grad = |p: &Policy| token_stats_host(p, batch.ids(), w, temperature, micro);
    let (old_entropy, old_log_prob) = no_grad(policy)?;
    let ref_log_prob = match (config.needs_reference(), reference) {
        (true, Some(r)) => Some(no_grad(r)?.1),
        (true, None) => {
            return Err(crate::TrainerError::Stage {
                stage: "score",
                reason: "the KL loss or KL in the reward is on but no reference policy was given".into(),
            });
        }
        (false, _) => None,
    };
    let (mut shaped, reward_kl) = shaped_rewards(batch, config, &old_log_prob, ref_log_prob.as_deref(), kl_coef)?;
    let heal = match ctx.heal {
        Some((setup, data)) => {
            let (eda, general) = heal::eda(batch, &old_entropy, data, setup)?;
            shaped.iter_mut().zip(&eda).for_each(|(r, e)| *r += e);
            Some((eda, general))
        }
        None => None,
    };
    let epistemic = match (&rl.ugttt, ctx.adapters) {
        (Some(u), Some(a)) => {
            let mi = ugttt::mutual_information(policy, a, batch, config.temperature(), micro)?;
            if u.bonus == BonusTarget::Reward {
                for (row, r) in shaped.iter_mut().enumerate() {
                    *r += u.beta * batch.response_positions(row).map(|i| mi[i]).sum::<f32>();
                }
            }
            Some(mi)
        }
        (Some(_), None) => {
            return Err(crate::TrainerError::Stage {
                stage: "score",
                reason: "rl.ugttt is on but no adapters were given".into(),
            });
        }
        (None, _) => None,
    };
    let adv = group_advantages(&shaped, batch.group_sizes(), &rl.advantage)?;
    let hidden = if rl.token_weighting.needs_hidden_states() {
        let states = policy.hidden_states(ids_tensor(batch.ids(), &policy.device()).narrow(1, 0, w))?;
        let dim = states.dims()[2];
        Some((host_f32(states)?, dim))
    } else {
        None
    };
    let view = RolloutView {
        width: w,
        response_mask: batch.response_mask(),
        group_sizes: batch.group_sizes(),
        advantages: &adv.advantages,
        entropy: Some(&old_entropy),
        log_prob: Some(&old_log_prob),
        hidden: hidden.as_ref().map(|(h, dim)| (h.as_slice(), *dim)),
    };
    let distill = match (&rl.distillation, ctx.teacher) {
        (Some(setup), Some(teacher)) => Some(distill::score(policy, teacher, batch, config, setup, ctx.rock_detector)?),
        (Some(_), None) => {
            return Err(crate::TrainerError::Stage {
                stage: "score",
                reason: "rl.distillation is on but no teacher was given".into(),
            });
        }
        (None, _) => None,
    };
    let (token_advantages, vps_probes) = match (&rl.vps, &rl.distillation, &distill) {
        (Some(v), _, _) => {
            let probes = vps::probe(policy, vocab, config, v, batch, &old_entropy)?;
            (vps::token_advantages(batch, &adv.advantages, &probes, v.vps.alpha)?, Some(probes))
        }
        (None, Some(setup), Some(d)) => {
            (distill::token_advantages(batch, setup, d, &old_log_prob, &adv.advantages)?, None)
        }
        _ => match (&rl.ugttt, &epistemic) {
            (Some(u), Some(mi)) if u.bonus == BonusTarget::Advantage => {
                (ugttt_token_advantages(&adv.advantages, mi, batch.response_mask(), u.beta)?, None)
            }
            _ => (rl.token_weighting.token_advantages(&view)?, None),
        },
    };
    let mut train_mask = train_mask(batch, &adv.advantages, config)?;
    if let Some(d) = &distill {
        for (m, w) in train_mask.iter_mut().zip(&d.weights) {
            *m &= *w > 0.0;
        }
    }
    let sort = match &rl.sort {
        Some(s) => Some(sort::score(policy, vocab, batch, config, s)?),
        None => None,
    };
    batch.scores = Some(Scores {
        rewards: shaped,
        reward_kl,
        advantages: adv.advantages,
        frac_reward_zero_std: adv.frac_reward_zero_std,
        old_entropy,
        old_log_prob,
        ref_log_prob,
        token_advantages,
        vps: vps_probes,
        train_mask,
        distill,
        sort,
        heal,
        epistemic,
    });
    Ok(())
}

/// `(β, current_kl)` of KL in the reward.
type RewardKl = (f64, f64);

/// The reward the advantages see — the verifier's, plus the overlong penalty, minus `β · Σ_t kl_t` with KL in the
/// reward — and `(β, current_kl)` of the latter (verl's `current_kl`: the batch mean of the per-sequence token means).
fn shaped_rewards(
    batch: &RolloutBatch,
    config: &CheckedConfig,
    old_log_prob: &[f32],
    ref_log_prob: Option<&[f32]>,
    kl_coef: f64,
) -> Result<(Vec<f32>, Option<RewardKl>)> {
    let rl = &config.rl;
    let mut shaped = batch.rewards.clone();
    if let Some(o) = &rl.overlong {
        for (r, rollout) in shaped.iter_mut().zip(batch.rollouts()) {
            *r += o.penalty(rollout.response.len())? as f32;
        }
    }
    let (Some(k), Some(reference)) = (&rl.kl_in_reward, ref_log_prob) else { return Ok((shaped, None)) };
    let mut seq_means = Vec::with_capacity(batch.len());
    for (row, r) in shaped.iter_mut().enumerate() {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for i in batch.response_positions(row) {
            sum += kl_value(k.kl_penalty.estimator, f64::from(old_log_prob[i]), f64::from(reference[i]));
            n += 1;
        }
        *r = (f64::from(*r) - kl_coef * sum) as f32;
        seq_means.push(if n == 0 { 0.0 } else { sum / n as f64 });
    }
    let current_kl = seq_means.iter().sum::<f64>() / seq_means.len().max(1) as f64;
    Ok((shaped, Some((kl_coef, current_kl))))
}

/// The response mask less the rows that reward balancing and overlong filtering drop.
fn train_mask(batch: &RolloutBatch, advantages: &[f32], config: &CheckedConfig) -> Result<Vec<bool>> {
    let w = batch.width();
    let mut mask = batch.response_mask().to_vec();
    if let Some(o) = &config.rl.overlong {
        for (r, rollout) in batch.rollouts().iter().enumerate() {
            if !o.keep(rollout.truncated) {
                mask[r * w..(r + 1) * w].fill(false);
            }
        }
    }
    if config.rl.balance == Balance::PerQuery {
        let positive: Vec<bool> = advantages.iter().map(|&a| a > 0.0).collect();
        let keep = balance_per_query(&positive, batch.group_sizes())?;
        for (r, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
            mask[r * w..(r + 1) * w].fill(false);
        }
    }
    Ok(mask)
}
