//! RMSNorm as **one** burn operation with its own backward pass on the CPU backend: one pass over the rows forward and
//! one backward, keeping only the input and one scalar per row for the backward pass (the composed path runs seven
//! operations, each a fresh buffer, and keeps four of them).
//!
//! Over the last axis (width `D`) of each row `x`, with `γ` the gain (Zhang & Sennrich 2019, as `transformers`'
//! `LlamaRMSNorm` and burn's `RmsNorm` compute it):
//!
//! ```text
//! r = (mean(x²) + ε)^(−1/2),   x̂ = x·r,   y = x̂ ⊙ γ
//! ```
//!
//! Backward, for the output gradient `dy` (`g = dy ⊙ γ`):
//!
//! ```text
//! dx = r·(g − x̂·mean(g ⊙ x̂)),   dγ = Σ_rows dy ⊙ x̂
//! ```
//!
//! `dγ` is summed per block of [`ROWS_PER_BLOCK`] rows and the blocks are added in order, so the result does not
//! depend on the thread count. [`rms_norm`] picks this operation on the Flex backend for f32 tensors and composes burn
//! operations elsewhere ([`composed_rms_norm`], the reference the tests compare with).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor};

use crate::parallel;

/// Rows per block of the backward pass's `dγ` partial sums (fixed, so the sum order is too).
pub const ROWS_PER_BLOCK: usize = 64;

