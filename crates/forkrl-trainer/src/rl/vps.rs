//! GRPO-VPS's probes (Wang et al., arXiv 2604.20659; `forkrl_advantage::vps`): each response is cut into segments at
//! its high-entropy tokens (`vps_segments`, from the rollout policy's entropies), and the belief `C_k` after the first
//! `k` segments is estimated by **probe rollouts**: `probes_per_prefix` continuations sampled (at the rollout decoding)
//! from the prompt plus the response's first `k` segments, verified by the task; `C_k` is the share that earn the
//! reward. `C_0` probes from the prompt alone; `C_K` is the response's own reward (it is complete). Each token of
//! segment `k` then gets `Ã = A + α·(C_{k+1} − C_k)` (`vps_advantages`).
//!
//! **RECONSTRUCTION** (the paper's probe is the model's probability of the gold answer after the prefix; with a verifier
//! and no gold continuation to score, a Monte-Carlo estimate by the sampler is the faithful stand-in): the probe count
//! (`probes_per_prefix`, 4), the continuation cap (a probe may use what is left of `rl.max_response_len` after its
//! prefix), and `C_K` = the response's reward are choices of this file, each a parameter or documented here.

use forkrl_advantage::{VpsConfig, vps_advantages, vps_segments};
use forkrl_core::{SeedStream, derive_seed};
use serde::{Deserialize, Serialize};

use crate::{
    Result, TrainerError,
    batch::RolloutBatch,
    config::CheckedConfig,
    model::{
        Vocab,
        policy::Policy,
        sampler::{self, SampleRow},
    },
};

/// `[rl.vps]`: the library's segmenting and α, plus the probes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VpsProbeConfig {
    /// Segments, split rule and α (`forkrl_advantage::VpsConfig`).
    #[serde(flatten)]
    pub vps: VpsConfig,
    /// Probe rollouts per prefix (RECONSTRUCTION, 4).
    pub probes_per_prefix: usize,
}

impl Default for VpsProbeConfig {
    fn default() -> Self {
        Self { vps: VpsConfig::default(), probes_per_prefix: 4 }
    }
}

/// The probe estimates `[C_0, …, C_K]` of every row and the rows' segment index per response token.
#[derive(Debug, Clone, PartialEq)]
pub struct VpsProbes {
    /// Per row: the segment of each response token.
    pub segments: Vec<Vec<usize>>,
    /// Per row: `C_0..C_K`.
    pub beliefs: Vec<Vec<f32>>,
}

/// Samples the probes of a scored-in-progress batch: `entropy` is the rollout policy's `[B, W]` entropy.
///
/// # Errors
/// [`TrainerError::Stage`] for a batch without its problems (built by hand); sampler and library errors.
pub fn probe(
    policy: &Policy,
    vocab: &Vocab,
    config: &CheckedConfig,
    cfg: &VpsProbeConfig,
    batch: &RolloutBatch,
    entropy: &[f32],
) -> Result<VpsProbes> {
    let problems = batch.problems.as_ref().ok_or_else(|| TrainerError::Stage {
        stage: "score",
        reason: "GRPO-VPS verifies its probes against each group's problem: this batch has none (build it with \
                 rollout)"
            .into(),
    })?;
    let group_of = batch.group_of();
    let max_len = config.rl.max_response_len;
    // Per row: segments, and the prefixes (prompt + first k segments) to probe for k = 0..K−1.
    let mut segments = Vec::with_capacity(batch.len());
    let mut prefixes: Vec<(usize, Vec<u32>, usize)> = Vec::new(); // (row, ids, response tokens in the prefix)
    for (r, rollout) in batch.rollouts().iter().enumerate() {
        let seg = vps_segments(&batch.response_values(entropy, r), &cfg.vps)?;
        let k_max = seg.last().map_or(0, |&k| k + 1);
        for k in 0..k_max {
            let cut = seg.iter().position(|&s| s == k).unwrap_or(0);
            let mut ids = rollout.prompt.clone();
            ids.extend_from_slice(&rollout.response[..cut]);
            prefixes.push((r, ids, cut));
        }
        segments.push(seg);
    }
    let n = cfg.probes_per_prefix.max(1);
    let rows: Vec<SampleRow<'_>> = prefixes
        .iter()
        .enumerate()
        .flat_map(|(p, (_, ids, _))| {
            (0..n).map(move |j| SampleRow { prompt: ids, op: config.rl.decoding, row_id: (p * n + j) as u64 })
        })
        .collect();
    let seed = derive_seed(config.run.seed, SeedStream::VpsProbe, &[batch.step as u64]);
    let out = sampler::generate_rows(policy, &rows, &vocab.sampler_config(max_len, seed))?;
    let mut beliefs: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
    for (p, (r, _, cut)) in prefixes.iter().enumerate() {
        let problem = &problems[group_of[*r]];
        let rollout = &batch.rollouts()[*r];
        let hits = (0..n)
            .filter(|&j| {
                // The continuation may use what the cap leaves after the prefix.
                let cont = &out.tokens[p * n + j];
                let mut response = rollout.response[..*cut].to_vec();
                response.extend_from_slice(&cont[..cont.len().min(max_len.saturating_sub(*cut))]);
                problem.reward(&vocab.text(&response)) > 0.0
            })
            .count();
        beliefs[*r].push(hits as f32 / n as f32);
    }
    for (r, b) in beliefs.iter_mut().enumerate() {
        b.push(batch.rewards[r].clamp(0.0, 1.0)); // C_K: the complete response
    }
    Ok(VpsProbes { segments, beliefs })
}

/// The token advantages `[B, W]` of GRPO-VPS from the group advantages and the probes.
///
/// # Errors
/// The library's errors.
pub fn token_advantages(batch: &RolloutBatch, advantages: &[f32], probes: &VpsProbes, alpha: f64) -> Result<Vec<f32>> {
    let w = batch.width();
    let mut out = vec![0.0f32; batch.len() * w];
    for r in 0..batch.len() {
        let a = vps_advantages(advantages[r], &probes.segments[r], &probes.beliefs[r], alpha)?;
        for (i, v) in batch.response_positions(r).zip(a) {
            out[i] = v;
        }
    }
    Ok(out)
}
