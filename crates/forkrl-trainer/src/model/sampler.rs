//! Batched generation with a KV cache.
//!
//! Prompts of different lengths are left-padded to one width (`transformers`' `padding_side="left"`): a row's first
//! real token has position 0 and its real tokens never attend to the padding. One prefill runs the prompts; then
//! each step feeds only the newly drawn token per row and extends the per-block key/value cache
//! ([`Policy::decode`]), so the prefix is never recomputed. The next token of every row is drawn on the host by a
//! `forkrl_rollout` decoding operator (greedy, temperature, top-k, top-p, two-temperature, CUTS), from the stream
//! `(seed, row_id, position)`, so a row's tokens depend on neither the batch composition nor the thread count.
//! A row stops at its first EOS id (kept in the response) or after `max_new_tokens` (then it is *truncated*); a row
//! that has stopped leaves the active batch ([`crate::model::policy::KvCache::retain_rows`]), so later steps decode
//! only the rows still running. The cache is preallocated for the longest prompt plus `max_new_tokens` and written in
//! place: no per-token concatenation.
//!
//! Generation runs on the policy's device. For a policy on an autodiff device, pass `policy.valid()` (burn's
//! `Module::valid`): sampling then records no graph.
//!
//! `use_cache = false` recomputes the whole left-padded sequence at every step: the reference the cache is tested
//! against.

use burn::tensor::{Device, Int, Tensor, TensorData};
use forkrl_rollout::{Decoding, RowRequest, decode_rows};
use serde::{Deserialize, Serialize};

use crate::{TrainerError, host_f32, model::policy::Policy};

type Result<T> = std::result::Result<T, TrainerError>;

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// Most new tokens per row.
    pub max_new_tokens: usize,
    /// End-of-sequence ids: a row stops at the first of them.
    pub eos: Vec<u32>,
    /// Id fed for padding and for rows that have stopped.
    pub pad: u32,
    /// Seed of the per-(row, position) sampling streams.
    pub seed: u64,
    /// Reuse keys and values of earlier positions (the default); `false` recomputes the prefix every step.
    pub use_cache: bool,
    /// Host threads of the decoding operators.
    pub threads: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { max_new_tokens: 128, eos: Vec::new(), pad: 0, seed: 0, use_cache: true, threads: 1 }
    }
}

/// One prompt to continue.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow<'a> {
    /// Prompt ids (at least one).
    pub prompt: &'a [u32],
    /// Decoding operator of this row.
    pub op: Decoding,
    /// Stable id of the row's sampling stream.
    pub row_id: u64,
}

/// What [`generate`] returns, one entry per row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Response ids (the EOS id included when one was drawn).
    pub tokens: Vec<Vec<u32>>,
    /// `log q(token)` under the row's decoding operator, per response token.
    pub logprobs: Vec<Vec<f32>>,
    /// Entropy (nats, T = 1) of the next-token distribution each token was drawn from.
    pub entropies: Vec<Vec<f32>>,
    /// The row reached `max_new_tokens` without an EOS.
    pub truncated: Vec<bool>,
    /// Number of CUTS argmax fallbacks in the row's response.
    pub fallbacks: Vec<usize>,
}

impl Generation {
    /// `b` empty rows.
    fn empty(b: usize) -> Self {
        Self {
            tokens: vec![Vec::new(); b],
            logprobs: vec![Vec::new(); b],
            entropies: vec![Vec::new(); b],
            truncated: vec![false; b],
            fallbacks: vec![0; b],
        }
    }

    /// `[B, W]` row-major response ids padded with `pad` to the longest response `W`, and the response mask.
    pub fn padded(&self, pad: u32) -> (Vec<u32>, Vec<bool>, usize) {
        let w = self.tokens.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(self.tokens.len() * w);
        let mut mask = Vec::with_capacity(self.tokens.len() * w);
        for row in &self.tokens {
            ids.extend(row.iter().copied().chain(std::iter::repeat_n(pad, w - row.len())));
            mask.extend((0..w).map(|i| i < row.len()));
        }
        (ids, mask, w)
    }

    /// Number of response tokens.
    pub fn num_tokens(&self) -> usize {
        self.tokens.iter().map(Vec::len).sum()
    }
}

fn ids_tensor(flat: Vec<i64>, b: usize, w: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(flat, [b, w]), device)
}

/// Continues every row with the same operator `op` (row ids `0..B`).
///
/// # Errors
/// As [`generate_rows`].
pub fn generate(policy: &Policy, prompts: &[Vec<u32>], op: Decoding, config: &SamplerConfig) -> Result<Generation> {
    let rows: Vec<SampleRow<'_>> =
        prompts.iter().enumerate().map(|(i, p)| SampleRow { prompt: p, op, row_id: i as u64 }).collect();
    generate_rows(policy, &rows, config)
}

