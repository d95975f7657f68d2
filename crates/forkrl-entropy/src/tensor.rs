//! Token entropy and target log-probs on burn tensors: any backend, differentiable through autodiff.
//!
//! For logits `[B, T, V]` and temperature `T_dec`, with `z' = z / T_dec`, per position (same centred form as the host
//! [`crate::kernel`]):
//!
//! ```text
//! m = max z' (detached),  e = exp(z' − m),  s = Σ e
//! H     = log s − Σ e·(z' − m) / s          = −Σ p log p
//! log p_y = (z'_y − m) − log s
//! ```
//!
//! Detaching `m` changes no gradient (the expressions do not depend on `m` mathematically) and keeps it out of the
//! graph. The centred sum avoids the cancellation of `logsumexp(z') − Σ p·z'` on near-one-hot rows.
//!
//! Rows are processed in chunks of `chunk_rows` positions, so a forward pass without autodiff never holds more than
//! `O(chunk_rows · V)` temporaries (verl's `entropy_from_logits_with_chunking`). Under autodiff the graph keeps each
//! chunk's softmax for the backward pass, as any autodiff implementation must without activation checkpointing.
//!
//! Non-finite logits: not checked here (checking means reading the tensor back). A NaN or ±inf in a row makes that
//! row's entropy and log-prob NaN and leaves other rows untouched; call [`check_finite_rows`] where a typed error is
//! wanted, or check the host outputs. Entropy used only for logging or masks should be computed on detached logits.

use burn::tensor::{Device, Int, Tensor, activation};
use forkrl_core::{Error, Result};

/// Default rows per chunk (verl's default chunk size).
pub const DEFAULT_CHUNK_ROWS: usize = 2048;

fn check(temperature: f32, chunk_rows: usize) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::invalid_parameter("temperature", temperature, "must be finite and > 0"));
    }
    if chunk_rows == 0 {
        return Err(Error::invalid_parameter("chunk_rows", 0, "must be at least 1"));
    }
    Ok(())
}

/// Entropy `[B, T]` of `softmax(logits / temperature)` along the last axis of `[B, T, V]` logits.
///
/// # Errors
/// [`Error::InvalidParameter`] for a temperature that is not finite and positive, or `chunk_rows == 0`.
pub fn token_entropy(logits: Tensor<3>, temperature: f32, chunk_rows: usize) -> Result<Tensor<2>> {
    check(temperature, chunk_rows)?;
    let [b, t, v] = logits.dims();
    let device = logits.device();
    let flat = logits.reshape([b * t, v]); // [N, V]
    let chunks: Vec<Tensor<2>> =
        split_rows(flat, chunk_rows).into_iter().map(|z| centred(z.div_scalar(temperature)).0).collect();
    Ok(cat_or_empty(chunks, &device).reshape([b, t]))
}

/// Entropy and target log-probs `[B, T]` from `[B, T, V]` logits and `[B, T]` target ids, in one pass per chunk.
///
/// # Errors
/// As [`token_entropy`]; [`Error::ShapeMismatch`] when `targets` is not `[B, T]`.
pub fn entropy_and_logprobs(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: f32,
    chunk_rows: usize,
) -> Result<(Tensor<2>, Tensor<2>)> {
    check(temperature, chunk_rows)?;
    let [b, t, v] = logits.dims();
    check_targets("entropy_and_logprobs targets [B, T]", &targets, [b, t])?;
    let device = logits.device();
    let flat = logits.reshape([b * t, v]);
    let ids = targets.reshape([b * t, 1]);
    let (mut hs, mut lps) = (Vec::new(), Vec::new());
    for (z, y) in split_rows(flat, chunk_rows).into_iter().zip(split_rows_int(ids, chunk_rows)) {
        let (h, shifted, log_s) = centred(z.div_scalar(temperature));
        hs.push(h);
        lps.push(shifted.gather(1, y) - log_s); // [n, 1]
    }
    Ok((cat_or_empty(hs, &device).reshape([b, t]), cat_or_empty(lps, &device).reshape([b, t])))
}

