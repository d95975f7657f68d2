//! Rock tokens of on-policy distillation ("Cornerstones or Stumbling Blocks? Deciphering the Rock Tokens in On-Policy
//! Distillation", Jiang et al., arXiv 2605.09253; official code `YuxuanJiang1/Rock-Token`).
//!
//! **Detection** (code: `rerun_unrestricted.py`). From per-position reverse-KL values `ℓ_t = KL(π_s ‖ π_T)` of a
//! saturated student, aggregate per vocabulary id: frequency, mean and std of ℓ. Keep ids with `freq ≥ min_freq`
//! (2), drop the `drop_most_frequent` (5) most frequent ids (spaces, punctuation), rank by `freq × mean_kl` (the id's
//! total KL mass): ranks 1..=top_k (100) are the rock tokens, the next `control_k` (100) the controls. Ties: higher
//! score, then higher frequency, then lower id.
//!
//! **Persistence** across checkpoints: Jaccard overlap of two rock sets.
//!
//! **Bypass** ("TokenFreezeKD", `token_freeze_kd.py`): `w_t = freeze_weight` if the token is a rock, else 1, and
//! `L_KD = Σ_t w_t ℓ_t / max(Σ_t w_t, 1)` (note the `max(·, 1)` denominator of the official code).
//!
//! Alignment decision (the code leaves it to the framework's `loss_mask`): the rock test applies to the **sampled token
//! at position t** — the token whose distribution `ℓ_t` measures — i.e. `token_ids[t]` of the response.

use std::collections::{HashMap, HashSet};

use forkrl_core::{
    Error, Result,
    numeric::{check_finite_masked, check_len},
};
use serde::{Deserialize, Serialize};

/// Detection settings; defaults are the official code's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RockConfig {
    /// Minimum occurrences for an id to be ranked.
    pub min_freq: u64,
    /// The most frequent ids dropped before ranking.
    pub drop_most_frequent: usize,
    /// Number of rock tokens.
    pub top_k: usize,
    /// Number of control ids ranked right after the rocks.
    pub control_k: usize,
}

impl Default for RockConfig {
    fn default() -> Self {
        Self { min_freq: 2, drop_most_frequent: 5, top_k: 100, control_k: 100 }
    }
}

/// Per-id KL statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RockStat {
    /// Vocabulary id.
    pub id: u32,
    /// Occurrences.
    pub freq: u64,
    /// Mean reverse KL.
    pub mean_kl: f64,
    /// Population std of the reverse KL.
    pub std_kl: f64,
    /// `freq × mean_kl`.
    pub score: f64,
}

/// Result of [`detect_rock_tokens`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RockReport {
    /// Ranked ids (after the frequency filter and the drop of the most frequent), best first.
    pub ranked: Vec<RockStat>,
    /// Rock ids (ranks 1..=top_k).
    pub rocks: Vec<u32>,
    /// Control ids (the next `control_k`).
    pub controls: Vec<u32>,
    /// The most frequent ids that were dropped.
    pub dropped_frequent: Vec<u32>,
    /// Fraction of the loss tokens that are rock tokens (the paper: up to 18 %).
    pub rock_token_fraction: f64,
}

fn check(token_ids: &[u32], values: &[f32], mask: &[bool], what: &'static str) -> Result<()> {
    check_len("rock tokens: token_ids vs mask", token_ids.len(), mask.len())?;
    check_len("rock tokens: values vs mask", values.len(), mask.len())?;
    check_finite_masked(what, values, mask)
}

/// [`check`] for reverse-KL values, which must also be ≥ 0 on the loss tokens.
fn check_kl(token_ids: &[u32], kl: &[f32], mask: &[bool]) -> Result<()> {
    check(token_ids, kl, mask, "reverse KL")?;
    match kl.iter().zip(mask).position(|(&v, &m)| m && v < 0.0) {
        Some(i) => Err(Error::invalid_parameter("reverse KL", kl[i], format!("position {i}: a KL divergence is ≥ 0"))),
        None => Ok(()),
    }
}

