//! Held-out evaluation: greedy accuracy, unbiased pass@1 / pass@k from `k` samples per problem at the rollout
//! decoding (Chen et al. 2021's estimator, `forkrl_rollout::mean_pass_at_k`), and maj@k (majority vote over the `k`
//! samples' final answers, [`Problem::answer_key`]); [`EvalReport`] is what `forkrl-train eval` writes.

use burn::module::Module;
use forkrl_core::{SeedStream, derive_seed};
use forkrl_rollout::{Decoding, mean_pass_at_k};
use serde::{Deserialize, Serialize};

use crate::{
    Result,
    model::{Vocab, policy::Policy, sampler},
    tasks::Problem,
};

/// Samples one response per prompt with the KV-cache sampler on an autodiff-free snapshot of the policy. Returns the
/// response ids (EOS included when emitted) and whether each row hit `max_new` without EOS.
///
/// # Errors
/// The sampler's errors.
pub fn generate(
    policy: &Policy,
    vocab: &Vocab,
    prompts: &[Vec<u32>],
    decoding: Decoding,
    max_new: usize,
    seed: u64,
) -> Result<Vec<(Vec<u32>, bool)>> {
    let out = sampler::generate(&policy.valid(), prompts, decoding, &vocab.sampler_config(max_new, seed))?;
    Ok(out.tokens.into_iter().zip(out.truncated).collect())
}

/// Greedy accuracy on `problems` (0 for none).
///
/// # Errors
/// Tokenizer and sampler errors.
pub fn greedy_accuracy(policy: &Policy, vocab: &Vocab, problems: &[Problem], max_new: usize) -> Result<f64> {
    let mut correct = 0usize;
    for chunk in problems.chunks(200) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|p| vocab.encode(&p.prompt)).collect::<Result<_>>()?;
        let out = generate(policy, vocab, &prompts, Decoding::Greedy, max_new, 0)?;
        correct += chunk.iter().zip(&out).filter(|(p, (r, _))| p.reward(&vocab.text(r)) > 0.0).count();
    }
    Ok(correct as f64 / problems.len().max(1) as f64)
}

/// Unbiased `(pass@1, pass@k)` from `k` samples per problem with `decoding`; each chunk of problems samples from its
/// own [`SeedStream::PassAtK`] stream of `seed`. NaN for no problem.
///
/// # Errors
/// Tokenizer and sampler errors.
pub fn pass_at_k(
    policy: &Policy,
    vocab: &Vocab,
    problems: &[Problem],
    k: usize,
    decoding: Decoding,
    max_new: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let counts: Vec<(usize, usize)> = sample_k(policy, vocab, problems, k, decoding, max_new, seed)?
        .iter()
        .zip(problems)
        .map(|(texts, p)| (k, texts.iter().filter(|t| p.reward(t) > 0.0).count()))
        .collect();
    if counts.is_empty() {
        return Ok((f64::NAN, f64::NAN));
    }
    Ok((mean_pass_at_k(&counts, 1)?, mean_pass_at_k(&counts, k)?))
}

/// The decoded texts of `k` samples per problem with `decoding`; each chunk of problems samples from its own
/// [`SeedStream::PassAtK`] stream of `seed` (indexed by the problems before it).
///
/// # Errors
/// Tokenizer and sampler errors.
fn sample_k(
    policy: &Policy,
    vocab: &Vocab,
    problems: &[Problem],
    k: usize,
    decoding: Decoding,
    max_new: usize,
    seed: u64,
) -> Result<Vec<Vec<String>>> {
    let mut texts = Vec::with_capacity(problems.len());
    for chunk in problems.chunks((256 / k.max(1)).max(1)) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, k))
            .map(|p| vocab.encode(&p.prompt))
            .collect::<Result<_>>()?;
        let stream = derive_seed(seed, SeedStream::PassAtK, &[texts.len() as u64]);
        let out = generate(policy, vocab, &prompts, decoding, max_new, stream)?;
        for j in 0..chunk.len() {
            texts.push(out[j * k..(j + 1) * k].iter().map(|(r, _)| vocab.text(r)).collect());
        }
    }
    Ok(texts)
}

