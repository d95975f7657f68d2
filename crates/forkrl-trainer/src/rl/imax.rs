//! IMAX in the trainer (`[rl.imax]`; the reward is `forkrl_advantage::imax`, spec
//! `../shared/methods/exploration-extras.md` §2; the InfoMax formula and every default are a RECONSTRUCTION).
//!
//! - **Prefixes**: `K` soft prefixes of `L_p` trainable input embeddings ([`SoftPrefixes`], `K·L_p` rows), carried by
//!   the policy and addressed by virtual ids past the vocabulary: prefix `k` is the ids `V + k·L_p + j`, `j < L_p`,
//!   put before the prompt's tokens ([`PrefixIds::prefixed`]). They are made when RL starts (so SFT never sees
//!   them): zeros by default (a zero input row stays zero through a pre-norm decoder without biases, so the prefixes
//!   start close to a no-op), or (`prefix_init = "vocab"`) each row a copy of the embedding of a token drawn from the
//!   run's seed (prompt tuning's "sampled vocabulary"). Measured on the built-in task, the second derails a policy
//!   that never saw anything before its prompts (docs/methods.md).
//! - **Groups**: each drawn prompt gets `prefixes_per_prompt` distinct prefixes, each `(prompt, prefix)` pair a group of
//!   `group_size` rollouts (the spec's "each prompt-prefix pair defines its own GRPO group"). Prefixes rotate through
//!   the pool from step to step ([`assign`]), so all of them are trained.
//! - **Reward**: `r = r_verif + λ r_info` before the advantages, with `r_info = ℓ_k − logsumexp_j ℓ_j + log K` from the
//!   length-normalised log-likelihoods `ℓ_j` of the response under every prefix ([`log_likelihoods`]: `K` scoring
//!   forwards of the batch without a graph).
//! - **Update**: the policy loss reaches the prefix rows through the input embeddings; their gradient is taken out of
//!   the policy's and applied by their own AdamW at `prefix_lr` (no weight decay). `freeze_backbone` skips the policy's
//!   step (only the prefixes learn). The reference policy of a KL term reads the same, current prefixes: the KL
//!   measures the backbone's drift on the same input.
//! - The prefixes and their optimizer are saved in each checkpoint (`prefixes.bpk`, `prefixes_optimizer.bpk`), not in
//!   `policy.bpk` nor in a Hugging Face export: evaluation and exports run the policy without a prefix.

use burn::{
    module::Param,
    tensor::{Device, Int, Tensor, TensorData},
};
use forkrl_advantage::{ImaxConfig, PrefixInit, imax_rewards, infomax_rewards};
use forkrl_core::{SeedStream, derive_seed};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    Result, TrainerError,
    batch::RolloutBatch,
    model::{
        policy::{Policy, SoftPrefixes},
        token_stats_host,
    },
};

/// The soft-prefix table for `policy` (`K·L_p` rows) as `config.prefix_init` asks (zeros, or each row a copy of a
/// token embedding drawn from `seed`), on the policy's device as a trainable parameter.
pub fn init_prefixes(policy: &Policy, config: &ImaxConfig, seed: u64) -> SoftPrefixes {
    if config.prefix_init == PrefixInit::Zeros {
        return empty_prefixes(config, policy.head_weight().dims()[1], &policy.device());
    }
    let rows = config.num_prefixes * config.prefix_len;
    let vocab = policy.vocab_size() as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, SeedStream::Control, &[0x494d_4158]));
    let ids: Vec<i64> = (0..rows).map(|_| rng.random_range(0..vocab) as i64).collect();
    let device = policy.device();
    let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [rows]), &device);
    SoftPrefixes { table: Param::from_tensor(leaf(policy.embed.val().select(0, ids), &device)) }
}

/// A copy of `t` as a fresh leaf tensor on `device` (through the host: a parameter must not hang off a graph).
fn leaf(t: Tensor<2>, device: &Device) -> Tensor<2> {
    let dims = t.dims();
    Tensor::<2>::from_data(t.into_data(), device).reshape(dims)
}

/// Where prefix ids start and how long each prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixIds {
    /// The first virtual id (the vocabulary size `V`).
    pub first: u32,
    /// `L_p`.
    pub len: usize,
    /// `K`.
    pub count: usize,
}

impl PrefixIds {
    /// The ids of `policy`'s vocabulary and `config`'s pool.
    pub fn new(policy: &Policy, config: &ImaxConfig) -> Self {
        Self { first: policy.vocab_size() as u32, len: config.prefix_len, count: config.num_prefixes }
    }

