//! GMPO — "Geometric-Mean Policy Optimization" (arXiv 2507.20673), as verl `compute_policy_loss_geo_mean`.
//!
//! ```text
//! Δ_t  = log π_θ − log π_old,   σ = sign(A_t)
//! Δ̃_t  = σ · min(σ·Δ_t, σ·clip(Δ_t, −ε_low, ε_high))       A > 0: min(Δ, ε_high);  A < 0: max(Δ, −ε_low)
//! ρ_i  = exp( Σ_t m_t Δ̃_t / Σ_t m_t )                        geometric mean of the clipped token ratios
//! Â_i  = Σ_t m_t A_t / Σ_t m_t
//! ℓ_i  = −Â_i · ρ_i
//! ```
//!
//! The clip acts in **log space**. Default ε = 0.4 on both sides, the paper's `(e^−0.4, e^0.4)` (SECONDARY; verl's
//! default 0.2 applies to the same log-ratios). verl divides by `Σ m + 1e-8` and takes a plain mean over the
//! micro-batch's rows; here an empty response is excluded exactly and the sequence losses are averaged over the
//! global non-empty sequence count ([`crate::aggregate_sequences`]), which makes the loss micro-batch invariant.
//! Metrics: `pg_clipfrac` = tokens with `A > 0` and `Δ > ε_high`; `pg_clipfrac_lower` = tokens with `A < 0` and
//! `Δ < −ε_low`. Source: `../shared/methods/policy-losses.md` §7.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// GMPO's log-space clip range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GmpoConfig {
    /// ε_low in log space (0.4 in the paper).
    pub clip_ratio_low: f64,
    /// ε_high in log space (0.4 in the paper).
    pub clip_ratio_high: f64,
}

impl Default for GmpoConfig {
    fn default() -> Self {
        Self { clip_ratio_low: 0.4, clip_ratio_high: 0.4 }
    }
}

impl GmpoConfig {
    /// Checks that both bounds are finite and ≥ 0.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("clip_ratio_low", self.clip_ratio_low), ("clip_ratio_high", self.clip_ratio_high)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid_parameter(name, v, "must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// Host reference: `(clipped log-ratios, ρ, loss)` of one sequence with a sequence-level advantage `a`.
pub fn gmpo_sequence(log_ratios: &[f64], a: f64, config: &GmpoConfig) -> (Vec<f64>, f64, f64) {
    let clipped: Vec<f64> = log_ratios
        .iter()
        .map(|&d| {
            if a > 0.0 {
                d.min(config.clip_ratio_high)
            } else if a < 0.0 {
                d.max(-config.clip_ratio_low)
            } else {
                0.0
            }
        })
        .collect();
    if clipped.is_empty() {
        return (clipped, 1.0, 0.0);
    }
    let rho = (clipped.iter().sum::<f64>() / clipped.len() as f64).exp();
    (clipped, rho, -a * rho)
}

#[cfg(feature = "burn")]
pub use tensor::gmpo_loss;

#[cfg(feature = "burn")]
mod tensor {
    use super::GmpoConfig;
    use crate::loss_types::{PolicyInputs, SequenceLoss, metrics};
    use forkrl_core::Result;

    /// The per-sequence GMPO loss `[B]`.
    ///
    /// # Errors
    /// Shape and parameter errors as [`crate::ppo_clip_loss`].
    pub fn gmpo_loss(inputs: &PolicyInputs, config: &GmpoConfig) -> Result<SequenceLoss> {
        config.validate()?;
        inputs.validate()?;
        let (lp, old, adv) = inputs.sanitized();
        let delta = lp - old;
        let sign = adv.clone().sign();
        let bounded = delta.clone().clamp(-config.clip_ratio_low, config.clip_ratio_high);
        let clipped = (sign.clone() * delta.clone()).min_pair(sign.clone() * bounded) * sign;
        let m = inputs.mask.clone().float();
        let count = m.clone().sum_dim(1); // [B, 1]
        let denom = count.clone().clamp_min(1.0);
        let rho = (clipped.sum_dim(1) / denom.clone()).exp(); // [B, 1]
        let a_seq = adv.clone().sum_dim(1) / denom;
        let [b, _] = inputs.mask.dims();
        let loss = (a_seq.neg() * rho).reshape([b]);
        let upper = delta.clone().greater_elem(config.clip_ratio_high).bool_and(adv.clone().greater_elem(0.0));
        let lower = delta.clone().lower_elem(-config.clip_ratio_low).bool_and(adv.lower_elem(0.0));
        let metrics = metrics(&inputs.mask, upper, lower, &delta)?;
        let nonempty = count.reshape([b]).greater_elem(0.0);
        Ok(SequenceLoss { loss: loss.mask_fill(nonempty.clone().bool_not(), 0.0), nonempty, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_2e() {
        let d = [0.1, -0.05, 0.0, 0.5, -0.6];
        let cfg = GmpoConfig::default();
        let (clipped, rho, loss) = gmpo_sequence(&d, 1.0, &cfg);
        assert_eq!(clipped, vec![0.1, -0.05, 0.0, 0.4, -0.6]);
        assert!((rho - 0.970446).abs() < 1e-6 && (loss + 0.970446).abs() < 1e-6);
        let (clipped, rho, loss) = gmpo_sequence(&d, -1.0, &cfg);
        assert_eq!(clipped, vec![0.1, -0.05, 0.0, 0.5, -0.4]);
        assert!((rho - 1.030455).abs() < 1e-6 && (loss - 1.030455).abs() < 1e-6);
        assert_eq!(gmpo_sequence(&d, 0.0, &cfg).2, 0.0);
        assert_eq!(gmpo_sequence(&[], 1.0, &cfg), (vec![], 1.0, 0.0));
    }
}
