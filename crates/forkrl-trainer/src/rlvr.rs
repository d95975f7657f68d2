//! The RLVR loop: SFT warm start on the task's worked solutions, then RL steps (GRPO with the 80/20 forking-token
//! mask by default).
//!
//! One RL step: draw `prompts_per_step` training problems → allocate rollouts (uniform `group_size`, HORA after an
//! in-step probe, DAPO dynamic sampling over several generation batches) and sample them with the KV-cache sampler
//! ([`crate::sampler`]) on an autodiff-free snapshot of the policy, each row with its decoding operator (Mixed-CUTS
//! mixes two) and its own (seed, step, row, position) stream → verify ([`crate::task::Problem::reward`]) → group
//! advantages (`forkrl_advantage::group_advantages`) → the rollout policy's log-probs and entropies of the response
//! tokens (`log π_old`, and the inputs of EAPO / OPEFO; SHEAR reads its last-layer hidden states) and the reference
//! policy's log-probs when the KL loss is on → for each of `ppo_epochs` passes over query-preserved mini-batches: the
//! training forward, entropy and log-probs of exactly the response tokens at the rollout temperature, the top-ρ forking
//! mask with its denominator, the actor loss (any `PolicyLoss` or HTPO, aggregation, entropy bonus, KL loss) → AdamW
//! with gradient-norm clipping and warm-up. Checkpoints after SFT, every `checkpoint.every` steps and at the end.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use burn::{
    grad_clipping::GradientClippingConfig,
    module::Module,
    optim::{AdamWConfig, GradientsAccumulator, GradientsParams},
    tensor::{Bool, Device, Int, Tensor, TensorData},
};
use forkrl_advantage::{
    ActorLoss, ActorLossConfig, AdvantageConfig, AggMode, EapoConfig, ForkingDenominator, HtpoConfig, HtpoTokenGroups,
    KlLossConfig, PolicyInputs, PolicyLoss, PpoClipConfig, ShearConfig, actor_loss, aggregate, balance_per_query,
    eapo_advantages, forking_loss_mask, group_advantages, htpo_loss, htpo_token_groups, opefo_advantages,
    query_preserved_minibatches, shear_weights,
};
use forkrl_core::BatchLayout;
use forkrl_core::report::{Panel, Series, line_chart_svg, write_atomic};
use forkrl_entropy::{
    SelectionRule,
    entropy_stats::{EntropySummary, SummaryOptions, summarize},
    tensor::entropy_and_logprobs,
    top_entropy_mask,
};
use forkrl_rollout::{
    BetaPosterior, Decoding, DynamicSampler, DynamicSamplingConfig, HoraConfig, MixedCuts, PosteriorSource,
    hora_allocate_after_probe, mean_pass_at_k,
};
use serde::{Deserialize, Serialize};

use crate::{
    TrainerError, checkpoint, hf, host_f32,
    policy::{Policy, PolicyConfig},
    sampler::{self, SampleRow, SamplerConfig},
    smoke::gradient_stats,
    task::{Problem, Task, TaskConfig},
    tokenizer::{CharTokenizer, EOS, HfTokenizer, PAD, TextTokenizer},
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

/// The policy: the built-in tiny model (trained from scratch), or a Hugging Face checkpoint directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model directory (`config.json`, safetensors, `tokenizer.json`); `None` = the tiny model with
    /// the built-in tasks' character tokenizer. `forkrl-train --model DIR` sets it.
    pub hf_dir: Option<PathBuf>,
    /// Longest prompt + response the policy handles (its RoPE tables); `None`: 64 for the tiny model, the
    /// checkpoint's `max_position_embeddings` capped at 4096 for a Hugging Face model.
    pub max_len: Option<usize>,
    /// Hidden width (tiny model).
    pub d_model: usize,
    /// Blocks (tiny model).
    pub n_layers: usize,
    /// Heads (tiny model).
    pub n_heads: usize,
    /// MLP width (tiny model).
    pub d_ff: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { hf_dir: None, max_len: None, d_model: 64, n_layers: 2, n_heads: 4, d_ff: 192 }
    }
}

/// Checkpoints (written under `runs/<name>/checkpoints/` by `forkrl-train`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many RL steps (also after SFT and after the last step); 0 = only those two.
    pub every: usize,
    /// Keep this many most recent checkpoints (at least 1).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: 50, keep: 2 }
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
        Self { steps: 600, batch_size: 64, lr: 3e-3 }
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
    /// HORA rollout allocation (`None` = `group_size` per prompt). The trainer uses the in-step probe as the count
    /// source (`source = { kind = "probe", n0 = 2 }`): history counts need prompts that recur, which the generated
    /// tasks rarely do. The budget is `prompts_per_step × group_size` rollouts per step.
    pub hora: Option<HoraConfig>,
    /// Mixed-CUTS: each group is `g_std` rollouts with `decoding` and `g_cuts` with CUTS (then `group_size` must be
    /// `g_std + g_cuts`).
    pub mixed_cuts: Option<MixedCuts>,
    /// Token weighting of the advantages, from the rollout policy's entropy and log-probs (before any update).
    pub token_weighting: TokenWeighting,
    /// Prompts per optimiser mini-batch (verl `ppo_mini_batch_size`); `None` = the whole rollout batch. Groups are
    /// never split (query-preserved mini-batches), and the order of the groups is shuffled per epoch.
    pub ppo_mini_batch_size: Option<usize>,
    /// Rows per forward + backward inside a mini-batch (verl `ppo_micro_batch_size_per_gpu`); gradients are
    /// accumulated over the micro-batches and each divides by the mini-batch's global denominators, so the update is
    /// the mini-batch's (up to rounding; Clip-Cov / KL-Cov select their tokens per micro-batch). The forking mask
    /// then comes from an extra forward without a graph over the mini-batch. `None` = one pass per mini-batch.
    pub ppo_micro_batch_size: Option<usize>,
    /// Linear learning-rate warm-up over this many RL steps, as verl's constant-with-warm-up schedule (stepped once
    /// per RL step, `lr · min(1, (step − 1)/warmup)`); 0 = none (the 80/20 paper).
    pub lr_warmup_steps: usize,
    /// Entropy bonus coefficient (verl `entropy_coeff`, 0).
    pub entropy_coeff: f64,
    /// KL loss to the reference policy, the policy as RL starts (verl `use_kl_loss`, `kl_loss_type`,
    /// `kl_loss_coef`); `None` = off (every RLVR recipe of the methods reference).
    pub kl_loss: Option<KlLossConfig>,
    /// HTPO's hierarchical token-level loss (`forkrl_advantage::htpo`) instead of `policy_loss`: token groups from each
    /// mini-batch's entropies (per sequence, over its response tokens) and the group accuracy, then `token-mean`.
    /// The forking mask is not applied (HTPO partitions by entropy itself); not combinable with `kl_loss` or
    /// `entropy_coeff`.
    pub htpo: Option<HtpoConfig>,
    /// Reward-balanced training rows: `per_query` keeps, in each group, as many positive- as non-positive-advantage
    /// rollouts (the first of each sign) and drops the rest from the loss (`forkrl_advantage::balance_per_query`);
    /// a group whose rollouts share one sign is dropped.
    pub balance: Balance,
}

