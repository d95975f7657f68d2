//! Throughput of the built-in tiny policy (the `cargo xtask train` default shape: vocab 16, width 64, 4 heads, MLP
//! 192, 2 blocks) on the backend named by `FORKRL_BACKEND` (CPU by default):
//! - sampling 64 rows × 128 new tokens from 8-token prompts with the KV cache, against the same generation
//!   recomputing the prefix at every step (the baseline, measured in the same run);
//! - the same with the built-in EOS id, so that rows stop at different lengths (throughput counts generated tokens);
//! - a training forward + backward (token log-probs → mean → backward) over 64 sequences of 136 tokens, through full
//!   logits (`forward_backward`) and through the fused LM head the trainer uses (`forward_backward_fused_head`).
//!
//! The `*_composed_ops` variants run the same work with attention, RMSNorm and the SwiGLU gate composed from burn
//! operations (`forkrl_core::attention::set_fused(false)`), and `*_composed_norm_mlp` with only RMSNorm and SwiGLU
//! composed (`set_fused_norm_mlp(false)`, the path before those two fused operations), in the same run.
//!
//! `forward_backward_fused_head_glibc_default_allocator` runs first, before the rest turns on
//! `forkrl_core::allocator::retain_freed_memory` (as `forkrl-train` does): the same step under glibc's defaults.
//!
//! `attention_host_64x4x135x16/{forward,backward}`: the attention host kernels alone on one layer of that step.
//!
//! `cargo xtask bench` runs it with the dev profile and prints tokens/s.

use std::hint::black_box;

use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkrl_core::Backend;
use forkrl_entropy::tensor::entropy_and_logprobs;
use forkrl_rollout::Decoding;
use forkrl_trainer::model::{
    policy::{Policy, PolicyConfig},
    sampler::{SamplerConfig, generate},
    token_stats,
    tokenizer::CharTokenizer,
};

const ROWS: usize = 64;
const PROMPT: usize = 8;
const NEW: usize = 128;

/// The training step through the fused head under glibc's default allocator settings, measured before
/// [`bench`] turns on what the `forkrl-train` binary turns on (`forkrl_core::allocator::retain_freed_memory`): the
/// same-run baseline of that setting.
fn allocator_baseline(c: &mut Criterion) {
    let (train_policy, seqs) = train_setup();
    let mut group = c.benchmark_group("policy_tiny_train_64x136");
    group.sample_size(10).throughput(Throughput::Elements((ROWS * (PROMPT + NEW - 1)) as u64));
    group.bench_function("forward_backward_fused_head_glibc_default_allocator", |b| {
        b.iter(|| fused_head_step(&train_policy, &seqs))
    });
    group.finish();
}

/// The policy to train (autodiff device, seed 1) and its batch: `ROWS` sequences of `PROMPT + NEW` tokens.
fn train_setup() -> (Policy, Vec<Vec<u32>>) {
    let device = Backend::from_env().and_then(Backend::device).expect("backend").autodiff();
    device.seed(1);
    let config = PolicyConfig::new(CharTokenizer.vocab_size()).with_max_len(PROMPT + NEW);
    let t = PROMPT + NEW;
    let seqs = (0..ROWS).map(|r| (0..t).map(|i| 2 + ((r * t + i) * 5 % 14) as u32).collect()).collect();
    (config.init(&device).expect("policy"), seqs)
}

/// One training step through the fused head (the trainer's path), under whichever fused operations are on.
fn fused_head_step(policy: &Policy, seqs: &[Vec<u32>]) {
    let (_, logprob) = token_stats(policy, seqs, seqs[0].len() - 1, 1.0).expect("fused head");
    black_box(logprob.mean().neg().backward());
}

