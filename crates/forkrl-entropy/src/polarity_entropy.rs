//! Polarity × entropy credit analysis (EAPO, "Rethinking Token-Level Credit Assignment in RLVR: A Polarity-Entropy
//! Analysis", He et al., arXiv 2604.11056) and the per-token covariance that drives entropy change (Clip-Cov /
//! KL-Cov, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", Cui et al.,
//! arXiv 2505.22617).
//!
//! **Quadrants.** Each loss token falls into one of PHR (positive advantage, high entropy), PLR (positive, low), NHR
//! (negative, high) or NLR (negative, low); tokens with `Â = 0` (all-equal groups) are counted apart. For each quadrant:
//! token count, advantage sum `ΣÂ`, advantage mass `Σ|Â|` and mean entropy.
//!
//! RECONSTRUCTION: the paper does not say where its high/low entropy cut lies. The default, [`EntropyCut::TopRatio`]
//! with ρ = 0.2, is the batch-global top-20 % split of the 80/20 method (exact top-k, ties by flat index); a fixed
//! threshold ([`EntropyCut::Threshold`], e.g. the paper's 0.672) is the alternative.
//!
//! **Covariance** (verl `compute_policy_loss_clip_cov` / `_kl_cov`):
//!
//! ```text
//! cov_t = (A_t − mean(A)) · (log π_t − mean(log π))      means over the valid tokens of the batch
//! ```
//!
//! The paper computes it group-wise with a length-normalised log-prob; verl (and this function) over the batch.

use forkrl_core::{
    Error, Result,
    numeric::{check_finite_masked, check_len},
};
use serde::{Deserialize, Serialize};

use crate::{SelectionRule, top_entropy_mask};

/// Where "high entropy" starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntropyCut {
    /// The batch-global top-ρ fraction of loss tokens is high (exact top-k, as the 80/20 mask).
    TopRatio(f64),
    /// Tokens with `H ≥ threshold` are high.
    Threshold(f32),
}

impl Default for EntropyCut {
    fn default() -> Self {
        EntropyCut::TopRatio(0.2)
    }
}

/// Statistics of one quadrant.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct QuadrantStats {
    /// Loss tokens in the quadrant.
    pub count: usize,
    /// `Σ Â` over the quadrant.
    pub advantage_sum: f64,
    /// `Σ |Â|` over the quadrant.
    pub advantage_mass: f64,
    /// Mean entropy of the quadrant (0 when empty).
    pub mean_entropy: f64,
}

/// The four polarity × entropy quadrants of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolarityEntropyQuadrants {
    /// Positive advantage, high entropy.
    pub phr: QuadrantStats,
    /// Positive advantage, low entropy.
    pub plr: QuadrantStats,
    /// Negative advantage, high entropy.
    pub nhr: QuadrantStats,
    /// Negative advantage, low entropy.
    pub nlr: QuadrantStats,
    /// Loss tokens with `Â = 0`, in no quadrant.
    pub zero_advantage: usize,
    /// The entropy at which "high" starts (`None` for an empty batch).
    pub threshold: Option<f32>,
}

/// Splits the loss tokens of a flat `[B, T]` batch into the PHR / PLR / NHR / NLR quadrants.
///
/// `advantages` are per token (broadcast sequence advantages with `BatchLayout::broadcast_to_tokens`).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the three arrays differ in length; [`Error::NonFinite`] for a non-finite entropy or
/// advantage on a loss token; [`Error::InvalidParameter`] for a ratio outside `(0, 1]` or a non-finite threshold.
pub fn polarity_entropy_quadrants(
    entropy: &[f32],
    advantages: &[f32],
    response_mask: &[bool],
    cut: EntropyCut,
) -> Result<PolarityEntropyQuadrants> {
    check_len("polarity_entropy_quadrants: entropy vs response_mask", entropy.len(), response_mask.len())?;
    check_len("polarity_entropy_quadrants: advantages vs response_mask", advantages.len(), response_mask.len())?;
    check_finite_masked("advantages", advantages, response_mask)?;
    let (high, threshold) = match cut {
        EntropyCut::TopRatio(rho) => {
            let mask = top_entropy_mask(entropy, response_mask, rho, SelectionRule::TopK)?;
            (mask.mask, mask.threshold)
        }
        EntropyCut::Threshold(t) => {
            if !t.is_finite() {
                return Err(Error::invalid_parameter("entropy threshold", t, "must be finite"));
            }
            check_finite_masked("entropy", entropy, response_mask)?;
            let any = response_mask.iter().any(|&m| m);
            (entropy.iter().zip(response_mask).map(|(&h, &m)| m && h >= t).collect(), any.then_some(t))
        }
    };
    let mut out = PolarityEntropyQuadrants {
        phr: QuadrantStats::default(),
        plr: QuadrantStats::default(),
        nhr: QuadrantStats::default(),
        nlr: QuadrantStats::default(),
        zero_advantage: 0,
        threshold,
    };
    for i in (0..entropy.len()).filter(|&i| response_mask[i]) {
        let a = f64::from(advantages[i]);
        let q = match (a > 0.0, a < 0.0, high[i]) {
            (true, _, true) => &mut out.phr,
            (true, _, false) => &mut out.plr,
            (_, true, true) => &mut out.nhr,
            (_, true, false) => &mut out.nlr,
            _ => {
                out.zero_advantage += 1;
                continue;
            }
        };
        q.count += 1;
        q.advantage_sum += a;
        q.advantage_mass += a.abs();
        q.mean_entropy += f64::from(entropy[i]); // a sum until the loop ends
    }
    for q in [&mut out.phr, &mut out.plr, &mut out.nhr, &mut out.nlr] {
        if q.count > 0 {
            q.mean_entropy /= q.count as f64;
        }
    }
    Ok(out)
}

