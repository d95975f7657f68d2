//! ReasonMaxxer — "Rethinking RL for LLM Reasoning: It's Sparse Policy Selection, Not Capability Learning" (Akgül,
//! Kannan, Neiswanger, Prasanna, arXiv 2605.06241; official pipeline `farukakgul/ReasonMaxxer`, read through its
//! released scripts). Offline and RL-free: a frozen base model's entropy picks the decision tokens of a fixed set of
//! base rollouts once, and a contrastive loss moves only those tokens while a KL anchor holds every other position to
//! the base.
//!
//! ```text
//! gate       D_i = { t generated : H_base(t) > τ_i }        τ_i = τ_pos if r_i = 1 else τ_neg; H at T = 1, strict >
//! advantage  A_i = clip((r_i − r̄) / max(pstd(r), ε), ±c)     ε = 1e-8, c = 2.5 (population std, floored)
//! decision   Â_i = A_i (A_i > 0), β_neg·A_i (A_i < 0);   E_i = { t ∈ D_i : A_i ≠ 0 }
//!            L_dec,i = Σ_{t∈E_i} Â_i · CE_t / |E_i|          CE_t = −log p_θ(y_t | s_t); 0 when E_i = ∅
//! anchor     N_i = valid positions of sequence i not in E_i  (prompt positions included unless kl_on_generated_only)
//!            L_anc,i = Σ_{t∈N_i} KL(p_base(·|s_t) ‖ p_θ(·|s_t)) / |N_i|       (forward KL from the frozen base)
//! total      L = mean_i ( L_dec,i + λ · L_anc,i )            λ = kl_weight = 0.2; seq-mean-token-mean as released
//! ```
//!
//! The loss is linear in `CE_t` and `KL_t` with coefficients fixed before training, so [`reasonmaxxer_coefficients`]
//! returns them (`L = Σ_t c_t·CE_t + Σ_t a_t·KL_t`) and a trainer multiplies its differentiable per-token values by
//! them; [`reasonmaxxer_loss_host`] is the f64 reference. Options of the released code kept here: `beta_neg`,
//! `correct_sft` (positive decision tokens only), `fullseq` (no gate: every generated token is a decision token, the
//! "no gate" control), `kl_on_generated_only`, separate `tau_neg`, and the step-time options that read the current
//! policy: `neg_prob_floor` ([`apply_neg_prob_floor`]), `delta_hinge` ([`apply_delta_hinge`]) and `adaptive_betaneg`
//! ([`AdaptiveBetaNeg`]).
//!
//! **RECONSTRUCTION** (the spec, `../shared/methods/sparse-selection-and-distillation.md` §1.4): a fixed τ = 1.4 does
//! not transfer to a tiny model with a small vocabulary, so τ defaults to the `(1 − f)` quantile of the training set's
//! generated-token base entropies with `f = gated_fraction = 0.05` (the paper's 5.2 % at its best τ); an absolute
//! `tau` overrides it ([`gate_threshold`]).

use forkrl_core::{Error, Result, numeric::check_len};
use serde::{Deserialize, Serialize};

/// What the decision tokens are trained toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionObjective {
    /// `Â · CE` on positive and negative decision tokens (the paper's Eq. 6, `adv_ce`).
    #[default]
    AdvCe,
    /// Positive decision tokens only (`correct_sft`, the paper's positive-only ablation).
    CorrectSft,
    /// The released `delta_hinge`: `|A|·relu(m⁺ − Δ_t)` on positive and `β_neg·|A|·relu(Δ_t + m⁻)` on negative
    /// decision tokens, `Δ_t = log p_θ(y_t) − log p_base(y_t)`: a token stops being pushed once it is `m⁺` nats above
    /// (or `m⁻` below) the base ([`apply_delta_hinge`]; the margins are RECONSTRUCTION, not in the spec).
    DeltaHinge,
}

/// Which tokens are decision tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateVariant {
    /// Generated tokens whose base entropy exceeds τ.
    #[default]
    Gated,
    /// Every generated token (the released `fullseq` control: no gate).
    Fullseq,
}

