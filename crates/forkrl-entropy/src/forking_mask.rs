//! The forking-token mask of "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
//! Learning for LLM Reasoning" (Wang et al., arXiv 2506.01939, Eq. 6).
//!
//! The policy-gradient loss is restricted to the tokens whose entropy is in the top ρ fraction of **all response
//! tokens of the batch** (batch-global, not per sequence):
//!
//! ```text
//! J^B_HighEnt(θ) = E[ 1 / Σ_i Σ_t I[H^i_t ≥ τ^B_ρ] · Σ_i Σ_t I[H^i_t ≥ τ^B_ρ] · min(r Â, clip(r, 1−ε_low, 1+ε_high) Â) ]
//! ```
//!
//! Two selection rules, as in the sources (entropy-and-forking-tokens.md §2.2):
//! - [`SelectionRule::TopK`] (default; official code `get_global_entropy_top_mask`): exactly
//!   `k = max(1, int(n·ρ + 0.9999))` ([`top_k_count`]) tokens, ties broken deterministically by flat (row-major) index, lowest first.
//! - [`SelectionRule::Quantile`] (TRL `top_entropy_quantile`): threshold `τ = quantile(H, 1 − ρ)` with linear
//!   interpolation (as `torch.quantile`), select `H ≥ τ`; ties at τ can select more than [`top_k_count`] tokens.
//!
//! Padding is never selected; an empty batch gives an all-false mask (no NaN, no panic). The mask carries no gradient.
//! Also here: the complementary "bottom 1 − ρ" mask of the paper's ablation (Fig. 7) and a per-sequence top-ρ (used by
//! HTPO's split).

use forkrl_core::{
    BatchLayout, Error, Result,
    numeric::{check_finite_masked, check_len},
};
use serde::{Deserialize, Serialize};

/// How the top-ρ set is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectionRule {
    /// Exactly [`top_k_count`] tokens, ties by lowest flat index (official 80/20 code).
    #[default]
    TopK,
    /// `H ≥ quantile(H, 1 − ρ)` with linear interpolation (TRL); may select more on ties.
    Quantile,
}

/// A token mask over a `[B, T]` batch and what built it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkingMask {
    /// Row-major `[B, T]` selection; always a subset of the response mask.
    pub mask: Vec<bool>,
    /// The entropy threshold: the smallest selected entropy for top-k, the interpolated quantile for the quantile rule
    /// (logged as `forking/threshold`). `None` when nothing is selected.
    pub threshold: Option<f32>,
    /// Number of selected tokens.
    pub num_selected: usize,
    /// Number of response tokens considered (`n`).
    pub num_candidates: usize,
}

impl ForkingMask {
    /// `num_selected / num_candidates` (logged as `forking/frac_selected`); 0 for an empty batch.
    pub fn frac_selected(&self) -> f64 {
        if self.num_candidates == 0 { 0.0 } else { self.num_selected as f64 / self.num_candidates as f64 }
    }
}

/// `k = max(1, int(n·ρ + 0.9999))` for `n ≥ 1` (0 for `n = 0`), clamped to `n`: the official code's count
/// (`get_global_entropy_top_mask` in Shenzhi-Wang/Beyond-the-80-20-Rule-RLVR). It is `⌈n·ρ⌉` except when the
/// fractional part of `n·ρ` is below 1e-4, which rounds down — so decimal ratios that are not exact in binary
/// (35 × 0.2 = 7.000000000000001 in f64) give the intended 7, while, as in the official code, 100001 × 1e-5 = 1.00001
/// gives 1, not 2.
pub fn top_k_count(n: usize, rho: f64) -> usize {
    if n == 0 {
        return 0;
    }
    // `as usize` truncates toward zero like Python's `int` (the operand is positive).
    ((n as f64 * rho + 0.9999) as usize).clamp(1, n)
}

