//! KL estimators between the policy and a reference policy, per token (verl `kl_penalty`, `kl_penalty_forward`).
//!
//! With `δ = log π − log π_ref`:
//!
//! ```text
//! k1  (kl)          δ
//! abs               |δ|
//! k2  (mse)         ½ δ²
//! k3  (low_var_kl)  κ = clamp(−δ, −20, 20);  clamp(e^κ − κ − 1, −10, 10)        Schulman's low-variance estimator
//! name + "+"        straight-through: the value of the named estimator, the gradient of k2
//! ```
//!
//! k1 and k3 have the right expected value but not the right expected gradient of the KL; k2's gradient is right,
//! hence the `+` variants. Placement: in the reward (`reward_t ← score_t − β·kl_t`, fixed or adaptive β) or as a loss
//! (`kl_loss_coef · agg(kl)`). Every RLVR recipe in the methods reference runs without KL; it is off by default.
//! Source: `../shared/methods/policy-losses.md` §9.

use std::{fmt, str::FromStr};

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// A per-token KL estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    /// `δ`.
    K1,
    /// `|δ|`.
    Abs,
    /// `½ δ²`.
    K2,
    /// `e^κ − κ − 1`, κ = −δ, with verl's clamps.
    K3,
}

/// An estimator and whether its gradient is replaced by k2's (verl's `+` suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KlPenalty {
    /// The estimator whose value is used.
    pub estimator: KlEstimator,
    /// Straight-through: gradient of k2 instead of the estimator's own.
    pub straight_through: bool,
}

impl Default for KlPenalty {
    /// verl's `low_var_kl` (k3).
    fn default() -> Self {
        Self { estimator: KlEstimator::K3, straight_through: false }
    }
}

impl FromStr for KlPenalty {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, straight_through) = match s.strip_suffix('+') {
            Some(n) => (n, true),
            None => (s, false),
        };
        let estimator = match name {
            "k1" | "kl" => KlEstimator::K1,
            "abs" => KlEstimator::Abs,
            "k2" | "mse" => KlEstimator::K2,
            "k3" | "low_var_kl" => KlEstimator::K3,
            _ => {
                return Err(Error::invalid_parameter(
                    "kl_penalty",
                    s,
                    "expected k1|kl|abs|k2|mse|k3|low_var_kl, optionally with a '+' suffix ('full' needs the whole vocabulary and is not supported)",
                ));
            }
        };
        Ok(Self { estimator, straight_through })
    }
}

impl fmt::Display for KlPenalty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.estimator {
            KlEstimator::K1 => "k1",
            KlEstimator::Abs => "abs",
            KlEstimator::K2 => "k2",
            KlEstimator::K3 => "k3",
        };
        write!(f, "{name}{}", if self.straight_through { "+" } else { "" })
    }
}

impl TryFrom<String> for KlPenalty {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<KlPenalty> for String {
    fn from(k: KlPenalty) -> String {
        k.to_string()
    }
}

/// Host reference: the estimator's value at `(log π, log π_ref)`.
pub fn kl_value(estimator: KlEstimator, log_prob: f64, ref_log_prob: f64) -> f64 {
    let d = log_prob - ref_log_prob;
    match estimator {
        KlEstimator::K1 => d,
        KlEstimator::Abs => d.abs(),
        KlEstimator::K2 => 0.5 * d * d,
        KlEstimator::K3 => {
            let k = (-d).clamp(-20.0, 20.0);
            (k.exp() - k - 1.0).clamp(-10.0, 10.0)
        }
    }
}

/// Host reference: `∂ value / ∂ log π` of the penalty (k2's gradient `δ` for the straight-through variants).
pub fn kl_gradient(penalty: KlPenalty, log_prob: f64, ref_log_prob: f64) -> f64 {
    let d = log_prob - ref_log_prob;
    if penalty.straight_through {
        return d;
    }
    match penalty.estimator {
        KlEstimator::K1 => 1.0,
        KlEstimator::Abs => d.signum() * f64::from(u8::from(d != 0.0)),
        KlEstimator::K2 => d,
        KlEstimator::K3 => {
            let k = -d;
            let v = k.exp() - k - 1.0;
            if !(-20.0..=20.0).contains(&k) || !(-10.0..=10.0).contains(&v) { 0.0 } else { 1.0 - k.exp() }
        }
    }
}

/// KL loss settings (verl `use_kl_loss`, `kl_loss_type`, `kl_loss_coef`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlLossConfig {
    /// The estimator (verl default `low_var_kl`).
    pub kl_loss_type: KlPenalty,
    /// β (verl default 0.001).
    pub kl_loss_coef: f64,
}

impl Default for KlLossConfig {
    fn default() -> Self {
        Self { kl_loss_type: KlPenalty::default(), kl_loss_coef: 0.001 }
    }
}

