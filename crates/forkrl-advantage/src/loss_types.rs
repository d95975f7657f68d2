//! The shared vocabulary of the policy losses: their inputs ([`PolicyInputs`]), their outputs ([`TokenLoss`],
//! [`SequenceLoss`], [`PolicyMetrics`]), the [`LossContext`] some losses read, and the host read-back helpers. Every
//! loss file depends on this module and none on [`crate::policy_loss`], which picks among them.
//!
//! Sign convention: every loss is a **loss to minimise** (verl's convention). Stop-gradients follow
//! `../shared/methods/policy-losses.md` §10: `log π_old`, advantages and every selection mask are constants.

use burn::tensor::{Bool, FloatDType, Tensor};
use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::htpo::HtpoTokenGroups;

/// Token log-ratios are clamped to `[−LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]` before `exp` (verl).
pub const LOG_RATIO_CLAMP: f32 = 20.0;

/// The per-token inputs of a policy loss, all `[B, T]`.
#[derive(Debug, Clone)]
pub struct PolicyInputs {
    /// `log π_θ` of the sampled tokens (differentiable).
    pub log_prob: Tensor<2>,
    /// `log π_old` (constant).
    pub old_log_prob: Tensor<2>,
    /// Per-token advantages `Â_{i,t}` (constant; token weighting already applied).
    pub advantages: Tensor<2>,
    /// Loss mask (response tokens, possibly intersected with a forking mask).
    pub mask: Tensor<2, Bool>,
}

impl PolicyInputs {
    /// Checks that the four tensors share one `[B, T]` shape.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming the first tensor whose shape differs from `log_prob`'s.
    pub fn validate(&self) -> Result<[usize; 2]> {
        let shape = self.log_prob.dims();
        for (op, dims) in [
            ("policy loss: old_log_prob vs log_prob", self.old_log_prob.dims()),
            ("policy loss: advantages vs log_prob", self.advantages.dims()),
            ("policy loss: mask vs log_prob", self.mask.dims()),
        ] {
            if dims != shape {
                return Err(Error::ShapeMismatch { op, expected: shape.to_vec(), actual: dims.to_vec() });
            }
        }
        Ok(shape)
    }

    /// `(log π, log π_old, Â)` with padded positions set to 0 before any arithmetic (decision 4: `0 · NaN = NaN`).
    /// `log π_old` and `Â` are detached. All three in f32: f16 / bf16 inputs are cast first (as verl computes its
    /// losses on f32 log-probs; the masks' indicators the losses multiply by are f32, and burn does not promote
    /// mixed dtypes); the gradient reaches an f16 / bf16 `log π` through the cast.
    pub(crate) fn sanitized(&self) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let pad = self.mask.clone().bool_not();
        let f32 = FloatDType::F32; // `cast` is a no-op for f32 tensors
        (
            self.log_prob.clone().cast(f32).mask_fill(pad.clone(), 0.0),
            self.old_log_prob.clone().detach().cast(f32).mask_fill(pad.clone(), 0.0),
            self.advantages.clone().detach().cast(f32).mask_fill(pad, 0.0),
        )
    }

    /// `(log π, log r = clamp(log π − log π_old, ±20), Â)` on the sanitised inputs.
    pub(crate) fn log_ratio(&self) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let (lp, old, adv) = self.sanitized();
        (lp.clone(), (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), adv)
    }
}

/// verl's actor metrics of one loss evaluation (masked token means over the micro-batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyMetrics {
    /// `actor/pg_clipfrac`: fraction of loss tokens the clip (or the method's selection) acted on.
    pub pg_clipfrac: f64,
    /// `actor/pg_clipfrac_lower`: fraction of loss tokens where the dual clip (or the lower clip) binds.
    pub pg_clipfrac_lower: f64,
    /// `actor/ppo_kl`: masked mean of `log π_old − log π`.
    pub ppo_kl: f64,
}

/// A per-token loss `[B, T]` (to be aggregated) with its metrics.
#[derive(Debug, Clone)]
pub struct TokenLoss {
    /// Per-token loss, 0 on padding.
    pub loss: Tensor<2>,
    /// Clip statistics.
    pub metrics: PolicyMetrics,
}

/// A per-sequence loss `[B]` (GMPO, Hölder) with its metrics.
#[derive(Debug, Clone)]
pub struct SequenceLoss {
    /// Per-sequence loss, 0 for empty responses.
    pub loss: Tensor<1>,
    /// `true` for sequences with at least one loss token.
    pub nonempty: Tensor<1, Bool>,
    /// Clip statistics.
    pub metrics: PolicyMetrics,
}

