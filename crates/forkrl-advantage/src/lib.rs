//! # forkrl-advantage
//!
//! Every way the RLVR literature turns outcome rewards into a per-token loss, composable and exact:
//!
//! | family | items | where |
//! |---|---|---|
//! | advantages (host) | GRPO, Dr. GRPO, RLOO | [`group_advantage`] |
//! | policy losses (burn) | PPO clip / clip-higher / dual clip, GSPO, CISPO, GMPO, Clip-Cov, KL-Cov, HölderPO | [`ppo_clip`], [`gspo`], [`cispo`], [`gmpo`], [`clip_cov`], [`kl_cov`], [`holder`] |
//! | aggregation | verl's five modes with explicit global denominators | [`aggregation`] |
//! | KL | k1, k2, k3, abs and straight-through `+` variants, KL in reward or loss | [`kl`] |
//!
//! Losses are minimised (verl's convention). Host functions work on `&[f32]` slices and need no burn; the tensor
//! functions (cargo feature `burn`, on by default) work on any burn backend and are differentiable. Each method's
//! module doc gives its equation, its source and which parts are reconstructions. Specs:
//! `../shared/methods/policy-losses.md`, `aggregation-and-holder.md`, `token-credit.md`.

pub mod aggregation;
pub mod cispo;
pub mod clip_cov;
pub mod gmpo;
pub mod group_advantage;
pub mod gspo;
pub mod holder;
pub mod kl;
pub mod kl_cov;
#[cfg(feature = "burn")]
pub mod policy_loss;
pub mod ppo_clip;

pub use aggregation::{AggMode, GlobalDenominators, aggregate_host, aggregate_host_with_counts};
#[cfg(feature = "burn")]
pub use aggregation::{aggregate, aggregate_sequences, aggregate_with_counts};
pub use cispo::CispoConfig;
pub use clip_cov::ClipCovConfig;
pub use gmpo::GmpoConfig;
pub use group_advantage::{
    AdvantageConfig, AdvantageEstimator, GroupAdvantages, SingletonPolicy, StdMode, group_advantages,
};
pub use gspo::GspoConfig;
pub use holder::{HolderConfig, HolderVariant, PSchedule, ScheduleKind, holder_log_mean, holder_weights};
pub use kl::{AdaptiveKlController, KlEstimator, KlLossConfig, KlPenalty};
pub use kl_cov::KlCovConfig;
#[cfg(feature = "burn")]
pub use policy_loss::{
    AggregatedLoss, LOG_RATIO_CLAMP, PolicyInputs, PolicyLoss, PolicyMetrics, SequenceLoss, TokenLoss,
};
pub use ppo_clip::PpoClipConfig;
#[cfg(feature = "burn")]
pub use {
    cispo::cispo_loss, clip_cov::clip_cov_loss, gmpo::gmpo_loss, gspo::gspo_loss, holder::holder_loss, kl::kl_penalty,
    kl_cov::kl_cov_loss, ppo_clip::ppo_clip_loss,
};

/// Token log-ratios are clamped to `[−LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]` before `exp` (verl).
#[cfg(not(feature = "burn"))]
pub const LOG_RATIO_CLAMP: f32 = 20.0;
