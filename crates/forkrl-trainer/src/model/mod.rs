//! The policy and everything around it: the decoder ([`policy`]), Hugging Face loading ([`hf`]) and tokenizers
//! ([`tokenizer`]), the KV-cache sampler ([`sampler`]), our checkpoints ([`checkpoint`]), global-norm gradient
//! clipping ([`gradients`]), Hugging Face export ([`hf_export`]), and [`Model`]: a built
//! policy with its tokenizer and special ids.

pub mod checkpoint;
pub mod gradients;
pub mod hf;
pub mod hf_export;
pub mod policy;
pub mod sampler;
pub mod tokenizer;

use std::sync::Mutex;

use burn::{
    module::{Module, ModuleVisitor, Param},
    tensor::{DType, Device, Int, Tensor, TensorData},
};
use forkrl_entropy::fused_head::{DEFAULT_CHUNK_BYTES, chunk_rows_for, head_entropy_and_logprobs};

use crate::{
    Result, TrainerError,
    config::ModelConfig,
    model::{
        policy::{ComputeDtype, Policy, PolicyConfig},
        tokenizer::{CharTokenizer, EOS, HfTokenizer, PAD, TextTokenizer},
    },
};

/// The policy's tokenizer and special ids.
#[derive(Debug)]
pub struct Vocab {
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// Ids that end a response (the first one ends SFT targets).
    pub eos: Vec<u32>,
    /// The padding id.
    pub pad: u32,
}

impl Vocab {
    /// Token ids of `text`.
    ///
    /// # Errors
    /// [`TrainerError::Tokenizer`] for text the tokenizer cannot encode.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text)
    }

    /// Token ids of `text` continuing a sequence (a response target): no BOS or other added special token.
    ///
    /// # Errors
    /// [`TrainerError::Tokenizer`] for text the tokenizer cannot encode.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_continuation(text)
    }

    /// The sampler's settings for this vocabulary: its EOS and pad ids, `max_new_tokens`, `seed`.
    pub fn sampler_config(&self, max_new_tokens: usize, seed: u64) -> sampler::SamplerConfig {
        sampler::SamplerConfig {
            max_new_tokens,
            eos: self.eos.clone(),
            pad: self.pad,
            seed,
            ..sampler::SamplerConfig::default()
        }
    }

    /// The text of a response (up to its first EOS).
    pub fn text(&self, response: &[u32]) -> String {
        self.tokenizer.decode_response(response, &self.eos)
    }
}

/// A built policy (on the device it was built for), its shape and its vocabulary.
#[derive(Debug)]
pub struct Model {
    /// The policy.
    pub policy: Policy,
    /// Its shape.
    pub config: PolicyConfig,
    /// Its tokenizer and special ids.
    pub vocab: Vocab,
}

/// Serialises the code that draws from burn's CPU generator: it is one process-wide generator, so a seeded build in
/// one thread and any other draw in another (a policy initialised before a checkpoint overwrites it) would interleave.
static GENERATOR: Mutex<()> = Mutex::new(());

/// Holds [`GENERATOR`] for the caller's draws.
pub(crate) fn generator_lock() -> std::sync::MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Builds the policy on `device` with the backend's generator seeded by `seed`, and initialises every parameter at
/// once (burn initialises parameters lazily, on first use): the weights then depend on `seed` alone, not on what else
/// draws random numbers before the policy is first used.
///
/// # Errors
/// As [`build`].
pub fn build_seeded(config: &ModelConfig, device: &Device, seed: u64) -> Result<Model> {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    let _guard = generator_lock();
    device.seed(seed);
    let model = build(config, device)?;
    model.policy.visit(&mut Touch);
    Ok(model)
}

