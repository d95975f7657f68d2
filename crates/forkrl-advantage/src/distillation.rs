//! On-policy distillation (OPD): the student samples, a frozen teacher with the same tokenizer scores every position,
//! and the student minimises the per-position reverse KL on its own samples (Thinking Machines, "On-Policy
//! Distillation", 2025, code `tinker-cookbook` `distillation/train_on_policy.py`; GKD, Agarwal et al., arXiv
//! 2306.13649; the rock-token stack `YuxuanJiang1/Rock-Token` `kdflow`). Spec:
//! `../shared/methods/sparse-selection-and-distillation.md` §3.
//!
//! ```text
//! ℓ_t = KL(π_θ(·|s_t) ‖ q(·|s_t)) = Σ_v π_v (log π_v − log q_v)        ∂ℓ_t/∂z_u = π_u (log π_u − log q_u − ℓ_t)
//! Variant A (sampled token, Tinker):  k_t = log π_samp(y_t) − log q(y_t),  A_t = A_env − c_KL · k_t
//!             (discount γ > 0: A_t = A_env − c_KL Σ_{t'≥t} γ^{t'−t} k_{t'})
//!             L_A = −Σ_t sg(A_t) · exp(log π_θ(y_t) − log π_samp(y_t))   (importance sampling, no clip)
//! Variant B (full vocabulary, kdflow `rkl`):  L_B = Σ_t w_t ℓ_t / Z,  Z = max(Σ_batch w_t, 1)
//! ```
//!
//! At ratio 1 Variant A's gradient is an unbiased estimate of Variant B's (`E_y[k(y)(onehot(y) − π)] = ∇_z ℓ`). Both
//! keep only the local term of the sequence KL's reward-to-go (discount 0, the cookbook default). `k_t` is never
//! clamped (a single sample can be negative; only its expectation is a KL).
//!
//! **Rock-token bypass** ([`forkrl_entropy::rock_tokens`]): `w_t = freeze_weight` where the aligned token is a rock,
//! else 1; Variant A multiplies the advantage by `w_t`, Variant B weights `ℓ_t`. One normaliser `Z = max(Σ w, 1)` for
//! both, so `freeze_weight = 1` is identical to no bypass (library decision, spec §3.5).

use forkrl_core::{Error, Result, numeric::check_len};
use forkrl_entropy::{RockAlignment, RockConfig};
use serde::{Deserialize, Serialize};

/// Which estimator of the reverse-KL gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillEstimator {
    /// Variant A: the sampled token's `−k_t` as a per-token advantage (Tinker).
    SampledToken,
    /// Variant B: the exact per-position reverse KL over the vocabulary (kdflow `rkl`; exact, the default).
    #[default]
    FullVocabulary,
}

/// Where the rock set comes from and how it is bypassed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RockBypassConfig {
    /// Weight of a rock position: 0 = full bypass, 0.3 / 0.5 = soft (TokenFreezeKD).
    pub freeze_weight: f32,
    /// `predicted` (default, consistent with detection) or `context` (the released training code).
    pub alignment: RockAlignment,
    /// A fixed rock set (token ids), e.g. from `detect_rock_tokens` on an earlier run. Empty: detect online.
    pub tokens: Vec<u32>,
    /// Online detection (RECONSTRUCTION): per token id, `ℓ` over the last `window` steps, ranked by `freq × mean ℓ`
    /// with these settings.
    pub detection: RockConfig,
    /// Steps of history for online detection.
    pub window: usize,
}

impl Default for RockBypassConfig {
    fn default() -> Self {
        Self {
            freeze_weight: 0.0,
            alignment: RockAlignment::Predicted,
            tokens: Vec::new(),
            detection: RockConfig::default(),
            window: 10,
        }
    }
}

/// On-policy distillation settings; defaults are the spec's (§3.6 "forkrl default").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillationConfig {
    /// Variant A or B.
    pub estimator: DistillEstimator,
    /// `c_KL` (`kl_penalty_coef`): scale of `k_t` in Variant A's advantage and of `ℓ_t` in Variant B's loss.
    pub kl_penalty_coef: f32,
    /// γ (`kl_discount_factor`) of Variant A's reward-to-go; 0 keeps the local term only.
    pub kl_discount: f32,
    /// Add the task's group advantages (`A_env`) to the distillation signal (default: pure distillation).
    pub env_advantage: bool,
    /// The rock-token bypass (off when absent).
    pub rock: Option<RockBypassConfig>,
}

