//! DAPO overlong reward shaping (arXiv 2503.14476 §3.4; verl `reward_manager/dapo.py`).
//!
//! ```text
//! R_len(y) = 0                                      |y| ≤ L_max − L_cache
//!          = ((L_max − L_cache) − |y|) / L_cache     L_max − L_cache < |y| ≤ L_max
//!          = −1                                      |y| > L_max
//! ```
//!
//! times `penalty_factor` (1.0), added to the correctness reward. Lengths count generated tokens only. Overlong
//! *filtering* masks the loss of truncated samples and needs the sampler's explicit `is_truncated` flag: a length test
//! cannot tell "stopped at the cap" from "ended exactly there". Defaults are DAPO's (L_max 20480, L_cache 4096).
//! Source: `../shared/methods/rollout-allocation.md` §2.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Soft overlong punishment and filtering.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverlongConfig {
    /// `L_max`, the longest response that is not punished by −1 (the generation cap).
    pub max_response_length: usize,
    /// `L_cache`, the soft-punishment buffer before `L_max`.
    pub buffer_length: usize,
    /// Multiplier of the penalty (1.0).
    pub penalty_factor: f64,
    /// Mask the loss of truncated samples (overlong filtering).
    pub filter_truncated: bool,
}

impl Default for OverlongConfig {
    fn default() -> Self {
        Self { max_response_length: 20_480, buffer_length: 4096, penalty_factor: 1.0, filter_truncated: true }
    }
}

impl OverlongConfig {
    /// Checks `0 < L_cache ≤ L_max` and a finite, non-negative factor.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.buffer_length == 0 || self.buffer_length > self.max_response_length {
            return Err(Error::invalid_parameter(
                "buffer_length",
                self.buffer_length,
                "must lie in (0, max_response_length]",
            ));
        }
        if !(self.penalty_factor.is_finite() && self.penalty_factor >= 0.0) {
            return Err(Error::invalid_parameter("penalty_factor", self.penalty_factor, "must be finite and >= 0"));
        }
        Ok(())
    }

    /// `R_len` of a response of `length` generated tokens.
    ///
    /// # Errors
    /// As [`OverlongConfig::validate`].
    pub fn penalty(&self, length: usize) -> Result<f64> {
        self.validate()?;
        let start = self.max_response_length - self.buffer_length;
        let r = if length <= start {
            0.0
        } else if length <= self.max_response_length {
            (start as f64 - length as f64) / self.buffer_length as f64
        } else {
            -1.0
        };
        Ok(r * self.penalty_factor)
    }

    /// Whether a sample's loss is kept: false for truncated samples when filtering is on.
    pub fn keep(&self, is_truncated: bool) -> bool {
        !(self.filter_truncated && is_truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vectors_1_4_and_2u() {
        let cfg = OverlongConfig::default();
        for (len, r) in [
            (16000, 0.0),
            (16384, 0.0),
            (16385, -0.000244),
            (18432, -0.5),
            (20479, -0.999756),
            (20480, -1.0),
            (21000, -1.0),
        ] {
            assert!((cfg.penalty(len).expect("valid") - r).abs() < 1e-6, "{len}");
        }
        assert!(!cfg.keep(true) && cfg.keep(false));
        let bad = OverlongConfig { buffer_length: 0, ..cfg };
        assert!(matches!(bad.penalty(1), Err(Error::InvalidParameter { name: "buffer_length", .. })));
    }
}
