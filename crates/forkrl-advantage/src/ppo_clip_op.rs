//! The PPO clip loss ([`crate::ppo_clip`]) and its aggregation ([`crate::aggregation`]) as **one** differentiable burn
//! operation on the CPU backend, with its own backward pass: one read of the four `[B, T]` inputs forward, one read
//! and one write of the gradient backward, instead of the ~20 element-wise burn operations (each a full pass and a
//! fresh `[B, T]` buffer, most of them kept for the backward pass) that the composed path runs.
//!
//! Forward, per loss token (`mask`), with `r = exp(clamp(log π − log π_old, ±20))` and the row weight `w_i`:
//!
//! ```text
//! l1 = −A·r,  l2 = −A·clip(r, 1 − ε_low, 1 + ε_high),  l = max(l1, l2)
//! if A < 0 and l > −A·c:  l = −A·c                            (dual clip)
//! L  = Σ_i w_i Σ_t l_{i,t}
//! w_i = token_factor (token-mean, token-sum), seq_factor (seq-mean-token-sum[-norm]),
//!       seq_factor / max(n_i, 1) (seq-mean-token-mean, n_i = tokens of row i in the count mask)
//! ```
//!
//! Backward: `∂L/∂log π_{i,t} = g · w_i · (−A·r)` on the unclipped branch with `|log r| ≤ 20` and 0 elsewhere (on the
//! clipped branch `clip(r)` is constant in `r`, the dual clip is a constant, the clamp cuts the gradient), the
//! derivative of the composed path ([`crate::ppo_clip::ppo_clip_loss`] then [`crate::aggregate_with_counts`]), in the
//! same order of f32 operations. The loss sums are accumulated in f64 per row, the rows added in order, so the result
//! does not depend on the number of threads. The same pass gives verl's metrics (`pg_clipfrac`,
//! `pg_clipfrac_lower`, `ppo_kl`).
//!
//! [`crate::PolicyLoss::compute`] takes this path for `vanilla` on the Flex backend (under autodiff or not) with f32
//! log-probs, and the composed path elsewhere; both are tested equal in values, gradients and metrics. On `[512,
//! 4096]` the forward + backward went from 128 ms composed to the time in docs/benchmarks.md (`cargo xtask bench`,
//! group `policy_loss_512x4096`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{Bool, DType, Tensor};
use forkrl_core::{Error, Result};

use crate::LOG_RATIO_CLAMP;
use crate::aggregation::{AggMode, GlobalDenominators};
use crate::loss_types::{PolicyInputs, PolicyMetrics, host_vec};
use crate::policy_loss::AggregatedLoss;
use crate::ppo_clip::PpoClipConfig;

/// The scalar parameters of one fused evaluation, as the kernel reads them (f32, as burn's scalar operations round
/// them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipSumParams {
    /// `1 − ε_low`.
    pub ratio_low: f32,
    /// `1 + ε_high`.
    pub ratio_high: f32,
    /// The dual-clip constant `c`; `+∞` turns the dual clip off.
    pub dual_clip: f32,
    /// `token_factor` or `seq_factor` of the aggregation mode.
    pub factor: f32,
    /// `seq-mean-token-mean`: divide each row by its token count in the count mask.
    pub per_row_mean: bool,
}

/// Number of values [`ppo_clip_sum_host`] returns: the loss, then the three metrics.
pub const OUTPUTS: usize = 4;

/// Backend extension: the fused PPO clip loss and aggregation. The caller checks that the five tensors share one
/// `[B, T]` shape and that the float ones are f32.
#[backend_extension(Flex, Autodiff)]
pub trait PpoClipBackend: Backend {
    /// `[4]`: the aggregated loss, `pg_clipfrac`, `pg_clipfrac_lower`, `ppo_kl`.
    fn ppo_clip_sum(
        log_prob: FloatTensor<Self>,
        old_log_prob: FloatTensor<Self>,
        advantages: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        count_mask: BoolTensor<Self>,
        params: ClipSumParams,
    ) -> FloatTensor<Self>;

