//! Masked scaled-dot-product attention with grouped-query heads as **one** burn operation with its own backward pass
//! on the CPU backend: no `[B, H, S, T_k]` score or probability tensor is ever allocated (the composed path allocates
//! five of them per block and keeps three for the backward pass), and the key/value heads are read in place.
//!
//! For query head `h` of key/value head `g = h / rep` (`rep = H_q / H_kv`), query row `i` and key `j` not masked:
//!
//! ```text
//! s_ij = (q_i · k_j) / √D,   p_ij = softmax_j(s_ij),   o_i = Σ_j p_ij v_j,   lse_i = log Σ_j e^{s_ij}
//! ```
//!
//! Backward (the flash-attention recurrences; `p` recomputed from the saved `lse`, `Δ_i = dO_i · o_i`):
//!
//! ```text
//! dp_ij = dO_i · v_j,   ds_ij = p_ij (dp_ij − Δ_i)
//! dq_i = Σ_j ds_ij k_j / √D,   dk_j = Σ_{h∈g, i} ds_ij q_i / √D,   dv_j = Σ_{h∈g, i} p_ij dO_i
//! ```
//!
//! A row with every key masked gives NaN, as the composed `softmax` does. The work is split over `(batch, key/value
//! head)` pairs, so each thread owns its `dk`, `dv` block and the result does not depend on the thread count. Query
//! rows are taken eight at a time (`QUERY_BLOCK`): their scores, outputs, `dp` and `dq` are register tiles of eight
//! rows × eight keys or columns, so each key and value row is loaded once per block rather than once per row, and
//! every entry is still summed in a fixed order (over `d` for the scores, over the keys for the outputs). The inner
//! loops run on eight explicit lanes without fused multiply-adds, compiled for AVX2 when the CPU has it and for the
//! baseline otherwise: both give the same bits.
//!
//! The mask is `[B, 1, S, T_k]` (true = masked), usually a broadcast view. Inputs may be strided views (the model's
//! `swap_dims` of the heads, a KV cache narrowed to its filled length) as long as the head axis is contiguous.
//! [`causal_attention`] picks this operation on the Flex backend for f32 tensors and composes burn operations
//! elsewhere; `forkrl-trainer`'s tests check both in values and gradients.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{Bool, DType, Tensor, activation};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::numeric::{EXP_MIN_ARG, exp_poly};

/// Backend extension: masked grouped-query attention. The caller checks the shapes (`q: [B, H_q, S, D]`,
/// `k, v: [B, H_kv, T_k, D]`, `mask: [B, 1, S, T_k]`, `H_kv` divides `H_q`) and that the float tensors are f32.
#[backend_extension(Flex, Autodiff)]
pub trait AttentionBackend: Backend {
    /// The attention output `[B, H_q, S, D]` and the per-row log-sum-exp `[B, H_q, S]` of the scores.
    fn gqa_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dq, dk, dv)` for the output gradient `grad` `[B, H_q, S, D]`, from the forward pass's output and `lse`.
    #[allow(clippy::too_many_arguments)]
    fn gqa_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl AttentionBackend for Flex {
    fn gqa_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        flex_host::forward(&q, &k, &v, &mask)
    }

    fn gqa_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        flex_host::backward(&q, &k, &v, &mask, &out, &lse, &grad)
    }
}

impl<B: Backend + AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn gqa_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct AttentionBackward;

        /// q, k, v, the mask, the output and the log-sum-exp.
        type State<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, BoolTensor<B>, FloatTensor<B>, FloatTensor<B>);

        impl<B: Backend + AttentionBackend> Backward<B, 3> for AttentionBackward {
            type State = State<B>;

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [q_node, k_node, v_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if q_node.is_none() && k_node.is_none() && v_node.is_none() {
                    return;
                }
                let (q, k, v, mask, out, lse) = ops.state;
                let (dq, dk, dv) = B::gqa_attention_backward(q, k, v, mask, out, lse, grad);
                for (node, g) in [(q_node, dq), (k_node, dk), (v_node, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let prep = AttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.primitive().clone(), k.primitive().clone(), v.primitive().clone());
                let (out, lse) = B::gqa_attention(q.clone(), k.clone(), v.clone(), mask.clone());
                let lse_out = Self::from_inner(lse.clone());
                (prep.finish((q, k, v, mask, out.clone(), lse), out), lse_out)
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::gqa_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), mask);
                (prep.finish(out), Self::from_inner(lse))
            }
        }
    }

    fn gqa_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Not differentiable twice: the backward pass runs untracked on the inner backend.
        let (dq, dk, dv) = B::gqa_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            mask,
            out.into_primitive(),
            lse.into_primitive(),
            grad.into_primitive(),
        );
        (Self::from_inner(dq), Self::from_inner(dk), Self::from_inner(dv))
    }
}

/// Process-wide switch of [`causal_attention`] between the fused operation (default) and [`composed_attention`].
static FUSED: AtomicBool = AtomicBool::new(true);

/// Process-wide switch of [`crate::rms_norm::rms_norm`] and [`crate::swiglu::swiglu`] alone.
static FUSED_NORM_MLP: AtomicBool = AtomicBool::new(true);

/// Turns the fused model operations (this attention, [`crate::rms_norm`], [`crate::swiglu`]) off (or back on) for the
/// whole process: for benchmarks that compare both paths in one run and for checking a result against the composed
/// path. Returns the previous setting.
pub fn set_fused(enabled: bool) -> bool {
    FUSED.swap(enabled, Ordering::SeqCst)
}

/// Turns only the fused RMSNorm and SwiGLU operations off (or back on), leaving attention to [`set_fused`]: for the
/// benchmark that measures what they add. Returns the previous setting.
pub fn set_fused_norm_mlp(enabled: bool) -> bool {
    FUSED_NORM_MLP.swap(enabled, Ordering::SeqCst)
}

/// Whether the fused RMSNorm and SwiGLU operations are on ([`set_fused`], [`set_fused_norm_mlp`]).
pub(crate) fn fused_norm_mlp() -> bool {
    FUSED.load(Ordering::Relaxed) && FUSED_NORM_MLP.load(Ordering::Relaxed)
}

/// Attention `[B, H_q, S, D]` of queries `[B, H_q, S, D]` over keys and values `[B, H_kv, T_k, D]` under a `[B, 1, S,
/// T_k]` mask (true = masked), query head `h` reading key/value head `h / (H_q / H_kv)`: the fused operation on the
/// CPU backend for f32 tensors, [`composed_attention`] elsewhere. Differentiable in `q`, `k` and `v`.
///
/// Shapes are the caller's to check (the model builds them); `H_kv` must divide `H_q`.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Tensor<4, Bool>) -> Tensor<4> {
    let f32s = [&q, &k, &v].iter().all(|t| t.dtype() == DType::F32);
    if f32s && FUSED.load(Ordering::Relaxed) && crate::backend::runs_on_flex(q.device().as_dispatch()) {
        let (out, _lse) = <Dispatch as AttentionBackend>::gqa_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            mask.clone().into_dispatch(),
        );
        return Tensor::from_dispatch(out);
    }
    composed_attention(q, k, v, mask)
}

