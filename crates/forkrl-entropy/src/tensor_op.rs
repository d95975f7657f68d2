//! Entropy, logsumexp and target log-prob as **one** differentiable burn operation with its own backward pass, so that
//! training through the entropy (an entropy bonus, a log-prob loss) keeps only the logits and three numbers per row,
//! not the `[N, V]` softmax of every chunk.
//!
//! Forward, per row of `z' = z · inv_t` (rows in chunks of `chunk_rows`, in f32 even for bf16/f16 logits):
//!
//! ```text
//! m = max z',  x = z' − m,  s = Σ e^x
//! H = log s − Σ e^x·x / s,   lse = m + log s,   lp = z'_y − lse
//! ```
//!
//! Backward, with `log p = z' − lse`, `p = e^{log p}` recomputed chunk by chunk from the saved logits and `(H, lse)`
//! (entropy-and-forking-tokens.md §1.2):
//!
//! ```text
//! ∂H/∂z'_i = −p_i (log p_i + H),   ∂lse/∂z'_i = p_i,   ∂lp/∂z'_i = 1[i = y] − p_i
//! ∂L/∂z_i  = inv_t · ( p_i · (g_lse − g_lp − g_H (log p_i + H)) + g_lp · 1[i = y] )
//! ```
//!
//! Memory under autodiff: the saved state is the logits (shared with the caller, not copied), the targets and the
//! `[N, 3]` statistics; the backward pass holds the `[N, V]` gradient it returns plus one chunk of temporaries. The
//! composed form ([`crate::tensor`]'s fallback) keeps two `[N, V]` tensors per call until the backward pass runs.
//!
//! The operation is a burn backend extension ([`EntropyBackend`]), implemented
//! - for the Flex (CPU) backend by the host kernels [`crate::kernel::token_stats`] and
//!   [`crate::kernel::token_stats_backward`], which read the tensor's buffer in place (one read per row, threaded,
//!   vectorised; on `[512, 151936]` f32 logits the forward took 18 ms against 0.80 s composed from burn operations,
//!   see docs/entropy-kernel.md), with the composed form as the fallback for f64 logits and non-finite rows;
//! - for the CubeCL backends (wgpu, CUDA) when this crate's `wgpu` or `cuda` feature is on, by burn operations chunk by
//!   chunk ([`forward`], [`backward`]);
//! - for autodiff over either, with the backward pass above.
//!
//! [`crate::tensor`] calls it on those devices and falls back to the composed path elsewhere.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, DispatchDevice, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Shape, Slice};

/// Column of the entropy in the `[N, 3]` statistics.
pub const ENTROPY: usize = 0;
/// Column of `logsumexp(z · inv_t)`.
pub const LOGSUMEXP: usize = 1;
/// Column of the target log-prob.
pub const LOGPROB: usize = 2;

