//! The RLVR loop on the built-in task: SFT warm start, then GRPO steps with the 80/20 forking-token mask.
//!
//! One RL step: sample `prompts_per_step` training prompts × `group_size` responses with the decoding operator
//! (`forkrl_rollout::decode_rows`, seeded per row and position) → verify (last number = answer) → GRPO advantages on the
//! full groups (`forkrl_advantage::group_advantages`) → for each of `ppo_epochs` passes: the training forward, entropy
//! and log-probs of exactly the response tokens at the rollout temperature (`forkrl_entropy::tensor`) → the top-ρ
//! forking mask over the batch's response tokens (`forkrl_entropy::top_entropy_mask`), folded into the loss mask with
//! the chosen denominator (`forkrl_advantage::forking_loss_mask`) → the policy loss and its aggregation
//! (`forkrl_advantage::PolicyLoss`) → AdamW with gradient-norm clipping. `log π_old` is the first pass's log-prob, so
//! the first epoch is exactly on-policy and later epochs move the ratios off 1.
//!
//! Sampling uses the KV-cache sampler ([`crate::sampler`]) on an autodiff-free snapshot of the policy.

use std::{io::Write, path::PathBuf, time::Instant};

use burn::{
    grad_clipping::GradientClippingConfig,
    module::Module,
    optim::{AdamWConfig, GradientsParams},
    tensor::{Bool, Device, Int, Tensor, TensorData},
};
use forkrl_advantage::{
    AdvantageConfig, AggMode, ForkingDenominator, PolicyInputs, PolicyLoss, PpoClipConfig, forking_loss_mask,
    group_advantages,
};
use forkrl_core::report::{Panel, Series, line_chart_svg};
use forkrl_entropy::{SelectionRule, tensor::entropy_and_logprobs, top_entropy_mask};
use forkrl_rollout::{Decoding, DynamicSampler, DynamicSamplingConfig, mean_pass_at_k};
use serde::{Deserialize, Serialize};

use crate::{
    TrainerError,
    arithmetic::{ArithmeticConfig, Problem, reward},
    policy::{Policy, PolicyConfig},
    sampler::{self, SamplerConfig},
    smoke::gradient_stats,
    tokenizer::{CharTokenizer, EOS, PAD},
};

type Result<T> = std::result::Result<T, TrainerError>;

/// Run identity and outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run name: outputs go to `<out_dir>/<name>/`.
    pub name: String,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Seed of everything random.
    pub seed: u64,
    /// Backend: cpu, wgpu or cuda.
    pub backend: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { name: "default".into(), out_dir: "runs".into(), seed: 0, backend: "cpu".into() }
    }
}

/// The tiny model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Hidden width.
    pub d_model: usize,
    /// Blocks.
    pub n_layers: usize,
    /// Heads.
    pub n_heads: usize,
    /// MLP width.
    pub d_ff: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { d_model: 64, n_layers: 2, n_heads: 4, d_ff: 192 }
    }
}

/// Supervised warm start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self { steps: 300, batch_size: 64, lr: 3e-3 }
    }
}

/// The RL phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlConfig {
    /// RL steps (rollout batches).
    pub steps: usize,
    /// Prompts per rollout batch.
    pub prompts_per_step: usize,
    /// Responses per prompt (G).
    pub group_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Gradient-norm clip.
    pub grad_clip: f64,
    /// Rollout decoding operator (its temperature is also the training temperature of entropy and log-probs).
    pub decoding: Decoding,
    /// Optimiser passes over each rollout batch.
    pub ppo_epochs: usize,
    /// Forking-token share ρ (1.0 = every token).
    pub top_entropy_ratio: f64,
    /// Denominator of the forking-masked loss.
    pub forking_denominator: ForkingDenominator,
    /// Group advantages.
    pub advantage: AdvantageConfig,
    /// Policy loss.
    pub policy_loss: PolicyLoss,
    /// Aggregation mode.
    pub loss_agg_mode: AggMode,
    /// Longest response in tokens (EOS included).
    pub max_response_len: usize,
    /// DAPO dynamic sampling on the verifiable reward (`None` = off): generation batches are drawn until
    /// `prompts_per_step` groups with mixed outcomes are kept.
    pub dynamic_sampling: Option<DynamicSamplingConfig>,
}

