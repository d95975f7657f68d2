//! # forkrl-entropy
//!
//! Token entropy and log-prob kernels and forking-token masks ("Beyond the 80/20 Rule", arXiv 2506.01939).
//!
//! - [`kernel`]: entropy, logsumexp and target log-prob of every row of a host `[N, V]` logits buffer (f32, bf16,
//!   f16), temperature-scaled, in one read of each row, threaded, never allocating `[N, V]`; and its backward pass
//!   (`∂L/∂z` from `∂L` with respect to those three), also one read of each row.
//! - [`forking_mask`]: the batch-global top-ρ entropy mask (official exact top-k and TRL's quantile rule), its
//!   "bottom 1 − ρ" complement and a per-sequence variant.
//! - [`entropy_stats`]: percentiles, fractions below thresholds, log-spaced histograms, per token-id aggregates,
//!   top-ρ overlap between two models and entropy change by base percentile.
//!
//! - [`polarity_entropy`]: EAPO's polarity × entropy quadrants (PHR, PLR, NHR, NLR) and the Clip-Cov / KL-Cov
//!   per-token covariance.
//!
//! - [`cancellation`]: how much token credit cancels within groups, per token id.
//!
//! - [`entropy_flow`](mod@entropy_flow): OPEFO's per-token entropy change, flows `F+`/`F−`, `λ*` and weights (a reconstruction).
//!
//! - [`rock_tokens`]: rock-token detection (freq × mean reverse KL, offline or online over a window of steps),
//!   persistence, TokenFreezeKD bypass weights and their alignment (predicted or context token).
//!
//! - [`epistemic`]: UG-TTT's per-token epistemic uncertainty, the mutual information between an ensemble's predictions
//!   and its members (BALD).
//!
//! - [`tensor`] (cargo feature `burn`, on by default): entropy and target log-probs on burn tensors, chunked,
//!   differentiable, any backend; [`tensor_op`]: the custom burn operation behind it (its own backward pass; the host
//!   kernels on the CPU backend); [`fused_head`]: the same statistics straight from the last hidden states and the LM
//!   head weight, chunk by chunk, without ever holding the `[N, V]` logits (forward and backward).

pub mod cancellation;
pub mod entropy_flow;
pub mod entropy_stats;
pub mod epistemic;
pub mod forking_mask;
#[cfg(feature = "burn")]
pub mod fused_head;
pub mod kernel;
pub mod polarity_entropy;
pub mod rock_tokens;
#[cfg(feature = "burn")]
pub mod tensor;
#[cfg(feature = "burn")]
pub mod tensor_op;

pub use cancellation::{CancellationReport, TokenCredit, cancellation_analysis};
pub use entropy_flow::{EntropyFlow, entropy_flow};
pub use entropy_stats::{
    EntropyChangeBin, EntropySummary, LogHistogram, SummaryOptions, TokenEntropy, entropy_change_by_base_percentile,
    summarize, token_entropy_table, top_entropy_overlap, top_high_entropy_tokens,
};
pub use epistemic::epistemic_mutual_information;
pub use forking_mask::{
    ForkingMask, SelectionRule, TokenSelection, bottom_entropy_mask, per_sequence_top_entropy_mask, random_token_mask,
    top_entropy_mask, top_k_count,
};
pub use kernel::{
    KernelOptions, LogitElement, StatsGrad, TokenStats, token_stats, token_stats_backward, token_stats_backward_into,
};
pub use polarity_entropy::{
    EntropyCut, PolarityEntropyQuadrants, QuadrantStats, polarity_entropy_quadrants, token_covariance,
};
pub use rock_tokens::{
    OnlineRockDetector, RockAlignment, RockConfig, RockReport, RockStat, detect_rock_tokens, rock_aligned_ids,
    rock_bypass_mean, rock_bypass_weights, rock_persistence,
};