/// Ranks vocabulary ids by total reverse-KL mass and picks the rock tokens and controls.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays differ in length; [`Error::NonFinite`] for a non-finite KL on a loss token;
/// [`Error::InvalidParameter`] for a negative KL (a KL divergence is ≥ 0).
pub fn detect_rock_tokens(token_ids: &[u32], kl: &[f32], mask: &[bool], config: &RockConfig) -> Result<RockReport> {
    check_kl(token_ids, kl, mask)?;
    let mut acc: HashMap<u32, (u64, f64, f64)> = HashMap::new();
    for ((&id, &v), &m) in token_ids.iter().zip(kl).zip(mask) {
        if m {
            let e = acc.entry(id).or_insert((0, 0.0, 0.0));
            e.0 += 1;
            e.1 += f64::from(v);
            e.2 += f64::from(v) * f64::from(v);
        }
    }
    let mut stats: Vec<RockStat> = acc
        .into_iter()
        .map(|(id, (freq, sum, sum_sq))| {
            let mean = sum / freq as f64;
            let var = (sum_sq / freq as f64 - mean * mean).max(0.0);
            RockStat { id, freq, mean_kl: mean, std_kl: var.sqrt(), score: freq as f64 * mean }
        })
        .filter(|s| s.freq >= config.min_freq)
        .collect();
    // The most frequent ids (ties by lower id) are dropped.
    stats.sort_by(|a, b| b.freq.cmp(&a.freq).then(a.id.cmp(&b.id)));
    let drop = config.drop_most_frequent.min(stats.len());
    let dropped_frequent: Vec<u32> = stats[..drop].iter().map(|s| s.id).collect();
    let mut ranked = stats.split_off(drop);
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then(b.freq.cmp(&a.freq)).then(a.id.cmp(&b.id)));
    let rocks: Vec<u32> = ranked.iter().take(config.top_k).map(|s| s.id).collect();
    let controls: Vec<u32> = ranked.iter().skip(config.top_k).take(config.control_k).map(|s| s.id).collect();
    let rock_set: HashSet<u32> = rocks.iter().copied().collect();
    let n = mask.iter().filter(|&&m| m).count();
    let rock_n = token_ids.iter().zip(mask).filter(|(id, m)| **m && rock_set.contains(id)).count();
    Ok(RockReport {
        ranked,
        rocks,
        controls,
        dropped_frequent,
        rock_token_fraction: if n == 0 { 0.0 } else { rock_n as f64 / n as f64 },
    })
}

/// Jaccard overlap `|A ∩ B| / |A ∪ B|` of two rock sets (1 when both are empty): do rocks persist across checkpoints?
pub fn rock_persistence(a: &[u32], b: &[u32]) -> f64 {
    let (a, b): (HashSet<u32>, HashSet<u32>) = (a.iter().copied().collect(), b.iter().copied().collect());
    let union = a.union(&b).count();
    if union == 0 { 1.0 } else { a.intersection(&b).count() as f64 / union as f64 }
}

/// TokenFreezeKD weights: `freeze_weight` on loss tokens whose sampled id is a rock, 1 on other loss tokens, 0 on
/// padding.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays differ in length; [`Error::InvalidParameter`] unless
/// `0 ≤ freeze_weight ≤ 1`.
pub fn rock_bypass_weights(token_ids: &[u32], mask: &[bool], rocks: &[u32], freeze_weight: f32) -> Result<Vec<f32>> {
    if !(0.0..=1.0).contains(&freeze_weight) {
        return Err(Error::invalid_parameter("freeze_weight", freeze_weight, "must lie in [0, 1]"));
    }
    check_len("rock_bypass_weights: token_ids vs mask", token_ids.len(), mask.len())?;
    let set: HashSet<u32> = rocks.iter().copied().collect();
    Ok(token_ids
        .iter()
        .zip(mask)
        .map(|(id, &m)| match (m, set.contains(id)) {
            (false, _) => 0.0,
            (true, true) => freeze_weight,
            (true, false) => 1.0,
        })
        .collect())
}

/// The TokenFreezeKD reduction `Σ_t w_t ℓ_t / max(Σ_t w_t, 1)` over the loss tokens (host reference of the loss).
///
/// # Errors
/// As [`detect_rock_tokens`] for the shapes and values; weights must be finite and ≥ 0.
pub fn rock_bypass_mean(kl: &[f32], weights: &[f32], mask: &[bool]) -> Result<f64> {
    check_len("rock_bypass_mean: kl vs mask", kl.len(), mask.len())?;
    check_len("rock_bypass_mean: weights vs mask", weights.len(), mask.len())?;
    check_finite_masked("reverse KL", kl, mask)?;
    if let Some(i) = weights.iter().zip(mask).position(|(w, &m)| m && !(w.is_finite() && *w >= 0.0)) {
        return Err(Error::invalid_parameter("weights", weights[i], format!("position {i}: must be finite and ≥ 0")));
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for ((&v, &w), &m) in kl.iter().zip(weights).zip(mask) {
        if m {
            num += f64::from(w) * f64::from(v);
            den += f64::from(w);
        }
    }
    Ok(num / den.max(1.0))
}

/// Which token of a position the rock test reads (the spec's §0 row 1: detection and the released bypass are shifted
/// by one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RockAlignment {
    /// The token the position predicts, `y_t` (consistent with detection; the default).
    #[default]
    Predicted,
    /// The token the position reads, `y_{t−1}` (the last prompt token at the first response position): the released
    /// TokenFreezeKD training code, which therefore silences the position after each rock.
    Context,
}

