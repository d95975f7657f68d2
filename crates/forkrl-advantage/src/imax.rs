//! IMAX — "How You Begin is How You Reason: Driving Exploration in RLVR via Prefix-Tuned Priors" (Xu, Chen, Chen, arXiv
//! 2605.08817). A pool of `K` trainable soft prefixes, each a short sequence of learned embeddings put before the
//! prompt, induces `K` rollout distributions from one backbone; each `(prompt, prefix)` pair is its own GRPO group,
//! and an **InfoMax reward** pays a trajectory whose prefix can be recognised from it. Spec:
//! `../shared/methods/exploration-extras.md` §2.
//!
//! **RECONSTRUCTION** (a variational lower bound on the mutual information between prefix and trajectory, computed
//! with the backbone itself; only the abstract and one relayed sentence are public):
//!
//! ```text
//! q(k|τ) = π(τ|x, z_k) / Σ_j π(τ|x, z_j),   p(k) = 1/K
//! r_info(τ, k) = log q(k|τ) − log p(k) = ℓ_k − logsumexp_j ℓ_j + log K     ℓ_j: length-normalised log π(τ|x, z_j)
//! r = r_verif + λ · r_info     (optionally only where r_verif > 0: "task-relevant", gate_by_correctness)
//! ```
//!
//! `r_info ≤ log K` (equality when only the trajectory's own prefix explains it) and `K = 1 ⇒ r_info = 0`.
//! Defaults (RECONSTRUCTION, none are published): `K = 4` prefixes of `L_p = 4` embeddings, λ = 0.1, one prefix per
//! prompt, zero-initialised prefixes trained by their own AdamW at `prefix_lr = 1e-3` alongside the backbone. The
//! relayed description says the backbone is frozen while the prefixes train: `freeze_backbone = true` is that reading
//! (the default trains both, so that the policy evaluated without a prefix also learns).

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// IMAX's settings (RECONSTRUCTION defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImaxConfig {
    /// `K`: prefixes in the pool.
    pub num_prefixes: usize,
    /// `L_p`: embeddings per prefix.
    pub prefix_len: usize,
    /// λ of `r_info`.
    pub lambda: f32,
    /// Pay `r_info` only to trajectories with a positive verifier reward.
    pub gate_by_correctness: bool,
    /// Distinct prefixes given to each drawn prompt; each `(prompt, prefix)` pair is its own group (`≤ K`).
    pub prefixes_per_prompt: usize,
    /// Learning rate of the prefixes' own AdamW (RECONSTRUCTION).
    pub prefix_lr: f64,
    /// Train only the prefixes (the backbone stays as it is).
    pub freeze_backbone: bool,
    /// How the prefixes start (RECONSTRUCTION).
    pub prefix_init: PrefixInit,
}

/// The prefixes' initial embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixInit {
    /// Zeros: in a pre-norm decoder without biases a zero input row stays zero through every block (its keys and
    /// values are zero), so the prefixes start close to a no-op and all `K` are equal (`r_info = 0` until they
    /// differ).
    #[default]
    Zeros,
    /// Copies of the embeddings of tokens drawn from the run's seed (prompt tuning's "sampled vocabulary").
    Vocab,
}

impl Default for ImaxConfig {
    fn default() -> Self {
        Self {
            num_prefixes: 4,
            prefix_len: 4,
            lambda: 0.1,
            gate_by_correctness: false,
            prefixes_per_prompt: 1,
            prefix_lr: 1e-3,
            freeze_backbone: false,
            prefix_init: PrefixInit::Zeros,
        }
    }
}

impl ImaxConfig {
    /// Checks the parameters once.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("num_prefixes", self.num_prefixes), ("prefix_len", self.prefix_len)] {
            if v == 0 {
                return Err(Error::invalid_parameter(name, v, "must be ≥ 1"));
            }
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::invalid_parameter("lambda", self.lambda, "must be finite and ≥ 0"));
        }
        if self.prefixes_per_prompt == 0 || self.prefixes_per_prompt > self.num_prefixes {
            return Err(Error::invalid_parameter(
                "prefixes_per_prompt",
                self.prefixes_per_prompt,
                format!("must lie in [1, num_prefixes = {}]", self.num_prefixes),
            ));
        }
        if !(self.prefix_lr.is_finite() && self.prefix_lr > 0.0) {
            return Err(Error::invalid_parameter("prefix_lr", self.prefix_lr, "must be finite and > 0"));
        }
        Ok(())
    }
}

