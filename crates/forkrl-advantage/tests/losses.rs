//! Every policy loss on the backend named by `FORKRL_BACKEND` (CPU by default): the tensor path equals an f64 host
//! reference built from the per-token / per-sequence reference functions, its autodiff gradient equals central finite
//! differences of that reference, padding (even NaN) never leaks, zero advantages give zero gradient, and permuting
//! the rows changes nothing.
#![cfg(feature = "burn")]

use burn::tensor::{Bool, Device, FloatDType, Tensor, TensorData};
use forkrl_advantage::{
    AggMode, CispoConfig, ClipCovConfig, GlobalDenominators, GmpoConfig, GspoConfig, HolderConfig, HolderVariant,
    KlCovConfig, LossContext, PSchedule, PolicyInputs, PolicyLoss, PpoClipConfig, aggregate_host, cispo, clip_cov,
    gmpo, gspo, holder, kl_cov, ppo_clip,
};
use forkrl_core::{Backend, Error};

const B: usize = 4;
const T: usize = 6;

fn device() -> Device {
    Backend::from_env().expect("known backend").device().expect("compiled backend")
}

/// A batch with a full row, two partial rows and an empty row; sequence-level advantages.
struct Case {
    lp: Vec<f64>,
    /// log π where the stop-gradient weights are evaluated (CISPO's `sg(r̂)`): unchanged by finite differences.
    frozen_lp: Vec<f64>,
    old: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<bool>,
}

impl Case {
    /// The same case with `log π[i] += h`.
    fn shifted(&self, i: usize, h: f64) -> Case {
        let mut lp = self.lp.clone();
        lp[i] += h;
        Case {
            lp,
            frozen_lp: self.frozen_lp.clone(),
            old: self.old.clone(),
            adv: self.adv.clone(),
            mask: self.mask.clone(),
        }
    }
}

fn case(seed: u64) -> Case {
    // A small deterministic generator (no dependency): log-probs in (−3, −0.05), ratios within about e^±0.6.
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let lengths = [6, 3, 5, 0];
    let seq_adv = [1.3, -0.7, 0.4, 0.9];
    let (mut lp, mut old, mut adv, mut mask) = (vec![], vec![], vec![], vec![]);
    for r in 0..B {
        for t in 0..T {
            let valid = t < lengths[r];
            let l = -0.05 - 2.9 * next();
            lp.push(l);
            old.push(l + 1.2 * (next() - 0.5));
            adv.push(seq_adv[r]);
            mask.push(valid);
        }
    }
    Case { frozen_lp: lp.clone(), lp, old, adv, mask }
}

fn tensor(values: &[f64], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.iter().map(|&v| v as f32).collect::<Vec<_>>(), [B, T]), device)
}

fn mask_tensor(mask: &[bool], device: &Device) -> Tensor<2, Bool> {
    Tensor::from_data(TensorData::new(mask.to_vec(), [B, T]), device)
}

