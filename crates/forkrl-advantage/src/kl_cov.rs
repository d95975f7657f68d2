//! KL-Cov — "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (Cui et al.,
//! arXiv 2505.22617), as verl `compute_policy_loss_kl_cov`.
//!
//! ```text
//! cov_t = (A_t − mean A) · (log π_t − mean log π)            masked means over the micro-batch's loss tokens
//! top k = max(1, ⌊ratio · N⌋) tokens by cov_t (ties: lowest flat index)
//! selected tokens:  −A·r + β·|log π − log π_old|
//! all other tokens: −A·r                                       no PPO clip at all
//! ```
//!
//! Defaults: ratio 2e-3 (the paper's 7B setting), β = 1 (the paper; verl's YAML says 0.1 and its code falls back to 1.0
//! — a disagreement kept explicit). `pg_clipfrac` reports the fraction of penalised tokens.
//! Source: `../shared/methods/policy-losses.md` §8.4.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// KL-Cov parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlCovConfig {
    /// Fraction of loss tokens to penalise (`kl_cov_ratio`).
    pub kl_cov_ratio: f64,
    /// β, the coefficient of `|log π − log π_old|` (`ppo_kl_coef`).
    pub ppo_kl_coef: f64,
}

impl Default for KlCovConfig {
    fn default() -> Self {
        Self { kl_cov_ratio: 2e-3, ppo_kl_coef: 1.0 }
    }
}

impl KlCovConfig {
    /// Checks the ratio in `[0, 1]` and β finite and ≥ 0.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        forkrl_core::numeric::check_range("kl_cov_ratio", self.kl_cov_ratio, 0.0, 1.0, false)?;
        if !(self.ppo_kl_coef.is_finite() && self.ppo_kl_coef >= 0.0) {
            return Err(Error::invalid_parameter("ppo_kl_coef", self.ppo_kl_coef, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// The KL-Cov selection over a flat batch: the top `max(1, ⌊ratio·N⌋)` loss tokens by covariance, ties by lowest
/// flat index.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn kl_cov_selection(cov: &[f32], mask: &[bool], ratio: f64) -> Result<Vec<bool>> {
    forkrl_core::numeric::check_len("kl_cov_selection: cov vs mask", cov.len(), mask.len())?;
    let mut valid: Vec<usize> = (0..mask.len()).filter(|&t| mask[t]).collect();
    let mut selected = vec![false; mask.len()];
    if valid.is_empty() {
        return Ok(selected);
    }
    let k = crate::clip_cov::cov_count(valid.len(), ratio);
    valid.sort_by(|&a, &b| cov[b].total_cmp(&cov[a]).then(a.cmp(&b)));
    for &t in &valid[..k] {
        selected[t] = true;
    }
    Ok(selected)
}

#[cfg(feature = "burn")]
pub use tensor::kl_cov_loss;

#[cfg(feature = "burn")]
mod tensor {
    use super::{KlCovConfig, kl_cov_selection};
    use crate::loss_types::{PolicyInputs, TokenLoss, host_mask, host_vec, mask_tensor, metrics, no_tokens};
    use forkrl_core::Result;

    /// The per-token KL-Cov loss `[B, T]`. Reads `log π`, `Â` and the mask back to select tokens on the host.
    ///
    /// # Errors
    /// As [`crate::clip_cov_loss`].
    pub fn kl_cov_loss(inputs: &PolicyInputs, config: &KlCovConfig) -> Result<TokenLoss> {
        config.validate()?;
        let shape = inputs.validate()?;
        let (lp, log_ratio, adv) = inputs.log_ratio();
        let pg = adv.clone().neg() * log_ratio.clone().exp();
        let mask = host_mask("loss mask", &inputs.mask)?;
        let lp = host_vec("log_prob", lp.detach())?;
        let cov = forkrl_entropy::token_covariance(&host_vec("advantages", adv)?, &lp, &mask)?;
        let selected =
            mask_tensor(kl_cov_selection(&cov, &mask, config.kl_cov_ratio)?, shape, &inputs.log_prob.device());
        let penalised = pg.clone() + log_ratio.clone().abs().mul_scalar(config.ppo_kl_coef);
        let loss = pg.mask_where(selected.clone(), penalised);
        let metrics = metrics(&inputs.mask, selected, no_tokens(&inputs.mask), &log_ratio)?;
        Ok(TokenLoss { loss: loss.mask_fill(inputs.mask.clone().bool_not(), 0.0), metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_2h_top1_tie_break() {
        let cov = [0.95f32, -0.95, -0.95, 0.95];
        assert_eq!(kl_cov_selection(&cov, &[true; 4], 2e-4).expect("valid"), vec![true, false, false, false]);
        assert_eq!(
            kl_cov_selection(&cov, &[false, true, true, true], 2e-4).expect("valid"),
            vec![false, false, false, true]
        );
        assert_eq!(kl_cov_selection(&cov, &[false; 4], 2e-4).expect("valid"), vec![false; 4]);
        assert!(KlCovConfig { kl_cov_ratio: 2.0, ..KlCovConfig::default() }.validate().is_err());
    }
}
