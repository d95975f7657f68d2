//! [`TrainerError`]: the one error type of the trainer, with structured variants (the key of a bad configuration
//! value, the path of a file, the tensor of a checkpoint, ...).

use forkrl_core::Error as CoreError;

/// Errors of the trainer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainerError {
    /// An error from forkrl-core (shapes, parameters, backend selection).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// An invalid configuration value, named by its key (`rl.group_size`, `model.d_model`, `task`, ...).
    #[error("invalid configuration: {key} = {value}: {reason}")]
    InvalidConfig {
        /// The key, as spelled in the TOML configuration.
        key: String,
        /// The value given, formatted.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A run directory that already holds a run, which a new run would overwrite.
    #[error(
        "{path} already holds a run (metrics.jsonl or checkpoints/); pass --overwrite to replace it, --resume to \
         continue it, or --name to start another"
    )]
    RunExists {
        /// The run directory.
        path: std::path::PathBuf,
    },
    /// A pipeline stage called out of order (e.g. `update` on a batch that `score` has not seen).
    #[error("{stage}: {reason}")]
    Stage {
        /// The stage that was called.
        stage: &'static str,
        /// What it needs first.
        reason: String,
    },
    /// A loss, gradient or parameter that is NaN or infinite.
    #[error("non-finite {what}: {value}")]
    NonFinite {
        /// What was not finite.
        what: &'static str,
        /// The offending value.
        value: f64,
    },
    /// A parameter that an optimiser step made NaN or infinite.
    #[error("a parameter is NaN or infinite after the update of RL step {step} (tensor {tensor} in module order)")]
    NonFiniteParameters {
        /// The RL step.
        step: usize,
        /// The first tensor with a non-finite value.
        tensor: usize,
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

impl TrainerError {
    /// An invalid configuration value.
    pub fn invalid(key: impl Into<String>, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { key: key.into(), value: value.to_string(), reason: reason.into() }
    }

    /// Turns a library error about a parameter into an [`TrainerError::InvalidConfig`] under the section `key`
    /// (`rl.policy_loss` + `clip_ratio_high` → `rl.policy_loss.clip_ratio_high`); other errors keep their variant.
    pub fn in_section(key: &str) -> impl FnOnce(CoreError) -> Self + '_ {
        move |e| match e {
            CoreError::InvalidParameter { name, value, reason } => {
                Self::InvalidConfig { key: format!("{key}.{name}"), value, reason }
            }
            other => Self::Core(other),
        }
    }
}
