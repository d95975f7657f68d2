//! The built-in verifiable task: two-step arithmetic with a chain-of-thought target, and its verifier.
//!
//! A problem is `a ± b ± c` with `a, b ∈ [0, max_operand]` written with a fixed number of digits (zero-padded, so every
//! prompt has the same length) and `c` one digit. The prompt is `"aa+bb-c="`; the chain-of-thought target is the
//! intermediate result, `|`, the final result: `"42|34"`. The verifier extracts the **last number** of the response
//! and compares it with the true value; the response is untrusted model output, so extraction never panics and reads
//! at most the response once.
//!
//! The train and test splits never overlap: every problem is an index into the finite problem space, and the split is
//! by a hash of that index (test if the hash falls in the test share), so a problem cannot be in both.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The prompt text, e.g. `"17+25-8="`.
    pub prompt: String,
    /// The chain-of-thought target, e.g. `"42|34"`.
    pub solution: String,
    /// The final answer.
    pub answer: i64,
}

/// The task's difficulty knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArithmeticConfig {
    /// Largest first and second operand (at most 99: two digits).
    pub max_operand: u32,
    /// Share of the problem space held out for evaluation.
    pub test_share: f64,
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        Self { max_operand: 49, test_share: 0.2 }
    }
}

impl ArithmeticConfig {
    fn space(&self) -> u64 {
        let m = u64::from(self.max_operand) + 1;
        m * m * 10 * 2
    }

    fn problem(&self, index: u64) -> Problem {
        let m = u64::from(self.max_operand) + 1;
        let (a, rest) = (index % m, index / m);
        let (b, rest) = (rest % m, rest / m);
        let (c, op) = (rest % 10, rest / 10 % 2);
        let (a, b, c) = (a as i64, b as i64, c as i64);
        let x = a + b;
        let (sign, y) = if op == 0 { ('+', x + c) } else { ('-', x - c) };
        Problem { prompt: format!("{a:02}+{b:02}{sign}{c}="), solution: format!("{x}|{y}"), answer: y }
    }

    fn is_test(&self, index: u64) -> bool {
        (forkrl_core::numeric::splitmix64(index) as f64 / u64::MAX as f64) < self.test_share
    }

    /// `n` problems of one split drawn with `seed` (with replacement for the train split).
    pub fn sample(&self, n: usize, test: bool, seed: u64) -> Vec<Problem> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let i = rng.random_range(0..self.space());
            if self.is_test(i) == test {
                out.push(self.problem(i));
            }
        }
        out
    }

    /// The whole test split in a fixed order (at most `limit` problems, evenly spaced over the space).
    pub fn test_set(&self, limit: usize) -> Vec<Problem> {
        let all: Vec<u64> = (0..self.space()).filter(|&i| self.is_test(i)).collect();
        let step = (all.len() / limit.max(1)).max(1);
        all.iter().step_by(step).take(limit).map(|&i| self.problem(i)).collect()
    }
}

/// The last (optionally signed) integer in `text`, if any. Bounded: one pass, numbers longer than 18 digits are
/// rejected rather than overflowing.
pub fn last_number(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let mut end = bytes.len();
    loop {
        while end > 0 && !bytes[end - 1].is_ascii_digit() {
            end -= 1;
        }
        if end == 0 {
            return None;
        }
        let mut start = end;
        while start > 0 && bytes[start - 1].is_ascii_digit() {
            start -= 1;
        }
        if end - start <= 18 {
            let negative = start > 0 && bytes[start - 1] == b'-' && (start < 2 || !bytes[start - 2].is_ascii_digit());
            let value: i64 = text[start..end].parse().ok()?;
            return Some(if negative { -value } else { value });
        }
        end = start;
    }
}

/// Reward 1 when the response's last number equals the answer, else 0.
pub fn reward(response: &str, answer: i64) -> f32 {
    if last_number(response) == Some(answer) { 1.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn problems_and_splits() {
        let cfg = ArithmeticConfig::default();
        let p = cfg.problem(17 + 25 * 50 + 8 * 2500 + 2500 * 10);
        assert_eq!((p.prompt.as_str(), p.solution.as_str(), p.answer), ("17+25-8=", "42|34", 34));
        let train = cfg.sample(500, false, 1);
        let test = cfg.test_set(200);
        assert!(train.iter().all(|t| !test.contains(t)));
        assert!(train.iter().all(|t| t.prompt.len() == 8));
        assert_eq!(reward("42|34", 34), 1.0);
        assert_eq!(reward("42|35", 34), 0.0);
    }

    #[test]
    fn extraction_by_hand() {
        assert_eq!(last_number("12|-7"), Some(-7));
        assert_eq!(last_number("3-7"), Some(7));
        assert_eq!(last_number("no digits"), None);
        assert_eq!(last_number("x 1234567890123456789012 y 5"), Some(5));
        assert_eq!(last_number("1234567890123456789012"), None);
    }

    proptest! {
        #[test]
        fn extraction_never_panics_on_untrusted_output(s in ".{0,200}") {
            let _ = last_number(&s);
            let _ = reward(&s, 3);
        }
    }
}
