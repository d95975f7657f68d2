//! verl's loss-aggregation modes with explicit global denominators.
//!
//! `L` is a per-token loss `[B, T]`, `M` the loss mask. On one micro-batch of one data-parallel rank:
//!
//! ```text
//! token-mean              Σ_{i,t} L·M / batch_num_tokens                                  · dp_size
//! token-sum               Σ_{i,t} L·M                                                     · dp_size
//! seq-mean-token-sum      Σ_{i: |o_i|>0} Σ_t L·M / global_batch_size                      · dp_size
//! seq-mean-token-sum-norm Σ_{i: |o_i|>0} Σ_t L·M / global_batch_size / loss_scale_factor  · dp_size
//! seq-mean-token-mean     Σ_{i: |o_i|>0} (Σ_t L·M / Σ_t M) / global_batch_size            · dp_size
//! ```
//!
//! `batch_num_tokens` (loss tokens) and `global_batch_size` (non-empty sequences) count the **global** mini-batch,
//! all ranks together; the `· dp_size` cancels the average of the data-parallel all-reduce. Summing the micro-batch
//! results (and averaging over ranks) then gives exactly the whole-batch value: the objective does not depend on how
//! the batch is split (verl `core_algos.py::agg_loss`, upstream semantics; `../shared/methods/aggregation-and-holder.md`
//! §1). Numerators are always masked, so padding never leaks, whatever values (NaN included) it holds; zero-length
//! responses are excluded from the sequence count; a zero denominator gives 0, not NaN.
//!
//! Dr. GRPO's constant `C` (`loss_scale_factor`) must be pinned (e.g. `max_response_length`); there is no fallback to
//! the padded width of the batch, which would change from batch to batch (methods README decision 16). The norm mode
//! follows the paper/upstream form `(Σ/G)/C`, not older verl's `Σ/C`.
//!
//! Which mode reproduces which paper: GRPO = `seq-mean-token-mean`, DAPO / CISPO / 80-20 = `token-mean`,
//! Dr. GRPO = `seq-mean-token-sum-norm`, GSPO = `seq-mean-token-mean` (forced).

use forkrl_core::{Error, Result, numeric::check_len};
use serde::{Deserialize, Serialize};

/// verl's `loss_agg_mode`, with verl's names in serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AggMode {
    /// Every loss token of the global batch has equal weight (DAPO).
    #[default]
    #[serde(rename = "token-mean")]
    TokenMean,
    /// Plain masked sum.
    #[serde(rename = "token-sum")]
    TokenSum,
    /// Mean over sequences of the per-sequence token sum.
    #[serde(rename = "seq-mean-token-sum")]
    SeqMeanTokenSum,
    /// Mean over sequences of the per-sequence token mean (original GRPO).
    #[serde(rename = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    /// `seq-mean-token-sum / loss_scale_factor` (Dr. GRPO).
    #[serde(rename = "seq-mean-token-sum-norm")]
    SeqMeanTokenSumNorm,
}

impl AggMode {
    /// verl's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            AggMode::TokenMean => "token-mean",
            AggMode::TokenSum => "token-sum",
            AggMode::SeqMeanTokenSum => "seq-mean-token-sum",
            AggMode::SeqMeanTokenMean => "seq-mean-token-mean",
            AggMode::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        }
    }
}

/// The global counts every micro-batch divides by.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalDenominators {
    /// Loss tokens in the global mini-batch (all micro-batches, all ranks).
    pub batch_num_tokens: usize,
    /// Non-empty sequences in the global mini-batch.
    pub global_batch_size: usize,
    /// Data-parallel ranks whose gradients are averaged (1 on one device).
    pub dp_size: usize,
    /// Dr. GRPO's pinned constant `C` (required by `seq-mean-token-sum-norm` only).
    pub loss_scale_factor: Option<f64>,
}

impl GlobalDenominators {
    /// Counts for a single batch on one device, from a row-major `[B, width]` mask.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `width == 0` with a non-empty mask, or a mask length that is not a multiple of
    /// `width`.
    pub fn from_mask(mask: &[bool], width: usize) -> Result<Self> {
        let rows = rows_of(mask.len(), width)?;
        let mut tokens = 0;
        let mut nonempty = 0;
        for r in 0..rows {
            let n = mask[r * width..(r + 1) * width].iter().filter(|&&m| m).count();
            tokens += n;
            nonempty += usize::from(n > 0);
        }
        Ok(Self { batch_num_tokens: tokens, global_batch_size: nonempty, dp_size: 1, loss_scale_factor: None })
    }

    /// The same counts with a pinned Dr. GRPO constant.
    pub fn with_loss_scale_factor(self, c: f64) -> Self {
        Self { loss_scale_factor: Some(c), ..self }
    }