    /// The gradient `[B, T]` w.r.t. `log_prob` of a loss whose gradient w.r.t. the `[4]` output of
    /// [`PpoClipBackend::ppo_clip_sum`] is `grad` (only its first value, the loss's, matters: the metrics are
    /// constants).
    fn ppo_clip_sum_backward(
        log_prob: FloatTensor<Self>,
        old_log_prob: FloatTensor<Self>,
        advantages: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        count_mask: BoolTensor<Self>,
        grad: FloatTensor<Self>,
        params: ClipSumParams,
    ) -> FloatTensor<Self>;
}

impl PpoClipBackend for Flex {
    fn ppo_clip_sum(
        log_prob: FloatTensor<Self>,
        old_log_prob: FloatTensor<Self>,
        advantages: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        count_mask: BoolTensor<Self>,
        params: ClipSumParams,
    ) -> FloatTensor<Self> {
        flex_host::sum(&log_prob, &old_log_prob, &advantages, &mask, &count_mask, &params)
    }

    fn ppo_clip_sum_backward(
        log_prob: FloatTensor<Self>,
        old_log_prob: FloatTensor<Self>,
        advantages: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        count_mask: BoolTensor<Self>,
        grad: FloatTensor<Self>,
        params: ClipSumParams,
    ) -> FloatTensor<Self> {
        flex_host::backward(&log_prob, &old_log_prob, &advantages, &mask, &count_mask, &grad, &params)
    }
}

impl<B: Backend + PpoClipBackend, C: CheckpointStrategy> PpoClipBackend for Autodiff<B, C> {
    fn ppo_clip_sum(
        log_prob: FloatTensor<Self>,
        old_log_prob: FloatTensor<Self>,
        advantages: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        count_mask: BoolTensor<Self>,
        params: ClipSumParams,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ClipSumBackward;

        /// The inputs (the two constants detached) and the parameters.
        type State<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, BoolTensor<B>, BoolTensor<B>, ClipSumParams);

        impl<B: Backend + PpoClipBackend> Backward<B, 1> for ClipSumBackward {
            type State = State<B>;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = parent {
                    let (lp, old, adv, mask, count, params) = ops.state;
                    let d = B::ppo_clip_sum_backward(lp, old, adv, mask, count, grad, params);
                    grads.register::<B>(node.id, d);
                }
            }
        }

        let (old, adv) = (old_log_prob.into_primitive(), advantages.into_primitive());
        let forward = |lp: FloatTensor<B>, old: FloatTensor<B>, adv: FloatTensor<B>, m, c| {
            B::ppo_clip_sum(lp, old, adv, m, c, params)
        };
        match ClipSumBackward.prepare::<C>([log_prob.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let lp = log_prob.primitive().clone();
                let out = forward(lp.clone(), old.clone(), adv.clone(), mask.clone(), count_mask.clone());
                prep.finish((lp, old, adv, mask, count_mask, params), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(log_prob.into_primitive(), old, adv, mask, count_mask)),
        }
    }

    fn ppo_clip_sum_backward(
        log_prob: FloatTensor<Self>,
        old_log_prob: FloatTensor<Self>,
        advantages: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        count_mask: BoolTensor<Self>,
        grad: FloatTensor<Self>,
        params: ClipSumParams,
    ) -> FloatTensor<Self> {
        // Second-order use is not supported: the backward pass runs on the inner backend, untracked.
        <Autodiff<B, C> as burn::backend::AutodiffBackend>::from_inner(B::ppo_clip_sum_backward(
            log_prob.into_primitive(),
            old_log_prob.into_primitive(),
            advantages.into_primitive(),
            mask,
            count_mask,
            grad.into_primitive(),
            params,
        ))
    }
}

/// Whether [`fused_ppo_clip_sum`] takes these inputs: the Flex backend and f32 values.
pub(crate) fn applies(log_prob: &Tensor<2>, old: &Tensor<2>, adv: &Tensor<2>) -> bool {
    forkrl_core::backend::runs_on_flex(log_prob.device().as_dispatch())
        && [log_prob, old, adv].iter().all(|t| t.dtype() == DType::F32)
}