/// ReasonMaxxer's settings; defaults are the released script's, except τ (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReasonMaxxerConfig {
    /// Absolute gate τ (nats); overrides `gated_fraction` when set.
    pub tau: Option<f32>,
    /// τ for rollouts with `r ≤ 0` (`tau_neg`); `None` uses τ.
    pub tau_neg: Option<f32>,
    /// Target share of generated tokens gated when `tau` is unset (RECONSTRUCTION, default 0.05).
    pub gated_fraction: f32,
    /// Temperature of the base entropy (the released code: 1.0, not the sampling temperature).
    pub gate_temperature: f32,
    /// λ of the anchor (`kl_weight`).
    pub kl_weight: f32,
    /// `adv_clip`.
    pub adv_clip: f32,
    /// `adv_eps`: the floor of the population std.
    pub adv_eps: f32,
    /// `beta_neg`: scale of negative advantages.
    pub beta_neg: f32,
    /// The anchor covers generated positions only (default: prompt positions too).
    pub kl_on_generated_only: bool,
    /// `adv_ce` or `correct_sft`.
    pub decision_objective: DecisionObjective,
    /// `gated` or `fullseq`.
    pub variant: GateVariant,
    /// `neg_prob_floor`: negative decision tokens whose current probability is already at or below it leave the loss
    /// (the unbounded negative term stops pushing them); 0 = off, the released default.
    pub neg_prob_floor: f32,
    /// `m⁺` of `delta_hinge` (nats; RECONSTRUCTION default 1).
    pub hinge_margin_pos: f32,
    /// `m⁻` of `delta_hinge` (nats; RECONSTRUCTION default 1).
    pub hinge_margin_neg: f32,
    /// The released `adaptive_betaneg` ([`AdaptiveBetaNeg`]): `β_neg` shrinks while the positive decision tokens'
    /// mean `Δ` falls. Off by default, as released.
    pub adaptive_betaneg: bool,
    /// EMA decay of the mean `Δ` that `adaptive_betaneg` follows (RECONSTRUCTION default 0.9; not in the spec).
    pub adaptive_betaneg_ema: f32,
}

impl Default for ReasonMaxxerConfig {
    fn default() -> Self {
        Self {
            tau: None,
            tau_neg: None,
            gated_fraction: 0.05,
            gate_temperature: 1.0,
            kl_weight: 0.2,
            adv_clip: 2.5,
            adv_eps: 1e-8,
            beta_neg: 1.0,
            kl_on_generated_only: false,
            decision_objective: DecisionObjective::AdvCe,
            variant: GateVariant::Gated,
            neg_prob_floor: 0.0,
            hinge_margin_pos: 1.0,
            hinge_margin_neg: 1.0,
            adaptive_betaneg: false,
            adaptive_betaneg_ema: 0.9,
        }
    }
}

impl ReasonMaxxerConfig {
    /// Checks the parameters once, where a configuration is built.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let finite_pos = |name: &'static str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid_parameter(name, v, "must be finite and > 0"))
            }
        };
        for (name, v) in [("tau", self.tau), ("tau_neg", self.tau_neg)] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(Error::invalid_parameter(name, v, "must be finite and ≥ 0 (nats)"));
            }
        }
        if !(self.gated_fraction > 0.0 && self.gated_fraction <= 1.0) {
            return Err(Error::invalid_parameter("gated_fraction", self.gated_fraction, "must lie in (0, 1]"));
        }
        finite_pos("gate_temperature", self.gate_temperature)?;
        finite_pos("adv_clip", self.adv_clip)?;
        finite_pos("adv_eps", self.adv_eps)?;
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return Err(Error::invalid_parameter("kl_weight", self.kl_weight, "must be finite and ≥ 0"));
        }
        if !(0.0..1.0).contains(&self.neg_prob_floor) {
            return Err(Error::invalid_parameter("neg_prob_floor", self.neg_prob_floor, "must lie in [0, 1)"));
        }
        if !(self.beta_neg.is_finite() && self.beta_neg >= 0.0) {
            return Err(Error::invalid_parameter("beta_neg", self.beta_neg, "must be finite and ≥ 0"));
        }
        for (name, v) in [("hinge_margin_pos", self.hinge_margin_pos), ("hinge_margin_neg", self.hinge_margin_neg)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid_parameter(name, v, "must be finite and ≥ 0 (nats)"));
            }
        }
        if !(0.0..1.0).contains(&self.adaptive_betaneg_ema) {
            return Err(Error::invalid_parameter(
                "adaptive_betaneg_ema",
                self.adaptive_betaneg_ema,
                "must lie in [0, 1)",
            ));
        }
        Ok(())
    }
}

