//! Fused LM head + entropy + log-prob: per-token entropy, target log-prob and logsumexp from the last hidden states,
//! without materialising the `[N, V]` logits (what verl's fused kernels and Liger's fused linear cross-entropy do).
//!
//! For hidden states `h ∈ ℝ^{N×d}`, a head weight `W ∈ ℝ^{V×d}` (the tied embedding, or `lm_head.weight` as stored by
//! Hugging Face) and temperature `T`, row by row:
//!
//! ```text
//! z = h·Wᵀ / T,   H = −Σ softmax(z) log softmax(z),   lse = logsumexp(z),   log p_y = z_y − lse
//! ```
//!
//! The rows run in chunks of `chunk_rows`: each chunk's logits `[chunk_rows, V]` are computed, reduced to three numbers
//! per row by [`crate::tensor_op::EntropyBackend::entropy_stats`] (the host kernels of [`crate::kernel`] on the CPU
//! backend) and dropped. Under autodiff the operation saves `h`, `W`, the targets and the `[N, 3]` statistics; its
//! backward pass recomputes each chunk's logits, turns them into the logit gradient `g_z` (the entropy operation's
//! backward, see [`crate::tensor_op`]) and folds it in at once:
//!
//! ```text
//! ∂L/∂h_c = g_z · W,      ∂L/∂W = Σ_c g_zᵀ · h_c
//! ```
//!
//! so peak memory is `O(chunk_rows · V + N·d + V·d)` instead of the `O(N·V)` of logits followed by
//! [`crate::tensor::entropy_and_logprobs`]. On a device where the custom operation does not run, the same chunked
//! formula is composed from burn operations (autodiff then keeps each chunk's softmax until the backward pass).
//!
//! Source: the chunked linear-cross-entropy of Liger-Kernel (`fused_linear_cross_entropy`) and verl's
//! `use_fused_kernels` (`linear_cross_entropy` returning entropy and log-probs), here with the entropy kernels of this
//! crate.

use burn::backend::Dispatch;
use burn::tensor::{Int, Tensor};
use forkrl_core::{Error, Result};

use crate::tensor;
use crate::tensor_op::{self, EntropyBackend};

/// Rows per chunk that keep one chunk of logits at about `budget_bytes` of f32 (at least 1 row).
pub fn chunk_rows_for(vocab: usize, budget_bytes: usize) -> usize {
    (budget_bytes / (4 * vocab.max(1))).max(1)
}

/// Default budget of one chunk of logits: 256 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 20;

/// Entropy and target log-probs `[B, T]` of `softmax(hidden · weightᵀ / temperature)` for hidden states `[B, T, d]`,
/// a head weight `[V, d]` and target ids `[B, T]`, without materialising the `[B, T, V]` logits (see the module doc).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `weight` is not `[V, d]` with the hidden width or `targets` is not `[B, T]`;
/// [`Error::InvalidParameter`] for a temperature that is not finite and positive, `chunk_rows == 0`, `V == 0`, or a
/// target id outside `0..V` (two numbers are read back from the device to check the ids).
pub fn head_entropy_and_logprobs(
    hidden: Tensor<3>,
    weight: Tensor<2>,
    targets: Tensor<2, Int>,
    temperature: f32,
    chunk_rows: usize,
) -> Result<(Tensor<2>, Tensor<2>)> {
    let [b, t, d] = hidden.dims();
    let [v, wd] = weight.dims();
    if wd != d {
        return Err(Error::ShapeMismatch {
            op: "head_entropy_and_logprobs weight [V, d]",
            expected: vec![v, d],
            actual: vec![v, wd],
        });
    }
    tensor::check(temperature, chunk_rows, v)?;
    tensor::check_targets("head_entropy_and_logprobs targets [B, T]", &targets, [b, t])?;
    let device = hidden.device();
    let n = b * t;
    if n == 0 {
        return Ok((Tensor::zeros([b, t], &device), Tensor::zeros([b, t], &device)));
    }
    tensor::check_target_ids(&targets, v)?;
    if tensor_op::runs_on(device.as_dispatch()) {
        let stats = <Dispatch as EntropyBackend>::head_stats(
            hidden.reshape([n, d]).into_dispatch(),
            weight.into_dispatch(),
            targets.reshape([n]).into_dispatch(),
            temperature,
            chunk_rows,
        );
        let stats: Tensor<2> = Tensor::from_dispatch(stats);
        let column = |c: usize| stats.clone().slice([0..n, c..c + 1]).reshape([b, t]);
        return Ok((column(tensor_op::ENTROPY), column(tensor_op::LOGPROB)));
    }
    Ok(head_entropy_and_logprobs_composed(hidden, weight, targets, temperature, chunk_rows))
}

