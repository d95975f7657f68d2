//! Countdown: reach a target with given numbers and `+ − × ÷` (TinyZero's task), generated with a chain-of-thought
//! target for SFT, and its verifier: a small bounded expression parser of our own (no eval).
//!
//! A problem draws `numbers` integers in `1..=max_number` and combines them, left to right in a random order, with
//! random operators whose intermediate results stay non-negative integers (divisions are exact); the last result is
//! the target, required to be in `1..=max_target`. Prompt: `"4,6,3>21:"`; chain-of-thought target: one step per
//! operation, then the expression: `"4*6=24|24-3=21|(4*6)-3"`.
//!
//! Verification reads the final expression (the content of the last `<answer>…</answer>` when present, else the text
//! after the last `|`, else the whole response), parses it with [`parse_expression`] and gives reward 1 when its
//! value is exactly the target and it uses the given numbers as a multiset: each exactly once when `use_all` (TinyZero's
//! rule, the default), at most once otherwise.
//!
//! The train and test splits never overlap: a problem's identity is its sorted numbers and target, and the split is a
//! hash of that identity.

use rand::{RngExt, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::tasks::{check_test_share, fill_split, multiset_is_test, verify::Rational};

/// Difficulty knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CountdownConfig {
    /// How many numbers are given (2 to 6).
    pub numbers: usize,
    /// Largest given number.
    pub max_number: u32,
    /// Largest target.
    pub max_target: u32,
    /// Share of problem identities held out for evaluation.
    pub test_share: f64,
    /// Every number must be used exactly once (else at most once).
    pub use_all: bool,
}

impl Default for CountdownConfig {
    fn default() -> Self {
        Self { numbers: 3, max_number: 9, max_target: 99, test_share: 0.2, use_all: true }
    }
}

/// One Countdown problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountdownProblem {
    /// The given numbers, in prompt order.
    pub numbers: Vec<u32>,
    /// The target.
    pub target: u32,
    /// The prompt, e.g. `"4,6,3>21:"`.
    pub prompt: String,
    /// The chain-of-thought target, e.g. `"4*6=24|24-3=21|(4*6)-3"`.
    pub solution: String,
}

impl CountdownConfig {
    /// Checks the knobs.
    ///
    /// # Errors
    /// A message naming the bad knob.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=6).contains(&self.numbers) || self.max_number == 0 || self.max_target == 0 {
            return Err(format!("countdown: numbers in 2..=6, max_number and max_target >= 1 (got {self:?})"));
        }
        check_test_share("countdown", self.test_share)
    }

    fn is_test(&self, numbers: &[u32], target: u32) -> bool {
        multiset_is_test(u64::from(target), numbers, self.test_share)
    }

    /// One random problem (of either split), or `None` when this draw has no valid chain.
    fn draw(&self, rng: &mut ChaCha8Rng) -> Option<CountdownProblem> {
        let numbers: Vec<u32> = (0..self.numbers).map(|_| rng.random_range(1..=self.max_number)).collect();
        let mut order: Vec<usize> = (0..numbers.len()).collect();
        order.shuffle(rng);
        let mut value = numbers[order[0]];
        let mut expr = value.to_string();
        let mut steps = Vec::with_capacity(numbers.len());
        for (k, &i) in order[1..].iter().enumerate() {
            let n = numbers[i];
            let ops: Vec<char> = ['+', '-', '*', '/']
                .into_iter()
                .filter(|&op| match op {
                    '-' => value >= n,
                    '/' => value.is_multiple_of(n),
                    _ => true,
                })
                .collect();
            let op = ops[rng.random_range(0..ops.len())];
            let next = match op {
                '+' => value.checked_add(n)?,
                '-' => value - n,
                '*' => value.checked_mul(n)?,
                _ => value / n,
            };
            steps.push(format!("{value}{op}{n}={next}"));
            expr = if k == 0 { format!("{expr}{op}{n}") } else { format!("({expr}){op}{n}") };
            value = next;
        }
        if value == 0 || value > self.max_target {
            return None;
        }
        let list: Vec<String> = numbers.iter().map(u32::to_string).collect();
        Some(CountdownProblem {
            prompt: format!("{}>{value}:", list.join(",")),
            solution: format!("{}|{expr}", steps.join("|")),
            numbers,
            target: value,
        })
    }

    /// `n` problems of one split drawn with `seed`, in at most [`super::max_draws`]`(n)` draws.
    ///
    /// # Errors
    /// A message when the split is too small to fill `n` in that many draws.
    pub fn sample(&self, n: usize, test: bool, seed: u64) -> Result<Vec<CountdownProblem>, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let space = u64::from(self.max_number).saturating_pow(self.numbers as u32);
        fill_split(n, test, space, |_| self.draw(&mut rng).filter(|p| self.is_test(&p.numbers, p.target) == test))
    }

    /// A fixed test set of at most `limit` distinct problems.
    pub fn test_set(&self, limit: usize) -> Vec<CountdownProblem> {
        let mut rng = ChaCha8Rng::seed_from_u64(0x7E57);
        let mut out: Vec<CountdownProblem> = Vec::with_capacity(limit);
        let mut tries = 0usize;
        while out.len() < limit && tries < limit.saturating_mul(200) {
            tries += 1;
            if let Some(p) = self.draw(&mut rng).filter(|p| {
                self.is_test(&p.numbers, p.target)
                    && !out.iter().any(|q| q.numbers == p.numbers && q.target == p.target)
            }) {
                out.push(p);
            }
        }
        out
    }
}

