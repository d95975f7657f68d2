//! Every key of `forkrl-train` (TOML sections `[run]`, `[model]`, `[task]`, `[sft]`, `[rl]`, `[eval]`, `[checkpoint]`),
//! with the papers' defaults, and [`TrainConfig::check`]: every value is checked once, before anything runs or any
//! file is touched, and the [`Trainer`](crate::Trainer) only accepts the [`CheckedConfig`] it returns (linfa's
//! checked-parameters pattern). Unknown keys are rejected by serde with the key's name; bad values by `check` with
//! [`TrainerError::InvalidConfig`] naming the key.

use std::{ops::Deref, path::PathBuf};

use forkrl_advantage::{
    ActorLossConfig, AdvantageConfig, AggMode, ForkingDenominator, KlLossConfig, PolicyLoss, PpoClipConfig,
    TokenWeighting,
};
use forkrl_rollout::{Decoding, DynamicSamplingConfig, HoraConfig, MixedCuts, PosteriorSource};
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
    /// Policy loss (verl `loss_mode`: `vanilla`, `gspo`, `cispo`, `geo_mean`, `clip_cov`, `kl_cov`, `holder`, `htpo`).
    /// HTPO (`loss_mode = "htpo"`) takes its token groups from each mini-batch's entropies (per sequence, over its
    /// response tokens) and the group accuracy, then `token-mean`; the forking mask is not applied (HTPO partitions by
    /// entropy itself), and it does not combine with `kl_loss` or `entropy_coeff`.
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
    /// HORA rollout allocation (`None` = `group_size` per prompt). The trainer uses the in-step probe as the count
    /// source (`source = { kind = "probe", n0 = 2 }`): history counts need prompts that recur, which the generated
    /// tasks rarely do. The budget is `prompts_per_step × group_size` rollouts per step.
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
    /// Linear learning-rate warm-up over this many RL steps, as verl's constant-with-warm-up schedule (stepped once
    /// per RL step, `lr · min(1, (step − 1)/warmup)`); 0 = none (the 80/20 paper).
    pub lr_warmup_steps: usize,
    /// Entropy bonus coefficient (verl `entropy_coeff`, 0).
    pub entropy_coeff: f64,
    /// KL loss to the reference policy, the policy as RL starts (verl `use_kl_loss`, `kl_loss_type`,
    /// `kl_loss_coef`); `None` = off (every RLVR recipe of the methods reference).
    pub kl_loss: Option<KlLossConfig>,
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
            loss_scale_factor: None,
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

    /// The share of tokens the forking mask selects: ρ, or every token for HTPO (which partitions by entropy itself).
    pub fn forking_ratio(&self) -> f64 {
        if matches!(self.rl.policy_loss, PolicyLoss::Htpo(_)) { 1.0 } else { self.rl.top_entropy_ratio }
    }

    /// The learning rate of RL step `step` (1-based): verl's constant schedule with linear warm-up,
    /// `lr · min(1, (step − 1)/warmup)`.
    pub fn rl_lr(&self, step: usize) -> f64 {
        let rl = &self.rl;
        if rl.lr_warmup_steps == 0 {
            rl.lr
        } else {
            rl.lr * (step.saturating_sub(1) as f64 / rl.lr_warmup_steps as f64).min(1.0)
        }
    }
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
        at_least("checkpoint.keep", self.checkpoint.keep, 1)?;
        at_least("eval.size", self.eval.size, 1)?;
        if let Some(n) = rl.ppo_micro_batch_size {
            at_least("rl.ppo_micro_batch_size", n, 1)?;
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
        if !(rl.top_entropy_ratio > 0.0 && rl.top_entropy_ratio <= 1.0) {
            return Err(TrainerError::invalid("rl.top_entropy_ratio", rl.top_entropy_ratio, "must lie in (0, 1]"));
        }
        self.check_rollout()?;
        self.check_loss()?;
        Ok(CheckedConfig(self))
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
            let PosteriorSource::Probe { n0 } = h.source else {
                return Err(TrainerError::invalid(
                    "rl.hora.source",
                    format!("{:?}", h.source),
                    "the trainer supports the in-step probe only (source = { kind = \"probe\", n0 = 2 })",
                ));
            };
            if n0 == 0 || n0 >= rl.group_size || h.min_per_prompt < 2 {
                return Err(TrainerError::invalid(
                    "rl.hora",
                    format!("n0 = {n0}, min_per_prompt = {}", h.min_per_prompt),
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
        assert_eq!(key_of("[rl]\ntop_entropy_ratio = 1.5\n"), "rl.top_entropy_ratio");
        assert_eq!(key_of("[rl]\nppo_mini_batch_size = 0\n"), "rl.ppo_mini_batch_size");
        assert_eq!(key_of("[eval]\nsize = 0\n"), "eval.size");
        assert_eq!(key_of("[checkpoint]\nkeep = 0\n"), "checkpoint.keep");
        assert_eq!(key_of("[rl.mixed_cuts]\ng_std = 4\ng_cuts = 2\n"), "rl.mixed_cuts");
        assert_eq!(key_of("[rl.hora]\nsource = { kind = \"history\", decay = 1.0 }\n"), "rl.hora.source");
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
        assert_eq!(c.forking_ratio(), 1.0, "HTPO partitions by entropy itself");
        let err = toml::from_str::<TrainConfig>("[rl.htpo]\nclip_ratio_c = 10.0\n").expect_err("unknown key");
        assert!(err.to_string().contains("htpo"), "{err}");
    }

    #[test]
    fn warm_up_schedule() {
        let c: TrainConfig = toml::from_str("[rl]\nlr = 1e-4\nlr_warmup_steps = 2\n").expect("valid");
        let c = c.check().expect("valid");
        assert_eq!((c.rl_lr(1), c.rl_lr(2), c.rl_lr(3), c.rl_lr(9)), (0.0, 0.5e-4, 1e-4, 1e-4));
    }
}
