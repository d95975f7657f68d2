//! [`Task`]: the built-in generators ([`crate::tasks::arithmetic`], [`crate::tasks::countdown`]) and JSONL datasets
//! ([`crate::tasks::jsonl`]) behind one type that gives prompts, SFT targets and a verifier per problem.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{
    TrainerError,
    tasks::{
        arithmetic::{self, ArithmeticConfig},
        countdown::{CountdownConfig, CountdownProblem, countdown_reward},
        jsonl::{self, JsonlConfig, apply_template},
        sum::{SumConfig, SumProblem},
        verify::{Extraction, extract, extract_last_number, math_reward, parse_number},
    },
};

/// Which task, with its knobs. TOML: `[task]` with `kind = "arithmetic" | "countdown" | "sum" | "jsonl"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TaskConfig {
    /// Two-step arithmetic (the default).
    Arithmetic(ArithmeticConfig),
    /// Countdown.
    Countdown(CountdownConfig),
    /// Free-order sums (the 80/20 experiment's task).
    Sum(SumConfig),
    /// A JSONL dataset (GSM8K / MATH style).
    Jsonl(JsonlConfig),
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig::Arithmetic(ArithmeticConfig::default())
    }
}

/// How a problem's responses are verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gold {
    /// The response's last integer must equal this.
    LastInteger(i64),
    /// The extracted final answer must match this (numbers compared exactly).
    Math {
        /// Gold answer.
        answer: String,
        /// Where the final answer is read.
        extraction: Extraction,
    },
    /// The final expression must reach `target` with `numbers`.
    Countdown {
        /// Given numbers.
        numbers: Vec<u32>,
        /// Target.
        target: u32,
        /// Each number exactly once.
        use_all: bool,
    },
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The prompt text, as fed to the tokenizer.
    pub prompt: String,
    /// An SFT target, when the task has one.
    pub solution: Option<String>,
    /// The verifier's reference.
    pub gold: Gold,
}

impl Problem {
    /// The verifiable reward of a decoded response: 1.0 (correct) or 0.0.
    pub fn reward(&self, response: &str) -> f32 {
        match &self.gold {
            Gold::LastInteger(answer) => arithmetic::reward(response, *answer),
            Gold::Math { answer, extraction } => math_reward(response, answer, *extraction),
            Gold::Countdown { numbers, target, use_all } => countdown_reward(response, numbers, *target, *use_all),
        }
    }

    /// The final answer of a response as maj@k votes on it: the last number (arithmetic) or the extracted answer
    /// (datasets), both reduced to an exact rational when they parse (`1/2`, `0.5` and `\frac{1}{2}` vote together);
    /// the last non-empty line for Countdown (its answer is an expression). `None`: no answer to vote for.
    pub fn answer_key(&self, response: &str) -> Option<String> {
        let canonical = |a: &str| parse_number(a).map_or_else(|| a.trim().to_string(), |r| format!("{r:?}"));
        match &self.gold {
            Gold::LastInteger(_) => extract_last_number(response).map(canonical),
            Gold::Math { extraction, .. } => extract(response, *extraction).map(canonical),
            Gold::Countdown { .. } => response.lines().rev().map(str::trim).find(|l| !l.is_empty()).map(String::from),
        }
    }
}

/// A task ready to sample from.
#[derive(Debug, Clone)]
pub enum Task {
    /// Generated arithmetic.
    Arithmetic(ArithmeticConfig),
    /// Generated Countdown.
    Countdown(CountdownConfig),
    /// Generated free-order sums.
    Sum(SumConfig),
    /// A loaded dataset.
    Dataset {
        /// Training problems.
        train: Vec<Problem>,
        /// Held-out problems.
        test: Vec<Problem>,
    },
}

fn from_arithmetic(p: arithmetic::Problem) -> Problem {
    Problem { prompt: p.prompt, solution: Some(p.solution), gold: Gold::LastInteger(p.answer) }
}