/// Why an expression was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExprError {
    /// Longer than [`MAX_EXPR_LEN`] bytes.
    TooLong,
    /// Parentheses nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A number with more than 9 digits.
    NumberTooLong,
    /// A character outside digits, `+ - * / ( )` and spaces, at this byte offset.
    BadChar(usize),
    /// Not a well-formed expression (at this byte offset).
    Syntax(usize),
    /// Division by zero or an overflow.
    Arithmetic,
}

/// Longest expression accepted, in bytes.
pub const MAX_EXPR_LEN: usize = 128;
/// Deepest parenthesis nesting accepted.
pub const MAX_DEPTH: usize = 16;

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
    used: Vec<u32>,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos] == b' ' {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip();
        self.s.get(self.pos).copied()
    }

    fn expr(&mut self) -> Result<Rational, ExprError> {
        let mut v = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let r = self.term()?;
            v = if op == b'+' { v.checked_add(r) } else { v.checked_sub(r) }.ok_or(ExprError::Arithmetic)?;
        }
        Ok(v)
    }

    fn term(&mut self) -> Result<Rational, ExprError> {
        let mut v = self.factor()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.pos += 1;
            let r = self.factor()?;
            v = if op == b'*' { v.checked_mul(r) } else { v.checked_div(r) }.ok_or(ExprError::Arithmetic)?;
        }
        Ok(v)
    }

    fn factor(&mut self) -> Result<Rational, ExprError> {
        match self.peek() {
            Some(b'(') => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(ExprError::TooDeep);
                }
                self.pos += 1;
                let v = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err(ExprError::Syntax(self.pos));
                }
                self.pos += 1;
                self.depth -= 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                if self.pos - start > 9 {
                    return Err(ExprError::NumberTooLong);
                }
                let mut n = 0u32;
                for &d in &self.s[start..self.pos] {
                    n = n * 10 + u32::from(d - b'0');
                }
                self.used.push(n);
                Ok(Rational::int(i128::from(n)))
            }
            _ => Err(ExprError::Syntax(self.pos)),
        }
    }
}

