//! The real-scale benchmark: a Qwen2.5-0.5B-shaped policy (24 layers, width 896, 14 query / 2 key-value heads, SwiGLU
//! 4864, vocabulary 151,936, tied embeddings) with random weights, built in Rust from the shipped
//! `benches/peers/qwen2.5-0.5b/config.json` (no download), on the CPU backend.
//!
//! One phase per process, so that each reports its own peak resident memory (`VmHWM`):
//!
//! ```text
//! scale prepare DIR   init the policy (seeded), export it as a bf16 Hugging Face checkpoint into DIR
//! scale load DIR      load DIR (bf16 → f32 parameters)
//! scale sample DIR    load, then generate 8 rows × 128 new tokens from 32-token prompts with the KV cache
//! scale grpo DIR      build the trainer on DIR, then one GRPO step of 8 prompts × 4 responses × 256 tokens:
//!                     score (rollout-policy log-probs, no graph) + update (fused-head forward + backward in
//!                     micro-batches of 4 rows, AdamW)
//! ```
//!
//! `FORKRL_SCALE_PROMPTS`, `FORKRL_SCALE_RESPONSE`, `FORKRL_SCALE_CHECKPOINTING=1` and `FORKRL_SCALE_DTYPE=bf16` change
//! the `grpo` phase's prompts, response length, `model.gradient_checkpointing` and `model.dtype` (for quicker or
//! comparative runs).
//!
//! Each prints one JSON line (`phase`, `seconds`, `peak_rss_mib`, and the phase's throughput). `cargo xtask bench
//! --scale` runs the four phases and the PyTorch peer (`benches/peers/scale_peer.py`) and prints the ratios; it never
//! runs in the tests (the GRPO step takes tens of minutes on 2 cores).

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use burn::tensor::Device;
use forkrl_core::Backend;
use forkrl_rollout::Decoding;
use forkrl_trainer::{
    Trainer,
    batch::{Rollout, RolloutBatch},
    config::TrainConfig,
    model::{
        hf,
        hf_export::{ExportSource, char_tokenizer_json, export},
        policy::PolicyConfig,
        sampler::{SamplerConfig, generate},
    },
};

const MAX_LEN: usize = 512;
const SAMPLE_ROWS: usize = 8;
const PROMPT: usize = 32;
const NEW_TOKENS: usize = 128;
const PROMPTS: usize = 8;
const GROUP: usize = 4;
const RESPONSE: usize = 256;
const MICRO: usize = 4;

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/peers/qwen2.5-0.5b")
}

/// Peak and current resident memory of this process, MiB (`VmHWM`, `VmRSS` of `/proc/self/status`).
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Deterministic pseudo-random ids in `2..vocab` (no special id).
fn ids(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            2 + (x % (vocab as u64 - 2)) as u32
        })
        .collect()
}

