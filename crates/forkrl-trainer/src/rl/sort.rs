//! SORT's repair update in the trainer (`[rl.sort]`; the library side is `forkrl_advantage::sort`, spec
//! `../shared/methods/sparse-selection-and-distillation.md` §2; every formula is a RECONSTRUCTION).
//!
//! - **Trigger**: a group whose rollouts all fail, whose problem has a worked solution `y*` (the built-in tasks' SFT
//!   targets, a JSONL dataset's `solution`). Rollouts are generated as before and GRPO's advantages are untouched.
//! - **Plan** ([`plan_from_solution`], a deterministic rule standing in for the paper's planner model): the solution's
//!   steps (split at line breaks and `|`), each cut before its last `=` (so no step states its result); a last step
//!   without `=` is the bare answer and is dropped; at most 5 steps. It is put before the prompt:
//!   `"Plan: s1; s2\n" + prompt`, or `"s1,s2:" + prompt` for a tokenizer without those characters (the built-in
//!   character tokenizer). No plan (no step survives, the text cannot be encoded, or it would pass the context
//!   limit): the weights fall back to `b_t` (Dynamic Fine-Tuning), as the spec says.
//! - **Scorings** at score time, by the rollout policy (the weights the update starts from), at temperature 1 (the
//!   imitation is SFT's): `log b_t` without and `log c_t` with the plan, aligned on `y*`.
//! - **Loss**: each mini-batch adds `β · mean_q (−Σ_t w_t log π(y*_t) / Σ_t w_t)` over the repair prompts of its groups.

use forkrl_advantage::{SortConfig, sort_needs_repair, sort_weights};

use crate::{
    Result,
    batch::{Rollout, RolloutBatch},
    config::CheckedConfig,
    model::{Vocab, policy::Policy, token_stats_host},
};

/// The plan's steps of a worked solution (see the module doc); empty when no step is left.
pub fn plan_from_solution(solution: &str) -> Vec<String> {
    let raw: Vec<&str> = solution.split(['\n', '|']).map(str::trim).filter(|s| !s.is_empty()).collect();
    let last = raw.len().saturating_sub(1);
    raw.iter()
        .enumerate()
        .filter_map(|(i, step)| match step.rfind('=') {
            Some(at) => Some(step[..at].trim().to_string()),
            None if i == last => None,
            None => Some(step.split_whitespace().take(8).collect::<Vec<_>>().join(" ")),
        })
        .filter(|s| !s.is_empty())
        .take(5)
        .collect()
}

/// The plan-conditioned prompt's ids: `"Plan: s1; s2\n" + prompt`, else `"s1,s2:" + prompt`; `None` without steps or
/// when neither text can be encoded.
fn plan_prompt(vocab: &Vocab, steps: &[String], prompt: &str) -> Option<Vec<u32>> {
    if steps.is_empty() {
        return None;
    }
    [format!("Plan: {}\n{prompt}", steps.join("; ")), format!("{}:{prompt}", steps.join(","))]
        .iter()
        .find_map(|text| vocab.encode(text).ok())
}

/// What SORT adds to a scored batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SortScores {
    /// The repair prompts with their references: row `q` answers group `groups[q]`, its response is `y*`.
    pub repair: Option<Box<RolloutBatch>>,
    /// The group of each repair row.
    pub groups: Vec<usize>,
    /// `[Q, W']`: the token weights over the repair batch's response positions (0 elsewhere).
    pub weights: Vec<f32>,
    /// Repair rows that had a plan (the others use `w = b`).
    pub planned: usize,
    /// Mean weight, mean `log c − log b` and the share of tokens with `c > b`, over the planned rows' `y*` tokens.
    pub stats: (f64, f64, f64),
}

impl SortScores {
    fn empty() -> Self {
        Self { repair: None, groups: Vec::new(), weights: Vec::new(), planned: 0, stats: (0.0, 0.0, 0.0) }
    }
}