/// The token id the rock test reads at each of the `[B, W]` target positions of rows `ids` (`[B][W + 1]`, target
/// `t` of a row predicts `ids[t + 1]` and reads `ids[t]`).
///
/// # Errors
/// [`Error::ShapeMismatch`] for a row that is not `W + 1` long.
pub fn rock_aligned_ids(ids: &[Vec<u32>], width: usize, alignment: RockAlignment) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(ids.len() * width);
    for row in ids {
        check_len("rock_aligned_ids: row vs width + 1", row.len(), width + 1)?;
        let offset = usize::from(alignment == RockAlignment::Predicted);
        out.extend_from_slice(&row[offset..offset + width]);
    }
    Ok(out)
}

/// Online rock-token detection over a sliding window of steps (RECONSTRUCTION, spec §3.4: "accumulated online by the
/// loop itself"): each step pushes its loss tokens' ids and reverse KL; [`OnlineRockDetector::rocks`] ranks the ids
/// of the last `window` steps with [`detect_rock_tokens`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineRockDetector {
    window: usize,
    config: RockConfig,
    steps: std::collections::VecDeque<Vec<(u32, f32)>>,
}

impl OnlineRockDetector {
    /// An empty detector over the last `window` (≥ 1) steps.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero window.
    pub fn new(window: usize, config: RockConfig) -> Result<Self> {
        if window == 0 {
            return Err(Error::invalid_parameter("window", 0, "must be ≥ 1"));
        }
        Ok(Self { window, config, steps: std::collections::VecDeque::new() })
    }

    /// Adds one step's loss tokens (the oldest step leaves once the window is full).
    ///
    /// # Errors
    /// As [`detect_rock_tokens`] for shapes, non-finite and negative KL.
    pub fn push(&mut self, token_ids: &[u32], kl: &[f32], mask: &[bool]) -> Result<()> {
        check_kl(token_ids, kl, mask)?;
        let step = token_ids.iter().zip(kl).zip(mask).filter(|(_, m)| **m).map(|((&id, &v), _)| (id, v)).collect();
        self.steps.push_back(step);
        while self.steps.len() > self.window {
            self.steps.pop_front();
        }
        Ok(())
    }