/// Builds the policy on `device` (an autodiff device to train it): the tiny model with the character tokenizer, or a
/// Hugging Face directory.
///
/// # Errors
/// The loader's errors; a tokenizer with more ids than the embedding has rows; a checkpoint without an EOS id;
/// `model.dtype = bf16` on a device without bf16 arithmetic.
pub fn build(config: &ModelConfig, device: &Device) -> Result<Model> {
    if config.dtype == ComputeDtype::Bf16 && !device.supports_dtype(DType::BF16) {
        return Err(TrainerError::invalid(
            "model.dtype",
            "bf16",
            format!("the device {device:?} has no bf16 arithmetic; use model.dtype = \"f32\" there"),
        ));
    }
    let mut model = build_f32(config, device)?;
    model.policy = model.policy.with_dtype(config.dtype);
    Ok(model)
}

fn build_f32(config: &ModelConfig, device: &Device) -> Result<Model> {
    match &config.hf_dir {
        Some(dir) => {
            let model = hf::load(dir, Some(config.max_len.unwrap_or(4096)), device)?;
            let tok = HfTokenizer::from_file(&dir.join("tokenizer.json"))?;
            // Every id the tokenizer can produce must have an embedding row.
            if tok.vocab_size() > model.config.policy.vocab_size {
                return Err(TrainerError::Tokenizer(format!(
                    "{}: the tokenizer has {} ids, the model's embedding only {} rows",
                    dir.display(),
                    tok.vocab_size(),
                    model.config.policy.vocab_size
                )));
            }
            let eos = model.config.special.eos.clone();
            let Some(&first_eos) = eos.first() else {
                return Err(TrainerError::HfConfig {
                    path: dir.join("config.json"),
                    reason: "no `eos_token_id` in config.json or generation_config.json".into(),
                });
            };
            let pad = model.config.special.pad.unwrap_or(first_eos);
            let vocab = Vocab { tokenizer: TextTokenizer::Hf(Box::new(tok)), eos, pad };
            Ok(Model { policy: model.policy, config: model.config.policy, vocab })
        }
        None => {
            let tok = CharTokenizer;
            let pc = PolicyConfig::new(tok.vocab_size())
                .with_d_model(config.d_model)
                .with_n_layers(config.n_layers)
                .with_n_heads(config.n_heads)
                .with_d_ff(config.d_ff)
                .with_max_len(config.max_len.unwrap_or(64));
            let policy = pc.init(device)?;
            Ok(Model {
                policy,
                config: pc,
                vocab: Vocab { tokenizer: TextTokenizer::Char(tok), eos: vec![EOS], pad: PAD },
            })
        }
    }
}

/// Whether every parameter is finite, read back in one transfer: `Σ x·0` is 0 for finite `x` and NaN for ±inf or NaN,
/// so one elementwise pass per tensor and one scalar per tensor decide it. Returns the index (in module order) of the
/// first tensor holding a non-finite value.
///
/// # Errors
/// Read-back errors.
pub fn first_non_finite_parameter(policy: &Policy) -> Result<Option<usize>> {
    struct Probe(Vec<Tensor<1>>);
    impl ModuleVisitor for Probe {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().detach().mul_scalar(0.0).sum());
        }
    }
    let mut probe = Probe(Vec::new());
    policy.visit(&mut probe);
    if probe.0.is_empty() {
        return Ok(None);
    }
    let sums = crate::host_f32(Tensor::cat(probe.0, 0))?;
    Ok(sums.iter().position(|v| !v.is_finite()))
}

/// `[B, W]` ids as an integer tensor.
pub fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&t| i64::from(t))).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

/// Entropy and log-prob `[B, W]` of every next token of right-padded sequences `[B, W + 1]` at `temperature`, on the
/// policy's device (with a graph when the policy is on an autodiff device), by the fused LM head
/// (`forkrl_entropy::fused_head`): the `[B, W, V]` logits are never materialised, only one chunk of at most
/// [`forkrl_entropy::fused_head::DEFAULT_CHUNK_BYTES`] of them at a time, in the forward and the backward pass.
///
/// # Errors
/// The policy's and the entropy kernel's errors.
pub fn token_stats(policy: &Policy, seqs: &[Vec<u32>], w: usize, temperature: f32) -> Result<(Tensor<2>, Tensor<2>)> {
    let ids = ids_tensor(seqs, &policy.device());
    let hidden = policy.hidden_states(ids.clone().narrow(1, 0, w))?;
    let chunk = chunk_rows_for(policy.vocab_size(), DEFAULT_CHUNK_BYTES);
    let mut targets = ids.narrow(1, 1, w);
    if policy.prefixes().is_some() {
        // Soft-prefix ids are inputs, never predicted: the prompt positions that "predict" one (never in a loss)
        // read the last real token instead.
        targets = targets.clamp_max(policy.vocab_size() as i64 - 1);
    }
    Ok(head_entropy_and_logprobs(hidden, policy.head_weight(), targets, temperature, chunk)?)
}

