//! # forkrl-advantage
//!
//! Every way the RLVR literature turns outcome rewards into a per-token loss, composable and exact:
//!
//! | family | items | where |
//! |---|---|---|
//! | advantages (host) | GRPO, Dr. GRPO, RLOO | [`group_advantage`] |
//! | policy losses (burn) | PPO clip / clip-higher / dual clip, GSPO, CISPO, GMPO, Clip-Cov, KL-Cov, HölderPO, HTPO; their shared inputs | [`ppo_clip`], [`gspo`], [`cispo`], [`gmpo`], [`clip_cov`], [`kl_cov`], [`holder`], [`htpo`], `policy_loss`, `loss_types` |
//! | aggregation | verl's five modes with explicit global denominators | [`aggregation`] |
//! | KL | k1, k2, k3, abs and straight-through `+` variants, KL in reward or loss | [`kl`] |
//! | actor objective | policy loss − entropy bonus + KL loss, one aggregation | `actor_loss` |
//! | forking tokens | the 80/20 mask folded into the loss, selected- or all-token denominator | [`forking`] |
//! | token weighting | EAPO, OPEFO, HTPO, SHEAR, GRPO-VPS, rock-token bypass; one contract over a rollout | [`eapo`], [`opefo`], [`htpo`], [`shear`], [`vps`], [`rock_bypass_weights`], [`token_weighting`] |
//! | cancellation batching | query-preserved mini-batches, reward-balanced (buffered and per-query) | [`batching`] |
//! | sparse selection and distillation | ReasonMaxxer's gate, advantages and loss coefficients; SORT's repair weights; on-policy distillation (sampled-token advantages, full-vocabulary reverse KL, rock-token bypass) | [`reasonmaxxer`], [`sort`], [`distillation`] |
//! | exploration extras | HEAL's entropy-dynamics reward and data selection; IMAX's InfoMax reward; UG-TTT's epistemic bonus and nuclear norm | [`heal`], [`imax`], [`ugttt`] |
//!
//! Losses are minimised (verl's convention). Host functions work on `&[f32]` slices and need no burn; the tensor
//! functions (cargo feature `burn`, on by default) work on any burn backend and are differentiable. Each method's
//! module doc gives its equation, its source and which parts are reconstructions. Specs:
//! `../shared/methods/policy-losses.md`, `aggregation-and-holder.md`, `token-credit.md`.

#[cfg(feature = "burn")]
pub mod actor_loss;
pub mod aggregation;
pub mod batching;
pub mod cispo;
pub mod clip_cov;
pub mod distillation;
pub mod eapo;
pub mod forking;
pub mod gmpo;
pub mod group_advantage;
pub mod gspo;
pub mod heal;
pub mod holder;
pub mod htpo;
pub mod imax;
pub mod kl;
pub mod kl_cov;
#[cfg(feature = "burn")]
pub mod loss_types;
pub mod opefo;
#[cfg(feature = "burn")]
pub mod policy_loss;
pub mod ppo_clip;
#[cfg(feature = "burn")]
pub mod ppo_clip_op;
pub mod reasonmaxxer;
pub mod shear;
pub mod sort;
pub mod token_weighting;
pub mod ugttt;
pub mod vps;

#[cfg(feature = "burn")]
pub use actor_loss::{ActorLoss, ActorLossConfig, actor_loss};
pub use aggregation::{AggMode, GlobalDenominators, aggregate_host, aggregate_host_with_counts};
#[cfg(feature = "burn")]
pub use aggregation::{aggregate, aggregate_sequences, aggregate_with_counts};
pub use batching::{BalanceConfig, BalancedBuffer, BalancedExtraction, balance_per_query, query_preserved_minibatches};
pub use cispo::CispoConfig;
pub use clip_cov::ClipCovConfig;
pub use distillation::{
    DistillEstimator, DistillationConfig, RockBypassConfig, importance_sampling_loss_host, opd_token_advantages,
    reverse_kl_from_logits, reverse_kl_host,
};
pub use eapo::{EapoConfig, eapo_advantages};
pub use forking::{ForkingDenominator, ForkingLossMask, forking_loss_mask};
/// Rock-token bypass weights (TokenFreezeKD) live with the rock-token detection in `forkrl-entropy`.
pub use forkrl_entropy::{rock_bypass_mean, rock_bypass_weights};
pub use gmpo::GmpoConfig;
pub use group_advantage::{
    AdvantageConfig, AdvantageEstimator, GroupAdvantages, SingletonPolicy, StdMode, group_advantages,
};
pub use gspo::GspoConfig;
pub use heal::{HealConfig, eda_rewards, entropy_curve_kl, heal_selection_score, select_top_k};
pub use holder::{HolderConfig, HolderVariant, PSchedule, ScheduleKind, holder_log_mean, holder_weights};
pub use htpo::{HtpoConfig, HtpoLowerBranch, HtpoTokenGroups, htpo_token_groups};
pub use imax::{ImaxConfig, PrefixInit, imax_rewards, infomax_rewards};
pub use kl::{AdaptiveKlController, KlEstimator, KlLossConfig, KlPenalty};
pub use kl_cov::KlCovConfig;
#[cfg(feature = "burn")]
pub use loss_types::{LOG_RATIO_CLAMP, LossContext, PolicyInputs, PolicyMetrics, SequenceLoss, TokenLoss};
pub use opefo::opefo_advantages;
#[cfg(feature = "burn")]
pub use policy_loss::{AggregatedLoss, PolicyLoss};
pub use ppo_clip::PpoClipConfig;
pub use reasonmaxxer::{
    AdaptiveBetaNeg, DecisionObjective, DecisionRows, GateVariant, ReasonMaxxerCoefficients, ReasonMaxxerConfig,
    apply_delta_hinge, apply_neg_prob_floor, decision_gate, delta_hinge_loss_host, gate_threshold,
    reasonmaxxer_advantages, reasonmaxxer_coefficients, reasonmaxxer_loss_host,
};
pub use shear::{ShearConfig, SinkhornConfig, shear_spans, shear_weights, sinkhorn_w1};
pub use sort::{SortConfig, SortWeighting, sort_needs_repair, sort_repair_loss_host, sort_weights};
pub use token_weighting::{RolloutView, TokenWeighting};
pub use ugttt::{BonusTarget, UgTttConfig, nuclear_norm, nuclear_norm_grad, ugttt_token_advantages};
pub use vps::{VpsConfig, vps_advantages, vps_segments};
#[cfg(feature = "burn")]
pub use {
    cispo::cispo_loss, clip_cov::clip_cov_loss, gmpo::gmpo_loss, gspo::gspo_loss, holder::holder_loss, htpo::htpo_loss,
    kl::kl_penalty, kl_cov::kl_cov_loss, ppo_clip::ppo_clip_loss,
};

/// Token log-ratios are clamped to `[−LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]` before `exp` (verl).
#[cfg(not(feature = "burn"))]
pub const LOG_RATIO_CLAMP: f32 = 20.0;