/// One evaluation set's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetReport {
    /// `held-out` (the task's own split) or the dataset's path.
    pub name: String,
    /// Problems evaluated.
    pub problems: usize,
    /// Greedy accuracy.
    pub greedy_accuracy: f64,
    /// Samples per problem.
    pub k: usize,
    /// Unbiased pass@1 from the `k` samples.
    pub pass_at_1: f64,
    /// Unbiased pass@k.
    pub pass_at_k: f64,
    /// Majority vote over the `k` samples' final answers.
    pub maj_at_k: f64,
}

/// What `forkrl-train eval` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The evaluated checkpoint.
    pub checkpoint: String,
    /// Its RL step.
    pub step: usize,
    /// Sampling seed of pass@k and maj@k.
    pub seed: u64,
    /// One entry per set.
    pub sets: Vec<SetReport>,
}

/// The majority answer's correctness of each problem: the most frequent [`Problem::answer_key`] among its samples
/// (ties: the one seen first; samples without an answer do not vote) is correct when a sample giving it earns the
/// reward. 0 for a problem none of whose samples has an answer.
pub fn majority_correct(problem: &Problem, responses: &[String]) -> bool {
    let mut votes: Vec<(String, usize, bool)> = Vec::new();
    for text in responses {
        let Some(key) = problem.answer_key(text) else { continue };
        let correct = problem.reward(text) > 0.0;
        match votes.iter_mut().find(|(k, _, _)| *k == key) {
            Some(v) => {
                v.1 += 1;
                v.2 |= correct;
            }
            None => votes.push((key, 1, correct)),
        }
    }
    let best = votes.iter().map(|v| v.1).max().unwrap_or(0);
    votes.iter().find(|v| v.1 == best).is_some_and(|v| v.2)
}

/// Greedy accuracy, pass@1, pass@k and maj@k of one set, with `k` samples per problem at `decoding`.
///
/// # Errors
/// Tokenizer and sampler errors.
pub fn evaluate_set(
    policy: &Policy,
    vocab: &Vocab,
    name: &str,
    problems: &[Problem],
    (k, decoding, max_new, seed): (usize, Decoding, usize, u64),
) -> Result<SetReport> {
    let k = k.max(1);
    let greedy_accuracy = greedy_accuracy(policy, vocab, problems, max_new)?;
    let mut counts = Vec::with_capacity(problems.len());
    let mut majority = 0usize;
    for (texts, p) in sample_k(policy, vocab, problems, k, decoding, max_new, seed)?.iter().zip(problems) {
        counts.push((k, texts.iter().filter(|t| p.reward(t) > 0.0).count()));
        majority += usize::from(majority_correct(p, texts));
    }
    let (pass_at_1, pass_at_k) = if counts.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (mean_pass_at_k(&counts, 1)?, mean_pass_at_k(&counts, k)?)
    };
    Ok(SetReport {
        name: name.to_string(),
        problems: problems.len(),
        greedy_accuracy,
        k,
        pass_at_1,
        pass_at_k,
        maj_at_k: majority as f64 / problems.len().max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Gold;

    #[test]
    fn majority_vote_counts_equal_answers_together_and_ignores_answerless_samples() {
        let p = Problem { prompt: "1+1=".into(), solution: None, gold: Gold::LastInteger(2) };
        let texts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(majority_correct(&p, &texts(&["3|2", "5|2", "9", "x"])), "2 wins 2 to 1");
        assert!(!majority_correct(&p, &texts(&["3", "3", "2"])), "3 wins");
        assert!(majority_correct(&p, &texts(&["2", "3"])), "a tie goes to the first answer");
        assert!(!majority_correct(&p, &texts(&["", "none"])), "no answer, no vote");
        let m = Problem {
            prompt: String::new(),
            solution: None,
            gold: Gold::Math { answer: "1/2".into(), extraction: crate::tasks::verify::Extraction::Boxed },
        };
        // 0.5, 1/2 and \frac{1}{2} are one answer.
        assert!(majority_correct(
            &m,
            &texts(&["\\boxed{0.5}", "\\boxed{3}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}", "\\boxed{1/2}"])
        ));
    }
}
