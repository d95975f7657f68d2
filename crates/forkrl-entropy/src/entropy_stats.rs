//! Entropy statistics and dynamics: the analyses of §3–4 of "Beyond the 80/20 Rule" (Wang et al., arXiv 2506.01939)
//! as a library.
//!
//! - [`summarize`]: mean, max, percentiles (p50/p80/p90/p95/p99, linear interpolation as numpy), the fraction of tokens
//!   below thresholds, and a log-spaced histogram. The paper reports for Qwen3-8B that 50.64 % of tokens have
//!   `H < 1e-2` and that the 80th percentile is 0.672.
//! - [`token_entropy_table`] and [`top_high_entropy_tokens`]: per token-id frequency and mean entropy, and the frequent
//!   high-entropy tokens ("wait", "however", "suppose", ...) decoded through a caller-supplied function.
//! - [`top_entropy_overlap`]: overlap of the top-ρ entropy positions of two models on the same tokens (Table 1).
//! - [`entropy_change_by_base_percentile`]: entropy change after training, binned by the base model's entropy
//!   percentile (Fig. 4: higher-entropy tokens gain more).
//!
//! Every function reduces over exactly the loss tokens (`response_mask`); padding never counts. Results are serde
//! structs so the trainer can write them to JSON.

use std::collections::HashMap;

use forkrl_core::{
    Error, Result,
    numeric::{check_finite_masked, check_len},
};
use serde::{Deserialize, Serialize};

use crate::{SelectionRule, top_entropy_mask};

/// Percentiles reported by [`summarize`].
pub const PERCENTILES: [f64; 5] = [50.0, 80.0, 90.0, 95.0, 99.0];

/// A log-spaced histogram with underflow and overflow counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogHistogram {
    /// `bins + 1` edges, log-spaced from `lo` to `hi`.
    pub edges: Vec<f64>,
    /// Count of values in `[edges[i], edges[i + 1])` (the last bin includes `hi`).
    pub counts: Vec<u64>,
    /// Values below `lo` (zero entropies land here).
    pub underflow: u64,
    /// Values above `hi`.
    pub overflow: u64,
}

/// Summary of the entropies of the loss tokens of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntropySummary {
    /// Number of loss tokens.
    pub count: usize,
    /// Mean entropy (0 for an empty batch).
    pub mean: f64,
    /// Largest entropy (0 for an empty batch).
    pub max: f64,
    /// `(percentile, value)` for each of [`PERCENTILES`]; empty for an empty batch.
    pub percentiles: Vec<(f64, f64)>,
    /// `(threshold, fraction of tokens with H < threshold)` for each requested threshold.
    pub frac_below: Vec<(f64, f64)>,
    /// Log-spaced histogram of the entropies.
    pub histogram: LogHistogram,
}

/// Options of [`summarize`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryOptions {
    /// Thresholds for `frac_below` (the paper's is 1e-2).
    pub thresholds: Vec<f64>,
    /// Histogram range and bin count (log-spaced).
    pub hist_lo: f64,
    /// Upper end of the histogram range.
    pub hist_hi: f64,
    /// Number of histogram bins.
    pub hist_bins: usize,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        Self { thresholds: vec![1e-3, 1e-2, 0.1, 0.672], hist_lo: 1e-4, hist_hi: 20.0, hist_bins: 40 }
    }
}

/// The entropies of the loss tokens, validated finite.
fn masked_values(entropy: &[f32], response_mask: &[bool]) -> Result<Vec<f64>> {
    check_len("entropy statistics: entropy vs response_mask", entropy.len(), response_mask.len())?;
    check_finite_masked("entropy", entropy, response_mask)?;
    Ok(entropy.iter().zip(response_mask).filter(|(_, m)| **m).map(|(&h, _)| f64::from(h)).collect())
}

