//! HORA — "Where to Spend Rollouts: Hit-Utility Optimal Rollout Allocation for Group-Based RLVR" (Wang et al.,
//! arXiv 2605.07114).
//!
//! **RECONSTRUCTION.** The paper's abstract fixes the idea (a Beta posterior per prompt, the posterior probability that
//! at least one of the *additional* rollouts is correct, a globally optimal greedy allocator); everything else here is
//! this library's reconstruction (`../shared/methods/rollout-allocation.md` §3), with each open choice a parameter.
//!
//! ```text
//! p_i ~ Beta(a_i, b_i),  a_i = a_0 + s_i,  b_i = b_0 + f_i                      (uniform prior a_0 = b_0 = 1)
//! U_i(m) = 1 − B(a_i, b_i + m) / B(a_i, b_i) = 1 − Q_i(m),   log Q_i(m) = lnΓ(b+m) − lnΓ(b) − lnΓ(a+b+m) + lnΓ(a+b)
//! Δ_i(m) = U_i(m+1) − U_i(m) = Q_i(m) · a / (a+b+m)                           strictly decreasing: U_i is concave
//! maximise Σ_i U_i(m_i)  s.t.  Σ_i m_i = B,  l ≤ m_i ≤ u
//! ```
//!
//! Greedy is optimal for a separable concave objective with box constraints: start at `m_i = l`, repeatedly give one
//! rollout to the prompt with the largest marginal gain (a binary max-heap of `log Δ`, updated in O(1) by
//! `log Δ(m+1) = log Δ(m) + ln(b+m) − ln(a+b+m+1)`), ties to the lowest prompt index (gains are compared to a relative
//! 2^-28, so mathematically equal gains computed along different paths still tie). Cost
//! `O(B log N)`. When the budget is below `N·l`, the prompts with the largest `U_i(l)` get `l` each and the rest skip
//! this step (the spec's recommendation); a budget above `Σ u` is capped and the remainder reported.
//!
//! Count sources ([`PosteriorSource`]): **history** (default; cumulative, optionally decayed counts from
//! [`crate::PromptStatsStore`]) or an **in-step probe** of `n0` rollouts per prompt, after which the remaining budget is
//! the "additional allocation" ([`hora_allocate_after_probe`]). Defaults: Beta(1, 1), `l = 2`, `u = 4G`.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};
use statrs::function::gamma::ln_gamma;

/// A Beta posterior over a prompt's success probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BetaPosterior {
    /// α (prior + successes).
    pub a: f64,
    /// β (prior + failures).
    pub b: f64,
}

impl BetaPosterior {
    /// `Beta(a_0 + s, b_0 + f)`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for non-finite counts, negative counts or a non-positive result.
    pub fn from_counts(successes: f64, failures: f64, prior_a: f64, prior_b: f64) -> Result<Self> {
        for (name, v) in [("successes", successes), ("failures", failures)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid_parameter(name, v, "must be finite and >= 0"));
            }
        }
        let p = Self { a: prior_a + successes, b: prior_b + failures };
        if !(p.a.is_finite() && p.b.is_finite() && p.a > 0.0 && p.b > 0.0) {
            return Err(Error::invalid_parameter("prior", format!("({prior_a}, {prior_b})"), "α and β must be > 0"));
        }
        Ok(p)
    }

    /// `log Q(m) = log P(m rollouts all fail)`: the sum `Σ_{j<m} log1p(−a/(a+b+j))` for `m ≤ 64` (accurate even for
    /// huge counts, where differences of `lnΓ` cancel), the `lnΓ` form above.
    pub fn log_fail_all(&self, m: usize) -> f64 {
        if m <= 64 {
            return (0..m).map(|j| (-self.a / (self.a + self.b + j as f64)).ln_1p()).sum();
        }
        let m = m as f64;
        ln_gamma(self.b + m) - ln_gamma(self.b) - ln_gamma(self.a + self.b + m) + ln_gamma(self.a + self.b)
    }

    /// Hit utility `U(m)`: the posterior probability that at least one of `m` more rollouts is correct.
    pub fn hit_utility(&self, m: usize) -> f64 {
        -self.log_fail_all(m).exp_m1()
    }

    /// `log Δ(m) = log Q(m) + ln a − ln(a + b + m)`.
    pub fn log_gain(&self, m: usize) -> f64 {
        self.log_fail_all(m) + self.a.ln() - (self.a + self.b + m as f64).ln()
    }
}

