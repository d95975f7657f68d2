//! [`RolloutBatch`]: the one type that flows through the stages of an RL step.
//!
//! `rollout` fills what was sampled and verified (prompts, responses, truncation flags, rewards, group sizes) and the
//! training layout derived from it: `[B, W + 1]` ids (`prompt ++ response`, right-padded) and the `[B, W]` mask of the
//! target positions that are response tokens (target `t` is token `t + 1` of the row). `score` adds [`Scores`]; `update`
//! reads both. A caller may change `rewards` between `rollout` and `score` (its own reward); everything else is derived
//! once, in [`RolloutBatch::new`].

use crate::{Result, TrainerError, tasks::Problem};

/// Rows `rows` (in that order) of a row-major array `width` wide.
pub fn gather_rows<T: Copy>(values: &[T], width: usize, rows: &[usize]) -> Vec<T> {
    rows.iter().flat_map(|&r| values[r * width..(r + 1) * width].iter().copied()).collect()
}

/// One sampled response.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// The response's token ids (EOS included when emitted).
    pub response: Vec<u32>,
    /// The response hit `max_response_len` without EOS.
    pub truncated: bool,
    /// The verifier's reward.
    pub reward: f32,
}

/// What `score` adds to a batch: advantages, the rollout and reference policies' per-token values, the loss rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// `[B]`: the reward the advantages were computed from: the verifier's, with the overlong penalty and KL in the
    /// reward applied when they are on.
    pub rewards: Vec<f32>,
    /// `(β, current_kl)` of KL in the reward (verl `actor/reward_kl_penalty_coeff`, `actor/reward_kl_penalty`).
    pub reward_kl: Option<(f64, f64)>,
    /// `[B]`: the group advantages.
    pub advantages: Vec<f32>,
    /// verl's `frac_reward_zero_std` of the scored groups.
    pub frac_reward_zero_std: f64,
    /// `[B, W]`: the rollout policy's entropy of each target position (at the rollout temperature).
    pub old_entropy: Vec<f32>,
    /// `[B, W]`: `log π_old` of each target token.
    pub old_log_prob: Vec<f32>,
    /// `[B, W]`: `log π_ref` of each target token (when the KL loss is on).
    pub ref_log_prob: Option<Vec<f32>>,
    /// `[B, W]`: the token advantages after token weighting.
    pub token_advantages: Vec<f32>,
    /// GRPO-VPS's segments and probe beliefs (when `rl.vps` is on).
    pub vps: Option<crate::rl::vps::VpsProbes>,
    /// `[B, W]`: the response tokens that enter the loss (the response mask less the rows balancing dropped).
    pub train_mask: Vec<bool>,
    /// On-policy distillation's teacher log-probs, reverse KL and bypass weights (when `rl.distillation` is on).
    pub distill: Option<crate::rl::distill::DistillScores>,
    /// SORT's repair rows and weights (when `rl.sort` is on).
    pub sort: Option<crate::rl::sort::SortScores>,
    /// HEAL's `(r_EDA, general)` per row (when `rl.heal` is on).
    pub heal: Option<(Vec<f32>, Vec<bool>)>,
    /// `[B, W]`: UG-TTT's per-token epistemic uncertainty `MI_t` (when `rl.ugttt` is on).
    pub epistemic: Option<Vec<f32>>,
    /// IMAX's `r_info` per row (when `rl.imax` is on; `λ r_info` is in `rewards`).
    pub info: Option<Vec<f32>>,
}

/// One RL step's rollouts, as they flow from `rollout` through `score` to `update`.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutBatch {
    /// The RL step (1-based) the batch was sampled for.
    pub step: usize,
    rollouts: Vec<Rollout>,
    /// The verifier's rewards, one per row (a caller may replace them before `score`).
    pub rewards: Vec<f32>,
    group_sizes: Vec<usize>,
    group_of: Vec<usize>,
    ids: Vec<Vec<u32>>,
    width: usize,
    response_mask: Vec<bool>,
    /// `frac_reward_zero_std` before DAPO's dynamic-sampling filter (`None` without it).
    pub frac_zero_std_before_filter: Option<f64>,
    /// The problem of each group (set by `rollout`; GRPO-VPS's probes verify against it). `None` for a batch built by
    /// hand.
    pub problems: Option<Vec<Problem>>,
    /// Added by `score`.
    pub scores: Option<Scores>,
}

