//! Properties of the forking-token masks.

use forkrl_entropy::{SelectionRule, bottom_entropy_mask, top_entropy_mask, top_k_count};
use proptest::prelude::*;

fn batch() -> impl Strategy<Value = (Vec<f32>, Vec<bool>)> {
    // Entropies on a coarse grid so that ties are frequent.
    prop::collection::vec(((0u8..8).prop_map(|q| f32::from(q) * 0.25), any::<bool>()), 0..200)
        .prop_map(|v| v.into_iter().unzip())
}

proptest! {
    #[test]
    fn top_k_selects_exactly_k_of_the_highest((h, m) in batch(), rho in 0.01f64..=1.0) {
        let out = top_entropy_mask(&h, &m, rho, SelectionRule::TopK).expect("valid");
        let n = m.iter().filter(|&&b| b).count();
        prop_assert_eq!(out.num_candidates, n);
        prop_assert_eq!(out.num_selected, top_k_count(n, rho));
        prop_assert_eq!(out.mask.iter().filter(|&&b| b).count(), out.num_selected);
        for i in 0..h.len() {
            prop_assert!(!out.mask[i] || m[i], "padding selected");
            for j in 0..h.len() {
                if out.mask[i] && m[j] && !out.mask[j] {
                    // Every selected token beats every unselected one, or ties it with a lower index.
                    prop_assert!(h[i] > h[j] || (h[i] == h[j] && i < j));
                }
            }
        }
    }

    #[test]
    fn quantile_rule_selects_at_least_top_k_minus_ties((h, m) in batch(), rho in 0.01f64..=1.0) {
        let q = top_entropy_mask(&h, &m, rho, SelectionRule::Quantile).expect("valid");
        if let Some(thr) = q.threshold {
            for i in 0..h.len() {
                prop_assert_eq!(q.mask[i], m[i] && h[i] >= thr);
            }
            prop_assert!(q.num_selected >= 1);
        } else {
            prop_assert_eq!(q.num_selected, 0);
        }
    }

    #[test]
    fn top_and_bottom_partition_the_response_tokens((h, m) in batch(), rho in 0.01f64..=1.0) {
        let top = top_entropy_mask(&h, &m, rho, SelectionRule::TopK).expect("valid");
        let bottom = bottom_entropy_mask(&h, &m, rho, SelectionRule::TopK).expect("valid");
        for i in 0..h.len() {
            prop_assert_eq!(top.mask[i] || bottom.mask[i], m[i]);
            prop_assert!(!(top.mask[i] && bottom.mask[i]));
        }
    }

    #[test]
    fn rho_one_selects_every_response_token((h, m) in batch()) {
        let out = top_entropy_mask(&h, &m, 1.0, SelectionRule::TopK).expect("valid");
        prop_assert_eq!(out.mask, m);
    }
}