/// `A_i = clip((r_i − r̄) / max(pstd(r), ε), ±c)` per group (population std floored at ε; a singleton group has
/// σ = ε and therefore `A = 0`).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the group sizes do not cover the rewards; [`Error::InvalidParameter`] for an empty
/// group, a non-finite reward or bad `adv_clip` / `adv_eps`.
pub fn reasonmaxxer_advantages(
    rewards: &[f32],
    group_sizes: &[usize],
    adv_clip: f32,
    adv_eps: f32,
) -> Result<Vec<f32>> {
    check_len("reasonmaxxer_advantages: Σ group_sizes vs rewards", group_sizes.iter().sum(), rewards.len())?;
    if group_sizes.contains(&0) {
        return Err(Error::invalid_parameter("group_sizes", format!("{group_sizes:?}"), "groups must be non-empty"));
    }
    if let Some(r) = rewards.iter().find(|r| !r.is_finite()) {
        return Err(Error::invalid_parameter("rewards", r, "must be finite"));
    }
    if !(adv_clip > 0.0 && adv_eps > 0.0) {
        return Err(Error::invalid_parameter("adv_clip/adv_eps", format!("{adv_clip}/{adv_eps}"), "must be > 0"));
    }
    let mut out = Vec::with_capacity(rewards.len());
    let mut start = 0;
    for &g in group_sizes {
        let r = &rewards[start..start + g];
        let mean = r.iter().map(|&x| f64::from(x)).sum::<f64>() / g as f64;
        let var = r.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / g as f64;
        let sigma = var.sqrt().max(f64::from(adv_eps));
        let c = f64::from(adv_clip);
        out.extend(r.iter().map(|&x| ((f64::from(x) - mean) / sigma).clamp(-c, c) as f32));
        start += g;
    }
    Ok(out)
}

/// The gate τ for a target gated fraction `f` (RECONSTRUCTION): the largest threshold such that the tokens strictly
/// above it are at most `max(1, ⌊f·n⌋)` of the `n` masked entropies (exactly that many without ties). With every
/// token tied nothing is gated.
///
/// # Errors
/// [`Error::ShapeMismatch`] for mismatched lengths; [`Error::InvalidParameter`] for no masked token, a non-finite
/// entropy or `f ∉ (0, 1]`.
pub fn gate_threshold(entropy: &[f32], mask: &[bool], fraction: f32) -> Result<f32> {
    check_len("gate_threshold: entropy vs mask", entropy.len(), mask.len())?;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::invalid_parameter("gated_fraction", fraction, "must lie in (0, 1]"));
    }
    let mut v: Vec<f32> = entropy.iter().zip(mask).filter(|(_, m)| **m).map(|(&h, _)| h).collect();
    if let Some(h) = v.iter().find(|h| !h.is_finite()) {
        return Err(Error::invalid_parameter("entropy", h, "must be finite"));
    }
    if v.is_empty() {
        return Err(Error::invalid_parameter("mask", "no token", "the gate needs at least one generated token"));
    }
    v.sort_by(f32::total_cmp);
    let n = v.len();
    let k = ((f64::from(fraction) * n as f64).floor() as usize).clamp(1, n);
    // τ = the (n − k)-th smallest when k < n; every token is gated when k = n (τ just below the minimum).
    Ok(if k == n { v[0] - f32::EPSILON.max(v[0].abs() * f32::EPSILON) } else { v[n - k - 1] })
}

/// The decision set `[B, W]`: generated positions whose base entropy is strictly above the row's τ (`tau_pos` when
/// the row's reward is positive, `tau_neg` otherwise); with [`GateVariant::Fullseq`], every generated position.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `entropy`, `generated` and `rewards × width` disagree.
pub fn decision_gate(
    entropy: &[f32],
    generated: &[bool],
    rewards: &[f32],
    width: usize,
    (tau_pos, tau_neg): (f32, f32),
    variant: GateVariant,
) -> Result<Vec<bool>> {
    check_len("decision_gate: entropy vs generated", entropy.len(), generated.len())?;
    check_len("decision_gate: generated vs rewards × width", generated.len(), rewards.len() * width)?;
    Ok((0..generated.len())
        .map(|i| {
            let tau = if rewards[i / width.max(1)] > 0.0 { tau_pos } else { tau_neg };
            generated[i] && (variant == GateVariant::Fullseq || entropy[i] > tau)
        })
        .collect())
}

/// Per-token loss coefficients of ReasonMaxxer's objective over `B` sequences of width `W`: `L = Σ_t c_t·CE_t +
/// Σ_t a_t·KL_t` with `CE_t = −log p_θ(y_t)` and `KL_t = KL(p_base ‖ p_θ)` at position `t` (the whole batch is the
/// mean over its sequences, as the released accumulation does).
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonMaxxerCoefficients {
    /// `[B, W]`: `Â_i / |E_i| / B` on the effective decision tokens, 0 elsewhere.
    pub ce: Vec<f32>,
    /// `[B, W]`: `λ / |N_i| / B` on the anchor positions, 0 elsewhere.
    pub kl: Vec<f32>,
    /// `[B, W]`: the effective decision set `E`.
    pub effective: Vec<bool>,
    /// `#E / #generated` (the released `gated fraction` diagnostic after removing `A = 0` rows).
    pub effective_fraction: f64,
}

