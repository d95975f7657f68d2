//! Rollout dumps: every `rl.rollout_dump_every` RL steps, the scored batch as `rollouts/step-NNNNNN.jsonl`, one line
//! per response — prompt and response text, reward (the verifier's and the shaped one), advantage, and the rollout
//! policy's per-token entropy and log-prob of each response token — for the paper's analyses (which tokens fork, how
//! entropy moves) offline. Written atomically; off by default.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{Result, TrainerError, batch::RolloutBatch, model::Vocab};

/// One line of a rollout dump.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DumpRecord {
    /// The RL step.
    pub step: usize,
    /// The prompt's group in the batch.
    pub group: usize,
    /// The prompt text.
    pub prompt: String,
    /// The response text (up to its first EOS).
    pub response: String,
    /// The response's token ids (EOS included when emitted).
    pub response_ids: Vec<u32>,
    /// The verifier's reward.
    pub reward: f32,
    /// The reward the advantages saw (overlong penalty and KL in the reward applied).
    pub shaped_reward: f32,
    /// The group advantage.
    pub advantage: f32,
    /// The response hit the length cap.
    pub truncated: bool,
    /// The rollout policy's entropy of each response token (at the rollout temperature).
    pub entropy: Vec<f32>,
    /// `log π_old` of each response token.
    pub log_prob: Vec<f32>,
}

/// The dump records of a scored batch.
///
/// # Errors
/// [`TrainerError::Stage`] for an unscored batch.
pub fn dump_records(batch: &RolloutBatch, vocab: &Vocab) -> Result<Vec<DumpRecord>> {
    let s = batch.scored("rollout dump")?;
    let group_of = batch.group_of();
    Ok(batch
        .rollouts()
        .iter()
        .enumerate()
        .map(|(r, rollout)| DumpRecord {
            step: batch.step,
            group: group_of[r],
            prompt: vocab.tokenizer.decode_response(&rollout.prompt, &[]),
            response: vocab.text(&rollout.response),
            response_ids: rollout.response.clone(),
            reward: batch.rewards[r],
            shaped_reward: s.rewards[r],
            advantage: s.advantages[r],
            truncated: rollout.truncated,
            entropy: batch.response_values(&s.old_entropy, r),
            log_prob: batch.response_values(&s.old_log_prob, r),
        })
        .collect())
}

/// The dump file of `step` under `dir`.
pub fn dump_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:06}.jsonl"))
}

/// Writes the dump of a scored batch to [`dump_path`]`(dir, batch.step)` atomically (creating `dir`).
///
/// # Errors
/// [`TrainerError::Io`]; [`TrainerError::Stage`] for an unscored batch.
pub fn write_dump(dir: &Path, batch: &RolloutBatch, vocab: &Vocab) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|source| TrainerError::Io { path: dir.to_path_buf(), source })?;
    let mut text = String::new();
    for record in dump_records(batch, vocab)? {
        let line = serde_json::to_string(&record).map_err(|e| TrainerError::Shape(format!("rollout dump: {e}")))?;
        text.push_str(&line);
        text.push('\n');
    }
    let path = dump_path(dir, batch.step);
    forkrl_core::report::write_atomic(&path, &text)
        .map_err(|source| TrainerError::Io { path: path.clone(), source })?;
    Ok(path)
}