/// The same attention composed from burn operations (the reference, and the path on other backends): the query heads
/// of one key/value head are stacked along the query axis so that one batched matmul serves them (no repeat of K/V).
pub fn composed_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &Tensor<4, Bool>) -> Tensor<4> {
    let [b, hq, s, dh] = q.dims();
    let [_, hkv, tk, _] = k.dims();
    let rep = hq / hkv.max(1);
    let q = q.reshape([b, hkv, rep * s, dh]);
    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt()).reshape([b, hq, s, tk]);
    let scores = scores.mask_fill(mask.clone().expand([b, hq, s, tk]), f32::NEG_INFINITY);
    let probs = activation::softmax(scores, 3).reshape([b, hkv, rep * s, tk]);
    probs.matmul(v).reshape([b, hq, s, dh])
}

/// A read-only 4-d view of a host buffer whose last axis is contiguous.
#[derive(Debug, Clone, Copy)]
pub struct View4<'a, T> {
    data: &'a [T],
    offset: usize,
    strides: [usize; 3],
    dims: [usize; 4],
}

impl<'a, T> View4<'a, T> {
    /// A contiguous row-major `[d0, d1, d2, d3]` buffer.
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] when the buffer does not hold `d0·d1·d2·d3` values.
    pub fn contiguous(data: &'a [T], dims: [usize; 4]) -> crate::Result<Self> {
        let n: usize = dims.iter().product();
        if data.len() != n {
            return Err(crate::Error::ShapeMismatch {
                op: "attention: buffer vs shape",
                expected: dims.to_vec(),
                actual: vec![data.len()],
            });
        }
        Ok(Self { data, offset: 0, strides: [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3]], dims })
    }

    /// A strided view (strides of the first three axes, in elements; the last axis has stride 1). `None` when some
    /// element would lie outside `data`.
    pub fn strided(data: &'a [T], offset: usize, strides: [usize; 3], dims: [usize; 4]) -> Option<Self> {
        if dims.contains(&0) {
            return Some(Self { data, offset, strides, dims });
        }
        let last =
            offset + (dims[0] - 1) * strides[0] + (dims[1] - 1) * strides[1] + (dims[2] - 1) * strides[2] + dims[3];
        (last <= data.len()).then_some(Self { data, offset, strides, dims })
    }

    /// The dimensions.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize) -> &'a [T] {
        let at = self.offset + a * self.strides[0] + b * self.strides[1] + c * self.strides[2];
        &self.data[at..at + self.dims[3]]
    }
}

/// Query rows per key/value head from which the forward pass copies the keys transposed (see [`forward_pair`]).
const ROWS_FOR_TRANSPOSE: usize = 8;

/// Lanes of the inner loops (explicit, so that every instruction set sums in the same order).
const LANES: usize = 8;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut s = tail;
    for l in 0..LANES {
        s += acc[l];
    }
    s
}

/// `y += a·x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The inputs of one attention evaluation.
#[derive(Debug, Clone, Copy)]
pub struct AttentionViews<'a> {
    /// `[B, H_q, S, D]`.
    pub q: View4<'a, f32>,
    /// `[B, H_kv, T_k, D]`.
    pub k: View4<'a, f32>,
    /// `[B, H_kv, T_k, D]`.
    pub v: View4<'a, f32>,
    /// `[B, 1, S, T_k]`, non-zero = masked.
    pub mask: View4<'a, u8>,
}

impl AttentionViews<'_> {
    /// `(B, H_q, H_kv, S, T_k, D)`, checked: `H_kv` divides `H_q` and the shapes agree.
    ///
    /// # Errors
    /// [`crate::Error::ShapeMismatch`] naming the first tensor that disagrees.
    pub fn shape(&self) -> crate::Result<[usize; 6]> {
        let [b, hq, s, d] = self.q.dims;
        let [_, hkv, tk, _] = self.k.dims;
        let bad = |op, expected: [usize; 4], actual: [usize; 4]| {
            Err(crate::Error::ShapeMismatch { op, expected: expected.to_vec(), actual: actual.to_vec() })
        };
        if hkv == 0 || !hq.is_multiple_of(hkv) || self.k.dims[0] != b || self.k.dims[3] != d {
            return bad("attention: k vs q (H_kv must divide H_q)", [b, hkv, tk, d], self.k.dims);
        }
        if self.v.dims != self.k.dims {
            return bad("attention: v vs k", self.k.dims, self.v.dims);
        }
        if self.mask.dims != [b, 1, s, tk] {
            return bad("attention: mask", [b, 1, s, tk], self.mask.dims);
        }
        Ok([b, hq, hkv, s, tk, d])
    }
}