/// Which rollouts of a batch enter the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// All of them.
    #[default]
    None,
    /// Per query, equally many of each advantage sign.
    PerQuery,
}

/// Per-token reweighting of the sequence advantages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenWeighting {
    /// `Â_t = Â` for every token of a response (GRPO).
    #[default]
    None,
    /// EAPO entropy-aware advantages (`forkrl_advantage::eapo`).
    Eapo(EapoConfig),
    /// OPEFO entropy-flow weights (`forkrl_advantage::opefo`).
    Opefo,
    /// SHEAR span-level Wasserstein weights (`forkrl_advantage::shear`) from the rollout policy's last-layer hidden
    /// states. RECONSTRUCTION choice: the hidden state of a response token is the one that emitted it (position
    /// `t − 1`).
    Shear(ShearConfig),
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
            hora: None,
            mixed_cuts: None,
            token_weighting: TokenWeighting::None,
            ppo_mini_batch_size: None,
            ppo_micro_batch_size: None,
            lr_warmup_steps: 0,
            entropy_coeff: 0.0,
            kl_loss: None,
            htpo: None,
            balance: Balance::None,
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
    /// The task (`kind = "arithmetic" | "countdown" | "jsonl"`).
    pub task: TaskConfig,
    /// SFT warm start.
    pub sft: SftConfig,
    /// RL.
    pub rl: RlConfig,
    /// Evaluation.
    pub eval: EvalConfig,
    /// Checkpoints.
    pub checkpoint: CheckpointConfig,
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
    /// `(rl step, mean response length in tokens)`.
    pub response_length_curve: Vec<(usize, f64)>,
    /// Entropy statistics (percentiles, log-spaced histogram) of the response tokens of the last RL batch.
    pub last_batch_entropy: Option<EntropySummary>,
    /// Wall time of SFT and RL, seconds (of this process: a resumed run counts from its resumption).
    pub seconds: f64,
}

/// What a checkpoint records besides the parameters and the optimizer: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The last completed RL step (0: right after SFT).
    pub step: usize,
    /// The run's configuration (a resumed run must match it, `rl.steps` aside).
    pub config: TrainConfig,
    /// The summary so far.
    pub summary: TrainSummary,
    /// Lines of `metrics.jsonl` written so far (a resumed run truncates the file to them).
    pub metrics_lines: usize,
}

/// State file inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";
/// Optimizer file inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// File in the checkpoints folder naming the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";

/// Where checkpoints go and whether to continue from the newest one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpointing {
    /// The checkpoints folder (`runs/<name>/checkpoints`); `None` = no checkpoints.
    pub dir: Option<PathBuf>,
    /// Continue from the checkpoint named by `<dir>/latest`.
    pub resume: bool,
    /// Return right after the checkpoint of this RL step, as a preempted job would stop (skips the final pass@k).
    pub stop_after: Option<usize>,
}

/// The newest complete checkpoint under `dir`, if any.
///
/// # Errors
/// [`TrainerError::Io`] when `latest` exists but cannot be read.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let latest = dir.join(LATEST_FILE);
    if !latest.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).map_err(|source| TrainerError::Io { path: latest.clone(), source })?;
    Ok(Some(dir.join(name.trim())))
}

/// Reads the state of a checkpoint directory.
///
/// # Errors
/// [`TrainerError::Io`] / [`TrainerError::Checkpoint`].
pub fn read_state(checkpoint: &Path) -> Result<TrainState> {
    let path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| TrainerError::Io { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|e| TrainerError::Checkpoint { path, reason: e.to_string() })
}

fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&t| i64::from(t))).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

/// Sequences `prompt ++ response`, right-padded with `pad` to one width, and the `[B, W−1]` mask of the target
/// positions that are response tokens (position `t` of the targets is token `t + 1` of the sequence).
fn training_batch(rows: &[(Vec<u32>, Vec<u32>)], pad: u32) -> (Vec<Vec<u32>>, Vec<bool>, usize) {
    let width = rows.iter().map(|(p, r)| p.len() + r.len()).max().unwrap_or(1).max(2);
    let mut seqs = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * (width - 1));
    for (p, r) in rows {
        let mut s = p.clone();
        s.extend(r);
        s.resize(width, pad);
        seqs.push(s);
        mask.extend((1..width).map(|pos| pos >= p.len() && pos < p.len() + r.len()));
    }
    (seqs, mask, width - 1)
}

/// Entropy and log-prob `[B, W]` of every next token of right-padded sequences `[B, W + 1]` at `temperature`, on the
/// policy's device (with a graph when the policy is on an autodiff device).
fn response_token_stats(p: &Policy, seqs: &[Vec<u32>], w: usize, temperature: f32) -> Result<(Tensor<2>, Tensor<2>)> {
    let ids = ids_tensor(seqs, &p.device());
    let logits = p.forward(ids.clone().narrow(1, 0, w))?;
    Ok(entropy_and_logprobs(logits, ids.narrow(1, 1, w), temperature, 4096)?)
}

/// The policy's tokenizer and special ids.
struct Vocab {
    tok: TextTokenizer,
    eos: Vec<u32>,
    pad: u32,
}

impl Vocab {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode(text)
    }

    fn text(&self, response: &[u32]) -> String {
        self.tok.decode_response(response, &self.eos)
    }
}

/// Samples one response per prompt row with the KV-cache sampler on an autodiff-free snapshot of the policy.
/// Returns the response ids (EOS included when emitted) and whether the row hit `max_new` without EOS.
fn generate(
    policy: &Policy,
    vocab: &Vocab,
    prompts: &[Vec<u32>],
    decoding: Decoding,
    max_new: usize,
    seed: u64,
) -> Result<Vec<(Vec<u32>, bool)>> {
    let config = SamplerConfig {
        max_new_tokens: max_new,
        eos: vocab.eos.clone(),
        pad: vocab.pad,
        seed,
        ..SamplerConfig::default()
    };
    let out = sampler::generate(&policy.valid(), prompts, decoding, &config)?;
    Ok(out.tokens.into_iter().zip(out.truncated).collect())
}

/// Greedy pass@1 on `problems`.
fn evaluate(policy: &Policy, vocab: &Vocab, problems: &[Problem], max_new: usize) -> Result<f64> {
    let mut correct = 0usize;
    for chunk in problems.chunks(200) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|p| vocab.encode(&p.prompt)).collect::<Result<_>>()?;
        let out = generate(policy, vocab, &prompts, Decoding::Greedy, max_new, 0)?;
        correct += chunk.iter().zip(&out).filter(|(p, (r, _))| p.reward(&vocab.text(r)) > 0.0).count();
    }
    Ok(correct as f64 / problems.len().max(1) as f64)
}

