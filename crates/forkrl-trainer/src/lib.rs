//! # forkrl-trainer
//!
//! The burn-based RLVR trainer of forkrl: the built-in task ([`arithmetic`], [`tokenizer`]), a tiny Llama-style policy
//! ([`policy`]), the SFT + RLVR loop ([`rlvr`], run by `cargo xtask train`) and the backend smoke check ([`smoke`]).
//! Not yet here: Hugging Face checkpoint loading, the KV-cache sampler, checkpoints and resume, JSONL datasets.

pub mod arithmetic;
pub mod policy;
pub mod rlvr;
pub mod smoke;
pub mod tokenizer;

pub use forkrl_core::{Backend, Error as CoreError};

/// Errors of the trainer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainerError {
    /// An error from forkrl-core (shapes, parameters, backend selection).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// An invalid model or training configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A loss, gradient or parameter that is NaN or infinite.
    #[error("non-finite {what}: {value}")]
    NonFinite {
        /// What was not finite.
        what: &'static str,
        /// The offending value.
        value: f64,
    },
    /// The backend failed to execute or to return data.
    #[error("backend error: {0}")]
    Backend(String),
}

/// `Result` with [`TrainerError`].
pub type Result<T> = std::result::Result<T, TrainerError>;