/// Masked means of two `[B, T]` indicator tensors and of `−log r`, read back in one transfer.
pub(crate) fn metrics(
    mask: &Tensor<2, Bool>,
    clip: Tensor<2, Bool>,
    lower: Tensor<2, Bool>,
    log_ratio: &Tensor<2>,
) -> Result<PolicyMetrics> {
    let m = mask.clone().float();
    let n = m.clone().sum().clamp_min(1.0);
    let mean = |x: Tensor<2>| (x * m.clone()).sum() / n.clone();
    let stacked = Tensor::cat(vec![mean(clip.float()), mean(lower.float()), mean(log_ratio.clone().detach().neg())], 0);
    match host_vec::<1>("policy metrics", stacked.detach())?.as_slice() {
        [a, b, c] => Ok(PolicyMetrics { pg_clipfrac: *a as f64, pg_clipfrac_lower: *b as f64, ppo_kl: *c as f64 }),
        other => {
            Err(Error::DeviceReadback { what: "policy metrics", reason: format!("{} values, expected 3", other.len()) })
        }
    }
}

/// An all-false mask of the shape of `mask`.
pub(crate) fn no_tokens(mask: &Tensor<2, Bool>) -> Tensor<2, Bool> {
    mask.clone().bool_and(mask.clone().bool_not())
}

/// Reads a float tensor back as `f32`.
pub(crate) fn host_vec<const D: usize>(what: &'static str, t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec_as::<f32>().map_err(|e| Error::DeviceReadback { what, reason: format!("{e:?}") })
}

/// Reads a boolean tensor back.
pub(crate) fn host_mask(what: &'static str, t: &Tensor<2, Bool>) -> Result<Vec<bool>> {
    let ints = t.clone().int().into_data().try_into_vec_as::<i64>();
    Ok(ints
        .map_err(|e| Error::DeviceReadback { what, reason: format!("{e:?}") })?
        .into_iter()
        .map(|v| v != 0)
        .collect())
}

/// A `[B, T]` boolean tensor from host values.
pub(crate) fn mask_tensor(values: Vec<bool>, shape: [usize; 2], device: &burn::tensor::Device) -> Tensor<2, Bool> {
    Tensor::from_data(burn::tensor::TensorData::new(values, shape), device)
}

/// What a loss may read besides its per-token tensors: the learner step (Hölder's p schedule), the seed of its random
/// choices (Clip-Cov's subset), and per-token inputs that only some setups need: HTPO's token groups, the count mask of
/// `seq-mean-token-mean` under the forking mask's all-token denominator, and the mask and denominators of the entropy
/// bonus and the KL loss when they differ from the policy-gradient term's (the official 80/20 code masks the policy
/// gradient alone). Build it with [`LossContext::new`] and add the optional parts with the `with_*` methods.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossContext<'a> {
    /// The learner update step (0-based as verl counts it for Hölder's schedule).
    pub step: u64,
    /// Seed of the loss's random choices for this call.
    pub seed: u64,
    /// HTPO's token groups over the same `[B, T]` tokens as the inputs; required by [`crate::PolicyLoss::Htpo`].
    pub htpo_groups: Option<&'a HtpoTokenGroups>,
    /// `[B, T]` mask whose per-sequence counts divide `seq-mean-token-mean` (numerators stay over
    /// [`PolicyInputs::mask`]); `None`: the loss mask itself ([`crate::aggregate_with_counts`]).
    pub count_mask: Option<&'a Tensor<2, Bool>>,
    /// Mask and global denominators of the entropy bonus and the KL loss; `None`: the policy loss's.
    pub regularizer: Option<(&'a Tensor<2, Bool>, &'a crate::GlobalDenominators)>,
}

impl<'a> LossContext<'a> {
    /// A context with no optional inputs.
    pub fn new(step: u64, seed: u64) -> Self {
        Self { step, seed, htpo_groups: None, count_mask: None, regularizer: None }
    }

    /// Adds HTPO's token groups.
    #[must_use]
    pub fn with_htpo_groups(mut self, groups: &'a HtpoTokenGroups) -> Self {
        self.htpo_groups = Some(groups);
        self
    }

    /// Sets the per-sequence count mask of `seq-mean-token-mean` (the forking mask's `all_tokens` denominator).
    #[must_use]
    pub fn with_count_mask(mut self, count_mask: &'a Tensor<2, Bool>) -> Self {
        self.count_mask = Some(count_mask);
        self
    }

    /// Aggregates the entropy bonus and the KL loss over `mask` with `denominators` (e.g. the full response mask
    /// while the policy gradient is forking-masked, as the official 80/20 code does).
    #[must_use]
    pub fn with_regularizer(mut self, mask: &'a Tensor<2, Bool>, denominators: &'a crate::GlobalDenominators) -> Self {
        self.regularizer = Some((mask, denominators));
        self
    }
}
