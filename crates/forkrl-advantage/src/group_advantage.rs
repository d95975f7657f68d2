//! Outcome-reward group advantages: GRPO, Dr. GRPO and RLOO (verl semantics).
//!
//! For a group of `G` responses to one prompt with scalar rewards `R_1..R_G`:
//!
//! ```text
//! GRPO      Â_i = (R_i − mean R) / (std R + ε)        std unbiased (N−1), ε = 1e-6     (verl "grpo")
//! Dr. GRPO  Â_i =  R_i − mean R                                                        (arXiv 2503.20783)
//! RLOO      Â_i =  R_i − mean_{j≠i} R_j = G/(G−1) · (R_i − mean R)                     (verl "rloo")
//! ```
//!
//! Sources: verl `core_algos.py::compute_grpo_outcome_advantage` and `compute_rloo_outcome_advantage`;
//! `../shared/methods/policy-losses.md` §1–2. Library decisions (methods README 6–9):
//! - the std is unbiased with ε added (verl); population std (ReasonMaxxer) and verl's vectorised variance floor
//!   `sqrt(max(var, ε))` are options, ε is a parameter (oat uses 1e-8);
//! - a group whose std is below `zero_std_tolerance` is constant up to float noise: its advantages are exactly 0;
//! - a singleton group has no baseline: verl uses mean 0 and std 1, so `Â = R` ([`SingletonPolicy::RawReward`]);
//!   [`SingletonPolicy::Zero`] gives 0 instead. The same policy applies to Dr. GRPO and RLOO (verl's RLOO leaves a
//!   singleton's score unchanged).
//!
//! For groups of two or more `Σ_i Â_i = 0` (up to rounding). Everything is computed in f64 and returned as f32.

use forkrl_core::{Error, Result, numeric::check_len};
use serde::{Deserialize, Serialize};

/// Which group baseline and scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// `(R − mean) / (std + ε)` (verl `grpo`).
    #[default]
    Grpo,
    /// `R − mean`, no std (Dr. GRPO; verl `norm_adv_by_std_in_grpo = False`).
    DrGrpo,
    /// Leave-one-out baseline `R_i − mean_{j≠i} R_j` (verl `rloo`).
    Rloo,
}

/// How GRPO's std is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdMode {
    /// Unbiased `sqrt(Σ(R−mean)²/(G−1))`, then `+ ε` (verl `grpo`, oat).
    #[default]
    Unbiased,
    /// Population `sqrt(Σ(R−mean)²/G)`, then `+ ε` (ReasonMaxxer).
    Population,
    /// verl `grpo_vectorized`: `sqrt(max(var_unbiased, ε))`, no `+ ε`.
    VarianceFloor,
}

/// What a group with a single response gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SingletonPolicy {
    /// verl: mean 0 and std 1, so `Â = R`.
    #[default]
    RawReward,
    /// No baseline exists, so no signal: `Â = 0`.
    Zero,
}

/// Configuration of [`group_advantages`]; defaults are verl's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvantageConfig {
    /// The estimator.
    pub estimator: AdvantageEstimator,
    /// GRPO's std (ignored by Dr. GRPO and RLOO).
    pub std_mode: StdMode,
    /// ε added to (or flooring) the std. verl 1e-6; oat 1e-8.
    pub epsilon: f64,
    /// A group whose (unbiased) std is below this is treated as constant: advantages exactly 0.
    pub zero_std_tolerance: f64,
    /// Singleton groups.
    pub singleton: SingletonPolicy,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            estimator: AdvantageEstimator::Grpo,
            std_mode: StdMode::Unbiased,
            epsilon: 1e-6,
            zero_std_tolerance: 1e-6,
            singleton: SingletonPolicy::RawReward,
        }
    }
}

impl AdvantageConfig {
    /// Dr. GRPO defaults: no std normalisation.
    pub fn dr_grpo() -> Self {
        Self { estimator: AdvantageEstimator::DrGrpo, ..Self::default() }
    }

    /// RLOO defaults.
    pub fn rloo() -> Self {
        Self { estimator: AdvantageEstimator::Rloo, ..Self::default() }
    }

