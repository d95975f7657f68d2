//! # forkrl-rollout
//!
//! Decides how many samples each prompt gets and how each token is drawn.
//!
//! | family | items | where |
//! |---|---|---|
//! | allocation | HORA (RECONSTRUCTION), uniform, the per-prompt statistics store | [`hora`], [`stats_store`] |
//! | filtering and shaping | DAPO dynamic sampling, overlong filtering and soft punishment | [`dynamic_sampling`], [`overlong`] |
//! | decoding operators | greedy, temperature, top-k, top-p, two-temperature, CUTS, Mixed-CUTS | [`decoding`] |
//! | metrics | unbiased pass@k, maj@k, avg@k | [`pass_at_k`] |
//! | simulator | uniform vs HORA vs dynamic sampling; Mixed-CUTS variance (`cargo xtask simulate`) | [`simulate`] |
//!
//! Everything here works on host data and needs no burn. Specs: `../shared/methods/rollout-allocation.md` and
//! `entropy-and-forking-tokens.md` §2.4.

pub mod decoding;
pub mod dynamic_sampling;
pub mod hora;
pub mod overlong;
pub mod pass_at_k;
pub mod simulate;
pub mod stats_store;

pub use decoding::{
    CutsConfig, Decoding, MixedCuts, RowRequest, Sampled, decode, decode_rows, mixed_group_variance, token_rng,
};
pub use dynamic_sampling::{DynamicSampler, DynamicSamplingConfig, keep_groups};
pub use hora::{
    Allocation, BetaPosterior, HoraConfig, PosteriorSource, hora_allocate, hora_allocate_after_probe,
    uniform_allocation,
};
pub use overlong::OverlongConfig;
pub use pass_at_k::{avg_at_k, maj_at_k, mean_pass_at_k, pass_at_k};
pub use stats_store::{PromptStats, PromptStatsStore};
