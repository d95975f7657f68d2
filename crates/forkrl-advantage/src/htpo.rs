//! HTPO — "Towards Exploration-Exploitation Balanced Policy Optimization via Hierarchical Token-level Objective
//! Control" (Yao et al., arXiv 2605.08283), as the official `xcyao00/HTPO` code (`compute_policy_loss_htpo`).
//!
//! Three-level partition: prompt difficulty (**hard** when the group accuracy is below `difficulty_threshold` = 0.6),
//! answer correctness, and token entropy **per sequence** (high when `H ≥` the k-th largest entropy of the sequence,
//! `k = max(⌊0.2·n⌋, 1)`). With `l = max(−A r, −A clip(r, 1−ε_l, 1+ε_h))` the standard loss and
//! `I = exp(log π − sg log π)` (value 1, gradient ∇log π):
//!
//! | group | low-entropy tokens | high-entropy tokens |
//! |---|---|---|
//! | G1/2 hard, correct | `l`; the lowest `clip_entropy_ratio1` of the sequence's low-entropy tokens get 0 | `−A r` inside the region; `r > 1+ε_h`: `(1+ε_h)·A·I`; `r < 1−ε_l`: `sg(1/r)·A·I` ⚠ |
//! | G3/4 hard, wrong | `l` | `r < 1−ε_l`: `(1−ε_l)·A·I`; else `−A r` |
//! | G5/6 easy, correct | `l` | `l`; the highest `clip_entropy_ratio2` of the high-entropy tokens get 0 |
//! | G7/8 easy, wrong | `l` | as G3/4 |
//!
//! then the dual clip `min(l, −A·c)` on every `A < 0` token (c = 10 in the official script) and `token-mean`.
//!
//! ⚠ The G1/2 lower branch (`r < 1−ε_l`, gradient `+(A/r)∇log π`) pushes a correct-path high-entropy token's
//! probability *down*. Whether that is intended is open (methods spec §3.3). [`HtpoLowerBranch::AsReleased`] keeps the
//! released behaviour; [`HtpoLowerBranch::Standard`] uses the unclipped `−A r` instead (PPO's value there).
//! The released mask quirks are kept and documented: the low-entropy drop compares with strict `<` against the k-th
//! smallest value (so `k = 1` drops nothing), the high-entropy drop uses `≥` (drops at least one). Empty sequences and
//! empty subsets are skipped (the released code would call `topk` on an empty tensor). Entropy is a constant.

use forkrl_core::{BatchLayout, Result, numeric::check_finite_masked};
use serde::{Deserialize, Serialize};

/// What the hard-correct high-entropy lower branch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HtpoLowerBranch {
    /// `sg(1/r)·A·I(log π)` as released (lowers the probability).
    #[default]
    AsReleased,
    /// The unclipped `−A·r` (raises it, as PPO would).
    Standard,
}

/// HTPO parameters (defaults from the official `train.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HtpoConfig {
    /// ε_l (0.2).
    pub clip_ratio_low: f64,
    /// ε_h (0.28).
    pub clip_ratio_high: f64,
    /// Dual-clip constant c (10).
    pub clip_ratio_c: f64,
    /// Share of a hard-correct sequence's low-entropy tokens dropped (0.006).
    pub clip_entropy_ratio1: f64,
    /// Share of an easy-correct sequence's high-entropy tokens dropped (0.02).
    pub clip_entropy_ratio2: f64,
    /// A prompt is hard when its group accuracy is below this (0.6 = 1 − τ_diff).
    pub difficulty_threshold: f64,
    /// High-entropy share per sequence (0.2, hard-coded in the release).
    pub high_entropy_ratio: f64,
    /// The questionable branch.
    pub hard_correct_lower_branch: HtpoLowerBranch,
}

impl Default for HtpoConfig {
    fn default() -> Self {
        Self {
            clip_ratio_low: 0.2,
            clip_ratio_high: 0.28,
            clip_ratio_c: 10.0,
            clip_entropy_ratio1: 0.006,
            clip_entropy_ratio2: 0.02,
            difficulty_threshold: 0.6,
            high_entropy_ratio: 0.2,
            hard_correct_lower_branch: HtpoLowerBranch::AsReleased,
        }
    }
}

impl HtpoConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        crate::ppo_clip::PpoClipConfig {
            clip_ratio_low: self.clip_ratio_low,
            clip_ratio_high: self.clip_ratio_high,
            clip_ratio_c: Some(self.clip_ratio_c),
        }
        .validate()?;
        use forkrl_core::numeric::check_range;
        check_range("clip_entropy_ratio1", self.clip_entropy_ratio1, 0.0, 1.0, false)?;
        check_range("clip_entropy_ratio2", self.clip_entropy_ratio2, 0.0, 1.0, false)?;
        check_range("difficulty_threshold", self.difficulty_threshold, 0.0, 1.0, false)?;
        check_range("high_entropy_ratio", self.high_entropy_ratio, 0.0, 1.0, false)
    }
}