/// The fused operation through burn's dispatch: `[4]` (loss, `pg_clipfrac`, `pg_clipfrac_lower`, `ppo_kl`),
/// differentiable w.r.t. `log_prob` in its first value. The caller has checked shapes and [`applies`]; `old_log_prob`
/// and `advantages` are constants.
pub(crate) fn fused_ppo_clip_sum(
    log_prob: Tensor<2>,
    old_log_prob: Tensor<2>,
    advantages: Tensor<2>,
    mask: &Tensor<2, Bool>,
    count_mask: &Tensor<2, Bool>,
    p: &ClipSumParams,
) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as PpoClipBackend>::ppo_clip_sum(
        log_prob.into_dispatch(),
        old_log_prob.detach().into_dispatch(),
        advantages.detach().into_dispatch(),
        mask.clone().into_dispatch(),
        count_mask.clone().into_dispatch(),
        *p,
    ))
}

/// The divisor of row `i`'s weight `w_i = factor / n_i`: its token count in the count mask under
/// `seq-mean-token-mean` (at least 1), else 1. Kept apart from the factor so that the gradient is `(g · factor) / n_i`
/// as in the composed path.
fn row_divisor(count: &[u8], p: &ClipSumParams) -> f32 {
    if p.per_row_mean { (count.iter().filter(|&&c| c != 0).count().max(1)) as f32 } else { 1.0 }
}

/// One loss token's `(loss, clipped, dual clip binds, r where the gradient flows else 0, clamped log r)`:
/// `∂loss/∂log π = −A · r` on the unclipped branch inside the clamp, 0 elsewhere.
#[inline(always)]
fn token(lp: f32, old: f32, a: f32, p: &ClipSumParams) -> (f32, bool, bool, f32, f32) {
    let raw = lp - old;
    let log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
    let r = log_ratio.exp();
    let l1 = -a * r;
    let l2 = -a * r.clamp(p.ratio_low, p.ratio_high);
    let clipped = l2 > l1;
    let loss = if clipped { l2 } else { l1 };
    let cap = -a * p.dual_clip;
    let binds = a < 0.0 && loss > cap;
    let flows = !clipped && !binds && raw.abs() <= LOG_RATIO_CLAMP;
    (if binds { cap } else { loss }, clipped, binds, if flows { r } else { 0.0 }, log_ratio)
}

/// Per-row sums of one block of rows, pushed to `out`: `[loss · w, clipped, lower, −log r, tokens]` per row.
fn sum_rows(
    lp: &[f32],
    old: &[f32],
    adv: &[f32],
    mask: &[u8],
    count: &[u8],
    width: usize,
    p: &ClipSumParams,
) -> Vec<[f64; 5]> {
    let rows = lp.chunks_exact(width).zip(old.chunks_exact(width)).zip(adv.chunks_exact(width));
    rows.zip(mask.chunks_exact(width).zip(count.chunks_exact(width)))
        .map(|(((lp, old), adv), (mask, count))| {
            let mut loss = 0.0f64;
            let (mut clipped, mut lower, mut kl, mut n) = (0u32, 0u32, 0.0f64, 0u32);
            for t in 0..width {
                if mask[t] == 0 {
                    continue;
                }
                let (l, c, b, _, log_ratio) = token(lp[t], old[t], adv[t], p);
                loss += f64::from(l);
                clipped += u32::from(c);
                lower += u32::from(b);
                kl -= f64::from(log_ratio);
                n += 1;
            }
            let w = f64::from(p.factor) / f64::from(row_divisor(count, p));
            [loss * w, f64::from(clipped), f64::from(lower), kl, f64::from(n)]
        })
        .collect()
}

/// Gradient of one block of rows into `out`.
#[allow(clippy::too_many_arguments)]
fn grad_rows(
    lp: &[f32],
    old: &[f32],
    adv: &[f32],
    mask: &[u8],
    count: &[u8],
    width: usize,
    g: f32,
    p: &ClipSumParams,
    out: &mut [f32],
) {
    let rows = out.chunks_exact_mut(width).zip(lp.chunks_exact(width)).zip(old.chunks_exact(width));
    for (((out, lp), old), (adv, (mask, count))) in
        rows.zip(adv.chunks_exact(width).zip(mask.chunks_exact(width).zip(count.chunks_exact(width))))
    {
        let up = g * p.factor / row_divisor(count, p);
        for t in 0..width {
            out[t] = if mask[t] == 0 {
                0.0
            } else {
                let (_, _, _, r, _) = token(lp[t], old[t], adv[t], p);
                up * -adv[t] * r
            };
        }
    }
}

