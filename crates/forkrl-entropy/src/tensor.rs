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
//! The centred sum avoids the cancellation of `logsumexp(z') − Σ p·z'` on near-one-hot rows.
//!
//! Two implementations compute it, rows in chunks of `chunk_rows` positions (verl's
//! `entropy_from_logits_with_chunking`), so that the forward pass never holds more than `O(chunk_rows · V)`
//! temporaries:
//! - on the Flex (CPU) backend, and on wgpu / CUDA when this crate's `wgpu` / `cuda` feature is on, one custom
//!   operation with its own backward pass ([`crate::tensor_op`]). Under autodiff it saves only the logits and three
//!   numbers per row; the backward pass recomputes the softmax (on the CPU backend both passes are the host kernels
//!   of [`crate::kernel`]). On the project's machine, the forward and backward of `[1, 2048, 32768]` f32 logits
//!   (256 MiB) peaked at 524 MiB of process memory this way (the logits and their gradient), against 1324 MiB for the
//!   composed operations and 1548 MiB for `log_softmax` (`cargo run --example tensor_memory -p forkrl-entropy`, see
//!   docs/entropy-kernel.md).
//! - elsewhere, the same formulas composed from burn's tensor operations ([`entropy_and_logprobs_composed`]), where
//!   autodiff keeps `z' − m` and its exponential for each chunk until the backward pass.
//!
//! Both give the same values and gradients (tested against each other and against the `log_softmax` reference).
//! Logits in bf16 or f16 are widened to f32 chunk by chunk by the custom operation; the composed path computes in the
//! logits' dtype.
//!
//! Non-finite logits: not checked here (checking means reading the tensor back). A NaN or ±inf in a row makes that
//! row's entropy and log-prob NaN and leaves other rows untouched; call [`check_finite_rows`] where a typed error is
//! wanted, or check the host outputs. Entropy used only for logging or masks should be computed on detached logits.

use burn::backend::Dispatch;
use burn::tensor::{Device, Int, Tensor, activation};
use forkrl_core::{Error, Result};

use crate::tensor_op::{self, EntropyBackend};

/// Default rows per chunk (verl's default chunk size).
pub const DEFAULT_CHUNK_ROWS: usize = 2048;