/// Host reference of the aggregated loss (f64) with the same denominators as the tensor path.
fn host_loss(loss: &PolicyLoss, c: &Case, mode: AggMode, d: &GlobalDenominators, seed: u64) -> f64 {
    let rows = |f: &dyn Fn(&[f64], f64) -> Option<f64>| -> f64 {
        let mut total = 0.0;
        for r in 0..B {
            let delta: Vec<f64> =
                (0..T).filter(|&t| c.mask[r * T + t]).map(|t| c.lp[r * T + t] - c.old[r * T + t]).collect();
            if let Some(l) = f(&delta, c.adv[r * T]) {
                total += l;
            }
        }
        total / d.global_batch_size as f64 * d.dp_size as f64
    };
    let token = |f: &dyn Fn(usize) -> f64, mode: AggMode| {
        let per: Vec<f32> = (0..B * T).map(|i| if c.mask[i] { f(i) as f32 } else { f32::NAN }).collect();
        // Aggregation in f64 on f32-rounded token losses is accurate to ~1e-7, far below the tolerance.
        aggregate_host(&per, &c.mask, T, mode, d).expect("valid")
    };
    let dl = |i: usize| c.lp[i] - c.old[i];
    match loss {
        PolicyLoss::Vanilla(cfg) => token(&|i| ppo_clip::ppo_clip_token(dl(i), c.adv[i], cfg).0, mode),
        PolicyLoss::Cispo(cfg) => {
            token(&|i| -cispo::cispo_coefficient(c.frozen_lp[i] - c.old[i], c.adv[i], cfg) * c.lp[i], mode)
        }
        PolicyLoss::Gspo(cfg) => {
            // Uniform advantages: GSPO-token with seq-mean-token-mean equals the sequence loss averaged.
            rows(&|delta, a| if delta.is_empty() { None } else { Some(gspo::gspo_sequence(delta, a, cfg).0) })
        }
        PolicyLoss::GeoMean(cfg) => {
            rows(&|delta, a| if delta.is_empty() { None } else { Some(gmpo::gmpo_sequence(delta, a, cfg).2) })
        }
        PolicyLoss::Holder(cfg) => {
            rows(&|delta, a| holder::holder_sequence(delta, a, cfg.schedule.p_at(0), cfg).map(|x| x.1))
        }
        PolicyLoss::KlCov(cfg) => {
            let lp32: Vec<f32> = c.lp.iter().map(|&v| v as f32).collect();
            let adv32: Vec<f32> = c.adv.iter().map(|&v| v as f32).collect();
            let cov = forkrl_entropy::token_covariance(&adv32, &lp32, &c.mask).expect("valid");
            let sel = kl_cov::kl_cov_selection(&cov, &c.mask, cfg.kl_cov_ratio).expect("valid");
            token(&|i| -c.adv[i] * dl(i).exp() + if sel[i] { cfg.ppo_kl_coef * dl(i).abs() } else { 0.0 }, mode)
        }
        PolicyLoss::ClipCov(cfg) => {
            let lp32: Vec<f32> = c.lp.iter().map(|&v| v as f32).collect();
            let adv32: Vec<f32> = c.adv.iter().map(|&v| v as f32).collect();
            let cov = forkrl_entropy::token_covariance(&adv32, &lp32, &c.mask).expect("valid");
            let ppo = PpoClipConfig {
                clip_ratio_low: cfg.clip_ratio_low,
                clip_ratio_high: cfg.clip_ratio_high,
                clip_ratio_c: None,
            };
            let clipped: Vec<bool> =
                (0..B * T).map(|i| c.mask[i] && ppo_clip::ppo_clip_token(dl(i), c.adv[i], &ppo).1).collect();
            let sel = clip_cov::clip_cov_selection(&cov, &c.mask, &clipped, cfg, seed).expect("valid");
            token(&|i| if sel[i] { 0.0 } else { ppo_clip::ppo_clip_token(dl(i), c.adv[i], &ppo).0 }, mode)
        }
        // HTPO needs token groups; its own test vector (2.N) and the variant test below check it.
        PolicyLoss::Htpo(_) => unreachable!("HTPO is not in all_losses()"),
    }
}

fn all_losses() -> Vec<PolicyLoss> {
    let holder =
        |variant, p| PolicyLoss::Holder(HolderConfig { variant, clip_epsilon: 0.2, schedule: PSchedule::constant(p) });
    vec![
        PolicyLoss::Vanilla(PpoClipConfig::default()),
        PolicyLoss::Vanilla(PpoClipConfig { clip_ratio_c: Some(1.5), ..PpoClipConfig::clip_higher() }),
        PolicyLoss::Gspo(GspoConfig { clip_ratio_low: 0.05, clip_ratio_high: 0.05 }),
        PolicyLoss::Cispo(CispoConfig::new(0.1)),
        PolicyLoss::Cispo(CispoConfig { eps_high: 0.1, eps_low: Some(0.1) }),
        PolicyLoss::GeoMean(GmpoConfig { clip_ratio_low: 0.3, clip_ratio_high: 0.3 }),
        PolicyLoss::ClipCov(ClipCovConfig {
            clip_cov_ratio: 0.2,
            clip_cov_lb: -0.5,
            clip_cov_ub: 5.0,
            ..ClipCovConfig::default()
        }),
        PolicyLoss::KlCov(KlCovConfig { kl_cov_ratio: 0.2, ppo_kl_coef: 0.5 }),
        holder(HolderVariant::Holder, 1.5),
        holder(HolderVariant::Holder, 0.0),
        holder(HolderVariant::SequenceWClip, -2.0),
        holder(HolderVariant::HolderToken, 1.0),
        holder(HolderVariant::HolderToken, -1.0),
    ]
}

