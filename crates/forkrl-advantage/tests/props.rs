//! Property tests of forkrl-advantage's invariants (proptest): Σ Â = 0 per group; micro-batch and data-parallel
//! invariance of every aggregation mode; tensor aggregation = host aggregation; Hölder continuity through p = 0 and
//! monotonicity in p; the Hölder limits (p = 1 `holder_token` = GRPO's per-token clip with `seq-mean-token-mean`,
//! p → 0 `holder` = GSPO's sequence ratio at the same ε, p → 0 `holder_token` = GMPO); group permutation invariance.
#![cfg(feature = "burn")]

use burn::tensor::{Bool, Device, Tensor, TensorData};
use forkrl_advantage::{
    AdvantageConfig, AggMode, GlobalDenominators, GmpoConfig, GspoConfig, HolderConfig, HolderVariant, LossContext,
    PSchedule, PolicyInputs, PolicyLoss, PpoClipConfig, StdMode, aggregate, aggregate_host, group_advantages,
    holder_log_mean,
};
use forkrl_core::Backend;
use proptest::prelude::*;

const MODES: [AggMode; 5] = [
    AggMode::TokenMean,
    AggMode::TokenSum,
    AggMode::SeqMeanTokenSum,
    AggMode::SeqMeanTokenMean,
    AggMode::SeqMeanTokenSumNorm,
];

fn device() -> Device {
    Backend::from_env().expect("known backend").device().expect("compiled backend")
}