fn report(phase: &str, seconds: f64, extra: &[(&str, f64)]) {
    let (peak, _) = rss_mib();
    let mut line = format!("{{\"phase\": \"{phase}\", \"seconds\": {seconds:.3}, \"peak_rss_mib\": {peak:.0}");
    for (k, v) in extra {
        line.push_str(&format!(", \"{k}\": {v:.3}"));
    }
    line.push('}');
    println!("{line}");
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Random weights (seeded) exported as a bf16 checkpoint with the built-in character tokenizer (the trainer needs a
/// tokenizer; its ids are a subset of the 151,936 rows).
fn prepare(dir: &Path, device: &Device) -> Res<()> {
    let start = Instant::now();
    let config: PolicyConfig = hf::read_config(&source_dir(), Some(MAX_LEN))?.policy;
    device.seed(0);
    let policy = config.init(device)?;
    // burn initialises lazily: the export reads every parameter, which is when they are drawn.
    export(&policy, &config, ExportSource::HfDir(&source_dir()), dir)?;
    let tokenizer = serde_json::to_string_pretty(&char_tokenizer_json())?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer)?;
    report("prepare", start.elapsed().as_secs_f64(), &[]);
    Ok(())
}

fn load(dir: &Path, device: &Device) -> Res<()> {
    let start = Instant::now();
    let model = hf::load(dir, Some(MAX_LEN), device)?;
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(&model.policy);
    report("load", seconds, &[]);
    Ok(())
}

fn sample(dir: &Path, device: &Device) -> Res<()> {
    let model = hf::load(dir, Some(MAX_LEN), device)?;
    let vocab = model.config.policy.vocab_size;
    let prompts: Vec<Vec<u32>> = (0..SAMPLE_ROWS).map(|r| ids(PROMPT, r as u64 + 1, vocab)).collect();
    // No EOS: every row generates exactly NEW_TOKENS tokens.
    let sampler = SamplerConfig { max_new_tokens: NEW_TOKENS, eos: Vec::new(), seed: 3, ..Default::default() };
    let start = Instant::now();
    let out = generate(&model.policy, &prompts, Decoding::Temperature { temperature: 1.0 }, &sampler)?;
    let seconds = start.elapsed().as_secs_f64();
    report("sample", seconds, &[("tokens_per_s", out.num_tokens() as f64 / seconds)]);
    Ok(())
}

fn grpo(dir: &Path, device: &Device) -> Res<()> {
    // Overrides for smaller or comparative runs: FORKRL_SCALE_PROMPTS, FORKRL_SCALE_RESPONSE,
    // FORKRL_SCALE_CHECKPOINTING=1, FORKRL_SCALE_DTYPE=bf16.
    let var =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(default);
    let (prompts, response) = (var("FORKRL_SCALE_PROMPTS", PROMPTS), var("FORKRL_SCALE_RESPONSE", RESPONSE).max(1));
    let mut config = TrainConfig::default();
    config.model.gradient_checkpointing = var("FORKRL_SCALE_CHECKPOINTING", 0) == 1;
    if std::env::var("FORKRL_SCALE_DTYPE").is_ok_and(|d| d == "bf16") {
        config.model.dtype = forkrl_trainer::model::policy::ComputeDtype::Bf16;
    }
    config.model.hf_dir = Some(dir.to_path_buf());
    config.model.max_len = Some(MAX_LEN);
    config.sft.steps = 0;
    config.eval.size = 4;
    config.rl.group_size = GROUP;
    config.rl.prompts_per_step = prompts;
    config.rl.ppo_epochs = 1;
    config.rl.max_response_len = response;
    config.rl.ppo_micro_batch_size = Some(MICRO);
    let mut trainer = Trainer::new(config.check()?, device)?;
    let (_, after_load) = rss_mib();
    let vocab = trainer.policy_config().vocab_size;
    let eos = trainer.vocab().eos[0];
    let rollouts: Vec<Rollout> = (0..prompts * GROUP)
        .map(|r| {
            let mut response = ids(response - 1, 1000 + r as u64, vocab);
            response.push(eos);
            Rollout {
                prompt: ids(PROMPT, (r / GROUP) as u64 + 1, vocab),
                response,
                truncated: false,
                reward: if r % 2 == 0 { 1.0 } else { 0.0 },
            }
        })
        .collect();
    let mut batch = RolloutBatch::new(1, rollouts, vec![GROUP; prompts], trainer.vocab().pad)?;
    let start = Instant::now();
    trainer.score(&mut batch)?;
    let score = start.elapsed().as_secs_f64();
    std::hint::black_box(trainer.update(&batch)?);
    let seconds = start.elapsed().as_secs_f64();
    let tokens = (prompts * GROUP * response) as f64;
    let extra =
        [("score_seconds", score), ("rss_after_load_mib", after_load), ("response_tokens_per_s", tokens / seconds)];
    report("grpo", seconds, &extra);
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(phase), Some(dir)) = (args.first(), args.get(1)) else {
        return Err("usage: scale prepare|load|sample|grpo DIR".into());
    };
    let dir = PathBuf::from(dir);
    let device = Backend::Cpu.device()?;
    match phase.as_str() {
        "prepare" => prepare(&dir, &device),
        "load" => load(&dir, &device),
        "sample" => sample(&dir, &device),
        "grpo" => grpo(&dir, &device),
        other => Err(format!("unknown phase {other:?}: prepare, load, sample or grpo").into()),
    }
}