/// The composed path of [`head_entropy_and_logprobs`] (arguments already checked): per chunk of rows, the logits by a
/// matmul and their statistics by the composed entropy formulas of [`crate::tensor`].
fn head_entropy_and_logprobs_composed(
    hidden: Tensor<3>,
    weight: Tensor<2>,
    targets: Tensor<2, Int>,
    temperature: f32,
    chunk_rows: usize,
) -> (Tensor<2>, Tensor<2>) {
    let [b, t, d] = hidden.dims();
    let n = b * t;
    let flat = hidden.reshape([n, d]);
    let ids = targets.reshape([n, 1]);
    let wt = weight.transpose();
    let (mut hs, mut lps) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk_rows) {
        let end = (start + chunk_rows).min(n);
        let z = flat.clone().slice([start..end, 0..d]).matmul(wt.clone()); // [c, V]
        let (c, v) = (end - start, z.dims()[1]);
        let y = ids.clone().slice([start..end, 0..1]).reshape([1, c]);
        let (h, lp) = tensor::composed(z.reshape([1, c, v]), y, temperature, chunk_rows);
        hs.push(h.reshape([c]));
        lps.push(lp.reshape([c]));
    }
    (Tensor::cat(hs, 0).reshape([b, t]), Tensor::cat(lps, 0).reshape([b, t]))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, TensorData};
    use forkrl_core::Backend;

    use super::*;
    use crate::tensor::entropy_and_logprobs_reference;

    fn device() -> Device {
        Backend::from_env().expect("known backend").device().expect("compiled backend")
    }

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().expect("f32 data")
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Values and both gradients of the fused head against logits → `log_softmax` (the unfused reference), for chunk
    /// sizes that do and do not divide the rows, at two temperatures, with and without gradient checkpointing.
    #[test]
    fn fused_head_equals_the_unfused_path_in_values_and_gradients() {
        for device in [device().autodiff(), device().autodiff().gradient_checkpointing()] {
            fused_head_case(&device);
        }
    }

    fn fused_head_case(device: &Device) {
        let device = device.clone();
        device.seed(11);
        let (b, t, d, v) = (2, 7, 6, 37);
        let hidden = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::<2>::random([v, d], Distribution::Normal(0.0, 1.0), &device);
        let ids: Vec<i64> = (0..(b * t) as i64).map(|i| (i * 13) % v as i64).collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        let w_h = Tensor::<2>::random([b, t], Distribution::Normal(0.0, 1.0), &device);
        let w_lp = Tensor::<2>::random([b, t], Distribution::Normal(0.0, 1.0), &device);
        for (temperature, chunk) in [(1.0, 3), (0.7, 4), (1.3, 64)] {
            let run = |fused: bool| {
                let h = hidden.clone().detach().require_grad();
                let w = weight.clone().detach().require_grad();
                let (ent, lp) = if fused {
                    head_entropy_and_logprobs(h.clone(), w.clone(), targets.clone(), temperature, chunk).expect("valid")
                } else {
                    let logits = h.clone().matmul(w.clone().transpose().unsqueeze::<3>());
                    entropy_and_logprobs_reference(logits, targets.clone(), temperature).expect("valid")
                };
                let values = [host(ent.clone()), host(lp.clone())].concat();
                let grads = (ent * w_h.clone() + lp * w_lp.clone()).sum().backward();
                (values, host(h.grad(&grads).expect("dh")), host(w.grad(&grads).expect("dW")))
            };
            let (fused, reference) = (run(true), run(false));
            assert_close(&fused.0, &reference.0, 1e-5, "values");
            assert_close(&fused.1, &reference.1, 1e-4, "hidden gradient");
            assert_close(&fused.2, &reference.2, 1e-4, "weight gradient");
        }
    }

    #[test]
    fn composed_fallback_equals_the_custom_operation() {
        let device = device();
        device.seed(5);
        let (b, t, d, v) = (3, 4, 5, 19);
        let hidden = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 2.0), &device);
        let weight = Tensor::<2>::random([v, d], Distribution::Normal(0.0, 1.0), &device);
        let ids: Vec<i64> = (0..(b * t) as i64).map(|i| (i * 7) % v as i64).collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        let (h1, l1) = head_entropy_and_logprobs(hidden.clone(), weight.clone(), targets.clone(), 0.9, 5).expect("ok");
        let (h2, l2) = head_entropy_and_logprobs_composed(hidden, weight, targets, 0.9, 5);
        assert_close(&host(h1), &host(h2), 1e-5, "entropy");
        assert_close(&host(l1), &host(l2), 1e-5, "log-prob");
    }

    #[test]
    fn bad_shapes_ids_and_parameters_are_typed_errors() {
        let device = device();
        let hidden = Tensor::<3>::zeros([1, 2, 4], &device);
        let weight = Tensor::<2>::zeros([5, 4], &device);
        let ok = Tensor::<2, Int>::zeros([1, 2], &device);
        let call = |w: Tensor<2>, y: Tensor<2, Int>, temp: f32, chunk: usize| {
            head_entropy_and_logprobs(hidden.clone(), w, y, temp, chunk)
        };
        assert!(matches!(call(Tensor::zeros([5, 3], &device), ok.clone(), 1.0, 4), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(
            call(weight.clone(), Tensor::zeros([2, 1], &device), 1.0, 4),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(call(weight.clone(), ok.clone(), 0.0, 4), Err(Error::InvalidParameter { .. })));
        assert!(matches!(call(weight.clone(), ok.clone(), 1.0, 0), Err(Error::InvalidParameter { .. })));
        let bad = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 5], [1, 2]), &device);
        assert!(matches!(call(weight, bad, 1.0, 4), Err(Error::InvalidParameter { .. })));
    }

    #[test]
    fn chunk_rows_for_keeps_a_chunk_inside_the_budget() {
        assert_eq!(chunk_rows_for(151_936, DEFAULT_CHUNK_BYTES), 441);
        assert_eq!(chunk_rows_for(1 << 30, 1), 1);
        assert!(chunk_rows_for(20, DEFAULT_CHUNK_BYTES) * 20 * 4 <= DEFAULT_CHUNK_BYTES);
    }
}