/// `B` training sequences of width `W` as ReasonMaxxer's loss sees them (all `[B, W]` row-major except `advantages`).
#[derive(Debug, Clone, Copy)]
pub struct DecisionRows<'a> {
    /// The decision set `D` (from [`decision_gate`]).
    pub decision: &'a [bool],
    /// The positions that exist: prompt and response targets, no padding.
    pub valid: &'a [bool],
    /// The generated (response) positions.
    pub generated: &'a [bool],
    /// `[B]`: the rows' advantages `A_i`.
    pub advantages: &'a [f32],
    /// `W`.
    pub width: usize,
}

impl DecisionRows<'_> {
    fn check(&self) -> Result<()> {
        let n = self.advantages.len() * self.width;
        check_len("reasonmaxxer: decision [B, W]", self.decision.len(), n)?;
        check_len("reasonmaxxer: valid [B, W]", self.valid.len(), n)?;
        check_len("reasonmaxxer: generated [B, W]", self.generated.len(), n)
    }
}

/// The coefficients of [`ReasonMaxxerCoefficients`] for `rows`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the arrays disagree with `advantages × width`; the config's errors.
pub fn reasonmaxxer_coefficients(
    rows: &DecisionRows<'_>,
    config: &ReasonMaxxerConfig,
) -> Result<ReasonMaxxerCoefficients> {
    config.validate()?;
    rows.check()?;
    let DecisionRows { decision, valid, generated, advantages, width } = *rows;
    let b = advantages.len();
    let (mut ce, mut kl, mut effective) = (vec![0.0f32; b * width], vec![0.0f32; b * width], vec![false; b * width]);
    let (mut n_eff, mut n_gen) = (0usize, 0usize);
    let scale = 1.0 / b.max(1) as f64;
    for i in 0..b {
        let a = f64::from(advantages[i]);
        let a_hat = match (a > 0.0, config.decision_objective) {
            (true, _) => a,
            (false, DecisionObjective::AdvCe | DecisionObjective::DeltaHinge) => f64::from(config.beta_neg) * a,
            (false, DecisionObjective::CorrectSft) => 0.0,
        };
        let row = i * width..(i + 1) * width;
        for t in row.clone() {
            effective[t] = decision[t] && a_hat != 0.0;
        }
        let e = effective[row.clone()].iter().filter(|&&x| x).count();
        let anchor = |t: usize| valid[t] && !effective[t] && (!config.kl_on_generated_only || generated[t]);
        let n = row.clone().filter(|&t| anchor(t)).count();
        n_eff += e;
        n_gen += generated[row.clone()].iter().filter(|&&x| x).count();
        for t in row {
            if effective[t] {
                ce[t] = (a_hat / e as f64 * scale) as f32;
            } else if anchor(t) {
                kl[t] = (f64::from(config.kl_weight) / n as f64 * scale) as f32;
            }
        }
    }
    let effective_fraction = if n_gen == 0 { 0.0 } else { n_eff as f64 / n_gen as f64 };
    Ok(ReasonMaxxerCoefficients { ce, kl, effective, effective_fraction })
}

/// The released `neg_prob_floor`: zeroes the CE coefficients of negative decision tokens (coefficient < 0) whose
/// current probability `exp(log_prob)` is at or below `floor` (`floor = 0` changes nothing). The other coefficients,
/// and the denominators they were divided by, stay as they are. Returns how many were dropped.
///
/// # Errors
/// [`Error::ShapeMismatch`] for mismatched lengths.
pub fn apply_neg_prob_floor(ce: &mut [f32], log_prob: &[f32], floor: f32) -> Result<usize> {
    check_len("apply_neg_prob_floor: log_prob vs ce", log_prob.len(), ce.len())?;
    let mut dropped = 0;
    if floor > 0.0 {
        let ln_floor = floor.ln();
        for (c, &lp) in ce.iter_mut().zip(log_prob) {
            if *c < 0.0 && lp <= ln_floor {
                *c = 0.0;
                dropped += 1;
            }
        }
    }
    Ok(dropped)
}