/// The rollouts of one prompt.
struct Group {
    prompt: Vec<u32>,
    responses: Vec<(Vec<u32>, bool)>,
    rewards: Vec<f32>,
}

impl Default for RlConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            prompts_per_step: 16,
            group_size: 8,
            lr: 1e-4,
            grad_clip: 1.0,
            decoding: Decoding::Temperature { temperature: 1.0 },
            ppo_epochs: 2,
            top_entropy_ratio: 0.2,
            forking_denominator: ForkingDenominator::Selected,
            advantage: AdvantageConfig::default(),
            policy_loss: PolicyLoss::Vanilla(PpoClipConfig::clip_higher()),
            loss_agg_mode: AggMode::TokenMean,
            max_response_len: 9,
            dynamic_sampling: None,
        }
    }
}

/// Held-out evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Test problems (greedy pass@1).
    pub size: usize,
    /// Evaluate every this many RL steps.
    pub every: usize,
    /// Samples per problem for unbiased pass@k at the rollout temperature (after SFT and at the end).
    pub pass_k: usize,
    /// Test problems used for pass@k.
    pub pass_k_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { size: 400, every: 20, pass_k: 8, pass_k_size: 100 }
    }
}

/// Everything `cargo xtask train` can set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Run identity.
    pub run: RunConfig,
    /// Model shape.
    pub model: ModelConfig,
    /// The built-in task.
    pub task: ArithmeticConfig,
    /// SFT warm start.
    pub sft: SftConfig,
    /// RL.
    pub rl: RlConfig,
    /// Evaluation.
    pub eval: EvalConfig,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Held-out greedy accuracy after SFT, before RL.
    pub sft_accuracy: f64,
    /// Held-out greedy accuracy after RL.
    pub final_accuracy: f64,
    /// Held-out `(pass@1, pass@k)` of `k` samples at the rollout decoding, after SFT.
    pub sft_pass_at_k: (f64, f64),
    /// The same after RL.
    pub final_pass_at_k: (f64, f64),
    /// `(rl step, held-out accuracy)` at each evaluation.
    pub eval_curve: Vec<(usize, f64)>,
    /// `(rl step, mean training reward)`.
    pub reward_curve: Vec<(usize, f64)>,
    /// `(rl step, mean entropy of the response tokens)`.
    pub entropy_curve: Vec<(usize, f64)>,
    /// Wall time of SFT and RL, seconds.
    pub seconds: f64,
}

fn host_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec_as::<f32>().map_err(|e| TrainerError::Backend(format!("{e:?}")))
}

fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&t| i64::from(t))).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

/// Sequences `prompt ++ response ++ EOS`, right-padded to one width, and the `[B, W−1]` mask of the target positions
/// that are response tokens (position `t` of the targets is token `t + 1` of the sequence).
fn training_batch(prompt_len: usize, rows: &[(Vec<u32>, Vec<u32>)]) -> (Vec<Vec<u32>>, Vec<bool>, usize) {
    let width = rows.iter().map(|(p, r)| p.len() + r.len()).max().unwrap_or(prompt_len);
    let mut seqs = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * (width - 1));
    for (p, r) in rows {
        let mut s = p.clone();
        s.extend(r);
        s.resize(width, PAD);
        seqs.push(s);
        mask.extend((1..width).map(|pos| pos >= prompt_len && pos < p.len() + r.len()));
    }
    (seqs, mask, width - 1)
}

/// Samples one response per prompt row with the KV-cache sampler on an autodiff-free snapshot of the policy.
/// Returns the response ids (EOS included when emitted) and whether the row hit `max_len` without EOS.
fn generate(
    policy: &Policy,
    prompts: &[Vec<u32>],
    decoding: Decoding,
    max_len: usize,
    seed: u64,
) -> Result<Vec<(Vec<u32>, bool)>> {
    let config = SamplerConfig { max_new_tokens: max_len, eos: vec![EOS], pad: PAD, seed, ..SamplerConfig::default() };
    let out = sampler::generate(&policy.valid(), prompts, decoding, &config)?;
    Ok(out.tokens.into_iter().zip(out.truncated).collect())
}