/// Rows per worker: all rows on one thread below 64k tokens, otherwise split over the available cores.
fn workers(rows: usize, width: usize) -> usize {
    if rows * width < 1 << 16 {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows).max(1)
}

/// The fused forward pass over host slices (row-major `[rows, width]`; masks as bytes, non-zero = true): the `[4]`
/// output of [`PpoClipBackend::ppo_clip_sum`]. Threads split the rows; each row is summed in f64 and the rows are
/// added in order, so the result does not depend on the thread count.
pub fn ppo_clip_sum_host(
    lp: &[f32],
    old: &[f32],
    adv: &[f32],
    mask: &[u8],
    count: &[u8],
    width: usize,
    p: &ClipSumParams,
) -> [f32; OUTPUTS] {
    let rows = lp.len().checked_div(width).unwrap_or(0);
    let threads = workers(rows, width);
    let per = rows.div_ceil(threads.max(1)).max(1) * width.max(1);
    let parts: Vec<Vec<[f64; 5]>> = if threads <= 1 {
        vec![sum_rows(lp, old, adv, mask, count, width.max(1), p)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = lp
                .chunks(per)
                .zip(old.chunks(per))
                .zip(adv.chunks(per))
                .zip(mask.chunks(per).zip(count.chunks(per)))
                .map(|(((lp, old), adv), (mask, count))| s.spawn(move || sum_rows(lp, old, adv, mask, count, width, p)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| vec![[f64::NAN; 5]])).collect()
        })
    };
    let mut acc = [0.0f64; 5];
    for row in parts.iter().flatten() {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
    let n = acc[4].max(1.0);
    [acc[0] as f32, (acc[1] / n) as f32, (acc[2] / n) as f32, (acc[3] / n) as f32]
}

/// The fused backward pass over host slices: `∂L/∂log π` for `∂L/∂loss = g`, row-major like the inputs.
#[allow(clippy::too_many_arguments)]
pub fn ppo_clip_grad_host(
    lp: &[f32],
    old: &[f32],
    adv: &[f32],
    mask: &[u8],
    count: &[u8],
    width: usize,
    g: f32,
    p: &ClipSumParams,
) -> Vec<f32> {
    let mut out = vec![0.0f32; lp.len()];
    if width == 0 || lp.is_empty() {
        return out;
    }
    let rows = lp.len() / width;
    let threads = workers(rows, width);
    let per = rows.div_ceil(threads).max(1) * width;
    if threads <= 1 {
        grad_rows(lp, old, adv, mask, count, width, g, p, &mut out);
    } else {
        std::thread::scope(|s| {
            for ((((out, lp), old), adv), (mask, count)) in out
                .chunks_mut(per)
                .zip(lp.chunks(per))
                .zip(old.chunks(per))
                .zip(adv.chunks(per))
                .zip(mask.chunks(per).zip(count.chunks(per)))
            {
                s.spawn(move || grad_rows(lp, old, adv, mask, count, width, g, p, out));
            }
        });
    }
    out
}

/// Flex tensors as host slices (a copy only for strided or broadcast views).
mod flex_host {
    use burn::backend::flex::FlexTensor;
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{Flex, TensorMetadata};
    use burn::tensor::{DType, FloatDType, TensorData};

    use super::{ClipSumParams, ppo_clip_grad_host, ppo_clip_sum_host};

    /// A contiguous f32 copy-or-view of `t` (cast when another float dtype reaches here).
    fn f32_of(t: &FlexTensor) -> FlexTensor {
        let t = if t.dtype() == DType::F32 { t.clone() } else { Flex::float_cast(t.clone(), FloatDType::F32) };
        if t.is_contiguous() && t.layout().start_offset() == 0 { t } else { t.to_contiguous() }
    }

