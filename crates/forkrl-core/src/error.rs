//! The error type shared by every forkrl crate's host-side code.
//!
//! Variants are structured (like candle's `ShapeMismatch { lhs, rhs, op }`): each carries the values a user needs to
//! find the offending input without a debugger.

/// Errors raised by forkrl's validation and numerics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An array does not have the shape the operation needs.
    #[error("shape mismatch in {op}: expected {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// The operation or argument that was checked.
        op: &'static str,
        /// The shape the operation needs.
        expected: Vec<usize>,
        /// The shape it was given.
        actual: Vec<usize>,
    },

    /// A NaN or infinity where a finite number is required.
    #[error("non-finite value {value} in {what} at position {position:?}")]
    NonFinite {
        /// What held the value (e.g. `"rewards"`, `"logits"`).
        what: &'static str,
        /// Multi-dimensional index of the first non-finite value, e.g. `[row, column]`.
        position: Vec<usize>,
        /// The value itself (NaN, +inf or -inf).
        value: f64,
    },

    /// A group (the responses to one prompt) with no member.
    #[error("group {group} is empty in {op}")]
    EmptyGroup {
        /// The operation that needs a non-empty group.
        op: &'static str,
        /// Index of the empty group.
        group: usize,
    },

    /// A batch with nothing in it where the operation needs at least one element.
    #[error("empty batch in {op}")]
    EmptyBatch {
        /// The operation that needs a non-empty batch.
        op: &'static str,
    },

    /// A parameter outside its valid range.
    #[error("invalid parameter {name} = {value}: {reason}")]
    InvalidParameter {
        /// Parameter name, as in the config (e.g. `"top_entropy_ratio"`).
        name: &'static str,
        /// The value given, formatted.
        value: String,
        /// What the valid range is.
        reason: String,
    },

    /// A response mask that marks a token beyond the response's length.
    #[error("response {row}: mask marks position {position} but the response length is {length}")]
    MaskBeyondLength {
        /// Row (sequence) index in the batch.
        row: usize,
        /// Position of the first masked token at or after `length`.
        position: usize,
        /// Declared response length.
        length: usize,
    },

    /// A response longer than the padded width of the batch.
    #[error("response {row} has length {length}, longer than the batch width {max_len}")]
    LengthExceedsWidth {
        /// Row (sequence) index in the batch.
        row: usize,
        /// Declared response length.
        length: usize,
        /// Padded width `T` of the batch.
        max_len: usize,
    },

    /// A backend name that is not known, or a backend not compiled into this build.
    #[error("backend {name:?} is not available: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        name: String,
        /// Why it cannot be used (unknown name, missing cargo feature, ...).
        reason: String,
    },

    /// Dynamic sampling gave up: after `attempts` generation batches fewer groups than needed had non-zero variance.
    #[error(
        "dynamic sampling kept {kept} of {needed} groups after {attempts} generation batches (max_num_gen_batches); \
         the data may be too easy or too hard for the policy"
    )]
    SamplingExhausted {
        /// Generation batches drawn.
        attempts: usize,
        /// Groups kept so far.
        kept: usize,
        /// Groups needed.
        needed: usize,
    },

    /// Reading a tensor back from the device failed (e.g. an unexpected element type).
    #[error("could not read {what} back from the device: {reason}")]
    DeviceReadback {
        /// What was being read.
        what: &'static str,
        /// The backend's message.
        reason: String,
    },
}

/// `Result` with forkrl's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidParameter`].
    pub fn invalid_parameter(name: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::InvalidParameter { name, value: value.to_string(), reason: reason.into() }
    }
}