/// Per-thread work: `(batch, key/value head)` pairs `first..first + n`.
fn pairs_per_thread(pairs: usize, work: usize) -> usize {
    let threads = if work < 1 << 15 { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
    pairs.div_ceil(threads.max(1)).max(1)
}

/// The forward pass over host buffers: `out` `[B, H_q, S, D]` and `lse` `[B, H_q, S]`, both contiguous.
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] as [`AttentionViews::shape`], or for output buffers of the wrong length.
pub fn attention_forward_host(x: &AttentionViews<'_>, out: &mut [f32], lse: &mut [f32]) -> crate::Result<()> {
    let [b, hq, hkv, s, tk, d] = x.shape()?;
    if out.len() != b * hq * s * d || lse.len() != b * hq * s {
        return Err(crate::Error::ShapeMismatch {
            op: "attention: output buffers",
            expected: vec![b * hq * s * d, b * hq * s],
            actual: vec![out.len(), lse.len()],
        });
    }
    let rep = hq / hkv;
    let per = pairs_per_thread(b * hkv, b * hq * s * tk * d.max(1));
    let (ob, lb) = (rep * s * d, rep * s);
    if ob == 0 {
        return Ok(());
    }
    let inline = per >= b * hkv; // one worker: no thread to start
    std::thread::scope(|scope| {
        for (n, (out, lse)) in out.chunks_mut(per * ob).zip(lse.chunks_mut(per * lb)).enumerate() {
            let x = *x;
            let mut job = move || {
                let worker = select_forward();
                for (m, (out, lse)) in out.chunks_mut(ob).zip(lse.chunks_mut(lb)).enumerate() {
                    worker(&x, Pair::of(n * per + m, hkv, rep), out, lse);
                }
            };
            if inline {
                job();
            } else {
                scope.spawn(job);
            }
        }
    });
    Ok(())
}

/// The output gradient and the forward results the backward pass reads.
#[derive(Debug, Clone, Copy)]
pub struct AttentionGrad<'a> {
    /// `dO` `[B, H_q, S, D]`.
    pub grad: View4<'a, f32>,
    /// The forward output `[B, H_q, S, D]`.
    pub out: View4<'a, f32>,
    /// The forward log-sum-exp `[B, H_q, S]`, contiguous.
    pub lse: &'a [f32],
}

/// The backward pass over host buffers: `(dq, dk, dv)`, contiguous, shaped as `q`, `k`, `v`.
///
/// # Errors
/// [`crate::Error::ShapeMismatch`] as [`AttentionViews::shape`], or when the gradient, output or `lse` do not match.
pub fn attention_backward_host(
    x: &AttentionViews<'_>,
    g: &AttentionGrad<'_>,
) -> crate::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let [b, hq, hkv, s, tk, d] = x.shape()?;
    if g.grad.dims != x.q.dims || g.out.dims != x.q.dims || g.lse.len() != b * hq * s {
        return Err(crate::Error::ShapeMismatch {
            op: "attention backward: grad, out, lse vs q",
            expected: x.q.dims.to_vec(),
            actual: vec![g.grad.dims[2], g.out.dims[2], g.lse.len()],
        });
    }
    let rep = hq / hkv;
    let mut dq = vec![0.0f32; b * hq * s * d];
    let mut dk = vec![0.0f32; b * hkv * tk * d];
    let mut dv = vec![0.0f32; b * hkv * tk * d];
    let (qb, kb) = (rep * s * d, tk * d);
    if qb == 0 || kb == 0 {
        return Ok((dq, dk, dv));
    }
    let per = pairs_per_thread(b * hkv, b * hq * s * tk * d);
    let inline = per >= b * hkv;
    std::thread::scope(|scope| {
        let chunks = dq.chunks_mut(per * qb).zip(dk.chunks_mut(per * kb)).zip(dv.chunks_mut(per * kb));
        for (n, ((dq, dk), dv)) in chunks.enumerate() {
            let (x, g) = (*x, *g);
            let mut job = move || {
                let worker = select_backward();
                let blocks = dq.chunks_mut(qb).zip(dk.chunks_mut(kb)).zip(dv.chunks_mut(kb));
                for (m, ((dq, dk), dv)) in blocks.enumerate() {
                    worker(&x, &g, Pair::of(n * per + m, hkv, rep), PairGrads { dq, dk, dv });
                }
            };
            if inline {
                job();
            } else {
                scope.spawn(job);
            }
        }
    });
    Ok((dq, dk, dv))
}

/// One (batch row `b`, key/value head `g`) pair, whose `rep` query heads are `g·rep..(g + 1)·rep`: the unit of work.
#[derive(Debug, Clone, Copy)]
struct Pair {
    b: usize,
    g: usize,
    rep: usize,
}

impl Pair {
    /// The `index`-th pair in (batch row, key/value head) order.
    fn of(index: usize, hkv: usize, rep: usize) -> Self {
        Self { b: index / hkv, g: index % hkv, rep }
    }
}

/// The gradient blocks one pair writes: `dq` `[rep, S, D]` of its query heads, `dk` and `dv` `[T_k, D]`.
#[derive(Debug)]
struct PairGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

type ForwardWorker = fn(&AttentionViews<'_>, Pair, &mut [f32], &mut [f32]);
type BackwardWorker = fn(&AttentionViews<'_>, &AttentionGrad<'_>, Pair, PairGrads<'_>);

fn select_forward() -> ForwardWorker {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return simd::forward_avx2;
    }
    forward_pair
}

fn select_backward() -> BackwardWorker {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return simd::backward_avx2;
    }
    backward_pair
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use super::{AttentionGrad, AttentionViews, Pair, PairGrads, backward_pair, forward_pair};

    pub(super) fn forward_avx2(x: &AttentionViews<'_>, pair: Pair, out: &mut [f32], lse: &mut [f32]) {
        #[target_feature(enable = "avx2")]
        fn inner(x: &AttentionViews<'_>, pair: Pair, out: &mut [f32], lse: &mut [f32]) {
            forward_pair(x, pair, out, lse);
        }
        // SAFETY: `select_forward` returns this function only after `is_x86_feature_detected!("avx2")`; it is not
        // reachable any other way (private module).
        unsafe { inner(x, pair, out, lse) }
    }

    pub(super) fn backward_avx2(x: &AttentionViews<'_>, gr: &AttentionGrad<'_>, pair: Pair, grads: PairGrads<'_>) {
        #[target_feature(enable = "avx2")]
        fn inner(x: &AttentionViews<'_>, gr: &AttentionGrad<'_>, pair: Pair, grads: PairGrads<'_>) {
            backward_pair(x, gr, pair, grads);
        }
        // SAFETY: as `forward_avx2`, behind `is_x86_feature_detected!("avx2")` in `select_backward`.
        unsafe { inner(x, gr, pair, grads) }
    }
}

