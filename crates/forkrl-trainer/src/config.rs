//! Every key of `forkrl-train` (TOML sections `[run]`, `[model]`, `[task]`, `[sft]`, `[rl]`, `[eval]`, `[checkpoint]`),
//! with the papers' defaults, and [`TrainConfig::check`]: every value is checked once, before anything runs or any
//! file is touched, and the [`Trainer`](crate::Trainer) only accepts the [`CheckedConfig`] it returns (linfa's
//! checked-parameters pattern). Unknown keys are rejected by serde with the key's name; bad values by `check` with
//! [`TrainerError::InvalidConfig`] naming the key.

use std::{ops::Deref, path::PathBuf};

use forkrl_advantage::{
    ActorLossConfig, AdvantageConfig, AggMode, BalanceConfig, BalancedBuffer, DistillationConfig, ForkingDenominator,
    HealConfig, ImaxConfig, KlEstimator, KlLossConfig, KlPenalty, PolicyLoss, PpoClipConfig, ReasonMaxxerConfig,
    SortConfig, TokenWeighting, UgTttConfig,
};
use forkrl_entropy::{SelectionRule, TokenSelection};
use forkrl_rollout::{Decoding, DynamicSamplingConfig, HoraConfig, MixedCuts, OverlongConfig, PosteriorSource};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainerError, tasks::TaskConfig};

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
    /// Recompute activations in the backward pass instead of keeping them (transformers'
    /// `gradient_checkpointing_enable()`, verl's `enable_gradient_checkpointing`): burn's balanced checkpointing
    /// strategy on the policy's autodiff device, which keeps compute-bound results (matmuls, the fused head) and
    /// recomputes memory-bound ones. Same gradients, less activation memory, more time.
    pub gradient_checkpointing: bool,
    /// Compute precision (verl's `actor.fsdp_config.mixed_precision.param_dtype`, TRL's `bf16`): `f32`, or `bf16`
    /// (mixed precision: the blocks' matmuls in bf16, f32 master weights, gradients and AdamW state;
    /// [`ComputeDtype`](crate::model::policy::ComputeDtype)). The rollout, reference and evaluation forwards use it
    /// too. A bf16 checkpoint loads exactly into the f32 master weights either way.
    pub dtype: crate::model::policy::ComputeDtype,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            hf_dir: None,
            max_len: None,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            d_ff: 192,
            gradient_checkpointing: false,
            dtype: crate::model::policy::ComputeDtype::F32,
        }
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
    /// Sequences per forward + backward (gradients accumulated, each micro-batch dividing by the whole batch's target
    /// count, so the step is the whole batch's); `None` = the whole batch at once. Bounds SFT's activation memory.
    pub micro_batch_size: Option<usize>,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self { steps: 600, batch_size: 64, lr: 3e-3, micro_batch_size: None }
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
    /// Clip of the **global** L2 norm of the gradient (verl `actor.grad_clip`, TRL `max_grad_norm`): every gradient
    /// is scaled by `min(1, grad_clip / (‖g‖ + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`. Also used by SFT.
    pub grad_clip: f64,
    /// AdamW's decoupled weight decay (verl `actor.optim.weight_decay`, 0.01; the 80/20 script sets 0.1).
    pub weight_decay: f64,
    /// AdamW's `(β₁, β₂)` (verl `actor.optim.betas`, `[0.9, 0.999]`).
    pub betas: [f64; 2],
    /// AdamW's ε (torch's 1e-8).
    pub eps: f64,
    /// Learning-rate schedule over RL steps (verl `actor.optim.lr_scheduler_type`): `constant` (with linear warm-up)
    /// or `cosine` (warm-up, then half a cosine down to `lr · min_lr_ratio`).
    pub lr_scheduler: LrScheduler,
    /// Floor of the cosine schedule as a share of `lr` (verl `min_lr_ratio`, 0).
    pub min_lr_ratio: f64,
    /// Cosine cycles over the decay (verl `num_cycles`, 0.5 = half a cosine).
    pub num_cycles: f64,
    /// Rollout decoding operator (its temperature is also the training temperature of entropy and log-probs).
    pub decoding: Decoding,
    /// Optimiser passes over each rollout batch.
    pub ppo_epochs: usize,
    /// Which tokens the policy gradient trains on (`[rl.forking]`: the 80/20 mask, its ablation arms, its scope).
    pub forking: ForkingConfig,
    /// Group advantages.
    pub advantage: AdvantageConfig,
    /// Policy loss (verl `loss_mode`: `vanilla`, `gspo`, `cispo`, `geo_mean`, `clip_cov`, `kl_cov`, `holder`, `htpo`).
    /// HTPO (`loss_mode = "htpo"`) takes its token groups from each mini-batch's entropies (per sequence, over its
    /// response tokens) and the group accuracy, then `token-mean`; the forking mask is not applied (HTPO partitions by
    /// entropy itself), and it does not combine with `kl_loss` or `entropy_coeff`. A partial `vanilla` table keeps the
    /// trainer's clip-higher `clip_ratio_high = 0.28` (DAPO / 80-20) unless it sets that key itself.
    #[serde(deserialize_with = "policy_loss_with_clip_higher")]
    pub policy_loss: PolicyLoss,
    /// Aggregation mode (verl `loss_agg_mode`: `token-mean`, `token-sum`, `seq-mean-token-sum`, `seq-mean-token-mean`,
    /// `seq-mean-token-sum-norm`).
    pub loss_agg_mode: AggMode,
    /// Dr. GRPO's constant `C` of `seq-mean-token-sum-norm` (verl `loss_scale_factor`): the loss is
    /// `Σ_i Σ_t L / G / C`. Required by that mode and pinned by the user (e.g. to `max_response_len`), never the padded
    /// width of a batch; ignored by the other modes.
    pub loss_scale_factor: Option<f64>,
    /// Longest response in tokens (EOS included).
    pub max_response_len: usize,
    /// DAPO dynamic sampling on the verifiable reward (`None` = off): generation batches are drawn until
    /// `prompts_per_step` groups with mixed outcomes are kept.
    pub dynamic_sampling: Option<DynamicSamplingConfig>,
    /// HORA rollout allocation (`None` = `group_size` per prompt) over a budget of `prompts_per_step × group_size`
    /// rollouts per step. Count sources: `{ kind = "history", decay }` (each prompt's successes and failures of earlier
    /// steps, decayed by γ per visit, kept in the checkpoints; useful when prompts recur, as across the epochs of a
    /// JSONL dataset) or `{ kind = "probe", n0 }` (`n0` probe rollouts per prompt in the same step).
    pub hora: Option<HoraConfig>,
    /// Mixed-CUTS: each group is `g_std` rollouts with `decoding` and `g_cuts` with CUTS (then `group_size` must be
    /// `g_std + g_cuts`).
    pub mixed_cuts: Option<MixedCuts>,
    /// Token weighting of the advantages, from the rollout policy's entropy and log-probs (before any update):
    /// `kind = "none" | "eapo" | "opefo" | "shear"` (`forkrl_advantage::TokenWeighting`).
    pub token_weighting: TokenWeighting,
    /// Prompts per optimiser mini-batch (verl `ppo_mini_batch_size`); `None` = the whole rollout batch. Groups are
    /// never split (query-preserved mini-batches), and the order of the groups is shuffled per epoch.
    pub ppo_mini_batch_size: Option<usize>,
    /// Rows per forward + backward inside a mini-batch (verl `ppo_micro_batch_size_per_gpu`); gradients are
    /// accumulated over the micro-batches and each divides by the mini-batch's global denominators, so the update is
    /// the mini-batch's (up to rounding; Clip-Cov / KL-Cov select their tokens per micro-batch). The forking mask
    /// then comes from an extra forward without a graph over the mini-batch. `None` = one pass per mini-batch.
    pub ppo_micro_batch_size: Option<usize>,
    /// Rows per forward without a graph (verl `log_prob_micro_batch_size_per_gpu`): the rollout policy's and the
    /// reference's log-probs, and the forking mask's entropy when training runs in micro-batches. With the fused LM
    /// head no `[rows, T, V]` logits are held, so peak memory of these forwards is set by this number. `None` =
    /// `ppo_micro_batch_size`, or every row at once when that is unset too.
    pub log_prob_micro_batch_size: Option<usize>,
    /// Linear learning-rate warm-up over this many RL steps (verl `lr_warmup_steps`; stepped once per RL step,
    /// `lr · (step − 1)/warmup` during warm-up); 0 = none (the 80/20 paper).
    pub lr_warmup_steps: usize,
    /// Entropy bonus coefficient (verl `entropy_coeff`, 0).
    pub entropy_coeff: f64,
    /// KL loss to the reference policy, the policy as RL starts (verl `use_kl_loss`, `kl_loss_type`,
    /// `kl_loss_coef`); `None` = off (every RLVR recipe of the methods reference).
    pub kl_loss: Option<KlLossConfig>,
    /// DAPO's overlong reward shaping and filtering (`forkrl_rollout::OverlongConfig`; verl
    /// `reward_model.overlong_buffer`): `R_len(|y|)` is added to the reward the advantages are computed from, and, with
    /// `filter_truncated`, truncated responses leave the loss. `None` = off.
    pub overlong: Option<OverlongConfig>,
    /// KL in the reward (verl `algorithm.use_kl_in_reward`, `kl_penalty`, `kl_ctrl`): each response's reward loses
    /// `β · Σ_t kl_t` to the reference policy (the policy as RL starts) before the advantages, with β fixed or adapted
    /// by verl's controller after every batch. `None` = off (every RLVR recipe of the methods reference).
    pub kl_in_reward: Option<KlInRewardConfig>,
    /// GRPO-VPS process advantages (`[rl.vps]`: `num_segments`, `high_entropy_z`, `alpha`, `probes_per_prefix`;
    /// `crate::rl::vps`): probe rollouts from mid-response prefixes estimate the belief after each high-entropy
    /// segment, and each token's advantage gains `α·(C_{k+1} − C_k)`. Replaces token weighting. `None` = off.
    pub vps: Option<crate::rl::vps::VpsProbeConfig>,
    /// Write the scored batch to `runs/<name>/rollouts/step-NNNNNN.jsonl` every this many RL steps (prompt, response,
    /// rewards, advantage, per-token entropy and log-prob; `rl::dump`); 0 = never.
    pub rollout_dump_every: usize,
    /// Reward-balanced training rows: `per_query` keeps, in each group, as many positive- as non-positive-advantage
    /// rollouts (the first of each sign) and drops the rest from the loss (`forkrl_advantage::balance_per_query`);
    /// a group whose rollouts share one sign is dropped. `buffered` is the cancellation paper's buffered global
    /// balance (`crate::rl::balance`): scored rollouts accumulate across steps until a balanced update batch of
    /// `prompts_per_step × group_size` rows can be drawn (`balance_buffer`).
    pub balance: Balance,
    /// The buffered balance's ratios and forced-update horizon (`forkrl_advantage::BalanceConfig`: 3/8, 5/8, 10).
    pub balance_buffer: BalanceConfig,
    /// On-policy distillation from a frozen teacher (`[rl.distillation]`, `crate::rl::distill`): the student samples,
    /// the teacher scores every response position, and the student minimises the per-position reverse KL (the exact
    /// full-vocabulary form, or the sampled-token advantage `−k_t`), with the rock-token bypass. `None` = off.
    pub distillation: Option<DistillationSetup>,
    /// SORT's repair update for all-wrong groups (`[rl.sort]`, `crate::rl::sort`): plan-guided weighted imitation of
    /// the problem's reference solution added to the GRPO loss. `None` = off.
    pub sort: Option<SortConfig>,
    /// ReasonMaxxer's offline stage in place of RL (`[rl.reasonmaxxer]`, `crate::rl::reasonmaxxer`): base rollouts,
    /// an entropy gate from the frozen base, then `rl.steps` optimiser steps of the gated contrastive loss plus the KL
    /// anchor. `None` = RL as configured.
    pub reasonmaxxer: Option<ReasonMaxxerSetup>,
    /// HEAL (`[rl.heal]`, `crate::rl::heal`): few-shot RL on the main task (the target domain) mixed with general-domain
    /// problems selected by uncertainty × entropy diversity, and the entropy-dynamics-alignment reward. `None` = off.
    pub heal: Option<HealSetup>,
    /// UG-TTT (`[rl.ugttt]`, `crate::rl::ugttt`): an ensemble of low-rank head adapters whose disagreement (the
    /// per-token mutual information) is an exploration bonus in the advantages or the reward, with a nuclear-norm
    /// regulariser that keeps them distinct (`forkrl_advantage::UgTttConfig`: `members` 4, `rank` 4, `beta` 0.1,
    /// `lambda` 1e-3, `bonus` = `advantage` | `reward`). `None` = off.
    pub ugttt: Option<UgTttConfig>,
    /// IMAX (`[rl.imax]`, `crate::rl::imax`): a pool of trainable soft prefixes, one (or `prefixes_per_prompt`) per
    /// drawn prompt, each `(prompt, prefix)` pair its own group, and the InfoMax reward `λ r_info`
    /// (`forkrl_advantage::ImaxConfig`: `num_prefixes` 4, `prefix_len` 4, `lambda` 0.1, `prefix_lr` 1e-3,
    /// `freeze_backbone` false; RECONSTRUCTION). `None` = off.
    pub imax: Option<ImaxConfig>,
}