/// Parses and evaluates an arithmetic expression over non-negative integers with `+ - * /` and parentheses, in exact
/// rational arithmetic; returns its value and the numbers it uses, in order. Bounded: at most [`MAX_EXPR_LEN`] bytes
/// and [`MAX_DEPTH`] nested parentheses, so the recursion depth and the work are bounded whatever the input.
///
/// # Errors
/// [`ExprError`] naming why the text is not an acceptable expression.
pub fn parse_expression(text: &str) -> Result<(Rational, Vec<u32>), ExprError> {
    let s = text.trim().as_bytes();
    if s.len() > MAX_EXPR_LEN {
        return Err(ExprError::TooLong);
    }
    if let Some(i) = s.iter().position(|c| !(c.is_ascii_digit() || b"+-*/() ".contains(c))) {
        return Err(ExprError::BadChar(i));
    }
    let mut p = Parser { s, pos: 0, depth: 0, used: Vec::new() };
    let v = p.expr()?;
    p.skip();
    if p.pos != s.len() {
        return Err(ExprError::Syntax(p.pos));
    }
    Ok((v, p.used))
}

/// The final expression of a response: the last `<answer>…</answer>`, else after the last `|`, else all of it.
pub fn final_expression(response: &str) -> &str {
    if let Some(open) = response.rfind("<answer>") {
        let inner = &response[open + "<answer>".len()..];
        return inner.find("</answer>").map_or(inner, |close| &inner[..close]);
    }
    response.rsplit('|').next().unwrap_or(response)
}

