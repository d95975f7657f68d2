//! Held-out evaluation: greedy accuracy, and unbiased pass@1 / pass@k from `k` samples per problem at the rollout
//! decoding (Chen et al. 2021's estimator, `forkrl_rollout::mean_pass_at_k`).

use burn::module::Module;
use forkrl_core::{SeedStream, derive_seed};
use forkrl_rollout::{Decoding, mean_pass_at_k};

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
    let mut counts = Vec::with_capacity(problems.len());
    for chunk in problems.chunks((256 / k.max(1)).max(1)) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, k))
            .map(|p| vocab.encode(&p.prompt))
            .collect::<Result<_>>()?;
        let stream = derive_seed(seed, SeedStream::PassAtK, &[counts.len() as u64]);
        let out = generate(policy, vocab, &prompts, decoding, max_new, stream)?;
        for (j, p) in chunk.iter().enumerate() {
            let c = out[j * k..(j + 1) * k].iter().filter(|(r, _)| p.reward(&vocab.text(r)) > 0.0).count();
            counts.push((k, c));
        }
    }
    if counts.is_empty() {
        return Ok((f64::NAN, f64::NAN));
    }
    Ok((mean_pass_at_k(&counts, 1)?, mean_pass_at_k(&counts, k)?))
}