/// Checks the rows and the configuration against the policy; returns the longest prompt.
fn check_rows(policy: &Policy, rows: &[SampleRow<'_>], config: &SamplerConfig) -> Result<usize> {
    let (vocab, inputs) = (policy.vocab_size(), policy.input_ids());
    for (r, row) in rows.iter().enumerate() {
        row.op.validate()?;
        if row.prompt.is_empty() {
            return Err(TrainerError::Shape(format!("row {r}: empty prompt")));
        }
        if let Some(&t) = row.prompt.iter().find(|&&t| t as usize >= inputs) {
            return Err(TrainerError::Shape(format!(
                "row {r}: prompt id {t} outside the vocabulary of {vocab} (and the {} soft-prefix ids)",
                inputs - vocab
            )));
        }
    }
    if config.pad as usize >= vocab {
        return Err(TrainerError::Shape(format!("pad id {} outside the vocabulary of {vocab}", config.pad)));
    }
    let width = rows.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    if width + config.max_new_tokens > policy.max_len() {
        return Err(TrainerError::ContextOverflow { tokens: width + config.max_new_tokens, context: policy.max_len() });
    }
    Ok(width)
}

/// Continues each row (see the module doc).
///
/// # Errors
/// [`TrainerError::Shape`] for an empty prompt or an id outside the vocabulary; [`TrainerError::ContextOverflow`]
/// when the longest prompt plus `max_new_tokens` exceeds the model's context; [`TrainerError::Core`] for an invalid
/// decoding operator or non-finite logits (naming the row).
pub fn generate_rows(policy: &Policy, rows: &[SampleRow<'_>], config: &SamplerConfig) -> Result<Generation> {
    let b = rows.len();
    let device = &policy.device();
    let mut out = Generation::empty(b);
    if b == 0 {
        return Ok(out);
    }
    let width = check_rows(policy, rows, config)?;
    let pads: Vec<usize> = rows.iter().map(|r| width - r.prompt.len()).collect();
    // Left-padded sequences, room for every new token (row stride `width + max_new_tokens`).
    let stride = width + config.max_new_tokens;
    let mut seqs = vec![i64::from(config.pad); b * stride];
    for (r, row) in rows.iter().enumerate() {
        for (i, &t) in row.prompt.iter().enumerate() {
            seqs[r * stride + pads[r] + i] = i64::from(t);
        }
    }
    let prefix = |seqs: &[i64], w: usize| -> Vec<i64> {
        (0..b).flat_map(|r| seqs[r * stride..r * stride + w].iter().copied()).collect()
    };
    let eos_for_ops = config.eos.first().copied();
    let mut done = vec![false; b];
    let mut cache = None;
    // Rows still decoding (indices into `rows`), in the order of the cache's rows.
    let mut active: Vec<usize> = (0..b).collect();
    let mut last: Vec<i64> = Vec::with_capacity(b);
    for pos in 0..config.max_new_tokens {
        let logits = match (config.use_cache, cache.as_mut()) {
            (true, None) => {
                let ids = ids_tensor(prefix(&seqs, width), b, width, device);
                let (logits, c) = policy.prefill(ids, &pads, stride)?;
                cache = Some(c);
                logits
            }
            (true, Some(c)) => policy.decode(ids_tensor(last.clone(), active.len(), 1, device), c)?,
            (false, _) => {
                // The reference path: the whole batch, every row, every step.
                let w = width + pos;
                let logits = policy.forward_left_padded(ids_tensor(prefix(&seqs, w), b, w, device), &pads)?;
                let idx: Vec<i64> = active.iter().map(|&r| r as i64).collect();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [active.len()]), device);
                logits.narrow(1, w - 1, 1).select(0, idx)
            }
        };
        let [a, s, v] = logits.dims();
        let next = host_f32(logits.narrow(1, s - 1, 1).reshape([a, v]))?;
        let requests: Vec<RowRequest> =
            active.iter().map(|&r| RowRequest { op: rows[r].op, position: pos, row_id: rows[r].row_id }).collect();
        let sampled = decode_rows(&next, v, &requests, eos_for_ops, config.seed, config.threads)?;
        for (&r, s) in active.iter().zip(&sampled) {
            seqs[r * stride + width + pos] = i64::from(s.token);
            out.tokens[r].push(s.token);
            out.logprobs[r].push(s.logprob);
            out.entropies[r].push(s.entropy);
            out.fallbacks[r] += usize::from(s.fallback);
            done[r] = config.eos.contains(&s.token);
        }
        // Finished rows leave the batch: later steps decode only the rows still running.
        let keep: Vec<usize> = (0..active.len()).filter(|&i| !done[active[i]]).collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            if let Some(c) = cache.as_mut() {
                c.retain_rows(&keep)?;
            }
            active = keep.iter().map(|&i| active[i]).collect();
        }
        last.clear();
        last.extend(active.iter().map(|&r| seqs[r * stride + width + pos]));
    }
    for r in 0..b {
        out.truncated[r] = !done[r];
    }
    Ok(out)
}
