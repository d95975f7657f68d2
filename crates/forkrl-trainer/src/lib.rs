//! # forkrl-trainer
//!
//! The burn-based RLVR trainer of forkrl:
//! - the policy ([`policy`]): a Llama / Qwen2 / Qwen3 decoder with grouped-query attention, built tiny from scratch
//!   or loaded from a Hugging Face directory ([`hf`], with [`tokenizer::HfTokenizer`]);
//! - batched generation with a KV cache and left padding ([`sampler`]);
//! - atomic checkpoints of our own ([`checkpoint`]);
//! - tasks ([`task`]: [`arithmetic`], [`countdown`], [`jsonl`] datasets) and their verifiers ([`verify`]);
//! - the SFT + RLVR loop with checkpoints and resume ([`rlvr`], run by `cargo xtask train`); the backend smoke check
//!   ([`smoke`]).

pub mod arithmetic;
pub mod checkpoint;
pub mod countdown;
pub mod hf;
pub mod jsonl;
pub mod policy;
pub mod rlvr;
pub mod sampler;
pub mod smoke;
pub mod task;
pub mod tokenizer;
pub mod verify;

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
    /// Tensors or batches of inconsistent shapes.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A sequence longer than the model's context (its RoPE tables / `max_len`).
    #[error("{tokens} tokens exceed the model's context of {context}")]
    ContextOverflow {
        /// Tokens asked for (prompt, plus new tokens when generating).
        tokens: usize,
        /// The model's `max_len`.
        context: usize,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A Hugging Face `config.json` (or generation/tokenizer config) with a missing, mistyped or unsupported entry.
    #[error("{path}: {reason}")]
    HfConfig {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// An architecture (`model_type`) this crate does not implement.
    #[error("unsupported architecture {model_type:?} (supported: llama, qwen2, qwen3)")]
    UnsupportedArchitecture {
        /// The `model_type` of `config.json`.
        model_type: String,
    },
    /// A checkpoint tensor that the model needs is absent.
    #[error("tensor {name:?} is missing from the checkpoint {path}")]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The checkpoint directory or file.
        path: std::path::PathBuf,
    },
    /// A checkpoint tensor with the wrong shape or dtype.
    #[error("tensor {name:?}: expected {expected}, found {found}")]
    TensorMismatch {
        /// The tensor's name.
        name: String,
        /// What the model needs.
        expected: String,
        /// What the checkpoint holds.
        found: String,
    },
    /// A safetensors file that cannot be parsed (truncated, corrupt header).
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: std::path::PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A checkpoint of ours that cannot be written or read back (truncated, shapes not matching its config).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
    /// A dataset line that is not a usable record.
    #[error("{path}:{line}: {reason}")]
    Dataset {
        /// The file.
        path: std::path::PathBuf,
        /// 1-based line number (0: the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A tokenizer that cannot be loaded or that fails on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// The values of a tensor on the host as f32.
pub(crate) fn host_f32<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec_as::<f32>().map_err(|e| TrainerError::Backend(format!("{e:?}")))
}

/// `Result` with [`TrainerError`].
pub type Result<T> = std::result::Result<T, TrainerError>;
