//! Applying the 80/20 forking-token mask to the loss — "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
//! Effective Reinforcement Learning for LLM Reasoning" (arXiv 2506.01939).
//!
//! The mask (from [`forkrl_entropy::top_entropy_mask`]) is folded into the loss mask. Two denominators exist
//! (`../shared/methods/aggregation-and-holder.md` §1.5; methods README decision 10):
//!
//! ```text
//! Selected  (paper v2, official code; default)   token-mean = Σ_{selected} L / #selected
//! AllTokens (paper v1, TRL)                      token-mean = Σ_{selected} L / #response tokens
//! ```
//!
//! They differ by `n/k ≈ 1/ρ`. For `seq-mean-token-mean`, `AllTokens` divides each sequence's selected sum by its full
//! response length ([`crate::aggregate_with_counts`]). The returned denominators count this batch; for several
//! micro-batches or ranks, [`GlobalDenominators::merge`] the counts of all of them first.

use forkrl_core::{Result, numeric::check_len};
use forkrl_entropy::ForkingMask;
use serde::{Deserialize, Serialize};

use crate::aggregation::GlobalDenominators;

/// Which token count the forking-masked loss is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkingDenominator {
    /// Number of selected tokens (paper v2, official code).
    #[default]
    Selected,
    /// Number of response tokens (paper v1, TRL); `all` is accepted too.
    #[serde(alias = "all")]
    AllTokens,
}

/// The loss mask, the count mask and the denominators of a forking-masked loss.
#[derive(Debug, Clone, PartialEq)]
pub struct ForkingLossMask {
    /// Numerator mask: selected response tokens.
    pub loss_mask: Vec<bool>,
    /// Mask whose per-sequence counts divide `seq-mean-token-mean`.
    pub count_mask: Vec<bool>,
    /// Token and sequence counts for the aggregation (dp_size 1; set it and merge counts for distributed runs).
    pub denominators: GlobalDenominators,
}

/// Folds a forking mask into the loss mask of a row-major `[B, width]` batch.
///
/// # Errors
/// [`forkrl_core::Error::ShapeMismatch`] when the masks differ in length or are not `[B, width]`.
pub fn forking_loss_mask(
    response_mask: &[bool],
    forking: &ForkingMask,
    width: usize,
    denominator: ForkingDenominator,
) -> Result<ForkingLossMask> {
    check_len("forking_loss_mask: forking mask vs response mask", forking.mask.len(), response_mask.len())?;
    let loss_mask: Vec<bool> = forking.mask.iter().zip(response_mask).map(|(&s, &m)| s && m).collect();
    let (count_mask, denominators) = match denominator {
        ForkingDenominator::Selected => (loss_mask.clone(), GlobalDenominators::from_mask(&loss_mask, width)?),
        ForkingDenominator::AllTokens => (response_mask.to_vec(), GlobalDenominators::from_mask(response_mask, width)?),
    };
    Ok(ForkingLossMask { loss_mask, count_mask, denominators })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AggMode, aggregate_host_with_counts};
    use forkrl_entropy::{SelectionRule, top_entropy_mask};

    #[test]
    fn test_vector_2c_forking_denominators() {
        let h = [0.01f32, 2.3, 0.0, 0.7, 1.1, 0.5, 0.5, 3.0, 0.02, 9.9];
        let m = [true, true, true, true, true, true, true, true, true, false];
        let loss: Vec<f32> = (1..=10).map(|i| i as f32 / 10.0).collect();
        let f = top_entropy_mask(&h, &m, 0.2, SelectionRule::TopK).expect("valid");
        let sel = forking_loss_mask(&m, &f, 5, ForkingDenominator::Selected).expect("valid");
        let all = forking_loss_mask(&m, &f, 5, ForkingDenominator::AllTokens).expect("valid");
        let agg = |x: &ForkingLossMask| {
            aggregate_host_with_counts(&loss, &x.loss_mask, &x.count_mask, 5, AggMode::TokenMean, &x.denominators)
                .expect("valid")
        };
        assert!((agg(&sel) - 0.5).abs() < 1e-7, "{}", agg(&sel));
        assert!((agg(&all) - 0.111111).abs() < 1e-6, "{}", agg(&all));
        assert!((agg(&sel) / agg(&all) - 4.5).abs() < 1e-5);
        // ρ = 1 selects every token: plain token-mean.
        let every = top_entropy_mask(&h, &m, 1.0, SelectionRule::TopK).expect("valid");
        let every = forking_loss_mask(&m, &every, 5, ForkingDenominator::Selected).expect("valid");
        let plain = GlobalDenominators::from_mask(&m, 5).expect("valid");
        let reference = crate::aggregate_host(&loss, &m, 5, AggMode::TokenMean, &plain).expect("valid");
        assert!((agg(&every) - reference).abs() < 1e-12);
    }
}