/// Per-token covariance `cov_t = (A_t − mean A)(log π_t − mean log π)` over the loss tokens (0 on padding), the
/// selection statistic of Clip-Cov and KL-Cov. An empty batch gives all zeros.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays differ in length; [`Error::NonFinite`] for a non-finite advantage or
/// log-prob on a loss token.
pub fn token_covariance(advantages: &[f32], logprobs: &[f32], response_mask: &[bool]) -> Result<Vec<f32>> {
    check_len("token_covariance: advantages vs response_mask", advantages.len(), response_mask.len())?;
    check_len("token_covariance: logprobs vs response_mask", logprobs.len(), response_mask.len())?;
    check_finite_masked("advantages", advantages, response_mask)?;
    check_finite_masked("logprobs", logprobs, response_mask)?;
    let n = response_mask.iter().filter(|&&m| m).count();
    if n == 0 {
        return Ok(vec![0.0; response_mask.len()]);
    }
    let mean = |v: &[f32]| {
        v.iter().zip(response_mask).filter(|(_, m)| **m).map(|(x, _)| f64::from(*x)).sum::<f64>() / n as f64
    };
    let (ma, ml) = (mean(advantages), mean(logprobs));
    Ok(advantages
        .iter()
        .zip(logprobs)
        .zip(response_mask)
        .map(|((&a, &l), &m)| if m { ((f64::from(a) - ma) * (f64::from(l) - ml)) as f32 } else { 0.0 })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quadrants_by_hand() {
        let h = [2.0f32, 0.1, 3.0, 0.2, 1.0, 9.0];
        let a = [1.0f32, 1.0, -0.5, -0.5, 0.0, 4.0];
        let m = [true, true, true, true, true, false];
        // Fixed threshold 1.0: high = {0, 2, 4}; token 4 has Â = 0; token 5 is padding.
        let q = polarity_entropy_quadrants(&h, &a, &m, EntropyCut::Threshold(1.0)).expect("valid");
        assert_eq!((q.phr.count, q.plr.count, q.nhr.count, q.nlr.count, q.zero_advantage), (1, 1, 1, 1, 1));
        assert_eq!(q.nhr.advantage_sum, -0.5);
        assert_eq!(q.nhr.advantage_mass, 0.5);
        assert!((q.plr.mean_entropy - 0.1).abs() < 1e-6);
        // Top 20 % of 5 tokens = 1 token (3.0): only NHR is high.
        let q = polarity_entropy_quadrants(&h, &a, &m, EntropyCut::default()).expect("valid");
        assert_eq!((q.phr.count, q.plr.count, q.nhr.count, q.nlr.count), (0, 2, 1, 1));
        assert_eq!(q.threshold, Some(3.0));
    }

    #[test]
    fn covariance_by_hand() {
        // A = [1, -1, 1], log π = [-1, -2, -3] (padding at index 3): means 1/3 and -2.
        let cov = token_covariance(&[1.0, -1.0, 1.0, 7.0], &[-1.0, -2.0, -3.0, 5.0], &[true, true, true, false])
            .expect("valid");
        // (A − 1/3)·(log π + 2) = [2/3 · 1, −4/3 · 0, 2/3 · −1, padding]
        let expected = [2.0 / 3.0, 0.0, -2.0 / 3.0, 0.0];
        for (c, e) in cov.iter().zip(expected) {
            assert!((f64::from(*c) - e).abs() < 1e-6, "{cov:?}");
        }
        assert_eq!(token_covariance(&[1.0], &[1.0], &[false]).expect("empty"), vec![0.0]);
    }

    #[test]
    fn bad_input() {
        assert!(matches!(
            polarity_entropy_quadrants(&[1.0], &[f32::NAN], &[true], EntropyCut::default()),
            Err(Error::NonFinite { what: "advantages", .. })
        ));
        assert!(polarity_entropy_quadrants(&[1.0], &[1.0, 2.0], &[true], EntropyCut::default()).is_err());
        assert!(polarity_entropy_quadrants(&[1.0], &[1.0], &[true], EntropyCut::TopRatio(0.0)).is_err());
        assert!(polarity_entropy_quadrants(&[1.0], &[1.0], &[true], EntropyCut::Threshold(f32::NAN)).is_err());
        assert!(token_covariance(&[1.0], &[f32::INFINITY], &[true]).is_err());
    }
}
