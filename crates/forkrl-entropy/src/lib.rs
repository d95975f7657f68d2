//! # forkrl-entropy
//!
//! Token entropy and log-prob kernels and forking-token masks ("Beyond the 80/20 Rule", arXiv 2506.01939).
//!
//! - [`kernel`]: entropy, logsumexp and target log-prob of every row of a host `[N, V]` logits buffer (f32, bf16,
//!   f16), temperature-scaled, in one read of each row, threaded, never allocating `[N, V]`.
//! - [`forking_mask`]: the batch-global top-ρ entropy mask (official exact top-k and TRL's quantile rule), its
//!   "bottom 1 − ρ" complement and a per-sequence variant.
//!
//! Still to come in this crate (forkrl-entropy issue): the differentiable burn tensor path, entropy statistics and
//! dynamics, and the credit analyses.

pub mod forking_mask;
pub mod kernel;

pub use forking_mask::{
    ForkingMask, SelectionRule, bottom_entropy_mask, per_sequence_top_entropy_mask, top_entropy_mask, top_k_count,
};
pub use kernel::{KernelOptions, LogitElement, TokenStats, token_stats};
