//! Shared inputs and outputs of the policy losses, and [`PolicyLoss`]: one serde config that picks any of them
//! (verl's `policy_loss.loss_mode` registry).
//!
//! Sign convention: every function returns a **loss to minimise** (verl's convention). Stop-gradients follow
//! `../shared/methods/policy-losses.md` §10: `log π_old`, advantages and every selection mask are constants.

use burn::tensor::{Bool, Tensor};
use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::aggregation::{AggMode, GlobalDenominators, aggregate, aggregate_sequences};
use crate::{cispo, clip_cov, gmpo, gspo, holder, kl_cov, ppo_clip};

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
    /// `log π_old` and `Â` are detached.
    pub(crate) fn sanitized(&self) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let pad = self.mask.clone().bool_not();
        (
            self.log_prob.clone().mask_fill(pad.clone(), 0.0),
            self.old_log_prob.clone().detach().mask_fill(pad.clone(), 0.0),
            self.advantages.clone().detach().mask_fill(pad, 0.0),
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

/// Which policy loss (verl `loss_mode` names in serde) and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "loss_mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyLoss {
    /// PPO clip with clip-higher and dual clip (verl `vanilla`).
    Vanilla(ppo_clip::PpoClipConfig),
    /// GSPO / GSPO-token (verl `gspo`); aggregation is forced to `seq-mean-token-mean`.
    Gspo(gspo::GspoConfig),
    /// CISPO (verl `cispo`).
    Cispo(cispo::CispoConfig),
    /// GMPO (verl `geo_mean`); a per-sequence loss.
    GeoMean(gmpo::GmpoConfig),
    /// Clip-Cov (verl `clip_cov`).
    ClipCov(clip_cov::ClipCovConfig),
    /// KL-Cov (verl `kl_cov`).
    KlCov(kl_cov::KlCovConfig),
    /// HölderPO (`holder`, `sequence_w_clip`, `holder_token`); a per-sequence loss.
    Holder(holder::HolderConfig),
}

impl Default for PolicyLoss {
    fn default() -> Self {
        PolicyLoss::Vanilla(ppo_clip::PpoClipConfig::default())
    }
}

/// The aggregated policy loss of a micro-batch.
#[derive(Debug, Clone)]
pub struct AggregatedLoss {
    /// Scalar loss `[1]`, already divided by the global denominators.
    pub loss: Tensor<1>,
    /// Clip statistics.
    pub metrics: PolicyMetrics,
}

impl PolicyLoss {
    /// verl's name of the loss mode.
    pub fn name(&self) -> &'static str {
        match self {
            PolicyLoss::Vanilla(_) => "vanilla",
            PolicyLoss::Gspo(_) => "gspo",
            PolicyLoss::Cispo(_) => "cispo",
            PolicyLoss::GeoMean(_) => "geo_mean",
            PolicyLoss::ClipCov(_) => "clip_cov",
            PolicyLoss::KlCov(_) => "kl_cov",
            PolicyLoss::Holder(_) => "holder",
        }
    }

    /// Evaluates the loss and aggregates it. Token losses use `mode`, except GSPO, which forces
    /// `seq-mean-token-mean`; sequence losses (GMPO, Hölder) are averaged over the global non-empty sequence count.
    /// `step` is the learner update step (Hölder's p schedule); `seed` feeds Clip-Cov's random subset.
    ///
    /// # Errors
    /// The errors of the chosen loss and of the aggregation.
    pub fn compute(
        &self,
        inputs: &PolicyInputs,
        mode: AggMode,
        denominators: &GlobalDenominators,
        step: u64,
        seed: u64,
    ) -> Result<AggregatedLoss> {
        let token = |t: TokenLoss, mode: AggMode| -> Result<AggregatedLoss> {
            Ok(AggregatedLoss { loss: aggregate(t.loss, &inputs.mask, mode, denominators)?, metrics: t.metrics })
        };
        let sequence = |s: SequenceLoss| -> Result<AggregatedLoss> {
            Ok(AggregatedLoss { loss: aggregate_sequences(s.loss, &s.nonempty, denominators)?, metrics: s.metrics })
        };
        match self {
            PolicyLoss::Vanilla(c) => token(ppo_clip::ppo_clip_loss(inputs, c)?, mode),
            PolicyLoss::Gspo(c) => token(gspo::gspo_loss(inputs, c)?, AggMode::SeqMeanTokenMean),
            PolicyLoss::Cispo(c) => token(cispo::cispo_loss(inputs, c)?, mode),
            PolicyLoss::ClipCov(c) => token(clip_cov::clip_cov_loss(inputs, c, seed)?, mode),
            PolicyLoss::KlCov(c) => token(kl_cov::kl_cov_loss(inputs, c)?, mode),
            PolicyLoss::GeoMean(c) => sequence(gmpo::gmpo_loss(inputs, c)?),
            PolicyLoss::Holder(c) => sequence(holder::holder_loss(inputs, c, c.schedule.p_at(step))?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_config_with_verl_names() {
        #[derive(Debug, Deserialize)]
        struct Cfg {
            policy_loss: PolicyLoss,
        }
        let text = "[policy_loss]\nloss_mode = \"holder\"\nvariant = \"holder\"\nclip_epsilon = 0.2\n\
                    schedule = { kind = \"linear_dec\", p_min = -2.0, p_max = 2.0, steps = 500 }\n";
        let cfg: Cfg = toml::from_str(text).expect("the documented example parses");
        assert_eq!(cfg.policy_loss, PolicyLoss::Holder(holder::HolderConfig::default()));
        let cispo: Cfg = toml::from_str("[policy_loss]\nloss_mode = \"cispo\"\neps_high = 4.0").expect("valid");
        assert_eq!(cispo.policy_loss.name(), "cispo");
        assert!(toml::from_str::<Cfg>("[policy_loss]\nloss_mode = \"vanilla\"\nclip_ratio = 0.2").is_err());
        assert!(toml::from_str::<Cfg>("[policy_loss]\nloss_mode = \"cispo\"").is_err(), "eps_high is required");
        assert!(toml::from_str::<Cfg>("[policy_loss]\nloss_mode = \"ppo\"").is_err());
    }
}