    /// A contiguous boolean tensor's bytes (one byte per value in Flex's bool storage).
    fn bytes_of(t: &FlexTensor) -> FlexTensor {
        if t.is_contiguous() && t.layout().start_offset() == 0 { t.clone() } else { t.to_contiguous() }
    }

    fn slice(t: &FlexTensor) -> &[f32] {
        t.as_slice::<f32>().unwrap_or(&[])
    }

    fn mask_bytes(t: &FlexTensor) -> &[u8] {
        let n = t.shape().num_elements();
        &t.bytes()[..n.min(t.bytes().len())]
    }

    pub(super) fn sum(
        lp: &FlexTensor,
        old: &FlexTensor,
        adv: &FlexTensor,
        mask: &FlexTensor,
        count: &FlexTensor,
        p: &ClipSumParams,
    ) -> FlexTensor {
        let width = lp.shape().dims::<2>()[1];
        let (lp, old, adv, mask, count) = (f32_of(lp), f32_of(old), f32_of(adv), bytes_of(mask), bytes_of(count));
        let out =
            ppo_clip_sum_host(slice(&lp), slice(&old), slice(&adv), mask_bytes(&mask), mask_bytes(&count), width, p);
        FlexTensor::from_data(TensorData::new(out.to_vec(), [out.len()]))
    }

    pub(super) fn backward(
        lp: &FlexTensor,
        old: &FlexTensor,
        adv: &FlexTensor,
        mask: &FlexTensor,
        count: &FlexTensor,
        grad: &FlexTensor,
        p: &ClipSumParams,
    ) -> FlexTensor {
        let [rows, width] = lp.shape().dims::<2>();
        let g = slice(&f32_of(grad)).first().copied().unwrap_or(0.0);
        let (lp, old, adv, mask, count) = (f32_of(lp), f32_of(old), f32_of(adv), bytes_of(mask), bytes_of(count));
        let d = ppo_clip_grad_host(
            slice(&lp),
            slice(&old),
            slice(&adv),
            mask_bytes(&mask),
            mask_bytes(&count),
            width,
            g,
            p,
        );
        FlexTensor::from_data(TensorData::new(d, [rows, width]))
    }
}