/// verl's adaptive KL controller for KL in the reward: `e = clip(kl/target − 1, ±0.2)`, `β ← β(1 + e·n/horizon)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKlController {
    /// Current β.
    pub value: f64,
    /// Target KL.
    pub target: f64,
    /// Horizon (in samples).
    pub horizon: f64,
}

impl AdaptiveKlController {
    /// Updates β after observing `current_kl` over `n_steps` samples.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        if self.target > 0.0 && self.horizon > 0.0 && current_kl.is_finite() {
            let e = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + e * n_steps as f64 / self.horizon;
        }
    }
}

/// KL in the reward: `score_t − β·kl_t` on the loss tokens (padding keeps its score).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the lengths differ; [`Error::NonFinite`] for a NaN/inf KL on a loss token.
pub fn kl_in_reward(scores: &[f32], kl: &[f32], mask: &[bool], beta: f64) -> Result<Vec<f32>> {
    forkrl_core::numeric::check_len("kl_in_reward: scores vs mask", scores.len(), mask.len())?;
    forkrl_core::numeric::check_finite_masked("kl", kl, mask)?;
    Ok(scores
        .iter()
        .zip(kl)
        .zip(mask)
        .map(|((&s, &k), &m)| if m { (f64::from(s) - beta * f64::from(k)) as f32 } else { s })
        .collect())
}

#[cfg(feature = "burn")]
pub use tensor::kl_penalty;

#[cfg(feature = "burn")]
mod tensor {
    use super::{KlEstimator, KlPenalty};
    use burn::tensor::Tensor;

    /// The per-token penalty `[B, T]` between `log π` (differentiable) and `log π_ref` (constant).
    pub fn kl_penalty(log_prob: Tensor<2>, ref_log_prob: Tensor<2>, penalty: KlPenalty) -> Tensor<2> {
        let d = log_prob - ref_log_prob.detach();
        let value = |d: Tensor<2>| match penalty.estimator {
            KlEstimator::K1 => d,
            KlEstimator::Abs => d.abs(),
            KlEstimator::K2 => d.clone() * d.mul_scalar(0.5),
            KlEstimator::K3 => {
                let k = d.neg().clamp(-20.0, 20.0);
                (k.clone().exp() - k).sub_scalar(1.0).clamp(-10.0, 10.0)
            }
        };
        if penalty.straight_through {
            let k2 = d.clone() * d.clone().mul_scalar(0.5);
            k2.clone() - k2.detach() + value(d).detach()
        } else {
            value(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_2f() {
        let rows = [
            (-1.0, -1.5, [0.5, 0.5, 0.125, 0.106531], 0.393469, 0.5),
            (-2.0, -1.0, [-1.0, 1.0, 0.5, 0.718282], -1.718282, -1.0),
            (-30.0, -1.0, [-29.0, 29.0, 420.5, 10.0], 0.0, -29.0),
            (-1.0, -1.0, [0.0, 0.0, 0.0, 0.0], 0.0, 0.0),
        ];
        for (lp, r, values, dk3, dk2) in rows {
            for (e, v) in [KlEstimator::K1, KlEstimator::Abs, KlEstimator::K2, KlEstimator::K3].into_iter().zip(values)
            {
                assert!((kl_value(e, lp, r) - v).abs() < 1e-6, "{e:?} at ({lp}, {r})");
            }
            let k3 = KlPenalty { estimator: KlEstimator::K3, straight_through: false };
            assert!((kl_gradient(k3, lp, r) - dk3).abs() < 1e-6);
            assert!((kl_gradient(KlPenalty { straight_through: true, ..k3 }, lp, r) - dk2).abs() < 1e-12);
        }
    }

    #[test]
    fn names_parse_like_verl() {
        for (s, e, st) in [
            ("kl", KlEstimator::K1, false),
            ("low_var_kl", KlEstimator::K3, false),
            ("k3+", KlEstimator::K3, true),
            ("mse", KlEstimator::K2, false),
            ("abs+", KlEstimator::Abs, true),
        ] {
            assert_eq!(s.parse::<KlPenalty>().expect("known"), KlPenalty { estimator: e, straight_through: st });
        }
        assert!(matches!("full".parse::<KlPenalty>(), Err(Error::InvalidParameter { name: "kl_penalty", .. })));
        let cfg: KlLossConfig = toml::from_str("kl_loss_type = \"k3+\"").expect("valid");
        assert!(cfg.kl_loss_type.straight_through);
        assert_eq!(serde_json::to_string(&cfg.kl_loss_type).expect("json"), "\"k3+\"");
    }

    #[test]
    fn adaptive_controller_and_reward() {
        let mut c = AdaptiveKlController { value: 0.1, target: 0.05, horizon: 1000.0 };
        c.update(0.1, 100); // e clipped to 0.2
        assert!((c.value - 0.1 * 1.02).abs() < 1e-12);
        let r = kl_in_reward(&[0.0, 1.0, 5.0], &[0.5, 0.2, f32::NAN], &[true, true, false], 0.1).expect("valid");
        assert_eq!(r, vec![-0.05, 0.98, 5.0]);
    }
}
