//! OPEFO — "Understanding and Preventing Entropy Collapse in RLVR with On-Policy Entropy Flow Optimization" (Xu et al.,
//! arXiv 2605.11491).
//!
//! ```text
//! ΔH_t = −A_t · π_t · (log π_t + H_t)              RECONSTRUCTION of the per-token entropy change (η = 1)
//! F+ = Σ_{ΔH>0} ΔH,  F− = Σ_{ΔH<0} |ΔH|,  λ* = (F− − F+)/(F− + F+)
//! w_t = 1 + λ* where ΔH_t > 0,  1 − λ* where ΔH_t < 0,  1 otherwise;   Ã_t = w_t · A_t   (w detached)
//! ```
//!
//! The flows are [`forkrl_entropy::entropy_flow`]; this module turns them into token advantages. The paper trains
//! strictly on-policy (one update per rollout batch, ratio 1) with token-mean aggregation, where the PPO loss's
//! gradient equals the REINFORCE loss `−w·A·log π` of the paper. Log `F+`, `F−` and `λ*` (the paper's λ* is tiny,
//! 0.00025–0.00175, which the reconstruction does not explain). Source: `../shared/methods/token-credit.md` §2.

use forkrl_core::Result;
use forkrl_entropy::{EntropyFlow, entropy_flow};

/// OPEFO-weighted advantages `w_t · A_t` (0 on padding) and the flow they came from.
///
/// # Errors
/// The errors of [`forkrl_entropy::entropy_flow`] (shapes, non-finite values, a log-prob above 0).
pub fn opefo_advantages(
    advantages: &[f32],
    logprobs: &[f32],
    entropy: &[f32],
    mask: &[bool],
) -> Result<(Vec<f32>, EntropyFlow)> {
    let flow = entropy_flow(advantages, logprobs, entropy, mask, 1.0)?;
    let weighted =
        flow.weights().iter().zip(advantages).zip(mask).map(|((&w, &a), &m)| if m { w * a } else { 0.0 }).collect();
    Ok((weighted, flow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vectors_1_6_and_2q() {
        let a = [1.0f32, 1.0, -1.0, -1.0, 0.5];
        let lp: Vec<f32> = [0.9f32, 0.05, 0.9, 0.05, 0.6].iter().map(|p| p.ln()).collect();
        let h = [0.4f32, 2.0, 0.4, 2.0, 0.8];
        let (w, flow) = opefo_advantages(&a, &lp, &h, &[true; 5]).expect("valid");
        assert!((flow.lambda - 0.121048).abs() < 1e-5);
        for (x, e) in w.iter().zip([0.878952f32, 1.121048, -1.121048, -0.878952, 0.439476]) {
            assert!((x - e).abs() < 1e-5, "{w:?}");
        }
        let (w, flow) = opefo_advantages(&[0.0; 5], &lp, &h, &[true; 5]).expect("valid");
        assert_eq!((flow.lambda, w), (0.0, vec![0.0; 5]));
    }
}
