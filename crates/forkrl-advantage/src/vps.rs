//! GRPO-VPS — Verifiable Process Supervision (Wang et al., arXiv 2604.20659, ICLR 2026).
//!
//! The response is cut into `n` segments at high-entropy positions; a belief probe `C_k = π(y* | x, z_≤k)` (the
//! model's probability of the gold answer after the first `k` segments, `C_0` on the empty reasoning) is computed by
//! the caller without gradient; each token of segment `k` gets
//!
//! ```text
//! Ã_{i,t} = A_i + α · (C_k − C_{k−1})
//! ```
//!
//! then the usual GRPO loss. An all-equal group (`A = 0`) is driven by the process term alone, by construction.
//!
//! **RECONSTRUCTION** (the paper's details are unknown; each is a parameter here): the split heuristic — candidate
//! split points are tokens whose entropy exceeds `mean + high_entropy_z · std` of the response, and boundaries are
//! placed at the candidates that divide them into `n` equal shares (each segment starts at a forking token); α = 1;
//! whether `C` is a raw or length-normalised probability is the caller's choice when probing (length-normalised
//! `exp(mean log p)` recommended). Source: `../shared/methods/token-credit.md` §5.

use forkrl_core::{Error, Result, numeric::check_finite};
use serde::{Deserialize, Serialize};

/// GRPO-VPS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VpsConfig {
    /// Number of segments (4, the paper's best trade-off).
    pub num_segments: usize,
    /// Candidate split points: entropy above `mean + z·std` of the response (RECONSTRUCTION).
    pub high_entropy_z: f64,
    /// α, weight of the progress term (RECONSTRUCTION default 1).
    pub alpha: f64,
}

impl Default for VpsConfig {
    fn default() -> Self {
        Self { num_segments: 4, high_entropy_z: 1.0, alpha: 1.0 }
    }
}

/// Segment index (0-based) of every token of one response, from its token entropies. Fewer than `num_segments`
/// segments come back when there are fewer candidates; no candidate gives one segment.
///
/// # Errors
/// [`Error::InvalidParameter`] for `num_segments == 0` or a non-finite `high_entropy_z`; [`Error::NonFinite`] for a
/// NaN/inf entropy.
pub fn vps_segments(entropy: &[f32], config: &VpsConfig) -> Result<Vec<usize>> {
    if config.num_segments == 0 {
        return Err(Error::invalid_parameter("num_segments", 0, "must be at least 1"));
    }
    if !config.high_entropy_z.is_finite() {
        return Err(Error::invalid_parameter("high_entropy_z", config.high_entropy_z, "must be finite"));
    }
    check_finite("entropy", entropy, &[entropy.len()])?;
    if entropy.is_empty() {
        return Ok(Vec::new());
    }
    let n = entropy.len() as f64;
    let mean = entropy.iter().map(|&h| f64::from(h)).sum::<f64>() / n;
    let std = (entropy.iter().map(|&h| (f64::from(h) - mean).powi(2)).sum::<f64>() / n).sqrt();
    let cut = mean + config.high_entropy_z * std;
    let candidates: Vec<usize> = (1..entropy.len()).filter(|&t| f64::from(entropy[t]) > cut).collect();
    let m = candidates.len();
    let mut starts: Vec<usize> =
        (1..config.num_segments).filter_map(|j| candidates.get(j * m / config.num_segments).copied()).collect();
    starts.dedup();
    let mut segment = vec![0usize; entropy.len()];
    let mut s = 0;
    for (t, seg) in segment.iter_mut().enumerate() {
        while s < starts.len() && t >= starts[s] {
            s += 1;
        }
        *seg = s;
    }
    Ok(segment)
}

/// `Ã_t = A + α·(C_{k+1} − C_k)` for a token in (0-based) segment `k`; `probes = [C_0, C_1, …, C_K]`.
///
/// # Errors
/// [`Error::NonFinite`] / [`Error::InvalidParameter`] for probes outside [0, 1]; [`Error::ShapeMismatch`] when a
/// segment index has no probe after it.
pub fn vps_advantages(advantage: f32, segments: &[usize], probes: &[f32], alpha: f64) -> Result<Vec<f32>> {
    check_finite("probes", probes, &[probes.len()])?;
    if let Some(&p) = probes.iter().find(|p| !(0.0..=1.0).contains(*p)) {
        return Err(Error::invalid_parameter("probes", p, "probabilities must lie in [0, 1]"));
    }
    let needed = segments.iter().max().map_or(0, |&k| k + 2);
    if probes.len() < needed {
        return Err(Error::ShapeMismatch {
            op: "vps_advantages: probes C_0..C_K",
            expected: vec![needed],
            actual: vec![probes.len()],
        });
    }
    Ok(segments
        .iter()
        .map(|&k| (f64::from(advantage) + alpha * (f64::from(probes[k + 1]) - f64::from(probes[k]))) as f32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_forking_tokens_in_equal_shares() {
        // Eight spikes at 2, 5, 8, 11, 14, 17, 20, 23; four segments start at spikes 0, 2, 4, 6 → positions 8, 14, 20.
        let mut h = vec![0.1f32; 26];
        for t in [2, 5, 8, 11, 14, 17, 20, 23] {
            h[t] = 3.0;
        }
        let seg = vps_segments(&h, &VpsConfig::default()).expect("valid");
        assert_eq!(seg[7], 0);
        assert_eq!((seg[8], seg[13], seg[14], seg[19], seg[20], seg[25]), (1, 1, 2, 2, 3, 3));
        assert_eq!(vps_segments(&[0.5; 10], &VpsConfig::default()).expect("flat"), vec![0; 10]);
        assert!(vps_segments(&h, &VpsConfig { num_segments: 0, ..VpsConfig::default() }).is_err());
    }

    #[test]
    fn progress_advantages_by_hand() {
        let out = vps_advantages(0.5, &[0, 0, 1, 2], &[0.1, 0.3, 0.2, 0.9], 1.0).expect("valid");
        let expected = [0.7f32, 0.7, 0.4, 1.2];
        assert!(out.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{out:?}");
        // All-equal group: the process term alone.
        assert!((vps_advantages(0.0, &[0], &[0.2, 0.6], 1.0).expect("valid")[0] - 0.4).abs() < 1e-6);
        assert!(matches!(vps_advantages(0.0, &[0, 1], &[0.2, 0.6], 1.0), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(vps_advantages(0.0, &[0], &[0.2, 1.5], 1.0), Err(Error::InvalidParameter { .. })));
    }
}