/// Percentile `q ∈ [0, 100]` of sorted values with linear interpolation (numpy's default).
pub fn percentile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let pos = (q / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

/// Summarises the entropies of the loss tokens.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays differ in length; [`Error::NonFinite`] for a non-finite entropy on a loss
/// token; [`Error::InvalidParameter`] for a histogram range that is not `0 < lo < hi` or zero bins.
pub fn summarize(entropy: &[f32], response_mask: &[bool], options: &SummaryOptions) -> Result<EntropySummary> {
    if !(options.hist_lo > 0.0 && options.hist_hi > options.hist_lo) {
        return Err(Error::invalid_parameter("hist_lo", options.hist_lo, "need 0 < hist_lo < hist_hi"));
    }
    if options.hist_bins == 0 {
        return Err(Error::invalid_parameter("hist_bins", 0, "must be at least 1"));
    }
    let mut values = masked_values(entropy, response_mask)?;
    values.sort_by(f64::total_cmp);
    let count = values.len();
    let mean = if count == 0 { 0.0 } else { values.iter().sum::<f64>() / count as f64 };
    let max = values.last().copied().unwrap_or(0.0);
    let percentiles =
        PERCENTILES.iter().filter_map(|&q| percentile_sorted(&values, q).map(|v| (q, v))).collect::<Vec<_>>();
    let frac_below = options
        .thresholds
        .iter()
        .map(|&t| {
            let below = values.partition_point(|&v| v < t);
            (t, if count == 0 { 0.0 } else { below as f64 / count as f64 })
        })
        .collect();

    let (lo, hi, bins) = (options.hist_lo, options.hist_hi, options.hist_bins);
    let step = (hi / lo).ln() / bins as f64;
    let edges: Vec<f64> = (0..=bins).map(|i| lo * (step * i as f64).exp()).collect();
    let mut histogram = LogHistogram { edges, counts: vec![0; bins], underflow: 0, overflow: 0 };
    for &v in &values {
        if v < lo {
            histogram.underflow += 1;
        } else if v > hi {
            histogram.overflow += 1;
        } else {
            let bin = (((v / lo).ln() / step) as usize).min(bins - 1);
            histogram.counts[bin] += 1;
        }
    }
    Ok(EntropySummary { count, mean, max, percentiles, frac_below, histogram })
}

/// Frequency and mean entropy of one token id over the loss tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEntropy {
    /// Vocabulary id.
    pub id: u32,
    /// Occurrences as a loss token.
    pub count: u64,
    /// Mean entropy of the distributions from which it was sampled.
    pub mean_entropy: f64,
    /// Decoded text, when filled by [`top_high_entropy_tokens`].
    pub text: Option<String>,
}

/// Per token-id frequency and mean entropy over the loss tokens, sorted by id.
///
/// # Errors
/// As [`summarize`], plus [`Error::ShapeMismatch`] when `token_ids` differs in length.
pub fn token_entropy_table(token_ids: &[u32], entropy: &[f32], response_mask: &[bool]) -> Result<Vec<TokenEntropy>> {
    check_len("token_entropy_table: token_ids vs entropy", token_ids.len(), entropy.len())?;
    check_finite_masked("entropy", entropy, response_mask)?;
    let mut acc: HashMap<u32, (u64, f64)> = HashMap::new();
    for ((&id, &h), &m) in token_ids.iter().zip(entropy).zip(response_mask) {
        if m {
            let e = acc.entry(id).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += f64::from(h);
        }
    }
    let mut table: Vec<TokenEntropy> = acc
        .into_iter()
        .map(|(id, (count, sum))| TokenEntropy { id, count, mean_entropy: sum / count as f64, text: None })
        .collect();
    table.sort_by_key(|t| t.id);
    Ok(table)
}

/// The `k` token ids with the highest mean entropy among those seen more than `min_count` times (the paper uses 100),
/// ties by higher count then lower id, each decoded by `decode`.
pub fn top_high_entropy_tokens(
    table: &[TokenEntropy],
    min_count: u64,
    k: usize,
    decode: impl Fn(u32) -> String,
) -> Vec<TokenEntropy> {
    let mut frequent: Vec<&TokenEntropy> = table.iter().filter(|t| t.count > min_count).collect();
    frequent
        .sort_by(|a, b| b.mean_entropy.total_cmp(&a.mean_entropy).then(b.count.cmp(&a.count)).then(a.id.cmp(&b.id)));
    frequent.into_iter().take(k).map(|t| TokenEntropy { text: Some(decode(t.id)), ..t.clone() }).collect()
}

