//! HEAL — Hybrid-domain Entropy dynamics ALignment (arXiv 2604.17928, ACL 2026; official code `XMUDeepLIT/HEAL`,
//! `verl/workers/reward_manager/prime_heal.py`). Few target-domain examples are mixed with general-domain data, and an
//! **entropy-dynamics-alignment (EDA) reward** pays a target trajectory whose token-entropy curve looks more like the
//! general domain's than its own (and a general trajectory the other way round). Spec:
//! `../shared/methods/exploration-extras.md` §1.
//!
//! ```text
//! for trajectory i with entropy sequence H_i (valid response tokens), len_i > min_len (50 in the code):
//!   KL_ij = KL(softmax(H_i) ‖ softmax(H_j))   softmax over positions; the shorter sequence is stretched to the longer
//!                                             length by nearest-neighbour interpolation (torch `nearest`:
//!                                             src = ⌊dst · len_in / len_out⌋)
//!   d_gen = min_{j ≠ i general} KL_ij,  d_tgt = min_{j ≠ i target} KL_ij      (∞ over an empty set)
//!   target:  r_EDA = 1 if d_tgt > d_gen else 0        general: r_EDA = 0 if d_tgt > d_gen else 1
//! len_i ≤ min_len: r_EDA = 0.   Total reward r = r_acc + r_EDA.
//! ```
//!
//! Data selection (SECONDARY, a paper note): `c(x) = (1 − 2|Acc(x) − ½|) · Diversity(x)`, Diversity the mean over
//! trajectories of the mean entropy of each trajectory's top 20 % tokens; keep the top `K` general samples
//! ([`heal_selection_score`], [`select_top_k`]). RECONSTRUCTION detail: the top 20 % of `n` tokens is `⌈0.2 n⌉`.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// HEAL's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealConfig {
    /// Trajectories with at most this many valid tokens get `r_EDA = 0` (the code: 50).
    pub min_len: usize,
    /// Scale of `r_EDA` in the total reward (the code: 1).
    pub eda_coef: f32,
    /// Share of each trajectory's highest-entropy tokens in the diversity score (0.2).
    pub top_fraction: f32,
}

impl Default for HealConfig {
    fn default() -> Self {
        Self { min_len: 50, eda_coef: 1.0, top_fraction: 0.2 }
    }
}

impl HealConfig {
    /// Checks the parameters once.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.eda_coef.is_finite() && self.eda_coef >= 0.0) {
            return Err(Error::invalid_parameter("eda_coef", self.eda_coef, "must be finite and ≥ 0"));
        }
        if !(self.top_fraction > 0.0 && self.top_fraction <= 1.0) {
            return Err(Error::invalid_parameter("top_fraction", self.top_fraction, "must lie in (0, 1]"));
        }
        Ok(())
    }
}