/// Unbiased `(pass@1, pass@k)` from `k` samples per problem with the rollout decoding operator.
fn evaluate_pass_at_k(
    policy: &Policy,
    vocab: &Vocab,
    problems: &[Problem],
    k: usize,
    rl: &RlConfig,
    seed: u64,
) -> Result<(f64, f64)> {
    let mut counts = Vec::with_capacity(problems.len());
    for chunk in problems.chunks((256 / k.max(1)).max(1)) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, k))
            .map(|p| vocab.encode(&p.prompt))
            .collect::<Result<_>>()?;
        let out = generate(policy, vocab, &prompts, rl.decoding, rl.max_response_len, seed ^ counts.len() as u64)?;
        for (j, p) in chunk.iter().enumerate() {
            let c = out[j * k..(j + 1) * k].iter().filter(|(r, _)| p.reward(&vocab.text(r)) > 0.0).count();
            counts.push((k, c));
        }
    }
    if counts.is_empty() {
        return Ok((f64::NAN, f64::NAN));
    }
    Ok((mean_pass_at_k(&counts, 1)?, mean_pass_at_k(&counts, k)?))
}

fn check_finite(what: &'static str, v: f32) -> Result<()> {
    if v.is_finite() { Ok(()) } else { Err(TrainerError::NonFinite { what, value: f64::from(v) }) }
}

/// Counts the metrics lines it writes.
struct Metrics<'a> {
    out: &'a mut dyn Write,
    lines: usize,
}

impl Metrics<'_> {
    fn write(&mut self, line: serde_json::Value) -> Result<()> {
        writeln!(self.out, "{line}").map_err(|e| TrainerError::Config(format!("writing metrics: {e}")))?;
        self.lines += 1;
        Ok(())
    }
}

/// Prints a progress line: on a terminal, steps overwrite each other in place and `keep` lines (evaluations) stay;
/// elsewhere (a log file, CI) every line is kept.
fn progress(line: &str, keep: bool) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        print!("\r\x1b[2K{line}{}", if keep { "\n" } else { "" });
        let _ = std::io::stdout().flush();
    } else {
        println!("{line}");
    }
}

/// A 20-character progress bar, `[#####---------------]`.
fn bar(done: usize, total: usize) -> String {
    let filled = (done * 20).checked_div(total).unwrap_or(20).min(20);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled))
}

fn validate(config: &TrainConfig) -> Result<()> {
    let (rl, sft) = (&config.rl, &config.sft);
    if rl.group_size < 2 || rl.prompts_per_step == 0 || rl.ppo_epochs == 0 || rl.max_response_len == 0 {
        return Err(TrainerError::Config(
            "rl: group_size >= 2, prompts_per_step, ppo_epochs and max_response_len >= 1".into(),
        ));
    }
    for (name, lr) in [("rl.lr", rl.lr), ("sft.lr", sft.lr), ("rl.grad_clip", rl.grad_clip)] {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(TrainerError::Config(format!("{name} = {lr} must be finite and > 0")));
        }
    }
    if sft.steps > 0 && sft.batch_size == 0 {
        return Err(TrainerError::Config("sft.batch_size must be >= 1".into()));
    }
    if config.checkpoint.keep == 0 {
        return Err(TrainerError::Config("checkpoint.keep must be >= 1".into()));
    }
    rl.decoding.validate()?;
    if let Some(m) = &rl.mixed_cuts {
        if m.g_std + m.g_cuts != rl.group_size || m.g_cuts == 0 {
            return Err(TrainerError::Config(format!(
                "rl.mixed_cuts: g_std + g_cuts = {} + {} must equal rl.group_size = {} (and g_cuts >= 1)",
                m.g_std, m.g_cuts, rl.group_size
            )));
        }
        Decoding::Cuts(m.cuts).validate()?;
    }
    if let Some(h) = &rl.hora {
        let PosteriorSource::Probe { n0 } = h.source else {
            return Err(TrainerError::Config(
                "rl.hora.source: the trainer supports the in-step probe only (source = { kind = \"probe\", n0 = 2 })"
                    .into(),
            ));
        };
        if n0 == 0 || n0 >= rl.group_size || h.min_per_prompt < 2 {
            return Err(TrainerError::Config(format!(
                "rl.hora: 1 <= n0 = {n0} < group_size = {} and min_per_prompt = {} >= 2",
                rl.group_size, h.min_per_prompt
            )));
        }
    }
    if let Some(h) = &rl.htpo {
        h.validate()?;
        if rl.kl_loss.is_some() || rl.entropy_coeff != 0.0 {
            return Err(TrainerError::Config(
                "rl.htpo replaces the actor loss: unset rl.kl_loss and rl.entropy_coeff".into(),
            ));
        }
    }
    if rl.ppo_micro_batch_size == Some(0) {
        return Err(TrainerError::Config("rl.ppo_micro_batch_size must be >= 1 row".into()));
    }
    if rl.ppo_mini_batch_size == Some(0) {
        return Err(TrainerError::Config("rl.ppo_mini_batch_size must be >= 1 prompt".into()));
    }
    if !rl.entropy_coeff.is_finite() {
        return Err(TrainerError::Config(format!("rl.entropy_coeff = {} must be finite", rl.entropy_coeff)));
    }
    if let Some(kl) = rl.kl_loss.filter(|kl| !(kl.kl_loss_coef.is_finite() && kl.kl_loss_coef >= 0.0)) {
        return Err(TrainerError::Config(format!("rl.kl_loss.kl_loss_coef = {} must be >= 0", kl.kl_loss_coef)));
    }
    Ok(())
}

/// The flat positions of each row's response tokens in a row-major `[B, W]` mask, the rows' lengths, and the longest
/// (at least 1): the layout of the same tokens moved to the left of each row, as `BatchLayout` expects them.
fn response_positions(mask: &[bool], w: usize) -> (Vec<Vec<usize>>, Vec<usize>, usize) {
    let b = mask.len() / w.max(1);
    let positions: Vec<Vec<usize>> = (0..b).map(|r| (r * w..(r + 1) * w).filter(|&i| mask[i]).collect()).collect();
    let lengths: Vec<usize> = positions.iter().map(Vec::len).collect();
    let width = lengths.iter().copied().max().unwrap_or(0).max(1);
    (positions, lengths, width)
}

/// HTPO's token groups for a `[B, W]` mini-batch whose response tokens (`mask`) sit after the prompt: the
/// partition is computed on the response tokens moved to the left of each row, then mapped back.
fn htpo_groups(
    entropy: &[f32],
    mask: &[bool],
    w: usize,
    group_sizes: &[usize],
    correct: &[bool],
    config: &HtpoConfig,
) -> Result<HtpoTokenGroups> {
    let (positions, lengths, width) = response_positions(mask, w);
    let b = positions.len();
    let mut compact = vec![0.0f32; b * width];
    for (r, pos) in positions.iter().enumerate() {
        for (j, &i) in pos.iter().enumerate() {
            compact[r * width + j] = entropy[i];
        }
    }
    let layout = BatchLayout::from_lengths(group_sizes, &lengths, width)?;
    let g = htpo_token_groups(&compact, &layout, correct, config)?;
    let mut out = HtpoTokenGroups {
        hard_correct_high: vec![false; b * w],
        wrong_high: vec![false; b * w],
        dropped: vec![false; b * w],
        hard: g.hard.clone(),
    };
    for (r, pos) in positions.iter().enumerate() {
        for (j, &i) in pos.iter().enumerate() {
            out.hard_correct_high[i] = g.hard_correct_high[r * width + j];
            out.wrong_high[i] = g.wrong_high[r * width + j];
            out.dropped[i] = g.dropped[r * width + j];
        }
    }
    Ok(out)
}