/// Where the posterior counts come from (RECONSTRUCTION: the paper's choice is unknown).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PosteriorSource {
    /// Cumulative counts of earlier steps, decayed by γ per visit.
    History {
        /// γ (1 = no decay).
        decay: f64,
    },
    /// `n0` probe rollouts per prompt in the same step, then the rest of the budget.
    Probe {
        /// Probe rollouts per prompt.
        n0: usize,
    },
}

/// HORA parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HoraConfig {
    /// Prior α (1).
    pub prior_a: f64,
    /// Prior β (1).
    pub prior_b: f64,
    /// Minimum rollouts per prompt `l` (2: a group-relative baseline needs two).
    pub min_per_prompt: usize,
    /// Maximum per prompt `u`; `None` = 4·G with G = budget / prompts.
    pub max_per_prompt: Option<usize>,
    /// Count source.
    pub source: PosteriorSource,
}

impl Default for HoraConfig {
    fn default() -> Self {
        Self {
            prior_a: 1.0,
            prior_b: 1.0,
            min_per_prompt: 2,
            max_per_prompt: None,
            source: PosteriorSource::History { decay: 1.0 },
        }
    }
}

/// The rollouts per prompt and what they buy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Rollouts per prompt (0 = skipped this step).
    pub counts: Vec<usize>,
    /// Budget left over because every prompt reached its maximum.
    pub unallocated: usize,
    /// `Σ_i U_i(m_i)`: expected number of prompts with at least one correct rollout.
    pub expected_hits: f64,
}

/// `G` rollouts for each of `prompts` prompts (GRPO's default), with the hit utility under the given posteriors.
pub fn uniform_allocation(posteriors: &[BetaPosterior], group_size: usize) -> Allocation {
    let expected_hits = posteriors.iter().map(|p| p.hit_utility(group_size)).sum();
    Allocation { counts: vec![group_size; posteriors.len()], unallocated: 0, expected_hits }
}

/// Heap key: the log-gain mapped to an order-preserving `u64` whose low 24 bits are replaced by the inverted prompt
/// index, so one integer comparison orders by larger gain, then lower prompt index. Gains that agree to a relative
/// 2^-28 therefore tie (as mathematically equal gains computed along different paths must).
fn entry(log_gain: f64, prompt: usize) -> u64 {
    let bits = log_gain.to_bits();
    let ordered = if bits >> 63 == 1 { !bits } else { bits | (1 << 63) };
    (ordered & !PROMPT_MASK) | (PROMPT_MASK - prompt as u64)
}

const PROMPT_MASK: u64 = (1 << 24) - 1;

fn prompt_of(entry: u64) -> usize {
    (PROMPT_MASK - (entry & PROMPT_MASK)) as usize
}

/// A binary max-heap over the keys with the two operations the allocator needs: the runner-up (the larger child of
/// the root, so a prompt can take several rollouts in a row while it stays ahead) and replacing the top (Floyd's
/// sift: down to a leaf along the larger children, then back up).
#[derive(Debug)]
struct KeyHeap(Vec<u64>);

impl KeyHeap {
    fn new(keys: impl Iterator<Item = u64>) -> Self {
        let mut h = Self(Vec::new());
        for k in keys {
            h.0.push(k);
            h.sift_up(h.0.len() - 1);
        }
        h
    }

    fn top(&self) -> Option<u64> {
        self.0.first().copied()
    }

    fn runner_up(&self) -> Option<u64> {
        match (self.0.get(1), self.0.get(2)) {
            (Some(&a), Some(&b)) => Some(a.max(b)),
            (a, _) => a.copied(),
        }
    }

    /// Replaces the top with `key` (`None` removes it) and restores the heap.
    fn replace_top(&mut self, key: Option<u64>) {
        let k = match key {
            Some(k) => k,
            None => match self.0.pop() {
                Some(last) if !self.0.is_empty() => last,
                _ => return,
            },
        };
        let v = &mut self.0;
        let n = v.len();
        let mut i = 0;
        loop {
            let c = 2 * i + 1;
            if c >= n {
                break;
            }
            let c = if c + 1 < n && v[c + 1] > v[c] { c + 1 } else { c };
            v[i] = v[c];
            i = c;
        }
        v[i] = k;
        self.sift_up(i);
    }