    /// Adds the counts of another micro-batch or rank (for building global counts piece by piece).
    pub fn merge(self, other: Self) -> Self {
        Self {
            batch_num_tokens: self.batch_num_tokens + other.batch_num_tokens,
            global_batch_size: self.global_batch_size + other.global_batch_size,
            ..self
        }
    }

    /// Checks `dp_size ≥ 1` and, for `mode`, the scale factor.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming `dp_size` or `loss_scale_factor`.
    pub fn validate(&self, mode: AggMode) -> Result<()> {
        if self.dp_size == 0 {
            return Err(Error::invalid_parameter("dp_size", 0, "must be at least 1"));
        }
        if mode == AggMode::SeqMeanTokenSumNorm {
            match self.loss_scale_factor {
                Some(c) if c.is_finite() && c > 0.0 => {}
                Some(c) => return Err(Error::invalid_parameter("loss_scale_factor", c, "must be finite and > 0")),
                None => {
                    return Err(Error::invalid_parameter(
                        "loss_scale_factor",
                        "None",
                        "seq-mean-token-sum-norm needs a pinned constant (e.g. max_response_length)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The factors `(token_factor, seq_factor)`: the token modes multiply the masked sum by the first, the sequence
    /// modes the sum of per-sequence values by the second. A zero count gives a zero factor (a zero loss, not NaN).
    pub(crate) fn factors(&self, mode: AggMode) -> Result<(f64, f64)> {
        self.validate(mode)?;
        let dp = self.dp_size as f64;
        let inv = |n: usize| if n == 0 { 0.0 } else { dp / n as f64 };
        let c = self.loss_scale_factor.unwrap_or(1.0);
        Ok(match mode {
            AggMode::TokenMean => (inv(self.batch_num_tokens), 0.0),
            AggMode::TokenSum => (dp, 0.0),
            AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenMean => (0.0, inv(self.global_batch_size)),
            AggMode::SeqMeanTokenSumNorm => (0.0, inv(self.global_batch_size) / c),
        })
    }
}

fn rows_of(len: usize, width: usize) -> Result<usize> {
    if width == 0 {
        return if len == 0 { Ok(0) } else { Err(Error::invalid_parameter("width", 0, "must be > 0")) };
    }
    if !len.is_multiple_of(width) {
        return Err(Error::ShapeMismatch {
            op: "aggregate: mask [B, T]",
            expected: vec![len / width, width],
            actual: vec![len],
        });
    }
    Ok(len / width)
}

/// Host aggregation of a row-major `[B, width]` loss under `mask` (the reference the tensor path is tested against).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `loss` and `mask` differ in length or are not `[B, width]`; the errors of
/// [`GlobalDenominators::validate`]; [`Error::NonFinite`] for a NaN/inf loss on a masked position.
pub fn aggregate_host(loss: &[f32], mask: &[bool], width: usize, mode: AggMode, d: &GlobalDenominators) -> Result<f64> {
    aggregate_host_with_counts(loss, mask, mask, width, mode, d)
}

/// As [`aggregate_host`], with the per-sequence token counts of `seq-mean-token-mean` taken from `count_mask`
/// instead of `mask` (the forking mask's all-token denominator: numerator over selected tokens, per-sequence mean
/// over all response tokens).
///
/// # Errors
/// As [`aggregate_host`].
pub fn aggregate_host_with_counts(
    loss: &[f32],
    mask: &[bool],
    count_mask: &[bool],
    width: usize,
    mode: AggMode,
    d: &GlobalDenominators,
) -> Result<f64> {
    check_len("aggregate: loss vs mask", loss.len(), mask.len())?;
    check_len("aggregate: count_mask vs mask", count_mask.len(), mask.len())?;
    forkrl_core::numeric::check_finite_masked("loss", loss, mask)?;
    let rows = rows_of(mask.len(), width)?;
    let (token_factor, seq_factor) = d.factors(mode)?;
    let mut total = 0.0f64;
    for r in 0..rows {
        let span = r * width..(r + 1) * width;
        let sum: f64 =
            loss[span.clone()].iter().zip(&mask[span.clone()]).filter(|(_, m)| **m).map(|(&l, _)| f64::from(l)).sum();
        total += match mode {
            AggMode::TokenMean | AggMode::TokenSum => sum * token_factor,
            AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenSumNorm => sum * seq_factor,
            AggMode::SeqMeanTokenMean => {
                let n = count_mask[span].iter().filter(|&&m| m).count();
                if n == 0 { 0.0 } else { sum / n as f64 * seq_factor }
            }
        };
    }
    Ok(total)
}

#[cfg(feature = "burn")]
mod tensor {
    use super::{AggMode, GlobalDenominators};
    use burn::tensor::{Bool, FloatDType, Tensor};
    use forkrl_core::{Error, Result};

    /// Tensor aggregation of a `[B, T]` per-token loss under a `[B, T]` boolean loss mask; returns a `[1]` tensor,
    /// differentiable w.r.t. `loss`. Masked-out positions are replaced by 0 before the sum (NaN padding cannot leak).
    /// The sums are taken in f32 (an f16 or bf16 loss is cast first), so the result is f32.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the shapes differ; the errors of [`GlobalDenominators::validate`].
    pub fn aggregate(
        loss: Tensor<2>,
        mask: &Tensor<2, Bool>,
        mode: AggMode,
        d: &GlobalDenominators,
    ) -> Result<Tensor<1>> {
        aggregate_with_counts(loss, mask, mask, mode, d)
    }

    /// As [`aggregate`], with the per-sequence counts of `seq-mean-token-mean` from `count_mask`
    /// (see [`super::aggregate_host_with_counts`]).
    ///
    /// # Errors
    /// As [`aggregate`].
    pub fn aggregate_with_counts(
        loss: Tensor<2>,
        mask: &Tensor<2, Bool>,
        count_mask: &Tensor<2, Bool>,
        mode: AggMode,
        d: &GlobalDenominators,
    ) -> Result<Tensor<1>> {
        for (op, m) in [("aggregate: mask vs loss", mask), ("aggregate: count_mask vs loss", count_mask)] {
            if m.dims() != loss.dims() {
                return Err(Error::ShapeMismatch { op, expected: loss.dims().to_vec(), actual: m.dims().to_vec() });
            }
        }
        let (token_factor, seq_factor) = d.factors(mode)?;
        // Sums in f32 whatever the loss's dtype (an f16 / bf16 sum over a batch loses the small terms; burn does not
        // promote mixed dtypes against the f32 counts either); the gradient flows back through the cast, a no-op for
        // f32.
        let loss = loss.cast(FloatDType::F32);
        let masked = loss.mask_fill(mask.clone().bool_not(), 0.0);
        Ok(match mode {
            AggMode::TokenMean | AggMode::TokenSum => masked.sum().mul_scalar(token_factor),
            AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenSumNorm => masked.sum().mul_scalar(seq_factor),
            AggMode::SeqMeanTokenMean => {
                let counts = count_mask.clone().float().sum_dim(1).clamp_min(1.0); // [B, 1]; empty rows sum to 0
                (masked.sum_dim(1) / counts).sum().mul_scalar(seq_factor)
            }
        })
    }

    /// Aggregates a per-sequence loss `[B]` (GMPO, Hölder): `Σ_{i non-empty} ℓ_i / global_batch_size · dp_size`.
    /// Empty sequences (`nonempty[i] = false`) contribute 0 whatever `ℓ_i` holds.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the shapes differ; [`Error::InvalidParameter`] for `dp_size == 0`.
    pub fn aggregate_sequences(
        loss: Tensor<1>,
        nonempty: &Tensor<1, Bool>,
        d: &GlobalDenominators,
    ) -> Result<Tensor<1>> {
        if nonempty.dims() != loss.dims() {
            return Err(Error::ShapeMismatch {
                op: "aggregate_sequences: nonempty vs loss",
                expected: loss.dims().to_vec(),
                actual: nonempty.dims().to_vec(),
            });
        }
        let (_, seq_factor) = d.factors(AggMode::SeqMeanTokenSum)?;
        Ok(loss.cast(FloatDType::F32).mask_fill(nonempty.clone().bool_not(), 0.0).sum().mul_scalar(seq_factor))
    }

    impl GlobalDenominators {
        /// Counts for a single batch on one device from a `[B, T]` tensor mask (reads two numbers back).
        pub fn from_tensor_mask(mask: &Tensor<2, Bool>) -> Self {
            let per_row = mask.clone().int().sum_dim(1); // [B, 1]
            let tokens: i64 = per_row.clone().sum().into_scalar();
            let nonempty: i64 = per_row.greater_elem(0).int().sum().into_scalar();
            Self {
                batch_num_tokens: tokens.max(0) as usize,
                global_batch_size: nonempty.max(0) as usize,
                dp_size: 1,
                loss_scale_factor: None,
            }
        }
    }
}

#[cfg(feature = "burn")]
pub use tensor::{aggregate, aggregate_sequences, aggregate_with_counts};

#[cfg(test)]
mod tests {
    use super::*;

    // Test vector 2.C.
    const L: [f32; 16] = [1., 2., 3., 4., 5., 6., 0., 0., 7., 0., 0., 0., 9., 9., 9., 9.];
    const M: [u8; 16] = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

    fn mask() -> Vec<bool> {
        M.iter().map(|&m| m == 1).collect()
    }

    #[test]
    fn test_vector_2c() {
        let m = mask();
        let d = GlobalDenominators::from_mask(&m, 4).expect("valid").with_loss_scale_factor(4.0);
        assert_eq!((d.batch_num_tokens, d.global_batch_size), (7, 3));
        let agg = |mode| aggregate_host(&L, &m, 4, mode, &d).expect("valid");
        assert!((agg(AggMode::TokenSum) - 28.0).abs() < 1e-12);
        assert!((agg(AggMode::TokenMean) - 4.0).abs() < 1e-12);
        assert!((agg(AggMode::SeqMeanTokenMean) - 5.0).abs() < 1e-12);
        assert!((agg(AggMode::SeqMeanTokenSum) - 9.333333).abs() < 1e-6);
        assert!((agg(AggMode::SeqMeanTokenSumNorm) - 2.333333).abs() < 1e-6);
        let dp4 = GlobalDenominators { dp_size: 4, ..d };
        assert!((aggregate_host(&L, &m, 4, AggMode::TokenSum, &dp4).expect("valid") - 28.0 * 4.0).abs() < 1e-12);
    }

    #[test]
    fn micro_batches_and_ranks_with_global_denominators() {
        let m = mask();
        let d = GlobalDenominators::from_mask(&m, 4).expect("valid");
        let first = aggregate_host(&L[..8], &m[..8], 4, AggMode::TokenMean, &d).expect("valid");
        let second = aggregate_host(&L[8..], &m[8..], 4, AggMode::TokenMean, &d).expect("valid");
        assert!((first - 3.0).abs() < 1e-12 && (second - 1.0).abs() < 1e-12);
        let dp2 = GlobalDenominators { dp_size: 2, ..d };
        let r0 = aggregate_host(&L[..8], &m[..8], 4, AggMode::TokenMean, &dp2).expect("valid");
        let r1 = aggregate_host(&L[8..], &m[8..], 4, AggMode::TokenMean, &dp2).expect("valid");
        assert!((r0 - 6.0).abs() < 1e-12 && (r1 - 2.0).abs() < 1e-12 && ((r0 + r1) / 2.0 - 4.0).abs() < 1e-12);
        // The bug class: local denominators give 5.25, not 4.
        let local = |lo: usize, hi: usize| {
            let dl = GlobalDenominators::from_mask(&m[lo..hi], 4).expect("valid");
            aggregate_host(&L[lo..hi], &m[lo..hi], 4, AggMode::TokenMean, &dl).expect("valid")
        };
        assert!(((local(0, 8) + local(8, 16)) / 2.0 - 5.25).abs() < 1e-12);
    }

    #[test]
    fn empty_and_bad_input() {
        let none = vec![false; 8];
        let d = GlobalDenominators::from_mask(&none, 4).expect("valid").with_loss_scale_factor(4.0);
        let nan = [f32::NAN; 8];
        for mode in [
            AggMode::TokenMean,
            AggMode::TokenSum,
            AggMode::SeqMeanTokenSum,
            AggMode::SeqMeanTokenMean,
            AggMode::SeqMeanTokenSumNorm,
        ] {
            assert_eq!(aggregate_host(&nan, &none, 4, mode, &d).expect("empty"), 0.0, "{}", mode.name());
        }
        let m = mask();
        let d = GlobalDenominators::from_mask(&m, 4).expect("valid");
        assert!(matches!(
            aggregate_host(&L, &m, 4, AggMode::SeqMeanTokenSumNorm, &d),
            Err(Error::InvalidParameter { name: "loss_scale_factor", .. })
        ));
        assert!(matches!(aggregate_host(&L, &m[..8], 4, AggMode::TokenMean, &d), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(aggregate_host(&L, &m, 5, AggMode::TokenMean, &d), Err(Error::ShapeMismatch { .. })));
        let mut bad = L;
        bad[2] = f32::INFINITY;
        assert!(matches!(aggregate_host(&bad, &m, 4, AggMode::TokenMean, &d), Err(Error::NonFinite { .. })));
        let dp0 = GlobalDenominators { dp_size: 0, ..d };
        assert!(matches!(aggregate_host(&L, &m, 4, AggMode::TokenMean, &dp0), Err(Error::InvalidParameter { .. })));
    }

    #[test]
    fn serde_uses_verl_names() {
        let json = serde_json::to_string(&AggMode::SeqMeanTokenSumNorm).expect("serialise");
        assert_eq!(json, "\"seq-mean-token-sum-norm\"");
        let back: AggMode = serde_json::from_str("\"token-mean\"").expect("parse");
        assert_eq!(back, AggMode::TokenMean);
        assert!(serde_json::from_str::<AggMode>("\"token_mean\"").is_err());
    }
}