/// SHEAR's per-token weights ω for a `[B, W]` batch whose response tokens (`mask`) sit after the prompt: computed on
/// the response tokens' hidden states moved to the left of each row, then mapped back (1 off the response).
fn shear_token_weights(
    hidden: &[f32],
    dim: usize,
    mask: &[bool],
    w: usize,
    group_sizes: &[usize],
    advantages: &[f32],
    config: &ShearConfig,
) -> Result<Vec<f32>> {
    let (positions, lengths, width) = response_positions(mask, w);
    let b = positions.len();
    let mut compact = vec![0.0f32; b * width * dim];
    for (r, pos) in positions.iter().enumerate() {
        for (j, &i) in pos.iter().enumerate() {
            compact[(r * width + j) * dim..(r * width + j + 1) * dim].copy_from_slice(&hidden[i * dim..(i + 1) * dim]);
        }
    }
    let layout = BatchLayout::from_lengths(group_sizes, &lengths, width)?;
    let omega = shear_weights(&compact, dim, &layout, advantages, config)?;
    let mut out = vec![1.0f32; b * w];
    for (r, pos) in positions.iter().enumerate() {
        for (j, &i) in pos.iter().enumerate() {
            out[i] = omega[r * width + j];
        }
    }
    Ok(out)
}

/// Samples the rollout groups of one generation batch: per prompt, `group_size` rollouts (Mixed-CUTS: `g_std` with
/// `decoding`, `g_cuts` with CUTS), or with HORA, `n0` probe rollouts per prompt then the rest of the budget
/// allocated by `hora_allocate_after_probe`. Row ids run over the batch, so every rollout has its own stream.
fn sample_groups(policy: &Policy, vocab: &Vocab, problems: &[Problem], rl: &RlConfig, seed: u64) -> Result<Vec<Group>> {
    let prompts: Vec<Vec<u32>> = problems.iter().map(|p| vocab.encode(&p.prompt)).collect::<Result<_>>()?;
    let ops = match &rl.mixed_cuts {
        Some(m) => m.operators(rl.decoding),
        None => vec![rl.decoding; rl.group_size],
    };
    let snapshot = policy.valid();
    let config = SamplerConfig {
        max_new_tokens: rl.max_response_len,
        eos: vocab.eos.clone(),
        pad: vocab.pad,
        seed,
        ..SamplerConfig::default()
    };
    let mut next_id = 0u64;
    let mut per_prompt: Vec<Vec<(Vec<u32>, bool, f32)>> = vec![Vec::new(); problems.len()];
    let mut run = |requests: &[(usize, Decoding)], per_prompt: &mut Vec<Vec<(Vec<u32>, bool, f32)>>| -> Result<()> {
        let rows: Vec<SampleRow<'_>> = requests
            .iter()
            .enumerate()
            .map(|(k, &(i, op))| SampleRow { prompt: &prompts[i], op, row_id: next_id + k as u64 })
            .collect();
        next_id += requests.len() as u64;
        let out = sampler::generate_rows(&snapshot, &rows, &config)?;
        for (&(i, _), (tokens, truncated)) in requests.iter().zip(out.tokens.into_iter().zip(out.truncated)) {
            let reward = problems[i].reward(&vocab.text(&tokens));
            per_prompt[i].push((tokens, truncated, reward));
        }
        Ok(())
    };
    let counts: Vec<usize> = match &rl.hora {
        None => vec![rl.group_size; problems.len()],
        Some(h) => {
            let PosteriorSource::Probe { n0 } = h.source else {
                return Err(TrainerError::Config("rl.hora.source must be the probe".into()));
            };
            let probe: Vec<(usize, Decoding)> =
                (0..problems.len()).flat_map(|i| (0..n0).map(move |j| (i, j))).map(|(i, j)| (i, ops[j])).collect();
            run(&probe, &mut per_prompt)?;
            let posteriors: Vec<BetaPosterior> = per_prompt
                .iter()
                .map(|rows| {
                    let hits = rows.iter().filter(|r| r.2 > 0.0).count() as f64;
                    BetaPosterior::from_counts(hits, rows.len() as f64 - hits, h.prior_a, h.prior_b)
                })
                .collect::<std::result::Result<_, _>>()?;
            let max = h.max_per_prompt.unwrap_or(4 * rl.group_size);
            hora_allocate_after_probe(&posteriors, problems.len() * rl.group_size, n0, h.min_per_prompt, max)?.counts
        }
    };
    let rest: Vec<(usize, Decoding)> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| (per_prompt[i].len()..c).map(move |j| (i, j)))
        .map(|(i, j)| (i, ops[j % ops.len()]))
        .collect();
    run(&rest, &mut per_prompt)?;
    Ok(per_prompt
        .into_iter()
        .zip(prompts)
        .filter(|(rows, _)| !rows.is_empty())
        .map(|(rows, prompt)| {
            let (responses, rewards) = rows.into_iter().map(|(t, tr, r)| ((t, tr), r)).unzip();
            Group { prompt, responses, rewards }
        })
        .collect())
}

/// Builds the policy (on the autodiff `device`) and its vocabulary.
fn build_model(config: &TrainConfig, device: &Device) -> Result<(Policy, PolicyConfig, Vocab)> {
    let m = &config.model;
    match &m.hf_dir {
        Some(dir) => {
            let model = hf::load(dir, Some(m.max_len.unwrap_or(4096)), device)?;
            let tok = HfTokenizer::from_file(&dir.join("tokenizer.json"))?;
            // Every id the tokenizer can produce must have an embedding row.
            if tok.vocab_size() > model.config.policy.vocab_size {
                return Err(TrainerError::Tokenizer(format!(
                    "{}: the tokenizer has {} ids, the model's embedding only {} rows",
                    dir.display(),
                    tok.vocab_size(),
                    model.config.policy.vocab_size
                )));
            }
            let eos = model.config.special.eos.clone();
            let Some(&first_eos) = eos.first() else {
                return Err(TrainerError::HfConfig {
                    path: dir.join("config.json"),
                    reason: "no `eos_token_id` in config.json or generation_config.json".into(),
                });
            };
            let pad = model.config.special.pad.unwrap_or(first_eos);
            Ok((model.policy, model.config.policy, Vocab { tok: TextTokenizer::Hf(Box::new(tok)), eos, pad }))
        }
        None => {
            let tok = CharTokenizer;
            let pc = PolicyConfig::new(tok.vocab_size())
                .with_d_model(m.d_model)
                .with_n_layers(m.n_layers)
                .with_n_heads(m.n_heads)
                .with_d_ff(m.d_ff)
                .with_max_len(m.max_len.unwrap_or(64));
            let policy = pc.init(device)?;
            Ok((policy, pc, Vocab { tok: TextTokenizer::Char(tok), eos: vec![EOS], pad: PAD }))
        }
    }
}