/// How each token of a `[B, T]` batch is treated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HtpoTokenGroups {
    /// High-entropy token of a hard prompt's correct response (G1/2 high).
    pub hard_correct_high: Vec<bool>,
    /// High-entropy token of a wrong response (G3/4 and G7/8 high).
    pub wrong_high: Vec<bool>,
    /// Token whose loss is set to 0 (the two entropy-ratio drops).
    pub dropped: Vec<bool>,
    /// Per-sequence hardness.
    pub hard: Vec<bool>,
}

/// `k = max(⌊ratio·n⌋, 1)` (test vector 2.N).
pub fn htpo_count(n: usize, ratio: f64) -> usize {
    ((ratio * n as f64).floor() as usize).max(1)
}

/// The k-th largest (`descending`) or smallest value of `values` (k ≥ 1, k ≤ len).
fn kth(values: &mut [f32], k: usize, descending: bool) -> f32 {
    values.sort_by(|a, b| if descending { b.total_cmp(a) } else { a.total_cmp(b) });
    values[k - 1]
}

/// Partitions the tokens of a batch (row-major `[B, T]` entropies, per-sequence correctness).
///
/// # Errors
/// [`Error::ShapeMismatch`] for lengths that do not match the layout; [`Error::NonFinite`] for a NaN/inf entropy on a
/// response token; the errors of [`HtpoConfig::validate`].
pub fn htpo_token_groups(
    entropy: &[f32],
    layout: &BatchLayout,
    correct: &[bool],
    config: &HtpoConfig,
) -> Result<HtpoTokenGroups> {
    config.validate()?;
    layout.check_per_token("entropy", entropy.len())?;
    layout.check_per_sequence("correct", correct.len())?;
    check_finite_masked("entropy", entropy, layout.response_mask())?;
    let n = entropy.len();
    let mut out = HtpoTokenGroups {
        hard_correct_high: vec![false; n],
        wrong_high: vec![false; n],
        dropped: vec![false; n],
        hard: vec![false; layout.batch_size()],
    };
    let mask = layout.response_mask();
    for group in layout.groups() {
        let acc = group.rows.clone().filter(|&r| correct[r]).count() as f64 / group.len() as f64;
        let hard = acc < config.difficulty_threshold;
        let width = layout.max_len();
        for row in group.rows.clone() {
            out.hard[row] = hard;
            let pos: Vec<usize> = (row * width..(row + 1) * width).filter(|&i| mask[i]).collect();
            if pos.is_empty() {
                continue;
            }
            let mut hs: Vec<f32> = pos.iter().map(|&i| entropy[i]).collect();
            let thr = kth(&mut hs, htpo_count(pos.len(), config.high_entropy_ratio), true);
            let (high, low): (Vec<usize>, Vec<usize>) = pos.iter().copied().partition(|&i| entropy[i] >= thr);
            let ok = correct[row];
            for &i in &high {
                match (hard, ok) {
                    (true, true) => out.hard_correct_high[i] = true,
                    (_, false) => out.wrong_high[i] = true,
                    (false, true) => {}
                }
            }
            if hard && ok && !low.is_empty() {
                let mut v: Vec<f32> = low.iter().map(|&i| entropy[i]).collect();
                let t1 = kth(&mut v, htpo_count(low.len(), config.clip_entropy_ratio1), false);
                low.iter().filter(|&&i| entropy[i] < t1).for_each(|&i| out.dropped[i] = true);
            }
            if !hard && ok && !high.is_empty() {
                let mut v: Vec<f32> = high.iter().map(|&i| entropy[i]).collect();
                let t2 = kth(&mut v, htpo_count(high.len(), config.clip_entropy_ratio2), true);
                high.iter().filter(|&&i| entropy[i] >= t2).for_each(|&i| out.dropped[i] = true);
            }
        }
    }
    Ok(out)
}

#[cfg(feature = "burn")]
pub use tensor::htpo_loss;

#[cfg(feature = "burn")]
mod tensor {
    use super::{HtpoConfig, HtpoLowerBranch, HtpoTokenGroups};
    use crate::loss_types::{PolicyInputs, TokenLoss, mask_tensor, metrics};
    use forkrl_core::{Result, numeric::check_len};