fn bench(c: &mut Criterion) {
    // As the `forkrl-train` binary does (forkrl_core::allocator).
    let _ = forkrl_core::allocator::retain_freed_memory();
    let device = Backend::from_env().and_then(Backend::device).expect("backend");
    device.seed(1);
    let config = PolicyConfig::new(CharTokenizer.vocab_size()).with_max_len(PROMPT + NEW);
    let policy = config.init(&device).expect("policy");
    let prompts: Vec<Vec<u32>> =
        (0..ROWS).map(|r| (0..PROMPT).map(|i| 2 + ((r * 7 + i * 3) % 14) as u32).collect()).collect();
    // No EOS: every row generates exactly NEW tokens.
    let sampler = SamplerConfig { max_new_tokens: NEW, eos: Vec::new(), seed: 3, ..SamplerConfig::default() };
    let op = Decoding::Temperature { temperature: 1.0 };

    let mut group = c.benchmark_group("policy_tiny_sampling_64x128");
    group.sample_size(10).throughput(Throughput::Elements((ROWS * NEW) as u64));
    group.bench_function("kv_cache", |b| {
        b.iter(|| black_box(generate(&policy, &prompts, op, &sampler).expect("generates").num_tokens()))
    });
    forkrl_core::attention::set_fused(false);
    group.bench_function("kv_cache_composed_ops", |b| {
        b.iter(|| black_box(generate(&policy, &prompts, op, &sampler).expect("generates").num_tokens()))
    });
    forkrl_core::attention::set_fused(true);
    let recompute = SamplerConfig { use_cache: false, ..sampler.clone() };
    group.bench_function("recompute_prefix", |b| {
        b.iter(|| black_box(generate(&policy, &prompts, op, &recompute).expect("generates").num_tokens()))
    });
    group.finish();

    // With an EOS id, rows stop at different lengths: finished rows leave the active batch.
    let eos_sampler = SamplerConfig { eos: vec![forkrl_trainer::model::tokenizer::EOS], ..sampler.clone() };
    let generated = generate(&policy, &prompts, op, &eos_sampler).expect("generates").num_tokens();
    let mut group = c.benchmark_group("policy_tiny_sampling_eos_64x128");
    group.sample_size(10).throughput(Throughput::Elements(generated as u64));
    group.bench_function("kv_cache", |b| {
        b.iter(|| black_box(generate(&policy, &prompts, op, &eos_sampler).expect("generates").num_tokens()))
    });
    group.finish();

    let (train_policy, seqs) = train_setup();
    let t = PROMPT + NEW;
    let ids: Vec<i64> = (0..ROWS * t).map(|i| 2 + (i * 5 % 14) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [ROWS, t]), &train_policy.device());
    let mut group = c.benchmark_group("policy_tiny_train_64x136");
    group.sample_size(10).throughput(Throughput::Elements((ROWS * (t - 1)) as u64));
    group.bench_function("forward_backward", |b| {
        b.iter(|| {
            let logits = train_policy.forward(ids.clone().narrow(1, 0, t - 1)).expect("forward");
            let (_, logprob) = entropy_and_logprobs(logits, ids.clone().narrow(1, 1, t - 1), 1.0, 4096).expect("lp");
            let grads = logprob.mean().neg().backward();
            black_box(grads)
        })
    });
    let fused_head_step = || fused_head_step(&train_policy, &seqs);
    group.bench_function("forward_backward_fused_head", |b| b.iter(fused_head_step));
    // The same step with RMSNorm and SwiGLU composed (the path before their fused operations), then with attention
    // composed too (the path before any fused model operation).
    forkrl_core::attention::set_fused_norm_mlp(false);
    group.bench_function("forward_backward_fused_head_composed_norm_mlp", |b| b.iter(fused_head_step));
    forkrl_core::attention::set_fused_norm_mlp(true);
    forkrl_core::attention::set_fused(false);
    group.bench_function("forward_backward_fused_head_composed_ops", |b| b.iter(fused_head_step));
    forkrl_core::attention::set_fused(true);
    group.finish();
}

/// The attention host kernels alone on one layer of the training step's shape (64 rows × 4 heads × 135 tokens × 16,
/// causal): what the kernel crates' build settings (`Cargo.toml`'s dev profile) change.
fn attention_kernels(c: &mut Criterion) {
    use forkrl_core::attention::{
        AttentionGrad, AttentionViews, View4, attention_backward_host, attention_forward_host,
    };
    let (b, h, s, d) = (ROWS, 4, PROMPT + NEW - 1, 16);
    let n = b * h * s * d;
    // A fixed LCG in [−1, 1): the same inputs in every run.
    let mut state = 12_345u64;
    let mut values = |count: usize| -> Vec<f32> {
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    };
    let (q, k, v, grad) = (values(n), values(n), values(n), values(n));
    let mask: Vec<u8> = (0..b * s * s).map(|i| u8::from(i % s > (i / s) % s)).collect();
    let shape = [b, h, s, d];
    let x = AttentionViews {
        q: View4::contiguous(&q, shape).expect("shape"),
        k: View4::contiguous(&k, shape).expect("shape"),
        v: View4::contiguous(&v, shape).expect("shape"),
        mask: View4::contiguous(&mask, [b, 1, s, s]).expect("shape"),
    };
    let (mut out, mut lse) = (vec![0.0f32; n], vec![0.0f32; b * h * s]);
    attention_forward_host(&x, &mut out, &mut lse).expect("forward");
    let mut group = c.benchmark_group("attention_host_64x4x135x16");
    group.sample_size(20);
    group.bench_function("forward", |bench| {
        bench.iter(|| attention_forward_host(&x, black_box(&mut out), &mut lse).expect("forward"))
    });
    let g = AttentionGrad {
        grad: View4::contiguous(&grad, shape).expect("shape"),
        out: View4::contiguous(&out, shape).expect("shape"),
        lse: &lse,
    };
    group.bench_function("backward", |bench| {
        bench.iter(|| black_box(attention_backward_host(&x, &g).expect("backward")))
    });
    group.finish();
}

criterion_group!(benches, allocator_baseline, bench, attention_kernels);
criterion_main!(benches);