fn check_inputs(entropy: &[f32], response_mask: &[bool], rho: f64) -> Result<()> {
    if !(rho > 0.0 && rho <= 1.0) {
        return Err(Error::invalid_parameter("top_entropy_ratio", rho, "must lie in (0, 1]"));
    }
    check_len("forking mask: entropy vs response_mask", entropy.len(), response_mask.len())?;
    check_finite_masked("entropy", entropy, response_mask)
}

/// The batch-global top-ρ entropy mask over the response tokens of a flat (`[B, T]` row-major) batch.
///
/// # Errors
/// [`Error::InvalidParameter`] unless `0 < ρ ≤ 1`; [`Error::ShapeMismatch`] when the arrays differ in length;
/// [`Error::NonFinite`] for a NaN or infinite entropy on a response token (padding values are ignored).
pub fn top_entropy_mask(entropy: &[f32], response_mask: &[bool], rho: f64, rule: SelectionRule) -> Result<ForkingMask> {
    check_inputs(entropy, response_mask, rho)?;
    let candidates: Vec<usize> = (0..entropy.len()).filter(|&i| response_mask[i]).collect();
    let n = candidates.len();
    let mut mask = vec![false; entropy.len()];
    if n == 0 {
        return Ok(ForkingMask { mask, threshold: None, num_selected: 0, num_candidates: 0 });
    }
    match rule {
        SelectionRule::TopK => {
            let k = top_k_count(n, rho);
            let mut order = candidates;
            // Higher entropy first; equal entropies by lower flat index: a total order, so the result is unique.
            let cmp = |a: &usize, b: &usize| entropy[*b].total_cmp(&entropy[*a]).then(a.cmp(b));
            order.select_nth_unstable_by(k - 1, cmp);
            let mut threshold = f32::INFINITY;
            for &i in &order[..k] {
                mask[i] = true;
                threshold = threshold.min(entropy[i]);
            }
            Ok(ForkingMask { mask, threshold: Some(threshold), num_selected: k, num_candidates: n })
        }
        SelectionRule::Quantile => {
            let mut sorted: Vec<f32> = candidates.iter().map(|&i| entropy[i]).collect();
            sorted.sort_by(f32::total_cmp);
            let threshold = linear_quantile(&sorted, 1.0 - rho);
            let mut selected = 0;
            for &i in &candidates {
                if entropy[i] >= threshold {
                    mask[i] = true;
                    selected += 1;
                }
            }
            Ok(ForkingMask { mask, threshold: Some(threshold), num_selected: selected, num_candidates: n })
        }
    }
}

/// The complement of [`top_entropy_mask`] within the response tokens: the "bottom 1 − ρ" tokens of the paper's
/// ablation (training on them alone degrades reasoning, Fig. 7). `threshold` is the top mask's threshold (the bottom
/// set lies below it), kept for logging.
///
/// # Errors
/// As [`top_entropy_mask`].
pub fn bottom_entropy_mask(
    entropy: &[f32],
    response_mask: &[bool],
    rho: f64,
    rule: SelectionRule,
) -> Result<ForkingMask> {
    let top = top_entropy_mask(entropy, response_mask, rho, rule)?;
    let mask: Vec<bool> = top.mask.iter().zip(response_mask).map(|(&t, &m)| m && !t).collect();
    Ok(ForkingMask {
        mask,
        threshold: top.threshold,
        num_selected: top.num_candidates - top.num_selected,
        num_candidates: top.num_candidates,
    })
}