/// The released `delta_hinge` objective on the coefficients of [`reasonmaxxer_coefficients`] (computed with
/// `adv_ce`'s `Â / |E_i| / B`): `|A|·relu(m⁺ − Δ)` is `|A|·CE + const` where `Δ < m⁺` and flat elsewhere (and
/// `β_neg·|A|·relu(Δ + m⁻)` is `−β_neg·|A|·CE + const` where `Δ > −m⁻`), so its gradient is `adv_ce`'s on the tokens
/// whose hinge is active and 0 on the others: this zeroes the coefficients of inactive tokens (positive `c` with
/// `Δ ≥ m⁺`, negative `c` with `Δ ≤ −m⁻`), `Δ = log_prob − base_log_prob`. Returns how many were zeroed.
///
/// # Errors
/// [`Error::ShapeMismatch`] for mismatched lengths; [`Error::InvalidParameter`] for a negative or non-finite margin.
pub fn apply_delta_hinge(
    ce: &mut [f32],
    log_prob: &[f32],
    base_log_prob: &[f32],
    (margin_pos, margin_neg): (f32, f32),
) -> Result<usize> {
    check_len("apply_delta_hinge: log_prob vs ce", log_prob.len(), ce.len())?;
    check_len("apply_delta_hinge: base_log_prob vs ce", base_log_prob.len(), ce.len())?;
    for (name, m) in [("hinge_margin_pos", margin_pos), ("hinge_margin_neg", margin_neg)] {
        if !(m.is_finite() && m >= 0.0) {
            return Err(Error::invalid_parameter(name, m, "must be finite and ≥ 0 (nats)"));
        }
    }
    let mut zeroed = 0;
    for ((c, &lp), &lb) in ce.iter_mut().zip(log_prob).zip(base_log_prob) {
        let delta = f64::from(lp) - f64::from(lb);
        let inactive = (*c > 0.0 && delta >= f64::from(margin_pos)) || (*c < 0.0 && delta <= -f64::from(margin_neg));
        if inactive {
            *c = 0.0;
            zeroed += 1;
        }
    }
    Ok(zeroed)
}

/// The value of the `delta_hinge` decision loss (f64 reference): `Σ_t w_t·relu(m⁺ − Δ_t)` over tokens with `w_t > 0`
/// plus `Σ_t |w_t|·relu(Δ_t + m⁻)` over tokens with `w_t < 0`, with `w` the `adv_ce` coefficients.
pub fn delta_hinge_loss_host(ce: &[f32], log_prob: &[f32], base_log_prob: &[f32], margins: (f32, f32)) -> f64 {
    ce.iter()
        .zip(log_prob)
        .zip(base_log_prob)
        .map(|((&c, &lp), &lb)| {
            let delta = f64::from(lp) - f64::from(lb);
            let c = f64::from(c);
            if c > 0.0 {
                c * (f64::from(margins.0) - delta).max(0.0)
            } else {
                -c * (delta + f64::from(margins.1)).max(0.0)
            }
        })
        .sum()
}

/// The released `adaptive_betaneg` controller: an EMA of the positive decision tokens' mean `Δ = log p_θ − log p_base`
/// (`dlogp_plus`); when a step's EMA is below the previous one (the slope is negative, the negative term is dragging
/// the positive tokens down) `β_neg ← max(0.05, 0.7·β_neg)`, otherwise `β_neg ← min(β_neg⁰, 1.05·β_neg)`, `β_neg⁰`
/// the configured value. The EMA decay is RECONSTRUCTION (a parameter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveBetaNeg {
    /// The current `β_neg`.
    pub beta_neg: f32,
    /// The configured `β_neg⁰` (the ceiling of the restore).
    pub ceiling: f32,
    /// The EMA's decay.
    pub decay: f32,
    /// The EMA of `dlogp_plus` (`None` before the first step with positive decision tokens).
    pub ema: Option<f64>,
}

impl AdaptiveBetaNeg {
    /// The shrink factor.
    pub const SHRINK: f32 = 0.7;
    /// The restore factor.
    pub const RESTORE: f32 = 1.05;
    /// The floor of `β_neg`.
    pub const FLOOR: f32 = 0.05;

    /// The controller at `config`'s `β_neg` and decay.
    pub fn new(config: &ReasonMaxxerConfig) -> Self {
        Self { beta_neg: config.beta_neg, ceiling: config.beta_neg, decay: config.adaptive_betaneg_ema, ema: None }
    }

    /// Records one step's `dlogp_plus` (NaN = no positive decision token: nothing changes); returns the new `β_neg`.
    pub fn update(&mut self, dlogp_plus: f64) -> f32 {
        if !dlogp_plus.is_finite() {
            return self.beta_neg;
        }
        let d = f64::from(self.decay);
        let next = self.ema.map_or(dlogp_plus, |e| d * e + (1.0 - d) * dlogp_plus);
        if let Some(prev) = self.ema {
            self.beta_neg = if next < prev {
                (self.beta_neg * Self::SHRINK).max(Self::FLOOR.min(self.ceiling))
            } else {
                (self.beta_neg * Self::RESTORE).min(self.ceiling)
            };
        }
        self.ema = Some(next);
        self.beta_neg
    }
}