impl Default for DistillationConfig {
    fn default() -> Self {
        Self {
            estimator: DistillEstimator::FullVocabulary,
            kl_penalty_coef: 1.0,
            kl_discount: 0.0,
            env_advantage: false,
            rock: None,
        }
    }
}

impl DistillationConfig {
    /// Checks the parameters once.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.kl_penalty_coef.is_finite() && self.kl_penalty_coef > 0.0) {
            return Err(Error::invalid_parameter("kl_penalty_coef", self.kl_penalty_coef, "must be finite and > 0"));
        }
        if !(0.0..=1.0).contains(&self.kl_discount) {
            return Err(Error::invalid_parameter("kl_discount", self.kl_discount, "must lie in [0, 1]"));
        }
        if let Some(r) = &self.rock {
            if !(0.0..=1.0).contains(&r.freeze_weight) {
                return Err(Error::invalid_parameter("rock.freeze_weight", r.freeze_weight, "must lie in [0, 1]"));
            }
            if r.tokens.is_empty() && r.window == 0 {
                return Err(Error::invalid_parameter("rock.window", 0, "online detection needs a window ≥ 1"));
            }
        }
        Ok(())
    }
}

/// Per-position reverse KL `ℓ_t = KL(softmax(z_t) ‖ q_t)` and its gradient w.r.t. the student logits (f64
/// reference; `student_logits` and `teacher_log_probs` are `[N, V]`; a teacher row must be a log-distribution).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays are not `[N, V]`; [`Error::InvalidParameter`] for a non-finite logit or a
/// teacher log-prob that is NaN or above 0.
pub fn reverse_kl_host(
    student_logits: &[f32],
    teacher_log_probs: &[f32],
    vocab: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    check_len("reverse_kl_host: teacher vs student", teacher_log_probs.len(), student_logits.len())?;
    if vocab == 0 || !student_logits.len().is_multiple_of(vocab) {
        return Err(Error::invalid_parameter("vocab", vocab, format!("must divide {}", student_logits.len())));
    }
    if let Some(z) = student_logits.iter().find(|z| !z.is_finite()) {
        return Err(Error::invalid_parameter("student_logits", z, "must be finite"));
    }
    if let Some(q) = teacher_log_probs.iter().find(|q| q.is_nan() || **q > 0.0) {
        return Err(Error::invalid_parameter("teacher_log_probs", q, "must be ≤ 0 (a log-distribution)"));
    }
    let mut kl = Vec::with_capacity(student_logits.len() / vocab);
    let mut grad = Vec::with_capacity(student_logits.len());
    for (z, q) in student_logits.chunks(vocab).zip(teacher_log_probs.chunks(vocab)) {
        let m = z.iter().map(|&x| f64::from(x)).fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|&x| (f64::from(x) - m).exp()).sum::<f64>().ln();
        let log_pi: Vec<f64> = z.iter().map(|&x| f64::from(x) - lse).collect();
        // log q floored at −1e4 where the teacher gives a token no mass (spec §3.8).
        let diff: Vec<f64> = log_pi.iter().zip(q).map(|(lp, &lq)| lp - f64::from(lq).max(-1e4)).collect();
        let l: f64 = log_pi.iter().zip(&diff).map(|(lp, d)| lp.exp() * d).sum();
        grad.extend(log_pi.iter().zip(&diff).map(|(lp, d)| lp.exp() * (d - l)));
        kl.push(l);
    }
    Ok((kl, grad))
}

