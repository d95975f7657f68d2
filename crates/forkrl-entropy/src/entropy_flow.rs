//! Token-level entropy flow (OPEFO, "Understanding and Preventing Entropy Collapse in RLVR with On-Policy Entropy
//! Flow Optimization", Xu et al., arXiv 2605.11491).
//!
//! RECONSTRUCTION (the paper lists the inputs of its per-token formula but not the expression; token-credit.md §2.2):
//! for the sampled token with advantage `A_t`, probability `π_t` and entropy `H_t` of its distribution,
//!
//! ```text
//! ΔH_t ≈ −η · A_t · π_t · (log π_t + H_t)                       (first-order, after Cui et al. Theorem 1)
//! F+ = Σ_{ΔH_t > 0} ΔH_t        F− = Σ_{ΔH_t < 0} |ΔH_t|
//! λ* = (F− − F+) / (F− + F+)     (zero net flow: (1+λ)F+ = (1−λ)F−; η cancels)
//! w_t = 1 + λ* on S+,  1 − λ* on S−,  1 elsewhere               (detached per-token weights)
//! ```
//!
//! `(log π_t + H_t)` is the log-probability centred on its expectation `−H_t`: a positive advantage on a token more
//! probable than typical lowers entropy, on a rare token raises it. The paper reports λ* in about 0.00025–0.00175,
//! which is small for a ratio of flows; log `F+`, `F−` and `λ*` (this struct is serialisable) rather than trust it.

use forkrl_core::{
    Error, Result,
    numeric::{check_finite_masked, check_len},
};
use serde::{Deserialize, Serialize};

/// The entropy flow of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntropyFlow {
    /// `ΔH_t` per position (0 on padding).
    pub delta: Vec<f32>,
    /// Entropy-raising flow `F+`.
    pub f_plus: f64,
    /// Entropy-lowering flow `F−` (a magnitude).
    pub f_minus: f64,
    /// `λ* ∈ [−1, 1]` (0 when there is no flow).
    pub lambda: f64,
}

impl EntropyFlow {
    /// OPEFO's detached per-token weights: `1 + λ*` where `ΔH > 0`, `1 − λ*` where `ΔH < 0`, 1 elsewhere.
    pub fn weights(&self) -> Vec<f32> {
        let (up, down) = ((1.0 + self.lambda) as f32, (1.0 - self.lambda) as f32);
        self.delta
            .iter()
            .map(|&d| {
                if d > 0.0 {
                    up
                } else if d < 0.0 {
                    down
                } else {
                    1.0
                }
            })
            .collect()
    }
}

