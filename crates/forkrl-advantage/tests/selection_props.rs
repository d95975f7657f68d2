//! Property tests of the sparse-selection, distillation and exploration methods (ReasonMaxxer, SORT, on-policy
//! distillation, HEAL, IMAX, UG-TTT): bounds, reference = fast path, and the identities of their specs.

use forkrl_advantage::{
    AdaptiveBetaNeg, DecisionRows, DistillEstimator, DistillationConfig, HealConfig, ReasonMaxxerConfig, SortWeighting,
    apply_delta_hinge, delta_hinge_loss_host, eda_rewards, entropy_curve_kl, infomax_rewards, nuclear_norm,
    opd_token_advantages, reasonmaxxer_advantages, reasonmaxxer_coefficients, reasonmaxxer_loss_host, reverse_kl_host,
    sort_repair_loss_host, sort_weights,
};
use forkrl_entropy::epistemic_mutual_information;
use proptest::prelude::*;

/// `(B, W, decision, valid, generated, advantages, ce, kl)`.
type Rows = (usize, usize, Vec<bool>, Vec<bool>, Vec<bool>, Vec<f32>, Vec<f32>, Vec<f32>);

fn rows() -> impl Strategy<Value = Rows> {
    (1usize..5, 1usize..7).prop_flat_map(|(b, w)| {
        (
            Just(b),
            Just(w),
            prop::collection::vec(any::<bool>(), b * w),
            prop::collection::vec(any::<bool>(), b * w),
            prop::collection::vec(any::<bool>(), b * w),
            prop::collection::vec(-3.0f32..3.0, b),
            prop::collection::vec(0.0f32..5.0, b * w),
            prop::collection::vec(0.0f32..2.0, b * w),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn reasonmaxxer_advantages_are_clipped_and_ordered(r in prop::collection::vec(0.0f32..1.0, 1..12), clip in 0.5f32..4.0) {
        let a = reasonmaxxer_advantages(&r, &[r.len()], clip, 1e-8).expect("valid");
        let mean = r.iter().map(|&x| f64::from(x)).sum::<f64>() / r.len() as f64;
        for (x, ri) in a.iter().zip(&r) {
            prop_assert!(x.abs() <= clip + 1e-6);
            prop_assert!(f64::from(*x) * (f64::from(*ri) - mean) >= -1e-9, "sign follows r − mean");
        }
    }

    #[test]
    fn the_delta_hinge_only_zeroes_and_its_surrogate_has_the_hinges_slope(
        coef in prop::collection::vec(-2.0f32..2.0, 1..16),
        m in (0.0f32..2.0, 0.0f32..2.0),
        seed in any::<u64>(),
    ) {
        let n = coef.len();
        let lp: Vec<f32> = (0..n).map(|i| -((seed.wrapping_mul(i as u64 + 7) % 997) as f32) / 200.0).collect();
        let lb: Vec<f32> = (0..n).map(|i| -((seed.wrapping_mul(i as u64 + 13) % 991) as f32) / 200.0).collect();
        let mut c = coef.clone();
        let zeroed = apply_delta_hinge(&mut c, &lp, &lb, m).expect("valid");
        prop_assert_eq!(zeroed, c.iter().zip(&coef).filter(|(a, b)| **a == 0.0 && **b != 0.0).count());
        for (a, b) in c.iter().zip(&coef) {
            prop_assert!(*a == 0.0 || a == b, "a coefficient is kept or zeroed, never changed");
        }
        // Away from the kinks, the hinge loss's slope in log p is −c (the surrogate −Σ c·log p).
        let h = 1e-3f32;
        for t in 0..n {
            let delta = lp[t] - lb[t];
            if (delta - m.0).abs() < 0.01 || (delta + m.1).abs() < 0.01 {
                continue;
            }
            let mut up = lp.clone();
            up[t] += h;
            let slope = (delta_hinge_loss_host(&coef, &up, &lb, m) - delta_hinge_loss_host(&coef, &lp, &lb, m)) / f64::from(h);
            prop_assert!((slope + f64::from(c[t])).abs() < 1e-2, "token {}: {} vs {}", t, slope, -c[t]);
        }
    }

    #[test]
    fn adaptive_betaneg_stays_between_its_floor_and_the_configured_value(
        beta in 0.0f32..3.0,
        decay in 0.0f32..0.99,
        deltas in prop::collection::vec(-5.0f64..5.0, 1..40),
    ) {
        let cfg = ReasonMaxxerConfig { beta_neg: beta, adaptive_betaneg: true, adaptive_betaneg_ema: decay, ..Default::default() };
        let mut c = AdaptiveBetaNeg::new(&cfg);
        for d in deltas {
            let prev = c.beta_neg;
            let b = c.update(d);
            prop_assert!(b <= beta + 1e-6 && b >= AdaptiveBetaNeg::FLOOR.min(beta) - 1e-6, "{}", b);
            prop_assert!(b == prev || (b - prev * 0.7).abs() < 1e-6 || b <= prev * 1.05 + 1e-6);
        }
    }

    #[test]
    fn reasonmaxxer_coefficients_equal_the_reference(
        (b, w, decision, valid, generated, adv, ce, kl) in rows(),
        beta_neg in 0.0f32..2.0,
        generated_only in any::<bool>(),
    ) {
        let cfg = ReasonMaxxerConfig { beta_neg, kl_on_generated_only: generated_only, ..Default::default() };
        let rows = DecisionRows { decision: &decision, valid: &valid, generated: &generated, advantages: &adv, width: w };
        let c = reasonmaxxer_coefficients(&rows, &cfg).expect("valid");
        let linear: f64 = (0..b * w).map(|t| f64::from(c.ce[t]) * f64::from(ce[t]) + f64::from(c.kl[t]) * f64::from(kl[t])).sum();
        let reference = reasonmaxxer_loss_host(&ce, &kl, &rows, &cfg).expect("valid");
        prop_assert!((linear - reference).abs() < 1e-4 * reference.abs().max(1.0));
        for t in 0..b * w {
            prop_assert!(!(c.ce[t] != 0.0 && c.kl[t] != 0.0), "a position is a decision token or an anchor, not both");
            prop_assert!(c.kl[t] >= 0.0);
        }
    }

    #[test]
    fn sort_weights_are_bounded(lp in prop::collection::vec((-8.0f32..0.0, -8.0f32..0.0), 1..10), lambda in 0.0f32..1.0) {
        let (b, c): (Vec<f32>, Vec<f32>) = lp.into_iter().unzip();
        let mask = vec![true; b.len()];
        let g = sort_weights(&b, &c, &mask, &SortWeighting::Geometric { lambda }).expect("valid");
        let s = sort_weights(&b, &c, &mask, &SortWeighting::Selective { lambda }).expect("valid");
        for i in 0..b.len() {
            let (lo, hi) = (b[i].min(c[i]).exp(), b[i].max(c[i]).exp());
            prop_assert!(g[i] >= lo * (1.0 - 1e-5) && g[i] <= hi * (1.0 + 1e-5), "between b and c");
            prop_assert!(s[i] == 0.0 || s[i] == g[i]);
        }
        // Uniform weights give the mean negative log-likelihood.
        let u = sort_weights(&b, &c, &mask, &SortWeighting::Uniform).expect("valid");
        let nll = -b.iter().map(|&x| f64::from(x)).sum::<f64>() / b.len() as f64;
        prop_assert!((sort_repair_loss_host(&b, &u, &mask).expect("valid") - nll).abs() < 1e-5);
        let l = sort_repair_loss_host(&b, &g, &mask).expect("valid");
        prop_assert!((0.0..=8.0 + 1e-5).contains(&l), "a weighted mean of NLLs in [0, 8]");
    }

    #[test]
    fn reverse_kl_is_nonnegative_and_its_gradient_sums_to_zero(
        z in prop::collection::vec(-4.0f32..4.0, 5),
        tz in prop::collection::vec(-4.0f32..4.0, 5),
    ) {
        let m = tz.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + tz.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
        let q: Vec<f32> = tz.iter().map(|&x| (x - lse).min(0.0)).collect();
        let (kl, grad) = reverse_kl_host(&z, &q, 5).expect("valid");
        prop_assert!(kl[0] >= -1e-6);
        prop_assert!(grad.iter().sum::<f64>().abs() < 1e-9);
        // The student is the teacher: no KL, no gradient.
        let (kl, grad) = reverse_kl_host(&tz, &q, 5).expect("valid");
        prop_assert!(kl[0].abs() < 1e-5 && grad.iter().all(|g| g.abs() < 1e-5));
    }

    #[test]
    fn opd_advantages_are_minus_c_k_and_discount_sums_them(
        samp in prop::collection::vec(-5.0f32..0.0, 1..9),
        teacher in prop::collection::vec(-5.0f32..0.0, 9),
        c in 0.1f32..2.0,
    ) {
        let n = samp.len();
        let teacher = &teacher[..n];
        let mask = vec![true; n];
        let cfg = DistillationConfig { estimator: DistillEstimator::SampledToken, kl_penalty_coef: c, ..Default::default() };
        let a = opd_token_advantages(&samp, teacher, &mask, n, None, None, &cfg).expect("valid");
        for t in 0..n {
            prop_assert!((a[t] + c * (samp[t] - teacher[t])).abs() < 1e-5);
        }
        let g = opd_token_advantages(&samp, teacher, &mask, n, None, None, &DistillationConfig { kl_discount: 1.0, ..cfg }).expect("valid");
        let total: f32 = a.iter().sum();
        prop_assert!((g[0] - total).abs() < 1e-4, "undiscounted reward-to-go at t = 0 is the sum");
    }

    #[test]
    fn infomax_is_bounded_by_log_k_and_q_sums_to_one(l in prop::collection::vec(-6.0f32..0.0, 1..6)) {
        let k = l.len();
        let all: Vec<f32> = (0..k).flat_map(|_| l.iter().copied()).collect();
        let r = infomax_rewards(&all, k, &(0..k).collect::<Vec<_>>()).expect("valid");
        let log_k = (k as f64).ln();
        prop_assert!(r.iter().all(|&x| f64::from(x) <= log_k + 1e-5));
        let q_sum: f64 = r.iter().map(|&x| (f64::from(x) - log_k).exp()).sum();
        prop_assert!((q_sum - 1.0).abs() < 1e-5);
    }

    #[test]
    fn epistemic_mi_is_bounded(z in prop::collection::vec(-4.0f32..4.0, 12), members in 1usize..4) {
        // members × n × 4 logits with n = 12 / (members × 4) rounded down.
        let v = 4;
        let n = 12 / (members * v);
        prop_assume!(n > 0);
        let logits = &z[..members * n * v];
        let mi = epistemic_mutual_information(logits, members, v, 1.0).expect("valid");
        for &x in &mi {
            prop_assert!(x >= 0.0 && f64::from(x) <= (members as f64).ln() + 1e-5);
        }
    }

    #[test]
    fn eda_rewards_are_zero_or_the_coefficient(seqs in prop::collection::vec(prop::collection::vec(0.0f32..3.0, 1..8), 1..6), general in prop::collection::vec(any::<bool>(), 6)) {
        let entropy: Vec<&[f32]> = seqs.iter().map(Vec::as_slice).collect();
        let cfg = HealConfig { min_len: 2, eda_coef: 0.5, ..Default::default() };
        let r = eda_rewards(&entropy, &general[..seqs.len()], &cfg).expect("valid");
        prop_assert!(r.iter().all(|&x| x == 0.0 || x == 0.5));
        for (a, b) in seqs.iter().zip(seqs.iter().skip(1)) {
            prop_assert!(entropy_curve_kl(a, b) >= -1e-12);
        }
    }

    #[test]
    fn nuclear_norm_lies_between_the_frobenius_norm_and_sqrt_rank_times_it(m in prop::collection::vec(-2.0f32..2.0, 12), rows in 1usize..4) {
        let cols = 12 / rows;
        let x = &m[..rows * cols];
        let fro = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        let nn = nuclear_norm(x, rows, cols).expect("valid");
        prop_assert!(nn >= fro - 1e-6 && nn <= (rows.min(cols) as f64).sqrt() * fro + 1e-6, "{nn} vs {fro}");
        let scaled: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
        prop_assert!((nuclear_norm(&scaled, rows, cols).expect("valid") - 2.0 * nn).abs() < 1e-6 * nn.max(1.0));
    }
}