fn from_sum(p: SumProblem) -> Problem {
    Problem { prompt: p.prompt, solution: Some(p.solution), gold: Gold::LastInteger(p.answer) }
}

fn from_countdown(p: CountdownProblem, use_all: bool) -> Problem {
    Problem {
        prompt: p.prompt,
        solution: Some(p.solution),
        gold: Gold::Countdown { numbers: p.numbers, target: p.target, use_all },
    }
}

impl TaskConfig {
    /// Checks a generated task's knobs (no I/O: a JSONL task's files are read by [`Task::new`]); part of
    /// [`crate::TrainConfig::check`], so bad knobs are refused before anything runs.
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] naming `task` and the bad knob.
    pub fn validate(&self) -> Result<(), TrainerError> {
        let (kind, checked) = match self {
            TaskConfig::Arithmetic(c) => ("arithmetic", c.validate()),
            TaskConfig::Countdown(c) => ("countdown", c.validate()),
            TaskConfig::Sum(c) => ("sum", c.validate()),
            TaskConfig::Jsonl(_) => return Ok(()),
        };
        checked.map_err(|reason| TrainerError::invalid("task", kind, reason))
    }
}

impl Task {
    /// Builds the task (reads the dataset files of a JSONL task).
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] for bad knobs; the errors of [`jsonl::read`]; a JSONL split that leaves no training or
    /// no held-out problem.
    pub fn new(config: &TaskConfig) -> Result<Self, TrainerError> {
        match config {
            TaskConfig::Arithmetic(c) => config.validate().map(|()| Task::Arithmetic(*c)),
            TaskConfig::Countdown(c) => config.validate().map(|()| Task::Countdown(*c)),
            TaskConfig::Sum(c) => config.validate().map(|()| Task::Sum(*c)),
            TaskConfig::Jsonl(c) => {
                let to_problem = |r: jsonl::Record| Problem {
                    prompt: apply_template(&c.template, &r.question),
                    solution: r.solution,
                    gold: Gold::Math { answer: r.answer, extraction: c.extraction },
                };
                let records = jsonl::read(&c.path)?;
                let (train, test): (Vec<Problem>, Vec<Problem>) = match &c.test_path {
                    Some(test_path) => (
                        records.into_iter().map(to_problem).collect(),
                        jsonl::read(test_path)?.into_iter().map(to_problem).collect(),
                    ),
                    None => {
                        let (mut train, mut test) = (Vec::new(), Vec::new());
                        for (i, r) in records.into_iter().enumerate() {
                            let h = forkrl_core::numeric::splitmix64(i as u64) as f64 / u64::MAX as f64;
                            if h < c.test_share { &mut test } else { &mut train }.push(to_problem(r));
                        }
                        (train, test)
                    }
                };
                if train.is_empty() || test.is_empty() {
                    return Err(TrainerError::invalid(
                        "task.path",
                        c.path.display(),
                        format!(
                            "gives {} training and {} held-out problems; both must be non-empty (set task.test_path \
                             or task.test_share)",
                            train.len(),
                            test.len()
                        ),
                    ));
                }
                Ok(Task::Dataset { train, test })
            }
        }
    }

    /// `n` training problems drawn with `seed` (with replacement).
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] (`task.test_share`) when a generated task's training split is too small to
    /// draw from (bounded rejection sampling, never an endless loop).
    pub fn sample(&self, n: usize, seed: u64) -> Result<Vec<Problem>, TrainerError> {
        let small = |reason: String| TrainerError::invalid("task.test_share", "(the task's split)", reason);
        Ok(match self {
            Task::Arithmetic(c) => c.sample(n, false, seed).map_err(small)?.into_iter().map(from_arithmetic).collect(),
            Task::Countdown(c) => {
                c.sample(n, false, seed).map_err(small)?.into_iter().map(|p| from_countdown(p, c.use_all)).collect()
            }
            Task::Sum(c) => c.sample(n, false, seed).map_err(small)?.into_iter().map(from_sum).collect(),
            Task::Dataset { train, .. } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                (0..n).map(|_| train[rng.random_range(0..train.len())].clone()).collect()
            }
        })
    }

    /// The fixed held-out problems (at most `limit`).
    pub fn test_set(&self, limit: usize) -> Vec<Problem> {
        match self {
            Task::Arithmetic(c) => c.test_set(limit).into_iter().map(from_arithmetic).collect(),
            Task::Countdown(c) => c.test_set(limit).into_iter().map(|p| from_countdown(p, c.use_all)).collect(),
            Task::Sum(c) => c.test_set(limit).into_iter().map(from_sum).collect(),
            Task::Dataset { test, .. } => test.iter().take(limit).cloned().collect(),
        }
    }

    /// Whether every training problem has an SFT target.
    pub fn has_solutions(&self) -> bool {
        match self {
            Task::Arithmetic(_) | Task::Countdown(_) | Task::Sum(_) => true,
            Task::Dataset { train, .. } => train.iter().all(|p| p.solution.is_some()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_names_the_kind_and_rejects_unknown_keys() {
        #[derive(Debug, Deserialize)]
        struct Wrap {
            task: TaskConfig,
        }
        let w: Wrap = toml::from_str("[task]\nkind = \"countdown\"\nnumbers = 4\n").expect("countdown");
        assert!(matches!(w.task, TaskConfig::Countdown(CountdownConfig { numbers: 4, .. })));
        let w: Wrap = toml::from_str("[task]\nkind = \"sum\"\nnumbers = 5\n").expect("sum");
        assert!(matches!(w.task, TaskConfig::Sum(SumConfig { numbers: 5, max_number: 49, .. })));
        let w: Wrap = toml::from_str("[task]\nkind = \"jsonl\"\npath = \"d.jsonl\"\n").expect("jsonl");
        assert!(matches!(w.task, TaskConfig::Jsonl(ref j) if j.template == jsonl::DEFAULT_TEMPLATE));
        let err = toml::from_str::<Wrap>("[task]\nkind = \"countdown\"\nnumber = 4\n").expect_err("typo");
        assert!(err.to_string().contains("number"), "{err}");
        let err = toml::from_str::<Wrap>("[task]\nkind = \"sudoku\"\n").expect_err("unknown kind");
        assert!(err.to_string().contains("sudoku"), "{err}");
    }

    #[test]
    fn jsonl_task_splits_and_verifies() {
        let dir = std::env::temp_dir().join(format!("forkrl-task-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("train.jsonl");
        let lines: Vec<String> = (0..50)
            .map(|i| {
                format!("{{\"question\": \"What is {i} + 1?\", \"answer\": \"{i} + 1 = {}\\n#### {}\"}}", i + 1, i + 1)
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).expect("write");
        let task = Task::new(&TaskConfig::Jsonl(JsonlConfig { path, test_share: 0.2, ..JsonlConfig::default() }))
            .expect("task");
        let test = task.test_set(100);
        let train = task.sample(200, 1).expect("a large split");
        assert!(!test.is_empty() && test.len() < 50);
        assert!(train.iter().all(|p| !test.contains(p)));
        assert!(task.has_solutions());
        let p = &test[0];
        assert!(p.prompt.starts_with("User:\nWhat is ") && p.prompt.ends_with("\n\nAssistant:\n"));
        let Gold::Math { answer, .. } = &p.gold else { panic!("math gold") };
        assert_eq!(p.reward(&format!("so the answer is \\boxed{{{answer}}}")), 1.0);
        assert_eq!(p.reward("\\boxed{-1}"), 0.0);
        assert_eq!(p.reward(p.solution.as_deref().expect("solution")), 1.0, "the GSM8K solution verifies");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