/// `[rl.heal]`: HEAL's data recipe and reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealSetup {
    /// The general-domain task (a `[task]` table, e.g. `{ kind = "arithmetic" }`).
    pub general: TaskConfig,
    /// Target-domain problems drawn once from the main task (the paper: 32).
    pub target_problems: usize,
    /// General-domain candidates scored for selection (RECONSTRUCTION: the pool size is not published).
    pub general_pool: usize,
    /// General-domain problems kept (the paper: 384).
    pub general_keep: usize,
    /// Rollouts per candidate for its accuracy and entropy diversity (RECONSTRUCTION: 8).
    pub selection_rollouts: usize,
    /// Share of each batch's prompts from the general set (RECONSTRUCTION: ½).
    pub general_share: f64,
    /// The EDA reward's settings (`forkrl_advantage::HealConfig`: `min_len` 50, `eda_coef` 1, `top_fraction` 0.2).
    pub eda: HealConfig,
}

impl Default for HealSetup {
    fn default() -> Self {
        Self {
            general: TaskConfig::default(),
            target_problems: 32,
            general_pool: 768,
            general_keep: 384,
            selection_rollouts: 8,
            general_share: 0.5,
            eda: HealConfig::default(),
        }
    }
}

/// `[rl.distillation]`: the teacher and the distillation loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillationSetup {
    /// The teacher: a forkrl checkpoint directory (`policy_config.json` + `policy.bpk`, e.g.
    /// `runs/<name>/checkpoints/step-000100`) or a Hugging Face model directory. Its vocabulary must be the student's
    /// (same size; for two Hugging Face directories, the same `tokenizer.json`).
    pub teacher: PathBuf,
    /// The estimator, `kl_penalty_coef`, discount, environment advantage and rock-token bypass
    /// (`forkrl_advantage::DistillationConfig`).
    #[serde(default)]
    pub loss: DistillationConfig,
}