/// Backend extension: per-row entropy, logsumexp and target log-prob of `softmax(logits · inv_t)`.
#[backend_extension(Flex, Cube: cfg(any(feature = "wgpu", feature = "cuda")), Autodiff)]
pub trait EntropyBackend: Backend {
    /// `[N, 3]` statistics (columns [`ENTROPY`], [`LOGSUMEXP`], [`LOGPROB`]) of `softmax(logits / temperature)` for
    /// `[N, V]` logits and `[N]` target ids, computed `chunk_rows` rows at a time. The caller checks the shapes,
    /// `V ≥ 1`, `chunk_rows ≥ 1`, a finite positive temperature, and that every id is in `0..V`.
    fn entropy_stats(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> FloatTensor<Self> {
        forward::<Self>(logits, targets, temperature, chunk_rows)
    }

    /// The gradient `[N, V]` (in the logits' dtype) of a loss whose gradient with respect to the `[N, 3]` output
    /// `stats` of [`EntropyBackend::entropy_stats`] is `grad`: the backward pass of that operation.
    fn entropy_stats_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> FloatTensor<Self> {
        backward::<Self>(logits, targets, stats, grad, temperature, chunk_rows)
    }

    /// The fused LM head ([`crate::fused_head`]): the `[N, 3]` statistics of the logits `hidden · weightᵀ` for `[N, d]`
    /// hidden states and a `[V, d]` head weight, computed `chunk_rows` rows at a time, so that no `[N, V]` tensor is
    /// ever held (one `[chunk_rows, V]` chunk at a time). The caller checks shapes, ids and parameters.
    fn head_stats(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> FloatTensor<Self> {
        head_forward::<Self>(hidden, weight, targets, temperature, chunk_rows)
    }

    /// The backward pass of [`EntropyBackend::head_stats`]: the gradients `([N, d], [V, d])` with respect to the hidden
    /// states and the head weight of a loss whose gradient with respect to the `[N, 3]` statistics is `grad`. The
    /// logits are recomputed chunk by chunk; each chunk's logit gradient is folded into both results and dropped.
    fn head_stats_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        head_backward::<Self>(hidden, weight, targets, stats, grad, temperature, chunk_rows)
    }
}

/// On the CPU the logits are host memory: both passes run the host kernels of [`crate::kernel`] on them in place
/// (threaded, vectorised, one read per row), and fall back to the composed form for what those do not take (f64
/// logits, non-finite values, which then give NaN rows as documented in [`crate::tensor`]).
impl EntropyBackend for Flex {
    fn entropy_stats(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> FloatTensor<Self> {
        match flex_host::stats(&logits, &targets, temperature) {
            Some(stats) => stats,
            None => forward::<Self>(logits, targets, temperature, chunk_rows),
        }
    }

    fn entropy_stats_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> FloatTensor<Self> {
        match flex_host::backward(&logits, &targets, &stats, &grad, temperature) {
            Some(dz) => dz,
            None => backward::<Self>(logits, targets, stats, grad, temperature, chunk_rows),
        }
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl EntropyBackend for burn::backend::Cube {}

impl<B: Backend + EntropyBackend, C: CheckpointStrategy> EntropyBackend for Autodiff<B, C> {
    fn entropy_stats(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct EntropyStatsBackward;

        impl<B: Backend + EntropyBackend> Backward<B, 1> for EntropyStatsBackward {
            /// Logits, targets, the `[N, 3]` statistics, temperature, `chunk_rows`.
            type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, f32, usize);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = parent {
                    let (logits, targets, stats, temperature, chunk_rows) = ops.state;
                    let dz = B::entropy_stats_backward(logits, targets, stats, grad, temperature, chunk_rows);
                    grads.register::<B>(node.id, dz);
                }
            }
        }

        match EntropyStatsBackward.prepare::<C>([logits.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let z = logits.primitive().clone();
                let stats = B::entropy_stats(z.clone(), targets.clone(), temperature, chunk_rows);
                prep.finish((z, targets, stats.clone(), temperature, chunk_rows), stats)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::entropy_stats(logits.into_primitive(), targets, temperature, chunk_rows))
            }
        }
    }

    fn head_stats(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        temperature: f32,
        chunk_rows: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct HeadStatsBackward;

        impl<B: Backend + EntropyBackend> Backward<B, 2> for HeadStatsBackward {
            /// Hidden states, head weight, targets, the `[N, 3]` statistics, temperature, `chunk_rows`.
            type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>, FloatTensor<B>, f32, usize);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [hidden_node, weight_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if hidden_node.is_none() && weight_node.is_none() {
                    return;
                }
                let (hidden, weight, targets, stats, temperature, chunk_rows) = ops.state;
                let (dh, dw) = B::head_stats_backward(hidden, weight, targets, stats, grad, temperature, chunk_rows);
                if let Some(node) = hidden_node {
                    grads.register::<B>(node.id, dh);
                }
                if let Some(node) = weight_node {
                    grads.register::<B>(node.id, dw);
                }
            }
        }

        match HeadStatsBackward.prepare::<C>([hidden.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (h, w) = (hidden.primitive().clone(), weight.primitive().clone());
                let stats = B::head_stats(h.clone(), w.clone(), targets.clone(), temperature, chunk_rows);
                prep.finish((h, w, targets, stats.clone(), temperature, chunk_rows), stats)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::head_stats(
                hidden.into_primitive(),
                weight.into_primitive(),
                targets,
                temperature,
                chunk_rows,
            )),
        }
    }
}

/// Whether [`EntropyBackend`] runs on tensors of `device` in this build (Flex always; the CubeCL runtimes with this
/// crate's `wgpu`/`cuda` feature; either under autodiff).
pub fn runs_on(device: &DispatchDevice) -> bool {
    #[allow(unreachable_patterns)]
    match device {
        DispatchDevice::Autodiff(inner) => runs_on(&inner.clone().inner()),
        DispatchDevice::Flex(_) => true,
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        DispatchDevice::Cube(_) => true,
        _ => false,
    }
}