fn inputs(c: &Case, device: &Device, lp: Tensor<2>) -> PolicyInputs {
    PolicyInputs {
        log_prob: lp,
        old_log_prob: tensor(&c.old, device),
        advantages: tensor(&c.adv, device),
        mask: mask_tensor(&c.mask, device),
    }
}

fn denominators(c: &Case) -> GlobalDenominators {
    GlobalDenominators::from_mask(&c.mask, T).expect("valid").with_loss_scale_factor(T as f64)
}

/// Tensor loss value and gradient w.r.t. log π; padding holds NaN log-probs to show that nothing leaks.
fn tensor_loss(loss: &PolicyLoss, c: &Case, mode: AggMode, seed: u64) -> (f64, Vec<f32>) {
    let device = device().autodiff();
    let lp: Vec<f64> = c.lp.iter().zip(&c.mask).map(|(&v, &m)| if m { v } else { f64::NAN }).collect();
    let x = tensor(&lp, &device).require_grad();
    let out = loss
        .compute(&inputs(c, &device, x.clone()), mode, &denominators(c), &LossContext::new(0, seed))
        .expect("valid");
    let value: f32 = out.loss.clone().into_scalar();
    let grads = out.loss.backward();
    let g = x.grad(&grads).expect("gradient").into_data().try_into_vec_as::<f32>().expect("f32");
    (f64::from(value), g)
}

#[test]
fn every_loss_matches_its_host_reference_in_value_and_finite_differences() {
    for (k, loss) in all_losses().iter().enumerate() {
        for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean, AggMode::SeqMeanTokenSumNorm] {
            let c = case(k as u64 + 11);
            let d = denominators(&c);
            let seed = 5;
            let (value, grad) = tensor_loss(loss, &c, mode, seed);
            let reference = host_loss(loss, &c, mode, &d, seed);
            assert!(
                (value - reference).abs() <= 1e-5 * reference.abs().max(1.0),
                "{} {}: {value} vs {reference}",
                loss.name(),
                mode.name()
            );
            let h = 1e-3; // the host token losses are rounded to f32 before aggregation
            for i in 0..B * T {
                if !c.mask[i] {
                    assert_eq!(grad[i], 0.0, "{}: padding gets no gradient", loss.name());
                    continue;
                }
                let fd = (host_loss(loss, &c.shifted(i, h), mode, &d, seed)
                    - host_loss(loss, &c.shifted(i, -h), mode, &d, seed))
                    / (2.0 * h);
                let g = f64::from(grad[i]);
                assert!(
                    (g - fd).abs() <= 2e-4 + 2e-3 * fd.abs(),
                    "{} {} token {i}: autodiff {g} vs finite difference {fd}",
                    loss.name(),
                    mode.name()
                );
            }
            if let PolicyLoss::Gspo(_) | PolicyLoss::GeoMean(_) | PolicyLoss::Holder(_) = loss {
                break; // sequence-level losses ignore the token aggregation mode
            }
        }
    }
}

