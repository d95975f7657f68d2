//! Cancellation analysis: how much token-level credit cancels within a group ("The Cancellation Hypothesis in
//! Critic-Free RL: From Outcome Rewards to Token Credits", arXiv 2605.08666).
//!
//! GRPO broadcasts each response's advantage to all its tokens. A token id that occurs in both correct and wrong
//! responses to the same prompt receives opposite credits that cancel in the summed gradient. For each token id `v`
//! and group `g`, with `A_{i,t}` the per-token advantage:
//!
//! ```text
//! net_g(v) = Σ_{(i,t) ∈ g : o_{i,t} = v} A_{i,t}        abs(v) = Σ_g Σ_{(i,t) ∈ g : o_{i,t} = v} |A_{i,t}|
//! surviving(v) = Σ_g |net_g(v)|                          cancelled(v) = abs(v) − surviving(v) ≥ 0
//! ```
//!
//! The batch's cancelled fraction is `Σ_v cancelled(v) / Σ_v abs(v)`. RECONSTRUCTION: the paper's mechanism section
//! is summarised, not quoted, in the method notes (token-credit.md §6.2); this is the library's definition of the
//! diagnostic, with the group (prompt) as the cancellation scope.

use std::collections::HashMap;

use forkrl_core::{BatchLayout, Error, Result};
use serde::{Deserialize, Serialize};

/// Credit of one token id over the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenCredit {
    /// Vocabulary id.
    pub id: u32,
    /// Occurrences as a loss token.
    pub occurrences: u64,
    /// `Σ_g net_g` (signed).
    pub net: f64,
    /// `Σ |A|` over the occurrences.
    pub abs: f64,
    /// `abs − Σ_g |net_g|`: credit that cancels within groups.
    pub cancelled: f64,
}

/// The batch's cancellation report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancellationReport {
    /// Per token id, sorted by id.
    pub per_token: Vec<TokenCredit>,
    /// `Σ cancelled / Σ abs` (0 when every advantage is 0).
    pub cancelled_fraction: f64,
    /// Ids with the largest positive net credit (up to `top_k`, ties by lower id).
    pub top_net_positive: Vec<u32>,
    /// Ids with the most negative net credit.
    pub top_net_negative: Vec<u32>,
}

/// Computes the cancellation report of a batch.
///
/// `token_ids` and `advantages` are `[B, T]` arrays in the layout of `layout` (per-token advantages, e.g. sequence
/// advantages broadcast with [`BatchLayout::broadcast_to_tokens`]).
///
/// # Errors
/// [`Error::ShapeMismatch`] when an array is not `[B, T]`; [`Error::NonFinite`] for a non-finite advantage on a loss
/// token.
pub fn cancellation_analysis(
    layout: &BatchLayout,
    token_ids: &[u32],
    advantages: &[f32],
    top_k: usize,
) -> Result<CancellationReport> {
    layout.check_per_token("cancellation_analysis token_ids", token_ids.len())?;
    layout.check_per_token("cancellation_analysis advantages", advantages.len())?;
    if let Some(i) = layout.token_indices().find(|&i| !advantages[i].is_finite()) {
        let t = layout.max_len();
        return Err(Error::NonFinite {
            what: "advantages",
            position: vec![i / t, i % t],
            value: f64::from(advantages[i]),
        });
    }
    let t = layout.max_len();
    let mut totals: HashMap<u32, TokenCredit> = HashMap::new();
    for group in layout.groups() {
        let mut net_g: HashMap<u32, f64> = HashMap::new();
        for row in group.rows.clone() {
            for (col, &m) in layout.row_mask(row).iter().enumerate() {
                if !m {
                    continue;
                }
                let (id, a) = (token_ids[row * t + col], f64::from(advantages[row * t + col]));
                *net_g.entry(id).or_insert(0.0) += a;
                let e =
                    totals.entry(id).or_insert(TokenCredit { id, occurrences: 0, net: 0.0, abs: 0.0, cancelled: 0.0 });
                e.occurrences += 1;
                e.abs += a.abs();
            }
        }
        for (id, net) in net_g {
            if let Some(e) = totals.get_mut(&id) {
                e.net += net;
                e.cancelled -= net.abs(); // becomes abs − Σ_g |net_g| below
            }
        }
    }
    let mut per_token: Vec<TokenCredit> = totals.into_values().collect();
    for e in &mut per_token {
        // Guard the rounding of abs − Σ|net| (mathematically ≥ 0).
        e.cancelled = (e.abs + e.cancelled).max(0.0);
    }
    per_token.sort_by_key(|e| e.id);
    let abs: f64 = per_token.iter().map(|e| e.abs).sum();
    let cancelled: f64 = per_token.iter().map(|e| e.cancelled).sum();
    let pick = |positive: bool| {
        let mut ids: Vec<&TokenCredit> =
            per_token.iter().filter(|e| if positive { e.net > 0.0 } else { e.net < 0.0 }).collect();
        ids.sort_by(|a, b| {
            let order = if positive { b.net.total_cmp(&a.net) } else { a.net.total_cmp(&b.net) };
            order.then(a.id.cmp(&b.id))
        });
        ids.into_iter().take(top_k).map(|e| e.id).collect::<Vec<_>>()
    };
    Ok(CancellationReport {
        top_net_positive: pick(true),
        top_net_negative: pick(false),
        cancelled_fraction: if abs > 0.0 { cancelled / abs } else { 0.0 },
        per_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        // Group 0: a correct response [5, 7] (A = +1) and a wrong one [5, 8] (A = −1): token 5 cancels completely.
        // Group 1: one response [5, 9] (A = +0.5): nothing cancels.
        let layout = BatchLayout::from_lengths(&[2, 1], &[2, 2, 2], 3).expect("valid");
        let ids = [5, 7, 0, 5, 8, 0, 5, 9, 0];
        let adv = layout.broadcast_to_tokens(&[1.0f32, -1.0, 0.5], 0.0).expect("B entries");
        let r = cancellation_analysis(&layout, &ids, &adv, 2).expect("valid");
        let five = r.per_token.iter().find(|e| e.id == 5).expect("token 5");
        assert_eq!((five.occurrences, five.net, five.abs, five.cancelled), (3, 0.5, 2.5, 2.0));
        // Σ abs = 2.5 (5) + 1 (7) + 1 (8) + 0.5 (9) = 5; Σ cancelled = 2.
        assert!((r.cancelled_fraction - 0.4).abs() < 1e-12);
        assert_eq!(r.top_net_positive, vec![7, 5]);
        assert_eq!(r.top_net_negative, vec![8]);
    }

    #[test]
    fn zero_advantages_and_bad_input() {
        let layout = BatchLayout::from_lengths(&[2], &[1, 0], 2).expect("valid");
        let r = cancellation_analysis(&layout, &[1, 0, 0, 0], &[0.0; 4], 3).expect("valid");
        assert_eq!(r.cancelled_fraction, 0.0);
        assert!(cancellation_analysis(&layout, &[1, 0, 0], &[0.0; 4], 3).is_err());
        assert!(matches!(
            cancellation_analysis(&layout, &[1, 0, 0, 0], &[f32::NAN, 0.0, 0.0, 0.0], 3),
            Err(Error::NonFinite { ref position, .. }) if position == &vec![0, 0]
        ));
        // NaN on padding is ignored.
        assert!(cancellation_analysis(&layout, &[1, 0, 0, 0], &[0.0, f32::NAN, 0.0, 0.0], 3).is_ok());
    }
}