    /// `prompt` with prefix `k`'s ids before it.
    pub fn prefixed(&self, prompt: &[u32], k: usize) -> Vec<u32> {
        let start = self.first + (k * self.len) as u32;
        (start..start + self.len as u32).chain(prompt.iter().copied()).collect()
    }

    /// The prefix a prompt starts with, when it starts with one.
    pub fn prefix_of(&self, prompt: &[u32]) -> Option<usize> {
        let id = *prompt.first()?;
        let k = (id.checked_sub(self.first)? as usize) / self.len;
        (k < self.count).then_some(k)
    }

    /// A sequence whose leading prefix is replaced by prefix `k` (unchanged when it has none).
    fn swapped(&self, seq: &[u32], k: usize) -> Vec<u32> {
        match self.prefix_of(seq) {
            Some(_) => self.prefixed(&seq[self.len..], k),
            None => seq.to_vec(),
        }
    }
}

/// The prefixes of `problems` drawn prompts, `prefixes_per_prompt` consecutive entries per prompt, rotating through
/// the pool by an offset drawn from `seed` (the step's prompt seed): entry `i` gets `(offset + i) mod K`, so one
/// prompt's prefixes are distinct.
pub fn assign(problems: usize, config: &ImaxConfig, seed: u64) -> Vec<usize> {
    let k = config.num_prefixes;
    let offset = (derive_seed(seed, SeedStream::Control, &[0x494d_4158, 1]) % k as u64) as usize;
    (0..problems * config.prefixes_per_prompt).map(|i| (offset + i) % k).collect()
}

/// `[N, K]`: the length-normalised log-likelihood `ℓ_j` of every row's response under each prefix `j` (the mean
/// log-prob of its response tokens at temperature 1), from `policy` without a graph, `micro` rows per forward; with
/// the prefix each row was sampled with.
///
/// # Errors
/// Forward errors; [`TrainerError::Stage`] for a row without a prefix.
pub fn log_likelihoods(
    policy: &Policy,
    batch: &RolloutBatch,
    ids: &PrefixIds,
    micro: usize,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let (n, k, w) = (batch.len(), ids.count, batch.width());
    let assigned: Vec<usize> = batch
        .rollouts()
        .iter()
        .enumerate()
        .map(|(row, r)| {
            ids.prefix_of(&r.prompt).ok_or_else(|| TrainerError::Stage {
                stage: "score",
                reason: format!("IMAX: row {row} has no soft prefix"),
            })
        })
        .collect::<Result<_>>()?;
    let mut out = vec![0.0f32; n * k];
    for j in 0..k {
        let seqs: Vec<Vec<u32>> = batch.ids().iter().map(|s| ids.swapped(s, j)).collect();
        let (_, log_prob) = token_stats_host(policy, &seqs, w, 1.0, micro)?;
        for row in 0..n {
            let (sum, count) =
                batch.response_positions(row).fold((0.0f64, 0usize), |(s, c), i| (s + f64::from(log_prob[i]), c + 1));
            out[row * k + j] = (sum / count.max(1) as f64) as f32;
        }
    }
    Ok((out, assigned))
}

/// `r_info` of every row (from [`log_likelihoods`]) and the rows' prefixes; adds `λ r_info` (gated when configured)
/// to `shaped`.
///
/// # Errors
/// As [`log_likelihoods`] and the library.
pub fn info_rewards(
    policy: &Policy,
    batch: &RolloutBatch,
    config: &ImaxConfig,
    micro: usize,
    shaped: &mut [f32],
) -> Result<Vec<f32>> {
    let (loglik, assigned) = log_likelihoods(policy, batch, &PrefixIds::new(policy, config), micro)?;
    let info = infomax_rewards(&loglik, config.num_prefixes, &assigned)?;
    let total = imax_rewards(&batch.rewards, &info, config)?;
    for ((s, t), r) in shaped.iter_mut().zip(&total).zip(&batch.rewards) {
        *s += t - r;
    }
    Ok(info)
}

/// The prefixes' AdamW (no weight decay; the trainer's betas and ε).
pub fn prefix_adamw(betas: [f64; 2], eps: f64) -> burn::optim::ModuleOptimizer {
    burn::optim::AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_beta_1(betas[0] as f32)
        .with_beta_2(betas[1] as f32)
        .with_epsilon(eps as f32)
        .init()
}