/// `[rl.reasonmaxxer]`: the data recipe of the offline stage and the loss (`forkrl_advantage::ReasonMaxxerConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReasonMaxxerSetup {
    /// Problems drawn from the training split (the released example: 300; the paper: 150).
    pub problems: usize,
    /// Base rollouts per problem (20), at the rollout decoding.
    pub rollouts_per_problem: usize,
    /// Problems kept: those closest to pass rate ½ with both outcomes present (the released code: 50; `None` keeps
    /// every problem with a pass rate strictly in (0, 1), the paper's rule).
    pub keep_problems: Option<usize>,
    /// Keep only this share of the kept rollouts, shortest first (the released code: 0.8; 1.0 = off).
    pub trim_fraction: f64,
    /// Sequences per optimiser step (the released code: 1 × accumulation 8).
    pub batch_size: usize,
    /// Order of the training sequences: shuffled per epoch (default) or the released curriculum by signal clarity
    /// `|A_i| · #D_i / length`, descending.
    pub curriculum: bool,
    /// The gate, advantages and loss.
    pub loss: ReasonMaxxerConfig,
}

impl Default for ReasonMaxxerSetup {
    fn default() -> Self {
        Self {
            problems: 300,
            rollouts_per_problem: 20,
            keep_problems: Some(50),
            trim_fraction: 1.0,
            batch_size: 8,
            curriculum: false,
            loss: ReasonMaxxerConfig::default(),
        }
    }
}

/// Deserialises `[rl.policy_loss]`, filling a `vanilla` table's missing `clip_ratio_high` with the trainer default
/// 0.28 instead of the library's symmetric 0.2 (so `loss_mode = "vanilla"` plus one key never drops clip-higher).
fn policy_loss_with_clip_higher<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<PolicyLoss, D::Error> {
    let mut table = toml::Table::deserialize(d)?;
    if table.get("loss_mode").and_then(toml::Value::as_str) == Some("vanilla") && !table.contains_key("clip_ratio_high")
    {
        table.insert("clip_ratio_high".into(), toml::Value::Float(PpoClipConfig::clip_higher().clip_ratio_high));
    }
    PolicyLoss::deserialize(toml::Value::Table(table)).map_err(serde::de::Error::custom)
}

/// verl's learning-rate schedules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// `lr` after a linear warm-up (verl `constant`, transformers `get_constant_schedule_with_warmup`).
    #[default]
    Constant,
    /// Linear warm-up, then `lr · max(m, m + (1 − m)·(1 + cos(2π·cycles·progress))/2)` with `m = min_lr_ratio`
    /// (verl's `get_cosine_schedule_with_warmup`).
    Cosine,
}

/// Where the forking-token selection ranks the tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkingScope {
    /// Each micro-batch (`rl.ppo_micro_batch_size` rows) separately: the official 80/20 code, which selects inside
    /// `update_policy` per micro-batch per rank (and TRL, which ranks each micro-step's batch). Identical to
    /// `mini_batch` when a mini-batch is one micro-batch (the default).
    #[default]
    MicroBatch,
    /// All the tokens of the mini-batch together (the paper's Eq. 6 read batch-globally).
    MiniBatch,
}

/// The forking-token selection of the policy-gradient term (`[rl.forking]`), from "Beyond the 80/20 Rule"
/// (arXiv 2506.01939): the paper's top-ρ arm, its bottom-(1 − ρ) ablation, a random-ρ control and full-gradient RLVR.
/// The entropy is the current policy's, from the update's forward, at the rollout temperature. The mask applies to the
/// policy-gradient term alone; the entropy bonus and the KL loss use every response token (the official code).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForkingConfig {
    /// `top` | `bottom` | `random` | `all`. Unset: `top` for the token-level losses (vanilla, CISPO, Clip-Cov,
    /// KL-Cov), `all` for the sequence-level losses (GSPO, GMPO, Hölder: their papers use every token) and HTPO (which
    /// partitions by entropy itself).
    pub select: Option<TokenSelection>,
    /// ρ: the share of response tokens selected (the 80/20 paper's 0.2; `bottom` trains on the other 1 − ρ).
    pub top_entropy_ratio: f64,
    /// `selected` (paper v2, official code) or `all_tokens` (alias `all`; paper v1, TRL): the token count the
    /// masked loss divides by, per sequence too under `seq-mean-token-mean`.
    pub denominator: ForkingDenominator,
    /// `top_k` (exactly `max(1, int(n·ρ + 0.9999))` tokens, the official code) or `quantile` (TRL's `H ≥ quantile`).
    pub rule: SelectionRule,
    /// `micro_batch` (official) or `mini_batch`.
    pub scope: ForkingScope,
    /// Allow a top / bottom / random mask on a sequence-level loss (GSPO, GMPO, Hölder), which no paper defines: the
    /// loss then sees only the selected tokens of each sequence. Off: such a combination is an error.
    pub mask_sequence_losses: bool,
}

impl Default for ForkingConfig {
    fn default() -> Self {
        Self {
            select: None,
            top_entropy_ratio: 0.2,
            denominator: ForkingDenominator::Selected,
            rule: SelectionRule::TopK,
            scope: ForkingScope::MicroBatch,
            mask_sequence_losses: false,
        }
    }
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
    /// Across steps: a buffer of scored rollouts, updated on when it can give a balanced batch.
    Buffered,
}