/// The dtype the statistics are computed in: f64 stays f64, everything else is widened to f32.
fn compute_dtype(dtype: DType) -> FloatDType {
    match FloatDType::from(dtype) {
        FloatDType::F64 => FloatDType::F64,
        _ => FloatDType::F32,
    }
}

/// Rows `start..end` of a `[N, V]` tensor, in the compute dtype.
fn chunk<B: Backend>(logits: &FloatTensor<B>, start: usize, end: usize, dtype: FloatDType) -> FloatTensor<B> {
    let z = rows::<B>(logits, start, end);
    if FloatDType::from(z.dtype()) == dtype { z } else { B::float_cast(z, dtype) }
}

/// Ids `start..end` as `[n, 1]`.
fn chunk_ids<B: Backend>(targets: &IntTensor<B>, start: usize, end: usize) -> IntTensor<B> {
    let ids = B::int_slice(targets.clone(), &[Slice::from(start..end)]);
    B::int_reshape(ids, Shape::new([end - start, 1]))
}

/// Column `c` of a `[n, 3]` tensor, as `[n, 1]`.
fn column<B: Backend>(stats: &FloatTensor<B>, c: usize) -> FloatTensor<B> {
    let n = stats.shape().dims::<2>()[0];
    B::float_slice(stats.clone(), &[Slice::from(0..n), Slice::from(c..c + 1)])
}

/// The forward pass over backend primitives (any backend): `[N, V]` logits, `[N]` ids → `[N, 3]`.
pub fn forward<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    temperature: f32,
    chunk_rows: usize,
) -> FloatTensor<B> {
    let inv_t = 1.0 / temperature; // as the host kernel scales
    let [n, _v] = logits.shape().dims::<2>();
    let dtype = compute_dtype(logits.dtype());
    let step = chunk_rows.max(1);
    let mut out = Vec::with_capacity(n.div_ceil(step));
    for start in (0..n).step_by(step) {
        let end = (start + step).min(n);
        let z = B::float_mul_scalar(chunk::<B>(&logits, start, end, dtype), Scalar::from(inv_t)); // [c, V]
        let m = B::float_max_dim(z.clone(), 1); // [c, 1]
        let x = B::float_sub(z, m.clone()); // [c, V], ≤ 0
        let e = B::float_exp(x.clone());
        let s = B::float_sum_dim(e.clone(), 1); // [c, 1]
        let log_s = B::float_log(s.clone());
        let w = B::float_sum_dim(B::float_mul(e, x.clone()), 1); // Σ e·x, [c, 1]
        let h = B::float_sub(log_s.clone(), B::float_div(w, s));
        let lse = B::float_add(m, log_s.clone());
        let lp = B::float_sub(B::float_gather(1, x, chunk_ids::<B>(&targets, start, end)), log_s);
        out.push(B::float_cat(vec![h, lse, lp], 1)); // [c, 3]
    }
    if out.is_empty() {
        return B::float_zeros(Shape::new([0, 3]), &logits.device(), dtype);
    }
    B::float_cat(out, 0)
}

