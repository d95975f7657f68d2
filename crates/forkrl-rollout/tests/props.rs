//! Property tests: HORA's greedy allocation is optimal (brute force on small instances), hit utility is concave and
//! bounded, the CUTS candidate set is always a subset of the top-K with p ≥ δ, and Mixed-CUTS advantages are one GRPO
//! advantage over the combined group (test vector 2.K).

use forkrl_advantage::{AdvantageConfig, group_advantages};
use forkrl_rollout::{BetaPosterior, CutsConfig, Decoding, decode, hora_allocate, token_rng};
use proptest::prelude::*;

fn best_by_brute_force(p: &[BetaPosterior], budget: usize, min: usize, max: usize) -> f64 {
    fn rec(p: &[BetaPosterior], left: usize, min: usize, max: usize) -> f64 {
        match p.split_first() {
            None => {
                if left == 0 {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            }
            Some((first, rest)) => (min..=max.min(left))
                .map(|m| first.hit_utility(m) + rec(rest, left - m, min, max))
                .fold(f64::NEG_INFINITY, f64::max),
        }
    }
    rec(p, budget, min, max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn greedy_allocation_is_optimal(
        counts in prop::collection::vec((0u32..12, 0u32..12), 1..5),
        min in 0usize..3,
        extra in 0usize..9,
        span in 1usize..6,
    ) {
        let p: Vec<BetaPosterior> = counts.iter().map(|&(s, f)| BetaPosterior::from_counts(f64::from(s), f64::from(f), 1.0, 1.0).expect("valid")).collect();
        let max = min + span;
        let budget = (p.len() * min + extra).min(p.len() * max);
        let a = hora_allocate(&p, budget, min, max).expect("valid");
        prop_assert_eq!(a.counts.iter().sum::<usize>() + a.unallocated, budget);
        prop_assert!(a.counts.iter().all(|&m| (min..=max).contains(&m)));
        let best = best_by_brute_force(&p, budget, min, max);
        prop_assert!((a.expected_hits - best).abs() < 1e-9, "greedy {} vs optimum {}", a.expected_hits, best);
    }

    #[test]
    fn hit_utility_is_increasing_concave_and_bounded(s in 0.0f64..1e4, f in 0.0f64..1e4, m in 0usize..200) {
        let p = BetaPosterior::from_counts(s, f, 1.0, 1.0).expect("valid");
        let (u0, u1, u2) = (p.hit_utility(m), p.hit_utility(m + 1), p.hit_utility(m + 2));
        prop_assert!((0.0..=1.0).contains(&u0) && u1 >= u0 && u1 - u0 + 1e-15 >= u2 - u1);
    }

    #[test]
    fn cuts_draws_from_its_candidate_set(logits in prop::collection::vec(-4.0f32..4.0, 2..40), seed in any::<u64>(), k in 1usize..8, delta in 0.005f64..0.5) {
        let op = Decoding::Cuts(CutsConfig { k, delta, ..CutsConfig::default() });
        let s = decode(&logits, &op, 10, None, &mut token_rng(seed, 0, 0)).expect("valid");
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
        let p = |i: usize| f64::from(logits[i] - max).exp() / z;
        let rank = logits.iter().filter(|&&x| x > logits[s.token as usize]).count();
        if s.fallback {
            prop_assert_eq!(logits[s.token as usize], max);
        } else {
            prop_assert!(rank < k && p(s.token as usize) >= delta);
        }
    }
}

#[test]
fn test_vector_2k_combined_group_advantages() {
    let rewards = [1.0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0];
    let a = group_advantages(&rewards, &[16], &AdvantageConfig::default()).expect("valid").advantages;
    assert!((a[0] - 0.652790).abs() < 1e-5 && (a[7] + 1.436138).abs() < 1e-5, "{a:?}");
}
