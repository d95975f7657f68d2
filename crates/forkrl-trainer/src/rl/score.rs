//! Score: what the update needs besides the rollouts, computed once per batch before any update.
//!
//! 1. Group advantages from the rewards (`forkrl_advantage::group_advantages`: GRPO, Dr. GRPO or RLOO).
//! 2. The rollout policy's entropy and log-prob of every target token at the rollout temperature (`log π_old`, and the
//!    inputs of EAPO / OPEFO), in one pass over the logits, without a graph; the reference policy's log-probs when the
//!    KL loss is on.
//! 3. Token weighting (`forkrl_advantage::TokenWeighting`; SHEAR reads the rollout policy's last-layer hidden states).
//! 4. The loss rows: per-query reward balance (`forkrl_advantage::balance_per_query`) drops rows from the loss.

use forkrl_advantage::{RolloutView, balance_per_query, group_advantages};

use crate::{
    Result,
    batch::{RolloutBatch, Scores},
    config::{Balance, CheckedConfig},
    host_f32,
    model::{ids_tensor, policy::Policy, token_stats},
};

/// Scores `batch` with the rollout policy `policy` and the reference policy `reference` (both autodiff-free
/// snapshots; `reference` is needed when the KL loss is on).
///
/// # Errors
/// The errors of the advantage estimator, the forwards and the token weighting.
pub fn score(
    policy: &Policy,
    reference: Option<&Policy>,
    config: &CheckedConfig,
    batch: &mut RolloutBatch,
) -> Result<()> {
    let rl = &config.rl;
    let adv = group_advantages(&batch.rewards, batch.group_sizes(), &rl.advantage)?;
    let (w, temperature) = (batch.width(), config.temperature());
    let no_grad = |p: &Policy| -> Result<(Vec<f32>, Vec<f32>)> {
        let (h, lp) = token_stats(p, batch.ids(), w, temperature)?;
        Ok((host_f32(h)?, host_f32(lp)?))
    };
    let (old_entropy, old_log_prob) = no_grad(policy)?;
    let ref_log_prob = match (rl.kl_loss, reference) {
        (Some(_), Some(r)) => Some(no_grad(r)?.1),
        (Some(_), None) => {
            return Err(crate::TrainerError::Stage {
                stage: "score",
                reason: "the KL loss is on but no reference policy was given".into(),
            });
        }
        (None, _) => None,
    };
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
    let token_advantages = rl.token_weighting.token_advantages(&view)?;
    let train_mask = train_mask(batch, &adv.advantages, rl.balance)?;
    batch.scores = Some(Scores {
        advantages: adv.advantages,
        frac_reward_zero_std: adv.frac_reward_zero_std,
        old_entropy,
        old_log_prob,
        ref_log_prob,
        token_advantages,
        train_mask,
    });
    Ok(())
}

/// The response mask less the rows that reward balancing drops.
fn train_mask(batch: &RolloutBatch, advantages: &[f32], balance: Balance) -> Result<Vec<bool>> {
    let w = batch.width();
    let mut mask = batch.response_mask().to_vec();
    if balance == Balance::PerQuery {
        let positive: Vec<bool> = advantages.iter().map(|&a| a > 0.0).collect();
        let keep = balance_per_query(&positive, batch.group_sizes())?;
        for (r, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
            mask[r * w..(r + 1) * w].fill(false);
        }
    }
    Ok(mask)
}
