//! The supervised warm start: next-token cross-entropy on the task's worked solutions (prompt tokens masked out),
//! averaged over the batch's response tokens.

use burn::tensor::{Bool, Tensor, TensorData};
use forkrl_core::{SeedStream, derive_seed};

use crate::{
    Result, TrainerError,
    batch::{Rollout, RolloutBatch},
    model::{Vocab, policy::Policy, token_stats},
    tasks::Task,
};

/// The SFT batch of step `step`: `batch_size` problems drawn from the task's training split, each target the worked
/// solution followed by EOS, tokenized as a continuation of its prompt (no BOS in the middle).
///
/// # Errors
/// [`TrainerError::InvalidConfig`] for a drawn problem without a worked solution ([`Trainer::new`](crate::Trainer)
/// refuses such a dataset up front); tokenizer errors.
pub fn sft_batch(task: &Task, vocab: &Vocab, batch_size: usize, seed: u64, step: usize) -> Result<RolloutBatch> {
    let problems = task.sample(batch_size, derive_seed(seed, SeedStream::SftBatch, &[step as u64]))?;
    let rollouts = problems
        .iter()
        .map(|p| {
            let solution = p.solution.as_deref().ok_or_else(|| {
                TrainerError::invalid("sft.steps", "> 0", format!("the problem {:?} has no worked solution", p.prompt))
            })?;
            // The prompt gets the tokenizer's special tokens (BOS for Llama); the target continues it, so none there.
            let mut response = vocab.encode_continuation(solution)?;
            response.push(vocab.eos[0]);
            Ok(Rollout { prompt: vocab.encode(&p.prompt)?, response, truncated: false, reward: 0.0 })
        })
        .collect::<Result<Vec<_>>>()?;
    let n = rollouts.len();
    RolloutBatch::new(0, rollouts, vec![1; n], vocab.pad)
}

/// The SFT loss of a batch (with a graph when the policy is on an autodiff device): `−Σ log p(target) / #targets`.
///
/// # Errors
/// The forward's errors.
pub fn sft_loss(policy: &Policy, batch: &RolloutBatch) -> Result<Tensor<1>> {
    let n = batch.response_mask().iter().filter(|&&x| x).count();
    sft_loss_over(policy, batch, n)
}

/// `−Σ log p(target) / denominator` over the batch's targets: one micro-batch's share of a larger batch's loss when
/// `denominator` is that batch's target count.
///
/// # Errors
/// The forward's errors.
pub fn sft_loss_over(policy: &Policy, batch: &RolloutBatch, denominator: usize) -> Result<Tensor<1>> {
    let (b, w) = (batch.len(), batch.width());
    let (_, log_prob) = token_stats(policy, batch.ids(), w, 1.0)?;
    let mask = batch.response_mask();
    let mask_t = Tensor::<2, Bool>::from_data(TensorData::new(mask.to_vec(), [b, w]), &log_prob.device());
    Ok(log_prob.mask_fill(mask_t.bool_not(), 0.0).sum().neg().div_scalar(denominator.max(1) as f32))
}

/// The rows `rows` of an SFT batch as a batch of their own (padded to their own width).
///
/// # Errors
/// Never for rows of a valid batch.
pub fn sft_rows(batch: &RolloutBatch, rows: std::ops::Range<usize>, pad: u32) -> Result<RolloutBatch> {
    let part: Vec<Rollout> = batch.rollouts()[rows].to_vec();
    let n = part.len();
    RolloutBatch::new(0, part, vec![1; n], pad)
}
