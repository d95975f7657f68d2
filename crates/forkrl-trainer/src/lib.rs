//! # forkrl-trainer
//!
//! The burn-based RLVR trainer of forkrl, as a library a researcher can step through or change one stage of:
//!
//! ```text
//! Trainer::new(config.check()?, &device) | Trainer::resume(checkpoints, &device)
//!   sft_step()                       sft.rs            supervised warm start on the task's worked solutions
//!   rollout()  -> RolloutBatch       rl/rollout.rs     allocate -> sample -> verify
//!   score(&mut RolloutBatch)         rl/score.rs       advantages, log pi_old / pi_ref, entropies, token weighting, loss mask
//!   update(&RolloutBatch) -> stats   rl/update.rs      PPO epochs x query-preserved mini-batches x micro-batches, optimiser
//!   evaluate(), save(dir)            eval.rs, rl/state.rs
//!   events -> impl Observer          rl/metrics.rs     metrics rows (verl names), progress; the library never prints
//! ```
//!
//! - [`config`]: every key of `forkrl-train`, checked once ([`config::TrainConfig::check`]);
//! - [`batch`]: [`batch::RolloutBatch`], the one type that flows through the stages;
//! - [`model`]: the Llama / Qwen2 / Qwen3 policy, Hugging Face loading, tokenizers, the KV-cache sampler, checkpoints;
//! - [`tasks`]: arithmetic, Countdown and JSONL datasets, with their verifiers;
//! - [`rl`]: the [`Trainer`], its stages, [`Observer`], checkpoint state and the run directory;
//! - [`experiment`]: paired experiments over arms × seeds (the 80/20 experiment) and their report;
//! - [`smoke`]: the backend smoke check.
//!
//! `docs/architecture.md` maps the step to these files; `docs/extending.md` says which files a new loss, token
//! weighting, task or architecture touches.

pub mod batch;
pub mod config;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod model;
pub mod rl;
pub mod sft;
pub mod smoke;
pub mod tasks;

pub use config::{CheckedConfig, TrainConfig};
pub use error::TrainerError;
pub use forkrl_core::{Backend, Error as CoreError};
pub use rl::{
    metrics::{Event, JsonlWriter, MetricsRow, NoObserver, Observer, Recorder, TrainSummary},
    trainer::{Trainer, train},
    update::UpdateStats,
};

/// The README's Rust examples, compiled (and run, unless marked `no_run`) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// The values of a tensor on the host as f32.
pub(crate) fn host_f32<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec_as::<f32>().map_err(|e| TrainerError::Backend(format!("{e:?}")))
}

/// A scalar on the host, or [`TrainerError::NonFinite`] naming `what` for NaN or ±inf.
pub(crate) fn finite_scalar(what: &'static str, t: &burn::tensor::Tensor<1>) -> Result<f32> {
    let value = host_f32(t.clone())?.first().copied().unwrap_or(f32::NAN);
    if value.is_finite() { Ok(value) } else { Err(TrainerError::NonFinite { what, value: f64::from(value) }) }
}

/// `Result` with [`TrainerError`].
pub type Result<T> = std::result::Result<T, TrainerError>;
