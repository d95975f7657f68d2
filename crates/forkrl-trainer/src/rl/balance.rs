//! The buffered global reward balance of the cancellation paper (`forkrl_advantage::BalancedBuffer`): the rollouts of
//! each step are scored on their full groups (advantages, `log π_old` of the policy that sampled them), then buffered
//! by advantage sign; an update runs when the buffer can give a balanced batch of `prompts_per_step × group_size`
//! rows (the minority side at least `⌈ratio_low·B⌉`, at most `⌊ratio_high·B⌋`), after `max_buffer_steps` steps without
//! one, or at the last step. The update batch is rebuilt from the drawn rows, each its own group (mini-batches then
//! split rows, not groups), with the per-token values it was scored with; a row drawn several steps after it was
//! sampled is trained off-policy, its importance ratio against the policy that sampled it (as the paper's buffer).
//! The buffer is part of the checkpoint, so a resumed run draws what an uninterrupted one does.

use forkrl_advantage::{BalancedBuffer, BalancedExtraction};
use forkrl_core::{SeedStream, derive_seed};
use serde::{Deserialize, Serialize};

use crate::{
    Result,
    batch::{Rollout, RolloutBatch, Scores},
};

/// One scored rollout waiting in the buffer, with its per-response-token values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferedRow {
    /// The RL step that sampled it.
    pub step: usize,
    /// The rollout.
    pub rollout: Rollout,
    /// The verifier's reward.
    pub reward: f32,
    /// The reward the advantage was computed from.
    pub shaped_reward: f32,
    /// The group advantage.
    pub advantage: f32,
    /// Per response token: the rollout policy's entropy, `log π_old`, the token advantage, `log π_ref` (KL loss).
    pub old_entropy: Vec<f32>,
    /// `log π_old`.
    pub old_log_prob: Vec<f32>,
    /// Token advantages.
    pub token_advantages: Vec<f32>,
    /// `log π_ref`, when the KL loss is on.
    pub ref_log_prob: Option<Vec<f32>>,
}

/// The buffer of a run.
pub type RowBuffer = BalancedBuffer<BufferedRow>;

/// The rows of a scored batch, by advantage sign (`A > 0` positive), ready to push.
///
/// # Errors
/// [`crate::TrainerError::Stage`] for an unscored batch.
pub fn rows_of(batch: &RolloutBatch) -> Result<Vec<(BufferedRow, bool)>> {
    let s = batch.scored("balance")?;
    Ok(batch
        .rollouts()
        .iter()
        .enumerate()
        .map(|(r, rollout)| {
            let pick = |v: &[f32]| batch.response_values(v, r);
            let row = BufferedRow {
                step: batch.step,
                rollout: rollout.clone(),
                reward: batch.rewards[r],
                shaped_reward: s.rewards[r],
                advantage: s.advantages[r],
                old_entropy: pick(&s.old_entropy),
                old_log_prob: pick(&s.old_log_prob),
                token_advantages: pick(&s.token_advantages),
                ref_log_prob: s.ref_log_prob.as_deref().map(pick),
            };
            (row, s.advantages[r] > 0.0)
        })
        .collect())
}

/// Pushes a scored batch; when an update is due, draws it and returns it as a scored batch of step `batch.step`.
///
/// # Errors
/// As [`rows_of`] and [`batch_of`].
pub fn push_and_draw(
    buffer: &mut RowBuffer,
    batch: &RolloutBatch,
    size: usize,
    last_step: bool,
    seed: u64,
    pad: u32,
) -> Result<Option<(RolloutBatch, BalancedExtraction<()>)>> {
    buffer.push_step(rows_of(batch)?);
    if !buffer.should_update(size, last_step) {
        return Ok(None);
    }
    let drawn = buffer.extract(size, derive_seed(seed, SeedStream::BalanceExtract, &[batch.step as u64]));
    let info = BalancedExtraction {
        items: Vec::new(),
        minority_positive: drawn.minority_positive,
        minority_take: drawn.minority_take,
        majority_take: drawn.majority_take,
    };
    if drawn.items.is_empty() {
        return Ok(None);
    }
    Ok(Some((batch_of(drawn.items, batch.step, pad)?, info)))
}

/// A scored batch of buffered rows (each row its own group), laid out to the rows' own width.
///
/// # Errors
/// [`crate::TrainerError::Shape`] for no row.
pub fn batch_of(rows: Vec<BufferedRow>, step: usize, pad: u32) -> Result<RolloutBatch> {
    let n = rows.len();
    let rollouts: Vec<Rollout> = rows.iter().map(|r| r.rollout.clone()).collect();
    let mut batch = RolloutBatch::new(step, rollouts, vec![1; n], pad)?;
    let w = batch.width();
    let lay = |values: &dyn Fn(&BufferedRow) -> &[f32]| -> Vec<f32> {
        let mut out = vec![0.0f32; n * w];
        for (r, row) in rows.iter().enumerate() {
            for (i, &v) in batch.response_positions(r).zip(values(row)) {
                out[i] = v;
            }
        }
        out
    };
    let has_ref = rows.iter().all(|r| r.ref_log_prob.is_some());
    let scores = Scores {
        rewards: rows.iter().map(|r| r.shaped_reward).collect(),
        reward_kl: None,
        advantages: rows.iter().map(|r| r.advantage).collect(),
        frac_reward_zero_std: 0.0,
        old_entropy: lay(&|r| &r.old_entropy),
        old_log_prob: lay(&|r| &r.old_log_prob),
        ref_log_prob: has_ref.then(|| lay(&|r| r.ref_log_prob.as_deref().unwrap_or(&[]))),
        token_advantages: lay(&|r| &r.token_advantages),
        vps: None,
        train_mask: batch.response_mask().to_vec(),
        distill: None,
        sort: None,
        heal: None,
        epistemic: None,
        info: None,
    };
    batch.rewards = rows.iter().map(|r| r.reward).collect();
    batch.scores = Some(scores);
    Ok(batch)
}