/// The optimizer's save/load, named so the checkpoint code does not depend on burn's concrete optimizer type.
trait OptimizerState: Sized {
    fn save_to(&self, path: &Path) -> Result<()>;
    fn load_from(self, path: &Path) -> Result<Self>;
}

impl OptimizerState for burn::optim::ModuleOptimizer {
    fn save_to(&self, path: &Path) -> Result<()> {
        self.save(path).map_err(|e| TrainerError::Checkpoint { path: path.to_path_buf(), reason: format!("{e:?}") })
    }

    fn load_from(self, path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(TrainerError::Checkpoint {
                path: path.to_path_buf(),
                reason: "optimizer state missing".into(),
            });
        }
        self.load(path).map_err(|e| TrainerError::Checkpoint { path: path.to_path_buf(), reason: format!("{e:?}") })
    }
}

fn save_checkpoint(
    dir: &Path,
    keep: usize,
    policy: &Policy,
    policy_config: &PolicyConfig,
    optim: &impl OptimizerState,
    state: &TrainState,
) -> Result<()> {
    let name = format!("step-{:06}", state.step);
    let target = dir.join(&name);
    checkpoint::write_dir_atomic(&target, |tmp| {
        checkpoint::write_policy_files(policy, policy_config, tmp)?;
        optim.save_to(&tmp.join(OPTIMIZER_FILE))?;
        let state_path = tmp.join(STATE_FILE);
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| TrainerError::Checkpoint { path: state_path.clone(), reason: e.to_string() })?;
        std::fs::write(&state_path, json).map_err(|source| TrainerError::Io { path: state_path, source })
    })?;
    let latest = dir.join(LATEST_FILE);
    write_atomic(&latest, &name).map_err(|source| TrainerError::Io { path: latest, source })?;
    // Drop the oldest step-* directories beyond `keep`.
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| TrainerError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-") && !n.contains('.'))
        })
        .collect();
    steps.sort();
    for old in steps.iter().take(steps.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(old).map_err(|source| TrainerError::Io { path: old.clone(), source })?;
    }
    Ok(())
}

/// Runs SFT then RL without checkpoints; appends one JSON line of metrics per step to `metrics` and prints progress.
///
/// # Errors
/// As [`train_with_checkpoints`].
pub fn train(config: &TrainConfig, device: &Device, metrics: &mut dyn Write) -> Result<TrainSummary> {
    train_with_checkpoints(config, device, metrics, &Checkpointing::default())
}