/// Greedy pass@1 on `problems`.
fn evaluate(policy: &Policy, problems: &[Problem], max_len: usize) -> Result<f64> {
    let tok = CharTokenizer;
    let mut correct = 0usize;
    for chunk in problems.chunks(200) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|p| encode(&tok, &p.prompt)).collect::<Result<_>>()?;
        let out = generate(policy, &prompts, Decoding::Greedy, max_len, 0)?;
        correct += chunk.iter().zip(&out).filter(|(p, (r, _))| reward(&tok.decode(r), p.answer) > 0.0).count();
    }
    Ok(correct as f64 / problems.len().max(1) as f64)
}

/// Unbiased `(pass@1, pass@k)` from `k` samples per problem with the rollout decoding operator.
fn evaluate_pass_at_k(policy: &Policy, problems: &[Problem], k: usize, rl: &RlConfig, seed: u64) -> Result<(f64, f64)> {
    let tok = CharTokenizer;
    let mut counts = Vec::with_capacity(problems.len());
    for chunk in problems.chunks((256 / k.max(1)).max(1)) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, k))
            .map(|p| encode(&tok, &p.prompt))
            .collect::<Result<_>>()?;
        let out = generate(policy, &prompts, rl.decoding, rl.max_response_len, seed ^ counts.len() as u64)?;
        for (j, p) in chunk.iter().enumerate() {
            let c = out[j * k..(j + 1) * k].iter().filter(|(r, _)| reward(&tok.decode(r), p.answer) > 0.0).count();
            counts.push((k, c));
        }
    }
    Ok((mean_pass_at_k(&counts, 1)?, mean_pass_at_k(&counts, k)?))
}

fn encode(tok: &CharTokenizer, text: &str) -> Result<Vec<u32>> {
    tok.encode(text).ok_or_else(|| TrainerError::Config(format!("text outside the task vocabulary: {text:?}")))
}

fn check_finite(what: &'static str, v: f32) -> Result<()> {
    if v.is_finite() { Ok(()) } else { Err(TrainerError::NonFinite { what, value: f64::from(v) }) }
}

