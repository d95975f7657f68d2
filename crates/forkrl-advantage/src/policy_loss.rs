//! [`PolicyLoss`]: one serde config that picks any policy loss (verl's `policy_loss.loss_mode` registry), HTPO
//! included. The inputs and outputs the losses share are in [`crate::loss_types`].

use burn::tensor::Tensor;
use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::aggregation::{AggMode, GlobalDenominators, aggregate_sequences, aggregate_with_counts};
use crate::loss_types::{LossContext, PolicyInputs, PolicyMetrics, SequenceLoss, TokenLoss};
use crate::{cispo, clip_cov, gmpo, gspo, holder, htpo, kl_cov, ppo_clip, ppo_clip_op};

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
    /// HTPO's hierarchical token-level loss (`htpo`); aggregation is forced to `token-mean` (the official code), and
    /// the [`LossContext`] must carry the token groups (`crate::htpo_token_groups` over the same tokens).
    Htpo(htpo::HtpoConfig),
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
            PolicyLoss::Htpo(_) => "htpo",
        }
    }

    /// Checks the parameters once, where a configuration is built (the loss functions check again for direct
    /// callers).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        match self {
            PolicyLoss::Vanilla(c) => c.validate(),
            PolicyLoss::Gspo(c) => c.validate(),
            PolicyLoss::Cispo(c) => c.validate(),
            PolicyLoss::GeoMean(c) => c.validate(),
            PolicyLoss::ClipCov(c) => c.validate(),
            PolicyLoss::KlCov(c) => c.validate(),
            PolicyLoss::Holder(c) => c.validate(),
            PolicyLoss::Htpo(c) => c.validate(),
        }
    }

    /// Evaluates the loss and aggregates it. Token losses use `mode`, except GSPO, which forces
    /// `seq-mean-token-mean`; sequence losses (GMPO, Hölder) are averaged over the global non-empty sequence count.
    /// HTPO forces `token-mean`. `ctx.step` is the learner update step (Hölder's p schedule); `ctx.seed` feeds
    /// Clip-Cov's random subset; `ctx.htpo_groups` is HTPO's partition; `ctx.count_mask` gives the per-sequence counts
    /// of `seq-mean-token-mean`.
    ///
    /// # Errors
    /// The errors of the chosen loss and of the aggregation; [`Error::InvalidParameter`] for HTPO without its token
    /// groups.
    pub fn compute(
        &self,
        inputs: &PolicyInputs,
        mode: AggMode,
        denominators: &GlobalDenominators,
        ctx: &LossContext<'_>,
    ) -> Result<AggregatedLoss> {
        let token = |t: TokenLoss, mode: AggMode| -> Result<AggregatedLoss> {
            let counts = ctx.count_mask.unwrap_or(&inputs.mask);
            let loss = aggregate_with_counts(t.loss, &inputs.mask, counts, mode, denominators)?;
            Ok(AggregatedLoss { loss, metrics: t.metrics })
        };
        let sequence = |s: SequenceLoss| -> Result<AggregatedLoss> {
            Ok(AggregatedLoss { loss: aggregate_sequences(s.loss, &s.nonempty, denominators)?, metrics: s.metrics })
        };
        match self {
            PolicyLoss::Vanilla(c) => {
                let counts = ctx.count_mask.unwrap_or(&inputs.mask);
                match ppo_clip_op::ppo_clip_aggregated(inputs, c, mode, denominators, counts)? {
                    Some(fused) => Ok(fused),
                    None => token(ppo_clip::ppo_clip_loss(inputs, c)?, mode),
                }
            }
            PolicyLoss::Gspo(c) => token(gspo::gspo_loss(inputs, c)?, AggMode::SeqMeanTokenMean),
            PolicyLoss::Cispo(c) => token(cispo::cispo_loss(inputs, c)?, mode),
            PolicyLoss::ClipCov(c) => token(clip_cov::clip_cov_loss(inputs, c, ctx.seed)?, mode),
            PolicyLoss::KlCov(c) => token(kl_cov::kl_cov_loss(inputs, c)?, mode),
            PolicyLoss::GeoMean(c) => sequence(gmpo::gmpo_loss(inputs, c)?),
            PolicyLoss::Holder(c) => sequence(holder::holder_loss(inputs, c, c.schedule.p_at(ctx.step))?),
            PolicyLoss::Htpo(c) => {
                let groups = ctx.htpo_groups.ok_or_else(|| {
                    Error::invalid_parameter(
                        "htpo_groups",
                        "None",
                        "the HTPO loss needs its token groups in the context",
                    )
                })?;
                token(htpo::htpo_loss(inputs, groups, c)?, AggMode::TokenMean)
            }
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
