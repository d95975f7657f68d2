//! Clip-Cov — "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (Cui et al.,
//! arXiv 2505.22617), as verl `compute_policy_loss_clip_cov`.
//!
//! ```text
//! cov_t = (A_t − mean A) · (log π_t − mean log π)                  masked means over the micro-batch's loss tokens
//! candidates = { t : lb < cov_t < ub, t not already clipped by PPO (l2 > l1) }
//! pick min(max(1, ⌊ratio · N⌋), #candidates) candidates uniformly at random;  their loss × 0 (detached)
//! all other tokens: max(l1, l2)  (PPO clip without dual clip)
//! ```
//!
//! The random subset comes from a ChaCha8 RNG seeded by the caller's `seed` (methods README decision 14), so a run is
//! reproducible. `pg_clipfrac` = fraction of tokens whose loss was zeroed. Defaults are the paper's / verl's:
//! ratio 2e-4, bounds (1, 5). Source: `../shared/methods/policy-losses.md` §8.3. The covariance is
//! [`forkrl_entropy::token_covariance`].

use forkrl_core::{Error, Result};
use rand::{SeedableRng, seq::index};
use serde::{Deserialize, Serialize};

/// Clip-Cov parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipCovConfig {
    /// PPO ε_low of the underlying clip.
    pub clip_ratio_low: f64,
    /// PPO ε_high of the underlying clip.
    pub clip_ratio_high: f64,
    /// Fraction of loss tokens to detach (`clip_cov_ratio`, 2e-4).
    pub clip_cov_ratio: f64,
    /// Lower covariance bound (exclusive), 1.0.
    pub clip_cov_lb: f64,
    /// Upper covariance bound (exclusive), 5.0.
    pub clip_cov_ub: f64,
}

impl Default for ClipCovConfig {
    fn default() -> Self {
        Self { clip_ratio_low: 0.2, clip_ratio_high: 0.2, clip_cov_ratio: 2e-4, clip_cov_lb: 1.0, clip_cov_ub: 5.0 }
    }
}

impl ClipCovConfig {
    /// Checks the ratio in `[0, 1]`, `lb < ub` and the PPO bounds.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        crate::ppo_clip::PpoClipConfig {
            clip_ratio_low: self.clip_ratio_low,
            clip_ratio_high: self.clip_ratio_high,
            clip_ratio_c: None,
        }
        .validate()?;
        forkrl_core::numeric::check_range("clip_cov_ratio", self.clip_cov_ratio, 0.0, 1.0, false)?;
        if self.clip_cov_lb.partial_cmp(&self.clip_cov_ub) != Some(std::cmp::Ordering::Less) {
            return Err(Error::invalid_parameter("clip_cov_ub", self.clip_cov_ub, "must exceed clip_cov_lb"));
        }
        Ok(())
    }
}

/// `k = max(1, ⌊ratio · n⌋)`: how many tokens Clip-Cov and KL-Cov act on among `n` loss tokens (test vector 2.H).
pub fn cov_count(n: usize, ratio: f64) -> usize {
    ((ratio * n as f64).floor() as usize).max(1)
}

