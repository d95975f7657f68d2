//! Policy loss + aggregation on burn tensors, [512, 4096] tokens, on the backend named by `FORKRL_BACKEND` (CPU by
//! default): forward only and forward + backward, against a baseline measured in the same run (one elementwise
//! `exp` and a sum over the same tensor, forward + backward). `cargo xtask bench` runs this with the dev profile and
//! prints the ratios.

use std::hint::black_box;

use burn::tensor::{Bool, Distribution, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkrl_advantage::{
    AggMode, CispoConfig, GlobalDenominators, HolderConfig, LossContext, PolicyInputs, PolicyLoss, PpoClipConfig,
};
use forkrl_core::Backend;

const ROWS: usize = 512;
const WIDTH: usize = 4096;

fn bench(c: &mut Criterion) {
    let device = Backend::from_env().and_then(Backend::device).expect("backend").autodiff();
    device.seed(7);
    let lp = Tensor::<2>::random([ROWS, WIDTH], Distribution::Uniform(-3.0, -0.01), &device);
    let old = lp.clone() + Tensor::<2>::random([ROWS, WIDTH], Distribution::Uniform(-0.3, 0.3), &device);
    let adv = Tensor::<2>::random([ROWS, 1], Distribution::Normal(0.0, 1.0), &device).expand([ROWS, WIDTH]);
    let lengths: Vec<usize> = (0..ROWS).map(|r| 512 + (r * 977) % (WIDTH - 512)).collect();
    let mask_host: Vec<bool> = (0..ROWS * WIDTH).map(|i| i % WIDTH < lengths[i / WIDTH]).collect();
    let d = GlobalDenominators::from_mask(&mask_host, WIDTH).expect("valid");
    let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask_host, [ROWS, WIDTH]), &device);
    let inputs = |x: Tensor<2>| PolicyInputs {
        log_prob: x,
        old_log_prob: old.clone(),
        advantages: adv.clone(),
        mask: mask.clone(),
    };

    let mut group = c.benchmark_group("policy_loss_512x4096");
    group.sample_size(10).throughput(Throughput::Elements((ROWS * WIDTH) as u64));
    group.bench_function("baseline_exp_sum_fwd_bwd", |b| {
        b.iter(|| {
            let x = lp.clone().require_grad();
            let grads = (x.clone() - old.clone()).exp().sum().backward();
            black_box(x.grad(&grads).map(|g| g.dims()))
        })
    });
    let losses = [
        ("vanilla", PolicyLoss::Vanilla(PpoClipConfig::clip_higher())),
        ("cispo", PolicyLoss::Cispo(CispoConfig::new(0.28))),
        ("holder", PolicyLoss::Holder(HolderConfig::default())),
    ];
    for (name, loss) in &losses {
        group.bench_function(format!("{name}_token-mean_fwd"), |b| {
            b.iter(|| {
                black_box(
                    loss.compute(&inputs(lp.clone()), AggMode::TokenMean, &d, &LossContext::new(100, 0))
                        .map(|l| l.metrics),
                )
            })
        });
        group.bench_function(format!("{name}_token-mean_fwd_bwd"), |b| {
            b.iter(|| {
                let x = lp.clone().require_grad();
                let out =
                    loss.compute(&inputs(x.clone()), AggMode::TokenMean, &d, &LossContext::new(100, 0)).expect("valid");
                let grads = out.loss.backward();
                black_box(x.grad(&grads).map(|g| g.dims()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
