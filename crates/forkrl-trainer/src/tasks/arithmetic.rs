//! The built-in verifiable task: multi-step arithmetic with a chain-of-thought target, and its verifier.
//!
//! A problem of `operations = k` steps is `a + b ± c₁ … ± c_{k−1}` with `a, b ∈ [0, max_operand]` written with two
//! digits (zero-padded, so every prompt of a configuration has the same length) and each `cᵢ` one digit. The prompt is
//! `"aa+bb-c="` for the default k = 2; the chain-of-thought target is every intermediate result, `|`-separated, then
//! the final result: `"42|34"`. The verifier extracts the **last number** of the response
//! and compares it with the true value; the response is untrusted model output, so extraction never panics and reads
//! at most the response once.
//!
//! The train and test splits never overlap: every problem is an index into the finite problem space, and the split is
//! by a hash of that index (test if the hash falls in the test share), so a problem cannot be in both.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{draw_up_to, fill_split};

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
    /// Operations per problem, 2 to 6 (each one a step of the chain of thought; raise `rl.max_response_len` with it:
    /// about 4 tokens per step).
    pub operations: usize,
    /// Share of the problem space held out for evaluation.
    pub test_share: f64,
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        Self { max_operand: 49, operations: 2, test_share: 0.2 }
    }
}

impl ArithmeticConfig {
    /// Checks the knobs.
    ///
    /// # Errors
    /// A message naming the bad knob.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_operand > 99
            || !(2..=6).contains(&self.operations)
            || !(self.test_share > 0.0 && self.test_share < 1.0)
        {
            return Err(format!(
                "task: max_operand = {} must be at most 99, operations = {} in 2..=6 and test_share = {} in (0, 1) \
                 (a held-out split is needed for evaluation)",
                self.max_operand, self.operations, self.test_share
            ));
        }
        Ok(())
    }

    fn space(&self) -> u64 {
        let m = u64::from(self.max_operand) + 1;
        m * m * 20u64.pow(self.operations.saturating_sub(1) as u32)
    }

    fn problem(&self, index: u64) -> Problem {
        let m = u64::from(self.max_operand) + 1;
        let (a, rest) = (index % m, index / m);
        let (b, mut rest) = (rest % m, rest / m);
        let mut prompt = format!("{a:02}+{b:02}");
        let mut value = (a + b) as i64;
        let mut steps = vec![value.to_string()];
        for _ in 1..self.operations.max(2) {
            let (c, op) = ((rest % 10) as i64, rest / 10 % 2);
            rest /= 20;
            let sign = if op == 0 { '+' } else { '-' };
            value = if op == 0 { value + c } else { value - c };
            prompt.push(sign);
            prompt.push_str(&c.to_string());
            steps.push(value.to_string());
        }
        prompt.push('=');
        Problem { prompt, solution: steps.join("|"), answer: value }
    }

    fn is_test(&self, index: u64) -> bool {
        (forkrl_core::numeric::splitmix64(index) as f64 / u64::MAX as f64) < self.test_share
    }

    /// `n` problems of one split drawn with `seed` (with replacement), in at most [`super::max_draws`]`(n)` draws.
    ///
    /// # Errors
    /// A message when the split is too small to fill `n` in that many draws (a tiny space or an extreme
    /// `test_share`), instead of looping for ever.
    pub fn sample(&self, n: usize, test: bool, seed: u64) -> Result<Vec<Problem>, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        fill_split(n, test, self.space(), |_| {
            let i = rng.random_range(0..self.space());
            (self.is_test(i) == test).then(|| self.problem(i))
        })
    }

    /// The whole test split in a fixed order (at most `limit` problems, evenly spaced over the space); for spaces
    /// over a million problems, `limit` distinct test problems drawn with a fixed seed.
    pub fn test_set(&self, limit: usize) -> Vec<Problem> {
        if self.space() > 1_000_000 {
            let mut rng = ChaCha8Rng::seed_from_u64(0x7E57);
            let picked = draw_up_to(limit, |picked: &[u64]| {
                let i = rng.random_range(0..self.space());
                (self.is_test(i) && !picked.contains(&i)).then_some(i)
            });
            return picked.into_iter().map(|i| self.problem(i)).collect();
        }
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

    #[test]
    fn an_empty_split_is_an_error_not_an_endless_loop() {
        let none_held_out = ArithmeticConfig { test_share: 0.0, ..ArithmeticConfig::default() };
        assert!(none_held_out.validate().is_err());
        // 20 problems in all, nearly all held out: the training split cannot fill a batch.
        let tiny = ArithmeticConfig { max_operand: 0, operations: 2, test_share: 0.999 };
        assert!(tiny.validate().is_ok());
        let err = tiny.sample(64, false, 0).expect_err("no training problems");
        assert!(err.contains("training split") && err.contains("test_share"), "{err}");
        // A huge space with a tiny share: the test set is bounded too (fewer problems, no hang).
        let sparse = ArithmeticConfig { operations: 6, test_share: 1e-12, ..ArithmeticConfig::default() };
        assert!(sparse.test_set(10).len() < 10);
    }
    use proptest::prelude::*;

    #[test]
    fn problems_and_splits() {
        let cfg = ArithmeticConfig::default();
        let p = cfg.problem(17 + 25 * 50 + 8 * 2500 + 2500 * 10);
        assert_eq!((p.prompt.as_str(), p.solution.as_str(), p.answer), ("17+25-8=", "42|34", 34));
        let train = cfg.sample(500, false, 1).expect("a large split");
        let test = cfg.test_set(200);
        assert!(train.iter().all(|t| !test.contains(t)));
        assert!(train.iter().all(|t| t.prompt.len() == 8));
        assert_eq!(reward("42|34", 34), 1.0);
        assert_eq!(reward("42|35", 34), 0.0);
    }

    #[test]
    fn more_operations_give_longer_chains() {
        let cfg = ArithmeticConfig { operations: 4, ..ArithmeticConfig::default() };
        let train = cfg.sample(300, false, 2).expect("a large split");
        let test = cfg.test_set(100);
        assert_eq!(test.len(), 100);
        assert!(train.iter().all(|t| !test.contains(t)));
        for p in train.iter().chain(&test) {
            assert_eq!(p.prompt.len(), 12, "{p:?}");
            assert_eq!(p.solution.split('|').count(), 4, "{p:?}");
            assert_eq!(reward(&p.solution, p.answer), 1.0);
        }
        // The first problem of the space by hand: 00+00+0+0+0 = 0.
        let p = cfg.problem(0);
        assert_eq!((p.prompt.as_str(), p.solution.as_str(), p.answer), ("00+00+0+0+0=", "0|0|0|0", 0));
        assert!(ArithmeticConfig { operations: 7, ..cfg }.validate().is_err());
        assert!(ArithmeticConfig { max_operand: 100, ..cfg }.validate().is_err());
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
