//! # forkrl-core
//!
//! The shared vocabulary of forkrl, the Rust library for reinforcement learning with verifiable rewards (RLVR) on
//! LLM reasoning:
//!
//! - [`BatchLayout`]: the ragged layout of one RLVR batch — prompts → groups of responses → response tokens — with
//!   `[B, T]` response masks, lengths and group offsets, validated once at construction, plus the per-group and
//!   per-sequence iteration helpers the other crates use;
//! - [`Error`] / [`Result`]: one error enum with structured variants (shapes, positions, parameter names);
//! - [`ResponseRows`]: response tokens anywhere in `[B, W]` rows ↔ the left-aligned [`BatchLayout`];
//! - [`derive_seed`] / [`SeedStream`]: one derivation for every named random stream of a run;
//! - [`allocator`]: glibc's allocator told to keep freed memory (for binaries: the trainer's many short-lived
//!   tensors otherwise cost a page fault per touched page);
//! - [`numeric`]: finiteness and range checks that name what is wrong;
//! - `Backend` (cargo feature `burn`, on by default): the burn backends (`cpu` = flex, `wgpu`, `cuda`) and their
//!   runtime selection.

pub mod allocator;
#[cfg(feature = "burn")]
pub mod attention;
#[cfg(feature = "burn")]
pub mod backend;
pub mod batch;
pub mod error;
#[cfg(feature = "burn")]
mod flex_host;
pub mod numeric;
#[cfg(feature = "burn")]
mod parallel;
pub mod report;
pub mod response_rows;
#[cfg(feature = "burn")]
pub mod rms_norm;
pub mod seed;
#[cfg(feature = "burn")]
pub mod swiglu;

#[cfg(feature = "burn")]
pub use backend::Backend;
pub use batch::{BatchLayout, Group, Sequence};
pub use error::{Error, Result};
pub use response_rows::ResponseRows;
pub use seed::{SeedStream, derive_seed};