/// The Clip-Cov selection over a flat batch: `true` where the token's loss is zeroed.
///
/// `ppo_clipped[t]` marks tokens PPO already clips; `cov` is the per-token covariance.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the lengths differ.
pub fn clip_cov_selection(
    cov: &[f32],
    mask: &[bool],
    ppo_clipped: &[bool],
    config: &ClipCovConfig,
    seed: u64,
) -> Result<Vec<bool>> {
    forkrl_core::numeric::check_len("clip_cov_selection: cov vs mask", cov.len(), mask.len())?;
    forkrl_core::numeric::check_len("clip_cov_selection: ppo_clipped vs mask", ppo_clipped.len(), mask.len())?;
    let n = mask.iter().filter(|&&m| m).count();
    let mut selected = vec![false; mask.len()];
    if n == 0 {
        return Ok(selected);
    }
    let (lb, ub) = (config.clip_cov_lb, config.clip_cov_ub);
    let candidates: Vec<usize> = (0..mask.len())
        .filter(|&t| mask[t] && !ppo_clipped[t] && f64::from(cov[t]) > lb && f64::from(cov[t]) < ub)
        .collect();
    let k = cov_count(n, config.clip_cov_ratio).min(candidates.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in index::sample(&mut rng, candidates.len(), k) {
        selected[candidates[i]] = true;
    }
    Ok(selected)
}

#[cfg(feature = "burn")]
pub use tensor::clip_cov_loss;

#[cfg(feature = "burn")]
mod tensor {
    use super::{ClipCovConfig, clip_cov_selection};
    use crate::loss_types::{PolicyInputs, TokenLoss, host_mask, host_vec, mask_tensor, metrics, no_tokens};
    use forkrl_core::Result;

    /// The per-token Clip-Cov loss `[B, T]`. Reads `log π`, `Â` and the mask back to select tokens on the host.
    ///
    /// # Errors
    /// Shape and parameter errors as [`crate::ppo_clip_loss`]; [`forkrl_core::Error::NonFinite`] for a NaN/inf
    /// log-prob or advantage on a loss token.
    pub fn clip_cov_loss(inputs: &PolicyInputs, config: &ClipCovConfig, seed: u64) -> Result<TokenLoss> {
        config.validate()?;
        let shape = inputs.validate()?;
        let (lp, log_ratio, adv) = inputs.log_ratio();
        let (_, _, loss, clipped) =
            crate::ppo_clip::clip_terms(&log_ratio, &adv, config.clip_ratio_low, config.clip_ratio_high, &inputs.mask);

        let mask = host_mask("loss mask", &inputs.mask)?;
        let lp = host_vec("log_prob", lp.detach())?;
        let cov = forkrl_entropy::token_covariance(&host_vec("advantages", adv)?, &lp, &mask)?;
        let ppo_clipped = host_mask("PPO clip flags", &clipped)?;
        let selected = clip_cov_selection(&cov, &mask, &ppo_clipped, config, seed)?;
        let selected = mask_tensor(selected, shape, &inputs.log_prob.device());
        let loss = loss.mask_fill(selected.clone(), 0.0);
        let metrics = metrics(&inputs.mask, selected, no_tokens(&inputs.mask), &log_ratio)?;
        Ok(TokenLoss { loss: loss.mask_fill(inputs.mask.clone().bool_not(), 0.0), metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_2h() {
        assert_eq!(cov_count(7, 2e-4), 1);
        assert_eq!(cov_count(20000, 2e-4), 4);
        assert_eq!(cov_count(5000, 2e-3), 10);
        let cov = forkrl_entropy::token_covariance(&[1.0, 1.0, -1.0, -1.0], &[-0.1, -2.0, -0.1, -2.0], &[true; 4])
            .expect("valid");
        for (c, e) in cov.iter().zip([0.95f32, -0.95, -0.95, 0.95]) {
            assert!((c - e).abs() < 1e-6);
        }
        // No candidate in (1, 5): plain PPO clip.
        let sel = clip_cov_selection(&cov, &[true; 4], &[false; 4], &ClipCovConfig::default(), 0).expect("valid");
        assert_eq!(sel, vec![false; 4]);
    }

    #[test]
    fn selection_is_seeded_and_respects_candidates() {
        let cov: Vec<f32> = (0..100).map(|i| if i % 2 == 0 { 2.0 } else { 0.5 }).collect();
        let mask = vec![true; 100];
        let mut clipped = vec![false; 100];
        clipped[0] = true;
        let cfg = ClipCovConfig { clip_cov_ratio: 0.1, ..ClipCovConfig::default() };
        let a = clip_cov_selection(&cov, &mask, &clipped, &cfg, 7).expect("valid");
        assert_eq!(a, clip_cov_selection(&cov, &mask, &clipped, &cfg, 7).expect("valid"));
        assert_eq!(a.iter().filter(|&&s| s).count(), 10);
        assert!(a.iter().enumerate().all(|(i, &s)| !s || (i % 2 == 0 && i != 0)));
        assert_ne!(a, clip_cov_selection(&cov, &mask, &clipped, &cfg, 8).expect("valid"));
        let bad = ClipCovConfig { clip_cov_lb: 5.0, clip_cov_ub: 1.0, ..cfg };
        assert!(matches!(bad.validate(), Err(Error::InvalidParameter { .. })));
    }
}
