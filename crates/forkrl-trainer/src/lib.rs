//! # forkrl-trainer
//!
//! The burn-based RLVR trainer of forkrl. So far it holds the backend smoke check ([`smoke`]), which every backend
//! must pass; the policy model (Qwen2/Qwen3/Llama decoder with Hugging Face checkpoint loading), the KV-cache sampler
//! and the RLVR loop are the subject of later work and are not in this crate yet.

pub mod smoke;

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