/// `[T_k, D]` rows `(b, g, ·)` of `x` transposed into `out` `[D, T_k]`, so that the per-query loops run along the
/// keys (vectorised over `j`, no horizontal sums).
#[inline(always)]
fn transpose_head(x: &View4<'_, f32>, b: usize, g: usize, out: &mut [f32]) {
    let tk = x.dims[2];
    for j in 0..tk {
        for (dd, v) in x.row(b, g, j).iter().enumerate() {
            out[dd * tk + j] = *v;
        }
    }
}

/// One past the last unmasked key of a mask row (keys past it need no work).
#[inline(always)]
fn key_end(mask: &[u8]) -> usize {
    mask.iter().rposition(|&m| m == 0).map_or(0, |j| j + 1)
}

/// `e^{x − shift}` in place, 0 for `−∞` (and below `e^{−88}`), with the branch-free polynomial; returns the sum.
#[inline(always)]
fn exp_shifted(s: &mut [f32], shift: f32) -> f32 {
    let mut sum = [0.0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_poly::<false>((c[l] - shift).max(EXP_MIN_ARG));
            sum[l] += c[l];
        }
    }
    let mut total = 0.0f32;
    for v in chunks.into_remainder() {
        *v = exp_poly::<false>((*v - shift).max(EXP_MIN_ARG));
        total += *v;
    }
    sum.iter().fold(total, |a, b| a + b)
}

/// `y[j] += Σ_k coef[k] · x[k·stride + j]` for `j < y.len()`, the terms added one row after the other (the order
/// of one [`axpy`] per row, so the same bits), each `y[j]` read and written once for a full block of
/// [`QUERY_BLOCK`] rows.
#[inline(always)]
fn accumulate_rows(y: &mut [f32], coef: &[f32], x: &[f32], stride: usize) {
    let n = y.len();
    if let Ok(c) = <[f32; QUERY_BLOCK]>::try_from(coef) {
        let xs: [&[f32]; QUERY_BLOCK] = std::array::from_fn(|k| &x[k * stride..k * stride + n]);
        let mut j0 = 0;
        while j0 + LANES <= n {
            let mut t = lanes(y, j0);
            for k in 0..QUERY_BLOCK {
                let xk = lanes(xs[k], j0);
                for l in 0..LANES {
                    t[l] += c[k] * xk[l];
                }
            }
            y[j0..j0 + LANES].copy_from_slice(&t);
            j0 += LANES;
        }
        for j in j0..n {
            let mut t = y[j];
            for k in 0..QUERY_BLOCK {
                t += c[k] * xs[k][j];
            }
            y[j] = t;
        }
        return;
    }
    for (k, &c) in coef.iter().enumerate() {
        axpy(y, c, &x[k * stride..k * stride + n]);
    }
}

/// Scratch buffers of one `(batch, key/value head)` pair.
struct Scratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    dkt: Vec<f32>,
    dvt: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
}

impl Scratch {
    fn new(tk: usize, d: usize, backward: bool) -> Self {
        let big = if backward { tk * d } else { 0 };
        Self {
            kt: vec![0.0; tk * d],
            vt: vec![0.0; big],
            dkt: vec![0.0; big],
            dvt: vec![0.0; big],
            s: vec![0.0; QUERY_BLOCK * tk],
            dp: vec![0.0; if backward { QUERY_BLOCK * tk } else { 0 }],
        }
    }
}

/// Query rows per block of the forward pass (transposed-key path): their scores and outputs are computed together,
/// so each key and value row is loaded once per block instead of once per row (register tiling over rows).
const QUERY_BLOCK: usize = 8;

/// Eight consecutive values of `x` from `at` (one bounds check; the compiler keeps the array in a vector register).
#[inline(always)]
fn lanes(x: &[f32], at: usize) -> [f32; LANES] {
    let mut v = [0.0f32; LANES];
    v.copy_from_slice(&x[at..at + LANES]);
    v
}

/// A register tile: eight rows of a block × eight lanes.
type Tile = [[f32; LANES]; QUERY_BLOCK];

/// `acc[k][l] += col[k] · row[l]` (an outer product added to the tile; a multiply, then an add).
#[inline(always)]
fn add_outer(acc: &mut Tile, col: [f32; QUERY_BLOCK], row: [f32; LANES]) {
    for k in 0..QUERY_BLOCK {
        for l in 0..LANES {
            acc[k][l] += col[k] * row[l];
        }
    }
}

/// The tile's rows into `out[k·stride + at..][..LANES]`.
#[inline(always)]
fn store_tile(acc: &Tile, out: &mut [f32], stride: usize, at: usize) {
    for (k, acc) in acc.iter().enumerate() {
        out[k * stride + at..k * stride + at + LANES].copy_from_slice(acc);
    }
}

/// `s[k·tk + j] = Σ_d qt[d·QUERY_BLOCK + k] · kt[d·tk + j]` for `k < QUERY_BLOCK`, `j < n` (`qt` is the block's
/// queries `[D, QUERY_BLOCK]`, `kt` the keys `[D, T_k]`): each entry summed over `d` in order (the same bits
/// whatever the block), eight keys of all the block's rows in registers per pass over `d`.
#[inline(always)]
fn block_scores(qt: &[f32], d: usize, kt: &[f32], tk: usize, n: usize, s: &mut [f32]) {
    let mut j0 = 0;
    while j0 + LANES <= n {
        let mut acc: Tile = [[0.0; LANES]; QUERY_BLOCK];
        for dd in 0..d {
            add_outer(&mut acc, lanes(qt, dd * QUERY_BLOCK), lanes(kt, dd * tk + j0));
        }
        store_tile(&acc, s, tk, j0);
        j0 += LANES;
    }
    for j in j0..n {
        let mut acc = [0.0f32; QUERY_BLOCK];
        for dd in 0..d {
            let qd = lanes(qt, dd * QUERY_BLOCK);
            for k in 0..QUERY_BLOCK {
                acc[k] += qd[k] * kt[dd * tk + j];
            }
        }
        for (k, a) in acc.iter().enumerate() {
            s[k * tk + j] = *a;
        }
    }
}