    /// The steps held.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// No step was pushed.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The current ranking over the window.
    ///
    /// # Errors
    /// As [`detect_rock_tokens`] (cannot fail on what `push` accepted).
    pub fn report(&self) -> Result<RockReport> {
        let (ids, kl): (Vec<u32>, Vec<f32>) = self.steps.iter().flatten().copied().unzip();
        detect_rock_tokens(&ids, &kl, &vec![true; ids.len()], &self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opd4_alignment_moves_the_bypass_by_one_position() {
        // Response [y0, R, y2, y3] + EOS after a one-token prompt; position t predicts response token t.
        let (p, y0, r, y2, y3, eos) = (1u32, 10, 99, 12, 13, 2);
        let ids = vec![vec![p, y0, r, y2, y3, eos]];
        let kl = [0.5f32, 2.0, 0.1, 3.0, 0.4];
        let mask = [true; 5];
        let no =
            rock_bypass_weights(&rock_aligned_ids(&ids, 5, RockAlignment::Predicted).expect("valid"), &mask, &[], 0.0);
        assert!((rock_bypass_mean(&kl, &no.expect("valid"), &mask).expect("valid") - 1.2).abs() < 1e-6);
        for (alignment, fw, expected, bypassed) in [
            (RockAlignment::Predicted, 0.0, 1.0, 1),
            (RockAlignment::Context, 0.0, 1.475, 2),
            (RockAlignment::Predicted, 0.5, 1.111111, 1),
        ] {
            let aligned = rock_aligned_ids(&ids, 5, alignment).expect("valid");
            let w = rock_bypass_weights(&aligned, &mask, &[r], fw).expect("valid");
            assert_eq!(w.iter().position(|&x| x < 1.0), Some(bypassed), "{alignment:?}");
            let l = rock_bypass_mean(&kl, &w, &mask).expect("valid");
            assert!((l - expected).abs() < 1e-6, "{alignment:?} {fw}: {l}");
        }
        assert!(rock_aligned_ids(&[vec![1, 2]], 2, RockAlignment::Context).is_err());
    }

    #[test]
    fn online_detection_forgets_steps_outside_its_window() {
        let config = RockConfig { drop_most_frequent: 0, top_k: 1, control_k: 0, min_freq: 2 };
        let mut d = OnlineRockDetector::new(2, config).expect("valid");
        d.push(&[5, 5, 6], &[3.0, 3.0, 0.1], &[true, true, true]).expect("valid");
        assert_eq!(d.report().expect("valid").rocks, vec![5]);
        d.push(&[6, 6], &[1.0, 1.0], &[true, true]).expect("valid");
        d.push(&[6, 7, 9], &[1.0, 0.5, 9.0], &[true, true, false]).expect("valid");
        assert_eq!(d.len(), 2);
        assert_eq!(d.report().expect("valid").rocks, vec![6], "id 5 left the window; the masked id 9 never entered");
        assert!(d.push(&[1], &[-1.0], &[true]).is_err());
        assert!(OnlineRockDetector::new(0, RockConfig::default()).is_err());
    }

    #[test]
    fn bypass_test_vector() {
        // test-vectors.md §2.O
        let kl = [0.5f32, 2.0, 0.1, 3.0];
        let ids = [1u32, 2, 3, 4];
        let mask = [true; 4];
        for (fw, expected) in [(0.0, 0.3), (0.3, 0.807692), (0.5, 1.033333), (1.0, 1.4)] {
            let w = rock_bypass_weights(&ids, &mask, &[2, 4], fw).expect("valid");
            let l = rock_bypass_mean(&kl, &w, &mask).expect("valid");
            assert!((l - expected).abs() < 1e-6, "freeze_weight {fw}: {l} vs {expected}");
        }
        let w = rock_bypass_weights(&ids, &mask, &ids, 0.0).expect("valid");
        assert_eq!(rock_bypass_mean(&kl, &w, &mask).expect("valid"), 0.0);
    }

    #[test]
    fn ranking_by_kl_mass() {
        // test-vectors.md §2.O: (freq 40, mean KL 0.5) = 20.0 ranks above (freq 10, mean KL 1.5) = 15.0.
        let mut ids = vec![7u32; 40];
        ids.extend(vec![9u32; 10]);
        let mut kl = vec![0.5f32; 40];
        kl.extend(vec![1.5f32; 10]);
        ids.push(11); // a singleton, below min_freq
        kl.push(100.0);
        let mask = vec![true; ids.len()];
        let config = RockConfig { drop_most_frequent: 0, top_k: 1, control_k: 5, ..RockConfig::default() };
        let r = detect_rock_tokens(&ids, &kl, &mask, &config).expect("valid");
        assert_eq!(r.rocks, vec![7]);
        assert_eq!(r.controls, vec![9]);
        assert!((r.ranked[0].score - 20.0).abs() < 1e-9 && (r.ranked[1].score - 15.0).abs() < 1e-9);
        assert!((r.rock_token_fraction - 40.0 / 51.0).abs() < 1e-12);
        // Dropping the most frequent id removes 7 from the ranking.
        let r = detect_rock_tokens(&ids, &kl, &mask, &RockConfig { drop_most_frequent: 1, ..config }).expect("valid");
        assert_eq!((r.dropped_frequent.clone(), r.rocks.clone()), (vec![7], vec![9]));
    }

    #[test]
    fn persistence_and_bad_input() {
        assert_eq!(rock_persistence(&[1, 2, 3], &[2, 3, 4]), 0.5);
        assert_eq!(rock_persistence(&[], &[]), 1.0);
        assert!(detect_rock_tokens(&[1], &[-0.1], &[true], &RockConfig::default()).is_err());
        assert!(detect_rock_tokens(&[1], &[f32::NAN], &[true], &RockConfig::default()).is_err());
        assert!(detect_rock_tokens(&[1, 2], &[0.1], &[true], &RockConfig::default()).is_err());
        assert!(rock_bypass_weights(&[1], &[true], &[1], 1.5).is_err());
        assert!(rock_bypass_mean(&[1.0], &[-1.0], &[true]).is_err());
        let cfg: RockConfig = serde_json::from_str(r#"{"top_k": 50}"#).expect("partial config");
        assert_eq!((cfg.top_k, cfg.min_freq), (50, 2));
        assert!(serde_json::from_str::<RockConfig>(r#"{"topk": 50}"#).is_err());
    }
}