/// `x` stretched (or shrunk) to `len` by torch's `nearest` rule.
fn nearest(x: &[f32], len: usize) -> Vec<f64> {
    (0..len).map(|i| f64::from(x[(i * x.len() / len).min(x.len() - 1)])).collect()
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

/// `KL(softmax(a) ‖ softmax(b))` after aligning both to the longer length (both non-empty).
pub fn entropy_curve_kl(a: &[f32], b: &[f32]) -> f64 {
    let len = a.len().max(b.len());
    let (la, lb) = (log_softmax(&nearest(a, len)), log_softmax(&nearest(b, len)));
    la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum()
}

/// The EDA reward of every trajectory of a batch (`entropy[i]`: its valid tokens' entropies; `general[i]`: it comes
/// from the general domain), times `eda_coef`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the two lists differ in length; [`Error::InvalidParameter`] for a non-finite entropy
/// or a bad config.
pub fn eda_rewards(entropy: &[&[f32]], general: &[bool], config: &HealConfig) -> Result<Vec<f32>> {
    config.validate()?;
    forkrl_core::numeric::check_len("eda_rewards: general vs entropy", general.len(), entropy.len())?;
    if let Some(h) = entropy.iter().flat_map(|e| e.iter()).find(|h| !h.is_finite()) {
        return Err(Error::invalid_parameter("entropy", h, "must be finite"));
    }
    let mut out = Vec::with_capacity(entropy.len());
    for (i, h_i) in entropy.iter().enumerate() {
        if h_i.len() <= config.min_len || h_i.is_empty() {
            out.push(0.0);
            continue;
        }
        let (mut d_gen, mut d_tgt) = (f64::INFINITY, f64::INFINITY);
        for (j, h_j) in entropy.iter().enumerate() {
            if j == i || h_j.is_empty() {
                continue;
            }
            let kl = entropy_curve_kl(h_i, h_j);
            let d = if general[j] { &mut d_gen } else { &mut d_tgt };
            *d = d.min(kl);
        }
        // An empty domain gives ∞; ∞ > ∞ is false, so the code's tie rule applies.
        let farther_from_target = d_tgt > d_gen;
        let r = if general[i] { !farther_from_target } else { farther_from_target };
        out.push(if r { config.eda_coef } else { 0.0 });
    }
    // The code's edge case: no general sample in the batch ⇒ target trajectories get 0 (d_gen = ∞ never wins), and
    // no target sample ⇒ general trajectories get 0.
    let (any_general, any_target) = (general.iter().any(|&g| g), general.iter().any(|&g| !g));
    for (r, &g) in out.iter_mut().zip(general) {
        if (g && !any_target) || (!g && !any_general) {
            *r = 0.0;
        }
    }
    Ok(out)
}

/// `c(x) = (1 − 2|acc − ½|) · mean_traj(mean of the top ⌈f·n⌉ entropies)` of one general-domain sample.
///
/// # Errors
/// [`Error::InvalidParameter`] for `acc ∉ [0, 1]`, no trajectory, an empty trajectory or a non-finite entropy.
pub fn heal_selection_score(accuracy: f64, trajectories: &[&[f32]], top_fraction: f32) -> Result<f64> {
    if !(0.0..=1.0).contains(&accuracy) {
        return Err(Error::invalid_parameter("accuracy", accuracy, "must lie in [0, 1]"));
    }
    if !(top_fraction > 0.0 && top_fraction <= 1.0) {
        return Err(Error::invalid_parameter("top_fraction", top_fraction, "must lie in (0, 1]"));
    }
    if trajectories.is_empty() || trajectories.iter().any(|t| t.is_empty()) {
        return Err(Error::invalid_parameter("trajectories", trajectories.len(), "need ≥ 1, each non-empty"));
    }
    let mut diversity = 0.0f64;
    for t in trajectories {
        if let Some(h) = t.iter().find(|h| !h.is_finite()) {
            return Err(Error::invalid_parameter("entropy", h, "must be finite"));
        }
        let mut v: Vec<f32> = t.to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        // The tolerance keeps an f32 fraction such as 0.2 (0.2000000030) from rounding 0.2 × 5 up to 2.
        let k = ((f64::from(top_fraction) * v.len() as f64 - 1e-6).ceil() as usize).clamp(1, v.len());
        diversity += v[..k].iter().map(|&h| f64::from(h)).sum::<f64>() / k as f64;
    }
    diversity /= trajectories.len() as f64;
    Ok((1.0 - 2.0 * (accuracy - 0.5).abs()) * diversity)
}

/// The indices of the `k` highest scores, best first (ties: lower index first).
pub fn select_top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min_len: usize) -> HealConfig {
        HealConfig { min_len, ..HealConfig::default() }
    }

    #[test]
    fn interpolation_and_kl_by_hand() {
        assert_eq!(nearest(&[1.0, 2.0], 4), vec![1.0, 1.0, 2.0, 2.0]);
        assert_eq!(nearest(&[1.0, 2.0, 3.0], 5), vec![1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(entropy_curve_kl(&[0.3, 0.9], &[0.3, 0.9]), 0.0);
        // softmax([0, ln 3]) = [¼, ¾] against uniform: KL = ¼ ln ½ + ¾ ln 1.5.
        let kl = entropy_curve_kl(&[0.0, 3f32.ln()], &[0.0, 0.0]);
        assert!((kl - (0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln())).abs() < 1e-7);
        // A constant curve of any length is uniform: the same distribution as another constant curve.
        assert!(entropy_curve_kl(&[0.7; 3], &[0.2; 6]).abs() < 1e-12);
    }

    #[test]
    fn eda_rewards_follow_the_codes_rule() {
        let rising: Vec<f32> = (0..8).map(|i| i as f32 * 0.3).collect();
        let falling: Vec<f32> = rising.iter().rev().copied().collect();
        let rising2: Vec<f32> = rising.iter().map(|h| h * 1.1).collect();
        // Target 0 rises like the general trajectory 2; target 1 falls, like nothing general.
        let entropy: Vec<&[f32]> = vec![&rising, &falling, &rising2, &falling];
        let general = [false, false, true, false];
        let r = eda_rewards(&entropy, &general, &cfg(2)).expect("valid");
        // 0: d_gen = KL(0, 2) small, d_tgt = min(KL(0,1), KL(0,3)) large → 1.
        // 1: d_tgt = KL(1, 3) = 0 (identical), d_gen > 0 → 0.
        // 2 (general): d_tgt = KL(2, 0) small, d_gen = ∞ (no other general) → d_tgt > d_gen false → 1.
        // 3: like 1 → 0.
        assert_eq!(r, vec![1.0, 0.0, 1.0, 0.0]);
        // Short trajectories get 0; a single domain gives 0 everywhere.
        assert_eq!(eda_rewards(&entropy, &general, &cfg(50)).expect("valid"), vec![0.0; 4]);
        assert_eq!(eda_rewards(&entropy, &[true; 4], &cfg(2)).expect("valid"), vec![0.0; 4]);
        assert_eq!(eda_rewards(&entropy, &[false; 4], &cfg(2)).expect("valid"), vec![0.0; 4]);
        // Ties: a target trajectory gets 0, a general one 1.
        let flat = [0.5f32; 4];
        let tie: Vec<&[f32]> = vec![&flat, &flat, &flat];
        assert_eq!(eda_rewards(&tie, &[false, true, false], &cfg(2)).expect("valid"), vec![0.0, 1.0, 0.0]);
        assert!(eda_rewards(&tie, &[false], &cfg(2)).is_err());
        let nan = [f32::NAN; 3];
        assert!(eda_rewards(&[&nan[..]], &[false], &cfg(2)).is_err());
    }

    #[test]
    fn selection_score_by_hand() {
        // acc 0.5 → uncertainty 1; top 20 % of 5 tokens = 1 token: the max.
        let t1 = [0.1f32, 2.0, 0.3, 0.2, 0.1];
        let t2 = [1.0f32, 0.0, 0.0, 0.0, 0.0];
        let s = heal_selection_score(0.5, &[&t1, &t2], 0.2).expect("valid");
        assert!((s - 1.5).abs() < 1e-7);
        assert_eq!(heal_selection_score(1.0, &[&t1], 0.2).expect("valid"), 0.0, "always solved: no uncertainty");
        assert!((heal_selection_score(0.25, &[&t1], 0.2).expect("valid") - 1.0).abs() < 1e-7);
        assert!(heal_selection_score(1.5, &[&t1], 0.2).is_err());
        assert!(heal_selection_score(0.5, &[], 0.2).is_err());
        assert_eq!(select_top_k(&[0.2, 0.9, 0.2, 0.5], 3), vec![1, 3, 0]);
    }
}