/// f16 and bf16 inputs on the CPU backend (the composed path: the fused PPO operation takes f32 only) give the f32
/// result within their rounding, and a gradient (the loss metrics once mixed an f16 log-ratio with f32 indicators,
/// which burn-flex rejects with a panic).
#[test]
fn cpu_backend_every_loss_and_mode_takes_half_precision_inputs() {
    let device = Device::flex().autodiff();
    let modes = [
        AggMode::TokenMean,
        AggMode::TokenSum,
        AggMode::SeqMeanTokenSum,
        AggMode::SeqMeanTokenMean,
        AggMode::SeqMeanTokenSumNorm,
    ];
    for (k, loss) in all_losses().iter().enumerate() {
        let c = case(k as u64 + 31);
        for mode in modes {
            let run = |dtype: Option<FloatDType>| {
                let cast = |t: Tensor<2>| match dtype {
                    Some(d) => t.cast(d),
                    None => t,
                };
                let x = cast(tensor(&c.lp, &device)).require_grad();
                let i = PolicyInputs {
                    log_prob: x.clone(),
                    old_log_prob: cast(tensor(&c.old, &device)),
                    advantages: cast(tensor(&c.adv, &device)),
                    mask: mask_tensor(&c.mask, &device),
                };
                let out = loss.compute(&i, mode, &denominators(&c), &LossContext::new(0, 3)).expect("valid inputs");
                let value: f32 = out.loss.clone().cast(FloatDType::F32).into_scalar();
                let grad = x.grad(&out.loss.backward()).expect("a gradient").cast(FloatDType::F32);
                (value, grad.into_data().try_into_vec_as::<f32>().expect("f32"))
            };
            let (reference, _) = run(None);
            for dtype in [FloatDType::F16, FloatDType::BF16] {
                let (value, grad) = run(Some(dtype));
                let tolerance = 3e-2 * reference.abs().max(1.0);
                assert!(
                    (value - reference).abs() <= tolerance,
                    "{} {} {dtype:?}: {value} vs f32 {reference}",
                    loss.name(),
                    mode.name()
                );
                assert!(grad.iter().all(|g| g.is_finite()), "{} {} {dtype:?}: {grad:?}", loss.name(), mode.name());
            }
        }
    }
    // The actor objective with an f16 policy, an f32 reference policy and a bf16 entropy: mixed dtypes, one f32 loss.
    use forkrl_advantage::{ActorLossConfig, KlLossConfig, actor_loss};
    let c = case(5);
    let cfg = ActorLossConfig {
        entropy_coeff: 0.1,
        kl_loss: Some(KlLossConfig { kl_loss_type: "low_var_kl".parse().expect("known"), kl_loss_coef: 0.2 }),
        ..ActorLossConfig::default()
    };
    let reference = tensor(&c.lp.iter().map(|l| l - 0.25).collect::<Vec<_>>(), &device);
    let entropy = tensor(&[0.5; B * T], &device);
    let run = |i: &PolicyInputs, entropy: Tensor<2>| -> f32 {
        let out =
            actor_loss(&cfg, i, Some(entropy), Some(reference.clone()), &denominators(&c), &LossContext::new(0, 0));
        out.expect("valid inputs").loss.into_scalar()
    };
    let full = run(&inputs(&c, &device, tensor(&c.lp, &device)), entropy.clone());
    let mut half = inputs(&c, &device, tensor(&c.lp, &device).cast(FloatDType::F16));
    half.old_log_prob = half.old_log_prob.cast(FloatDType::F16);
    let mixed = run(&half, entropy.cast(FloatDType::BF16));
    assert!((mixed - full).abs() <= 3e-2 * full.abs().max(1.0), "actor loss with f16 / bf16 inputs {mixed} vs {full}");
}

#[test]
fn zero_advantages_give_zero_loss_and_gradient() {
    for loss in all_losses() {
        let mut c = case(3);
        c.adv.iter_mut().for_each(|a| *a = 0.0);
        let (value, grad) = tensor_loss(&loss, &c, AggMode::TokenMean, 1);
        let kl_term = matches!(loss, PolicyLoss::KlCov(_));
        if !kl_term {
            assert_eq!(value, 0.0, "{}", loss.name());
            assert!(grad.iter().all(|&g| g == 0.0), "{}: {grad:?}", loss.name());
        }
    }
}

#[test]
fn permuting_rows_leaves_the_loss_unchanged() {
    let order = [2usize, 0, 3, 1];
    for loss in all_losses() {
        if matches!(loss, PolicyLoss::ClipCov(_)) {
            continue; // its random subset is drawn over flat positions, so a permutation reshuffles the draw
        }
        let c = case(9);
        let permute = |v: &Vec<f64>| order.iter().flat_map(|&r| v[r * T..(r + 1) * T].to_vec()).collect::<Vec<_>>();
        let p = Case {
            lp: permute(&c.lp),
            frozen_lp: permute(&c.frozen_lp),
            old: permute(&c.old),
            adv: permute(&c.adv),
            mask: order.iter().flat_map(|&r| c.mask[r * T..(r + 1) * T].to_vec()).collect(),
        };
        let (a, _) = tensor_loss(&loss, &c, AggMode::TokenMean, 0);
        let (b, _) = tensor_loss(&loss, &p, AggMode::TokenMean, 0);
        assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", loss.name());
    }
}