/// `(B, T, loss, mask)` with some empty rows.
fn batch() -> impl Strategy<Value = (usize, usize, Vec<f32>, Vec<bool>)> {
    (1usize..7, 1usize..6).prop_flat_map(|(b, t)| {
        (Just(b), Just(t), prop::collection::vec(-5.0f32..5.0, b * t), prop::collection::vec(any::<bool>(), b * t))
    })
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn advantages_sum_to_zero_per_group(rewards in prop::collection::vec(prop::sample::select(vec![0.0f32, 1.0, 0.5, -1.0]), 2..40), g in 2usize..9) {
        let n = rewards.len() / g * g;
        prop_assume!(n >= g);
        let sizes = vec![g; n / g];
        for cfg in [AdvantageConfig::default(), AdvantageConfig::dr_grpo(), AdvantageConfig::rloo(),
                    AdvantageConfig { std_mode: StdMode::Population, ..AdvantageConfig::default() },
                    AdvantageConfig { std_mode: StdMode::VarianceFloor, ..AdvantageConfig::default() }] {
            let adv = group_advantages(&rewards[..n], &sizes, &cfg).expect("valid").advantages;
            for chunk in adv.chunks(g) {
                let s: f64 = chunk.iter().map(|&a| f64::from(a)).sum();
                prop_assert!(s.abs() < 1e-4, "{cfg:?}: {chunk:?}");
            }
        }
    }

    #[test]
    fn aggregation_is_micro_batch_and_data_parallel_invariant((b, t, loss, mask) in batch(), cut in 0usize..7, ranks in 1usize..4) {
        let whole = GlobalDenominators::from_mask(&mask, t).expect("valid").with_loss_scale_factor(t as f64);
        let cut = cut.min(b);
        for mode in MODES {
            let reference = aggregate_host(&loss, &mask, t, mode, &whole).expect("valid");
            // Two micro-batches, global denominators: the sum is the whole-batch value.
            let split = aggregate_host(&loss[..cut * t], &mask[..cut * t], t, mode, &whole).expect("valid")
                + aggregate_host(&loss[cut * t..], &mask[cut * t..], t, mode, &whole).expect("valid");
            prop_assert!(close(split, reference, 1e-9), "{}: {split} vs {reference}", mode.name());
            // `ranks` data-parallel ranks (rows dealt round-robin), dp_size = ranks: the all-reduce mean is the value.
            let dp = GlobalDenominators { dp_size: ranks, ..whole };
            let mean = (0..ranks).map(|k| {
                let rows: Vec<usize> = (0..b).filter(|r| r % ranks == k).collect();
                let l: Vec<f32> = rows.iter().flat_map(|&r| loss[r * t..(r + 1) * t].to_vec()).collect();
                let m: Vec<bool> = rows.iter().flat_map(|&r| mask[r * t..(r + 1) * t].to_vec()).collect();
                aggregate_host(&l, &m, t, mode, &dp).expect("valid")
            }).sum::<f64>() / ranks as f64;
            prop_assert!(close(mean, reference, 1e-9), "{} dp: {mean} vs {reference}", mode.name());
        }
    }

    #[test]
    fn tensor_aggregation_equals_host((b, t, loss, mask) in batch()) {
        let device = device();
        let d = GlobalDenominators::from_mask(&mask, t).expect("valid").with_loss_scale_factor(3.0);
        // Padding holds NaN on the tensor side: masked numerators keep it out.
        let padded: Vec<f32> = loss.iter().zip(&mask).map(|(&l, &m)| if m { l } else { f32::NAN }).collect();
        let lt = Tensor::<2>::from_data(TensorData::new(padded, [b, t]), &device);
        let mt = Tensor::<2, Bool>::from_data(TensorData::new(mask.clone(), [b, t]), &device);
        prop_assert_eq!(GlobalDenominators::from_tensor_mask(&mt), GlobalDenominators { loss_scale_factor: None, ..d });
        for mode in MODES {
            let host = aggregate_host(&loss, &mask, t, mode, &d).expect("valid");
            let dev: f32 = aggregate(lt.clone(), &mt, mode, &d).expect("valid").into_scalar();
            prop_assert!(close(f64::from(dev), host, 1e-5), "{}: {dev} vs {host}", mode.name());
        }
    }

    #[test]
    fn holder_mean_is_continuous_through_zero_and_monotone(delta in prop::collection::vec(-3.0f64..3.0, 1..12), p in -6.0f64..6.0) {
        let at = |p: f64| holder_log_mean(&delta, p).expect("non-empty");
        let m0 = at(0.0);
        // |log M_p − log M_0| ≤ |p| · max|Δ − Δ̄|² / 2 · e^{|p|·spread} (second-order bound), and → 0 continuously.
        for q in [1e-12, -1e-12, 1e-8, -1e-8] {
            prop_assert!((at(q) - m0).abs() <= 20.0 * q.abs(), "p = {q}");
        }
        // Power-mean inequality: M_p is non-decreasing in p.
        prop_assert!(at(p) <= at(p + 0.5) + 1e-12);
        let (lo, hi) = delta.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &d| (a.min(d), b.max(d)));
        prop_assert!(at(p) >= lo - 1e-12 && at(p) <= hi + 1e-12);
    }
}

/// Random inputs with sequence-level advantages for the limit properties.
fn inputs(device: &Device, b: usize, t: usize, values: &[f32], adv: &[f32], lengths: &[usize]) -> PolicyInputs {
    let lp: Vec<f32> = (0..b * t).map(|i| -0.1 - values[i % values.len()].abs()).collect();
    let old: Vec<f32> = (0..b * t).map(|i| lp[i] - 0.3 * values[(i + 7) % values.len()]).collect();
    let a: Vec<f32> = (0..b * t).map(|i| adv[i / t]).collect();
    let mask: Vec<bool> = (0..b * t).map(|i| i % t < lengths[i / t]).collect();
    let f = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [b, t]), device);
    PolicyInputs {
        log_prob: f(lp),
        old_log_prob: f(old),
        advantages: f(a),
        mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
    }
}