/// A random control set of the top mask's size: exactly [`top_k_count`]`(n, ρ)` response tokens drawn uniformly
/// without replacement (a partial Fisher–Yates shuffle driven by SplitMix64 from `seed`), whatever their entropy. It
/// answers "does entropy matter, or only the number of tokens trained?" (the control arm of the 80/20 experiment; not
/// in the paper). `threshold` is `None`. The draw is a pure function of `(response_mask, ρ, seed)`.
///
/// # Errors
/// [`Error::InvalidParameter`] unless `0 < ρ ≤ 1`.
pub fn random_token_mask(response_mask: &[bool], rho: f64, seed: u64) -> Result<ForkingMask> {
    if !(rho > 0.0 && rho <= 1.0) {
        return Err(Error::invalid_parameter("top_entropy_ratio", rho, "must lie in (0, 1]"));
    }
    let mut candidates: Vec<usize> = (0..response_mask.len()).filter(|&i| response_mask[i]).collect();
    let n = candidates.len();
    let k = top_k_count(n, rho);
    let mut state = seed;
    for i in 0..k {
        state = forkrl_core::numeric::splitmix64(state);
        // Multiply-shift maps the 64-bit draw to 0..n−i without modulo bias worth counting at these sizes.
        let j = i + ((u128::from(state) * (n - i) as u128) >> 64) as usize;
        candidates.swap(i, j);
    }
    let mut mask = vec![false; response_mask.len()];
    for &i in &candidates[..k] {
        mask[i] = true;
    }
    Ok(ForkingMask { mask, threshold: None, num_selected: k, num_candidates: n })
}

/// Which tokens of a batch the policy gradient trains on: the paper's arms and a control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSelection {
    /// The top-ρ highest-entropy tokens (the paper's method, [`top_entropy_mask`]).
    #[default]
    Top,
    /// The bottom 1 − ρ (the paper's ablation, [`bottom_entropy_mask`]).
    Bottom,
    /// ρ of the tokens at random ([`random_token_mask`], a control).
    Random,
    /// Every response token (full-gradient RLVR; ρ is ignored).
    All,
}

impl TokenSelection {
    /// The mask of this arm over a flat `[B, T]` batch. `seed` is used by [`TokenSelection::Random`] only.
    ///
    /// # Errors
    /// As [`top_entropy_mask`] (entropy is checked for the entropy-based arms only).
    pub fn select(
        self,
        entropy: &[f32],
        response_mask: &[bool],
        rho: f64,
        rule: SelectionRule,
        seed: u64,
    ) -> Result<ForkingMask> {
        match self {
            TokenSelection::Top => top_entropy_mask(entropy, response_mask, rho, rule),
            TokenSelection::Bottom => bottom_entropy_mask(entropy, response_mask, rho, rule),
            TokenSelection::Random => random_token_mask(response_mask, rho, seed),
            TokenSelection::All => {
                let n = response_mask.iter().filter(|&&m| m).count();
                Ok(ForkingMask { mask: response_mask.to_vec(), threshold: None, num_selected: n, num_candidates: n })
            }
        }
    }

    /// The name used in metrics and reports (`top`, `bottom`, `random`, `all`).
    pub fn name(self) -> &'static str {
        match self {
            TokenSelection::Top => "top",
            TokenSelection::Bottom => "bottom",
            TokenSelection::Random => "random",
            TokenSelection::All => "all",
        }
    }
}

/// Top-ρ selected independently in each sequence (`k_i =` [`top_k_count`]`(n_i, ρ)` per row; empty rows skipped), with the
/// top-k rule and the same tie-break. `threshold` is `None` (each row has its own).
///
/// # Errors
/// As [`top_entropy_mask`], with the shape taken from `layout`.
pub fn per_sequence_top_entropy_mask(entropy: &[f32], layout: &BatchLayout, rho: f64) -> Result<ForkingMask> {
    layout.check_per_token("per_sequence_top_entropy_mask entropy", entropy.len())?;
    check_inputs(entropy, layout.response_mask(), rho)?;
    let mut mask = vec![false; entropy.len()];
    let mut selected = 0;
    for seq in layout.sequences() {
        let row_h = &entropy[seq.span.clone()];
        let row_m = layout.row_mask(seq.row);
        if !row_m.iter().any(|&m| m) {
            continue;
        }
        let row = top_entropy_mask(row_h, row_m, rho, SelectionRule::TopK)?;
        for (dst, &src) in mask[seq.span.clone()].iter_mut().zip(&row.mask) {
            *dst = src;
        }
        selected += row.num_selected;
    }
    Ok(ForkingMask { mask, threshold: None, num_selected: selected, num_candidates: layout.num_tokens() })
}