/// Fraction of model A's top-ρ entropy positions that are also among model B's (both on the same tokens, same mask,
/// exact top-k): the overlap of the paper's Table 1. 1.0 for an empty batch (nothing to disagree on).
///
/// # Errors
/// As [`top_entropy_mask`]; [`Error::ShapeMismatch`] when the two entropy arrays differ in length.
pub fn top_entropy_overlap(entropy_a: &[f32], entropy_b: &[f32], response_mask: &[bool], rho: f64) -> Result<f64> {
    check_len("top_entropy_overlap: entropy_b vs entropy_a", entropy_b.len(), entropy_a.len())?;
    let a = top_entropy_mask(entropy_a, response_mask, rho, SelectionRule::TopK)?;
    let b = top_entropy_mask(entropy_b, response_mask, rho, SelectionRule::TopK)?;
    if a.num_selected == 0 {
        return Ok(1.0);
    }
    let both = a.mask.iter().zip(&b.mask).filter(|(x, y)| **x && **y).count();
    Ok(both as f64 / a.num_selected as f64)
}

/// One bin of [`entropy_change_by_base_percentile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntropyChangeBin {
    /// Lower percentile of the base entropy (inclusive).
    pub lo_percentile: f64,
    /// Upper percentile (exclusive, inclusive for the last bin).
    pub hi_percentile: f64,
    /// Tokens in the bin.
    pub count: usize,
    /// Mean base entropy of the bin.
    pub mean_base: f64,
    /// Mean of `H_new − H_base` over the bin.
    pub mean_change: f64,
}

