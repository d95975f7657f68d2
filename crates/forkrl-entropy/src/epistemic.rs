//! Epistemic uncertainty of an ensemble (UG-TTT, "Epistemic Uncertainty for Test-Time Discovery", Riaz et al., arXiv
//! 2605.11328; the formula is standard BALD, a RECONSTRUCTION from the abstract: `../shared/methods/exploration-extras.md`
//! §3).
//!
//! ```text
//! p̄_t  = (1/M) Σ_m p_{m,t}                       p_{m,t} = softmax(z_{m,t} / T), member m's next-token distribution
//! MI_t = H(p̄_t) − (1/M) Σ_m H(p_{m,t})  ≥ 0      0 ≤ MI_t ≤ min(log M, H(p̄_t))
//! ```
//!
//! Entropies come from log-softmax (f64); a tiny negative value from rounding is clamped to 0.

use forkrl_core::{Error, Result};

/// `MI_t` for `N` positions from `M` members' logits `[M, N, V]` (member-major) at temperature `T`.
///
/// # Errors
/// [`Error::InvalidParameter`] for `M = 0`, `V = 0`, a length that is not `M × N × V`, a non-finite logit or a
/// temperature that is not finite and > 0.
pub fn epistemic_mutual_information(
    logits: &[f32],
    members: usize,
    vocab: usize,
    temperature: f32,
) -> Result<Vec<f32>> {
    if members == 0 || vocab == 0 || !logits.len().is_multiple_of(members * vocab) {
        return Err(Error::invalid_parameter(
            "members × vocab",
            format!("{members} × {vocab}"),
            format!("must be > 0 and divide the {} logits", logits.len()),
        ));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::invalid_parameter("temperature", temperature, "must be finite and > 0"));
    }
    if let Some(z) = logits.iter().find(|z| !z.is_finite()) {
        return Err(Error::invalid_parameter("logits", z, "must be finite"));
    }
    let n = logits.len() / (members * vocab);
    let t = f64::from(temperature);
    let mut out = Vec::with_capacity(n);
    let mut mean = vec![0.0f64; vocab];
    for pos in 0..n {
        mean.fill(0.0);
        let mut mean_entropy = 0.0f64;
        for m in 0..members {
            let row = &logits[(m * n + pos) * vocab..(m * n + pos + 1) * vocab];
            let max = row.iter().map(|&z| f64::from(z) / t).fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|&z| (f64::from(z) / t - max).exp()).sum::<f64>().ln();
            let mut h = 0.0f64;
            for (acc, &z) in mean.iter_mut().zip(row) {
                let lp = f64::from(z) / t - lse;
                let p = lp.exp();
                h -= p * lp;
                *acc += p / members as f64;
            }
            mean_entropy += h / members as f64;
        }
        let h_mean: f64 = mean.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
        out.push((h_mean - mean_entropy).max(0.0) as f32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_members_agree_and_disagreeing_members_reach_log_m() {
        // Two positions, M = 2, V = 2.
        let same = [1.0f32, 0.0, 0.3, 0.3, 1.0, 0.0, 0.3, 0.3];
        assert_eq!(epistemic_mutual_information(&same, 2, 2, 1.0).expect("valid"), vec![0.0, 0.0]);
        // Confident members that disagree: MI → log 2.
        let split = [30.0f32, 0.0, 0.0, 30.0];
        let mi = epistemic_mutual_information(&split, 2, 2, 1.0).expect("valid");
        assert!((f64::from(mi[0]) - 2f64.ln()).abs() < 1e-6, "{mi:?}");
        // By hand: p1 = [0.75, 0.25], p2 = [0.25, 0.75]; p̄ uniform; MI = ln 2 − H(0.75, 0.25).
        let z = 3f32.ln();
        let mi = epistemic_mutual_information(&[z, 0.0, 0.0, z], 2, 2, 1.0).expect("valid");
        let h = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        assert!((f64::from(mi[0]) - (2f64.ln() - h)).abs() < 1e-6);
        // One member: 0.
        assert_eq!(epistemic_mutual_information(&[1.0, 2.0, 3.0], 1, 3, 0.7).expect("valid"), vec![0.0]);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(epistemic_mutual_information(&[1.0; 3], 2, 2, 1.0).is_err());
        assert!(epistemic_mutual_information(&[1.0; 4], 0, 2, 1.0).is_err());
        assert!(epistemic_mutual_information(&[f32::NAN, 0.0], 1, 2, 1.0).is_err());
        assert!(epistemic_mutual_information(&[1.0, 0.0], 1, 2, 0.0).is_err());
    }
}
