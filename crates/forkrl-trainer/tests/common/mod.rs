//! Helpers shared by the trainer's integration tests.

use forkrl_trainer::{
    Trainer,
    batch::{Rollout, RolloutBatch},
};

/// A hand-built batch of `(prompt, response, reward)` rows in groups of `group_sizes`, each response ended by EOS,
/// encoded with the trainer's vocabulary.
pub fn batch_of(t: &Trainer, rows: &[(&str, &str, f32)], group_sizes: Vec<usize>) -> RolloutBatch {
    let v = t.vocab();
    let rollouts = rows
        .iter()
        .map(|(p, r, reward)| {
            let mut response = v.encode(r).expect("encodes");
            response.push(v.eos[0]);
            Rollout { prompt: v.encode(p).expect("encodes"), response, truncated: false, reward: *reward }
        })
        .collect();
    RolloutBatch::new(1, rollouts, group_sizes, v.pad).expect("valid batch")
}