impl Default for RlConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            prompts_per_step: 16,
            group_size: 8,
            lr: 1e-4,
            grad_clip: 1.0,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            lr_scheduler: LrScheduler::Constant,
            min_lr_ratio: 0.0,
            num_cycles: 0.5,
            decoding: Decoding::Temperature { temperature: 1.0 },
            ppo_epochs: 2,
            forking: ForkingConfig::default(),
            advantage: AdvantageConfig::default(),
            policy_loss: PolicyLoss::Vanilla(PpoClipConfig::clip_higher()),
            loss_agg_mode: AggMode::TokenMean,
            loss_scale_factor: None,
            max_response_len: 9,
            dynamic_sampling: None,
            hora: None,
            mixed_cuts: None,
            token_weighting: TokenWeighting::None,
            ppo_mini_batch_size: None,
            ppo_micro_batch_size: None,
            log_prob_micro_batch_size: None,
            lr_warmup_steps: 0,
            entropy_coeff: 0.0,
            kl_loss: None,
            balance: Balance::None,
            balance_buffer: BalanceConfig::default(),
            overlong: None,
            kl_in_reward: None,
            rollout_dump_every: 0,
            vps: None,
            distillation: None,
            sort: None,
            reasonmaxxer: None,
            heal: None,
            ugttt: None,
            imax: None,
        }
    }
}

/// KL in the reward, with verl's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlInRewardConfig {
    /// The per-token estimator (verl `algorithm.kl_penalty`, `kl`).
    pub kl_penalty: KlPenalty,
    /// The coefficient's controller (verl `algorithm.kl_ctrl`).
    pub kl_ctrl: KlCtrlConfig,
}

impl Default for KlInRewardConfig {
    fn default() -> Self {
        Self {
            kl_penalty: KlPenalty { estimator: KlEstimator::K1, straight_through: false },
            kl_ctrl: KlCtrlConfig::default(),
        }
    }
}

/// verl's `kl_ctrl`: `type = "fixed"` keeps `kl_coef`; `"adaptive"` multiplies it by `1 + clip(kl/target − 1, ±0.2) ·
/// n/horizon` after each batch of `n` responses (`forkrl_advantage::AdaptiveKlController`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlCtrlConfig {
    /// `fixed` or `adaptive`.
    #[serde(rename = "type")]
    pub kind: KlCtrlKind,
    /// The initial β (0.001).
    pub kl_coef: f64,
    /// The adaptive controller's target KL (0.1).
    pub target_kl: f64,
    /// The adaptive controller's horizon in responses (10000).
    pub horizon: f64,
}

impl Default for KlCtrlConfig {
    fn default() -> Self {
        Self { kind: KlCtrlKind::Fixed, kl_coef: 0.001, target_kl: 0.1, horizon: 10_000.0 }
    }
}

/// verl's `kl_ctrl.type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlCtrlKind {
    /// A constant β.
    #[default]
    Fixed,
    /// verl's adaptive controller.
    Adaptive,
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

/// A configuration that passed [`TrainConfig::check`]: what the [`Trainer`](crate::Trainer) runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedConfig(TrainConfig);

impl Deref for CheckedConfig {
    type Target = TrainConfig;

    fn deref(&self) -> &TrainConfig {
        &self.0
    }
}

impl CheckedConfig {
    /// The configuration.
    pub fn into_inner(self) -> TrainConfig {
        self.0
    }

    /// Rows per forward without a graph (`rl.log_prob_micro_batch_size`, else `rl.ppo_micro_batch_size`); `None` =
    /// every row at once.
    pub fn log_prob_micro_batch_size(&self) -> Option<usize> {
        self.rl.log_prob_micro_batch_size.or(self.rl.ppo_micro_batch_size)
    }

    /// The temperature of the rollout decoding operator: the training temperature of entropy and log-probs (1 for
    /// operators without one).
    pub fn temperature(&self) -> f32 {
        match self.rl.decoding {
            Decoding::Temperature { temperature }
            | Decoding::TopK { temperature, .. }
            | Decoding::TopP { temperature, .. } => temperature,
            _ => 1.0,
        }
        .max(1e-3) as f32
    }

    /// The actor objective of the update.
    pub fn actor_loss(&self) -> ActorLossConfig {
        ActorLossConfig {
            policy_loss: self.rl.policy_loss.clone(),
            loss_agg_mode: self.rl.loss_agg_mode,
            entropy_coeff: self.rl.entropy_coeff,
            kl_loss: self.rl.kl_loss,
        }
    }

    /// The forking arm in force: the configured one, or the loss's documented default (`top` for token-level
    /// losses, `all` for sequence-level losses, HTPO and on-policy distillation, whose signal is per token already).
    pub fn token_selection(&self) -> TokenSelection {
        self.rl.forking.select.unwrap_or(
            if selects_its_own_tokens(&self.rl.policy_loss) || self.rl.distillation.is_some() {
                TokenSelection::All
            } else {
                TokenSelection::Top
            },
        )
    }

    /// Whether scoring needs the reference policy (the KL loss or KL in the reward).
    pub fn needs_reference(&self) -> bool {
        self.rl.kl_loss.is_some() || self.rl.kl_in_reward.is_some()
    }

    /// The learning rate of RL step `step` (1-based; the scheduler's `current_step` is `step − 1`), as verl's
    /// schedulers: linear warm-up `lr · s/warmup` for `s < warmup`, then `lr` (`constant`) or the cosine decay
    /// `lr · max(m, m + (1 − m)·(1 + cos(2π·cycles·progress))/2)`, `progress = (s − warmup)/max(1, steps − warmup)`.
    pub fn rl_lr(&self, step: usize) -> f64 {
        let rl = &self.rl;
        let s = step.saturating_sub(1) as f64;
        let warmup = rl.lr_warmup_steps as f64;
        if s < warmup {
            return rl.lr * s / warmup.max(1.0);
        }
        match rl.lr_scheduler {
            LrScheduler::Constant => rl.lr,
            LrScheduler::Cosine => {
                let progress = (s - warmup) / (rl.steps as f64 - warmup).max(1.0);
                let m = rl.min_lr_ratio;
                let cosine = (std::f64::consts::PI * 2.0 * rl.num_cycles * progress).cos();
                rl.lr * (m + (1.0 - m) * 0.5 * (1.0 + cosine)).max(m)
            }
        }
    }
}