/// `o[k·D + d] = Σ_{j<n} pt[j·QUERY_BLOCK + k] · v_j[d]` for `k < QUERY_BLOCK` (`pt` the block's weights `[T_k,
/// QUERY_BLOCK]`, `v_j` the rows `(b, g, j)` of `v`), summed over `j` in order: eight columns of all the block's rows
/// in registers per pass over the values.
#[inline(always)]
fn block_values(pt: &[f32], n: usize, v: &View4<'_, f32>, (b, g): (usize, usize), o: &mut [f32]) {
    let d = v.dims[3];
    let mut d0 = 0;
    while d0 + LANES <= d {
        let mut acc: Tile = [[0.0; LANES]; QUERY_BLOCK];
        for j in 0..n {
            add_outer(&mut acc, lanes(pt, j * QUERY_BLOCK), lanes(v.row(b, g, j), d0));
        }
        store_tile(&acc, o, d, d0);
        d0 += LANES;
    }
    for dd in d0..d {
        let mut acc = [0.0f32; QUERY_BLOCK];
        for j in 0..n {
            let (vj, cj) = (v.row(b, g, j)[dd], lanes(pt, j * QUERY_BLOCK));
            for k in 0..QUERY_BLOCK {
                acc[k] += cj[k] * vj;
            }
        }
        for (k, a) in acc.iter().enumerate() {
            o[k * d + dd] = *a;
        }
    }
}

/// The largest of `s` (`−∞` when empty; NaNs ignored, as `f32::max` does), eight lanes at a time (the maximum does
/// not depend on the order).
#[inline(always)]
fn max_of(s: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    chunks.remainder().iter().chain(m.iter()).fold(f32::NEG_INFINITY, |a, &v| a.max(v))
}

/// Softmax of one score row in place over its first `n` keys (`e^{s − m} / Σ`), zeros from `n` to `n_max`; returns
/// the row's log-sum-exp (NaN when `n = 0`, as softmax over `−∞` is).
#[inline(always)]
fn softmax_row(row: &mut [f32], n: usize, n_max: usize) -> f32 {
    let live = &mut row[..n];
    let m = max_of(live);
    let sum = exp_shifted(live, m);
    for p in live.iter_mut() {
        *p /= sum;
    }
    row[n..n_max].fill(0.0);
    if n == 0 { f32::NAN } else { m + sum.ln() }
}

/// Rows `first..first + rows` of head `(b, h)` of `x` transposed into `out` `[D, QUERY_BLOCK]`, zeros past `rows`.
#[inline(always)]
fn gather_block(x: &View4<'_, f32>, (b, h): (usize, usize), first: usize, rows: usize, out: &mut [f32]) {
    out.fill(0.0);
    for k in 0..rows {
        for (dd, &v) in x.row(b, h, first + k).iter().enumerate() {
            out[dd * QUERY_BLOCK + k] = v;
        }
    }
}

/// [`key_end`] of mask rows `first..first + rows` of batch row `b` (0 past `rows`).
#[inline(always)]
fn block_key_ends(mask: &View4<'_, u8>, b: usize, first: usize, rows: usize) -> [usize; QUERY_BLOCK] {
    std::array::from_fn(|k| if k < rows { key_end(mask.row(b, 0, first + k)) } else { 0 })
}

/// Scores `s_j / √D` in place, `−∞` where the mask is set.
#[inline(always)]
fn mask_and_scale(row: &mut [f32], mask: &[u8], sqrt_d: f32) {
    for (sj, &m) in row.iter_mut().zip(mask) {
        *sj = if m != 0 { f32::NEG_INFINITY } else { *sj / sqrt_d };
    }
}

/// Row `k` of a block into column `k` of `pt` `[T_k, QUERY_BLOCK]`.
#[inline(always)]
fn scatter_column(row: &[f32], k: usize, pt: &mut [f32]) {
    for (j, &v) in row.iter().enumerate() {
        pt[j * QUERY_BLOCK + k] = v;
    }
}

/// The forward pass of one pair: its query heads into `out` `[rep, S, D]` and `lse` `[rep, S]`.
#[inline(always)]
fn forward_pair(x: &AttentionViews<'_>, pair: Pair, out: &mut [f32], lse: &mut [f32]) {
    let Pair { b, g, rep } = pair;
    let [_, _, s, d] = x.q.dims;
    let tk = x.k.dims[2];
    // Few query rows per key/value head (decoding): the keys are read in place, one dot product per key; more rows
    // amortise a transposed copy of the keys, which the score loop then reads along the keys.
    if rep * s < ROWS_FOR_TRANSPOSE {
        return forward_rows_in_place(x, pair, out, lse);
    }
    let sqrt_d = (d as f32).sqrt();
    let mut w = Scratch::new(tk, d, false);
    transpose_head(&x.k, b, g, &mut w.kt);
    let (mut qt, mut ob) = (vec![0.0f32; QUERY_BLOCK * d], vec![0.0f32; QUERY_BLOCK * d]);
    let mut pt = vec![0.0f32; QUERY_BLOCK * tk];
    for r in 0..rep {
        let h = g * rep + r;
        for i0 in (0..s).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(s - i0);
            gather_block(&x.q, (b, h), i0, rows, &mut qt);
            let ns = block_key_ends(&x.mask, b, i0, rows);
            let n_max = ns.iter().copied().max().unwrap_or(0);
            block_scores(&qt, d, &w.kt, tk, n_max, &mut w.s);
            for (k, &n) in ns.iter().enumerate() {
                let row = &mut w.s[k * tk..k * tk + n_max];
                if k < rows {
                    mask_and_scale(&mut row[..n], x.mask.row(b, 0, i0 + k), sqrt_d);
                    lse[r * s + i0 + k] = softmax_row(row, n, n_max);
                } else {
                    row.fill(0.0);
                }
                scatter_column(row, k, &mut pt);
            }
            block_values(&pt, n_max, &x.v, (b, g), &mut ob);
            for (k, &n) in ns.iter().enumerate().take(rows) {
                let o = &mut out[(r * s + i0 + k) * d..(r * s + i0 + k + 1) * d];
                // A row with no key gives NaN, as softmax over −∞ does.
                if n == 0 { o.fill(f32::NAN) } else { o.copy_from_slice(&ob[k * d..(k + 1) * d]) }
            }
        }
    }
}

