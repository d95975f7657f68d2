//! The SwiGLU gate `silu(g) ⊙ u` (Shazeer 2020, the MLP of Llama / Qwen) as **one** burn operation with its own
//! backward pass on the CPU backend: one pass forward and one backward, keeping only `g` and `u` for the backward pass
//! (the composed path runs `sigmoid`, two products and their backward operations, each a fresh `[N, d_ff]` buffer —
//! the widest activations of the model).
//!
//! With `σ(g) = 1 / (1 + e^{−g})`:
//!
//! ```text
//! h = g·σ(g)·u,   dg = dh·u·σ(g)·(1 + g·(1 − σ(g))),   du = dh·g·σ(g)
//! ```
//!
//! `σ` is evaluated from `e^{−|g|}` (never overflowing) with the polynomial `exp` of [`crate::numeric::exp_poly`].
//! Every element is independent, so the result does not depend on the thread count. [`swiglu`] picks this operation
//! on the Flex backend for f32 tensors and composes burn operations elsewhere ([`composed_swiglu`], the reference the
//! tests compare with).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Tensor, activation};

use crate::numeric::{EXP_MIN_ARG, exp_poly};
use crate::parallel;

/// Elements per work item (fixed, so the split never depends on the thread count).
const CHUNK: usize = 1 << 14;

/// Backend extension: `silu(g) ⊙ u` over two tensors of one shape. The caller checks the shapes and that both are
/// f32.
#[backend_extension(Flex, Autodiff)]
pub trait SwigluBackend: Backend {
    /// `silu(g) ⊙ u`.
    fn swiglu_gate(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `(dg, du)` for the output gradient `grad`.
    fn swiglu_gate_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

impl SwigluBackend for Flex {
    fn swiglu_gate(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_host::forward(&g, &u)
    }

    fn swiglu_gate_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex_host::backward(&g, &u, &grad)
    }
}

impl<B: Backend + SwigluBackend, C: CheckpointStrategy> SwigluBackend for Autodiff<B, C> {
    fn swiglu_gate(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwigluBackward;

        impl<B: Backend + SwigluBackend> Backward<B, 2> for SwigluBackward {
            /// g and u.
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [g_node, u_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if g_node.is_none() && u_node.is_none() {
                    return;
                }
                let (g, u) = ops.state;
                let (dg, du) = B::swiglu_gate_backward(g, u, grad);
                for (node, d) in [(g_node, dg), (u_node, du)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, d);
                    }
                }
            }
        }

        match SwigluBackward.prepare::<C>([g.node(), u.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (g, u) = (g.primitive().clone(), u.primitive().clone());
                let h = B::swiglu_gate(g.clone(), u.clone());
                prep.finish((g, u), h)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu_gate(g.into_primitive(), u.into_primitive())),
        }
    }

    fn swiglu_gate_backward(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // Not differentiable twice: the backward pass runs untracked on the inner backend.
        let (dg, du) = B::swiglu_gate_backward(g.into_primitive(), u.into_primitive(), grad.into_primitive());
        (Self::from_inner(dg), Self::from_inner(du))
    }
}

/// `silu(g) ⊙ u` for two tensors of one shape: the fused operation on the CPU backend for f32 tensors (unless
/// [`crate::attention::set_fused`] or [`crate::attention::set_fused_norm_mlp`] turned it off), [`composed_swiglu`] elsewhere. Differentiable in
/// both. Shapes are the caller's to check.
pub fn swiglu<const D: usize>(g: Tensor<D>, u: Tensor<D>) -> Tensor<D> {
    let f32s = g.dtype() == DType::F32 && u.dtype() == DType::F32;
    if f32s && crate::attention::fused_norm_mlp() && crate::backend::runs_on_flex(g.device().as_dispatch()) {
        return Tensor::from_dispatch(<Dispatch as SwigluBackend>::swiglu_gate(g.into_dispatch(), u.into_dispatch()));
    }
    composed_swiglu(g, u)
}

/// The same gate composed from burn operations (the reference, and the path on other backends and dtypes).
pub fn composed_swiglu<const D: usize>(g: Tensor<D>, u: Tensor<D>) -> Tensor<D> {
    activation::silu(g) * u
}

/// `σ(g)` from `e^{−|g|}` (in `(0, 1]`, never overflowing); NaN stays NaN.
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    let e = exp_poly::<false>((-g.abs()).max(EXP_MIN_ARG));
    let s = 1.0 / (1.0 + e);
    if g >= 0.0 { s } else { e * s }
}

/// The forward pass over host buffers: `h = silu(g) ⊙ u`.
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] when the three buffers differ in length.
pub fn swiglu_forward_host(g: &[f32], u: &[f32], h: &mut [f32]) -> crate::Result<()> {
    if g.len() != u.len() || h.len() != g.len() {
        return Err(crate::Error::ShapeMismatch {
            op: "swiglu: g, u, h",
            expected: vec![g.len(); 3],
            actual: vec![g.len(), u.len(), h.len()],
        });
    }
    let items: Vec<_> = g.chunks(CHUNK).zip(u.chunks(CHUNK)).zip(h.chunks_mut(CHUNK)).collect();
    parallel::for_each(items, g.len(), |((g, u), h)| {
        for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
            *h = g * sigmoid(g) * u;
        }
    });
    Ok(())
}