/// Sets the dotted key `path` (e.g. `rl.forking.select`) of a TOML table to `value`, creating the tables on the way
/// (what `--set key=value` does).
///
/// # Errors
/// A message naming the key when it is empty or crosses a non-table value.
pub fn set_path(root: &mut toml::Table, path: &str, value: toml::Value) -> std::result::Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().filter(|p| !p.is_empty()).ok_or_else(|| format!("--set {path}: empty key"))?;
    let mut table = root;
    for p in parts {
        table = table
            .entry(p)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("--set {path}: {p} is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// The value of a `--set key=value`: a TOML literal (number, bool, array, inline table, quoted string), else the text
/// as a bare string.
pub fn parse_set_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

impl TrainConfig {
    /// This configuration with `key=value` settings applied in order (as `--set`).
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] naming a key that cannot be set or a value of the wrong type.
    pub fn with_sets(&self, sets: &[(String, String)]) -> Result<Self> {
        let mut table = toml::Table::try_from(self)
            .map_err(|e| TrainerError::invalid("config", "(resolved)", format!("cannot be written as TOML: {e}")))?;
        for (k, v) in sets {
            set_path(&mut table, k, parse_set_value(v)).map_err(|e| TrainerError::invalid(k, v, e))?;
        }
        let keys: Vec<&str> = sets.iter().map(|(k, _)| k.as_str()).collect();
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| TrainerError::invalid(keys.join(", "), "(set)", e.to_string()))
    }
}

/// Losses that decide their own tokens: the sequence-level ones (their papers use every token) and HTPO.
fn selects_its_own_tokens(loss: &PolicyLoss) -> bool {
    matches!(loss, PolicyLoss::Gspo(_) | PolicyLoss::GeoMean(_) | PolicyLoss::Holder(_) | PolicyLoss::Htpo(_))
}

fn at_least(key: &str, value: usize, min: usize) -> Result<()> {
    if value < min { Err(TrainerError::invalid(key, value, format!("must be >= {min}"))) } else { Ok(()) }
}

fn positive(key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(TrainerError::invalid(key, value, "must be finite and > 0"))
    }
}

impl TrainConfig {
    /// Checks every value once. Nothing is read or written.
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] naming the first bad key.
    pub fn check(self) -> Result<CheckedConfig> {
        self.task.validate()?;
        let (rl, sft) = (&self.rl, &self.sft);
        at_least("rl.group_size", rl.group_size, 2)?;
        at_least("rl.prompts_per_step", rl.prompts_per_step, 1)?;
        at_least("rl.ppo_epochs", rl.ppo_epochs, 1)?;
        at_least("rl.max_response_len", rl.max_response_len, 1)?;
        positive("rl.lr", rl.lr)?;
        positive("sft.lr", sft.lr)?;
        positive("rl.grad_clip", rl.grad_clip)?;
        if sft.steps > 0 {
            at_least("sft.batch_size", sft.batch_size, 1)?;
        }
        if let Some(n) = sft.micro_batch_size {
            at_least("sft.micro_batch_size", n, 1)?;
        }
        at_least("checkpoint.keep", self.checkpoint.keep, 1)?;
        at_least("eval.size", self.eval.size, 1)?;
        if let Some(n) = rl.ppo_micro_batch_size {
            at_least("rl.ppo_micro_batch_size", n, 1)?;
        }
        if let Some(n) = rl.log_prob_micro_batch_size {
            at_least("rl.log_prob_micro_batch_size", n, 1)?;
        }
        if let Some(n) = rl.ppo_mini_batch_size {
            at_least("rl.ppo_mini_batch_size", n, 1)?;
        }
        if let Some(n) = self.model.max_len.filter(|&n| n == 0 || n > crate::model::policy::MAX_CONTEXT) {
            return Err(TrainerError::invalid(
                "model.max_len",
                n,
                format!("must lie in 1..={}", crate::model::policy::MAX_CONTEXT),
            ));
        }
        self.check_forking()?;
        self.check_optimiser()?;
        self.check_rollout()?;
        self.check_loss()?;
        self.check_credit()?;
        Ok(CheckedConfig(self))
    }

    fn check_forking(&self) -> Result<()> {
        let (f, loss) = (&self.rl.forking, &self.rl.policy_loss);
        if !(f.top_entropy_ratio > 0.0 && f.top_entropy_ratio <= 1.0) {
            return Err(TrainerError::invalid(
                "rl.forking.top_entropy_ratio",
                f.top_entropy_ratio,
                "must lie in (0, 1]",
            ));
        }
        match f.select {
            Some(s) if s != TokenSelection::All && matches!(loss, PolicyLoss::Htpo(_)) => Err(TrainerError::invalid(
                "rl.forking.select",
                s.name(),
                "HTPO partitions the tokens by entropy itself: leave rl.forking.select unset (or \"all\")",
            )),
            Some(s) if s != TokenSelection::All && selects_its_own_tokens(loss) && !f.mask_sequence_losses => {
                Err(TrainerError::invalid(
                    "rl.forking.select",
                    s.name(),
                    format!(
                        "loss_mode = \"{}\" is a sequence-level loss and its paper uses every token; no paper defines \
                         a forking mask on it. Leave rl.forking.select unset, or set \
                         rl.forking.mask_sequence_losses = true to mask it anyway",
                        loss.name()
                    ),
                ))
            }
            Some(TokenSelection::Random | TokenSelection::Bottom) if f.rule == SelectionRule::Quantile => {
                Err(TrainerError::invalid(
                    "rl.forking.rule",
                    "quantile",
                    "the bottom and random arms are defined with top_k counts: use rule = \"top_k\"",
                ))
            }
            _ => Ok(()),
        }
    }

    fn check_optimiser(&self) -> Result<()> {
        let rl = &self.rl;
        if !(rl.weight_decay.is_finite() && rl.weight_decay >= 0.0) {
            return Err(TrainerError::invalid("rl.weight_decay", rl.weight_decay, "must be finite and >= 0"));
        }
        if !rl.betas.iter().all(|b| b.is_finite() && (0.0..1.0).contains(b)) {
            return Err(TrainerError::invalid("rl.betas", format!("{:?}", rl.betas), "each must lie in [0, 1)"));
        }
        positive("rl.eps", rl.eps)?;
        if !(rl.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&rl.min_lr_ratio)) {
            return Err(TrainerError::invalid("rl.min_lr_ratio", rl.min_lr_ratio, "must lie in [0, 1]"));
        }
        if !(rl.num_cycles.is_finite() && rl.num_cycles >= 0.0) {
            return Err(TrainerError::invalid("rl.num_cycles", rl.num_cycles, "must be finite and >= 0"));
        }
        Ok(())
    }

    fn check_rollout(&self) -> Result<()> {
        let rl = &self.rl;
        rl.decoding.validate().map_err(TrainerError::in_section("rl.decoding"))?;
        if let Some(m) = &rl.mixed_cuts {
            if m.g_std + m.g_cuts != rl.group_size || m.g_cuts == 0 {
                return Err(TrainerError::invalid(
                    "rl.mixed_cuts",
                    format!("g_std = {}, g_cuts = {}", m.g_std, m.g_cuts),
                    format!("g_std + g_cuts must equal rl.group_size = {} (and g_cuts >= 1)", rl.group_size),
                ));
            }
            Decoding::Cuts(m.cuts).validate().map_err(TrainerError::in_section("rl.mixed_cuts.cuts"))?;
        }
        if let Some(h) = &rl.hora {
            let n0 = match h.source {
                PosteriorSource::Probe { n0 } => n0,
                PosteriorSource::History { decay } => {
                    forkrl_rollout::PromptStatsStore::new(decay).map_err(TrainerError::in_section("rl.hora.source"))?;
                    1
                }
            };
            if n0 == 0 || n0 >= rl.group_size || h.min_per_prompt < 2 {
                return Err(TrainerError::invalid(
                    "rl.hora",
                    format!("{:?}, min_per_prompt = {}", h.source, h.min_per_prompt),
                    format!("needs 1 <= n0 < group_size = {} and min_per_prompt >= 2", rl.group_size),
                ));
            }
        }
        Ok(())
    }

    fn check_loss(&self) -> Result<()> {
        let rl = &self.rl;
        rl.advantage.validate().map_err(TrainerError::in_section("rl.advantage"))?;
        match rl.loss_scale_factor {
            Some(c) if !(c.is_finite() && c > 0.0) => {
                return Err(TrainerError::invalid("rl.loss_scale_factor", c, "must be finite and > 0"));
            }
            None if rl.loss_agg_mode == AggMode::SeqMeanTokenSumNorm => {
                return Err(TrainerError::invalid(
                    "rl.loss_scale_factor",
                    "(unset)",
                    format!(
                        "loss_agg_mode = \"seq-mean-token-sum-norm\" (Dr. GRPO) divides by a constant that must be \
                         pinned, e.g. rl.loss_scale_factor = {} (rl.max_response_len)",
                        rl.max_response_len
                    ),
                ));
            }
            _ => {}
        }
        rl.policy_loss.validate().map_err(TrainerError::in_section("rl.policy_loss"))?;
        rl.token_weighting.validate().map_err(TrainerError::in_section("rl.token_weighting"))?;
        if !rl.entropy_coeff.is_finite() {
            return Err(TrainerError::invalid("rl.entropy_coeff", rl.entropy_coeff, "must be finite"));
        }
        if let Some(kl) = rl.kl_loss.filter(|kl| !(kl.kl_loss_coef.is_finite() && kl.kl_loss_coef >= 0.0)) {
            return Err(TrainerError::invalid("rl.kl_loss.kl_loss_coef", kl.kl_loss_coef, "must be finite and >= 0"));
        }
        if matches!(rl.policy_loss, PolicyLoss::Htpo(_)) && (rl.kl_loss.is_some() || rl.entropy_coeff != 0.0) {
            return Err(TrainerError::invalid(
                "rl.policy_loss.loss_mode",
                "htpo",
                "HTPO replaces the actor loss: unset rl.kl_loss and rl.entropy_coeff",
            ));
        }
        Ok(())
    }

    /// The options that change the rows, rewards or token advantages the loss sees: the buffered balance, GRPO-VPS,
    /// overlong shaping and KL in the reward.
    fn check_credit(&self) -> Result<()> {
        let rl = &self.rl;
        if rl.balance == Balance::Buffered {
            BalancedBuffer::<()>::new(rl.balance_buffer).map_err(TrainerError::in_section("rl.balance_buffer"))?;
            if matches!(rl.policy_loss, PolicyLoss::Htpo(_)) {
                return Err(TrainerError::invalid(
                    "rl.balance",
                    "buffered",
                    "HTPO reads each group's accuracy, which a buffered batch of rows from many steps does not keep",
                ));
            }
        }
        if let Some(v) = &rl.vps {
            at_least("rl.vps.probes_per_prefix", v.probes_per_prefix, 1)?;
            at_least("rl.vps.num_segments", v.vps.num_segments, 1)?;
            if !(v.vps.alpha.is_finite() && v.vps.high_entropy_z.is_finite()) {
                return Err(TrainerError::invalid(
                    "rl.vps",
                    format!("{v:?}"),
                    "alpha and high_entropy_z must be finite",
                ));
            }
            if rl.token_weighting != TokenWeighting::None {
                return Err(TrainerError::invalid(
                    "rl.vps",
                    "set",
                    "GRPO-VPS sets the token advantages itself: leave rl.token_weighting at kind = \"none\"",
                ));
            }
        }
        if let Some(o) = &rl.overlong {
            o.validate().map_err(TrainerError::in_section("rl.overlong"))?;
        }
        self.check_literature()?;
        if let Some(k) = &rl.kl_in_reward {
            let c = &k.kl_ctrl;
            if !(c.kl_coef.is_finite() && c.kl_coef >= 0.0) {
                return Err(TrainerError::invalid(
                    "rl.kl_in_reward.kl_ctrl.kl_coef",
                    c.kl_coef,
                    "must be finite and >= 0",
                ));
            }
            if c.kind == KlCtrlKind::Adaptive {
                positive("rl.kl_in_reward.kl_ctrl.target_kl", c.target_kl)?;
                positive("rl.kl_in_reward.kl_ctrl.horizon", c.horizon)?;
            }
        }
        Ok(())
    }
}