/// The forward pass of one pair with few query rows (decoding): keys and values read in place.
#[inline(always)]
fn forward_rows_in_place(x: &AttentionViews<'_>, Pair { b, g, rep }: Pair, out: &mut [f32], lse: &mut [f32]) {
    let [_, _, s, d] = x.q.dims;
    let tk = x.k.dims[2];
    let sqrt_d = (d as f32).sqrt();
    let mut scores = vec![0.0f32; tk];
    for r in 0..rep {
        let h = g * rep + r;
        for i in 0..s {
            let (qi, mask) = (x.q.row(b, h, i), x.mask.row(b, 0, i));
            let n = key_end(mask);
            let row = &mut scores[..n];
            for (j, sj) in row.iter_mut().enumerate() {
                *sj = dot(qi, x.k.row(b, g, j));
            }
            mask_and_scale(row, mask, sqrt_d);
            lse[r * s + i] = softmax_row(row, n, n);
            let o = &mut out[(r * s + i) * d..(r * s + i + 1) * d];
            weighted_rows(row, &x.v, (b, g), o);
            if n == 0 {
                o.fill(f32::NAN);
            }
        }
    }
}

/// `o = Σ_j p[j] · v_j` over `j < p.len()` (`v_j` the rows `(b, g, j)` of `v`), summed over `j` in order with
/// eight columns in registers (zero weights add exact zeros).
#[inline(always)]
fn weighted_rows(p: &[f32], v: &View4<'_, f32>, (b, g): (usize, usize), o: &mut [f32]) {
    let d = o.len();
    let mut d0 = 0;
    while d0 + LANES <= d {
        let mut acc = [0.0f32; LANES];
        for (j, &pj) in p.iter().enumerate() {
            let vj = lanes(v.row(b, g, j), d0);
            for l in 0..LANES {
                acc[l] += pj * vj[l];
            }
        }
        o[d0..d0 + LANES].copy_from_slice(&acc);
        d0 += LANES;
    }
    for (dd, od) in o.iter_mut().enumerate().skip(d0) {
        let mut acc = 0.0f32;
        for (j, &pj) in p.iter().enumerate() {
            acc += pj * v.row(b, g, j)[dd];
        }
        *od = acc;
    }
}

/// The backward pass of one pair: `dq` of its query heads, `dk` and `dv` of its key/value head. Query rows are taken
/// [`QUERY_BLOCK`] at a time: their scores and `dp` are computed together, their `dq` in one pass over the keys, and
/// their `dk` / `dv` terms added in one pass over the transposed accumulators.
#[inline(always)]
fn backward_pair(
    x: &AttentionViews<'_>,
    gr: &AttentionGrad<'_>,
    Pair { b, g, rep }: Pair,
    PairGrads { dq, dk, dv }: PairGrads<'_>,
) {
    let [_, hq, s, d] = x.q.dims;
    let tk = x.k.dims[2];
    let sqrt_d = (d as f32).sqrt();
    let mut w = Scratch::new(tk, d, true);
    transpose_head(&x.k, b, g, &mut w.kt);
    transpose_head(&x.v, b, g, &mut w.vt);
    // The block's queries and output gradients transposed `[D, QUERY_BLOCK]`, its `ds` `[T_k, QUERY_BLOCK]`.
    let (mut qt, mut grad_t) = (vec![0.0f32; QUERY_BLOCK * d], vec![0.0f32; QUERY_BLOCK * d]);
    let (mut dst, mut dqb) = (vec![0.0f32; QUERY_BLOCK * tk], vec![0.0f32; QUERY_BLOCK * d]);
    for r in 0..rep {
        let h = g * rep + r;
        for i0 in (0..s).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(s - i0);
            gather_block(&x.q, (b, h), i0, rows, &mut qt);
            gather_block(&gr.grad, (b, h), i0, rows, &mut grad_t);
            let ns = block_key_ends(&x.mask, b, i0, rows);
            let n_max = ns.iter().copied().max().unwrap_or(0);
            block_scores(&qt, d, &w.kt, tk, n_max, &mut w.s);
            block_scores(&grad_t, d, &w.vt, tk, n_max, &mut w.dp);
            for (k, &n) in ns.iter().enumerate() {
                let (p, dp) = (&mut w.s[k * tk..k * tk + n_max], &mut w.dp[k * tk..k * tk + n_max]);
                if k < rows {
                    let i = i0 + k;
                    mask_and_scale(&mut p[..n], x.mask.row(b, 0, i), sqrt_d);
                    exp_shifted(&mut p[..n], gr.lse[(b * hq + h) * s + i]);
                    let delta = dot(gr.grad.row(b, h, i), gr.out.row(b, h, i));
                    for (dpj, &pj) in dp[..n].iter_mut().zip(p.iter()) {
                        *dpj = pj * (*dpj - delta); // ds
                    }
                }
                // Rows shorter than the block's longest (and rows past the end) add exact zeros.
                let from = if k < rows { n } else { 0 };
                p[from..].fill(0.0);
                dp[from..].fill(0.0);
                scatter_column(dp, k, &mut dst);
            }
            block_values(&dst, n_max, &x.k, (b, g), &mut dqb);
            for k in 0..rows {
                let dqi = &mut dq[(r * s + i0 + k) * d..(r * s + i0 + k + 1) * d];
                for (o, &v) in dqi.iter_mut().zip(&dqb[k * d..(k + 1) * d]) {
                    *o = v / sqrt_d;
                }
            }
            for dd in 0..d {
                let (cv, ck) = (lanes(&grad_t, dd * QUERY_BLOCK), lanes(&qt, dd * QUERY_BLOCK));
                let row = dd * tk..dd * tk + n_max;
                accumulate_rows(&mut w.dvt[row.clone()], &cv[..rows], &w.s, tk);
                accumulate_rows(&mut w.dkt[row], &ck[..rows], &w.dp, tk);
            }
        }
    }
    for j in 0..tk {
        for dd in 0..d {
            dk[j * d + dd] = w.dkt[dd * tk + j] / sqrt_d;
            dv[j * d + dd] = w.dvt[dd * tk + j];
        }
    }
}

/// Flex tensors as views (no copy unless the head axis is strided or the dtype is not the kernel's).
mod flex_host {
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{Flex, TensorMetadata};
    use burn::tensor::{DType, FloatDType, TensorData};

