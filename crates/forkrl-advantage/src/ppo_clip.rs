//! PPO clip with decoupled bounds (clip-higher, DAPO) and the dual clip (verl `compute_policy_loss_vanilla`).
//!
//! Per token, as a loss (`r = exp(clamp(log π − log π_old, ±20))`):
//!
//! ```text
//! l1 = −A · r
//! l2 = −A · clip(r, 1 − ε_low, 1 + ε_high)
//! l  = max(l1, l2)
//! if A < 0:  l = min(l, −A · c)          dual clip, c = clip_ratio_c > 1
//! ```
//!
//! Sources: PPO (arXiv 1707.06347); clip-higher from DAPO (arXiv 2503.14476, ε_high = 0.28); dual clip from
//! arXiv 1912.09729 as in verl; `../shared/methods/policy-losses.md` §3. Defaults are verl's (0.2, 0.2, c = 3).
//! Metrics: `pg_clipfrac` = fraction of tokens with `l2 > l1`; `pg_clipfrac_lower` = fraction of `A < 0` tokens where
//! the dual clip binds; `ppo_kl` = mean of `−log r`.

use serde::{Deserialize, Serialize};

use forkrl_core::{Error, Result};

/// PPO clip parameters (verl names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoClipConfig {
    /// ε_low: the ratio's lower bound is `1 − ε_low`.
    pub clip_ratio_low: f64,
    /// ε_high: the upper bound is `1 + ε_high` (0.28 in DAPO-style recipes).
    pub clip_ratio_high: f64,
    /// Dual-clip constant `c > 1` for `A < 0`; `None` turns the dual clip off.
    pub clip_ratio_c: Option<f64>,
}

impl Default for PpoClipConfig {
    fn default() -> Self {
        Self { clip_ratio_low: 0.2, clip_ratio_high: 0.2, clip_ratio_c: Some(3.0) }
    }
}

impl PpoClipConfig {
    /// DAPO's clip-higher bounds (0.2, 0.28) with verl's dual clip.
    pub fn clip_higher() -> Self {
        Self { clip_ratio_high: 0.28, ..Self::default() }
    }

    /// Checks `0 ≤ ε_low < 1`, `ε_high ≥ 0` and `c > 1`.
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
        if let Some(c) = self.clip_ratio_c
            && !(c.is_finite() && c > 1.0)
        {
            return Err(Error::invalid_parameter("clip_ratio_c", c, "the dual clip needs c > 1"));
        }
        Ok(())
    }
}

/// Host reference of one token: `(loss, clipped (l2 > l1), dual clip binds)`. `d loss / d log π` is `−A·r` on the
/// unclipped branch and 0 on the clipped and dual-clipped ones.
pub fn ppo_clip_token(log_ratio: f64, advantage: f64, config: &PpoClipConfig) -> (f64, bool, bool) {
    let r = log_ratio.clamp(-f64::from(crate::LOG_RATIO_CLAMP), f64::from(crate::LOG_RATIO_CLAMP)).exp();
    let l1 = -advantage * r;
    let l2 = -advantage * r.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high);
    let clipped = l2 > l1;
    let l = l1.max(l2);
    match config.clip_ratio_c {
        Some(c) if advantage < 0.0 && l > -advantage * c => (-advantage * c, clipped, true),
        _ => (l, clipped, false),
    }
}

#[cfg(feature = "burn")]
pub(crate) use tensor::clip_terms;
#[cfg(feature = "burn")]
pub use tensor::ppo_clip_loss;

#[cfg(feature = "burn")]
mod tensor {
    use super::PpoClipConfig;
    use crate::loss_types::{PolicyInputs, TokenLoss, metrics, no_tokens};
    use burn::tensor::{Bool, Tensor};
    use forkrl_core::Result;

    /// The clipped surrogate shared by PPO, Clip-Cov and HTPO: `(r, l1 = −A·r, max(l1, l2), l2 > l1 on loss tokens)`
    /// with `l2 = −A·clip(r, 1 − ε_low, 1 + ε_high)`.
    pub(crate) fn clip_terms(
        log_ratio: &Tensor<2>,
        adv: &Tensor<2>,
        clip_ratio_low: f64,
        clip_ratio_high: f64,
        mask: &Tensor<2, Bool>,
    ) -> (Tensor<2>, Tensor<2>, Tensor<2>, Tensor<2, Bool>) {
        let ratio = log_ratio.clone().exp();
        let l1 = adv.clone().neg() * ratio.clone();
        let l2 = adv.clone().neg() * ratio.clone().clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high);
        let clipped = l2.clone().greater(l1.clone()).bool_and(mask.clone());
        let loss = l1.clone().mask_where(clipped.clone(), l2);
        (ratio, l1, loss, clipped)
    }

    /// The per-token PPO clip loss `[B, T]` (0 on padding) and its metrics.
    ///
    /// # Errors
    /// [`forkrl_core::Error::ShapeMismatch`] for inputs of different shapes; [`forkrl_core::Error::InvalidParameter`]
    /// from [`PpoClipConfig::validate`].
    pub fn ppo_clip_loss(inputs: &PolicyInputs, config: &PpoClipConfig) -> Result<TokenLoss> {
        config.validate()?;
        inputs.validate()?;
        let (_, log_ratio, adv) = inputs.log_ratio();
        let (_, _, mut loss, clipped) =
            clip_terms(&log_ratio, &adv, config.clip_ratio_low, config.clip_ratio_high, &inputs.mask);
        let lower = match config.clip_ratio_c {
            Some(c) => {
                let cap = adv.clone().neg().mul_scalar(c); // constant: A is detached
                let binds = loss.clone().greater(cap.clone()).bool_and(adv.lower_elem(0.0));
                loss = loss.mask_where(binds.clone(), cap);
                binds
            }
            None => no_tokens(&inputs.mask),
        };
        let metrics = metrics(&inputs.mask, clipped, lower, &log_ratio)?;
        Ok(TokenLoss { loss: loss.mask_fill(inputs.mask.clone().bool_not(), 0.0), metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_2d() {
        let cfg = PpoClipConfig::clip_higher();
        let cases = [
            (1.5, 1.0, -1.28, true, false),
            (1.1, 1.0, -1.1, false, false),
            (0.5, 1.0, -0.5, false, false),
            (0.5, -1.0, 0.8, true, false),
            (1.5, -1.0, 1.5, false, false),
            (4.0, -1.0, 3.0, false, true),
        ];
        for (r, a, loss, clip, dual) in cases {
            let (l, c, d) = ppo_clip_token(f64::ln(r), a, &cfg);
            assert!((l - loss).abs() < 1e-12, "r = {r}, A = {a}: {l} vs {loss}");
            assert_eq!((c, d), (clip, dual), "r = {r}, A = {a}");
        }
    }

    #[test]
    fn invalid_parameters() {
        let bad_c = PpoClipConfig { clip_ratio_c: Some(1.0), ..PpoClipConfig::default() };
        assert!(matches!(bad_c.validate(), Err(Error::InvalidParameter { name: "clip_ratio_c", .. })));
        let bad_low = PpoClipConfig { clip_ratio_low: 1.0, ..PpoClipConfig::default() };
        assert!(matches!(bad_low.validate(), Err(Error::InvalidParameter { name: "clip_ratio_low", .. })));
        let nan = PpoClipConfig { clip_ratio_high: f64::NAN, ..PpoClipConfig::default() };
        assert!(nan.validate().is_err());
    }
}