/// Runs SFT then RL; appends one JSON line of metrics per step to `metrics` and prints progress.
///
/// # Errors
/// Invalid configuration, a non-finite loss (training stops), backend failures, or write errors of the metrics file.
pub fn train(config: &TrainConfig, device: &Device, metrics: &mut dyn Write) -> Result<TrainSummary> {
    let start = Instant::now();
    let (rl, sft) = (&config.rl, &config.sft);
    if rl.group_size < 2 || rl.prompts_per_step == 0 || rl.ppo_epochs == 0 || rl.max_response_len == 0 {
        return Err(TrainerError::Config(
            "rl: group_size >= 2, prompts_per_step, ppo_epochs and max_response_len >= 1".into(),
        ));
    }
    if config.task.max_operand > 99 {
        return Err(TrainerError::Config(format!("task.max_operand = {} must be at most 99", config.task.max_operand)));
    }
    let device = device.clone().autodiff();
    device.seed(config.run.seed);
    let tok = CharTokenizer;
    let prompt_len = 8;
    let m = &config.model;
    let mut policy = PolicyConfig::new(tok.vocab_size())
        .with_d_model(m.d_model)
        .with_n_layers(m.n_layers)
        .with_n_heads(m.n_heads)
        .with_d_ff(m.d_ff)
        .with_max_len(prompt_len + rl.max_response_len + 1)
        .init(&device)?;
    let test = config.task.test_set(config.eval.size);
    let write = |metrics: &mut dyn Write, line: serde_json::Value| -> Result<()> {
        writeln!(metrics, "{line}").map_err(|e| TrainerError::Config(format!("writing metrics: {e}")))
    };

    // SFT on generated chain-of-thought solutions.
    let mut optim =
        AdamWConfig::new().with_grad_clipping(Some(GradientClippingConfig::Norm(rl.grad_clip as f32))).init();
    for step in 0..sft.steps {
        let problems = config.task.sample(sft.batch_size, false, config.run.seed ^ (step as u64) << 8);
        let rows: Vec<(Vec<u32>, Vec<u32>)> = problems
            .iter()
            .map(|p| {
                let mut r = encode(&tok, &p.solution)?;
                r.push(EOS);
                Ok((encode(&tok, &p.prompt)?, r))
            })
            .collect::<Result<_>>()?;
        let (seqs, mask, w) = training_batch(prompt_len, &rows);
        let ids = ids_tensor(&seqs, &device);
        let b = seqs.len();
        let logits = policy.forward(ids.clone().narrow(1, 0, w))?;
        let (_, logprob) = entropy_and_logprobs(logits, ids.narrow(1, 1, w), 1.0, 4096)?;
        let mask_t = Tensor::<2, Bool>::from_data(TensorData::new(mask.clone(), [b, w]), &device);
        let n = mask.iter().filter(|&&x| x).count().max(1);
        let loss = logprob.mask_fill(mask_t.bool_not(), 0.0).sum().neg().div_scalar(n as f32);
        let value = host_f32(loss.clone())?[0];
        check_finite("SFT loss", value)?;
        let grads = GradientsParams::from_grads(loss.backward(), &policy);
        policy = optim.step(sft.lr, policy, grads);
        if step % 25 == 0 || step + 1 == sft.steps {
            println!("sft {step:>4}/{} loss {value:.4}", sft.steps);
            write(metrics, serde_json::json!({"phase": "sft", "step": step, "sft/loss": value}))?;
        }
    }
    let sft_accuracy = evaluate(&policy, &test, rl.max_response_len)?;
    let pass_set = &test[..config.eval.pass_k_size.min(test.len())];
    let k = config.eval.pass_k.max(1);
    let sft_pass = evaluate_pass_at_k(&policy, pass_set, k, rl, config.run.seed)?;
    println!(
        "held-out after SFT: greedy accuracy {sft_accuracy:.3}, pass@1 {:.3}, pass@{k} {:.3}",
        sft_pass.0, sft_pass.1
    );
    write(
        metrics,
        serde_json::json!({"phase": "eval", "step": 0, "eval/acc": sft_accuracy, "eval/pass@1": sft_pass.0, format!("eval/pass@{k}"): sft_pass.1}),
    )?;

    // RL.
    let temperature = match rl.decoding {
        Decoding::Temperature { temperature }
        | Decoding::TopK { temperature, .. }
        | Decoding::TopP { temperature, .. } => temperature,
        _ => 1.0,
    }
    .max(1e-3) as f32;
    let mut optim =
        AdamWConfig::new().with_grad_clipping(Some(GradientClippingConfig::Norm(rl.grad_clip as f32))).init();
    let mut summary = TrainSummary {
        sft_accuracy,
        final_accuracy: sft_accuracy,
        sft_pass_at_k: sft_pass,
        final_pass_at_k: sft_pass,
        eval_curve: vec![(0, sft_accuracy)],
        reward_curve: Vec::new(),
        entropy_curve: Vec::new(),
        seconds: 0.0,
    };
    for step in 1..=rl.steps {
        let t0 = Instant::now();
        // One generation batch: prompts_per_step problems × group_size responses, their rewards.
        let roll = |attempt: u64| -> Result<Vec<Group>> {
            let mix = config.run.seed.wrapping_mul(31) ^ (step as u64) << 20 ^ attempt.wrapping_mul(0x9E37_79B9);
            let problems = config.task.sample(rl.prompts_per_step, false, mix);
            let prompts: Vec<Vec<u32>> = problems
                .iter()
                .flat_map(|p| std::iter::repeat_n(p, rl.group_size))
                .map(|p| encode(&tok, &p.prompt))
                .collect::<Result<_>>()?;
            let seed = config.run.seed ^ (step as u64) << 32 ^ attempt << 48;
            let mut responses = generate(&policy, &prompts, rl.decoding, rl.max_response_len, seed)?.into_iter();
            Ok(problems
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let out: Vec<(Vec<u32>, bool)> = responses.by_ref().take(rl.group_size).collect();
                    let rewards = out.iter().map(|(r, _)| reward(&tok.decode(r), p.answer)).collect();
                    Group { prompt: prompts[i * rl.group_size].clone(), responses: out, rewards }
                })
                .collect())
        };
        let (groups, frac_zero_std_before_filter) = match rl.dynamic_sampling {
            None => (roll(0)?, None),
            Some(ds) => {
                let mut sampler = DynamicSampler::new(rl.prompts_per_step, ds);
                let mut attempt = 0;
                loop {
                    let batch = roll(attempt)?;
                    let acc: Vec<f32> = batch.iter().flat_map(|g| g.rewards.iter().copied()).collect();
                    if let Some(kept) = sampler.add_batch(batch, &acc, &vec![rl.group_size; rl.prompts_per_step])? {
                        break (kept, Some(sampler.frac_zero_std()));
                    }
                    attempt += 1;
                }
            }
        };
        let mut prompts = Vec::with_capacity(groups.len() * rl.group_size);
        let mut responses = Vec::with_capacity(prompts.capacity());
        let mut rewards = Vec::with_capacity(prompts.capacity());
        for g in groups {
            prompts.extend(std::iter::repeat_n(g.prompt, g.responses.len()));
            responses.extend(g.responses);
            rewards.extend(g.rewards);
        }
        let adv = group_advantages(&rewards, &vec![rl.group_size; rewards.len() / rl.group_size], &rl.advantage)?;
        let rows: Vec<(Vec<u32>, Vec<u32>)> =
            prompts.into_iter().zip(responses.iter().map(|(r, _)| r.clone())).collect();
        let (seqs, response_mask, w) = training_batch(prompt_len, &rows);
        let b = seqs.len();
        let ids = ids_tensor(&seqs, &device);
        let targets = ids.clone().narrow(1, 1, w);
        let adv_tokens: Vec<f32> = (0..b * w).map(|i| adv.advantages[i / w]).collect();
        let advantages = Tensor::<2>::from_data(TensorData::new(adv_tokens, [b, w]), &device);
        let mut old_log_prob: Option<Tensor<2>> = None;
        let mut last = serde_json::Map::new();
        for epoch in 0..rl.ppo_epochs {
            let logits = policy.forward(ids.clone().narrow(1, 0, w))?;
            let (entropy, log_prob) = entropy_and_logprobs(logits, targets.clone(), temperature, 4096)?;
            let old = old_log_prob.get_or_insert_with(|| log_prob.clone().detach()).clone();
            let h = host_f32(entropy.detach())?;
            let forking = top_entropy_mask(&h, &response_mask, rl.top_entropy_ratio, SelectionRule::TopK)?;
            let loss_mask = forking_loss_mask(&response_mask, &forking, w, rl.forking_denominator)?;
            let inputs = PolicyInputs {
                log_prob,
                old_log_prob: old,
                advantages: advantages.clone(),
                mask: Tensor::from_data(TensorData::new(loss_mask.loss_mask.clone(), [b, w]), &device),
            };
            let out = rl.policy_loss.compute(
                &inputs,
                rl.loss_agg_mode,
                &loss_mask.denominators,
                step as u64,
                config.run.seed ^ step as u64,
            )?;
            let pg_loss = host_f32(out.loss.clone())?[0];
            check_finite("RL policy loss", pg_loss)?;
            let grads = out.loss.backward();
            let stats = gradient_stats(&policy, &grads);
            if let Some(v) = stats.first_non_finite {
                return Err(TrainerError::NonFinite { what: "RL gradient", value: v });
            }
            let grads = GradientsParams::from_grads(grads, &policy);
            policy = optim.step(rl.lr, policy, grads);
            if epoch + 1 == rl.ppo_epochs {
                let valid: Vec<f32> = h.iter().zip(&response_mask).filter(|(_, m)| **m).map(|(&x, _)| x).collect();
                let mean_h = valid.iter().map(|&x| f64::from(x)).sum::<f64>() / valid.len().max(1) as f64;
                let tokens: usize = responses.iter().map(|(r, _)| r.len()).sum();
                let secs = t0.elapsed().as_secs_f64();
                for (k, v) in [
                    ("actor/pg_loss", f64::from(pg_loss)),
                    ("actor/entropy", mean_h),
                    ("actor/pg_clipfrac", out.metrics.pg_clipfrac),
                    ("actor/pg_clipfrac_lower", out.metrics.pg_clipfrac_lower),
                    ("actor/ppo_kl", out.metrics.ppo_kl),
                    ("actor/grad_norm", stats.norm),
                    ("critic/score/mean", rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / b as f64),
                    (
                        "critic/advantages/max",
                        adv.advantages.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x))),
                    ),
                    ("response_length/mean", tokens as f64 / b as f64),
                    ("response_length/clip_ratio", responses.iter().filter(|(_, t)| *t).count() as f64 / b as f64),
                    ("frac_reward_zero_std", frac_zero_std_before_filter.unwrap_or(adv.frac_reward_zero_std)),
                    ("forking/threshold", forking.threshold.map_or(f64::NAN, f64::from)),
                    ("forking/frac_selected", forking.frac_selected()),
                    ("perf/throughput", tokens as f64 / secs),
                    ("perf/time_per_step", secs),
                ] {
                    last.insert(k.into(), serde_json::json!(v));
                }
                summary.reward_curve.push((step, last["critic/score/mean"].as_f64().unwrap_or(f64::NAN)));
                summary.entropy_curve.push((step, mean_h));
            }
        }
        last.insert("phase".into(), "rl".into());
        last.insert("step".into(), step.into());
        if step % config.eval.every.max(1) == 0 || step == rl.steps {
            let acc = evaluate(&policy, &test, rl.max_response_len)?;
            last.insert("eval/acc".into(), acc.into());
            summary.eval_curve.push((step, acc));
            summary.final_accuracy = acc;
        }
        println!(
            "rl {step:>4}/{} reward {:.3} entropy {:.3} clipfrac {:.3}{}",
            rl.steps,
            last["critic/score/mean"].as_f64().unwrap_or(f64::NAN),
            last["actor/entropy"].as_f64().unwrap_or(f64::NAN),
            last["actor/pg_clipfrac"].as_f64().unwrap_or(f64::NAN),
            last.get("eval/acc").and_then(|v| v.as_f64()).map_or(String::new(), |a| format!(" held-out acc {a:.3}"))
        );
        write(metrics, serde_json::Value::Object(last))?;
    }
    if rl.steps > 0 {
        summary.final_pass_at_k = evaluate_pass_at_k(&policy, pass_set, k, rl, config.run.seed)?;
        let (p1, pk) = summary.final_pass_at_k;
        println!("held-out after RL: pass@1 {p1:.3}, pass@{k} {pk:.3}");
        write(
            metrics,
            serde_json::json!({"phase": "eval", "step": rl.steps, "eval/pass@1": p1, format!("eval/pass@{k}"): pk}),
        )?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The summary as an SVG chart: reward (train) and held-out accuracy, and the entropy of the response tokens, against
/// the RL step (0 = after SFT).
pub fn summary_svg(s: &TrainSummary) -> String {
    let series = |name: &str, pts: &[(usize, f64)]| Series {
        name: name.into(),
        points: pts.iter().map(|&(x, y)| (x as f64, y)).collect(),
    };
    let max_h = s.entropy_curve.iter().map(|p| p.1).fold(0.0, f64::max);
    line_chart_svg(&[
        Panel {
            title: "reward (train) and accuracy (held-out)".into(),
            x_label: "RL step".into(),
            y_max: 1.0,
            series: vec![series("reward", &s.reward_curve), series("held-out accuracy", &s.eval_curve)],
        },
        Panel {
            title: "entropy of response tokens (nats)".into(),
            x_label: "RL step".into(),
            y_max: max_h,
            series: vec![series("entropy", &s.entropy_curve)],
        },
    ])
}