/// Quantile of sorted values with linear interpolation (`torch.quantile(..., interpolation="linear")`).
fn linear_quantile(sorted: &[f32], q: f64) -> f32 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    (f64::from(sorted[lo]) + (f64::from(sorted[hi]) - f64::from(sorted[lo])) * frac) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    // test-vectors.md §1.3
    const H: [f32; 10] = [0.01, 2.3, 0.0, 0.7, 1.1, 0.5, 0.5, 3.0, 0.02, 9.9];
    const M: [bool; 10] = [true, true, true, true, true, true, true, true, true, false];

    #[test]
    fn official_rule_on_the_test_vector() {
        let out = top_entropy_mask(&H, &M, 0.2, SelectionRule::TopK).expect("valid");
        assert_eq!(out.num_candidates, 9);
        assert_eq!(out.num_selected, 2);
        let picked: Vec<usize> = (0..10).filter(|&i| out.mask[i]).collect();
        assert_eq!(picked, vec![1, 7]); // (0,1) = 2.3 and (1,2) = 3.0; the masked 9.9 is never picked
        assert_eq!(out.threshold, Some(2.3));
    }

    #[test]
    fn trl_rule_on_the_test_vector() {
        let out = top_entropy_mask(&H, &M, 0.2, SelectionRule::Quantile).expect("valid");
        assert!((out.threshold.expect("non-empty") - 1.58).abs() < 1e-6);
        assert_eq!((0..10).filter(|&i| out.mask[i]).collect::<Vec<_>>(), vec![1, 7]);
    }

    #[test]
    fn random_control_has_the_top_size_stays_in_the_response_and_depends_on_the_seed() {
        let m: Vec<bool> = (0..200).map(|i| i % 3 != 0).collect();
        let a = random_token_mask(&m, 0.2, 7).expect("valid");
        let n = m.iter().filter(|&&b| b).count();
        assert_eq!((a.num_selected, a.num_candidates), (top_k_count(n, 0.2), n));
        assert_eq!(a.mask.iter().filter(|&&b| b).count(), a.num_selected);
        assert!(a.mask.iter().zip(&m).all(|(&s, &r)| !s || r), "padding selected");
        assert_eq!(a, random_token_mask(&m, 0.2, 7).expect("valid"), "a pure function of the seed");
        assert_ne!(a.mask, random_token_mask(&m, 0.2, 8).expect("valid").mask);
        // Every response token is about equally likely over many seeds (a uniform draw, not a prefix).
        let mut hits = vec![0usize; m.len()];
        for seed in 0..400 {
            for (h, &s) in hits.iter_mut().zip(&random_token_mask(&m, 0.2, seed).expect("valid").mask) {
                *h += usize::from(s);
            }
        }
        let (lo, hi) =
            m.iter().zip(&hits).filter(|(r, _)| **r).fold((usize::MAX, 0), |(lo, hi), (_, &h)| (lo.min(h), hi.max(h)));
        assert!(lo > 40 && hi < 130, "per-token counts out of 400 draws at 0.2: {lo}..{hi}");
        assert!(random_token_mask(&m, 0.0, 1).is_err());
        assert_eq!(random_token_mask(&[], 0.2, 1).expect("empty").num_selected, 0);
    }

    #[test]
    fn selection_arms_partition_and_all_takes_every_token() {
        let top = TokenSelection::Top.select(&H, &M, 0.2, SelectionRule::TopK, 0).expect("valid");
        let bottom = TokenSelection::Bottom.select(&H, &M, 0.2, SelectionRule::TopK, 0).expect("valid");
        let all = TokenSelection::All.select(&H, &M, 0.2, SelectionRule::TopK, 0).expect("valid");
        for i in 0..H.len() {
            assert_eq!(top.mask[i] || bottom.mask[i], M[i]);
            assert!(!(top.mask[i] && bottom.mask[i]));
        }
        assert_eq!(all.mask, M.to_vec());
        assert_eq!(all.frac_selected(), 1.0);
    }

    #[test]
    fn k_is_the_official_count() {
        let official = |n: usize, rho: f64| ((n as f64 * rho + 0.9999) as usize).max(1);
        assert_eq!(top_k_count(100_001, 1e-5), official(100_001, 1e-5));
        assert_eq!(top_k_count(100_001, 1e-5), 1, "a fractional part below 1e-4 rounds down, as int(n·ρ + 0.9999)");
        assert_eq!(top_k_count(10_001, 0.2), 2001);
        assert_eq!(top_k_count(9, 0.2), 2);
        assert_eq!(top_k_count(35, 0.2), 7);
        assert_eq!(top_k_count(36, 0.2), 8);
        assert_eq!(top_k_count(3, 0.1), 1);
        assert_eq!(top_k_count(10, 1.0), 10);
        assert_eq!(top_k_count(0, 0.2), 0);
    }

    #[test]
    fn ties_break_by_lowest_flat_index_and_quantile_takes_all_ties() {
        let h = [1.0f32; 6];
        let m = [true; 6];
        let top = top_entropy_mask(&h, &m, 0.5, SelectionRule::TopK).expect("valid");
        assert_eq!(top.mask, vec![true, true, true, false, false, false]);
        let q = top_entropy_mask(&h, &m, 0.5, SelectionRule::Quantile).expect("valid");
        assert_eq!(q.num_selected, 6);
    }

    #[test]
    fn empty_and_bad_inputs() {
        let out = top_entropy_mask(&[1.0, 2.0], &[false, false], 0.2, SelectionRule::TopK).expect("empty is fine");
        assert_eq!((out.num_selected, out.threshold, out.frac_selected()), (0, None, 0.0));
        assert!(top_entropy_mask(&[], &[], 0.2, SelectionRule::Quantile).expect("empty").mask.is_empty());
        for rho in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(matches!(
                top_entropy_mask(&[1.0], &[true], rho, SelectionRule::TopK),
                Err(Error::InvalidParameter { name: "top_entropy_ratio", .. })
            ));
        }
        assert!(matches!(
            top_entropy_mask(&[1.0], &[true, true], 0.2, SelectionRule::TopK),
            Err(Error::ShapeMismatch { .. })
        ));
        let err = top_entropy_mask(&[1.0, f32::NAN], &[true, true], 0.2, SelectionRule::TopK).expect_err("NaN");
        assert!(matches!(err, Error::NonFinite { ref position, .. } if position == &vec![1]));
        // NaN on padding is ignored.
        assert!(top_entropy_mask(&[1.0, f32::NAN], &[true, false], 0.2, SelectionRule::TopK).is_ok());
    }

    #[test]
    fn bottom_is_the_complement_and_per_sequence_selects_per_row() {
        let bottom = bottom_entropy_mask(&H, &M, 0.2, SelectionRule::TopK).expect("valid");
        assert_eq!(bottom.num_selected, 7);
        assert!(!bottom.mask[1] && !bottom.mask[7] && !bottom.mask[9] && bottom.mask[0]);
        let layout = BatchLayout::new(&[2], &[5, 4], 5, M.to_vec()).expect("valid");
        let per_seq = per_sequence_top_entropy_mask(&H, &layout, 0.2).expect("valid");
        // Row 0: k = ⌈5·0.2⌉ = 1 → 2.3; row 1: k = ⌈4·0.2⌉ = 1 → 3.0.
        assert_eq!((0..10).filter(|&i| per_seq.mask[i]).collect::<Vec<_>>(), vec![1, 7]);
        assert_eq!(per_seq.num_selected, 2);
    }
}
