//! CISPO — MiniMax-M1 (arXiv 2506.13585, §3.1 Eqs. 4–5), as verl `compute_policy_loss_cispo`.
//!
//! ```text
//! r̂ = clip(r, lower, 1 + ε_high)            lower = 1 − ε_low, or none (the paper's setting)
//! l  = −sg(r̂) · A · log π_θ                  aggregated with token-mean in the paper
//! ```
//!
//! The stop-gradient wraps the clipped IS weight, so every token keeps the gradient `−r̂·A·∇log π`. `log π` is used
//! raw, so padded positions are set to 0 before the product (`0·NaN = NaN`). The paper never disclosed ε_high: it is a
//! **required** parameter with no default (methods README decision 18). Relative bound `1 + ε_high` as verl; TRL's
//! absolute cap `c` is `eps_high = c − 1`. Source: `../shared/methods/policy-losses.md` §6.
//! Metrics as verl's `compute_policy_loss_cispo`: `pg_clipfrac` = fraction of loss tokens whose weight the clip changed
//! (`r̂ ≠ r`: outside either bound), `pg_clipfrac_lower` = the share of them below the lower bound (`r < lower`), so
//! `pg_clipfrac ≥ pg_clipfrac_lower` and logs compare across frameworks.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// CISPO bounds on the IS weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CispoConfig {
    /// ε_high: the weight is capped at `1 + eps_high`. Required (no published value).
    pub eps_high: f64,
    /// ε_low: the weight is floored at `1 − eps_low`; `None` (the paper) for no lower bound.
    #[serde(default)]
    pub eps_low: Option<f64>,
}

impl CispoConfig {
    /// The upper bound only, `1 + eps_high`.
    pub fn new(eps_high: f64) -> Self {
        Self { eps_high, eps_low: None }
    }

    /// Checks `ε_high ≥ 0` and `0 ≤ ε_low ≤ 1`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps_high.is_finite() && self.eps_high >= 0.0) {
            return Err(Error::invalid_parameter("eps_high", self.eps_high, "must be finite and >= 0"));
        }
        if let Some(lo) = self.eps_low
            && !(lo.is_finite() && (0.0..=1.0).contains(&lo))
        {
            return Err(Error::invalid_parameter("eps_low", lo, "must lie in [0, 1]"));
        }
        Ok(())
    }

    fn bounds(&self) -> (f64, f64) {
        (self.eps_low.map_or(0.0, |lo| 1.0 - lo), 1.0 + self.eps_high)
    }
}

/// Host reference: the coefficient `dJ/d log π = r̂ · A` of one token (test vector 1.7).
pub fn cispo_coefficient(log_ratio: f64, advantage: f64, config: &CispoConfig) -> f64 {
    let (lo, hi) = config.bounds();
    log_ratio.clamp(-f64::from(crate::LOG_RATIO_CLAMP), f64::from(crate::LOG_RATIO_CLAMP)).exp().clamp(lo, hi)
        * advantage
}

#[cfg(feature = "burn")]
pub use tensor::cispo_loss;

#[cfg(feature = "burn")]
mod tensor {
    use super::CispoConfig;
    use crate::loss_types::{PolicyInputs, TokenLoss, metrics};
    use forkrl_core::Result;

    /// The per-token CISPO loss `[B, T]`.
    ///
    /// # Errors
    /// Shape and parameter errors as [`crate::ppo_clip_loss`].
    pub fn cispo_loss(inputs: &PolicyInputs, config: &CispoConfig) -> Result<TokenLoss> {
        config.validate()?;
        inputs.validate()?;
        let (lp, log_ratio, adv) = inputs.log_ratio();
        let ratio = log_ratio.clone().exp().detach();
        let (lo, hi) = config.bounds();
        let upper = ratio.clone().greater_elem(hi).bool_and(inputs.mask.clone());
        let lower = ratio.clone().lower_elem(lo).bool_and(inputs.mask.clone());
        let clipped = upper.bool_or(lower.clone());
        let weight = ratio.clamp(lo, hi);
        let loss = (weight * adv).neg() * lp;
        let metrics = metrics(&inputs.mask, clipped, lower, &log_ratio)?;
        Ok(TokenLoss { loss: loss.mask_fill(inputs.mask.clone().bool_not(), 0.0), metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_1_7() {
        let cfg = CispoConfig::new(0.28);
        for (r, a, coef) in [
            (1.5, 1.0, 1.28),
            (1.1, 1.0, 1.1),
            (0.5, 1.0, 0.5),
            (0.5, -1.0, -0.5),
            (1.5, -1.0, -1.28),
            (4.0, -1.0, -1.28),
        ] {
            let c = cispo_coefficient(f64::ln(r), a, &cfg);
            assert!((c - coef).abs() < 1e-12, "r = {r}, A = {a}: {c} vs {coef}");
        }
        let two_sided = CispoConfig { eps_high: 0.2, eps_low: Some(0.2) };
        assert!((cispo_coefficient(f64::ln(0.5), 1.0, &two_sided) - 0.8).abs() < 1e-12);
    }

    #[cfg(feature = "burn")]
    #[test]
    fn clipfrac_counts_both_bounds_and_lower_is_its_share() {
        use burn::tensor::{Device, Tensor, TensorData};
        let device = Device::flex();
        // Ratios 1.5 (above 1.2), 0.5 (below 0.8), 1.0 (inside), padding.
        let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [1, 4]), &device);
        let inputs = crate::PolicyInputs {
            log_prob: t(vec![1.5f32.ln(), 0.5f32.ln(), 0.0, 0.0]),
            old_log_prob: t(vec![0.0; 4]),
            advantages: t(vec![1.0; 4]),
            mask: Tensor::from_data(TensorData::new(vec![true, true, true, false], [1, 4]), &device),
        };
        let cfg = CispoConfig { eps_high: 0.2, eps_low: Some(0.2) };
        let m = cispo_loss(&inputs, &cfg).expect("valid").metrics;
        assert!((m.pg_clipfrac - 2.0 / 3.0).abs() < 1e-6, "{m:?}");
        assert!((m.pg_clipfrac_lower - 1.0 / 3.0).abs() < 1e-6, "{m:?}");
        // The paper's one-sided bound: only the upper clip acts.
        let m = cispo_loss(&inputs, &CispoConfig::new(0.2)).expect("valid").metrics;
        assert!((m.pg_clipfrac - 1.0 / 3.0).abs() < 1e-6 && m.pg_clipfrac_lower == 0.0, "{m:?}");
    }

    #[test]
    fn eps_high_is_required_and_checked() {
        assert!(toml::from_str::<CispoConfig>("eps_low = 0.2").is_err());
        let cfg: CispoConfig = toml::from_str("eps_high = 4.0").expect("valid");
        assert_eq!(cfg, CispoConfig::new(4.0));
        assert!(matches!(CispoConfig::new(-1.0).validate(), Err(Error::InvalidParameter { name: "eps_high", .. })));
        let bad = CispoConfig { eps_high: 0.2, eps_low: Some(1.5) };
        assert!(matches!(bad.validate(), Err(Error::InvalidParameter { name: "eps_low", .. })));
    }
}