/// Backend extension: RMSNorm over the rows of a `[N, D]` tensor. The caller checks that `gamma` is `[D]` and that
/// both are f32.
#[backend_extension(Flex, Autodiff)]
pub trait RmsNormBackend: Backend {
    /// `y` `[N, D]` and `r` `[N]`.
    fn rms_norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dx [N, D], dγ [D])` for the output gradient `grad` `[N, D]`, from the forward pass's `r`.
    fn rms_norm_rows_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        r: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

impl RmsNormBackend for Flex {
    fn rms_norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex_host::forward(&x, &gamma, eps)
    }

    fn rms_norm_rows_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        r: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex_host::backward(&x, &gamma, &r, &grad)
    }
}

impl<B: Backend + RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct RmsNormBackward;

        impl<B: Backend + RmsNormBackend> Backward<B, 2> for RmsNormBackward {
            /// x, γ and r.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [x_node, gamma_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if x_node.is_none() && gamma_node.is_none() {
                    return;
                }
                let (x, gamma, r) = ops.state;
                let (dx, dgamma) = B::rms_norm_rows_backward(x, gamma, r, grad);
                for (node, g) in [(x_node, dx), (gamma_node, dgamma)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match RmsNormBackward.prepare::<C>([x.node(), gamma.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (x.primitive().clone(), gamma.primitive().clone());
                let (y, r) = B::rms_norm_rows(x.clone(), gamma.clone(), eps);
                let r_out = Self::from_inner(r.clone());
                (prep.finish((x, gamma, r), y), r_out)
            }
            OpsKind::UnTracked(prep) => {
                let (y, r) = B::rms_norm_rows(x.into_primitive(), gamma.into_primitive(), eps);
                (prep.finish(y), Self::from_inner(r))
            }
        }
    }

    fn rms_norm_rows_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        r: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // Not differentiable twice: the backward pass runs untracked on the inner backend.
        let (dx, dgamma) = B::rms_norm_rows_backward(
            x.into_primitive(),
            gamma.into_primitive(),
            r.into_primitive(),
            grad.into_primitive(),
        );
        (Self::from_inner(dx), Self::from_inner(dgamma))
    }
}

/// RMSNorm of `x` `[…, D]` with gain `gamma` `[D]`: the fused operation on the CPU backend for f32 tensors (unless
/// [`crate::attention::set_fused`] or [`crate::attention::set_fused_norm_mlp`] turned it off), [`composed_rms_norm`] elsewhere. Differentiable
/// in `x` and `gamma`. Shapes are the caller's to check.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let n = dims.iter().product::<usize>() / d.max(1);
    let f32s = x.dtype() == DType::F32 && gamma.dtype() == DType::F32;
    if f32s
        && n > 0
        && d > 0
        && crate::attention::fused_norm_mlp()
        && crate::backend::runs_on_flex(x.device().as_dispatch())
    {
        let (y, _r) = <Dispatch as RmsNormBackend>::rms_norm_rows(
            x.reshape([n, d]).into_dispatch(),
            gamma.into_dispatch(),
            eps as f32,
        );
        return Tensor::<2>::from_dispatch(y).reshape(dims);
    }
    composed_rms_norm(x, gamma, eps)
}

/// The same RMSNorm composed from burn operations, as burn's `RmsNorm::forward` computes it (the reference, and the
/// path on other backends and dtypes).
pub fn composed_rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + eps).sqrt();
    (x / rms.cast(dtype)) * gamma.unsqueeze()
}

/// The forward pass over host buffers: `y` `[N, D]` and `r` `[N]` of the rows of `x` `[N, D]` (all contiguous).
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] when the buffers do not have `N·D`, `D` and `N` values.
pub fn rms_norm_forward_host(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32], r: &mut [f32]) -> crate::Result<()> {
    let d = gamma.len();
    if d == 0 || x.len() != r.len() * d || y.len() != x.len() {
        return Err(crate::Error::ShapeMismatch {
            op: "rms_norm: x, y vs rows × gamma",
            expected: vec![r.len() * d, r.len() * d],
            actual: vec![x.len(), y.len()],
        });
    }
    let block = ROWS_PER_BLOCK * d;
    let items: Vec<_> = x.chunks(block).zip(y.chunks_mut(block)).zip(r.chunks_mut(ROWS_PER_BLOCK)).collect();
    parallel::for_each(items, x.len(), |((x, y), r)| {
        for ((x, y), r) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(r.iter_mut()) {
            *r = 1.0 / (mean_square(x) + eps).sqrt();
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                *y = x * *r * g;
            }
        }
    });
    Ok(())
}

/// The backward pass over host buffers: `(dx [N, D], dγ [D])` for the output gradient `dy` `[N, D]`.
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] when the buffers do not match `x` `[N, D]`.
pub fn rms_norm_backward_host(x: &[f32], gamma: &[f32], r: &[f32], dy: &[f32]) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    let d = gamma.len();
    if d == 0 || x.len() != r.len() * d || dy.len() != x.len() {
        return Err(crate::Error::ShapeMismatch {
            op: "rms_norm backward: x, dy vs rows × gamma",
            expected: vec![r.len() * d, r.len() * d],
            actual: vec![x.len(), dy.len()],
        });
    }
    let mut dx = vec![0.0f32; x.len()];
    let blocks = r.len().div_ceil(ROWS_PER_BLOCK);
    let mut partial = vec![0.0f32; blocks * d];
    let block = ROWS_PER_BLOCK * d;
    let items: Vec<_> = x
        .chunks(block)
        .zip(dy.chunks(block))
        .zip(r.chunks(ROWS_PER_BLOCK))
        .zip(dx.chunks_mut(block).zip(partial.chunks_mut(d)))
        .collect();
    parallel::for_each(items, 3 * x.len(), |(((x, dy), r), (dx, dgamma))| {
        let rows = x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(r).zip(dx.chunks_exact_mut(d));
        for (((x, dy), &r), dx) in rows {
            let mut c = 0.0f32;
            for ((&x, &dy), &g) in x.iter().zip(dy).zip(gamma) {
                c += dy * g * x * r;
            }
            c /= d as f32;
            for ((((dx, &x), &dy), &g), dg) in dx.iter_mut().zip(x).zip(dy).zip(gamma).zip(dgamma.iter_mut()) {
                let xhat = x * r;
                *dx = r * (dy * g - xhat * c);
                *dg += dy * xhat;
            }
        }
    });
    let mut dgamma = vec![0.0f32; d];
    for p in partial.chunks_exact(d) {
        dgamma.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
    }
    Ok((dx, dgamma))
}

/// `mean(x²)` on eight lanes (a fixed summation order on every instruction set).
#[inline]
fn mean_square(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for &v in rest {
        s += v * v;
    }
    s / x.len() as f32
}

/// Flex tensors as host slices (a copy only for a strided or non-f32 input).
mod flex_host {
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;

    use crate::flex_host::{contiguous_f32, nan};

    use super::{rms_norm_backward_host, rms_norm_forward_host};

    pub(super) fn forward(x: &FlexTensor, gamma: &FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
        let [n, d] = x.shape().dims::<2>();
        let (x, gamma) = (contiguous_f32(x), contiguous_f32(gamma));
        let (mut y, mut r) = (vec![0.0f32; n * d], vec![0.0f32; n]);
        // The caller checks shapes; a failure here is an internal error, reported as NaN outputs.
        let ok = (|| rms_norm_forward_host(x.as_slice()?, gamma.as_slice()?, eps, &mut y, &mut r).ok())();
        match ok {
            Some(()) => {
                (FlexTensor::from_data(TensorData::new(y, [n, d])), FlexTensor::from_data(TensorData::new(r, [n])))
            }
            None => (nan(&[n, d]), nan(&[n])),
        }
    }

    pub(super) fn backward(
        x: &FlexTensor,
        gamma: &FlexTensor,
        r: &FlexTensor,
        grad: &FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let [n, d] = x.shape().dims::<2>();
        let (x, gamma, r, grad) = (contiguous_f32(x), contiguous_f32(gamma), contiguous_f32(r), contiguous_f32(grad));
        let result =
            (|| rms_norm_backward_host(x.as_slice()?, gamma.as_slice()?, r.as_slice()?, grad.as_slice()?).ok())();
        match result {
            Some((dx, dgamma)) => (
                FlexTensor::from_data(TensorData::new(dx, [n, d])),
                FlexTensor::from_data(TensorData::new(dgamma, [d])),
            ),
            None => (nan(&[n, d]), nan(&[d])),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().expect("f32")
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
        }
    }

    fn device() -> Device {
        crate::Backend::Cpu.device().expect("cpu").autodiff()
    }

    #[test]
    fn fused_equals_composed_in_values_and_gradients() {
        let device = device();
        // Row counts below, at and past a block (and past the threading threshold), widths 1, 5, 64, 896.
        for (shape, d) in [([1, 3], 1), ([2, 7], 5), ([3, 65], 64), ([2, 100], 896)] {
            let x = Tensor::<3>::random([shape[0], shape[1], d], Distribution::Normal(0.0, 2.0), &device);
            let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.5), &device);
            let w = Tensor::<3>::random([shape[0], shape[1], d], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let (x, gamma) = (x.clone().require_grad(), gamma.clone().require_grad());
                let y = if fused {
                    rms_norm(x.clone(), gamma.clone(), 1e-6)
                } else {
                    composed_rms_norm(x.clone(), gamma.clone(), 1e-6)
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                let (dx, dg) = (x.grad(&grads).expect("dx"), gamma.grad(&grads).expect("dgamma"));
                (values(y.detach()), values(dx), values(dg))
            };
            let (f, c) = (run(true), run(false));
            let what = format!("{shape:?} × {d}");
            // The fused path ran: its output is the host kernel's, bit for bit.
            let (xs, gs) = (values(x.clone()), values(gamma.clone()));
            let (mut y, mut r) = (vec![0.0; xs.len()], vec![0.0; xs.len() / d]);
            rms_norm_forward_host(&xs, &gs, 1e-6, &mut y, &mut r).expect("shapes");
            assert_eq!(f.0, y, "{what}");
            assert_close(&f.0, &c.0, 1e-5, &format!("y {what}"));
            assert_close(&f.1, &c.1, 1e-4, &format!("dx {what}"));
            assert_close(&f.2, &c.2, 1e-4, &format!("dgamma {what}"));
        }
    }

    #[test]
    fn host_kernel_matches_the_equations_by_hand() {
        // x = [3, 4], γ = [1, 2], ε = 0: mean(x²) = 12.5, r = 1/√12.5; y = [3r, 8r].
        let (x, gamma) = ([3.0f32, 4.0], [1.0f32, 2.0]);
        let (mut y, mut r) = ([0.0f32; 2], [0.0f32; 1]);
        rms_norm_forward_host(&x, &gamma, 0.0, &mut y, &mut r).expect("shapes");
        let r0 = 1.0 / 12.5f32.sqrt();
        assert!((r[0] - r0).abs() < 1e-7 && (y[0] - 3.0 * r0).abs() < 1e-6 && (y[1] - 8.0 * r0).abs() < 1e-6);
        // dy = [1, 0]: g = [1, 0], mean(g·x̂) = 3r/2; dx = r·([1, 0] − x̂·3r/2), dγ = [3r, 0].
        let (dx, dg) = rms_norm_backward_host(&x, &gamma, &r, &[1.0, 0.0]).expect("shapes");
        let c = 1.5 * r0 * r0; // x̂·mean(g ⊙ x̂) = x·r·(3r/2)
        let want = [r0 * (1.0 - 3.0 * c), r0 * (0.0 - 4.0 * c)];
        assert_close(&dx, &want, 1e-6, "dx");
        assert_close(&dg, &[3.0 * r0, 0.0], 1e-6, "dgamma");
        assert!(rms_norm_forward_host(&x, &gamma, 0.0, &mut y, &mut [0.0; 2]).is_err());
        assert!(rms_norm_backward_host(&x, &[], &r, &[1.0, 0.0]).is_err());
    }

    #[test]
    fn dgamma_does_not_depend_on_the_work_split() {
        // The same rows through the kernel as one call and block by block, summed in order, give the same bits.
        let (n, d) = (300, 48);
        let x: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let dy: Vec<f32> = (0..n * d).map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0).collect();
        let gamma: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / 40.0).collect();
        let (mut y, mut r) = (vec![0.0; n * d], vec![0.0; n]);
        rms_norm_forward_host(&x, &gamma, 1e-5, &mut y, &mut r).expect("shapes");
        let (_, whole) = rms_norm_backward_host(&x, &gamma, &r, &dy).expect("shapes");
        let mut by_block = vec![0.0f32; d];
        for b in 0..n.div_ceil(ROWS_PER_BLOCK) {
            let rows = b * ROWS_PER_BLOCK..((b + 1) * ROWS_PER_BLOCK).min(n);
            let span = rows.start * d..rows.end * d;
            let (_, part) = rms_norm_backward_host(&x[span.clone()], &gamma, &r[rows], &dy[span]).expect("shapes");
            by_block.iter_mut().zip(&part).for_each(|(s, v)| *s += v);
        }
        assert_eq!(whole, by_block);
    }
}