/// Reference path: `log_softmax`, then `H = −Σ exp(lsm)·lsm` and `log p_y = lsm_y`, on the whole `[B, T, V]` tensor.
/// Used by the tests to check the chunked fast path; materialises `[B, T, V]` log-probabilities.
///
/// # Errors
/// As [`entropy_and_logprobs`].
pub fn entropy_and_logprobs_reference(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: f32,
) -> Result<(Tensor<2>, Tensor<2>)> {
    check(temperature, 1)?;
    let [b, t, _] = logits.dims();
    check_targets("entropy_and_logprobs_reference targets [B, T]", &targets, [b, t])?;
    let lsm = activation::log_softmax(logits.div_scalar(temperature), 2); // [B, T, V]
    let h = (lsm.clone().exp() * lsm.clone()).sum_dim(2).neg().reshape([b, t]);
    let lp = lsm.gather(2, targets.reshape([b, t, 1])).reshape([b, t]);
    Ok((h, lp))
}

/// Returns an error naming the first `[b, t]` position whose logits contain a NaN or infinity (reads one bool per row
/// back from the device).
///
/// # Errors
/// [`Error::NonFinite`] with the position (the value is reported as NaN: the row is not read back).
pub fn check_finite_rows(logits: &Tensor<3>) -> Result<()> {
    let [b, t, v] = logits.dims();
    if b * t * v == 0 {
        return Ok(());
    }
    // A row is finite when every entry is: count the finite entries per row and compare with V.
    let finite = logits.clone().is_finite().int().sum_dim(2).reshape([b * t]); // [N]
    let counts = finite.into_data().try_into_vec_as::<i64>().unwrap_or_default();
    match counts.iter().position(|&c| c != v as i64) {
        None if counts.len() == b * t => Ok(()),
        None => Err(Error::NonFinite { what: "logits (device read-back failed)", position: vec![], value: f64::NAN }),
        Some(row) => Err(Error::NonFinite { what: "logits", position: vec![row / t, row % t], value: f64::NAN }),
    }
}

/// `(H [n], z' − m [n, V], log s [n, 1])` of a chunk of already temperature-scaled logits `[n, V]`; `H` as `[n, 1]`.
fn centred(z: Tensor<2>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let m = z.clone().max_dim(1).detach(); // [n, 1]
    let shifted = z - m; // [n, V], ≤ 0
    let e = shifted.clone().exp();
    let s = e.clone().sum_dim(1); // [n, 1]
    let log_s = s.clone().log();
    let h = log_s.clone() - (e * shifted.clone()).sum_dim(1) / s; // [n, 1]
    (h, shifted, log_s)
}

fn check_targets(op: &'static str, targets: &Tensor<2, Int>, expected: [usize; 2]) -> Result<()> {
    if targets.dims() == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { op, expected: expected.to_vec(), actual: targets.dims().to_vec() })
    }
}

fn split_rows(x: Tensor<2>, chunk_rows: usize) -> Vec<Tensor<2>> {
    let n = x.dims()[0];
    if n == 0 { Vec::new() } else { x.split(chunk_rows.min(n), 0) }
}

fn split_rows_int(x: Tensor<2, Int>, chunk_rows: usize) -> Vec<Tensor<2, Int>> {
    let n = x.dims()[0];
    if n == 0 { Vec::new() } else { x.split(chunk_rows.min(n), 0) }
}

/// Concatenates `[n_i, 1]` chunks into `[N, 1]` (an empty `[0, 1]` tensor when there is no row).
fn cat_or_empty(chunks: Vec<Tensor<2>>, device: &Device) -> Tensor<2> {
    if chunks.is_empty() {
        return Tensor::<2>::empty([0, 1], device);
    }
    Tensor::cat(chunks, 0)
}