/// [`token_stats`] without a graph, read back to the host, `micro` rows per forward (verl's
/// `log_prob_micro_batch_size_per_gpu`): peak memory is set by `micro`, not by the number of rows. Returns the row-major
/// `[B, W]` entropy and log-prob.
///
/// # Errors
/// As [`token_stats`].
pub fn token_stats_host(
    policy: &Policy,
    seqs: &[Vec<u32>],
    w: usize,
    temperature: f32,
    micro: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let valid = policy.valid();
    let (mut entropy, mut log_prob) = (Vec::with_capacity(seqs.len() * w), Vec::with_capacity(seqs.len() * w));
    for rows in seqs.chunks(micro.max(1)) {
        let (h, lp) = token_stats(&valid, rows, w, temperature)?;
        entropy.extend(crate::host_f32(h)?);
        log_prob.extend(crate::host_f32(lp)?);
    }
    Ok((entropy, log_prob))
}

#[cfg(test)]
mod tests {
    use burn::{
        module::{Module, ModuleVisitor, Param},
        tensor::{Device, Tensor},
    };
    use forkrl_core::Backend;
    use forkrl_entropy::tensor::entropy_and_logprobs_reference;

    use super::*;

    /// Every parameter gradient of `f(policy)`, flattened in module order.
    fn gradients(policy: &Policy, loss: Tensor<1>) -> Vec<f32> {
        struct Grads<'a>(&'a burn::tensor::Gradients, Vec<f32>);
        impl ModuleVisitor for Grads<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = param.val().grad(self.0) {
                    self.1.extend(g.into_data().try_to_vec::<f32>().expect("f32"));
                }
            }
        }
        let grads = loss.backward();
        let mut visitor = Grads(&grads, Vec::new());
        policy.visit(&mut visitor);
        visitor.1
    }

    #[test]
    fn token_stats_through_the_fused_head_equals_full_logits_for_tied_and_untied_heads() {
        let device: Device = Backend::from_env().and_then(Backend::device).expect("backend").autodiff();
        for tied in [true, false] {
            device.seed(3);
            let config = PolicyConfig::new(29).with_d_model(16).with_n_heads(2).with_d_ff(24).with_max_len(12);
            let policy = config.with_tie_embeddings(tied).init(&device).expect("policy");
            let seqs: Vec<Vec<u32>> = (0..3).map(|r| (0..9).map(|i| ((r * 7 + i * 5) % 29) as u32).collect()).collect();
            let (h, lp) = token_stats(&policy, &seqs, 8, 0.8).expect("fused");
            let fused_values = [crate::host_f32(h.clone()).expect("h"), crate::host_f32(lp.clone()).expect("lp")];
            let fused = gradients(&policy, h.sum() * 0.3 + lp.sum());
            let ids = ids_tensor(&seqs, &device);
            let logits = policy.forward(ids.clone().narrow(1, 0, 8)).expect("forward");
            let (h2, lp2) = entropy_and_logprobs_reference(logits, ids.narrow(1, 1, 8), 0.8).expect("reference");
            let reference_values = [crate::host_f32(h2.clone()).expect("h"), crate::host_f32(lp2.clone()).expect("lp")];
            let reference = gradients(&policy, h2.sum() * 0.3 + lp2.sum());
            for (a, b) in fused_values.iter().flatten().zip(reference_values.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "tied={tied}: value {a} vs {b}");
            }
            assert_eq!(fused.len(), reference.len(), "tied={tied}: every parameter gets a gradient");
            let worst = fused.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "tied={tied}: gradients differ by {worst}");
        }
    }
}