impl RolloutBatch {
    /// A batch of groups of rollouts: `group_sizes[g]` consecutive rows answer prompt `g`; `pad` fills the ids.
    ///
    /// # Errors
    /// [`TrainerError::Shape`] when the group sizes do not add up to the rows, a group is empty, or the batch is.
    pub fn new(step: usize, rollouts: Vec<Rollout>, group_sizes: Vec<usize>, pad: u32) -> Result<Self> {
        if rollouts.is_empty() || group_sizes.contains(&0) || group_sizes.iter().sum::<usize>() != rollouts.len() {
            return Err(TrainerError::Shape(format!(
                "RolloutBatch: {} rollouts in groups of {group_sizes:?} (non-empty groups covering every row)",
                rollouts.len()
            )));
        }
        let group_of = group_sizes.iter().enumerate().flat_map(|(g, &n)| std::iter::repeat_n(g, n)).collect();
        let width = rollouts.iter().map(|r| r.prompt.len() + r.response.len()).max().unwrap_or(1).max(2);
        let mut ids = Vec::with_capacity(rollouts.len());
        let mut response_mask = Vec::with_capacity(rollouts.len() * (width - 1));
        for r in &rollouts {
            let (p, n) = (r.prompt.len(), r.response.len());
            let mut s = r.prompt.clone();
            s.extend(&r.response);
            s.resize(width, pad);
            ids.push(s);
            response_mask.extend((1..width).map(|pos| pos >= p && pos < p + n));
        }
        let rewards = rollouts.iter().map(|r| r.reward).collect();
        Ok(Self {
            step,
            rollouts,
            rewards,
            group_sizes,
            group_of,
            ids,
            width: width - 1,
            response_mask,
            frac_zero_std_before_filter: None,
            problems: None,
            scores: None,
        })
    }

    /// Rows `B`.
    pub fn len(&self) -> usize {
        self.rollouts.len()
    }

    /// Never true: a batch has at least one row.
    pub fn is_empty(&self) -> bool {
        self.rollouts.is_empty()
    }

    /// The rollouts, in row order.
    pub fn rollouts(&self) -> &[Rollout] {
        &self.rollouts
    }

    /// Rows per group.
    pub fn group_sizes(&self) -> &[usize] {
        &self.group_sizes
    }

    /// The group of each row.
    pub fn group_of(&self) -> &[usize] {
        &self.group_of
    }

    /// `[B, W + 1]` ids: `prompt ++ response`, right-padded.
    pub fn ids(&self) -> &[Vec<u32>] {
        &self.ids
    }

    /// `W`: the target positions per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// `[B, W]`: true where the target is a response token.
    pub fn response_mask(&self) -> &[bool] {
        &self.response_mask
    }

    /// Response tokens of the batch (EOS included).
    pub fn num_response_tokens(&self) -> usize {
        self.rollouts.iter().map(|r| r.response.len()).sum()
    }

    /// Rows `rows` of a `[B, W]` array of this batch.
    pub fn gather_rows<T: Copy>(&self, values: &[T], rows: &[usize]) -> Vec<T> {
        gather_rows(values, self.width, rows)
    }

    /// The flat positions (into a `[B, W]` array) of row `row`'s response tokens, in order.
    pub fn response_positions(&self, row: usize) -> impl Iterator<Item = usize> + '_ {
        (row * self.width..(row + 1) * self.width).filter(|&i| self.response_mask[i])
    }

    /// The entries of a `[B, W]` array at row `row`'s response tokens, in order (one per response token).
    pub fn response_values(&self, values: &[f32], row: usize) -> Vec<f32> {
        self.response_positions(row).map(|i| values[i]).collect()
    }

    /// The scores, or a typed error naming the stage that needs them.
    ///
    /// # Errors
    /// [`TrainerError::Stage`] when `score` has not run on this batch.
    pub fn scored(&self, stage: &'static str) -> Result<&Scores> {
        self.scores
            .as_ref()
            .ok_or_else(|| TrainerError::Stage { stage, reason: "call score() on the batch first".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(prompt: &[u32], response: &[u32], reward: f32) -> Rollout {
        Rollout { prompt: prompt.to_vec(), response: response.to_vec(), truncated: false, reward }
    }

    #[test]
    fn layout_of_a_hand_built_batch() {
        let b = RolloutBatch::new(3, vec![rollout(&[5, 6], &[7, 1], 1.0), rollout(&[5, 6], &[1], 0.0)], vec![2], 0)
            .expect("valid");
        assert_eq!(b.ids(), &[vec![5, 6, 7, 1], vec![5, 6, 1, 0]]);
        assert_eq!(b.width(), 3);
        // Targets: position t predicts token t + 1.
        assert_eq!(b.response_mask(), &[false, true, true, false, true, false]);
        assert_eq!(b.group_of(), &[0, 0]);
        assert_eq!(b.num_response_tokens(), 3);
        assert_eq!(b.gather_rows(b.response_mask(), &[1]), vec![false, true, false]);
        let rows = forkrl_core::ResponseRows::new(b.response_mask(), b.width(), b.group_sizes()).expect("valid");
        assert_eq!(rows.layout().lengths(), &[2, 1]);
        assert!(matches!(b.scored("update"), Err(TrainerError::Stage { stage: "update", .. })));
    }

    #[test]
    fn group_sizes_must_cover_the_rows() {
        let r = vec![rollout(&[1], &[2], 0.0)];
        assert!(RolloutBatch::new(1, r.clone(), vec![2], 0).is_err());
        assert!(RolloutBatch::new(1, r, vec![1, 0], 0).is_err());
        assert!(RolloutBatch::new(1, Vec::new(), Vec::new(), 0).is_err());
    }
}