pub(crate) fn check(temperature: f32, chunk_rows: usize, vocab: usize) -> Result<()> {
    if vocab == 0 {
        return Err(Error::invalid_parameter("vocab (last axis of the logits)", 0, "must be at least 1"));
    }
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
/// [`Error::InvalidParameter`] for a temperature that is not finite and positive, `chunk_rows == 0` or `V == 0`.
pub fn token_entropy(logits: Tensor<3>, temperature: f32, chunk_rows: usize) -> Result<Tensor<2>> {
    let [b, t, v] = logits.dims();
    check(temperature, chunk_rows, v)?;
    let device = logits.device();
    if b * t == 0 {
        return Ok(Tensor::zeros([b, t], &device));
    }
    if tensor_op::runs_on(device.as_dispatch()) {
        // No targets: id 0 for every row, whose log-prob is computed and dropped (its gradient is zero).
        let ids = Tensor::<1, Int>::zeros([b * t], &device);
        let stats = custom_op(logits.reshape([b * t, v]), ids, temperature, chunk_rows);
        return Ok(stats_column(stats, tensor_op::ENTROPY, [b, t]));
    }
    let flat = logits.reshape([b * t, v]); // [N, V]
    let chunks: Vec<Tensor<2>> =
        split_rows(flat, chunk_rows).into_iter().map(|z| centred(z.div_scalar(temperature)).0).collect();
    Ok(cat_or_empty(chunks, &device).reshape([b, t]))
}

/// Entropy and target log-probs `[B, T]` from `[B, T, V]` logits and `[B, T]` target ids, in one pass per chunk.
///
/// # Errors
/// As [`token_entropy`]; [`Error::ShapeMismatch`] when `targets` is not `[B, T]`; [`Error::InvalidParameter`] naming
/// the offending id when a target is negative or `≥ V` (two numbers are read back from the device to check this).
pub fn entropy_and_logprobs(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: f32,
    chunk_rows: usize,
) -> Result<(Tensor<2>, Tensor<2>)> {
    let [b, t, v] = checked(&logits, &targets, temperature, chunk_rows)?;
    let device = logits.device();
    if b * t == 0 {
        return Ok((Tensor::zeros([b, t], &device), Tensor::zeros([b, t], &device)));
    }
    if tensor_op::runs_on(device.as_dispatch()) {
        let n = b * t;
        let stats = custom_op(logits.reshape([n, v]), targets.reshape([n]), temperature, chunk_rows);
        let h = stats_column(stats.clone(), tensor_op::ENTROPY, [b, t]);
        return Ok((h, stats_column(stats, tensor_op::LOGPROB, [b, t])));
    }
    Ok(composed(logits, targets, temperature, chunk_rows))
}

/// [`tensor_op::EntropyBackend::entropy_stats`] through burn's dispatch: `[N, V]`, `[N]` → `[N, 3]`.
fn custom_op(logits: Tensor<2>, ids: Tensor<1, Int>, temperature: f32, chunk_rows: usize) -> Tensor<2> {
    let stats = <Dispatch as EntropyBackend>::entropy_stats(
        logits.into_dispatch(),
        ids.into_dispatch(),
        temperature,
        chunk_rows,
    );
    Tensor::from_dispatch(stats)
}

/// Column `c` of the `[B·T, 3]` statistics of [`custom_op`], as `[B, T]`.
fn stats_column(stats: Tensor<2>, c: usize, [b, t]: [usize; 2]) -> Tensor<2> {
    stats.slice([0..b * t, c..c + 1]).reshape([b, t])
}

/// [`entropy_and_logprobs`] composed from burn's tensor operations on every backend (what it falls back to where the
/// custom operation does not run). Under autodiff the graph keeps `z' − m` and its exponential, two `[N, V]` tensors,
/// until the backward pass.
///
/// # Errors
/// As [`entropy_and_logprobs`].
pub fn entropy_and_logprobs_composed(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: f32,
    chunk_rows: usize,
) -> Result<(Tensor<2>, Tensor<2>)> {
    checked(&logits, &targets, temperature, chunk_rows)?;
    Ok(composed(logits, targets, temperature, chunk_rows))
}

/// The checks of [`entropy_and_logprobs`]; returns `[B, T, V]`.
fn checked(logits: &Tensor<3>, targets: &Tensor<2, Int>, temperature: f32, chunk_rows: usize) -> Result<[usize; 3]> {
    let [b, t, v] = logits.dims();
    check(temperature, chunk_rows, v)?;
    check_targets("entropy_and_logprobs targets [B, T]", targets, [b, t])?;
    if b * t > 0 {
        check_target_ids(targets, v)?;
    }
    Ok([b, t, v])
}

/// The composed path (arguments already checked).
pub(crate) fn composed(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: f32,
    chunk_rows: usize,
) -> (Tensor<2>, Tensor<2>) {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    if b * t == 0 {
        return (Tensor::zeros([b, t], &device), Tensor::zeros([b, t], &device));
    }
    let flat = logits.reshape([b * t, v]);
    let ids = targets.reshape([b * t, 1]);
    let (mut hs, mut lps) = (Vec::new(), Vec::new());
    for (z, y) in split_rows(flat, chunk_rows).into_iter().zip(split_rows_int(ids, chunk_rows)) {
        let (h, shifted, log_s) = centred(z.div_scalar(temperature));
        hs.push(h);
        lps.push(shifted.gather(1, y) - log_s); // [n, 1]
    }
    (cat_or_empty(hs, &device).reshape([b, t]), cat_or_empty(lps, &device).reshape([b, t]))
}

/// Every id must index the vocabulary: a gather out of range is undefined on some backends.
pub(crate) fn check_target_ids(targets: &Tensor<2, Int>, vocab: usize) -> Result<()> {
    // Minimum and maximum in one read-back (each read is a device sync).
    let range = Tensor::cat(vec![targets.clone().min(), targets.clone().max()], 0);
    let Some(&[lo, hi]) = range.into_data().try_into_vec_as::<i64>().ok().as_deref() else {
        return Err(Error::invalid_parameter(
            "target ids",
            "unreadable",
            "could not read the ids back from the device",
        ));
    };
    for id in [lo, hi] {
        if id < 0 || id as u64 >= vocab as u64 {
            return Err(Error::invalid_parameter("target id", id, format!("must be in 0..{vocab} (the vocabulary)")));
        }
    }
    Ok(())
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
    let [b, t, v] = logits.dims();
    check(temperature, 1, v)?;
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

pub(crate) fn check_targets(op: &'static str, targets: &Tensor<2, Int>, expected: [usize; 2]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};
    use forkrl_core::Backend;

    fn device() -> Device {
        Backend::from_env().expect("known backend").device().expect("compiled backend")
    }

    fn host(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().expect("f32 data")
    }

    #[test]
    fn the_custom_operation_runs_on_flex_and_on_the_enabled_cubecl_backends() {
        assert!(tensor_op::runs_on(Device::flex().as_dispatch()));
        assert!(tensor_op::runs_on(Device::flex().autodiff().as_dispatch()));
        #[cfg(feature = "wgpu")]
        assert!(tensor_op::runs_on(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice).autodiff().as_dispatch()));
    }

    #[test]
    fn custom_operation_equals_the_composed_path_in_values_and_gradients() {
        let device = device().autodiff();
        device.seed(3);
        let (b, t, v) = (3, 5, 41);
        let logits = Tensor::<3>::random([b, t, v], Distribution::Normal(0.0, 4.0), &device);
        let ids: Vec<i64> = (0..(b * t) as i64).map(|i| (i * 11) % v as i64).collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        let w_h = Tensor::<2>::random([b, t], Distribution::Normal(0.0, 1.0), &device);
        let w_lp = Tensor::<2>::random([b, t], Distribution::Normal(0.0, 1.0), &device);
        let run = |custom: bool| {
            let x = logits.clone().detach().require_grad();
            let (h, lp) = if custom {
                entropy_and_logprobs(x.clone(), targets.clone(), 0.9, 4).expect("valid")
            } else {
                entropy_and_logprobs_composed(x.clone(), targets.clone(), 0.9, 4).expect("valid")
            };
            let values = [host(h.clone()), host(lp.clone())].concat();
            let grads = (h * w_h.clone() + lp * w_lp.clone()).sum().backward();
            let g = x.grad(&grads).expect("gradient").into_data().try_into_vec_as::<f32>().expect("f32");
            (values, g)
        };
        let (custom, composed) = (run(true), run(false));
        for (what, a, b) in [("values", &custom.0, &composed.0), ("gradients", &custom.1, &composed.1)] {
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
            }
        }
    }
}
