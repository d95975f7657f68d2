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
    let rl = &config.rl;
    let (w, temperature) = (batch.width(), config.temperature());
    let micro = config.log_prob_micro_batch_size().unwrap_or(batch.len());
    let no_grad = |p: &Policy| token_stats_host(p, batch.ids(), w, temperature, micro);
    let (old_entropy, old_log_prob) = no_grad(policy)?;
    let ref_log_prob = match (config.needs_reference(), ctx.reference) {
        (true, Some(r)) => Some(no_grad(r)?.1),
        (true, None) => return Err(missing("the KL loss or KL in the reward", "reference policy")),
        (false, _) => None,
    };
    let (mut shaped, reward_kl) = shaped_rewards(batch, config, &old_log_prob, ref_log_prob.as_deref(), ctx.kl_coef)?;
    let (heal, epistemic) = reward_bonuses(policy, config, batch, &ctx, &old_entropy, &mut shaped)?;
    let info = match &rl.imax {
        Some(imax) => Some(crate::rl::imax::info_rewards(policy, batch, imax, micro, &mut shaped)?),
        None => None,
    };
    let adv = group_advantages(&shaped, batch.group_sizes(), &rl.advantage)?;
    let distill = match (&rl.distillation, ctx.teacher) {
        (Some(setup), Some(teacher)) => Some(distill::score(policy, teacher, batch, config, setup, ctx.rock_detector)?),
        (Some(_), None) => return Err(missing("rl.distillation", "teacher")),
        (None, _) => None,
    };
    let per_token = PerToken {
        entropy: &old_entropy,
        log_prob: &old_log_prob,
        distill: distill.as_ref(),
        epistemic: epistemic.as_deref(),
    };
    let (token_advantages, vps_probes) = token_advantages(policy, vocab, config, batch, &adv.advantages, &per_token)?;
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
        info,
    });
    Ok(())
}

/// The error of an option whose frozen policy or state the context lacks.
fn missing(option: &str, what: &str) -> crate::TrainerError {
    crate::TrainerError::Stage { stage: "score", reason: format!("{option} is on but no {what} was given") }
}

/// HEAL's `(r_EDA, general)` and UG-TTT's `MI_t`, with the parts that go into the reward added to `shaped`.
type Bonuses = (Option<(Vec<f32>, Vec<bool>)>, Option<Vec<f32>>);

/// The reward bonuses computed before the advantages: HEAL's EDA reward and UG-TTT's `β Σ_t MI_t` (`bonus =
/// "reward"`; with `"advantage"` the MI is returned for the token advantages only).
fn reward_bonuses(
    policy: &Policy,
    config: &CheckedConfig,
    batch: &RolloutBatch,
    ctx: &ScoreContext<'_>,
    old_entropy: &[f32],
    shaped: &mut [f32],
) -> Result<Bonuses> {
    let heal = match ctx.heal {
        Some((setup, data)) => {
            let (eda, general) = heal::eda(batch, old_entropy, data, setup)?;
            shaped.iter_mut().zip(&eda).for_each(|(r, e)| *r += e);
            Some((eda, general))
        }
        None => None,
    };
    let epistemic = match (&config.rl.ugttt, ctx.adapters) {
        (Some(u), Some(a)) => {
            let micro = config.log_prob_micro_batch_size().unwrap_or(batch.len());
            let mi = ugttt::mutual_information(policy, a, batch, config.temperature(), micro)?;
            if u.bonus == BonusTarget::Reward {
                for (row, r) in shaped.iter_mut().enumerate() {
                    *r += u.beta * batch.response_positions(row).map(|i| mi[i]).sum::<f32>();
                }
            }
            Some(mi)
        }
        (Some(_), None) => return Err(missing("rl.ugttt", "adapters")),
        (None, _) => None,
    };
    Ok((heal, epistemic))
}

/// The rollout policy's per-token values the token advantages may read.
struct PerToken<'a> {
    entropy: &'a [f32],
    log_prob: &'a [f32],
    distill: Option<&'a distill::DistillScores>,
    epistemic: Option<&'a [f32]>,
}

/// The token advantages: GRPO-VPS's, distillation's, UG-TTT's advantage bonus, or the configured token weighting (one
/// of them; the configuration check keeps them exclusive).
fn token_advantages(
    policy: &Policy,
    vocab: &Vocab,
    config: &CheckedConfig,
    batch: &RolloutBatch,
    advantages: &[f32],
    t: &PerToken<'_>,
) -> Result<(Vec<f32>, Option<vps::VpsProbes>)> {
    let rl = &config.rl;
    if let Some(v) = &rl.vps {
        let probes = vps::probe(policy, vocab, config, v, batch, t.entropy)?;
        return Ok((vps::token_advantages(batch, advantages, &probes, v.vps.alpha)?, Some(probes)));
    }
    if let (Some(setup), Some(d)) = (&rl.distillation, t.distill) {
        return Ok((distill::token_advantages(batch, setup, d, t.log_prob, advantages)?, None));
    }
    if let (Some(u), Some(mi)) = (&rl.ugttt, t.epistemic)
        && u.bonus == BonusTarget::Advantage
    {
        return Ok((ugttt_token_advantages(advantages, mi, batch.response_mask(), u.beta)?, None));
    }
    let w = batch.width();
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
        advantages,
        entropy: Some(t.entropy),
        log_prob: Some(t.log_prob),
        hidden: hidden.as_ref().map(|(h, dim)| (h.as_slice(), *dim)),
    };
    Ok((rl.token_weighting.token_advantages(&view)?, None))
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