#[test]
fn test_vector_1_7_gradient_coefficients_through_autodiff() {
    // One token per row: d loss / d log π = −(dJ/d log π) with token-sum aggregation.
    let device = device().autodiff();
    let rows = [
        (1.5f32, 1.0f32, 0.0f32, 1.28f32),
        (1.1, 1.0, 1.1, 1.1),
        (0.5, 1.0, 0.5, 0.5),
        (0.5, -1.0, 0.0, -0.5),
        (1.5, -1.0, -1.5, -1.28),
        (4.0, -1.0, 0.0, -1.28),
    ];
    let n = rows.len();
    let lp: Vec<f32> = vec![-1.0; n];
    let old: Vec<f32> = rows.iter().map(|r| -1.0 - r.0.ln()).collect();
    let adv: Vec<f32> = rows.iter().map(|r| r.1).collect();
    let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [n, 1]), &device);
    let d = GlobalDenominators { batch_num_tokens: n, global_batch_size: n, dp_size: 1, loss_scale_factor: None };
    for (loss, col) in
        [(PolicyLoss::Vanilla(PpoClipConfig::clip_higher()), 2), (PolicyLoss::Cispo(CispoConfig::new(0.28)), 3)]
    {
        let x = t(lp.clone()).require_grad();
        let inputs = PolicyInputs {
            log_prob: x.clone(),
            old_log_prob: t(old.clone()),
            advantages: t(adv.clone()),
            mask: Tensor::from_data(TensorData::new(vec![true; n], [n, 1]), &device),
        };
        let out = loss.compute(&inputs, AggMode::TokenSum, &d, &LossContext::new(0, 0)).expect("valid");
        let g = x.grad(&out.loss.backward()).expect("grad").into_data().try_into_vec_as::<f32>().expect("f32");
        for (i, row) in rows.iter().enumerate() {
            let expected = if col == 2 { row.2 } else { row.3 };
            assert!((-g[i] - expected).abs() < 1e-5, "{} row {i}: {} vs {expected}", loss.name(), -g[i]);
        }
        if col == 2 {
            // Tokens 0 and 3 clip, token 5's dual clip binds (of 3 negative-advantage tokens).
            assert!((out.metrics.pg_clipfrac - 2.0 / 6.0).abs() < 1e-6, "{:?}", out.metrics);
            assert!((out.metrics.pg_clipfrac_lower - 1.0 / 6.0).abs() < 1e-6, "{:?}", out.metrics);
        }
    }
}

#[test]
fn shape_mismatch_is_a_typed_error() {
    let device = device();
    let c = case(1);
    let mut i = inputs(&c, &device, tensor(&c.lp, &device));
    i.advantages = Tensor::zeros([B, T + 1], &device);
    for loss in all_losses() {
        let r = loss.compute(&i, AggMode::TokenMean, &denominators(&c), &LossContext::new(0, 0));
        assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{}", loss.name());
    }
}

#[test]
fn test_vector_2n_htpo_branches_through_autodiff() {
    use forkrl_advantage::{HtpoConfig, HtpoLowerBranch, HtpoTokenGroups, htpo_loss};
    // Rows: hard-correct high (r = 1.5, r = 0.5, A = +1), hard-wrong high (r = 0.5, A = −1), standard (r = 1.5, A = 1).
    let device = device().autodiff();
    let r = [1.5f32, 0.5, 0.5, 1.5];
    let a = [1.0f32, 1.0, -1.0, 1.0];
    let n = r.len();
    let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [n, 1]), &device);
    let groups = HtpoTokenGroups {
        hard_correct_high: vec![true, true, false, false],
        wrong_high: vec![false, false, true, false],
        dropped: vec![false; n],
        hard: vec![true, true, true, false],
    };
    for (branch, expected) in [
        (HtpoLowerBranch::AsReleased, [(1.28f32, 1.28f32), (2.0, 2.0), (-0.8, -0.8), (-1.28, 0.0)]),
        (HtpoLowerBranch::Standard, [(1.28, 1.28), (-0.5, -0.5), (-0.8, -0.8), (-1.28, 0.0)]),
    ] {
        let x = t(vec![-1.0; n]).require_grad();
        let inputs = PolicyInputs {
            log_prob: x.clone(),
            old_log_prob: t(r.iter().map(|r| -1.0 - r.ln()).collect()),
            advantages: t(a.to_vec()),
            mask: Tensor::from_data(TensorData::new(vec![true; n], [n, 1]), &device),
        };
        let cfg = HtpoConfig { hard_correct_lower_branch: branch, ..HtpoConfig::default() };
        let out = htpo_loss(&inputs, &groups, &cfg).expect("valid");
        let values = out.loss.clone().into_data().try_into_vec_as::<f32>().expect("f32");
        let g = x.grad(&out.loss.sum().backward()).expect("grad").into_data().try_into_vec_as::<f32>().expect("f32");
        for (i, (v, d)) in expected.iter().enumerate() {
            assert!(
                (values[i] - v).abs() < 1e-5 && (g[i] - d).abs() < 1e-5,
                "{branch:?} row {i}: {} / {}",
                values[i],
                g[i]
            );
        }
    }
}