/// A fresh table of the shape `config` asks for on `device` (zeros), to load a checkpoint's prefixes into.
pub fn empty_prefixes(config: &ImaxConfig, width: usize, device: &Device) -> SoftPrefixes {
    let rows = config.num_prefixes * config.prefix_len;
    SoftPrefixes { table: Param::from_tensor(Tensor::zeros([rows, width], device)) }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use forkrl_core::Backend;
    use forkrl_rollout::Decoding;

    use super::*;
    use crate::model::{
        ids_tensor,
        policy::PolicyConfig,
        sampler::{SamplerConfig, generate},
        token_stats,
    };

    /// A tiny untied policy (on the autodiff CPU device) whose prefix rows are copies of the embeddings of tokens
    /// `3` and `7`.
    fn policy_with_copied_prefixes() -> Policy {
        let device = Backend::Cpu.device().expect("cpu").autodiff();
        device.seed(4);
        let config = PolicyConfig::new(29).with_d_model(16).with_n_heads(2).with_d_ff(24).with_max_len(16);
        let policy = config.with_tie_embeddings(false).init(&device).expect("policy");
        let rows = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 7], [2]), &device);
        let table = leaf(policy.embed.val().select(0, rows), &device);
        policy.with_prefixes(Some(SoftPrefixes { table: Param::from_tensor(table) })).expect("width matches")
    }

    #[test]
    fn a_virtual_id_runs_as_its_table_row_in_every_forward_and_the_table_gets_the_gradient() {
        let policy = policy_with_copied_prefixes();
        assert_eq!(policy.input_ids(), 31);
        let device = policy.device();
        let soft = ids_tensor(&[vec![29, 30, 5, 6, 11]], &device);
        let hard = ids_tensor(&[vec![3, 7, 5, 6, 11]], &device);
        let a = crate::host_f32(policy.forward(soft).expect("forward")).expect("f32");
        let b = crate::host_f32(policy.forward(hard).expect("forward")).expect("f32");
        assert_eq!(a, b, "a row equal to a token's embedding gives that token's logits");
        // Prefill + KV-cache decoding from a prefixed prompt (left-padded beside a longer one) equals the token prompt.
        let config = SamplerConfig { max_new_tokens: 6, ..SamplerConfig::default() };
        let valid = policy.valid();
        let soft = generate(&valid, &[vec![29, 30, 5], vec![4, 9, 29, 30, 5]], Decoding::Greedy, &config).expect("gen");
        let hard = generate(&valid, &[vec![3, 7, 5], vec![4, 9, 3, 7, 5]], Decoding::Greedy, &config).expect("gen");
        assert_eq!(soft.tokens, hard.tokens);
        // The training forward differentiates into the table (and not into the token rows 3 and 7 through it).
        let (_, log_prob) = token_stats(&policy, &[vec![29, 30, 5, 6, 11]], 4, 1.0).expect("stats");
        let grads = log_prob.sum().backward();
        let prefixes = policy.prefixes().expect("carried");
        let g = crate::host_f32(prefixes.table.val().grad(&grads).expect("a gradient")).expect("f32");
        assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|&x| x != 0.0));
        let embed = crate::host_f32(policy.embed.val().grad(&grads).expect("embed grad")).expect("f32");
        assert!(embed[3 * 16..4 * 16].iter().chain(&embed[7 * 16..8 * 16]).all(|&x| x == 0.0));
        // An id past the table is refused by the sampler with the vocabulary named.
        let err = generate(&valid, &[vec![31]], Decoding::Greedy, &config).expect_err("out of range");
        assert!(err.to_string().contains("soft-prefix"), "{err}");
    }

    #[test]
    fn prefix_ids_round_trip_and_rotate() {
        let ids = PrefixIds { first: 23, len: 3, count: 4 };
        let p = ids.prefixed(&[5, 6], 2);
        assert_eq!(p, vec![29, 30, 31, 5, 6]);
        assert_eq!(ids.prefix_of(&p), Some(2));
        assert_eq!(ids.prefix_of(&[5, 6]), None);
        assert_eq!(ids.prefix_of(&[23 + 12]), None, "past the pool");
        assert_eq!(ids.swapped(&p, 0), vec![23, 24, 25, 5, 6]);
        let config = ImaxConfig { prefixes_per_prompt: 2, ..ImaxConfig::default() };
        let a = assign(3, &config, 7);
        assert_eq!(a.len(), 6);
        for pair in a.chunks(2) {
            assert_ne!(pair[0], pair[1], "one prompt's prefixes are distinct");
        }
        let offsets: std::collections::BTreeSet<usize> = (0..32).map(|s| assign(1, &config, s)[0]).collect();
        assert_eq!(offsets.len(), 4, "the offset rotates through the pool");
    }
}
