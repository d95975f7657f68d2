//! SORT — "Selective Off-Policy Reference Tuning with Plan Guidance" (Le, Nguyen, Nguyen, Ngo Van, Le, arXiv
//! 2605.11505). GRPO has no signal on a prompt whose rollouts all fail; SORT adds a **repair update** on the reference
//! solution `y*` of such prompts, weighting each reference token by how predictable it becomes when a plan derived from
//! the reference is put in the prompt. Rollout generation is unchanged.
//!
//! **Everything below is RECONSTRUCTION** (only the abstract and a secondary summary are public;
//! `../shared/methods/sparse-selection-and-distillation.md` §2):
//!
//! ```text
//! trigger    every rollout of the group fails (no positive reward) and a reference y* exists
//! scorings   b_t = π_θ(y*_t | x, y*_<t)        c_t = π_θ(y*_t | x, P, y*_<t)       (no gradient, current policy)
//! weights    geometric  w_t = sg(b_t^(1−λ) · c_t^λ)                   λ = ½ (default)
//!            selective  w_t = geometric if c_t > b_t, else 0
//!            gain       w_t = min(max(0, log c_t − log b_t), gain_clip)   gain_clip = 5
//!            uniform    w_t = 1                                        (plain SFT on y*, the baseline)
//! repair     L_repair(q) = −Σ_t w_t log π_θ(y*_t | x, y*_<t) / Σ_t w_t     (0 if Σ w = 0)
//! total      L = L_GRPO + β · mean_{q ∈ repair prompts} L_repair(q)   β = 1
//! ```
//!
//! Weights are computed in log space (`b_t` underflows for long references). Without a plan, pass `log c = log b`:
//! the geometric weight is then `b_t`, Dynamic Fine-Tuning's `sg(p_t)` (the spec's fallback).

use forkrl_core::{Error, Result, numeric::check_len};
use serde::{Deserialize, Serialize};

/// How a reference token is weighted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SortWeighting {
    /// `w = b^(1−λ) c^λ`.
    Geometric {
        /// λ ∈ [0, 1].
        #[serde(default = "half")]
        lambda: f32,
    },
    /// The geometric weight where `c > b`, else 0.
    Selective {
        /// λ ∈ [0, 1].
        #[serde(default = "half")]
        lambda: f32,
    },
    /// `min(max(0, log c − log b), gain_clip)`.
    Gain {
        /// The cap of the unbounded gain.
        #[serde(default = "five")]
        gain_clip: f32,
    },
    /// `w = 1`.
    Uniform,
}

fn half() -> f32 {
    0.5
}

fn five() -> f32 {
    5.0
}

impl Default for SortWeighting {
    fn default() -> Self {
        SortWeighting::Geometric { lambda: 0.5 }
    }
}

impl SortWeighting {
    /// verl-style name (`geometric`, `selective`, `gain`, `uniform`).
    pub fn name(&self) -> &'static str {
        match self {
            SortWeighting::Geometric { .. } => "geometric",
            SortWeighting::Selective { .. } => "selective",
            SortWeighting::Gain { .. } => "gain",
            SortWeighting::Uniform => "uniform",
        }
    }

    /// Checks the parameters once.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        match *self {
            SortWeighting::Geometric { lambda } | SortWeighting::Selective { lambda }
                if !(0.0..=1.0).contains(&lambda) =>
            {
                Err(Error::invalid_parameter("lambda", lambda, "must lie in [0, 1]"))
            }
            SortWeighting::Gain { gain_clip } if !(gain_clip.is_finite() && gain_clip > 0.0) => {
                Err(Error::invalid_parameter("gain_clip", gain_clip, "must be finite and > 0"))
            }
            _ => Ok(()),
        }
    }

    /// The weight of one token from `log b` (no plan) and `log c` (with the plan).
    pub fn weight(&self, log_b: f32, log_c: f32) -> f32 {
        let geometric =
            |l: f32| ((1.0 - f64::from(l)) * f64::from(log_b) + f64::from(l) * f64::from(log_c)).exp() as f32;
        match *self {
            SortWeighting::Geometric { lambda } => geometric(lambda),
            SortWeighting::Selective { lambda } => {
                if log_c > log_b {
                    geometric(lambda)
                } else {
                    0.0
                }
            }
            SortWeighting::Gain { gain_clip } => (log_c - log_b).clamp(0.0, gain_clip),
            SortWeighting::Uniform => 1.0,
        }
    }
}

/// SORT's settings (trainer key `rl.sort`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SortConfig {
    /// The token weighting.
    pub weighting: SortWeighting,
    /// β of the repair term.
    pub beta: f32,
}

impl Default for SortConfig {
    fn default() -> Self {
        Self { weighting: SortWeighting::default(), beta: 1.0 }
    }
}

impl SortConfig {
    /// Checks the parameters once.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::invalid_parameter("beta", self.beta, "must be finite and ≥ 0"));
        }
        self.weighting.validate()
    }
}

/// Whether a group enters the repair update: a reference exists and no rollout has a positive reward (0/1 and ±1
/// rewards alike).
pub fn sort_needs_repair(group_rewards: &[f32], has_reference: bool) -> bool {
    has_reference && !group_rewards.is_empty() && group_rewards.iter().all(|&r| r <= 0.0)
}