#[test]
fn htpo_as_a_policy_loss_variant_equals_the_direct_call_with_token_mean() {
    use forkrl_advantage::{HtpoConfig, HtpoTokenGroups, aggregate, htpo_loss};
    let device = device();
    let c = case(7);
    let i = inputs(&c, &device, tensor(&c.lp, &device));
    let d = denominators(&c);
    let groups = HtpoTokenGroups {
        hard_correct_high: (0..B * T).map(|k| k % 3 == 0).collect(),
        wrong_high: (0..B * T).map(|k| k % 5 == 1).collect(),
        dropped: (0..B * T).map(|k| k % 7 == 2).collect(),
        hard: (0..B).map(|r| r % 2 == 0).collect(),
    };
    let cfg = HtpoConfig::default();
    let direct = htpo_loss(&i, &groups, &cfg).expect("valid");
    let expect: f32 = aggregate(direct.loss, &i.mask, AggMode::TokenMean, &d).expect("valid").into_scalar();
    let loss = PolicyLoss::Htpo(cfg);
    // Whatever mode is asked for, HTPO aggregates with token-mean (the official code).
    let ctx = LossContext::new(3, 0).with_htpo_groups(&groups);
    let got: f32 = loss.compute(&i, AggMode::SeqMeanTokenSum, &d, &ctx).expect("valid").loss.into_scalar();
    assert_eq!(got.to_bits(), expect.to_bits());
    assert_eq!(loss.name(), "htpo");
    // Without its token groups the variant is a typed error naming them.
    let err = loss.compute(&i, AggMode::TokenMean, &d, &LossContext::new(0, 0)).expect_err("needs groups");
    assert!(matches!(err, Error::InvalidParameter { name: "htpo_groups", .. }), "{err}");
}

#[test]
fn actor_objective_adds_entropy_bonus_and_kl_loss() {
    use forkrl_advantage::{ActorLossConfig, KlLossConfig, actor_loss};
    let device = device();
    let c = case(4);
    let i = inputs(&c, &device, tensor(&c.lp, &device));
    let d = denominators(&c);
    let entropy = tensor(&[0.5; B * T], &device);
    let reference = tensor(&c.lp.iter().map(|l| l - 0.25).collect::<Vec<_>>(), &device);
    let plain = actor_loss(&ActorLossConfig::default(), &i, None, None, &d, &LossContext::new(0, 0)).expect("valid");
    assert_eq!((plain.entropy, plain.kl_loss), (None, None));
    let cfg = ActorLossConfig {
        entropy_coeff: 0.1,
        kl_loss: Some(KlLossConfig { kl_loss_type: "k1".parse().expect("known"), kl_loss_coef: 0.2 }),
        ..ActorLossConfig::default()
    };
    let full = actor_loss(&cfg, &i, Some(entropy.clone()), Some(reference.clone()), &d, &LossContext::new(0, 0))
        .expect("valid");
    // token-mean of a constant is the constant: entropy 0.5, k1 = 0.25.
    assert!((full.entropy.expect("given") - 0.5).abs() < 1e-6 && (full.kl_loss.expect("on") - 0.25).abs() < 1e-6);
    let total: f32 = full.loss.into_scalar();
    assert!((f64::from(total) - (plain.pg_loss - 0.1 * 0.5 + 0.2 * 0.25)).abs() < 1e-5);
    assert!(actor_loss(&cfg, &i, None, Some(reference), &d, &LossContext::new(0, 0)).is_err());
    assert!(actor_loss(&cfg, &i, Some(entropy), None, &d, &LossContext::new(0, 0)).is_err());
}
