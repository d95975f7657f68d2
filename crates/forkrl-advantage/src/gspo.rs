//! GSPO and GSPO-token — "Group Sequence Policy Optimization" (arXiv 2507.18071), as verl `compute_policy_loss_gspo`.
//!
//! ```text
//! log s_i   = (1/|y_i|) Σ_t (log π_θ − log π_old)                    length clamped to ≥ 1
//! log s_i,t = sg(log s_i) + log π_θ(y_t) − sg(log π_θ(y_t))           GSPO-token; value s_i, gradient per token
//! l_i,t     = max(−A_i,t · s_i,t, −A_i,t · clip(s_i,t, 1 − ε_low, 1 + ε_high))    log s_i,t clamped to ≤ 10
//! ```
//!
//! aggregated with `seq-mean-token-mean` (forced). With a uniform advantage per sequence this equals GSPO's sequence
//! objective `1/G Σ_i max(−A_i s_i, −A_i clip(s_i))` in value and gradient: `∇ s_i = s_i · (1/|y_i|) Σ_t ∇ log π_t`.
//! No dual clip. Defaults: the paper's clip range 3e-4 (left), 4e-4 (right) on `s_i`.
//! Source: `../shared/methods/policy-losses.md` §5.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// GSPO clip range on the sequence ratio.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GspoConfig {
    /// Lower clip `1 − ε_low` on `s_i` (paper 3e-4).
    pub clip_ratio_low: f64,
    /// Upper clip `1 + ε_high` on `s_i` (paper 4e-4).
    pub clip_ratio_high: f64,
}

impl Default for GspoConfig {
    fn default() -> Self {
        Self { clip_ratio_low: 3e-4, clip_ratio_high: 4e-4 }
    }
}

impl GspoConfig {
    /// Checks `0 ≤ ε_low < 1` and `ε_high ≥ 0`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.clip_ratio_low.is_finite() && (0.0..1.0).contains(&self.clip_ratio_low)) {
            return Err(Error::invalid_parameter("clip_ratio_low", self.clip_ratio_low, "must lie in [0, 1)"));
        }
        if !(self.clip_ratio_high.is_finite() && self.clip_ratio_high >= 0.0) {
            return Err(Error::invalid_parameter("clip_ratio_high", self.clip_ratio_high, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// Host reference: GSPO's sequence loss `(loss, clipped)` for token log-ratios `log_ratios` and advantage `a`.
pub fn gspo_sequence(log_ratios: &[f64], a: f64, config: &GspoConfig) -> (f64, bool) {
    let n = log_ratios.len().max(1) as f64;
    let s = (log_ratios.iter().sum::<f64>() / n).min(10.0).exp();
    let l1 = -a * s;
    let l2 = -a * s.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high);
    (l1.max(l2), l2 > l1)
}

#[cfg(feature = "burn")]
pub use tensor::gspo_loss;

#[cfg(feature = "burn")]
mod tensor {
    use super::GspoConfig;
    use crate::loss_types::{PolicyInputs, TokenLoss, metrics, no_tokens};
    use forkrl_core::Result;

    /// The per-token GSPO-token loss `[B, T]`; aggregate it with `seq-mean-token-mean`
    /// ([`crate::PolicyLoss::compute`] does).
    ///
    /// # Errors
    /// Shape and parameter errors as [`crate::ppo_clip_loss`].
    pub fn gspo_loss(inputs: &PolicyInputs, config: &GspoConfig) -> Result<TokenLoss> {
        config.validate()?;
        inputs.validate()?;
        let (lp, old, adv) = inputs.sanitized();
        let log_ratio = lp.clone() - old;
        let m = inputs.mask.clone().float();
        let len = m.sum_dim(1).clamp_min(1.0); // [B, 1]
        let seq = (log_ratio.clone().sum_dim(1) / len).detach(); // [B, 1], padding already 0
        let log_s = (lp.clone() - lp.detach() + seq).clamp_max(10.0);
        let s = log_s.exp();
        let l1 = adv.clone().neg() * s.clone();
        let l2 = adv.neg() * s.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high);
        let clipped = l2.clone().greater(l1.clone()).bool_and(inputs.mask.clone());
        let loss = l1.mask_where(clipped.clone(), l2);
        let metrics = metrics(&inputs.mask, clipped, no_tokens(&inputs.mask), &log_ratio)?;
        Ok(TokenLoss { loss: loss.mask_fill(inputs.mask.clone().bool_not(), 0.0), metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vectors_1_8_and_2e() {
        let d = [0.1, -0.05, 0.0, 0.2];
        let cfg = GspoConfig::default();
        let (loss, clipped) = gspo_sequence(&d, 1.0, &cfg);
        assert!((loss + 1.0004).abs() < 1e-9 && clipped);
        let (loss, clipped) = gspo_sequence(&d, -1.0, &cfg);
        assert!((loss - 1.064494).abs() < 1e-6 && !clipped);
        // Empty sequence: length clamp, s = 1.
        assert_eq!(gspo_sequence(&[], 1.0, &cfg).0, -1.0);
    }
}