fn value(loss: &PolicyLoss, i: &PolicyInputs, mode: AggMode) -> f64 {
    let mask: Vec<bool> =
        i.mask.clone().int().into_data().try_into_vec_as::<i64>().expect("ints").into_iter().map(|v| v != 0).collect();
    let d = GlobalDenominators::from_mask(&mask, i.mask.dims()[1]).expect("valid");
    f64::from(loss.compute(i, mode, &d, &LossContext::new(0, 0)).expect("valid").loss.into_scalar::<f32>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn holder_limits_recover_grpo_gspo_and_gmpo(
        values in prop::collection::vec(-1.0f32..1.0, 20),
        adv in prop::collection::vec(prop::sample::select(vec![-1.3f32, -0.4, 0.0, 0.6, 1.1]), 4),
        lengths in prop::collection::vec(0usize..6, 4),
    ) {
        let device = device();
        let i = inputs(&device, 4, 5, &values, &adv, &lengths);
        let eps = 0.2;
        let holder = |variant, p| PolicyLoss::Holder(HolderConfig { variant, clip_epsilon: eps, schedule: PSchedule::constant(p) });
        // p = 1 holder_token = GRPO's per-token clip (symmetric ε, no dual clip) with seq-mean-token-mean.
        let grpo = PolicyLoss::Vanilla(PpoClipConfig { clip_ratio_low: eps, clip_ratio_high: eps, clip_ratio_c: None });
        let (a, b) = (value(&holder(HolderVariant::HolderToken, 1.0), &i, AggMode::TokenMean), value(&grpo, &i, AggMode::SeqMeanTokenMean));
        prop_assert!(close(a, b, 1e-5), "holder_token p=1 {a} vs GRPO {b}");
        // p → 0 holder = GSPO's sequence ratio with the same ε.
        let gspo = PolicyLoss::Gspo(GspoConfig { clip_ratio_low: eps, clip_ratio_high: eps });
        let g = value(&gspo, &i, AggMode::TokenMean);
        for p in [0.0, 1e-7, -1e-7] {
            let h = value(&holder(HolderVariant::Holder, p), &i, AggMode::TokenMean);
            prop_assert!(close(h, g, 1e-5), "holder p={p} {h} vs GSPO {g}");
        }
        // p → 0 holder_token = GMPO with ε_low = −log(1−ε), ε_high = log(1+ε).
        let gmpo = PolicyLoss::GeoMean(GmpoConfig { clip_ratio_low: -(1.0f64 - eps).ln(), clip_ratio_high: (1.0f64 + eps).ln() });
        let (a, b) = (value(&holder(HolderVariant::HolderToken, 0.0), &i, AggMode::TokenMean), value(&gmpo, &i, AggMode::TokenMean));
        prop_assert!(close(a, b, 1e-5), "holder_token p=0 {a} vs GMPO {b}");
    }

    #[test]
    fn permuting_groups_leaves_the_loss_unchanged(
        rewards in prop::collection::vec(prop::sample::select(vec![0.0f32, 1.0]), 12),
        values in prop::collection::vec(-1.0f32..1.0, 30),
        order in Just(vec![0usize, 1, 2]).prop_shuffle(),
    ) {
        // Three groups of four responses, 5 tokens each (lengths vary); advantages computed on the groups.
        let device = device();
        let adv = group_advantages(&rewards, &[4, 4, 4], &AdvantageConfig::default()).expect("valid").advantages;
        let lengths: Vec<usize> = (0..12).map(|r| 1 + r % 5).collect();
        let base = inputs(&device, 12, 5, &values, &adv, &lengths);
        let rows: Vec<usize> = order.iter().flat_map(|&g| g * 4..g * 4 + 4).collect();
        let idx = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [12]), &device);
        let permuted = PolicyInputs {
            log_prob: base.log_prob.clone().select(0, idx.clone()),
            old_log_prob: base.old_log_prob.clone().select(0, idx.clone()),
            advantages: base.advantages.clone().select(0, idx.clone()),
            mask: base.mask.clone().int().select(0, idx).greater_elem(0),
        };
        for loss in [PolicyLoss::default(), PolicyLoss::Holder(HolderConfig::default())] {
            for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean] {
                let (a, b) = (value(&loss, &base, mode), value(&loss, &permuted, mode));
                prop_assert!(close(a, b, 1e-5), "{} {}: {a} vs {b}", loss.name(), mode.name());
            }
        }
    }
}