/// The backward pass over backend primitives: the gradient `[N, V]` (in the logits' dtype) of a loss whose gradient
/// with respect to the `[N, 3]` statistics is `grad`.
pub fn backward<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    stats: FloatTensor<B>,
    grad: FloatTensor<B>,
    temperature: f32,
    chunk_rows: usize,
) -> FloatTensor<B> {
    let inv_t = 1.0 / temperature;
    let [n, v] = logits.shape().dims::<2>();
    let out_dtype = FloatDType::from(logits.dtype());
    let dtype = compute_dtype(logits.dtype());
    let device = logits.device();
    let step = chunk_rows.max(1);
    let mut dz = B::float_zeros(Shape::new([n, v]), &device, out_dtype);
    for start in (0..n).step_by(step) {
        let end = (start + step).min(n);
        let rows = [Slice::from(start..end), Slice::full()];
        let st = B::float_slice(stats.clone(), &rows);
        let g = B::float_slice(grad.clone(), &rows);
        let g = if FloatDType::from(g.dtype()) == dtype { g } else { B::float_cast(g, dtype) };
        let (h, lse) = (column::<B>(&st, ENTROPY), column::<B>(&st, LOGSUMEXP));
        let (g_h, g_lse, g_lp) = (column::<B>(&g, ENTROPY), column::<B>(&g, LOGSUMEXP), column::<B>(&g, LOGPROB));
        let z = B::float_mul_scalar(chunk::<B>(&logits, start, end, dtype), Scalar::from(inv_t));
        let log_p = B::float_sub(z, lse); // [c, V]
        let p = B::float_exp(log_p.clone());
        // p · (g_lse − g_lp − g_H (log p + H)) + g_lp · 1[i = y]
        let coef = B::float_sub(B::float_sub(g_lse, g_lp.clone()), B::float_mul(g_h, B::float_add(log_p, h)));
        let d = B::float_mul(p, coef);
        let d = B::float_scatter(1, d, chunk_ids::<B>(&targets, start, end), g_lp, IndexingUpdateOp::Add);
        let d = B::float_mul_scalar(d, Scalar::from(inv_t));
        let d = if dtype == out_dtype { d } else { B::float_cast(d, out_dtype) };
        dz = B::float_slice_assign(dz, &rows, d);
    }
    dz
}

/// Rows `start..end` of a 2-d tensor.
fn rows<B: Backend>(x: &FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    B::float_slice(x.clone(), &[Slice::from(start..end), Slice::full()])
}

/// The fused head's forward pass over backend primitives: per chunk of rows, the logits `h_c · Wᵀ` and their
/// statistics by [`EntropyBackend::entropy_stats`] (the host kernels on the CPU backend).
pub fn head_forward<B: EntropyBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    temperature: f32,
    chunk_rows: usize,
) -> FloatTensor<B> {
    let [n, _d] = hidden.shape().dims::<2>();
    let step = chunk_rows.max(1);
    let wt = B::float_transpose(weight); // [d, V]
    let mut out = Vec::with_capacity(n.div_ceil(step));
    for start in (0..n).step_by(step) {
        let end = (start + step).min(n);
        let z = B::float_matmul(rows::<B>(&hidden, start, end), wt.clone()); // [c, V]
        let ids = B::int_slice(targets.clone(), &[Slice::from(start..end)]);
        out.push(B::entropy_stats(z, ids, temperature, step));
    }
    if out.is_empty() {
        return B::float_zeros(Shape::new([0, 3]), &hidden.device(), compute_dtype(hidden.dtype()));
    }
    B::float_cat(out, 0)
}

/// The fused head's backward pass over backend primitives: per chunk, the logits are recomputed, their gradient `g_z`
/// comes from [`EntropyBackend::entropy_stats_backward`], and `∂L/∂h_c = g_z · W`, `∂L/∂W += g_zᵀ · h_c`.
pub fn head_backward<B: EntropyBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    stats: FloatTensor<B>,
    grad: FloatTensor<B>,
    temperature: f32,
    chunk_rows: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let [n, d] = hidden.shape().dims::<2>();
    let [v, _] = weight.shape().dims::<2>();
    let device = hidden.device();
    let step = chunk_rows.max(1);
    let wt = B::float_transpose(weight.clone()); // [d, V]
    let mut dh = B::float_zeros(Shape::new([n, d]), &device, FloatDType::from(hidden.dtype()));
    let mut dw = B::float_zeros(Shape::new([v, d]), &device, FloatDType::from(weight.dtype()));
    for start in (0..n).step_by(step) {
        let end = (start + step).min(n);
        let h = rows::<B>(&hidden, start, end); // [c, d]
        let z = B::float_matmul(h.clone(), wt.clone()); // [c, V]
        let ids = B::int_slice(targets.clone(), &[Slice::from(start..end)]);
        let gz = B::entropy_stats_backward(
            z,
            ids,
            rows::<B>(&stats, start, end),
            rows::<B>(&grad, start, end),
            temperature,
            step,
        );
        let dh_c = B::float_matmul(gz.clone(), weight.clone()); // [c, d]
        dh = B::float_slice_assign(dh, &[Slice::from(start..end), Slice::full()], dh_c);
        dw = B::float_add(dw, B::float_matmul(B::float_transpose(gz), h)); // [V, d]
    }
    (dh, dw)
}