/// Finds the repair groups of `batch`, builds their reference rows and weights them.
///
/// # Errors
/// Tokenizer and forward errors.
pub fn score(
    policy: &Policy,
    vocab: &Vocab,
    batch: &RolloutBatch,
    config: &CheckedConfig,
    sort: &SortConfig,
) -> Result<SortScores> {
    let Some(problems) = &batch.problems else { return Ok(SortScores::empty()) };
    let max_len = config.rl.max_response_len;
    let (mut plain, mut planned_rows, mut groups, mut has_plan) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    for (g, (&n, problem)) in batch.group_sizes().iter().zip(problems).enumerate() {
        let rewards = &batch.rewards[start..start + n];
        let prompt = batch.rollouts()[start].prompt.clone();
        start += n;
        let Some(solution) = problem.solution.as_deref().filter(|_| sort_needs_repair(rewards, true)) else { continue };
        let mut reference = vocab.encode_continuation(solution)?;
        reference.push(vocab.eos[0]);
        reference.truncate(max_len);
        let plan_prompt = plan_prompt(vocab, &plan_from_solution(solution), &problem.prompt)
            .filter(|ids| ids.len() + reference.len() <= policy.max_len());
        has_plan.push(plan_prompt.is_some());
        let row = |prompt: Vec<u32>| Rollout { prompt, response: reference.clone(), truncated: false, reward: 0.0 };
        planned_rows.push(row(plan_prompt.unwrap_or_else(|| prompt.clone())));
        plain.push(row(prompt));
        groups.push(g);
    }
    if plain.is_empty() {
        return Ok(SortScores::empty());
    }
    let q = plain.len();
    let repair = RolloutBatch::new(batch.step, plain, vec![1; q], vocab.pad)?;
    let planned = RolloutBatch::new(batch.step, planned_rows, vec![1; q], vocab.pad)?;
    let micro = config.log_prob_micro_batch_size().unwrap_or(q);
    let (_, log_b) = token_stats_host(policy, repair.ids(), repair.width(), 1.0, micro)?;
    let (_, log_c) = token_stats_host(policy, planned.ids(), planned.width(), 1.0, micro)?;
    let mut weights = vec![0.0f32; q * repair.width()];
    let (mut sum_w, mut sum_gain, mut gains, mut tokens) = (0.0f64, 0.0f64, 0usize, 0usize);
    for r in 0..q {
        let b = repair.response_values(&log_b, r);
        let c = if has_plan[r] { planned.response_values(&log_c, r) } else { b.clone() };
        let w = sort_weights(&b, &c, &vec![true; b.len()], &sort.weighting)?;
        for (pos, wt) in repair.response_positions(r).zip(&w) {
            weights[pos] = *wt;
        }
        if has_plan[r] {
            for ((&wt, &lb), &lc) in w.iter().zip(&b).zip(&c) {
                sum_w += f64::from(wt);
                sum_gain += f64::from(lc) - f64::from(lb);
                gains += usize::from(lc > lb);
                tokens += 1;
            }
        }
    }
    let t = tokens.max(1) as f64;
    Ok(SortScores {
        repair: Some(Box::new(repair)),
        groups,
        weights,
        planned: has_plan.iter().filter(|&&p| p).count(),
        stats: (sum_w / t, sum_gain / t, gains as f64 / t),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_drop_every_result_and_keep_at_most_five_steps() {
        assert_eq!(plan_from_solution("8+4=12|12+35=47|47+27=74"), ["8+4", "12+35", "47+27"]);
        assert_eq!(plan_from_solution("17+25=42"), ["17+25"]);
        assert_eq!(plan_from_solution("15|24"), ["15"], "the bare last step is the answer");
        let long = "First add the apples.\nThen x = 3 + 4 = 7\n\n1\n2\n3\n4\n5";
        assert_eq!(plan_from_solution(long), ["First add the apples.", "Then x = 3 + 4", "1", "2", "3"]);
        assert!(plan_from_solution("=12|  |\n").is_empty());
        assert!(plan_from_solution("42").is_empty());
    }
}