/// The per-position reverse KL `KL(softmax(s/T) ‖ softmax(t/T))` and the teacher's log-prob of each position's target
/// token, straight from student and teacher logits `[N, V]` (one pass per row, no `[N, V]` buffer; f64 sums): what a
/// trainer scores a rollout batch with. Equals [`reverse_kl_host`] on the teacher's log-softmax.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays are not `[N, V]` and `[N]`; [`Error::InvalidParameter`] for a non-finite
/// logit, a target `≥ V` or a temperature that is not finite and > 0.
pub fn reverse_kl_from_logits(
    student_logits: &[f32],
    teacher_logits: &[f32],
    targets: &[u32],
    vocab: usize,
    temperature: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_len("reverse_kl_from_logits: teacher vs student", teacher_logits.len(), student_logits.len())?;
    check_len("reverse_kl_from_logits: [N, V]", student_logits.len(), targets.len() * vocab)?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::invalid_parameter("temperature", temperature, "must be finite and > 0"));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::invalid_parameter("targets", t, format!("must be < V = {vocab}")));
    }
    if let Some(z) = student_logits.iter().chain(teacher_logits).find(|z| !z.is_finite()) {
        return Err(Error::invalid_parameter("logits", z, "must be finite"));
    }
    let t = f64::from(temperature);
    let lse = |row: &[f32]| {
        let m = row.iter().map(|&x| f64::from(x) / t).fold(f64::NEG_INFINITY, f64::max);
        m + row.iter().map(|&x| (f64::from(x) / t - m).exp()).sum::<f64>().ln()
    };
    let (mut kl, mut teacher_lp) = (Vec::with_capacity(targets.len()), Vec::with_capacity(targets.len()));
    for ((s, q), &target) in student_logits.chunks(vocab.max(1)).zip(teacher_logits.chunks(vocab.max(1))).zip(targets) {
        let (ls, lq) = (lse(s), lse(q));
        let l: f64 = s
            .iter()
            .zip(q)
            .map(|(&a, &b)| {
                let lp = f64::from(a) / t - ls;
                lp.exp() * (lp - (f64::from(b) / t - lq))
            })
            .sum();
        kl.push(l.max(0.0) as f32);
        teacher_lp.push((f64::from(q[target as usize]) / t - lq) as f32);
    }
    Ok((kl, teacher_lp))
}

/// Variant A's per-token advantages `[B, W]`: `A_t = A_env,i − c_KL · Σ_{t' ≥ t} γ^{t'−t} k_{t'}` over the row's
/// masked positions (γ = 0: `−c_KL · k_t`), times the bypass weight when `weights` is given; 0 off the mask.
/// `env_advantages` (`[B]`) is added when given.
///
/// # Errors
/// [`Error::ShapeMismatch`] for arrays that are not `[B, W]`; [`Error::InvalidParameter`] for a non-finite log-prob on
/// a masked token; the config's errors.
pub fn opd_token_advantages(
    sampler_log_prob: &[f32],
    teacher_log_prob: &[f32],
    mask: &[bool],
    width: usize,
    env_advantages: Option<&[f32]>,
    weights: Option<&[f32]>,
    config: &DistillationConfig,
) -> Result<Vec<f32>> {
    config.validate()?;
    check_len("opd_token_advantages: sampler log-prob vs mask", sampler_log_prob.len(), mask.len())?;
    check_len("opd_token_advantages: teacher log-prob vs mask", teacher_log_prob.len(), mask.len())?;
    if width == 0 || !mask.len().is_multiple_of(width) {
        return Err(Error::invalid_parameter("width", width, format!("must divide {}", mask.len())));
    }
    if let Some(e) = env_advantages {
        check_len("opd_token_advantages: env advantages [B]", e.len(), mask.len() / width)?;
    }
    if let Some(w) = weights {
        check_len("opd_token_advantages: weights vs mask", w.len(), mask.len())?;
    }
    for (what, v) in [("sampler log-prob", sampler_log_prob), ("teacher log-prob", teacher_log_prob)] {
        if let Some(i) = v.iter().zip(mask).position(|(x, &m)| m && !x.is_finite()) {
            return Err(Error::invalid_parameter(what, v[i], format!("position {i}: must be finite")));
        }
    }
    let (c, gamma) = (f64::from(config.kl_penalty_coef), f64::from(config.kl_discount));
    let mut out = vec![0.0f32; mask.len()];
    for row in 0..mask.len() / width {
        let env = env_advantages.map_or(0.0, |e| f64::from(e[row]));
        let mut to_go = 0.0f64;
        for t in (row * width..(row + 1) * width).rev() {
            if !mask[t] {
                continue;
            }
            let k = f64::from(sampler_log_prob[t]) - f64::from(teacher_log_prob[t]);
            to_go = k + gamma * to_go;
            let w = weights.map_or(1.0, |w| f64::from(w[t]));
            out[t] = (w * (env - c * to_go)) as f32;
        }
    }
    Ok(out)
}