/// The host-kernel implementation on Flex tensors (contiguous host buffers, read in place).
mod flex_host {
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{Flex, TensorMetadata};
    use burn::tensor::{DType, FloatDType, TensorData};
    use half::{bf16, f16};

    use super::{ENTROPY, LOGPROB, LOGSUMEXP};
    use crate::kernel::{KernelOptions, LogitElement, StatsGrad, TokenStats, token_stats, token_stats_backward};

    /// A contiguous view of `t` (a copy only when `t` is strided).
    fn contiguous(t: &FlexTensor) -> FlexTensor {
        if t.is_contiguous() { t.clone() } else { t.to_contiguous() }
    }

    /// Runs `f` on the logits as a host slice of a type the kernels read (f32, bf16, f16); `None` for other dtypes.
    fn with_logits<R>(logits: &FlexTensor, f: impl HostFn<R>) -> Option<R> {
        let z = contiguous(logits);
        match z.dtype() {
            DType::F32 => z.as_slice::<f32>().map(|s| f.call(s)),
            DType::BF16 => z.as_slice::<bf16>().map(|s| f.call(s)),
            DType::F16 => z.as_slice::<f16>().map(|s| f.call(s)),
            _ => None,
        }
    }

    /// A computation generic over the element type of the logits.
    trait HostFn<R> {
        fn call<E: LogitElement>(self, logits: &[E]) -> R;
    }

    /// The ids as `u32`, when they are non-negative integers of a dtype Flex stores.
    fn ids(targets: &FlexTensor) -> Option<Vec<u32>> {
        let t = contiguous(targets);
        let widen = |v: i64| u32::try_from(v).ok();
        match t.dtype() {
            DType::I64 => t.as_slice::<i64>()?.iter().map(|&v| widen(v)).collect(),
            DType::I32 => t.as_slice::<i32>()?.iter().map(|&v| widen(i64::from(v))).collect(),
            DType::I16 => t.as_slice::<i16>()?.iter().map(|&v| widen(i64::from(v))).collect(),
            DType::U32 => t.as_slice::<u32>().map(<[u32]>::to_vec),
            _ => None,
        }
    }

    /// The three columns of a `[N, 3]` f32 tensor.
    fn columns(t: &FlexTensor) -> Option<[Vec<f32>; 3]> {
        let t = contiguous(t);
        let values = t.as_slice::<f32>()?;
        let column = |c: usize| values.chunks_exact(3).map(|row| row[c]).collect::<Vec<f32>>();
        Some([column(ENTROPY), column(LOGSUMEXP), column(LOGPROB)])
    }

