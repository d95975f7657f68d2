//! Token weighting as one contract: how a rollout's per-sequence advantages `Â_i` become per-token advantages
//! `Â_{i,t}`, chosen by one serde config ([`TokenWeighting`], TOML `[rl.token_weighting] kind = ...`) and applied to one
//! view of the rollout ([`RolloutView`]).
//!
//! | kind | `Â_{i,t}` | needs | source |
//! |---|---|---|---|
//! | `none` | `Â_i` (GRPO) | — | — |
//! | `eapo` | `Â_i + α·sign(Â_i)·sg(clip((H_t − μ_H)/(σ_H + ε), ±|Â_i|/φ))` | entropy | [`crate::eapo`] |
//! | `opefo` | `w_t·Â_i`, `w_t = 1 ± λ*` by the sign of the entropy flow | entropy, log-probs | [`crate::opefo`] |
//! | `shear` | `ω_t·Â_i`, span-level Wasserstein weights within the group | last-layer hidden states | [`crate::shear`] |
//!
//! The view holds `[B, W]` rows of a trainer (`prompt ++ response`, the response tokens where the mask is true); the
//! methods that need the left-aligned `BatchLayout` (SHEAR) get it through [`forkrl_core::ResponseRows`], here and
//! nowhere else. Every weighting is computed from the rollout policy, before any update, and is a constant of the loss.

use forkrl_core::{Error, ResponseRows, Result, numeric::check_len};
use serde::{Deserialize, Serialize};

use crate::{
    eapo::{EapoConfig, eapo_advantages},
    opefo::opefo_advantages,
    shear::{ShearConfig, shear_weights},
};

/// Per-token reweighting of the sequence advantages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenWeighting {
    /// `Â_t = Â` for every token of a response (GRPO).
    #[default]
    None,
    /// EAPO entropy-aware advantages ([`crate::eapo`]).
    Eapo(EapoConfig),
    /// OPEFO entropy-flow weights ([`crate::opefo`]).
    Opefo,
    /// SHEAR span-level Wasserstein weights ([`crate::shear`]) from the rollout policy's last-layer hidden states.
    /// RECONSTRUCTION choice of the trainer: the hidden state of a response token is the one that emitted it
    /// (position `t − 1`).
    Shear(ShearConfig),
}

/// One rollout batch as token weighting sees it: `B` rows of width `W`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct RolloutView<'a> {
    /// `W`.
    pub width: usize,
    /// `[B, W]`: true on the response tokens.
    pub response_mask: &'a [bool],
    /// Rows per group, in row order (`Σ = B`).
    pub group_sizes: &'a [usize],
    /// `[B]`: the sequence advantages `Â_i`.
    pub advantages: &'a [f32],
    /// `[B, W]`: the rollout policy's entropy of each position (needed by EAPO and OPEFO).
    pub entropy: Option<&'a [f32]>,
    /// `[B, W]`: the rollout policy's log-prob of each position's token (needed by OPEFO).
    pub log_prob: Option<&'a [f32]>,
    /// `([B, W, dim], dim)`: the hidden state that emitted each position's token (needed by SHEAR).
    pub hidden: Option<(&'a [f32], usize)>,
}

impl RolloutView<'_> {
    /// `Â_i` broadcast to every position of row `i`, `[B, W]`.
    pub fn sequence_advantages(&self) -> Vec<f32> {
        let w = self.width.max(1);
        (0..self.advantages.len() * self.width).map(|i| self.advantages[i / w]).collect()
    }
}