/// Runs SFT then RL, saving checkpoints into `ckpt.dir` (after SFT, every `checkpoint.every` RL steps and after the
/// last one: parameters, optimizer state, step, summary and metrics count), or continuing from the newest one when
/// `ckpt.resume`. Sampling streams depend only on (seed, step, row, position) and training data only on (seed, step),
/// so a resumed run repeats exactly what an uninterrupted run does; `metrics` must then hold the first
/// `state.metrics_lines` lines already (the binary truncates `metrics.jsonl` to them).
///
/// # Errors
/// Invalid configuration; a checkpoint that does not match the configuration; a non-finite loss or gradient (training
/// stops; checkpoints written before remain the last good ones); backend failures; write errors.
pub fn train_with_checkpoints(
    config: &TrainConfig,
    device: &Device,
    metrics: &mut dyn Write,
    ckpt: &Checkpointing,
) -> Result<TrainSummary> {
    let start = Instant::now();
    validate(config)?;
    let (rl, sft) = (&config.rl, &config.sft);
    let task = Task::new(&config.task)?;
    let device = device.clone().autodiff();
    device.seed(config.run.seed);
    let (mut policy, policy_config, vocab) = build_model(config, &device)?;
    let test = task.test_set(config.eval.size);
    let pass_set = &test[..config.eval.pass_k_size.min(test.len())];
    let k = config.eval.pass_k.max(1);
    let mut metrics = Metrics { out: metrics, lines: 0 };
    let new_optim =
        || AdamWConfig::new().with_grad_clipping(Some(GradientClippingConfig::Norm(rl.grad_clip as f32))).init();
    let mut optim = new_optim();

    let resume_from = match (&ckpt.dir, ckpt.resume) {
        (Some(dir), true) => Some(latest_checkpoint(dir)?.ok_or_else(|| TrainerError::Checkpoint {
            path: dir.clone(),
            reason: "--resume: no checkpoint to resume from".into(),
        })?),
        _ => None,
    };
    let (first_step, mut summary) = if let Some(from) = resume_from {
        let state = read_state(&from)?;
        let mut theirs = state.config.clone();
        theirs.rl.steps = rl.steps;
        if theirs != *config {
            return Err(TrainerError::Checkpoint {
                path: from.join(STATE_FILE),
                reason: "the checkpoint was written with another configuration (only rl.steps may change on resume)"
                    .into(),
            });
        }
        let (loaded, loaded_config) = checkpoint::load_policy(&from, &device)?;
        if loaded_config != policy_config {
            return Err(TrainerError::Checkpoint {
                path: from.join(checkpoint::CONFIG_FILE),
                reason: "the checkpoint's policy shape differs from the configuration's".into(),
            });
        }
        policy = loaded;
        optim = optim.load_from(&from.join(OPTIMIZER_FILE))?;
        metrics.lines = state.metrics_lines;
        println!("resuming from {} (RL step {})", from.display(), state.step);
        (state.step + 1, state.summary)
    } else {
        // SFT on the task's worked solutions.
        if sft.steps > 0 && !task.has_solutions() {
            return Err(TrainerError::Config(
                "sft.steps > 0 but the dataset has no worked solutions (`solution`, or a GSM8K `answer` with ####); \
                 set sft.steps = 0"
                    .into(),
            ));
        }
        let mut sft_optim = new_optim();
        for step in 0..sft.steps {
            let problems = task.sample(sft.batch_size, config.run.seed ^ (step as u64) << 8);
            let rows: Vec<(Vec<u32>, Vec<u32>)> = problems
                .iter()
                .map(|p| {
                    let mut r = vocab.encode(p.solution.as_deref().unwrap_or_default())?;
                    r.push(vocab.eos[0]);
                    Ok((vocab.encode(&p.prompt)?, r))
                })
                .collect::<Result<_>>()?;
            let (seqs, mask, w) = training_batch(&rows, vocab.pad);
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
            policy = sft_optim.step(sft.lr, policy, grads);
            if step % 25 == 0 || step + 1 == sft.steps {
                let line = format!("sft {} {step:>4}/{} loss {value:.4}", bar(step + 1, sft.steps), sft.steps);
                progress(&line, step + 1 == sft.steps);
                metrics.write(serde_json::json!({"phase": "sft", "step": step, "sft/loss": value}))?;
            }
        }
        let sft_accuracy = evaluate(&policy, &vocab, &test, rl.max_response_len)?;
        let sft_pass = evaluate_pass_at_k(&policy, &vocab, pass_set, k, rl, config.run.seed)?;
        println!(
            "held-out after SFT: greedy accuracy {sft_accuracy:.3}, pass@1 {:.3}, pass@{k} {:.3}",
            sft_pass.0, sft_pass.1
        );
        metrics.write(
            serde_json::json!({"phase": "eval", "step": 0, "eval/acc": sft_accuracy, "eval/pass@1": sft_pass.0, format!("eval/pass@{k}"): sft_pass.1}),
        )?;
        let summary = TrainSummary {
            sft_accuracy,
            final_accuracy: sft_accuracy,
            sft_pass_at_k: sft_pass,
            final_pass_at_k: sft_pass,
            eval_curve: vec![(0, sft_accuracy)],
            reward_curve: Vec::new(),
            entropy_curve: Vec::new(),
            response_length_curve: Vec::new(),
            last_batch_entropy: None,
            seconds: 0.0,
        };
        if let Some(dir) = &ckpt.dir {
            let state =
                TrainState { step: 0, config: config.clone(), summary: summary.clone(), metrics_lines: metrics.lines };
            save_checkpoint(dir, config.checkpoint.keep, &policy, &policy_config, &optim, &state)?;
        }
        (1, summary)
    };

    // The reference policy of the KL loss: the policy as RL starts, saved beside the checkpoints so that a resumed run
    // keeps it.
    let reference = match (&rl.kl_loss, &ckpt.dir) {
        (None, _) => None,
        (Some(_), Some(dir)) if first_step > 1 => {
            Some(checkpoint::load_policy(&dir.join("reference"), &device)?.0.valid())
        }
        (Some(_), dir) => {
            if let Some(dir) = dir {
                checkpoint::save_policy(&policy, &policy_config, &dir.join("reference"))?;
            }
            Some(policy.valid())
        }
    };

    // RL.
    let temperature = match rl.decoding {
        Decoding::Temperature { temperature }
        | Decoding::TopK { temperature, .. }
        | Decoding::TopP { temperature, .. } => temperature,
        _ => 1.0,
    }
    .max(1e-3) as f32;
    let rl_start = Instant::now();
    for step in first_step..=rl.steps {
        let t0 = Instant::now();
        // One generation batch: prompts_per_step problems × group_size responses, their rewards.
        let roll = |attempt: u64| -> Result<Vec<Group>> {
            let mix = config.run.seed.wrapping_mul(31) ^ (step as u64) << 20 ^ attempt.wrapping_mul(0x9E37_79B9);
            let problems = task.sample(rl.prompts_per_step, mix);
            let seed = config.run.seed ^ (step as u64) << 32 ^ attempt << 48;
            sample_groups(&policy, &vocab, &problems, rl, seed)
        };
        let (groups, frac_zero_std_before_filter) = match rl.dynamic_sampling {
            None => (roll(0)?, None),
            Some(ds) => {
                let mut sampler = DynamicSampler::new(rl.prompts_per_step, ds);
                let mut attempt = 0;
                loop {
                    let batch = roll(attempt)?;
                    let acc: Vec<f32> = batch.iter().flat_map(|g| g.rewards.iter().copied()).collect();
                    let sizes: Vec<usize> = batch.iter().map(|g| g.responses.len()).collect();
                    if let Some(kept) = sampler.add_batch(batch, &acc, &sizes)? {
                        break (kept, Some(sampler.frac_zero_std()));
                    }
                    attempt += 1;
                }
            }
        };
        let sizes: Vec<usize> = groups.iter().map(|g| g.responses.len()).collect();
        let mut prompts = Vec::with_capacity(sizes.iter().sum());
        let mut responses = Vec::with_capacity(prompts.capacity());
        let mut rewards = Vec::with_capacity(prompts.capacity());
        for g in groups {
            prompts.extend(std::iter::repeat_n(g.prompt, g.responses.len()));
            responses.extend(g.responses);
            rewards.extend(g.rewards);
        }
        let adv = group_advantages(&rewards, &sizes, &rl.advantage)?;
        let rows: Vec<(Vec<u32>, Vec<u32>)> =
            prompts.into_iter().zip(responses.iter().map(|(r, _)| r.clone())).collect();
        let (seqs, response_mask, w) = training_batch(&rows, vocab.pad);
        let b = seqs.len();
        // The rollout policy's log-probs and entropy of the response tokens (no graph): `log π_old` of every
        // mini-batch, and the inputs of token weighting. The reference policy's log-probs for the KL loss.
        let no_grad = |p: &Policy| -> Result<(Vec<f32>, Vec<f32>)> {
            let (h, lp) = response_token_stats(p, &seqs, w, temperature)?;
            Ok((host_f32(h)?, host_f32(lp)?))
        };
        let (old_entropy, old_log_prob) = no_grad(&policy.valid())?;
        let ref_log_prob = reference.as_ref().map(|r| no_grad(r).map(|(_, lp)| lp)).transpose()?;
        let seq_adv: Vec<f32> = (0..b * w).map(|i| adv.advantages[i / w]).collect();
        let token_adv = match rl.token_weighting {
            TokenWeighting::None => seq_adv,
            TokenWeighting::Eapo(c) => eapo_advantages(&seq_adv, &old_entropy, &response_mask, &c)?,
            TokenWeighting::Opefo => opefo_advantages(&seq_adv, &old_log_prob, &old_entropy, &response_mask)?.0,
            TokenWeighting::Shear(c) => {
                let snapshot = policy.valid();
                let ids = ids_tensor(&seqs, &snapshot.device());
                let hidden = snapshot.hidden_states(ids.narrow(1, 0, w))?;
                let dim = hidden.dims()[2];
                let omega =
                    shear_token_weights(&host_f32(hidden)?, dim, &response_mask, w, &sizes, &adv.advantages, &c)?;
                seq_adv.iter().zip(&omega).map(|(a, o)| a * o).collect()
            }
        };
        // The rows that enter the loss.
        let mut train_mask = response_mask.clone();
        if rl.balance == Balance::PerQuery {
            let positive: Vec<bool> = adv.advantages.iter().map(|&a| a > 0.0).collect();
            let keep = balance_per_query(&positive, &sizes)?;
            for (r, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
                train_mask[r * w..(r + 1) * w].fill(false);
            }
        }
        let group_of: Vec<usize> = sizes.iter().enumerate().flat_map(|(g, &n)| std::iter::repeat_n(g, n)).collect();
        let actor = ActorLossConfig {
            policy_loss: rl.policy_loss.clone(),
            loss_agg_mode: rl.loss_agg_mode,
            entropy_coeff: rl.entropy_coeff,
            kl_loss: rl.kl_loss,
        };
        let lr = if rl.lr_warmup_steps == 0 {
            rl.lr
        } else {
            rl.lr * ((step - 1) as f64 / rl.lr_warmup_steps as f64).min(1.0)
        };
        let rows_per_mb =
            rl.ppo_mini_batch_size.map(|p| (p * rl.group_size).max(sizes.iter().copied().max().unwrap_or(1)));
        // Averages over the mini-batches of the last epoch.
        let (mut pg_sum, mut clip_sum, mut clip_low_sum, mut kl_sum, mut norm_sum, mut ent_sum, mut kl_loss_sum) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let (mut last_forking, mut n_mb) = (None, 0usize);
        for epoch in 0..rl.ppo_epochs {
            let batches = match rows_per_mb {
                None => vec![(0..b).collect::<Vec<usize>>()],
                Some(rows) => query_preserved_minibatches(
                    &sizes,
                    rows,
                    true,
                    Some(config.run.seed ^ (step as u64) << 16 ^ epoch as u64),
                )?,
            };
            let last_epoch = epoch + 1 == rl.ppo_epochs;
            for idx in &batches {
                let mb = idx.len();
                let mb_mask: Vec<bool> =
                    idx.iter().flat_map(|&r| train_mask[r * w..(r + 1) * w].iter().copied()).collect();
                if !mb_mask.iter().any(|&m| m) {
                    continue; // every row of this mini-batch was balanced away
                }
                let micro = rl.ppo_micro_batch_size.unwrap_or(mb).clamp(1, mb);
                // Rows `rows` (indices into `idx`) of a [B, W] host array, and its tensor.
                let take = |v: &[f32], rows: &[usize]| -> Vec<f32> {
                    rows.iter().flat_map(|&k| v[idx[k] * w..(idx[k] + 1) * w].iter().copied()).collect()
                };
                let tensor = |v: Vec<f32>, n: usize| Tensor::<2>::from_data(TensorData::new(v, [n, w]), &device);
                let forward = |p: &Policy, rows: &[usize]| -> Result<(Tensor<2>, Tensor<2>)> {
                    let chunk: Vec<Vec<u32>> = rows.iter().map(|&k| seqs[idx[k]].clone()).collect();
                    response_token_stats(p, &chunk, w, temperature)
                };
                let all: Vec<usize> = (0..mb).collect();
                // The forking mask and the denominators cover the whole mini-batch and come from the current
                // policy's entropy: from the training forward itself when the mini-batch is one micro-batch, else
                // from a forward without a graph first.
                let mut whole = None;
                let h = if micro == mb {
                    let (entropy, log_prob) = forward(&policy, &all)?;
                    let h = host_f32(entropy.clone().detach())?;
                    whole = Some((entropy, log_prob));
                    h
                } else {
                    host_f32(forward(&policy.valid(), &all)?.0)?
                };
                let rho = if rl.htpo.is_some() { 1.0 } else { rl.top_entropy_ratio };
                let forking = top_entropy_mask(&h, &mb_mask, rho, SelectionRule::TopK)?;
                let loss_mask = forking_loss_mask(&mb_mask, &forking, w, rl.forking_denominator)?;
                let htpo_groups_mb = match &rl.htpo {
                    None => None,
                    Some(hc) => {
                        let correct: Vec<bool> = idx.iter().map(|&r| rewards[r] > 0.0).collect();
                        let mut mb_sizes: Vec<usize> = Vec::new();
                        for (k, &r) in idx.iter().enumerate() {
                            match mb_sizes.len() {
                                n if n > 0 && group_of[idx[k - 1]] == group_of[r] => mb_sizes[n - 1] += 1,
                                _ => mb_sizes.push(1),
                            }
                        }
                        Some(htpo_groups(&h, &mb_mask, w, &mb_sizes, &correct, hc)?)
                    }
                };
                let mut accumulator = GradientsAccumulator::<Policy>::new();
                let (mut mb_pg, mut mb_ent, mut mb_kl_loss) = (0.0, 0.0, 0.0);
                let (mut mb_clip, mut mb_clip_low, mut mb_kl, mut mb_tokens) = (0.0, 0.0, 0.0, 0usize);
                for rows in all.chunks(micro) {
                    let n = rows.len();
                    let (entropy, log_prob) = match whole.take() {
                        Some(t) => t,
                        None => forward(&policy, rows)?,
                    };
                    let chunk_mask: Vec<bool> =
                        rows.iter().flat_map(|&k| loss_mask.loss_mask[k * w..(k + 1) * w].iter().copied()).collect();
                    let chunk_tokens = chunk_mask.iter().filter(|&&m| m).count();
                    let inputs = PolicyInputs {
                        log_prob,
                        old_log_prob: tensor(take(&old_log_prob, rows), n),
                        advantages: tensor(take(&token_adv, rows), n),
                        mask: Tensor::from_data(TensorData::new(chunk_mask, [n, w]), &device),
                    };
                    // Every micro-batch divides by the mini-batch's denominators, so the accumulated gradient is the
                    // mini-batch's.
                    let out = match (&rl.htpo, &htpo_groups_mb) {
                        (Some(hc), Some(groups)) => {
                            let pick = |v: &[bool]| -> Vec<bool> {
                                rows.iter().flat_map(|&k| v[k * w..(k + 1) * w].iter().copied()).collect()
                            };
                            let chunk_groups = HtpoTokenGroups {
                                hard_correct_high: pick(&groups.hard_correct_high),
                                wrong_high: pick(&groups.wrong_high),
                                dropped: pick(&groups.dropped),
                                hard: rows.iter().map(|&k| groups.hard[k]).collect(),
                            };
                            let token = htpo_loss(&inputs, &chunk_groups, hc)?;
                            let loss =
                                aggregate(token.loss, &inputs.mask, AggMode::TokenMean, &loss_mask.denominators)?;
                            let pg_loss = f64::from(host_f32(loss.clone())?[0]);
                            ActorLoss { loss, pg_loss, entropy: None, kl_loss: None, metrics: token.metrics }
                        }
                        _ => actor_loss(
                            &actor,
                            &inputs,
                            Some(entropy),
                            ref_log_prob.as_ref().map(|r| tensor(take(r, rows), n)),
                            &loss_mask.denominators,
                            step as u64,
                            config.run.seed ^ step as u64,
                        )?,
                    };
                    check_finite("RL policy loss", out.pg_loss as f32)?;
                    let loss_value = host_f32(out.loss.clone())?[0];
                    check_finite("RL actor loss", loss_value)?;
                    accumulator.accumulate(&policy, GradientsParams::from_grads(out.loss.backward(), &policy));
                    mb_pg += out.pg_loss;
                    mb_ent += out.entropy.unwrap_or(f64::NAN);
                    mb_kl_loss += out.kl_loss.unwrap_or(0.0);
                    let t = chunk_tokens as f64;
                    mb_clip += out.metrics.pg_clipfrac * t;
                    mb_clip_low += out.metrics.pg_clipfrac_lower * t;
                    mb_kl += out.metrics.ppo_kl * t;
                    mb_tokens += chunk_tokens;
                }
                let grads = accumulator.grads();
                let stats = gradient_stats(&policy, &grads);
                if let Some(v) = stats.first_non_finite {
                    return Err(TrainerError::NonFinite { what: "RL gradient", value: v });
                }
                policy = optim.step(lr, policy, grads);
                if last_epoch {
                    let t = mb_tokens.max(1) as f64;
                    pg_sum += mb_pg;
                    clip_sum += mb_clip / t;
                    clip_low_sum += mb_clip_low / t;
                    kl_sum += mb_kl / t;
                    norm_sum += stats.norm;
                    ent_sum += mb_ent;
                    kl_loss_sum += mb_kl_loss;
                    n_mb += 1;
                    last_forking = Some(forking);
                }
            }
        }
        let entropy_stats = summarize(&old_entropy, &response_mask, &SummaryOptions::default())?;
        let mean_h = entropy_stats.mean;
        let tokens: usize = responses.iter().map(|(r, _)| r.len()).sum();
        let secs = t0.elapsed().as_secs_f64();
        let n = n_mb.max(1) as f64;
        let mut last = serde_json::Map::new();
        for (k, v) in [
            ("actor/pg_loss", pg_sum / n),
            ("actor/entropy", mean_h),
            ("actor/entropy_loss", ent_sum / n),
            ("actor/pg_clipfrac", clip_sum / n),
            ("actor/pg_clipfrac_lower", clip_low_sum / n),
            ("actor/ppo_kl", kl_sum / n),
            ("actor/kl_loss", kl_loss_sum / n),
            ("actor/grad_norm", norm_sum / n),
            ("actor/lr", lr),
            ("critic/score/mean", rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / b as f64),
            ("critic/advantages/max", adv.advantages.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)))),
            ("response_length/mean", tokens as f64 / b as f64),
            ("response_length/clip_ratio", responses.iter().filter(|(_, t)| *t).count() as f64 / b as f64),
            ("frac_reward_zero_std", frac_zero_std_before_filter.unwrap_or(adv.frac_reward_zero_std)),
            ("forking/threshold", last_forking.as_ref().and_then(|f| f.threshold).map_or(f64::NAN, f64::from)),
            ("forking/frac_selected", last_forking.as_ref().map_or(0.0, |f| f.frac_selected())),
            (
                "rollout/frac_trained",
                train_mask.iter().filter(|&&m| m).count() as f64
                    / response_mask.iter().filter(|&&m| m).count().max(1) as f64,
            ),
            ("rollout/num_responses", b as f64),
            ("rollout/group_size_max", sizes.iter().copied().max().unwrap_or(0) as f64),
            ("perf/throughput", tokens as f64 / secs),
            ("perf/time_per_step", secs),
        ] {
            last.insert(k.into(), serde_json::json!(v));
        }
        summary.reward_curve.push((step, last["critic/score/mean"].as_f64().unwrap_or(f64::NAN)));
        summary.entropy_curve.push((step, mean_h));
        summary.response_length_curve.push((step, tokens as f64 / b as f64));
        summary.last_batch_entropy = Some(entropy_stats);
        last.insert("phase".into(), "rl".into());
        last.insert("step".into(), step.into());
        if step % config.eval.every.max(1) == 0 || step == rl.steps {
            let acc = evaluate(&policy, &vocab, &test, rl.max_response_len)?;
            last.insert("eval/acc".into(), acc.into());
            summary.eval_curve.push((step, acc));
            summary.final_accuracy = acc;
        }
        let done = step + 1 - first_step;
        let eta = rl_start.elapsed().as_secs_f64() / done as f64 * (rl.steps - step) as f64;
        let line = format!(
            "rl {} {step:>4}/{} reward {:.3} entropy {:.3} clipfrac {:.3}{} eta {eta:.0}s",
            bar(step, rl.steps),
            rl.steps,
            last["critic/score/mean"].as_f64().unwrap_or(f64::NAN),
            last["actor/entropy"].as_f64().unwrap_or(f64::NAN),
            last["actor/pg_clipfrac"].as_f64().unwrap_or(f64::NAN),
            last.get("eval/acc").and_then(|v| v.as_f64()).map_or(String::new(), |a| format!(" held-out acc {a:.3}"))
        );
        progress(&line, last.contains_key("eval/acc") || step == rl.steps);
        metrics.write(serde_json::Value::Object(last))?;
        if step == rl.steps {
            summary.final_pass_at_k = evaluate_pass_at_k(&policy, &vocab, pass_set, k, rl, config.run.seed)?;
            let (p1, pk) = summary.final_pass_at_k;
            println!("held-out after RL: pass@1 {p1:.3}, pass@{k} {pk:.3}");
            metrics.write(
                serde_json::json!({"phase": "eval", "step": rl.steps, "eval/pass@1": p1, format!("eval/pass@{k}"): pk}),
            )?;
        }
        let every = config.checkpoint.every;
        if let Some(dir) = ckpt.dir.as_ref().filter(|_| step == rl.steps || (every > 0 && step % every == 0)) {
            let state =
                TrainState { step, config: config.clone(), summary: summary.clone(), metrics_lines: metrics.lines };
            save_checkpoint(dir, config.checkpoint.keep, &policy, &policy_config, &optim, &state)?;
            if ckpt.stop_after == Some(step) {
                println!("stopping after the checkpoint of RL step {step} (stop_after)");
                break;
            }
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The summary as an SVG chart: reward (train) and held-out accuracy, the entropy of the response tokens and the mean
/// response length against the RL step (0 = after SFT), and the entropy histogram of the last RL batch (share of
/// response tokens per log-spaced bin, against log10 of the bin's lower edge).
pub fn summary_svg(s: &TrainSummary) -> String {
    let series = |name: &str, pts: &[(usize, f64)]| Series {
        name: name.into(),
        points: pts.iter().map(|&(x, y)| (x as f64, y)).collect(),
    };
    let max_h = s.entropy_curve.iter().map(|p| p.1).fold(0.0, f64::max);
    let max_len = s.response_length_curve.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut panels = vec![
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
        Panel {
            title: "response length (tokens)".into(),
            x_label: "RL step".into(),
            y_max: max_len,
            series: vec![series("mean length", &s.response_length_curve)],
        },
    ];
    if let Some(h) = &s.last_batch_entropy {
        let hist = &h.histogram;
        let total = (hist.counts.iter().sum::<u64>() + hist.underflow + hist.overflow).max(1) as f64;
        let points: Vec<(f64, f64)> =
            hist.edges.iter().zip(&hist.counts).map(|(&lo, &c)| (lo.log10(), c as f64 / total)).collect();
        let top = points.iter().map(|p| p.1).fold(0.0, f64::max);
        panels.push(Panel {
            title: format!(
                "entropy histogram, last batch ({:.0}% below 1st bin)",
                100.0 * hist.underflow as f64 / total
            ),
            x_label: "log10 entropy (nats)".into(),
            y_max: top,
            series: vec![Series { name: "share of tokens".into(), points }],
        });
    }
    line_chart_svg(&panels)
}