/// The f64 reference of ReasonMaxxer's loss, computed the way the module doc writes it (per sequence, then the mean):
/// `ce` and `kl` are `[B, W]` per-position values.
///
/// # Errors
/// As [`reasonmaxxer_coefficients`].
pub fn reasonmaxxer_loss_host(
    ce: &[f32],
    kl: &[f32],
    rows: &DecisionRows<'_>,
    config: &ReasonMaxxerConfig,
) -> Result<f64> {
    config.validate()?;
    rows.check()?;
    let DecisionRows { decision, valid, generated, advantages, width } = *rows;
    let b = advantages.len();
    check_len("reasonmaxxer_loss_host: ce", ce.len(), b * width)?;
    check_len("reasonmaxxer_loss_host: kl", kl.len(), b * width)?;
    let mut total = 0.0f64;
    for i in 0..b {
        let a = f64::from(advantages[i]);
        let a_hat = if a > 0.0 {
            a
        } else if config.decision_objective == DecisionObjective::CorrectSft {
            0.0
        } else {
            f64::from(config.beta_neg) * a
        };
        let (mut dec, mut ne, mut anc, mut nn) = (0.0f64, 0usize, 0.0f64, 0usize);
        for t in i * width..(i + 1) * width {
            if decision[t] && a_hat != 0.0 {
                dec += f64::from(ce[t]);
                ne += 1;
            } else if valid[t] && (!config.kl_on_generated_only || generated[t]) {
                anc += f64::from(kl[t]);
                nn += 1;
            }
        }
        let l_dec = if ne == 0 { 0.0 } else { a_hat * dec / ne as f64 };
        let l_anc = if nn == 0 { 0.0 } else { anc / nn as f64 };
        total += l_dec + f64::from(config.kl_weight) * l_anc;
    }
    Ok(total / b.max(1) as f64)
}