impl TokenWeighting {
    /// verl-style name of the weighting (`none`, `eapo`, `opefo`, `shear`).
    pub fn name(&self) -> &'static str {
        match self {
            TokenWeighting::None => "none",
            TokenWeighting::Eapo(_) => "eapo",
            TokenWeighting::Opefo => "opefo",
            TokenWeighting::Shear(_) => "shear",
        }
    }

    /// Whether [`RolloutView::hidden`] must be filled (a trainer runs an extra forward for it).
    pub fn needs_hidden_states(&self) -> bool {
        matches!(self, TokenWeighting::Shear(_))
    }

    /// Checks the parameters once, where a configuration is built.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        match self {
            TokenWeighting::None | TokenWeighting::Opefo => Ok(()),
            TokenWeighting::Eapo(c) => c.validate(),
            TokenWeighting::Shear(c) if c.window == 0 || c.stride == 0 => {
                Err(Error::invalid_parameter("window/stride", format!("{}/{}", c.window, c.stride), "must be > 0"))
            }
            TokenWeighting::Shear(_) => Ok(()),
        }
    }

    /// The per-token advantages `[B, W]`. `none` and `shear` keep `Â_i` (times ω) on padding; `eapo` and `opefo` give
    /// 0 there (padding never enters a loss).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the view lacks an input the weighting needs; [`Error::ShapeMismatch`] for
    /// arrays that do not match `[B, W]`; the errors of the method.
    pub fn token_advantages(&self, view: &RolloutView<'_>) -> Result<Vec<f32>> {
        let b = view.advantages.len();
        check_len("token weighting: response_mask [B, W]", view.response_mask.len(), b * view.width)?;
        let need = |what: &'static str, x: Option<&'_ [f32]>| -> Result<()> {
            match x {
                Some(v) => check_len("token weighting: [B, W] input", v.len(), b * view.width),
                None => Err(Error::invalid_parameter(what, "None", format!("{} needs it", self.name()))),
            }
        };
        let seq = view.sequence_advantages();
        match self {
            TokenWeighting::None => Ok(seq),
            TokenWeighting::Eapo(c) => {
                need("entropy", view.entropy)?;
                eapo_advantages(&seq, view.entropy.unwrap_or_default(), view.response_mask, c)
            }
            TokenWeighting::Opefo => {
                need("entropy", view.entropy)?;
                need("log_prob", view.log_prob)?;
                let (entropy, log_prob) = (view.entropy.unwrap_or_default(), view.log_prob.unwrap_or_default());
                Ok(opefo_advantages(&seq, log_prob, entropy, view.response_mask)?.0)
            }
            TokenWeighting::Shear(c) => {
                let Some((hidden, dim)) = view.hidden else {
                    return Err(Error::invalid_parameter("hidden", "None", "shear needs the hidden states"));
                };
                let rows = ResponseRows::new(view.response_mask, view.width, view.group_sizes)?;
                let compact = rows.compact(hidden, dim)?;
                let omega = rows.scatter(&shear_weights(&compact, dim, rows.layout(), view.advantages, c)?, 1.0)?;
                Ok(seq.iter().zip(&omega).map(|(a, o)| a * o).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two groups of one row each, W = 4: row 0 = prompt + 3 response tokens, row 1 = prompt + 2.
    fn view<'a>(mask: &'a [bool], adv: &'a [f32], h: &'a [f32], lp: &'a [f32]) -> RolloutView<'a> {
        RolloutView {
            width: 4,
            response_mask: mask,
            group_sizes: &[1, 1],
            advantages: adv,
            entropy: Some(h),
            log_prob: Some(lp),
            hidden: None,
        }
    }

    const MASK: [bool; 8] = [false, true, true, true, false, true, true, false];

    #[test]
    fn none_broadcasts_the_sequence_advantage() {
        let (h, lp) = ([0.0f32; 8], [0.0f32; 8]);
        let out = TokenWeighting::None.token_advantages(&view(&MASK, &[1.0, -0.5], &h, &lp)).expect("valid");
        assert_eq!(out, vec![1.0, 1.0, 1.0, 1.0, -0.5, -0.5, -0.5, -0.5]);
    }

    #[test]
    fn eapo_equals_the_direct_call_and_moves_high_entropy_tokens_up() {
        let adv = [1.0f32, 1.0];
        let h = [0.0f32, 0.1, 2.0, 0.1, 0.0, 0.1, 0.1, 0.0];
        let lp = [0.0f32; 8];
        let w = TokenWeighting::Eapo(EapoConfig::default());
        let out = w.token_advantages(&view(&MASK, &adv, &h, &lp)).expect("valid");
        let seq = [1.0f32; 8];
        assert_eq!(out, eapo_advantages(&seq, &h, &MASK, &EapoConfig::default()).expect("valid"));
        assert!(out[2] > 1.0 && out[1] < 1.0, "{out:?}");
        assert_eq!(out[0], 0.0, "padding");
    }

    #[test]
    fn opefo_equals_the_direct_call() {
        let adv = [1.0f32, -1.0];
        let h = [0.0f32, 0.5, 1.0, 0.2, 0.0, 0.7, 0.1, 0.0];
        let lp = [0.0f32, -0.3, -1.2, -0.1, 0.0, -0.9, -0.05, 0.0];
        let out = TokenWeighting::Opefo.token_advantages(&view(&MASK, &adv, &h, &lp)).expect("valid");
        let seq = [1.0f32, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0];
        assert_eq!(out, opefo_advantages(&seq, &lp, &h, &MASK).expect("valid").0);
    }

    #[test]
    fn shear_equals_the_left_aligned_call_and_missing_inputs_are_errors() {
        // One group of two rows, hidden states of dim 2.
        let mask = [false, true, true, true, false, true, true, false];
        let hidden: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let adv = [1.0f32, -1.0];
        let config = ShearConfig::default();
        let v = RolloutView {
            width: 4,
            response_mask: &mask,
            group_sizes: &[2],
            advantages: &adv,
            entropy: None,
            log_prob: None,
            hidden: Some((&hidden, 2)),
        };
        let out = TokenWeighting::Shear(config).token_advantages(&v).expect("valid");
        // The reference: hidden states moved left by hand, layout [2, 3].
        let compact: Vec<f32> = [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 0, 0]
            .iter()
            .enumerate()
            .map(|(k, &i)| if k >= 10 { 0.0 } else { hidden[i] })
            .collect();
        let layout = forkrl_core::BatchLayout::from_lengths(&[2], &[3, 2], 3).expect("valid");
        let omega = shear_weights(&compact, 2, &layout, &adv, &config).expect("valid");
        let expect = [1.0, omega[0], omega[1], omega[2], -1.0, -omega[3], -omega[4], -1.0];
        assert_eq!(out, expect);
        let no_hidden = RolloutView { hidden: None, ..v };
        assert!(TokenWeighting::Shear(config).token_advantages(&no_hidden).is_err());
        let no_entropy = RolloutView { entropy: None, ..v };
        assert!(TokenWeighting::Opefo.token_advantages(&no_entropy).is_err());
    }

    #[test]
    fn toml_spelling_and_validation() {
        #[derive(Debug, Deserialize)]
        struct Cfg {
            token_weighting: TokenWeighting,
        }
        let c: Cfg = toml::from_str("[token_weighting]\nkind = \"eapo\"\nalpha = 0.3\n").expect("valid");
        assert_eq!(c.token_weighting, TokenWeighting::Eapo(EapoConfig { alpha: 0.3, ..EapoConfig::default() }));
        assert!(toml::from_str::<Cfg>("[token_weighting]\nkind = \"eapo\"\nalpah = 0.3\n").is_err());
        let bad = TokenWeighting::Eapo(EapoConfig { phi: 0.0, ..EapoConfig::default() });
        assert!(matches!(bad.validate(), Err(Error::InvalidParameter { name: "phi", .. })));
        let bad = TokenWeighting::Shear(ShearConfig { window: 0, ..ShearConfig::default() });
        assert!(bad.validate().is_err());
    }
}