/// The weights `[n]` of reference tokens from their log-probs without (`log_b`) and with (`log_c`) the plan; 0 where
/// `mask` is false.
///
/// # Errors
/// [`Error::ShapeMismatch`] for mismatched lengths; [`Error::InvalidParameter`] for a log-prob above 0 or NaN on a
/// masked token, or a bad weighting.
pub fn sort_weights(log_b: &[f32], log_c: &[f32], mask: &[bool], weighting: &SortWeighting) -> Result<Vec<f32>> {
    weighting.validate()?;
    check_len("sort_weights: log_b vs mask", log_b.len(), mask.len())?;
    check_len("sort_weights: log_c vs mask", log_c.len(), mask.len())?;
    for (what, v) in [("log_b", log_b), ("log_c", log_c)] {
        if let Some(i) = v.iter().zip(mask).position(|(x, &m)| m && (x.is_nan() || *x > 0.0)) {
            return Err(Error::invalid_parameter(what, v[i], format!("position {i}: a log-prob must be ≤ 0")));
        }
    }
    Ok(log_b.iter().zip(log_c).zip(mask).map(|((&b, &c), &m)| if m { weighting.weight(b, c) } else { 0.0 }).collect())
}

/// `−Σ_t w_t log π(y*_t) / Σ_t w_t` over the masked tokens (0 when `Σ w = 0`): the f64 reference of the repair loss.
///
/// # Errors
/// [`Error::ShapeMismatch`] for mismatched lengths.
pub fn sort_repair_loss_host(log_prob: &[f32], weights: &[f32], mask: &[bool]) -> Result<f64> {
    check_len("sort_repair_loss_host: log_prob vs mask", log_prob.len(), mask.len())?;
    check_len("sort_repair_loss_host: weights vs mask", weights.len(), mask.len())?;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for ((&lp, &w), &m) in log_prob.iter().zip(weights).zip(mask) {
        if m {
            num -= f64::from(w) * f64::from(lp);
            den += f64::from(w);
        }
    }
    Ok(if den > 0.0 { num / den } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: [f32; 4] = [0.9, 0.2, 0.05, 0.6];
    const C: [f32; 4] = [0.95, 0.8, 0.05, 0.3];

    fn ln(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn so1_trigger() {
        assert!(sort_needs_repair(&[0.0; 4], true));
        assert!(!sort_needs_repair(&[0.0, 1.0, 0.0, 0.0], true));
        assert!(!sort_needs_repair(&[1.0; 4], true));
        assert!(sort_needs_repair(&[-1.0; 3], true), "±1 rewards");
        assert!(!sort_needs_repair(&[0.0; 4], false), "no reference, no repair");
        assert!(!sort_needs_repair(&[], true));
    }

    #[test]
    fn so2_weights_loss_and_gradient() {
        let (lb, lc, mask) = (ln(&B), ln(&C), [true; 4]);
        let cases: [(SortWeighting, [f32; 4], f64); 4] = [
            (SortWeighting::default(), [0.924662, 0.4, 0.05, 0.424264], 0.615762),
            (SortWeighting::Selective { lambda: 0.5 }, [0.924662, 0.4, 0.0, 0.0], 0.559537),
            (SortWeighting::Gain { gain_clip: 5.0 }, [0.054067, 1.386294, 0.0, 0.0], 1.552979),
            (SortWeighting::Uniform, [1.0; 4], 1.305339),
        ];
        for (weighting, w_expected, l_expected) in cases {
            let w = sort_weights(&lb, &lc, &mask, &weighting).expect("valid");
            for (x, e) in w.iter().zip(w_expected) {
                assert!((x - e).abs() < 1e-5, "{weighting:?}: {w:?}");
            }
            let l = sort_repair_loss_host(&lb, &w, &mask).expect("valid");
            assert!((l - l_expected).abs() < 1e-5, "{weighting:?}: {l}");
        }
        let w = sort_weights(&lb, &lc, &mask, &SortWeighting::default()).expect("valid");
        let sum: f32 = w.iter().sum();
        for (x, e) in w.iter().map(|w| -w / sum).zip([-0.514008f32, -0.222355, -0.027794, -0.235843]) {
            assert!((x - e).abs() < 1e-5);
        }
        assert_eq!(sort_repair_loss_host(&lb, &[0.0; 4], &mask).expect("valid"), 0.0);
    }

    #[test]
    fn no_plan_falls_back_to_dft_and_long_references_do_not_underflow() {
        let lb = ln(&B);
        let w = sort_weights(&lb, &lb, &[true; 4], &SortWeighting::default()).expect("valid");
        for (x, e) in w.iter().zip(B) {
            assert!((x - e).abs() < 1e-6);
        }
        let w = sort_weights(&[-200.0], &[-100.0], &[true], &SortWeighting::Gain { gain_clip: 5.0 }).expect("valid");
        assert_eq!(w, vec![5.0], "the gain is capped");
        let w = sort_weights(&[-200.0, 1.0], &[-100.0, 7.0], &[true, false], &SortWeighting::default()).expect("valid");
        assert!(w[0] >= 0.0 && w[0].is_finite() && w[1] == 0.0);
        assert!(sort_weights(&[0.5], &[-1.0], &[true], &SortWeighting::default()).is_err());
        assert!(sort_weights(&[f32::NAN], &[-1.0], &[true], &SortWeighting::default()).is_err());
        assert!(sort_weights(&[-1.0], &[-1.0], &[true], &SortWeighting::Geometric { lambda: 2.0 }).is_err());
        assert!(SortConfig { beta: -1.0, ..Default::default() }.validate().is_err());
        let cfg: SortConfig = toml::from_str("beta = 0.5\n[weighting]\nkind = \"selective\"").expect("valid");
        assert_eq!(cfg.weighting, SortWeighting::Selective { lambda: 0.5 });
        assert!(toml::from_str::<SortConfig>("[weighting]\nkind = \"geometric\"\nlamda = 0.3").is_err());
    }
}
