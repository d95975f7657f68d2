//! Free-order sums: add `numbers` given integers in an order the response chooses, one step per addition. The task
//! the 80/20 experiment runs on ([`crate::experiment`]): its chains of thought are 20 to 30 tokens long and have real
//! decision points ("forks") among many near-deterministic tokens.
//!
//! Prompt: the numbers, comma-separated, then `=`: `"35,8,27,4="`. Chain-of-thought target: the first two numbers
//! added, then each running total plus one more number, `|`-separated, in a **random order drawn per SFT example**:
//! `"8+4=12|12+35=47|47+27=74"`. Every order is correct, so the SFT model learns a distribution over orders: the token
//! that picks the next number is a fork (its entropy is about `ln r` for `r` numbers left), while copying the running
//! total, the separators and (once learned) the sums themselves are near-deterministic. Which order the policy takes
//! matters for its accuracy: an order that keeps track of the numbers used so far is harder than another, and a
//! two-digit + two-digit addition is harder than adding a one-digit number. RL can therefore improve accuracy by
//! sharpening the forks, the situation the 80/20 paper describes.
//!
//! Verification: the response's **last number** must equal the sum (as [`crate::tasks::arithmetic::reward`]; the
//! response is untrusted, extraction is bounded). The train and test splits never overlap: a problem's identity is its
//! sorted numbers, and the split is a hash of that identity.

use rand::{RngExt, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{check_test_share, draw_up_to, fill_split, multiset_is_test};

/// Difficulty knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SumConfig {
    /// How many numbers are given (3 to 6).
    pub numbers: usize,
    /// Largest given number (1 to 99); the smallest is 1.
    pub max_number: u32,
    /// Share of problem identities held out for evaluation.
    pub test_share: f64,
}

impl Default for SumConfig {
    fn default() -> Self {
        Self { numbers: 4, max_number: 49, test_share: 0.2 }
    }
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SumProblem {
    /// The given numbers, in prompt order.
    pub numbers: Vec<u32>,
    /// The prompt, e.g. `"35,8,27,4="`.
    pub prompt: String,
    /// A chain-of-thought target in one order, e.g. `"8+4=12|12+35=47|47+27=74"`.
    pub solution: String,
    /// The sum.
    pub answer: i64,
}

/// The chain of thought that adds `numbers` in `order` (indices into `numbers`, a permutation).
pub fn chain(numbers: &[u32], order: &[usize]) -> String {
    let mut total = 0u64;
    let mut steps = Vec::with_capacity(numbers.len());
    for (k, &i) in order.iter().enumerate() {
        let n = u64::from(numbers[i]);
        if k > 0 {
            steps.push(format!("{total}+{n}={}", total + n));
        }
        total += n;
    }
    steps.join("|")
}

impl SumConfig {
    /// Checks the knobs.
    ///
    /// # Errors
    /// A message naming the bad knob.
    pub fn validate(&self) -> Result<(), String> {
        if !(3..=6).contains(&self.numbers) || !(1..=99).contains(&self.max_number) {
            return Err(format!("sum: numbers in 3..=6 and max_number in 1..=99 (got {self:?})"));
        }
        check_test_share("sum", self.test_share)
    }

    fn space(&self) -> u64 {
        u64::from(self.max_number).saturating_pow(self.numbers as u32)
    }

    fn is_test(&self, numbers: &[u32]) -> bool {
        multiset_is_test(0x5, numbers, self.test_share)
    }

    /// One random problem; its chain of thought takes a random order when `shuffle`, the prompt's order otherwise.
    fn draw(&self, rng: &mut ChaCha8Rng, shuffle: bool) -> SumProblem {
        let numbers: Vec<u32> = (0..self.numbers).map(|_| rng.random_range(1..=self.max_number)).collect();
        let mut order: Vec<usize> = (0..numbers.len()).collect();
        if shuffle {
            order.shuffle(rng);
        }
        let list: Vec<String> = numbers.iter().map(u32::to_string).collect();
        SumProblem {
            prompt: format!("{}=", list.join(",")),
            solution: chain(&numbers, &order),
            answer: numbers.iter().map(|&n| i64::from(n)).sum(),
            numbers,
        }
    }