    use super::{AttentionGrad, AttentionViews, View4, attention_backward_host, attention_forward_host};
    use crate::flex_host::nan;

    /// `t` as f32 with a contiguous last axis and non-negative strides (a copy otherwise).
    fn readable(t: &FlexTensor, dtype: DType) -> FlexTensor {
        let t = if t.dtype() == dtype || !matches!(dtype, DType::F32) {
            t.clone()
        } else {
            Flex::float_cast(t.clone(), FloatDType::F32)
        };
        let strides = t.layout().strides();
        let ok = strides.len() == 4 && strides[3] == 1 && strides.iter().all(|&s| s >= 0);
        if ok { t } else { t.to_contiguous() }
    }

    fn view<'a, T: burn::tensor::Element + bytemuck::Pod>(t: &'a FlexTensor) -> Option<View4<'a, T>> {
        let s = t.layout().strides();
        let dims = t.shape().dims::<4>();
        let stride = |i: usize| usize::try_from(s[i]).ok();
        View4::strided(t.storage::<T>(), t.layout().start_offset(), [stride(0)?, stride(1)?, stride(2)?], dims)
    }

    pub(super) fn forward(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        mask: &FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let [b, hq, s, d] = q.shape().dims::<4>();
        let (q, k, v) = (readable(q, DType::F32), readable(k, DType::F32), readable(v, DType::F32));
        let mask = readable(mask, mask.dtype());
        let mut out = vec![0.0f32; b * hq * s * d];
        let mut lse = vec![0.0f32; b * hq * s];
        let views = (|| Some(AttentionViews { q: view(&q)?, k: view(&k)?, v: view(&v)?, mask: view::<u8>(&mask)? }))();
        // The model checks shapes before this runs; a failure here is an internal error, reported as NaN outputs.
        match views.map(|x| attention_forward_host(&x, &mut out, &mut lse)) {
            Some(Ok(())) => (
                FlexTensor::from_data(TensorData::new(out, [b, hq, s, d])),
                FlexTensor::from_data(TensorData::new(lse, [b, hq, s])),
            ),
            _ => (nan(&[b, hq, s, d]), nan(&[b, hq, s])),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        mask: &FlexTensor,
        out: &FlexTensor,
        lse: &FlexTensor,
        grad: &FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (qd, kd) = (q.shape().dims::<4>(), k.shape().dims::<4>());
        let (q, k, v) = (readable(q, DType::F32), readable(k, DType::F32), readable(v, DType::F32));
        let (out, grad) = (readable(out, DType::F32), readable(grad, DType::F32));
        let mask = readable(mask, mask.dtype());
        let lse = lse.to_contiguous();
        let result = (|| {
            let x = AttentionViews { q: view(&q)?, k: view(&k)?, v: view(&v)?, mask: view::<u8>(&mask)? };
            let g = AttentionGrad { grad: view(&grad)?, out: view(&out)?, lse: lse.as_slice::<f32>()? };
            attention_backward_host(&x, &g).ok()
        })();
        match result {
            Some((dq, dk, dv)) => (
                FlexTensor::from_data(TensorData::new(dq, qd)),
                FlexTensor::from_data(TensorData::new(dk, kd)),
                FlexTensor::from_data(TensorData::new(dv, kd)),
            ),
            None => (nan(&qd), nan(&kd), nan(&kd)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().expect("f32")
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 2e-5 * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// `[b, 1, s, past + s]`: causal after `past` cached keys, and row `r`'s first `pads[r]` keys masked for its real
    /// queries (as the model builds it).
    fn mask(pads: &[usize], s: usize, past: usize, device: &Device) -> Tensor<4, Bool> {
        let tk = past + s;
        let mut m = Vec::new();
        for &p in pads {
            for i in 0..s {
                for j in 0..tk {
                    let causal = j > past + i;
                    let real_query = past + i >= p;
                    m.push(causal || (real_query && j < p));
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [pads.len(), 1, s, tk]), device)
    }

    /// Output and `(dq, dk, dv)` of `Σ out ⊙ w` through [`causal_attention`] with the fused operation on or off. `q` is
    /// a `swap_dims` view and `k`, `v` are narrowed views of larger buffers, as the model passes them.
    fn run(shape: [usize; 6], pads: &[usize], fused: bool) -> (Vec<f32>, [Vec<f32>; 3]) {
        let [b, hq, hkv, s, past, d] = shape;
        let tk = past + s;
        let device = Device::flex().autodiff();
        // Inputs from a host generator, not the device's RNG: tests running in parallel draw from that one, so the
        // fused and the composed run would not see the same inputs.
        let mut state = 11u64;
        let mut random = |dims: [usize; 4]| {
            let n = dims.iter().product::<usize>();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    (state >> 40) as f32 / (1u64 << 23) as f32 * 2.0 - 1.0
                })
                .collect();
            Tensor::<4>::from_data(TensorData::new(data, dims), &device)
        };
        let q0 = random([b, s, hq, d]).require_grad();
        let k0 = random([b, hkv, tk + 3, d]).require_grad();
        let v0 = random([b, hkv, tk + 3, d]).require_grad();
        let w = random([b, hq, s, d]);
        let m = mask(pads, s, past, &device);
        let (q, k, v) = (q0.clone().swap_dims(1, 2), k0.clone().narrow(2, 0, tk), v0.clone().narrow(2, 0, tk));
        let out = if fused { causal_attention(q, k, v, &m) } else { composed_attention(q, k, v, &m) };
        let grads = (out.clone() * w).sum().backward();
        let g = |t: &Tensor<4>| values(t.grad(&grads).expect("a gradient"));
        (values(out), [g(&q0), g(&k0), g(&v0)])
    }

    /// Values in [−2, 2) from a fixed sequence.
    fn fixed_values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + salt * 11) % 29) as f32 - 14.0) / 7.0).collect()
    }

    #[test]
    fn register_tiled_scores_and_values_give_the_bits_of_row_by_row_sums() {
        // Head widths with and without a tail past the eight lanes; key counts below, at and past a chunk of eight.
        for (d, tk, n) in [(16, 13, 13), (5, 20, 17), (12, 8, 8), (8, 9, 3)] {
            let (qt, kt) = (fixed_values(d * QUERY_BLOCK, 1), fixed_values(d * tk, 2));
            let mut s = vec![0.0f32; QUERY_BLOCK * tk];
            block_scores(&qt, d, &kt, tk, n, &mut s);
            for k in 0..QUERY_BLOCK {
                for j in 0..n {
                    let mut want = 0.0f32;
                    for dd in 0..d {
                        want += qt[dd * QUERY_BLOCK + k] * kt[dd * tk + j];
                    }
                    assert_eq!(s[k * tk + j].to_bits(), want.to_bits(), "scores d {d} k {k} j {j}");
                }
            }
            let (pt, v) = (fixed_values(tk * QUERY_BLOCK, 3), fixed_values(tk * d, 4));
            let view = View4::contiguous(&v, [1, 1, tk, d]).expect("a view");
            let mut o = vec![0.0f32; QUERY_BLOCK * d];
            block_values(&pt, n, &view, (0, 0), &mut o);
            let mut row = vec![0.0f32; d];
            for k in 0..QUERY_BLOCK {
                // The decoding path's one-row sum is the same sum.
                let p: Vec<f32> = (0..n).map(|j| pt[j * QUERY_BLOCK + k]).collect();
                weighted_rows(&p, &view, (0, 0), &mut row);
                for dd in 0..d {
                    let mut want = 0.0f32;
                    for j in 0..n {
                        want += pt[j * QUERY_BLOCK + k] * v[j * d + dd];
                    }
                    assert_eq!(o[k * d + dd].to_bits(), want.to_bits(), "values d {d} k {k} dim {dd}");
                    assert_eq!(row[dd].to_bits(), want.to_bits(), "one row d {d} k {k} dim {dd}");
                }
            }
        }
    }

    #[test]
    fn blocked_row_accumulation_gives_the_bits_of_one_axpy_per_row() {
        let (tk, n) = (13, 11);
        let x: Vec<f32> = (0..QUERY_BLOCK * tk).map(|i| ((i * 37 % 29) as f32 - 14.0) / 7.0).collect();
        let coef = [0.3f32, -1.7, 2.9, -0.11, 1.3, -0.7, 0.05, 4.1];
        for rows in 1..=QUERY_BLOCK {
            let mut blocked: Vec<f32> = (0..n).map(|j| j as f32 / 3.0).collect();
            let mut one_by_one = blocked.clone();
            accumulate_rows(&mut blocked, &coef[..rows], &x, tk);
            for (k, &c) in coef[..rows].iter().enumerate() {
                axpy(&mut one_by_one, c, &x[k * tk..k * tk + n]);
            }
            assert_eq!(blocked, one_by_one, "{rows} rows");
        }
    }

    #[test]
    fn fused_attention_equals_the_composed_path_in_values_and_gradients() {
        // [B, H_q, H_kv, S, past, D]: grouped heads, prefill with padding, decoding after a cache, a head width that
        // is not a multiple of the eight lanes, and enough rows for the transposed-key path.
        let cases: [([usize; 6], &[usize]); 5] = [
            ([2, 4, 2, 5, 0, 8], &[0, 2]),
            ([2, 4, 2, 1, 6, 8], &[0, 3]),
            ([1, 2, 1, 3, 4, 12], &[1]),
            ([3, 6, 3, 9, 2, 16], &[0, 4, 1]),
            ([2, 2, 2, 20, 0, 5], &[0, 7]),
        ];
        for (shape, pads) in cases {
            let (fo, fg) = run(shape, pads, true);
            let (co, cg) = run(shape, pads, false);
            let what = format!("{shape:?} pads {pads:?}");
            assert_close(&fo, &co, &format!("{what} output"));
            for (name, (f, c)) in ["dq", "dk", "dv"].iter().zip(fg.iter().zip(&cg)) {
                assert_close(f, c, &format!("{what} {name}"));
            }
            assert!(fg[1].iter().any(|&x| x != 0.0), "{what}: the case has gradients");
        }
    }

    #[test]
    fn a_row_with_every_key_masked_is_nan_on_both_paths() {
        let device = Device::flex();
        let q = Tensor::<4>::ones([1, 1, 2, 8], &device);
        let kv = Tensor::<4>::ones([1, 1, 2, 8], &device);
        let m = Tensor::<4, Bool>::from_data(TensorData::new(vec![true, true, false, true], [1, 1, 2, 2]), &device);
        let fused = values(causal_attention(q.clone(), kv.clone(), kv.clone(), &m));
        let composed = values(composed_attention(q, kv.clone(), kv, &m));
        assert!(fused[..8].iter().chain(&composed[..8]).all(|x| x.is_nan()), "row 0 has no key");
        assert_eq!(fused[8..], composed[8..], "row 1 reads key 0: {fused:?}");
    }

    #[test]
    fn the_switch_selects_the_composed_path_and_bad_shapes_are_typed_errors() {
        assert!(set_fused(true), "fused by default");
        let data = vec![0.0f32; 24];
        let q = View4::contiguous(&data, [1, 3, 1, 8]).expect("24 values");
        let k = View4::contiguous(&data[..16], [1, 2, 1, 8]).expect("16 values");
        let bytes = [0u8; 1];
        let m = View4::contiguous(&bytes[..], [1, 1, 1, 1]).expect("one value");
        let x = AttentionViews { q, k, v: k, mask: m };
        assert!(matches!(x.shape(), Err(crate::Error::ShapeMismatch { .. })), "2 key/value heads do not divide 3");
        assert!(View4::contiguous(&data, [1, 1, 1, 8]).is_err(), "24 values are not [1, 1, 1, 8]");
        assert!(View4::strided(&data, 20, [0, 0, 8], [1, 1, 1, 8]).is_none(), "past the end");
        let (mut out, mut lse) = (vec![0.0; 3], vec![0.0; 1]);
        let q = View4::contiguous(&data[..8], [1, 1, 1, 8]).expect("8 values");
        let k = View4::contiguous(&data[..8], [1, 1, 1, 8]).expect("8 values");
        let x = AttentionViews { q, k, v: k, mask: m };
        assert!(attention_forward_host(&x, &mut out, &mut lse).is_err(), "output buffer of the wrong length");
    }
}