/// `KL(p ‖ q) = Σ_v p_v (ln p_v − ln q_v)` of two probability vectors (f64; `0 · ln 0 = 0`). The anchor's direction
/// is `KL(p_base ‖ p_θ)`.
pub fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    p.iter().zip(q).filter(|(pv, _)| **pv > 0.0).map(|(pv, qv)| pv * (pv.ln() - qv.ln())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn rm1_advantages() {
        let a = reasonmaxxer_advantages(&[1.0, 0.0, 0.0, 0.0, 1.0], &[5], 2.5, 1e-8).expect("valid");
        for (x, e) in a.iter().zip([1.224745, -0.816497, -0.816497, -0.816497, 1.224745]) {
            assert!(close(f64::from(*x), e), "{a:?}");
        }
        assert_eq!(reasonmaxxer_advantages(&[1.0; 3], &[3], 2.5, 1e-8).expect("valid"), vec![0.0; 3]);
        let mut r = vec![0.0f32; 10];
        r[0] = 1.0;
        let a = reasonmaxxer_advantages(&r, &[10], 2.5, 1e-8).expect("valid");
        assert!(close(f64::from(a[0]), 2.5) && close(f64::from(a[1]), -0.333333), "{a:?}");
        assert_eq!(reasonmaxxer_advantages(&[1.0], &[1], 2.5, 1e-8).expect("valid"), vec![0.0]);
        assert!(reasonmaxxer_advantages(&[1.0], &[2], 2.5, 1e-8).is_err());
        assert!(reasonmaxxer_advantages(&[f32::NAN], &[1], 2.5, 1e-8).is_err());
    }

    #[test]
    fn rm2_rm3_gate_decision_loss_and_anchor() {
        let h = [0.3f32, 1.6, 0.9, 2.1, 1.4];
        let generated = [true; 5];
        let d = decision_gate(&h, &generated, &[1.0], 5, (1.4, 1.4), GateVariant::Gated).expect("valid");
        assert_eq!(d, vec![false, true, false, true, false]);
        let ce = [0.05f32, 0.9, 0.2, 1.3, 0.6];
        // KL(base ‖ θ) at the non-decision positions 0, 2, 4 (RM-3).
        let kl_at = |pb: [f64; 3], pt: [f64; 3]| kl_divergence(&pb, &pt) as f32;
        let kl = [
            kl_at([0.7, 0.2, 0.1], [0.6, 0.3, 0.1]),
            0.0,
            kl_at([0.3, 0.3, 0.4], [0.3, 0.3, 0.4]),
            0.0,
            kl_at([0.5, 0.5, 0.0], [0.4, 0.4, 0.2]),
        ];
        assert!(close(f64::from(kl[0]), 0.026812) && close(f64::from(kl[4]), 0.223144));
        assert!(close(kl_divergence(&[0.6, 0.3, 0.1], &[0.7, 0.2, 0.1]), 0.029149));
        let cfg = ReasonMaxxerConfig::default();
        let valid = [true; 5];
        let only_dec = ReasonMaxxerConfig { kl_weight: 0.0, ..cfg };
        for (a, beta, expected) in
            [(1.224745f32, 1.0, 1.347220), (-0.816497, 1.0, -0.898147), (-0.816497, 0.5, -0.449073)]
        {
            let c = ReasonMaxxerConfig { beta_neg: beta, ..only_dec };
            let rows = DecisionRows { decision: &d, valid: &valid, generated: &generated, advantages: &[a], width: 5 };
            let l = reasonmaxxer_loss_host(&ce, &kl, &rows, &c).expect("valid");
            assert!(close(l, expected), "{a} {beta}: {l}");
        }
        let rows =
            DecisionRows { decision: &d, valid: &valid, generated: &generated, advantages: &[1.224745], width: 5 };
        let l = reasonmaxxer_loss_host(&ce, &kl, &rows, &cfg).expect("valid");
        assert!(close(l, 1.363883), "{l}");
        // Gradient on the decision tokens: ∂L/∂log p_t = −Â/|E| = −c_t.
        let c = reasonmaxxer_coefficients(&rows, &cfg).expect("valid");
        assert!(close(f64::from(c.ce[1]), 0.612372) && close(f64::from(c.ce[3]), 0.612372));
        assert!(close(f64::from(c.kl[0]), 0.2 / 3.0) && c.kl[1] == 0.0);
        assert!((c.effective_fraction - 0.4).abs() < 1e-12);
    }

    #[test]
    fn coefficients_equal_the_reference_and_edge_cases() {
        // Two rows of width 4: row 0 has a zero advantage (its decision tokens go to the anchor), prompt positions
        // are valid but not generated.
        let decision = [false, true, true, false, false, false, true, false];
        let valid = [true, true, true, true, true, true, true, false];
        let generated = [false, true, true, true, false, true, true, false];
        let ce = [0.1f32, 0.7, 0.3, 0.2, 0.4, 0.5, 0.9, 9.0];
        let kl = [0.01f32, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 9.0];
        for cfg in [
            ReasonMaxxerConfig::default(),
            ReasonMaxxerConfig { kl_on_generated_only: true, ..Default::default() },
            ReasonMaxxerConfig { decision_objective: DecisionObjective::CorrectSft, ..Default::default() },
            ReasonMaxxerConfig { beta_neg: 0.3, ..Default::default() },
        ] {
            for adv in [[0.0f32, -1.5], [2.0, 1.0]] {
                let rows = DecisionRows {
                    decision: &decision,
                    valid: &valid,
                    generated: &generated,
                    advantages: &adv,
                    width: 4,
                };
                let c = reasonmaxxer_coefficients(&rows, &cfg).expect("valid");
                let linear: f64 = (0..8).map(|t| f64::from(c.ce[t] * ce[t] + c.kl[t] * kl[t])).sum();
                let reference = reasonmaxxer_loss_host(&ce, &kl, &rows, &cfg).expect("valid");
                assert!((linear - reference).abs() < 1e-6, "{cfg:?} {adv:?}: {linear} vs {reference}");
            }
        }
        // E = ∅ and N = ∅ give 0, not NaN.
        let none = [false; 2];
        let rows = DecisionRows { decision: &none, valid: &none, generated: &none, advantages: &[1.0], width: 2 };
        let c = reasonmaxxer_coefficients(&rows, &Default::default()).expect("valid");
        assert_eq!((c.ce, c.kl, c.effective_fraction), (vec![0.0; 2], vec![0.0; 2], 0.0));
    }

    #[test]
    fn the_delta_hinge_keeps_only_active_tokens_and_its_gradient_is_the_hinges() {
        // Coefficients: two positive tokens, two negative; Δ = lp − lb = [0.5, 1.5, −0.5, −1.5]; margins 1.
        let mut ce = vec![0.25, 0.25, -0.5, -0.5];
        let (lp, lb) = (vec![-1.0f32, -0.5, -2.5, -3.5], vec![-1.5f32, -2.0, -2.0, -2.0]);
        let zeroed = apply_delta_hinge(&mut ce, &lp, &lb, (1.0, 1.0)).expect("valid");
        // Positive Δ 1.5 ≥ m⁺ and negative Δ −1.5 ≤ −m⁻ leave; the others keep adv_ce's coefficient.
        assert_eq!((zeroed, ce.clone()), (2, vec![0.25, 0.0, -0.5, 0.0]));
        // By hand: 0.25·relu(1 − 0.5) + 0.5·relu(−0.5 + 1) = 0.125 + 0.25.
        let w = [0.25f32, 0.25, -0.5, -0.5];
        assert!(close(delta_hinge_loss_host(&w, &lp, &lb, (1.0, 1.0)), 0.375));
        // The surrogate −Σ c·lp has the hinge loss's gradient in lp (finite differences).
        for t in 0..4 {
            let h = 1e-3f32;
            let mut up = lp.clone();
            up[t] += h;
            let fd = (delta_hinge_loss_host(&w, &up, &lb, (1.0, 1.0))
                - delta_hinge_loss_host(&w, &lp, &lb, (1.0, 1.0)))
                / f64::from(h);
            assert!((fd + f64::from(ce[t])).abs() < 1e-3, "token {t}: {fd} vs {}", -ce[t]);
        }
        assert!(apply_delta_hinge(&mut ce, &lp, &lb[..3], (1.0, 1.0)).is_err());
        assert!(apply_delta_hinge(&mut ce, &lp, &lb, (-1.0, 1.0)).is_err());
    }

    #[test]
    fn adaptive_betaneg_shrinks_while_the_positive_delta_falls_and_restores_to_its_ceiling() {
        let config = ReasonMaxxerConfig {
            beta_neg: 1.0,
            adaptive_betaneg: true,
            adaptive_betaneg_ema: 0.5,
            ..Default::default()
        };
        let mut c = AdaptiveBetaNeg::new(&config);
        assert_eq!(c.update(1.0), 1.0, "the first step only starts the EMA");
        assert_eq!(c.update(0.0), 0.7, "EMA 1 → 0.5: shrink");
        assert!((c.update(0.0) - 0.49).abs() < 1e-6, "0.5 → 0.25: shrink again");
        assert!((c.update(f64::NAN) - 0.49).abs() < 1e-6, "no positive token: unchanged");
        assert!((c.update(2.0) - 0.5145).abs() < 1e-6, "0.25 → 1.125: restore ×1.05");
        for _ in 0..40 {
            c.update(0.0);
        }
        assert_eq!(c.beta_neg, AdaptiveBetaNeg::FLOOR, "floored");
        for k in 0..200 {
            c.update(f64::from(k));
        }
        assert_eq!(c.beta_neg, 1.0, "restored no further than the configured β_neg");
        assert!(ReasonMaxxerConfig { adaptive_betaneg_ema: 1.0, ..config }.validate().is_err());
        assert!(ReasonMaxxerConfig { hinge_margin_neg: f32::NAN, ..config }.validate().is_err());
    }

    #[test]
    fn the_negative_floor_drops_only_improbable_negative_tokens() {
        let mut ce = [0.5f32, -0.5, -0.5, 0.0];
        let lp = [(0.01f32).ln(), (0.01f32).ln(), (0.5f32).ln(), (0.01f32).ln()];
        assert_eq!(apply_neg_prob_floor(&mut ce.clone(), &lp, 0.0).expect("valid"), 0);
        assert_eq!(apply_neg_prob_floor(&mut ce, &lp, 0.05).expect("valid"), 1);
        assert_eq!(ce, [0.5, 0.0, -0.5, 0.0], "positive and probable negative tokens stay");
        assert!(apply_neg_prob_floor(&mut ce, &lp[..2], 0.05).is_err());
        assert!(ReasonMaxxerConfig { neg_prob_floor: 1.0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn threshold_hits_the_target_fraction_and_bad_input_is_refused() {
        let h: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
        let mask = vec![true; 100];
        let tau = gate_threshold(&h, &mask, 0.05).expect("valid");
        assert_eq!(h.iter().filter(|&&x| x > tau).count(), 5);
        let tau = gate_threshold(&h, &mask, 1.0).expect("valid");
        assert_eq!(h.iter().filter(|&&x| x > tau).count(), 100);
        let tau = gate_threshold(&[0.5; 4], &[true; 4], 0.25).expect("valid");
        assert_eq!([0.5f32; 4].iter().filter(|&&x| x > tau).count(), 0, "ties: nothing strictly above");
        assert!(gate_threshold(&[1.0], &[false], 0.1).is_err());
        assert!(gate_threshold(&[f32::NAN], &[true], 0.1).is_err());
        assert!(gate_threshold(&[1.0], &[true], 0.0).is_err());
        let d =
            decision_gate(&[2.0, 2.0], &[true, true], &[1.0, 0.0], 1, (1.0, 3.0), GateVariant::Gated).expect("valid");
        assert_eq!(d, vec![true, false], "τ_neg applies to the wrong rollout");
        let d = decision_gate(&[0.0, 2.0], &[true, false], &[1.0], 2, (1.0, 1.0), GateVariant::Fullseq).expect("valid");
        assert_eq!(d, vec![true, false]);
        assert!(ReasonMaxxerConfig { gated_fraction: 0.0, ..Default::default() }.validate().is_err());
        assert!(ReasonMaxxerConfig { tau: Some(f32::NAN), ..Default::default() }.validate().is_err());
        assert!(ReasonMaxxerConfig { kl_weight: -1.0, ..Default::default() }.validate().is_err());
        let cfg: ReasonMaxxerConfig = toml::from_str("tau = 1.4\nvariant = \"fullseq\"").expect("valid");
        assert_eq!((cfg.tau, cfg.variant, cfg.kl_weight), (Some(1.4), GateVariant::Fullseq, 0.2));
        assert!(toml::from_str::<ReasonMaxxerConfig>("taux = 1.0").is_err());
    }
}