    /// `n` problems of one split drawn with `seed`, each with its chain of thought in a random order, in at most
    /// [`super::max_draws`]`(n)` draws.
    ///
    /// # Errors
    /// A message when the split is too small to fill `n` in that many draws.
    pub fn sample(&self, n: usize, test: bool, seed: u64) -> Result<Vec<SumProblem>, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        fill_split(n, test, self.space(), |_| {
            Some(self.draw(&mut rng, true)).filter(|p| self.is_test(&p.numbers) == test)
        })
    }

    /// A fixed test set of at most `limit` problems with distinct identities (chains in prompt order).
    pub fn test_set(&self, limit: usize) -> Vec<SumProblem> {
        let mut rng = ChaCha8Rng::seed_from_u64(0x7E57);
        let mut seen = std::collections::HashSet::new();
        draw_up_to(limit, |_| {
            let p = self.draw(&mut rng, false);
            let mut key = p.numbers.clone();
            key.sort_unstable();
            (self.is_test(&p.numbers) && seen.insert(key)).then_some(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::arithmetic::reward;

    #[test]
    fn chains_by_hand() {
        assert_eq!(chain(&[35, 8, 27, 4], &[1, 3, 0, 2]), "8+4=12|12+35=47|47+27=74");
        assert_eq!(chain(&[35, 8, 27, 4], &[0, 1, 2, 3]), "35+8=43|43+27=70|70+4=74");
        assert_eq!(chain(&[1, 2, 3], &[2, 1, 0]), "3+2=5|5+1=6");
    }

    #[test]
    fn problems_splits_and_orders() {
        let cfg = SumConfig::default();
        let train = cfg.sample(400, false, 3).expect("a large split");
        let test = cfg.test_set(200);
        assert_eq!(test.len(), 200);
        let key = |p: &SumProblem| {
            let mut k = p.numbers.clone();
            k.sort_unstable();
            k
        };
        let test_keys: std::collections::HashSet<Vec<u32>> = test.iter().map(key).collect();
        assert_eq!(test_keys.len(), 200, "distinct held-out problems");
        assert!(train.iter().all(|p| !test_keys.contains(&key(p))), "the splits never overlap");
        for p in train.iter().chain(&test) {
            assert_eq!(p.numbers.len(), 4);
            assert!(p.numbers.iter().all(|&n| (1..=49).contains(&n)));
            assert_eq!(p.solution.split('|').count(), 3, "{p:?}");
            assert_eq!(reward(&p.solution, p.answer), 1.0, "{p:?}");
            assert!(p.solution.len() >= 17 && p.prompt.ends_with('='), "{p:?}");
        }
        // Training chains take many orders: the first number added is not always the prompt's first.
        let first_is_prompt_first = train.iter().filter(|p| p.solution.starts_with(&format!("{}+", p.numbers[0])));
        assert!(first_is_prompt_first.count() < 200, "random orders");
        // Held-out chains are in prompt order.
        assert!(test.iter().all(|p| p.solution.starts_with(&format!("{}+{}=", p.numbers[0], p.numbers[1]))));
        assert!(SumConfig { numbers: 2, ..cfg }.validate().is_err());
        assert!(SumConfig { max_number: 100, ..cfg }.validate().is_err());
        assert!(SumConfig { test_share: 1.0, ..cfg }.validate().is_err());
    }

    #[test]
    fn a_tiny_space_is_an_error_not_an_endless_loop() {
        let tiny = SumConfig { numbers: 3, max_number: 1, test_share: 0.5 };
        // One problem in all (1+1+1): its split can be filled (with replacement), the other split cannot.
        let held_out = tiny.is_test(&[1, 1, 1]);
        assert!(tiny.sample(8, !held_out, 0).is_err(), "the one problem is in the other split");
        assert_eq!(tiny.sample(8, held_out, 0).map(|v| v.len()), Ok(8));
        assert!(tiny.test_set(10).len() <= 1);
    }
}