    fn sift_up(&mut self, mut i: usize) {
        let v = &mut self.0;
        while i > 0 {
            let parent = (i - 1) / 2;
            if v[parent] >= v[i] {
                break;
            }
            v.swap(parent, i);
            i = parent;
        }
    }
}

/// Greedy allocation of `budget` rollouts with `min ≤ m_i ≤ max`.
///
/// # Errors
/// [`Error::InvalidParameter`] for `max < min`, `max == 0` or more than 2²⁴ − 1 prompts; [`Error::EmptyBatch`] for no
/// prompt.
pub fn hora_allocate(posteriors: &[BetaPosterior], budget: usize, min: usize, max: usize) -> Result<Allocation> {
    if posteriors.is_empty() {
        return Err(Error::EmptyBatch { op: "hora_allocate" });
    }
    if max == 0 || max < min {
        return Err(Error::invalid_parameter(
            "max_per_prompt",
            max,
            format!("must be >= max(1, min_per_prompt = {min})"),
        ));
    }
    let n = posteriors.len();
    if n > PROMPT_MASK as usize {
        return Err(Error::invalid_parameter("prompts", n, "at most 2^24 - 1 prompts per allocation"));
    }
    let mut counts = vec![0usize; n];
    // Which prompts start at `min`: all of them, or (budget < n·min) those whose minimum bundle is worth most.
    let active: Vec<usize> = if min == 0 || budget >= n * min {
        (0..n).collect()
    } else {
        let mut order: Vec<usize> = (0..n).collect();
        let value: Vec<f64> = posteriors.iter().map(|p| p.hit_utility(min)).collect();
        order.sort_by(|&i, &j| value[j].total_cmp(&value[i]).then(i.cmp(&j)));
        order.truncate(budget / min);
        order.sort_unstable();
        order
    };
    // `log_gain[i] = log Δ_i(m_i)`, one logarithm per step: log Δ(m+1) = log Δ(m) + ln((b+m)/(a+b+m+1)).
    // At the end log Q(m) = log Δ(m) − ln a + ln(a+b+m) gives U(m) without another pass over m.
    let mut log_gain = vec![0.0f64; n];
    for &i in &active {
        counts[i] = min;
        log_gain[i] = posteriors[i].log_gain(min);
    }
    let mut left = budget - active.len() * min;
    let mut heap = KeyHeap::new(active.iter().filter(|&&i| counts[i] < max).map(|&i| entry(log_gain[i], i)));
    while left > 0 {
        let Some(top) = heap.top() else { break };
        let i = prompt_of(top);
        let p = &posteriors[i];
        let runner_up = heap.runner_up();
        // Prompt i takes rollouts while its next gain still beats every other prompt's (the runner-up is fixed
        // meanwhile), then the heap is repaired once.
        loop {
            let m = counts[i] as f64;
            log_gain[i] += ((p.b + m) / (p.a + p.b + m + 1.0)).ln();
            counts[i] += 1;
            left -= 1;
            if counts[i] >= max {
                heap.replace_top(None);
                break;
            }
            let key = entry(log_gain[i], i);
            if left == 0 || runner_up.is_some_and(|r| r > key) {
                heap.replace_top(Some(key));
                break;
            }
        }
    }
    let expected_hits = posteriors
        .iter()
        .zip(&counts)
        .zip(&log_gain)
        .map(|((p, &m), &g)| if m == 0 { 0.0 } else { -(g - p.a.ln() + (p.a + p.b + m as f64).ln()).exp_m1() })
        .sum();
    Ok(Allocation { counts, unallocated: left, expected_hits })
}