/// The backward pass over host buffers: `(dg, du)` for the output gradient `dh`.
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] when the buffers differ in length.
pub fn swiglu_backward_host(g: &[f32], u: &[f32], dh: &[f32]) -> crate::Result<(Vec<f32>, Vec<f32>)> {
    if g.len() != u.len() || dh.len() != g.len() {
        return Err(crate::Error::ShapeMismatch {
            op: "swiglu backward: g, u, dh",
            expected: vec![g.len(); 3],
            actual: vec![g.len(), u.len(), dh.len()],
        });
    }
    let (mut dg, mut du) = (vec![0.0f32; g.len()], vec![0.0f32; g.len()]);
    let items: Vec<_> = g
        .chunks(CHUNK)
        .zip(u.chunks(CHUNK))
        .zip(dh.chunks(CHUNK))
        .zip(dg.chunks_mut(CHUNK).zip(du.chunks_mut(CHUNK)))
        .collect();
    parallel::for_each(items, 3 * g.len(), |(((g, u), dh), (dg, du))| {
        for ((((dg, du), &g), &u), &dh) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh) {
            let s = sigmoid(g);
            *dg = dh * u * s * (1.0 + g * (1.0 - s));
            *du = dh * g * s;
        }
    });
    Ok((dg, du))
}

/// Flex tensors as host slices (a copy only for a strided or non-f32 input).
mod flex_host {
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;

    use crate::flex_host::{contiguous_f32, nan};

    use super::{swiglu_backward_host, swiglu_forward_host};

    pub(super) fn forward(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
        let shape = g.shape().to_vec();
        let (g, u) = (contiguous_f32(g), contiguous_f32(u));
        let mut h = vec![0.0f32; g.shape().num_elements()];
        // The caller checks shapes; a failure here is an internal error, reported as NaN outputs.
        match (|| swiglu_forward_host(g.as_slice()?, u.as_slice()?, &mut h).ok())() {
            Some(()) => FlexTensor::from_data(TensorData::new(h, shape)),
            None => nan(&shape),
        }
    }

    pub(super) fn backward(g: &FlexTensor, u: &FlexTensor, grad: &FlexTensor) -> (FlexTensor, FlexTensor) {
        let shape = g.shape().to_vec();
        let (g, u, grad) = (contiguous_f32(g), contiguous_f32(u), contiguous_f32(grad));
        match (|| swiglu_backward_host(g.as_slice()?, u.as_slice()?, grad.as_slice()?).ok())() {
            Some((dg, du)) => (
                FlexTensor::from_data(TensorData::new(dg, shape.clone())),
                FlexTensor::from_data(TensorData::new(du, shape)),
            ),
            None => (nan(&shape), nan(&shape)),
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

    #[test]
    fn fused_equals_composed_in_values_and_gradients() {
        let device: Device = crate::Backend::Cpu.device().expect("cpu").autodiff();
        // Below and past one work item and the threading threshold; values far into both tails of σ.
        for shape in [[1, 1, 3], [2, 5, 7], [3, 70, 800]] {
            let g = Tensor::<3>::random(shape, Distribution::Normal(0.0, 6.0), &device);
            let u = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let (g, u) = (g.clone().require_grad(), u.clone().require_grad());
                let h = if fused { swiglu(g.clone(), u.clone()) } else { composed_swiglu(g.clone(), u.clone()) };
                let grads = (h.clone() * w.clone()).sum().backward();
                (values(h.detach()), values(g.grad(&grads).expect("dg")), values(u.grad(&grads).expect("du")))
            };
            let (f, c) = (run(true), run(false));
            // The fused path ran: its output is the host kernel's, bit for bit.
            let mut h = vec![0.0; f.0.len()];
            swiglu_forward_host(&values(g.clone()), &values(u.clone()), &mut h).expect("shapes");
            assert_eq!(f.0, h, "{shape:?}");
            assert_close(&f.0, &c.0, 2e-6, &format!("h {shape:?}"));
            assert_close(&f.1, &c.1, 2e-6, &format!("dg {shape:?}"));
            assert_close(&f.2, &c.2, 2e-6, &format!("du {shape:?}"));
        }
    }

    #[test]
    fn host_kernel_matches_the_equations_by_hand() {
        // g = 0: σ = ½, h = 0, dg = dh·u·½, du = 0. g = 2: σ = 1/(1 + e^-2).
        let (g, u, dh) = ([0.0f32, 2.0, -30.0], [3.0f32, -1.0, 2.0], [1.0f32, 0.5, 1.0]);
        let mut h = [0.0f32; 3];
        swiglu_forward_host(&g, &u, &mut h).expect("shapes");
        let s2 = 1.0 / (1.0 + (-2.0f32).exp());
        assert_close(&h, &[0.0, -2.0 * s2, -60.0 * (-30.0f32).exp()], 1e-6, "h");
        let (dg, du) = swiglu_backward_host(&g, &u, &dh).expect("shapes");
        assert_close(&dg, &[1.5, -0.5 * s2 * (1.0 + 2.0 * (1.0 - s2)), 0.0], 1e-6, "dg");
        assert_close(&du, &[0.0, 0.5 * 2.0 * s2, 0.0], 1e-6, "du");
        assert!(swiglu_forward_host(&g, &u[..2], &mut h).is_err());
        assert!(swiglu_backward_host(&g, &u, &dh[..1]).is_err());
        // NaN in, NaN out.
        swiglu_forward_host(&[f32::NAN], &[1.0], &mut h[..1]).expect("shapes");
        assert!(h[0].is_nan());
    }
}