/// Computes the per-token entropy change, the flows and λ* over the loss tokens of a flat batch.
///
/// `logprobs` are the log-probabilities of the sampled tokens (`log π_t`, temperature-scaled as the entropy), `eta` the
/// step-size factor of `ΔH` (1 in the paper's closed form; λ* does not depend on it).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays differ in length; [`Error::NonFinite`] for a non-finite input on a loss
/// token; [`Error::InvalidParameter`] for a non-finite or non-positive `eta` or a log-prob above 0.
pub fn entropy_flow(
    advantages: &[f32],
    logprobs: &[f32],
    entropy: &[f32],
    response_mask: &[bool],
    eta: f64,
) -> Result<EntropyFlow> {
    if !(eta.is_finite() && eta > 0.0) {
        return Err(Error::invalid_parameter("eta", eta, "must be finite and > 0"));
    }
    for (what, v) in [("advantages", advantages), ("logprobs", logprobs), ("entropy", entropy)] {
        check_len("entropy_flow: input vs response_mask", v.len(), response_mask.len())?;
        check_finite_masked(what, v, response_mask)?;
    }
    if let Some(i) = logprobs.iter().zip(response_mask).position(|(&l, &m)| m && l > 0.0) {
        return Err(Error::invalid_parameter(
            "logprobs",
            logprobs[i],
            format!("position {i}: a log-probability is ≤ 0"),
        ));
    }
    let mut delta = vec![0.0f32; response_mask.len()];
    let (mut f_plus, mut f_minus) = (0.0f64, 0.0f64);
    for i in (0..response_mask.len()).filter(|&i| response_mask[i]) {
        let (a, lp, h) = (f64::from(advantages[i]), f64::from(logprobs[i]), f64::from(entropy[i]));
        let d = -eta * a * lp.exp() * (lp + h);
        delta[i] = d as f32;
        if d > 0.0 {
            f_plus += d;
        } else {
            f_minus -= d;
        }
    }
    let total = f_plus + f_minus;
    let lambda = if total > 0.0 { ((f_minus - f_plus) / total).clamp(-1.0, 1.0) } else { 0.0 };
    Ok(EntropyFlow { delta, f_plus, f_minus, lambda })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector() {
        // test-vectors.md §1.6: (A, π, H) = (1, .9, .4), (1, .05, 2), (−1, .9, .4), (−1, .05, 2), (.5, .6, .8).
        let a = [1.0f32, 1.0, -1.0, -1.0, 0.5];
        let lp: Vec<f32> = [0.9f32, 0.05, 0.9, 0.05, 0.6].iter().map(|p| p.ln()).collect();
        let h = [0.4f32, 2.0, 0.4, 2.0, 0.8];
        let flow = entropy_flow(&a, &lp, &h, &[true; 5], 1.0).expect("valid");
        let expected = [-0.265176, 0.049787, 0.265176, -0.049787, -0.086752];
        for (d, e) in flow.delta.iter().zip(expected) {
            assert!((f64::from(*d) - e).abs() < 1e-5, "{:?}", flow.delta);
        }
        assert!((flow.f_plus - 0.314962).abs() < 1e-5);
        assert!((flow.f_minus - 0.401714).abs() < 1e-5);
        assert!((flow.lambda - 0.121048).abs() < 1e-5);
        let w = flow.weights();
        for (x, e) in w.iter().zip([0.878952, 1.121048, 1.121048, 0.878952, 0.878952]) {
            assert!((f64::from(*x) - e).abs() < 1e-5);
        }
    }

    #[test]
    fn edge_cases() {
        // test-vectors.md §2.Q: all A = 0 → no flow, λ = 0, weights 1.
        let flow = entropy_flow(&[0.0; 3], &[-0.1; 3], &[0.5; 3], &[true; 3], 1.0).expect("valid");
        assert_eq!((flow.f_plus, flow.f_minus, flow.lambda), (0.0, 0.0, 0.0));
        assert_eq!(flow.weights(), vec![1.0; 3]);
        // Padding contributes nothing, even with garbage values.
        let flow = entropy_flow(&[1.0, f32::NAN], &[-0.1, 3.0], &[0.5, 0.0], &[true, false], 1.0).expect("valid");
        assert_eq!(flow.delta[1], 0.0);
        assert!(entropy_flow(&[1.0], &[0.5], &[0.5], &[true], 1.0).is_err()); // log-prob > 0
        assert!(entropy_flow(&[1.0], &[-0.5], &[0.5], &[true], 0.0).is_err());
        assert!(entropy_flow(&[1.0], &[-0.5, 0.0], &[0.5], &[true], 1.0).is_err());
    }

    #[test]
    fn lambda_does_not_depend_on_eta() {
        let a = [1.0f32, -0.5, 2.0];
        let lp = [-0.1f32, -3.0, -1.0];
        let h = [0.3f32, 1.5, 0.9];
        let one = entropy_flow(&a, &lp, &h, &[true; 3], 1.0).expect("valid");
        let ten = entropy_flow(&a, &lp, &h, &[true; 3], 10.0).expect("valid");
        assert!((one.lambda - ten.lambda).abs() < 1e-12);
    }
}