    /// Checks ε and the tolerance.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a negative or non-finite ε or tolerance, or ε = 0 with
    /// [`StdMode::VarianceFloor`].
    pub fn validate(&self) -> Result<()> {
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(Error::invalid_parameter("epsilon", self.epsilon, "must be finite and >= 0"));
        }
        if !(self.zero_std_tolerance.is_finite() && self.zero_std_tolerance >= 0.0) {
            return Err(Error::invalid_parameter(
                "zero_std_tolerance",
                self.zero_std_tolerance,
                "must be finite and >= 0",
            ));
        }
        if self.std_mode == StdMode::VarianceFloor && self.epsilon == 0.0 {
            return Err(Error::invalid_parameter("epsilon", 0.0, "the variance floor needs epsilon > 0"));
        }
        Ok(())
    }
}

/// Per-sequence advantages and per-group statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAdvantages {
    /// `Â_i` per response, in batch order.
    pub advantages: Vec<f32>,
    /// Mean reward per group.
    pub group_mean: Vec<f64>,
    /// Unbiased std per group (0 for singletons).
    pub group_std: Vec<f64>,
    /// Fraction of groups whose rewards are constant (verl's `frac_reward_zero_std`); singletons count as constant.
    pub frac_reward_zero_std: f64,
}

/// Group advantages for `rewards` (one per response, groups contiguous in batch order) with group sizes
/// `group_sizes` (e.g. `BatchLayout::group_sizes`).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `Σ group_sizes ≠ rewards.len()`; [`Error::EmptyGroup`] for a group of size 0;
/// [`Error::NonFinite`] naming the first NaN/inf reward; [`Error::InvalidParameter`] from
/// [`AdvantageConfig::validate`]. An empty batch (no group) gives empty outputs.
pub fn group_advantages(rewards: &[f32], group_sizes: &[usize], config: &AdvantageConfig) -> Result<GroupAdvantages> {
    config.validate()?;
    check_len("group_advantages: rewards vs sum of group sizes", rewards.len(), group_sizes.iter().sum())?;
    forkrl_core::numeric::check_finite("rewards", rewards, &[rewards.len()])?;
    let mut out = GroupAdvantages {
        advantages: Vec::with_capacity(rewards.len()),
        group_mean: Vec::with_capacity(group_sizes.len()),
        group_std: Vec::with_capacity(group_sizes.len()),
        frac_reward_zero_std: 0.0,
    };
    let mut start = 0;
    let mut constant = 0usize;
    for (g, &size) in group_sizes.iter().enumerate() {
        if size == 0 {
            return Err(Error::EmptyGroup { op: "group_advantages", group: g });
        }
        let group = &rewards[start..start + size];
        start += size;
        let n = size as f64;
        let mean = group.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
        let ss: f64 = group.iter().map(|&r| (f64::from(r) - mean).powi(2)).sum();
        let std_unbiased = if size > 1 { (ss / (n - 1.0)).sqrt() } else { 0.0 };
        out.group_mean.push(mean);
        out.group_std.push(std_unbiased);
        if size == 1 {
            constant += 1;
            let a = match config.singleton {
                SingletonPolicy::RawReward => group[0],
                SingletonPolicy::Zero => 0.0,
            };
            out.advantages.push(a);
            continue;
        }
        if std_unbiased < config.zero_std_tolerance {
            constant += 1;
            out.advantages.extend(std::iter::repeat_n(0.0, size));
            continue;
        }
        let scale = match config.estimator {
            AdvantageEstimator::DrGrpo => 1.0,
            AdvantageEstimator::Rloo => n / (n - 1.0),
            AdvantageEstimator::Grpo => match config.std_mode {
                StdMode::Unbiased => 1.0 / (std_unbiased + config.epsilon),
                StdMode::Population => 1.0 / ((ss / n).sqrt() + config.epsilon),
                StdMode::VarianceFloor => 1.0 / (ss / (n - 1.0)).max(config.epsilon).sqrt(),
            },
        };
        out.advantages.extend(group.iter().map(|&r| ((f64::from(r) - mean) * scale) as f32));
    }
    out.frac_reward_zero_std = if group_sizes.is_empty() { 0.0 } else { constant as f64 / group_sizes.len() as f64 };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: [f32; 8] = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0];

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() < 1e-6
    }

    #[test]
    fn test_vector_1_2() {
        let grpo = group_advantages(&R, &[8], &AdvantageConfig::default()).expect("valid");
        assert!(close(grpo.advantages[0], 1.207612) && close(grpo.advantages[1], -0.724567), "{grpo:?}");
        assert!((grpo.group_std[0] - 0.517549).abs() < 1e-6 && (grpo.group_mean[0] - 0.375).abs() < 1e-12);
        let pop = AdvantageConfig { std_mode: StdMode::Population, ..AdvantageConfig::default() };
        let pop = group_advantages(&R, &[8], &pop).expect("valid");
        assert!(close(pop.advantages[0], 1.290992) && close(pop.advantages[1], -0.774595));
        let dr = group_advantages(&R, &[8], &AdvantageConfig::dr_grpo()).expect("valid");
        assert!(close(dr.advantages[0], 0.625) && close(dr.advantages[1], -0.375));
        // ±1 coding (DAPO): same advantages up to ε.
        let pm: Vec<f32> = R.iter().map(|&r| 2.0 * r - 1.0).collect();
        let pm = group_advantages(&pm, &[8], &AdvantageConfig::default()).expect("valid");
        assert!(close(pm.advantages[0], 1.207614) && close(pm.advantages[1], -0.724568));
        // RLOO = G/(G−1) · Dr. GRPO.
        let rloo = group_advantages(&R, &[8], &AdvantageConfig::rloo()).expect("valid");
        assert!(close(rloo.advantages[0], 0.625 * 8.0 / 7.0));
    }

    #[test]
    fn edge_cases_2b() {
        let single = group_advantages(&[0.7], &[1], &AdvantageConfig::default()).expect("valid");
        assert_eq!(single.advantages, vec![0.7]);
        let zero = AdvantageConfig { singleton: SingletonPolicy::Zero, ..AdvantageConfig::default() };
        assert_eq!(group_advantages(&[0.7], &[1], &zero).expect("valid").advantages, vec![0.0]);
        for cfg in [AdvantageConfig::default(), AdvantageConfig::dr_grpo(), AdvantageConfig::rloo()] {
            let eq = group_advantages(&[1.0; 4], &[4], &cfg).expect("valid");
            assert_eq!(eq.advantages, vec![0.0; 4]);
            assert_eq!(eq.frac_reward_zero_std, 1.0);
        }
        // Float noise on a constant group is treated as constant.
        let noisy = group_advantages(&[0.1, 0.1 + 1e-8, 0.1], &[3], &AdvantageConfig::default()).expect("valid");
        assert_eq!(noisy.advantages, vec![0.0; 3]);
    }

    #[test]
    fn bad_input() {
        let cfg = AdvantageConfig::default();
        assert!(matches!(group_advantages(&R, &[4, 3], &cfg), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(group_advantages(&R, &[8, 0], &cfg), Err(Error::EmptyGroup { group: 1, .. })));
        let mut bad = R;
        bad[5] = f32::NAN;
        match group_advantages(&bad, &[8], &cfg) {
            Err(Error::NonFinite { position, .. }) => assert_eq!(position, vec![5]),
            other => panic!("unexpected {other:?}"),
        }
        let neg = AdvantageConfig { epsilon: -1.0, ..cfg };
        assert!(matches!(group_advantages(&R, &[8], &neg), Err(Error::InvalidParameter { name: "epsilon", .. })));
        assert!(group_advantages(&[], &[], &cfg).expect("empty is fine").advantages.is_empty());
    }

    #[test]
    fn config_serde_rejects_unknown_keys() {
        let cfg: AdvantageConfig = toml::from_str("estimator = \"dr_grpo\"\nepsilon = 1e-8").expect("valid");
        assert_eq!(cfg.estimator, AdvantageEstimator::DrGrpo);
        assert!(toml::from_str::<AdvantageConfig>("epsilonn = 1e-8").is_err());
    }
}