    pub(super) fn stats(logits: &FlexTensor, targets: &FlexTensor, temperature: f32) -> Option<FlexTensor> {
        let [n, v] = logits.shape().dims::<2>();
        let ids = ids(targets)?;
        struct Forward<'a> {
            v: usize,
            ids: &'a [u32],
            temperature: f32,
        }
        impl HostFn<Option<TokenStats>> for Forward<'_> {
            fn call<E: LogitElement>(self, logits: &[E]) -> Option<TokenStats> {
                let options = KernelOptions { temperature: self.temperature, threads: 0 };
                token_stats(logits, self.v, Some(self.ids), options).ok()
            }
        }
        let out = with_logits(logits, Forward { v, ids: &ids, temperature })??;
        let lp = out.target_logprob?;
        let mut rows = vec![0.0f32; 3 * n];
        for (i, row) in rows.chunks_exact_mut(3).enumerate() {
            row[ENTROPY] = out.entropy[i];
            row[LOGSUMEXP] = out.logsumexp[i];
            row[LOGPROB] = lp[i];
        }
        Some(FlexTensor::from_data(TensorData::new(rows, [n, 3])))
    }

    pub(super) fn backward(
        logits: &FlexTensor,
        targets: &FlexTensor,
        stats: &FlexTensor,
        grad: &FlexTensor,
        temperature: f32,
    ) -> Option<FlexTensor> {
        let [n, v] = logits.shape().dims::<2>();
        let ids = ids(targets)?;
        let [entropy, logsumexp, _] = columns(stats)?;
        let [g_h, g_lse, g_lp] = columns(grad)?;
        let stats = TokenStats { entropy, logsumexp, target_logprob: None };
        struct Backward<'a> {
            v: usize,
            ids: &'a [u32],
            stats: &'a TokenStats,
            grad: StatsGrad<'a>,
            temperature: f32,
        }
        impl HostFn<Option<Vec<f32>>> for Backward<'_> {
            fn call<E: LogitElement>(self, logits: &[E]) -> Option<Vec<f32>> {
                let options = KernelOptions { temperature: self.temperature, threads: 0 };
                token_stats_backward(logits, self.v, Some(self.ids), self.stats, self.grad, options).ok()
            }
        }
        let grad = StatsGrad { entropy: &g_h, logsumexp: &g_lse, target_logprob: Some(&g_lp) };
        let dz = with_logits(logits, Backward { v, ids: &ids, stats: &stats, grad, temperature })??;
        let dz = FlexTensor::from_data(TensorData::new(dz, [n, v]));
        let dtype = FloatDType::from(logits.dtype());
        Some(if dtype == FloatDType::F32 { dz } else { Flex::float_cast(dz, dtype) })
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::TensorData;

    use super::*;

    fn values(t: FlexTensor) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().expect("f32")
    }

    fn case(n: usize, v: usize) -> (FlexTensor, FlexTensor, FlexTensor) {
        let z: Vec<f32> = (0..n * v).map(|i| ((i * 7919) % 1013) as f32 / 90.0 - 5.0).collect();
        let ids: Vec<i64> = (0..n as i64).map(|i| (i * 5) % v as i64).collect();
        let g: Vec<f32> = (0..n * 3).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
        (
            FlexTensor::from_data(TensorData::new(z, [n, v])),
            FlexTensor::from_data(TensorData::new(ids, [n])),
            FlexTensor::from_data(TensorData::new(g, [n, 3])),
        )
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn flex_host_kernels_equal_the_composed_primitives() {
        let (z, ids, g) = case(9, 700);
        let fast = flex_host::stats(&z, &ids, 0.7).expect("the host path takes contiguous f32 logits");
        let composed = forward::<Flex>(z.clone(), ids.clone(), 0.7, 4);
        assert_close(&values(fast.clone()), &values(composed.clone()), "forward");
        let fast_dz = flex_host::backward(&z, &ids, &fast, &g, 0.7).expect("host backward");
        let composed_dz = backward::<Flex>(z, ids, composed, g, 0.7, 4);
        assert_close(&values(fast_dz), &values(composed_dz), "backward");
    }

    #[test]
    fn flex_host_kernels_take_strided_and_half_precision_logits_and_refuse_non_finite_ones() {
        let (z, ids, g) = case(6, 40);
        // A transposed view of a [40, 6] tensor: strided, copied once to be read.
        let zt = Flex::float_swap_dims(FlexTensor::from_data(TensorData::new(values(z.clone()), [40, 6])), 0, 1);
        let contiguous = FlexTensor::from_data(TensorData::new(values(zt.clone().to_contiguous()), [6, 40]));
        let strided = flex_host::stats(&zt, &ids, 1.0).expect("strided logits");
        assert_eq!(values(strided), values(flex_host::stats(&contiguous, &ids, 1.0).expect("contiguous")));

        let half = Flex::float_cast(z.clone(), FloatDType::BF16);
        let widened = Flex::float_cast(half.clone(), FloatDType::F32);
        let stats = flex_host::stats(&half, &ids, 1.0).expect("bf16 logits");
        assert_eq!(values(stats.clone()), values(flex_host::stats(&widened, &ids, 1.0).expect("f32")));
        let dz = flex_host::backward(&half, &ids, &stats, &g, 1.0).expect("bf16 backward");
        assert_eq!(FloatDType::from(dz.dtype()), FloatDType::BF16, "the gradient has the logits' dtype");

        let mut bad = values(z);
        bad[45] = f32::NAN;
        let bad = FlexTensor::from_data(TensorData::new(bad, [6, 40]));
        assert!(flex_host::stats(&bad, &ids, 1.0).is_none(), "non-finite rows go to the composed path");
        let out = values(<Flex as EntropyBackend>::entropy_stats(bad, ids, 1.0, 2));
        assert!(out[3..6].iter().all(|x| x.is_nan()), "row 1 is NaN: {out:?}");
        assert!(out[..3].iter().chain(&out[6..]).all(|x| x.is_finite()), "other rows are finite");
    }
}