/// Entropy change after training binned by the base model's entropy percentile (paper Fig. 4). Tokens are ranked by
/// base entropy (ties by flat index) and cut into `bins` equal-count bins.
///
/// # Errors
/// As [`summarize`]; [`Error::InvalidParameter`] for `bins == 0`.
pub fn entropy_change_by_base_percentile(
    base: &[f32],
    trained: &[f32],
    response_mask: &[bool],
    bins: usize,
) -> Result<Vec<EntropyChangeBin>> {
    if bins == 0 {
        return Err(Error::invalid_parameter("bins", 0, "must be at least 1"));
    }
    let b = masked_values(base, response_mask)?;
    let t = masked_values(trained, response_mask)?;
    check_len("entropy_change_by_base_percentile: trained vs base", trained.len(), base.len())?;
    let mut order: Vec<usize> = (0..b.len()).collect();
    order.sort_by(|&i, &j| b[i].total_cmp(&b[j]).then(i.cmp(&j)));
    let n = order.len();
    Ok((0..bins)
        .map(|k| {
            let (start, end) = (k * n / bins, (k + 1) * n / bins);
            let members = &order[start..end];
            let count = members.len();
            let mean = |f: &dyn Fn(usize) -> f64| {
                if count == 0 { 0.0 } else { members.iter().map(|&i| f(i)).sum::<f64>() / count as f64 }
            };
            EntropyChangeBin {
                lo_percentile: 100.0 * k as f64 / bins as f64,
                hi_percentile: 100.0 * (k + 1) as f64 / bins as f64,
                count,
                mean_base: mean(&|i| b[i]),
                mean_change: mean(&|i| t[i] - b[i]),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_by_hand() {
        // Loss tokens: 0.0, 0.005, 0.5, 1.0, 2.0 (the 9.0 is padding).
        let h = [0.0f32, 0.005, 0.5, 9.0, 1.0, 2.0];
        let m = [true, true, true, false, true, true];
        let s = summarize(&h, &m, &SummaryOptions::default()).expect("valid");
        assert_eq!(s.count, 5);
        assert!((s.mean - 3.505 / 5.0).abs() < 1e-6);
        assert_eq!(s.max, 2.0);
        // numpy.percentile([0, .005, .5, 1, 2], 80) = 1 + 0.2·(2 − 1) = 1.2
        let p80 = s.percentiles.iter().find(|(q, _)| *q == 80.0).expect("p80").1;
        assert!((p80 - 1.2).abs() < 1e-6);
        let below_1e2 = s.frac_below.iter().find(|(t, _)| *t == 1e-2).expect("1e-2").1;
        assert!((below_1e2 - 0.4).abs() < 1e-12);
        assert_eq!(s.histogram.underflow, 1); // the exact zero
        assert_eq!(s.histogram.counts.iter().sum::<u64>() + s.histogram.underflow + s.histogram.overflow, 5);
    }

    #[test]
    fn empty_batches_do_not_produce_nan() {
        let s = summarize(&[1.0], &[false], &SummaryOptions::default()).expect("valid");
        assert_eq!((s.count, s.mean, s.max), (0, 0.0, 0.0));
        assert!(s.percentiles.is_empty());
        assert!(s.frac_below.iter().all(|(_, f)| *f == 0.0));
        assert_eq!(top_entropy_overlap(&[1.0], &[2.0], &[false], 0.2).expect("valid"), 1.0);
        let bins = entropy_change_by_base_percentile(&[1.0], &[2.0], &[false], 4).expect("valid");
        assert!(bins.iter().all(|b| b.count == 0 && b.mean_change == 0.0));
    }

    #[test]
    fn bad_input_is_typed() {
        assert!(matches!(
            summarize(&[1.0], &[true, true], &SummaryOptions::default()),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(summarize(&[f32::NAN], &[true], &SummaryOptions::default()), Err(Error::NonFinite { .. })));
        let bad = SummaryOptions { hist_lo: 0.0, ..SummaryOptions::default() };
        assert!(matches!(summarize(&[1.0], &[true], &bad), Err(Error::InvalidParameter { .. })));
        assert!(token_entropy_table(&[1], &[1.0, 2.0], &[true, true]).is_err());
        assert!(entropy_change_by_base_percentile(&[1.0], &[1.0], &[true], 0).is_err());
    }

    #[test]
    fn token_table_and_top_tokens() {
        let ids = [7u32, 3, 7, 3, 9, 7];
        let h = [2.0f32, 0.1, 1.0, 0.3, 5.0, 3.0];
        let m = [true, true, true, true, false, true];
        let table = token_entropy_table(&ids, &h, &m).expect("valid");
        assert_eq!(table.len(), 2); // id 9 only on padding
        assert_eq!((table[0].id, table[0].count), (3, 2));
        assert!((table[0].mean_entropy - 0.2).abs() < 1e-6);
        assert!((table[1].mean_entropy - 2.0).abs() < 1e-6);
        let top = top_high_entropy_tokens(&table, 1, 1, |id| format!("tok{id}"));
        assert_eq!(top.len(), 1);
        assert_eq!((top[0].id, top[0].text.as_deref()), (7, Some("tok7")));
    }

    #[test]
    fn overlap_and_change_bins() {
        let a = [0.1f32, 3.0, 0.2, 2.0, 0.3];
        let b = [0.1f32, 3.0, 2.5, 0.0, 0.3];
        let m = [true; 5];
        // ρ = 0.4 → k = 2: A = {1, 3}, B = {1, 2} → overlap 1/2.
        assert_eq!(top_entropy_overlap(&a, &b, &m, 0.4).expect("valid"), 0.5);
        assert_eq!(top_entropy_overlap(&a, &a, &m, 0.4).expect("valid"), 1.0);
        let bins = entropy_change_by_base_percentile(&a, &b, &m, 2).expect("valid");
        // Ranked by base: 0.1, 0.2 | 0.3, 2.0, 3.0 → changes 0, 2.3 | 0, −2, 0.
        assert_eq!((bins[0].count, bins[1].count), (2, 3));
        assert!((bins[0].mean_change - 2.3 / 2.0).abs() < 1e-6);
        assert!((bins[1].mean_change - (-2.0 / 3.0)).abs() < 1e-6);
    }
}