/// 1.0 when the response's final expression evaluates exactly to `target` using `numbers` as a multiset (each once
/// when `use_all`, at most once otherwise), else 0.0.
pub fn countdown_reward(response: &str, numbers: &[u32], target: u32, use_all: bool) -> f32 {
    let Ok((value, mut used)) = parse_expression(final_expression(response)) else { return 0.0 };
    if value != Rational::int(i128::from(target)) {
        return 0.0;
    }
    let mut given = numbers.to_vec();
    given.sort_unstable();
    used.sort_unstable();
    let ok = if use_all {
        used == given
    } else {
        // `used` ⊆ `given` as multisets.
        let mut i = 0;
        used.iter().all(|u| {
            while i < given.len() && given[i] < *u {
                i += 1;
            }
            let hit = i < given.len() && given[i] == *u;
            i += 1;
            hit
        })
    };
    if ok { 1.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn numbers_near_u32_max_do_not_overflow_and_small_splits_end() {
        let huge = CountdownConfig { max_number: u32::MAX, max_target: u32::MAX, ..CountdownConfig::default() };
        assert!(huge.validate().is_ok());
        // Sums and products past u32::MAX are discarded draws, not overflows.
        let problems = huge.sample(20, false, 3).expect("plenty of problems");
        assert!(problems.iter().all(|p| p.target >= 1 && p.numbers.len() == 3));
        // Two numbers in 1..=1 with a target of 1 or 2: a space of a handful of problems.
        let tiny = CountdownConfig { max_number: 1, max_target: 2, numbers: 2, test_share: 0.5, use_all: true };
        // It either fills the batch or says why; it never loops for ever.
        match tiny.sample(4, false, 0) {
            Ok(problems) => assert_eq!(problems.len(), 4),
            Err(e) => assert!(e.contains("training split"), "{e}"),
        }
        assert!(CountdownConfig { test_share: 0.0, ..CountdownConfig::default() }.validate().is_err());
    }

    #[test]
    fn expressions_that_reach_i128_min_are_evaluated_without_panic() {
        // (−2^16) · (2^16)^6 · 2^15 = −2^127 = i128::MIN exactly; the reduction used to call abs() on it.
        let e = "(0-65536)*65536*65536*65536*65536*65536*65536*32768";
        let (v, used) = parse_expression(e).expect("a valid expression");
        assert_eq!(v, Rational::int(i128::MIN));
        assert_eq!(used.len(), 9);
        assert_eq!(countdown_reward(e, &[0, 65536, 32768], 24, false), 0.0);
        // One step further overflows: a typed rejection, not a wrong sign.
        assert!(parse_expression(&format!("{e}/(0-1)")).is_err());
        assert!(parse_expression(&format!("({e})*2")).is_err());
    }

    #[test]
    fn parser_by_hand() {
        let v = |s: &str| parse_expression(s).map(|(v, u)| (v.num, v.den, u));
        assert_eq!(v("(4*6)-3"), Ok((21, 1, vec![4, 6, 3])));
        assert_eq!(v(" 2 + 3 * 4 "), Ok((14, 1, vec![2, 3, 4])));
        assert_eq!(v("(2+3)*4"), Ok((20, 1, vec![2, 3, 4])));
        assert_eq!(v("7/2"), Ok((7, 2, vec![7, 2])));
        assert_eq!(v("8-3-2"), Ok((3, 1, vec![8, 3, 2])));
        assert_eq!(v("8/0"), Err(ExprError::Arithmetic));
        assert_eq!(v("2+"), Err(ExprError::Syntax(2)));
        assert_eq!(v("(2+3"), Err(ExprError::Syntax(4)));
        assert_eq!(v("2 3"), Err(ExprError::Syntax(2)));
        assert_eq!(v("import os"), Err(ExprError::BadChar(0)));
        assert_eq!(v(&"(".repeat(20)), Err(ExprError::TooDeep));
        assert_eq!(v(&"1+".repeat(100)), Err(ExprError::TooLong));
        assert_eq!(v("1234567890"), Err(ExprError::NumberTooLong));
    }

    #[test]
    fn rewards_by_hand() {
        assert_eq!(countdown_reward("4*6=24|24-3=21|(4*6)-3", &[4, 6, 3], 21, true), 1.0);
        assert_eq!(countdown_reward("think <answer>(6*4)-3</answer>", &[3, 4, 6], 21, true), 1.0);
        assert_eq!(countdown_reward("(4*6)-3", &[4, 6, 3], 20, true), 0.0, "wrong value");
        assert_eq!(countdown_reward("4*6-3+0", &[4, 6, 3], 21, true), 0.0, "a number not given");
        assert_eq!(countdown_reward("4*6-3", &[4, 6, 3, 3], 21, true), 0.0, "one left unused");
        assert_eq!(countdown_reward("4*6-3", &[4, 6, 3, 3], 21, false), 1.0, "unused allowed");
        assert_eq!(countdown_reward("4*6-3-3+3", &[4, 6, 3, 3], 21, false), 0.0, "3 used three times");
        assert_eq!(countdown_reward("", &[1], 1, true), 0.0);
    }

    #[test]
    fn generated_solutions_verify_and_splits_are_disjoint() {
        let cfg = CountdownConfig::default();
        let train = cfg.sample(300, false, 9).expect("a large split");
        let test = cfg.test_set(100);
        assert_eq!(test.len(), 100);
        for p in train.iter().chain(&test) {
            assert_eq!(countdown_reward(&p.solution, &p.numbers, p.target, true), 1.0, "{p:?}");
            assert!(p.target >= 1 && p.target <= cfg.max_target);
        }
        let key = |p: &CountdownProblem| {
            let mut n = p.numbers.clone();
            n.sort_unstable();
            (n, p.target)
        };
        assert!(train.iter().all(|a| test.iter().all(|b| key(a) != key(b))));
        let four = CountdownConfig { numbers: 4, ..cfg };
        assert!(four.sample(50, false, 1).expect("a large split").iter().all(|p| countdown_reward(
            &p.solution,
            &p.numbers,
            p.target,
            true
        ) == 1.0));
    }

    proptest! {
        /// Untrusted model output: no panic and bounded work on arbitrary strings.
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = countdown_reward(&s, &[1, 2, 3], 6, true);
            let _ = parse_expression(&s);
        }

        #[test]
        fn arbitrary_expression_like_text_never_panics(s in "[0-9+*/() -]{0,200}") {
            let _ = parse_expression(&s);
            let _ = countdown_reward(&s, &[2, 5, 7], 9, false);
        }
    }
}
