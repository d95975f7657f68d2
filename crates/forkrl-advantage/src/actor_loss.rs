//! The actor objective of one micro-batch, as verl's `dp_actor.update_policy` assembles it:
//!
//! ```text
//! loss = pg_loss − entropy_coeff · agg(H) + kl_loss_coef · agg(kl(log π, log π_ref))
//! ```
//!
//! with the same aggregation mode and global denominators for the three terms (verl applies `agg_loss` with the
//! actor's `loss_agg_mode` to the entropy and the KL too). `entropy_coeff` defaults to 0 and the KL loss to off, as in
//! every RLVR recipe of the methods reference. The entropy passed in must come from the same temperature-scaled
//! logits as the log-probs (methods README decision 1); pass it with gradient only when `entropy_coeff ≠ 0`.

use burn::tensor::Tensor;
use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::{
    aggregation::{AggMode, GlobalDenominators, aggregate},
    kl::{KlLossConfig, kl_penalty},
    loss_types::{LossContext, PolicyInputs, PolicyMetrics, host_vec},
    policy_loss::PolicyLoss,
};

/// The actor objective's settings (verl names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorLossConfig {
    /// The policy loss.
    pub policy_loss: PolicyLoss,
    /// Aggregation of token losses (`token-mean` by default, as verl).
    pub loss_agg_mode: AggMode,
    /// Entropy bonus coefficient (0).
    pub entropy_coeff: f64,
    /// KL loss to a reference policy (`None` = off).
    pub kl_loss: Option<KlLossConfig>,
}

impl Default for ActorLossConfig {
    fn default() -> Self {
        Self {
            policy_loss: PolicyLoss::default(),
            loss_agg_mode: AggMode::TokenMean,
            entropy_coeff: 0.0,
            kl_loss: None,
        }
    }
}

impl ActorLossConfig {
    /// Checks every part once, where a configuration is built.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter: the policy loss's, a non-finite `entropy_coeff`, a negative
    /// or non-finite `kl_loss_coef`.
    pub fn validate(&self) -> Result<()> {
        self.policy_loss.validate()?;
        if !self.entropy_coeff.is_finite() {
            return Err(Error::invalid_parameter("entropy_coeff", self.entropy_coeff, "must be finite"));
        }
        if let Some(kl) = self.kl_loss.filter(|kl| !(kl.kl_loss_coef.is_finite() && kl.kl_loss_coef >= 0.0)) {
            return Err(Error::invalid_parameter("kl_loss_coef", kl.kl_loss_coef, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// The objective and its parts (the parts are host numbers for logging: `actor/pg_loss`, `actor/entropy`,
/// `actor/kl_loss`).
#[derive(Debug, Clone)]
pub struct ActorLoss {
    /// Scalar `[1]` to call `backward` on.
    pub loss: Tensor<1>,
    /// `actor/pg_loss`.
    pub pg_loss: f64,
    /// `actor/entropy` (aggregated like the loss); `None` when no entropy was passed.
    pub entropy: Option<f64>,
    /// `actor/kl_loss`; `None` when the KL loss is off.
    pub kl_loss: Option<f64>,
    /// Clip statistics.
    pub metrics: PolicyMetrics,
}

/// Computes the actor objective. `entropy` (`[B, T]`) is needed when `entropy_coeff ≠ 0` and logged when given;
/// `ref_log_prob` is needed when the KL loss is on; `ctx` carries the step, the seed and the optional per-token inputs
/// of the policy loss.
///
/// # Errors
/// [`Error::InvalidParameter`] for a missing entropy or reference log-prob, or a non-finite coefficient; the errors of
/// the policy loss and the aggregation.
pub fn actor_loss(
    config: &ActorLossConfig,
    inputs: &PolicyInputs,
    entropy: Option<Tensor<2>>,
    ref_log_prob: Option<Tensor<2>>,
    denominators: &GlobalDenominators,
    ctx: &LossContext<'_>,
) -> Result<ActorLoss> {
    if !config.entropy_coeff.is_finite() {
        return Err(Error::invalid_parameter("entropy_coeff", config.entropy_coeff, "must be finite"));
    }
    let mode = config.loss_agg_mode;
    let pg = config.policy_loss.compute(inputs, mode, denominators, ctx)?;
    let scalar = |t: &Tensor<1>, what| -> Result<f64> {
        Ok(host_vec(what, t.clone().detach())?.first().copied().map_or(f64::NAN, f64::from))
    };
    let pg_loss = scalar(&pg.loss, "pg_loss")?;
    let mut loss = pg.loss;
    let entropy = match entropy {
        Some(h) => {
            let agg = aggregate(h, &inputs.mask, mode, denominators)?;
            let value = scalar(&agg, "entropy")?;
            if config.entropy_coeff != 0.0 {
                loss = loss - agg.mul_scalar(config.entropy_coeff);
            }
            Some(value)
        }
        None if config.entropy_coeff != 0.0 => {
            return Err(Error::invalid_parameter("entropy", "None", "entropy_coeff != 0 needs the token entropy"));
        }
        None => None,
    };
    let kl_loss = match (config.kl_loss, ref_log_prob) {
        (Some(kl), Some(reference)) => {
            if !kl.kl_loss_coef.is_finite() {
                return Err(Error::invalid_parameter("kl_loss_coef", kl.kl_loss_coef, "must be finite"));
            }
            let per_token = kl_penalty(
                inputs.log_prob.clone().mask_fill(inputs.mask.clone().bool_not(), 0.0),
                reference.mask_fill(inputs.mask.clone().bool_not(), 0.0),
                kl.kl_loss_type,
            );
            let agg = aggregate(per_token, &inputs.mask, mode, denominators)?;
            let value = scalar(&agg, "kl_loss")?;
            loss = loss + agg.mul_scalar(kl.kl_loss_coef);
            Some(value)
        }
        (Some(_), None) => {
            return Err(Error::invalid_parameter(
                "ref_log_prob",
                "None",
                "the KL loss needs the reference policy's log-probs",
            ));
        }
        (None, _) => None,
    };
    Ok(ActorLoss { loss, pg_loss, entropy, kl_loss, metrics: pg.metrics })
}
