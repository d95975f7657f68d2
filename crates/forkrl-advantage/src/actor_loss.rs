//! The actor objective of one micro-batch, as verl's `dp_actor.update_policy` assembles it:
//!
//! ```text
//! loss = pg_loss − entropy_coeff · agg(H) + kl_loss_coef · agg(kl(log π, log π_ref))
//! ```
//!
//! with the same aggregation mode for the three terms (verl applies `agg_loss` with the actor's `loss_agg_mode` to the
//! entropy and the KL too). The entropy and KL terms use the policy loss's mask and denominators unless the
//! [`LossContext`] carries a regularizer mask: the official 80/20 code applies the top-entropy mask to the
//! policy-gradient term alone and aggregates entropy and KL over the full response mask. `entropy_coeff` defaults to 0 and the KL loss to off, as in
//! every RLVR recipe of the methods reference. The entropy passed in must come from the same temperature-scaled
//! logits as the log-probs (methods README decision 1); pass it with gradient only when `entropy_coeff ≠ 0`.

use burn::tensor::{FloatDType, Tensor};
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
    let (reg_mask, reg_denominators) = ctx.regularizer.unwrap_or((&inputs.mask, denominators));
    if reg_mask.dims() != inputs.mask.dims() {
        return Err(Error::ShapeMismatch {
            op: "actor loss: regularizer mask vs loss mask",
            expected: inputs.mask.dims().to_vec(),
            actual: reg_mask.dims().to_vec(),
        });
    }
    let entropy = match entropy {
        Some(h) => {
            let agg = aggregate(h, reg_mask, mode, reg_denominators)?;
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
            let pad = reg_mask.clone().bool_not();
            // In f32, as the policy loss (`PolicyInputs`' f16 / bf16 log-probs are cast there too; a no-op for f32).
            let per_token = kl_penalty(
                inputs.log_prob.clone().cast(FloatDType::F32).mask_fill(pad.clone(), 0.0),
                reference.cast(FloatDType::F32).mask_fill(pad, 0.0),
                kl.kl_loss_type,
            );
            let agg = aggregate(per_token, reg_mask, mode, reg_denominators)?;
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

#[cfg(test)]
mod tests {
    use burn::tensor::{Bool, Device, TensorData};

    use super::*;
    use crate::{PpoClipConfig, aggregate_host_with_counts};

    /// One row of four response tokens; the forking mask keeps tokens 1 and 3; on-policy (`r = 1`).
    fn case(device: &Device) -> (PolicyInputs, Tensor<2>, Tensor<2, Bool>) {
        let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [2, 4]), device);
        let lp = vec![-0.5, -1.0, -1.5, -2.0, -0.1, -0.2, -0.3, -0.4];
        let inputs = PolicyInputs {
            log_prob: t(lp.clone()),
            old_log_prob: t(lp),
            advantages: t(vec![1.0; 8]),
            mask: Tensor::from_data(
                TensorData::new(vec![false, true, false, true, true, false, false, false], [2, 4]),
                device,
            ),
        };
        let entropy = t(vec![0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0, 0.0]);
        let response =
            Tensor::from_data(TensorData::new(vec![true, true, true, true, true, true, true, false], [2, 4]), device);
        (inputs, entropy, response)
    }

    #[test]
    fn entropy_is_aggregated_over_the_regularizer_mask_when_given() {
        let device = Device::flex();
        let (inputs, entropy, response) = case(&device);
        let config = ActorLossConfig {
            policy_loss: PolicyLoss::Vanilla(PpoClipConfig::default()),
            loss_agg_mode: AggMode::TokenMean,
            entropy_coeff: 0.5,
            kl_loss: None,
        };
        let selected = GlobalDenominators::from_tensor_mask(&inputs.mask);
        let full = GlobalDenominators::from_tensor_mask(&response);
        let masked = actor_loss(&config, &inputs, Some(entropy.clone()), None, &selected, &LossContext::new(0, 0))
            .expect("valid");
        // Old behaviour: the entropy of the three selected tokens (0.2, 0.4, 1.0).
        assert!((masked.entropy.expect("given") - 1.6 / 3.0).abs() < 1e-6);
        let ctx = LossContext::new(0, 0).with_regularizer(&response, &full);
        let official = actor_loss(&config, &inputs, Some(entropy), None, &selected, &ctx).expect("valid");
        // The official 80/20 code: over all seven response tokens.
        assert!((official.entropy.expect("given") - 7.0 / 7.0).abs() < 1e-6, "{:?}", official.entropy);
        assert!((official.pg_loss - masked.pg_loss).abs() < 1e-9, "the policy-gradient term is unchanged");
    }

    #[test]
    fn count_mask_divides_each_sequence_by_its_response_length() {
        let device = Device::flex();
        let (inputs, _, response) = case(&device);
        let config = ActorLossConfig { loss_agg_mode: AggMode::SeqMeanTokenMean, ..ActorLossConfig::default() };
        // The all-token denominators of the forking mask: sequences and counts of the response mask.
        let d = GlobalDenominators::from_tensor_mask(&response);
        let ctx = LossContext::new(0, 0).with_count_mask(&response);
        let out = actor_loss(&config, &inputs, None, None, &d, &ctx).expect("valid");
        // On-policy PPO: per-token loss −A·r = −1 on the selected tokens. Row 0: −2 / 4; row 1: −1 / 3; mean of 2 rows.
        let expected = (-2.0 / 4.0 + -1.0 / 3.0) / 2.0;
        assert!((out.pg_loss - expected).abs() < 1e-6, "{} vs {expected}", out.pg_loss);
        let host = aggregate_host_with_counts(
            &[-1.0; 8],
            &[false, true, false, true, true, false, false, false],
            &[true, true, true, true, true, true, true, false],
            4,
            AggMode::SeqMeanTokenMean,
            &d,
        )
        .expect("valid");
        assert!((out.pg_loss - host).abs() < 1e-6, "tensor path equals the host reference");
        let plain = actor_loss(&config, &inputs, None, None, &d, &LossContext::new(0, 0)).expect("valid");
        assert!((plain.pg_loss - (-1.0 - 1.0) / 2.0).abs() < 1e-6, "without it: per selected token");
    }
}
