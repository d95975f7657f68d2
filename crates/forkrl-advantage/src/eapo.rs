//! EAPO — "Rethinking Token-Level Credit Assignment in RLVR: A Polarity-Entropy Analysis" (He et al.,
//! arXiv 2604.11056).
//!
//! ```text
//! Â^H_t  = clip( (H_t − μ_H) / (σ_H + ε),  −|Â_t|/φ,  +|Â_t|/φ )
//! Â^CA_t = Â_t + α · sign(Â_t) · sg(Â^H_t)
//! ```
//!
//! so `|Â^CA| ∈ [|Â|(1 − α/φ), |Â|(1 + α/φ)]`. Defaults α = 0.2, φ = 2 (paper, SECONDARY source). The scope of μ_H and
//! σ_H is not given by the paper: **RECONSTRUCTION** — mean and *population* std over all loss tokens of the batch
//! passed in, with ε = 1e-6 added to σ_H. `Â = 0` gives `Â^CA = 0`; constant entropy gives `Â^CA = Â`. The result is a
//! constant (stop-gradient) token advantage for any policy loss. Source: `../shared/methods/token-credit.md` §1.

use forkrl_core::{
    Error, Result,
    numeric::{check_finite_masked, check_len},
};
use serde::{Deserialize, Serialize};

/// EAPO parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EapoConfig {
    /// α, the strength of the entropy correction (0.2).
    pub alpha: f64,
    /// φ, the clip window divisor (2).
    pub phi: f64,
    /// ε added to σ_H.
    pub epsilon: f64,
}

impl Default for EapoConfig {
    fn default() -> Self {
        Self { alpha: 0.2, phi: 2.0, epsilon: 1e-6 }
    }
}

impl EapoConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for α < 0, φ ≤ 0 or ε < 0 (or a non-finite one).
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(Error::invalid_parameter("alpha", self.alpha, "must be finite and >= 0"));
        }
        if !(self.phi.is_finite() && self.phi > 0.0) {
            return Err(Error::invalid_parameter("phi", self.phi, "must be finite and > 0"));
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(Error::invalid_parameter("epsilon", self.epsilon, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// Entropy-aware advantages `Â^CA` per token (0 on padding).
///
/// # Errors
/// [`Error::ShapeMismatch`] for arrays of different lengths; [`Error::NonFinite`] for NaN/inf on a loss token;
/// [`Error::InvalidParameter`] for α < 0, φ ≤ 0 or ε < 0.
pub fn eapo_advantages(advantages: &[f32], entropy: &[f32], mask: &[bool], config: &EapoConfig) -> Result<Vec<f32>> {
    config.validate()?;
    check_len("eapo_advantages: advantages vs mask", advantages.len(), mask.len())?;
    check_len("eapo_advantages: entropy vs mask", entropy.len(), mask.len())?;
    check_finite_masked("advantages", advantages, mask)?;
    check_finite_masked("entropy", entropy, mask)?;
    let n = mask.iter().filter(|&&m| m).count();
    if n == 0 {
        return Ok(vec![0.0; mask.len()]);
    }
    let valid = || entropy.iter().zip(mask).filter(|(_, m)| **m).map(|(&h, _)| f64::from(h));
    let mu = valid().sum::<f64>() / n as f64;
    let sigma = (valid().map(|h| (h - mu).powi(2)).sum::<f64>() / n as f64).sqrt();
    Ok(advantages
        .iter()
        .zip(entropy)
        .zip(mask)
        .map(|((&a, &h), &m)| {
            if !m {
                return 0.0;
            }
            let a = f64::from(a);
            let window = a.abs() / config.phi;
            let z = ((f64::from(h) - mu) / (sigma + config.epsilon)).clamp(-window, window);
            let sign = if a > 0.0 {
                1.0
            } else if a < 0.0 {
                -1.0
            } else {
                0.0
            };
            (a + config.alpha * sign * z) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vectors_1_5_and_2q() {
        let h = [0.05f32, 0.3, 1.5, 2.8];
        let cfg = EapoConfig::default();
        for (a, expected) in [(1.2f32, [1.08f32, 1.08, 1.261768, 1.32]), (-0.8, [-0.72, -0.72, -0.861768, -0.88])] {
            let out = eapo_advantages(&[a; 4], &h, &[true; 4], &cfg).expect("valid");
            for (x, e) in out.iter().zip(expected) {
                assert!((x - e).abs() < 1e-5, "A = {a}: {out:?}");
            }
        }
        assert_eq!(eapo_advantages(&[0.0; 4], &h, &[true; 4], &cfg).expect("valid"), vec![0.0; 4]);
        assert_eq!(eapo_advantages(&[0.5; 3], &[1.0; 3], &[true; 3], &cfg).expect("valid"), vec![0.5; 3]);
        assert_eq!(eapo_advantages(&[1.0; 2], &[f32::NAN; 2], &[false; 2], &cfg).expect("empty"), vec![0.0; 2]);
        let bad = EapoConfig { phi: 0.0, ..cfg };
        assert!(matches!(
            eapo_advantages(&[1.0], &[1.0], &[true], &bad),
            Err(Error::InvalidParameter { name: "phi", .. })
        ));
    }
}
