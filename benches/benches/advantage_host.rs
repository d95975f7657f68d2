//! Host advantage estimators and aggregation on 100k groups of 8 (800k responses), against a baseline measured in the
//! same run: one pass that sums the rewards (the least any estimator must read). `cargo xtask bench` prints the ratios.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkrl_advantage::{AdvantageConfig, AggMode, GlobalDenominators, aggregate_host, group_advantages};

const GROUPS: usize = 100_000;
const G: usize = 8;

fn bench(c: &mut Criterion) {
    let rewards: Vec<f32> = (0..GROUPS * G).map(|i| (((i * 2_654_435_761) >> 7) & 1) as f32).collect();
    let sizes = vec![G; GROUPS];
    let mut group = c.benchmark_group("advantage_host_100k_groups");
    group.sample_size(20).throughput(Throughput::Elements((GROUPS * G) as u64));
    group.bench_function("read_floor", |b| b.iter(|| black_box(rewards.iter().map(|&r| f64::from(r)).sum::<f64>())));
    for (name, cfg) in [
        ("grpo", AdvantageConfig::default()),
        ("dr_grpo", AdvantageConfig::dr_grpo()),
        ("rloo", AdvantageConfig::rloo()),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(group_advantages(&rewards, &sizes, &cfg).map(|a| a.advantages[0])))
        });
    }
    group.finish();

    // Host aggregation of a [512, 4096] per-token loss (the tensor path is benched in forkrl-advantage/benches).
    let (rows, width) = (512, 4096);
    let loss: Vec<f32> = (0..rows * width).map(|i| (i % 97) as f32 * 0.01).collect();
    let mask: Vec<bool> = (0..rows * width).map(|i| i % width < 1024 + (i / width) * 5).collect();
    let d = GlobalDenominators::from_mask(&mask, width).expect("valid").with_loss_scale_factor(width as f64);
    let mut group = c.benchmark_group("aggregate_host_512x4096");
    group.sample_size(20).throughput(Throughput::Elements((rows * width) as u64));
    for mode in [AggMode::TokenMean, AggMode::SeqMeanTokenMean] {
        group.bench_function(mode.name(), |b| b.iter(|| black_box(aggregate_host(&loss, &mask, width, mode, &d))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
