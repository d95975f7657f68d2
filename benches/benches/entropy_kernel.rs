//! Host entropy + log-prob kernel at [512, 151936] (Qwen's vocabulary), f32 and bf16, against the read floor and the
//! naive materialising formula measured in the same run; its backward pass (`token_stats_backward_into`, gradient
//! with respect to every logit) against a copy of the buffer (the read-and-write floor). `cargo xtask bench` runs this
//! and prints the ratios.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkrl_benches::{copy_floor, logits, naive_materialising, read_floor};
use forkrl_entropy::{KernelOptions, LogitElement, StatsGrad, token_stats, token_stats_backward_into};
use half::bf16;

const ROWS: usize = 512;
const VOCAB: usize = 151_936;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn bench(c: &mut Criterion) {
    let threads = threads();
    let targets: Vec<u32> = (0..ROWS as u32).map(|r| (r * 7919) % VOCAB as u32).collect();
    let opts = KernelOptions { temperature: 1.0, threads };

    let f32_logits = logits(ROWS, VOCAB, |x| x);
    let mut group = c.benchmark_group("entropy_kernel_f32");
    group.sample_size(10).throughput(Throughput::Bytes((ROWS * VOCAB * 4) as u64));
    group.bench_function("read_floor", |b| b.iter(|| black_box(read_floor(&f32_logits, VOCAB, threads))));
    group.bench_function("forkrl", |b| {
        b.iter(|| black_box(token_stats(&f32_logits, VOCAB, Some(&targets), opts).map(|s| s.entropy[0])))
    });
    group.bench_function("naive_materialising", |b| {
        b.iter(|| black_box(naive_materialising(&f32_logits, VOCAB, threads)))
    });
    backward(&mut group, &f32_logits, &targets, opts);
    group.finish();
    drop(f32_logits);

    let bf16_logits = logits(ROWS, VOCAB, bf16::from_f32);
    let mut group = c.benchmark_group("entropy_kernel_bf16");
    group.sample_size(10).throughput(Throughput::Bytes((ROWS * VOCAB * 2) as u64));
    group.bench_function("read_floor", |b| b.iter(|| black_box(read_floor(&bf16_logits, VOCAB, threads))));
    group.bench_function("forkrl", |b| {
        b.iter(|| black_box(token_stats(&bf16_logits, VOCAB, Some(&targets), opts).map(|s| s.entropy[0])))
    });
    backward(&mut group, &bf16_logits, &targets, opts);
    group.finish();
}

/// `copy_floor` and `forkrl_backward` (gradient of H + lse + log p with respect to every logit, into a buffer).
fn backward<E: LogitElement>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    logits: &[E],
    targets: &[u32],
    opts: KernelOptions,
) {
    let stats = token_stats(logits, VOCAB, Some(targets), opts).expect("valid logits");
    let ones = vec![1.0f32; ROWS];
    let grad = StatsGrad { entropy: &ones, logsumexp: &ones, target_logprob: Some(&ones) };
    let mut out = vec![0.0f32; ROWS * VOCAB];
    group.bench_function("copy_floor", |b| {
        b.iter(|| {
            copy_floor(logits, &mut out, VOCAB, opts.threads);
            black_box(out[0])
        })
    });
    group.bench_function("forkrl_backward", |b| {
        b.iter(|| {
            token_stats_backward_into(logits, VOCAB, Some(targets), &stats, grad, opts, &mut out).expect("valid");
            black_box(out[0])
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