/// `vanilla` through the fused operation when it [`applies`]: `Ok(None)` sends the caller to the composed path.
///
/// # Errors
/// As [`crate::ppo_clip::ppo_clip_loss`] and [`crate::aggregate_with_counts`].
pub(crate) fn ppo_clip_aggregated(
    inputs: &PolicyInputs,
    config: &PpoClipConfig,
    mode: AggMode,
    denominators: &GlobalDenominators,
    count_mask: &Tensor<2, Bool>,
) -> Result<Option<AggregatedLoss>> {
    config.validate()?;
    let shape = inputs.validate()?;
    if !applies(&inputs.log_prob, &inputs.old_log_prob, &inputs.advantages) {
        return Ok(None);
    }
    if count_mask.dims() != shape {
        return Err(Error::ShapeMismatch {
            op: "aggregate: count_mask vs loss",
            expected: shape.to_vec(),
            actual: count_mask.dims().to_vec(),
        });
    }
    let (token_factor, seq_factor) = denominators.factors(mode)?;
    let (factor, per_row_mean) = match mode {
        AggMode::TokenMean | AggMode::TokenSum => (token_factor, false),
        AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenSumNorm => (seq_factor, false),
        AggMode::SeqMeanTokenMean => (seq_factor, true),
    };
    let params = ClipSumParams {
        ratio_low: (1.0 - config.clip_ratio_low) as f32,
        ratio_high: (1.0 + config.clip_ratio_high) as f32,
        dual_clip: config.clip_ratio_c.map_or(f32::INFINITY, |c| c as f32),
        factor: factor as f32,
        per_row_mean,
    };
    let out = fused_ppo_clip_sum(
        inputs.log_prob.clone(),
        inputs.old_log_prob.clone(),
        inputs.advantages.clone(),
        &inputs.mask,
        count_mask,
        &params,
    );
    let values = host_vec::<1>("policy metrics", out.clone().detach())?;
    let metrics = match values.as_slice() {
        [_, clip, lower, kl] => PolicyMetrics {
            pg_clipfrac: f64::from(*clip),
            pg_clipfrac_lower: f64::from(*lower),
            ppo_kl: f64::from(*kl),
        },
        other => {
            return Err(Error::DeviceReadback {
                what: "policy metrics",
                reason: format!("{} values, expected {OUTPUTS}", other.len()),
            });
        }
    };
    Ok(Some(AggregatedLoss { loss: out.slice(0..1), metrics }))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};
    use proptest::prelude::*;

    use super::*;
    use crate::aggregation::aggregate_with_counts;
    use crate::ppo_clip::{ppo_clip_loss, ppo_clip_token};
    use crate::{LossContext, PolicyLoss};

    const MODES: [AggMode; 5] = [
        AggMode::TokenMean,
        AggMode::TokenSum,
        AggMode::SeqMeanTokenSum,
        AggMode::SeqMeanTokenSumNorm,
        AggMode::SeqMeanTokenMean,
    ];

    /// A `[rows, width]` case: log-ratios spread over ±25 (past the clamp), signed advantages, ragged masks, NaN on
    /// some padded positions, and a count mask that is a superset of the loss mask.
    struct Case {
        shape: [usize; 2],
        lp: Vec<f32>,
        old: Vec<f32>,
        adv: Vec<f32>,
        mask: Vec<bool>,
        count: Vec<bool>,
    }

    fn case(rows: usize, width: usize, seed: u64) -> Case {
        let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let mut next = move || {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) as f64 / f64::from(1u32 << 31)) as f32
        };
        let n = rows * width;
        let mut c = Case {
            shape: [rows, width],
            lp: Vec::with_capacity(n),
            old: Vec::with_capacity(n),
            adv: Vec::with_capacity(n),
            mask: Vec::with_capacity(n),
            count: Vec::with_capacity(n),
        };
        for i in 0..n {
            let (r, t) = (i / width, i % width);
            let lp = -3.0 * next();
            let scale = if i % 17 == 3 { 25.0 } else { 0.6 };
            c.lp.push(lp);
            c.old.push(lp - scale * (2.0 * next() - 1.0));
            c.adv.push(if r % 3 == 2 { 0.0 } else { 2.0 * next() - 1.0 });
            let len = (r * 7 + 3) % (width + 1);
            c.count.push(t < len);
            c.mask.push(t < len && next() < 0.8);
            if t >= len && t % 2 == 0 {
                *c.lp.last_mut().expect("pushed") = f32::NAN;
            }
        }
        c
    }

    fn floats(v: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
    }

    fn bools(v: &[bool], shape: [usize; 2], device: &Device) -> Tensor<2, Bool> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
    }

    /// `(loss, ∂loss/∂log π, metrics)` through `PolicyLoss::compute` (fused on Flex) or through the composed path.
    fn evaluate(c: &Case, config: &PpoClipConfig, mode: AggMode, fused: bool) -> (f32, Vec<f32>, PolicyMetrics) {
        let device = Device::flex().autodiff();
        let lp = floats(&c.lp, c.shape, &device).require_grad();
        let count = bools(&c.count, c.shape, &device);
        let inputs = PolicyInputs {
            log_prob: lp.clone(),
            old_log_prob: floats(&c.old, c.shape, &device),
            advantages: floats(&c.adv, c.shape, &device),
            mask: bools(&c.mask, c.shape, &device),
        };
        let d = GlobalDenominators { loss_scale_factor: Some(3.0), ..GlobalDenominators::from_tensor_mask(&count) };
        let (loss, metrics) = if fused {
            let ctx = LossContext::new(0, 0).with_count_mask(&count);
            let out = PolicyLoss::Vanilla(*config).compute(&inputs, mode, &d, &ctx).expect("valid");
            (out.loss, out.metrics)
        } else {
            let t = ppo_clip_loss(&inputs, config).expect("valid");
            (aggregate_with_counts(t.loss, &inputs.mask, &count, mode, &d).expect("valid"), t.metrics)
        };
        let value = loss.clone().into_scalar();
        let grads = loss.backward();
        let g = lp.grad(&grads).map(|g| g.into_data().try_into_vec_as::<f32>().expect("f32")).expect("a gradient");
        (value, g, metrics)
    }

    #[test]
    fn the_fused_operation_equals_the_composed_path_in_values_gradients_and_metrics() {
        let device = Device::flex().autodiff();
        assert!(applies(
            &Tensor::zeros([1, 1], &device),
            &Tensor::zeros([1, 1], &device),
            &Tensor::zeros([1, 1], &device)
        ));
        let configs = [
            PpoClipConfig::default(),
            PpoClipConfig::clip_higher(),
            PpoClipConfig { clip_ratio_c: None, ..PpoClipConfig::default() },
        ];
        for (seed, (rows, width)) in [(5usize, 9usize), (64, 1100), (3, 1)].into_iter().enumerate() {
            let c = case(rows, width, seed as u64);
            for config in &configs {
                for mode in MODES {
                    let (fl, fg, fm) = evaluate(&c, config, mode, true);
                    let (cl, cg, cm) = evaluate(&c, config, mode, false);
                    let what = format!("{rows}x{width} {config:?} {mode:?}");
                    assert!((fl - cl).abs() <= 2e-5 * cl.abs().max(1.0), "{what}: loss {fl} vs {cl}");
                    for (i, (a, b)) in fg.iter().zip(&cg).enumerate() {
                        assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{what}: grad[{i}] {a} vs {b}");
                    }
                    for (a, b) in [
                        (fm.pg_clipfrac, cm.pg_clipfrac),
                        (fm.pg_clipfrac_lower, cm.pg_clipfrac_lower),
                        (fm.ppo_kl, cm.ppo_kl),
                    ] {
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: metrics {fm:?} vs {cm:?}");
                    }
                }
            }
            assert!(cg_nonzero(&c), "the case exercises every branch");
        }
    }

    /// The case has unclipped, clipped, dual-clipped and clamped tokens.
    fn cg_nonzero(c: &Case) -> bool {
        let cfg = PpoClipConfig::default();
        let (mut clipped, mut dual, mut plain, mut clamped) = (false, false, false, false);
        for i in 0..c.lp.len() {
            if c.mask[i] {
                let lr = f64::from(c.lp[i] - c.old[i]);
                let (_, cl, du) = ppo_clip_token(lr, f64::from(c.adv[i]), &cfg);
                clipped |= cl;
                dual |= du;
                plain |= !cl && !du && c.adv[i] != 0.0;
                clamped |= lr.abs() > 20.0;
            }
        }
        c.lp.len() < 100 || (clipped && dual && plain && clamped)
    }

    #[test]
    fn hand_computed_tokens() {
        // One row, token-sum: the loss is the sum of the test-vector tokens; the gradient is −A·r on the unclipped
        // branch (r = 1.1, A = 1 → −1.1; r = 0.5, A = 1 → −0.5; r = 1.5, A = −1 → 1.5) and 0 where the clip
        // (r = 1.5, A = 1; r = 0.5, A = −1) or the dual clip (r = 4, A = −1) acts.
        let r = [1.5f32, 1.1, 0.5, 0.5, 1.5, 4.0];
        let a = [1.0f32, 1.0, 1.0, -1.0, -1.0, -1.0];
        let lp: Vec<f32> = r.iter().map(|r| r.ln()).collect();
        let old = vec![0.0f32; 6];
        let mask = [1u8; 6];
        let p = ClipSumParams { ratio_low: 0.8, ratio_high: 1.28, dual_clip: 3.0, factor: 1.0, per_row_mean: false };
        let [loss, clipfrac, lower, kl] = ppo_clip_sum_host(&lp, &old, &a, &mask, &mask, 6, &p);
        let expected = -1.28 - 1.1 - 0.5 + 0.8 + 1.5 + 3.0;
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
        assert!((clipfrac - 2.0 / 6.0).abs() < 1e-7 && (lower - 1.0 / 6.0).abs() < 1e-7, "{clipfrac} {lower}");
        let mean_log_r: f32 = lp.iter().sum::<f32>() / 6.0;
        assert!((kl + mean_log_r).abs() < 1e-6);
        let g = ppo_clip_grad_host(&lp, &old, &a, &mask, &mask, 6, 2.0, &p);
        let expected = [0.0, -2.2, -1.0, 0.0, 3.0, 0.0];
        for (x, y) in g.iter().zip(expected) {
            assert!((x - y).abs() < 1e-5, "{g:?}");
        }
        // Per-row mean: two rows of three, row 0's count mask has three tokens, row 1's loss mask one of three.
        let mask = [1u8, 1, 1, 0, 0, 1];
        let p = ClipSumParams { per_row_mean: true, factor: 0.5, ..p };
        let [loss, ..] = ppo_clip_sum_host(&lp, &old, &a, &mask, &[1, 1, 1, 1, 1, 1], 3, &p);
        let expected = 0.5 * ((-1.28 - 1.1 - 0.5) / 3.0 + 3.0 / 3.0);
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_split() {
        // 128 × 1024 tokens take the threaded path; one row at a time is the sequential reference.
        let c = case(128, 1024, 9);
        let mask: Vec<u8> = c.mask.iter().map(|&m| u8::from(m)).collect();
        let count: Vec<u8> = c.count.iter().map(|&m| u8::from(m)).collect();
        let p = ClipSumParams { ratio_low: 0.8, ratio_high: 1.2, dual_clip: 3.0, factor: 0.01, per_row_mean: true };
        let all = ppo_clip_sum_host(&c.lp, &c.old, &c.adv, &mask, &count, 1024, &p);
        let rows = sum_rows(&c.lp, &c.old, &c.adv, &mask, &count, 1024, &p);
        let mut acc = [0.0f64; 5];
        for row in &rows {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        assert_eq!(all[0], acc[0] as f32, "bitwise equal to the in-order row sum");
        let g = ppo_clip_grad_host(&c.lp, &c.old, &c.adv, &mask, &count, 1024, 1.0, &p);
        let mut one = vec![0.0; g.len()];
        grad_rows(&c.lp, &c.old, &c.adv, &mask, &count, 1024, 1.0, &p, &mut one);
        assert_eq!(g, one);
    }

    proptest! {
        /// The fused sum equals the f64 token reference aggregated by hand, and padding gets no gradient.
        #[test]
        fn the_fused_sum_matches_the_f64_reference(rows in 1usize..6, width in 1usize..40, seed in 0u64..1000) {
            let c = case(rows, width, seed);
            let mask: Vec<u8> = c.mask.iter().map(|&m| u8::from(m)).collect();
            let cfg = PpoClipConfig::clip_higher();
            let p = ClipSumParams { ratio_low: 0.8, ratio_high: 1.28, dual_clip: 3.0, factor: 1.0, per_row_mean: false };
            let [loss, ..] = ppo_clip_sum_host(&c.lp, &c.old, &c.adv, &mask, &mask, width, &p);
            let reference: f64 = (0..c.lp.len())
                .filter(|&i| c.mask[i])
                .map(|i| ppo_clip_token(f64::from(c.lp[i] - c.old[i]), f64::from(c.adv[i]), &cfg).0)
                .sum();
            prop_assert!((f64::from(loss) - reference).abs() <= 1e-4 * reference.abs().max(1.0), "{} vs {}", loss, reference);
            let g = ppo_clip_grad_host(&c.lp, &c.old, &c.adv, &mask, &mask, width, 1.0, &p);
            prop_assert!(g.iter().zip(&c.mask).all(|(g, m)| *m || *g == 0.0));
            prop_assert!(g.iter().all(|g| g.is_finite()));
        }
    }

    #[test]
    fn only_f32_inputs_on_the_cpu_backend_are_fused() {
        let device = Device::flex();
        let f = Tensor::<2>::zeros([2, 2], &device);
        let half = f.clone().cast(burn::tensor::FloatDType::F16);
        assert!(applies(&f, &f, &f));
        assert!(!applies(&half, &f, &f) && !applies(&f, &f, &half), "f16 goes to the composed path");
    }
}