/// Probe mode: after `n0` probe rollouts per prompt (whose successes and failures are folded into `posteriors`),
/// allocate the remaining `budget − N·n0` with `max(min − n0, 0) ≤ extra ≤ max − n0`; returns the total per prompt
/// (`n0 + extra`).
///
/// # Errors
/// [`Error::InvalidParameter`] when the probes alone exceed the budget or `max < n0`; the errors of
/// [`hora_allocate`].
pub fn hora_allocate_after_probe(
    posteriors: &[BetaPosterior],
    budget: usize,
    n0: usize,
    min: usize,
    max: usize,
) -> Result<Allocation> {
    let probes = posteriors.len() * n0;
    if probes > budget {
        return Err(Error::invalid_parameter("n0", n0, format!("{probes} probe rollouts exceed the budget {budget}")));
    }
    if max <= n0 {
        return Err(Error::invalid_parameter("max_per_prompt", max, format!("must exceed the probe size n0 = {n0}")));
    }
    let mut extra = hora_allocate(posteriors, budget - probes, min.saturating_sub(n0), max - n0)?;
    extra.counts.iter_mut().for_each(|c| *c += n0);
    extra.expected_hits = posteriors.iter().zip(&extra.counts).map(|(p, &m)| p.hit_utility(m - n0)).sum();
    Ok(extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(s: f64, f: f64) -> BetaPosterior {
        BetaPosterior::from_counts(s, f, 1.0, 1.0).expect("valid")
    }

    #[test]
    fn test_vector_2i_utilities() {
        for ((s, f), u) in [
            ((0.0, 3.0), [0.2, 0.333333, 0.428571, 0.5]),
            ((3.0, 0.0), [0.8, 0.933333, 0.971429, 0.985714]),
            ((2.0, 2.0), [0.5, 0.714286, 0.821429, 0.880952]),
            ((0.0, 0.0), [0.5, 0.666667, 0.75, 0.8]),
        ] {
            let p = post(s, f);
            for (m, v) in (1..=4).zip(u) {
                assert!((p.hit_utility(m) - v).abs() < 1e-6, "({s}, {f}) m = {m}");
                let gain = p.hit_utility(m) - p.hit_utility(m - 1);
                assert!((p.log_gain(m - 1).exp() - gain).abs() < 1e-12);
            }
            assert_eq!(p.hit_utility(0), 0.0);
        }
        // Large counts stay finite and accurate: U(1) = a / (a + b); both branches agree at the switch.
        let big = post(3e6, 7e6);
        assert!((big.hit_utility(1) - (3e6 + 1.0) / (1e7 + 2.0)).abs() < 1e-12);
        let p = post(2.0, 5.0);
        let product: f64 = (0..65).map(|j| (6.0 + j as f64) / (9.0 + j as f64)).product();
        assert!(
            (p.log_fail_all(65) - product.ln()).abs() < 1e-12
                && (p.log_fail_all(64) - (product * 73.0 / 70.0).ln()).abs() < 1e-12
        );
    }

    #[test]
    fn test_vector_2i_allocation() {
        let a =
            hora_allocate(&[post(0.0, 8.0), post(3.0, 3.0), post(7.0, 1.0), post(0.0, 0.0)], 16, 2, 8).expect("valid");
        assert_eq!(a.counts, vec![6, 4, 2, 4]);
        let b = hora_allocate(&[post(0.0, 40.0), post(3.0, 3.0), post(40.0, 0.0), post(1.0, 1.0)], 16, 2, 8)
            .expect("valid");
        assert_eq!(b.counts, vec![2, 6, 2, 6]);
        assert_eq!(a.unallocated, 0);
    }

    #[test]
    fn budget_edge_cases() {
        let p = [post(0.0, 0.0), post(5.0, 5.0), post(0.0, 20.0)];
        // Budget below N·l: the two best minimum bundles.
        let small = hora_allocate(&p, 5, 2, 8).expect("valid");
        assert_eq!(small.counts.iter().sum::<usize>(), 5);
        assert_eq!(small.counts[2], 0);
        // Budget above Σu.
        let big = hora_allocate(&p, 100, 2, 8).expect("valid");
        assert_eq!((big.counts, big.unallocated), (vec![8, 8, 8], 76));
        assert!(hora_allocate(&p, 10, 3, 2).is_err());
        assert!(hora_allocate(&[], 10, 2, 8).is_err());
        let probe = hora_allocate_after_probe(&p, 24, 2, 2, 16).expect("valid");
        assert_eq!(probe.counts.iter().sum::<usize>(), 24);
        assert!(probe.counts.iter().all(|&c| c >= 2));
        assert!(hora_allocate_after_probe(&p, 5, 2, 2, 16).is_err());
        assert!(BetaPosterior::from_counts(f64::NAN, 0.0, 1.0, 1.0).is_err());
    }
}