impl TrainConfig {
    /// The methods of `docs/methods.md`'s second table: on-policy distillation, SORT, ReasonMaxxer. The teacher
    /// directory is checked to exist and to hold a checkpoint here, before anything runs; its vocabulary when it loads.
    fn check_literature(&self) -> Result<()> {
        let rl = &self.rl;
        if let Some(d) = &rl.distillation {
            d.check(rl)?;
        }
        if let Some(s) = &rl.sort {
            s.weighting.validate().map_err(TrainerError::in_section("rl.sort.weighting"))?;
            s.validate().map_err(TrainerError::in_section("rl.sort"))?;
            if rl.balance == Balance::Buffered {
                return Err(TrainerError::invalid(
                    "rl.sort",
                    "set",
                    "SORT's repair groups do not survive the buffered balance",
                ));
            }
        }
        if let Some(h) = &rl.heal {
            h.check(rl)?;
        }
        if let Some(u) = &rl.ugttt {
            u.validate().map_err(TrainerError::in_section("rl.ugttt"))?;
            let sets_token_advantages =
                rl.vps.is_some() || rl.token_weighting != TokenWeighting::None || rl.distillation.is_some();
            if u.bonus == forkrl_advantage::BonusTarget::Advantage && sets_token_advantages {
                return Err(TrainerError::invalid(
                    "rl.ugttt.bonus",
                    "advantage",
                    "another option sets the token advantages (rl.vps, rl.token_weighting or rl.distillation): use \
                     bonus = \"reward\"",
                ));
            }
        }
        if let Some(r) = &rl.reasonmaxxer {
            r.check(rl)?;
        }
        if let Some(i) = &rl.imax {
            i.validate().map_err(TrainerError::in_section("rl.imax"))?;
            let other =
                [("rl.distillation", rl.distillation.is_some()), ("rl.reasonmaxxer", rl.reasonmaxxer.is_some())];
            if let Some((key, _)) = other.iter().find(|(_, on)| *on) {
                return Err(TrainerError::invalid(
                    "rl.imax",
                    "set",
                    format!("IMAX's soft prefixes are the student's own inputs: {key} cannot run with them"),
                ));
            }
        }
        Ok(())
    }
}