/// Tinker's `importance_sampling` loss `−Σ_t A_t · exp(log π_θ − log π_samp)` over the masked tokens, divided by
/// `denominator` (1 for the token sum, the token count for the token mean); f64 reference.
///
/// # Errors
/// [`Error::ShapeMismatch`] for mismatched lengths; [`Error::InvalidParameter`] for a denominator ≤ 0.
pub fn importance_sampling_loss_host(
    log_prob: &[f32],
    sampler_log_prob: &[f32],
    advantages: &[f32],
    mask: &[bool],
    denominator: f64,
) -> Result<f64> {
    check_len("importance_sampling_loss_host: log_prob vs mask", log_prob.len(), mask.len())?;
    check_len("importance_sampling_loss_host: sampler vs mask", sampler_log_prob.len(), mask.len())?;
    check_len("importance_sampling_loss_host: advantages vs mask", advantages.len(), mask.len())?;
    if denominator.is_nan() || denominator <= 0.0 {
        return Err(Error::invalid_parameter("denominator", denominator, "must be > 0"));
    }
    let sum: f64 = (0..mask.len())
        .filter(|&t| mask[t])
        .map(|t| -f64::from(advantages[t]) * (f64::from(log_prob[t]) - f64::from(sampler_log_prob[t])).exp())
        .sum();
    Ok(sum / denominator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn opd1_opd2_reverse_kl_its_gradient_and_the_sampled_estimator() {
        let q = [(1.0f32 / 3.0).ln(); 3];
        let (kl, grad) = reverse_kl_host(&[1.0, 0.0, -1.0], &q, 3).expect("valid");
        assert!(close(kl[0], 0.266217), "{kl:?}");
        for (g, e) in grad.iter().zip([0.282587, -0.140770, -0.141817]) {
            assert!(close(*g, e), "{grad:?}");
        }
        assert!(grad.iter().sum::<f64>().abs() < 1e-12);
        // OPD-2: E_y[k(y)(onehot(y) − π)] equals the gradient, E_y[k] equals the KL.
        let pi = [0.665241f64, 0.244728, 0.090031];
        let k: Vec<f64> = pi.iter().map(|p| p.ln() - (1.0f64 / 3.0).ln()).collect();
        assert!(close(pi.iter().zip(&k).map(|(p, k)| p * k).sum(), 0.266217));
        for (u, g) in grad.iter().enumerate() {
            let e: f64 = (0..3).map(|y| pi[y] * k[y] * (f64::from(u8::from(y == u)) - pi[u])).sum();
            assert!(close(e, *g));
        }
        // The forward direction differs.
        let forward: f64 = (0..3).map(|v| (1.0 / 3.0) * ((1.0f64 / 3.0).ln() - pi[v].ln())).sum();
        assert!(close(forward, 0.308994));
    }

    #[test]
    fn opd3_advantages_ratio_and_loss() {
        let samp = [-0.1f32, -2.0, -0.5, -0.05];
        let teacher = [-0.3f32, -0.5, -0.5, -1.0];
        let mask = [true; 4];
        let cfg = DistillationConfig { estimator: DistillEstimator::SampledToken, ..Default::default() };
        let a = opd_token_advantages(&samp, &teacher, &mask, 4, None, None, &cfg).expect("valid");
        for (x, e) in a.iter().zip([-0.2f32, 1.5, 0.0, -0.95]) {
            assert!((x - e).abs() < 1e-6, "{a:?}");
        }
        let a1 = opd_token_advantages(
            &samp,
            &teacher,
            &mask,
            4,
            None,
            None,
            &DistillationConfig { kl_discount: 1.0, ..cfg.clone() },
        )
        .expect("valid");
        for (x, e) in a1.iter().zip([0.35f32, 0.55, -0.95, -0.95]) {
            assert!((x - e).abs() < 1e-6, "{a1:?}");
        }
        let current = [-0.1f32, -1.9, -0.5, -0.15];
        assert!(close(importance_sampling_loss_host(&current, &samp, &a, &mask, 1.0).expect("valid"), -0.598161));
        assert!(close(importance_sampling_loss_host(&current, &samp, &a, &mask, 4.0).expect("valid"), -0.149540));
        assert!(close(importance_sampling_loss_host(&samp, &samp, &a, &mask, 1.0).expect("valid"), -0.35));
        // kl_penalty_coef 0.5 halves every advantage; the env advantage is added; bypass weights multiply.
        let half = opd_token_advantages(&samp, &teacher, &mask, 4, Some(&[1.0]), Some(&[1.0, 0.0, 1.0, 1.0]), &{
            DistillationConfig { kl_penalty_coef: 0.5, ..cfg.clone() }
        })
        .expect("valid");
        for (x, e) in half.iter().zip([0.9f32, 0.0, 1.0, 0.525]) {
            assert!((x - e).abs() < 1e-6, "{half:?}");
        }
        // Padding gets 0 and does not enter the reward-to-go.
        let p = opd_token_advantages(&[-0.1, 9.0], &[-0.3, 9.0], &[true, false], 2, None, None, &cfg).expect("valid");
        assert_eq!(p[1], 0.0);
    }

    #[test]
    fn the_one_pass_form_equals_the_reference() {
        let s = [1.0f32, 0.0, -1.0, 0.5, 2.0, -3.0];
        let q = [0.2f32, -0.4, 1.1, 3.0, -1.0, 0.0];
        for t in [1.0f32, 0.7] {
            let (kl, lq) = reverse_kl_from_logits(&s, &q, &[2, 0], 3, t).expect("valid");
            let scaled: Vec<f32> = s.iter().map(|x| x / t).collect();
            let qlp: Vec<f32> = q
                .chunks(3)
                .flat_map(|r| {
                    let m = r.iter().map(|x| x / t).fold(f32::NEG_INFINITY, f32::max);
                    let lse = m + r.iter().map(|x| (x / t - m).exp()).sum::<f32>().ln();
                    r.iter().map(move |x| x / t - lse).collect::<Vec<_>>()
                })
                .collect();
            let (reference, _) = reverse_kl_host(&scaled, &qlp, 3).expect("valid");
            for (a, b) in kl.iter().zip(&reference) {
                assert!((f64::from(*a) - b).abs() < 1e-6);
            }
            assert!((lq[0] - qlp[2]).abs() < 1e-6 && (lq[1] - qlp[3]).abs() < 1e-6);
        }
        assert!(reverse_kl_from_logits(&s, &q, &[3, 0], 3, 1.0).is_err());
        assert!(reverse_kl_from_logits(&s, &q, &[0], 3, 1.0).is_err());
        assert!(reverse_kl_from_logits(&s, &q, &[0, 0], 3, 0.0).is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(reverse_kl_host(&[1.0, 0.0], &[-1.0], 2).is_err());
        assert!(reverse_kl_host(&[1.0, f32::INFINITY], &[-1.0, -1.0], 2).is_err());
        assert!(reverse_kl_host(&[1.0, 0.0], &[0.5, -1.0], 2).is_err());
        assert!(reverse_kl_host(&[1.0, 0.0, 1.0], &[-1.0; 3], 2).is_err());
        let cfg = DistillationConfig::default();
        assert!(opd_token_advantages(&[f32::NAN], &[-1.0], &[true], 1, None, None, &cfg).is_err());
        assert!(opd_token_advantages(&[-1.0], &[-1.0], &[true], 0, None, None, &cfg).is_err());
        assert!(opd_token_advantages(&[-1.0], &[-1.0], &[true], 1, Some(&[0.0, 1.0]), None, &cfg).is_err());
        assert!(DistillationConfig { kl_penalty_coef: 0.0, ..Default::default() }.validate().is_err());
        assert!(DistillationConfig { kl_discount: 1.5, ..Default::default() }.validate().is_err());
        let bad_rock = RockBypassConfig { freeze_weight: 2.0, ..Default::default() };
        assert!(DistillationConfig { rock: Some(bad_rock), ..Default::default() }.validate().is_err());
        let no_window = RockBypassConfig { window: 0, ..Default::default() };
        assert!(DistillationConfig { rock: Some(no_window), ..Default::default() }.validate().is_err());
        assert!(importance_sampling_loss_host(&[-1.0], &[-1.0], &[1.0], &[true], 0.0).is_err());
        let cfg: DistillationConfig =
            toml::from_str("estimator = \"sampled_token\"\n[rock]\nfreeze_weight = 0.5\nalignment = \"context\"")
                .expect("valid");
        assert_eq!(cfg.rock.as_ref().map(|r| (r.freeze_weight, r.alignment)), Some((0.5, RockAlignment::Context)));
        assert!(toml::from_str::<DistillationConfig>("estimater = \"sampled_token\"").is_err());
    }
}