    /// The per-token HTPO loss `[B, T]`; aggregate with `token-mean`.
    ///
    /// # Errors
    /// Shape and parameter errors as [`crate::ppo_clip_loss`]; [`forkrl_core::Error::ShapeMismatch`] when `groups`
    /// does not cover `B·T` tokens.
    pub fn htpo_loss(inputs: &PolicyInputs, groups: &HtpoTokenGroups, config: &HtpoConfig) -> Result<TokenLoss> {
        config.validate()?;
        let shape = inputs.validate()?;
        check_len("htpo_loss: token groups vs [B, T]", groups.dropped.len(), shape[0] * shape[1])?;
        let device = inputs.log_prob.device();
        let (lp, log_ratio, adv) = inputs.log_ratio();
        let (ratio, l1, standard, clipped) =
            crate::ppo_clip::clip_terms(&log_ratio, &adv, config.clip_ratio_low, config.clip_ratio_high, &inputs.mask);
        let fixed = ratio.detach();
        let (lo, hi) = (1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high);
        let unit = (lp.clone() - lp.detach()).exp(); // value 1, gradient ∇log π
        let above = fixed.clone().greater_elem(hi);
        let below = fixed.clone().lower_elem(lo);
        let lower_branch = match config.hard_correct_lower_branch {
            HtpoLowerBranch::AsReleased => fixed.recip() * adv.clone() * unit.clone(),
            HtpoLowerBranch::Standard => l1.clone(),
        };
        let hard_correct = l1
            .clone()
            .mask_where(below.clone(), lower_branch)
            .mask_where(above, adv.clone().mul_scalar(hi) * unit.clone());
        let wrong = l1.mask_where(below, adv.clone().mul_scalar(lo) * unit);
        let hc = mask_tensor(groups.hard_correct_high.clone(), shape, &device);
        let wh = mask_tensor(groups.wrong_high.clone(), shape, &device);
        let drop = mask_tensor(groups.dropped.clone(), shape, &device);
        let mut loss = standard.mask_where(hc, hard_correct).mask_where(wh, wrong).mask_fill(drop, 0.0);
        let cap = adv.clone().neg().mul_scalar(config.clip_ratio_c);
        let dual = loss.clone().greater(cap.clone()).bool_and(adv.lower_elem(0.0)).bool_and(inputs.mask.clone());
        loss = loss.mask_where(dual.clone(), cap);
        let metrics = metrics(&inputs.mask, clipped, dual, &log_ratio)?;
        Ok(TokenLoss { loss: loss.mask_fill(inputs.mask.clone().bool_not(), 0.0), metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_2n_counts() {
        for (n, k) in [(3, 1), (7, 1), (10, 2), (100, 20)] {
            assert_eq!(htpo_count(n, 0.2), k);
        }
    }

    #[test]
    fn groups_follow_the_released_rules() {
        // One hard group (1 of 2 correct): a correct and a wrong response of 10 tokens; one easy group (2 of 2).
        let layout = BatchLayout::from_lengths(&[2, 2], &[10, 10, 10, 0], 10).expect("valid");
        let mut h = vec![0.0f32; 40];
        for r in 0..3 {
            for c in 0..10 {
                h[r * 10 + c] = c as f32; // positions 8 and 9 are the top 20 %
            }
        }
        let cfg = HtpoConfig { clip_entropy_ratio1: 0.25, clip_entropy_ratio2: 0.5, ..HtpoConfig::default() };
        let g = htpo_token_groups(&h, &layout, &[true, false, true, true], &cfg).expect("valid");
        assert_eq!(g.hard, vec![true, true, false, false]);
        assert!(g.hard_correct_high[8] && g.hard_correct_high[9] && !g.hard_correct_high[7]);
        assert!(g.wrong_high[18] && g.wrong_high[19] && !g.wrong_high[17]);
        // Hard-correct low tokens 0..8: k1 = ⌊0.25·8⌋ = 2, 2nd smallest = 1, strict `<` drops token 0 only.
        assert_eq!((0..10).filter(|&i| g.dropped[i]).collect::<Vec<_>>(), vec![0]);
        // Easy-correct high tokens {8, 9}: k2 = max(⌊0.5·2⌋, 1) = 1, `≥ 9` drops token 9.
        assert_eq!((20..30).filter(|&i| g.dropped[i]).collect::<Vec<_>>(), vec![29]);
        // Empty sequence: nothing.
        assert!((30..40).all(|i| !g.dropped[i] && !g.wrong_high[i]));
        // With the default 0.6 % ratio, k1 = 1 and the strict rule drops nothing (documented quirk).
        let g = htpo_token_groups(&h, &layout, &[true, false, true, true], &HtpoConfig::default()).expect("valid");
        assert!((0..10).all(|i| !g.dropped[i]));
    }
}
