//! HORA allocation of 1M rollouts over 100k prompts (target < 100 ms on 2 cores), and the decoding operators on one
//! 151,936-wide logits row, against baselines measured in the same run: for HORA, the uniform allocation (one pass
//! over the posteriors); for decoding, one pass that sums the row. `cargo xtask bench` prints the ratios.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use forkrl_benches::logits;
use forkrl_rollout::{BetaPosterior, CutsConfig, Decoding, decode, hora_allocate, token_rng, uniform_allocation};

const PROMPTS: usize = 100_000;
const BUDGET: usize = 1_000_000;
const VOCAB: usize = 151_936;

fn bench(c: &mut Criterion) {
    // Prompts with 0..16 earlier rollouts of mixed difficulty.
    let posteriors: Vec<BetaPosterior> = (0..PROMPTS)
        .map(|i| {
            let n = (i * 7) % 17;
            let s = ((i * 2_654_435_761) >> 5) % (n + 1);
            BetaPosterior::from_counts(s as f64, (n - s) as f64, 1.0, 1.0).expect("valid counts")
        })
        .collect();
    let mut group = c.benchmark_group("hora_1m_rollouts_100k_prompts");
    group.sample_size(10);
    group.bench_function("uniform", |b| b.iter(|| black_box(uniform_allocation(&posteriors, 10).expected_hits)));
    group.bench_function("hora", |b| {
        b.iter(|| black_box(hora_allocate(&posteriors, BUDGET, 2, 40).map(|a| a.expected_hits)))
    });
    group.finish();

    let row: Vec<f32> = logits(1, VOCAB, |x| x);
    let mut group = c.benchmark_group("decode_row_151936");
    group.sample_size(30);
    group.bench_function("read_floor", |b| b.iter(|| black_box(row.iter().sum::<f32>())));
    let ops = [
        ("greedy", Decoding::Greedy),
        ("temperature", Decoding::Temperature { temperature: 1.0 }),
        ("top_k_50", Decoding::TopK { k: 50, temperature: 1.0 }),
        ("top_p_0.95", Decoding::TopP { top_p: 0.95, temperature: 1.0 }),
        ("two_temperature", Decoding::TwoTemperature { t_high: 1.2, t_low: 0.8, threshold: 0.672 }),
        ("cuts", Decoding::Cuts(CutsConfig::default())),
    ];
    for (name, op) in ops {
        let mut i = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                black_box(decode(&row, &op, 10, None, &mut token_rng(0, 0, i)).map(|s| s.token))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