impl DistillationSetup {
    /// `rl.distillation`'s checks: the loss, the teacher directory (it exists and holds a checkpoint; its vocabulary
    /// is checked when it loads), and the options it excludes.
    fn check(&self, rl: &RlConfig) -> Result<()> {
        self.loss.validate().map_err(TrainerError::in_section("rl.distillation.loss"))?;
        let t = &self.teacher;
        let holds = t.join(crate::model::checkpoint::CONFIG_FILE).is_file() || t.join("config.json").is_file();
        if !holds {
            return Err(TrainerError::invalid(
                "rl.distillation.teacher",
                t.display(),
                "is not a forkrl checkpoint (policy_config.json) or a Hugging Face model directory (config.json)",
            ));
        }
        if rl.vps.is_some() || rl.token_weighting != TokenWeighting::None {
            return Err(TrainerError::invalid(
                "rl.distillation",
                "set",
                "distillation sets the token advantages itself: unset rl.vps and leave rl.token_weighting at none",
            ));
        }
        if rl.balance != Balance::None {
            return Err(TrainerError::invalid(
                "rl.balance",
                format!("{:?}", rl.balance),
                "reward balancing selects rows by advantage sign, which the per-token distillation signal does \
                 not have",
            ));
        }
        Ok(())
    }
}

impl HealSetup {
    /// `rl.heal`'s checks.
    fn check(&self, rl: &RlConfig) -> Result<()> {
        self.eda.validate().map_err(TrainerError::in_section("rl.heal.eda"))?;
        self.general.validate()?;
        at_least("rl.heal.target_problems", self.target_problems, 1)?;
        at_least("rl.heal.general_keep", self.general_keep, 1)?;
        at_least("rl.heal.general_pool", self.general_pool, self.general_keep)?;
        at_least("rl.heal.selection_rollouts", self.selection_rollouts, 2)?;
        if !(0.0..=1.0).contains(&self.general_share) {
            return Err(TrainerError::invalid("rl.heal.general_share", self.general_share, "must lie in [0, 1]"));
        }
        if rl.dynamic_sampling.is_some() || rl.reasonmaxxer.is_some() {
            return Err(TrainerError::invalid(
                "rl.heal",
                "set",
                "HEAL draws its own prompts: unset rl.dynamic_sampling and rl.reasonmaxxer",
            ));
        }
        Ok(())
    }
}