/// `r_info` of `N` trajectories from their length-normalised log-likelihoods under each of the `K` prefixes
/// (`loglik`, `[N, K]`) and the prefix each was sampled with.
///
/// # Errors
/// [`Error::InvalidParameter`] for `K = 0`, a length that is not `N × K`, an assigned prefix `≥ K` or a non-finite
/// log-likelihood.
pub fn infomax_rewards(loglik: &[f32], num_prefixes: usize, assigned: &[usize]) -> Result<Vec<f32>> {
    let k = num_prefixes;
    if k == 0 || loglik.len() != assigned.len() * k {
        return Err(Error::invalid_parameter(
            "loglik",
            loglik.len(),
            format!("must be [N = {}, K = {k}] with K ≥ 1", assigned.len()),
        ));
    }
    if let Some(a) = assigned.iter().find(|&&a| a >= k) {
        return Err(Error::invalid_parameter("assigned", a, format!("a prefix index must be < K = {k}")));
    }
    if let Some(l) = loglik.iter().find(|l| !l.is_finite()) {
        return Err(Error::invalid_parameter("loglik", l, "must be finite"));
    }
    Ok(loglik
        .chunks(k)
        .zip(assigned)
        .map(|(row, &a)| {
            let m = row.iter().map(|&l| f64::from(l)).fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|&l| (f64::from(l) - m).exp()).sum::<f64>().ln();
            (f64::from(row[a]) - lse + (k as f64).ln()) as f32
        })
        .collect())
}

/// `r_verif + λ · r_info` (with the correctness gate when configured).
///
/// # Errors
/// [`Error::ShapeMismatch`] for mismatched lengths; the config's errors.
pub fn imax_rewards(verifier: &[f32], info: &[f32], config: &ImaxConfig) -> Result<Vec<f32>> {
    config.validate()?;
    forkrl_core::numeric::check_len("imax_rewards: info vs verifier", info.len(), verifier.len())?;
    Ok(verifier
        .iter()
        .zip(info)
        .map(|(&r, &i)| if config.gate_by_correctness && r <= 0.0 { r } else { r + config.lambda * i })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infomax_by_hand_and_its_bounds() {
        // Equal likelihoods: q = 1/K, r_info = 0.
        assert_eq!(infomax_rewards(&[-1.0, -1.0, -1.0], 3, &[1]).expect("valid"), vec![0.0]);
        // Only the own prefix explains it: r_info → log K.
        let r = infomax_rewards(&[-1.0, -60.0], 2, &[0]).expect("valid");
        assert!((f64::from(r[0]) - 2f64.ln()).abs() < 1e-6);
        // By hand: ℓ = [ln 3, 0] (q = [¾, ¼]), assigned 1: ln ¼ + ln 2 = ln ½.
        let r = infomax_rewards(&[3f32.ln(), 0.0], 2, &[1]).expect("valid");
        assert!((f64::from(r[0]) - 0.5f64.ln()).abs() < 1e-6);
        assert_eq!(infomax_rewards(&[-3.0, -0.5], 1, &[0, 0]).expect("valid"), vec![0.0, 0.0], "K = 1");
        assert!(infomax_rewards(&[-1.0], 2, &[0]).is_err());
        assert!(infomax_rewards(&[-1.0, -1.0], 2, &[2]).is_err());
        assert!(infomax_rewards(&[f32::NAN, -1.0], 2, &[0]).is_err());
    }

    #[test]
    fn total_reward_and_the_gate() {
        let cfg = ImaxConfig::default();
        let r = imax_rewards(&[1.0, 0.0], &[0.5, 0.5], &cfg).expect("valid");
        assert_eq!(r, vec![1.05, 0.05]);
        let gated = ImaxConfig { gate_by_correctness: true, ..cfg };
        assert_eq!(imax_rewards(&[1.0, 0.0], &[0.5, 0.5], &gated).expect("valid"), vec![1.05, 0.0]);
        assert!(imax_rewards(&[1.0], &[0.5, 0.5], &cfg).is_err());
        assert!(ImaxConfig { num_prefixes: 0, ..cfg }.validate().is_err());
        assert!(ImaxConfig { lambda: f32::NAN, ..cfg }.validate().is_err());
        assert!(ImaxConfig { prefixes_per_prompt: 5, ..cfg }.validate().is_err());
        assert!(ImaxConfig { prefixes_per_prompt: 0, ..cfg }.validate().is_err());
        assert!(ImaxConfig { prefix_lr: 0.0, ..cfg }.validate().is_err());
        assert!(ImaxConfig { prefixes_per_prompt: 4, ..cfg }.validate().is_ok());
    }
}