impl ReasonMaxxerSetup {
    /// `rl.reasonmaxxer`'s checks.
    fn check(&self, rl: &RlConfig) -> Result<()> {
        self.loss.validate().map_err(TrainerError::in_section("rl.reasonmaxxer.loss"))?;
        at_least("rl.reasonmaxxer.problems", self.problems, 1)?;
        at_least("rl.reasonmaxxer.rollouts_per_problem", self.rollouts_per_problem, 2)?;
        at_least("rl.reasonmaxxer.batch_size", self.batch_size, 1)?;
        if let Some(k) = self.keep_problems {
            at_least("rl.reasonmaxxer.keep_problems", k, 1)?;
        }
        if !(self.trim_fraction > 0.0 && self.trim_fraction <= 1.0) {
            return Err(TrainerError::invalid(
                "rl.reasonmaxxer.trim_fraction",
                self.trim_fraction,
                "must lie in (0, 1]",
            ));
        }
        if rl.distillation.is_some() || rl.sort.is_some() {
            return Err(TrainerError::invalid(
                "rl.reasonmaxxer",
                "set",
                "ReasonMaxxer replaces the RL phase: unset rl.distillation and rl.sort",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(text: &str) -> String {
        let config: TrainConfig = toml::from_str(text).expect("parses");
        match config.check() {
            Err(TrainerError::InvalidConfig { key, .. }) => key,
            other => panic!("expected an invalid key for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn the_default_is_valid_and_bad_values_name_their_key() {
        assert!(TrainConfig::default().check().is_ok());
        assert_eq!(key_of("[rl]\ngroup_size = 1\n"), "rl.group_size");
        assert_eq!(key_of("[rl]\nlr = -1.0\n"), "rl.lr");
        assert_eq!(key_of("[rl.forking]\ntop_entropy_ratio = 1.5\n"), "rl.forking.top_entropy_ratio");
        assert_eq!(key_of("[rl]\nweight_decay = -0.1\n"), "rl.weight_decay");
        assert_eq!(key_of("[rl.overlong]\nmax_response_length = 9\nbuffer_length = 0\n"), "rl.overlong.buffer_length");
        assert_eq!(key_of("[rl.kl_in_reward.kl_ctrl]\nkl_coef = -1.0\n"), "rl.kl_in_reward.kl_ctrl.kl_coef");
        assert_eq!(
            key_of("[rl.kl_in_reward.kl_ctrl]\ntype = \"adaptive\"\nhorizon = 0.0\n"),
            "rl.kl_in_reward.kl_ctrl.horizon"
        );
        assert_eq!(key_of("[rl]\nbetas = [0.9, 1.0]\n"), "rl.betas");
        assert_eq!(key_of("[rl]\neps = 0.0\n"), "rl.eps");
        assert_eq!(key_of("[rl]\nmin_lr_ratio = 2.0\n"), "rl.min_lr_ratio");
        assert_eq!(key_of("[rl]\nppo_mini_batch_size = 0\n"), "rl.ppo_mini_batch_size");
        assert_eq!(key_of("[rl]\nlog_prob_micro_batch_size = 0\n"), "rl.log_prob_micro_batch_size");
        assert_eq!(key_of("[sft]\nmicro_batch_size = 0\n"), "sft.micro_batch_size");
        assert_eq!(key_of("[eval]\nsize = 0\n"), "eval.size");
        assert_eq!(key_of("[checkpoint]\nkeep = 0\n"), "checkpoint.keep");
        assert_eq!(key_of("[rl.mixed_cuts]\ng_std = 4\ng_cuts = 2\n"), "rl.mixed_cuts");
        assert_eq!(key_of("[rl.hora]\nsource = { kind = \"history\", decay = 0.0 }\n"), "rl.hora.source.decay");
        assert!(
            toml::from_str::<TrainConfig>("[rl.hora]\nsource = { kind = \"history\", decay = 0.9 }\n")
                .expect("parses")
                .check()
                .is_ok()
        );
        assert_eq!(key_of("[rl.decoding]\nkind = \"temperature\"\ntemperature = -1.0\n"), "rl.decoding.temperature");
        assert_eq!(
            key_of("[rl.policy_loss]\nloss_mode = \"vanilla\"\nclip_ratio_high = -0.5\n"),
            "rl.policy_loss.clip_ratio_high"
        );
        assert_eq!(key_of("[rl.token_weighting]\nkind = \"eapo\"\nphi = 0.0\n"), "rl.token_weighting.phi");
        assert_eq!(key_of("[rl.kl_loss]\nkl_loss_coef = -0.1\n"), "rl.kl_loss.kl_loss_coef");
        assert_eq!(key_of("[rl]\nloss_agg_mode = \"seq-mean-token-sum-norm\"\n"), "rl.loss_scale_factor");
        assert_eq!(key_of("[rl]\nloss_scale_factor = 0.0\n"), "rl.loss_scale_factor");
        let dr_grpo = "[rl]\nloss_agg_mode = \"seq-mean-token-sum-norm\"\nloss_scale_factor = 9.0\n";
        assert!(toml::from_str::<TrainConfig>(dr_grpo).expect("parses").check().is_ok());
        assert_eq!(
            key_of("[rl.policy_loss]\nloss_mode = \"htpo\"\n[rl.kl_loss]\nkl_loss_coef = 0.01\n"),
            "rl.policy_loss.loss_mode"
        );
    }

    #[test]
    fn htpo_is_a_policy_loss_and_the_old_key_is_gone() {
        let c: TrainConfig =
            toml::from_str("[rl.policy_loss]\nloss_mode = \"htpo\"\nclip_ratio_c = 5.0\n").expect("valid");
        let c = c.check().expect("valid");
        assert_eq!(c.rl.policy_loss.name(), "htpo");
        assert_eq!(c.token_selection(), TokenSelection::All, "HTPO partitions by entropy itself");
        let err = toml::from_str::<TrainConfig>("[rl.htpo]\nclip_ratio_c = 10.0\n").expect_err("unknown key");
        assert!(err.to_string().contains("htpo"), "{err}");
    }

    #[test]
    fn warm_up_schedule() {
        let c: TrainConfig = toml::from_str("[rl]\nlr = 1e-4\nlr_warmup_steps = 2\n").expect("valid");
        let c = c.check().expect("valid");
        assert_eq!((c.rl_lr(1), c.rl_lr(2), c.rl_lr(3), c.rl_lr(9)), (0.0, 0.5e-4, 1e-4, 1e-4));
    }

    #[test]
    fn a_partial_vanilla_table_keeps_clip_higher() {
        let parse = |t: &str| toml::from_str::<TrainConfig>(t).expect("parses").rl.policy_loss;
        let partial = parse("[rl.policy_loss]\nloss_mode = \"vanilla\"\nclip_ratio_c = 10.0\n");
        assert_eq!(
            partial,
            PolicyLoss::Vanilla(PpoClipConfig { clip_ratio_c: Some(10.0), ..PpoClipConfig::clip_higher() })
        );
        let explicit = parse("[rl.policy_loss]\nloss_mode = \"vanilla\"\nclip_ratio_high = 0.2\n");
        assert_eq!(explicit, PolicyLoss::Vanilla(PpoClipConfig::default()));
        assert_eq!(parse(""), PolicyLoss::Vanilla(PpoClipConfig::clip_higher()));
        let err = toml::from_str::<TrainConfig>("[rl.policy_loss]\nloss_mode = \"vanilla\"\nclip_ratio = 0.2\n");
        assert!(err.expect_err("unknown").to_string().contains("clip_ratio"));
        // A saved config (every key written) reads back to itself.
        let c = TrainConfig::default();
        let back: TrainConfig = toml::from_str(&toml::to_string(&c).expect("serialises")).expect("parses");
        assert_eq!(back, c);
    }

    #[test]
    fn cosine_schedule_matches_verl() {
        // verl get_cosine_schedule_with_warmup(warmup = 2, total = 10, min_lr_ratio = 0.1, num_cycles = 0.5):
        // s = 0, 1 warm up; s = 2 + k decays over 8 steps: 0.1 + 0.9·(1 + cos(π·k/8))/2.
        let text = "[rl]\nlr = 1.0\nsteps = 10\nlr_warmup_steps = 2\nlr_scheduler = \"cosine\"\nmin_lr_ratio = 0.1\n";
        let c = toml::from_str::<TrainConfig>(text).expect("parses").check().expect("valid");
        let expected = |k: f64| 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * k / 8.0).cos());
        assert_eq!((c.rl_lr(1), c.rl_lr(2)), (0.0, 0.5));
        for step in 3..=10 {
            let k = (step - 3) as f64;
            assert!((c.rl_lr(step) - expected(k)).abs() < 1e-12, "step {step}: {}", c.rl_lr(step));
        }
        assert!((c.rl_lr(3) - 1.0).abs() < 1e-12 && c.rl_lr(10) > 0.1);
    }

    #[test]
    fn forking_arms_default_per_loss_and_undefined_combinations_are_refused() {
        let check = |text: &str| toml::from_str::<TrainConfig>(text).expect("parses").check();
        assert_eq!(check("").expect("valid").token_selection(), TokenSelection::Top);
        for mode in ["gspo", "geo_mean", "holder"] {
            let base = match mode {
                "gspo" => "[rl.policy_loss]\nloss_mode = \"gspo\"\n".to_string(),
                m => format!("[rl.policy_loss]\nloss_mode = \"{m}\"\n"),
            };
            assert_eq!(check(&base).expect("valid").token_selection(), TokenSelection::All, "{mode}");
            let masked = format!("{base}[rl.forking]\nselect = \"top\"\n");
            assert!(
                matches!(check(&masked), Err(TrainerError::InvalidConfig { key, .. }) if key == "rl.forking.select")
            );
            let allowed = format!("{base}[rl.forking]\nselect = \"top\"\nmask_sequence_losses = true\n");
            assert_eq!(check(&allowed).expect("valid").token_selection(), TokenSelection::Top, "{mode}");
        }
        assert_eq!(
            key_of("[rl.policy_loss]\nloss_mode = \"htpo\"\n[rl.forking]\nselect = \"bottom\"\n"),
            "rl.forking.select"
        );
        assert_eq!(key_of("[rl.forking]\nselect = \"random\"\nrule = \"quantile\"\n"), "rl.forking.rule");
        let arms = check("[rl.forking]\nselect = \"bottom\"\ndenominator = \"all\"\n").expect("the docs' spelling");
        assert_eq!(
            (arms.token_selection(), arms.rl.forking.denominator),
            (TokenSelection::Bottom, ForkingDenominator::AllTokens)
        );
        // The old flat keys are gone, with the unknown key named.
        let err = toml::from_str::<TrainConfig>("[rl]\ntop_entropy_ratio = 0.2\n").expect_err("moved");
        assert!(err.to_string().contains("top_entropy_ratio"), "{err}");
    }
}
