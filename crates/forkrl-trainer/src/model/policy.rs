//! The policy: a decoder-only transformer covering the Llama, Qwen2 and Qwen3 architectures, for the built-in tiny
//! model trained from scratch and for Hugging Face checkpoints ([`crate::model::hf`]).
//!
//! Per block (pre-norm): `x += o(attn(RoPE(q_norm?(q(n₁x))), RoPE(k_norm?(k(n₁x))), v(n₁x)))`, then
//! `x += down(silu(gate(n₂x)) ⊙ up(n₂x))`, with RMSNorm `n(x) = x / sqrt(mean(x²) + ε) · γ`; the logits are
//! `norm(x) · Wₕ` with `Wₕ` the embedding (tied) or `lm_head`. Architecture switches, as in `transformers`:
//! - Qwen2: bias on q/k/v (`qkv_bias`), none on o and the MLP;
//! - Qwen3: RMSNorm over each head of q and k before RoPE (`qk_norm`), `head_dim` independent of the width;
//! - Llama: `attention_bias` puts a bias on q/k/v/o (`qkv_bias` + `o_bias`), `mlp_bias` on the MLP.
//!
//! Grouped-query attention: `n_kv_heads` divides `n_heads`; query head `h` reads key/value head `h / (n_heads /
//! n_kv_heads)`. Scores are scaled by `head_dim^-1/2`. On the CPU backend (f32) attention, RMSNorm and the SwiGLU gate
//! each run as one fused operation with its own backward pass ([`forkrl_core::attention`], [`forkrl_core::rms_norm`],
//! [`forkrl_core::swiglu`]); elsewhere they are composed from burn operations. RoPE is the "rotate half" convention with `rope_theta`: for
//! position `p` and `i < head_dim/2`, `θ_i = rope_theta^(−2i/head_dim)`, `x' = x·cos(pθ) + rotate_half(x)·sin(pθ)`.
//!
//! Padding: [`Policy::forward`] is for right-padded batches (positions `0..T`, causal mask; padding after a row's
//! tokens is never attended by them). [`Policy::forward_left_padded`] and the KV-cache pair [`Policy::prefill`] /
//! [`Policy::decode`] take the number of leading pad tokens per row, as in a left-padded `generate` of
//! `transformers`: a row's first real token has position 0 and real tokens never attend to pad keys.
//!
//! Soft prefixes (IMAX, [`SoftPrefixes`]): a policy may carry a table of trainable input embeddings, addressed by
//! *virtual* token ids `V, V + 1, …` past the vocabulary. Wherever such an id stands in the input, its embedding is the
//! table's row instead of a token's, so a prompt that starts with prefix ids runs with the prefix's embeddings in every
//! forward (training, scoring, prefill) without any other change to positions, padding or caching. Virtual ids are
//! inputs only: the head still predicts the `V` real tokens.

use burn::{
    config::Config,
    module::{Module, Param},
    nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig},
    tensor::{Bool, DType, Device, Distribution, Int, Tensor, TensorData, module::linear},
};

use crate::TrainerError;
use forkrl_core::{attention, rms_norm::rms_norm, swiglu::swiglu};

/// Shape and architecture switches of the policy. The defaults are the built-in tiny model.
#[derive(Config, Debug, PartialEq)]
pub struct PolicyConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    #[config(default = 64)]
    pub d_model: usize,
    /// Query heads.
    #[config(default = 4)]
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); `None` = `n_heads`.
    #[config(default = "None")]
    pub n_kv_heads: Option<usize>,
    /// Width of one head; `None` = `d_model / n_heads`. Must be even (RoPE).
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// MLP width.
    #[config(default = 192)]
    pub d_ff: usize,
    /// Number of blocks.
    #[config(default = 2)]
    pub n_layers: usize,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// RMSNorm ε.
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// Output head = input embedding (`tie_word_embeddings`).
    #[config(default = true)]
    pub tie_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    #[config(default = false)]
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    #[config(default = false)]
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama's `mlp_bias`).
    #[config(default = false)]
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k (Qwen3).
    #[config(default = false)]
    pub qk_norm: bool,
    /// Longest sequence (prompt + response) the RoPE tables cover.
    #[config(default = 32)]
    pub max_len: usize,
    /// RoPE scaling (`rope_scaling` / `rope_parameters` of a Hugging Face config); `None` = plain RoPE.
    #[config(default = "None")]
    pub rope_scaling: Option<RopeScaling>,
}

/// RoPE scaling as `transformers`' `ROPE_INIT_FUNCTIONS` compute it: each changes the inverse frequencies `θ_i` (and
/// YaRN scales `cos`/`sin` by an attention factor). With `λ_i = 2π/θ_i` the wavelength of pair `i`:
/// - `linear`: `θ_i / factor`;
/// - `llama3` (Llama 3.1+): `θ_i` where `λ_i < L/high_freq_factor`, `θ_i / factor` where `λ_i > L/low_freq_factor`,
///   and between them `(1 − s)·θ_i/factor + s·θ_i` with `s = (L/λ_i − low_freq_factor)/(high_freq_factor −
///   low_freq_factor)`, `L = original_max_position_embeddings`;
/// - `yarn` (arXiv 2309.00071): `θ_i = θ_i^int·(1 − e_i) + θ_i^ext·e_i` with `θ^ext = θ`, `θ^int = θ/factor` and `e_i
///   = 1 − ramp(i)` the linear ramp between the correction dimensions of `beta_fast` and `beta_slow` rotations over
///   `L` positions (floored / ceiled when `truncate`), and `cos`, `sin` times `attention_factor` (default `0.1·ln
///   factor + 1`, or the `mscale` / `mscale_all_dim` ratio).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor of the frequencies.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Divisor of the low frequencies (8 in Llama 3.1).
        factor: f64,
        /// Wavelengths above `L / low_freq_factor` are scaled (1).
        low_freq_factor: f64,
        /// Wavelengths below `L / high_freq_factor` are kept (4).
        high_freq_factor: f64,
        /// `L`: the pre-training context (8192).
        original_max_position_embeddings: f64,
    },
    /// YaRN.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// `L`: the pre-training context.
        original_max_position_embeddings: f64,
        /// Scale of `cos` and `sin`.
        attention_factor: f64,
        /// Rotations bounding extrapolation (32).
        beta_fast: f64,
        /// Rotations bounding interpolation (1).
        beta_slow: f64,
        /// Round the correction range outward (true).
        truncate: bool,
    },
}

impl RopeScaling {
    /// The checks of [`PolicyConfig::validate`]: finite positive factors, `high_freq_factor > low_freq_factor`.
    fn validate(&self) -> Result<(), TrainerError> {
        let values: Vec<(&str, f64)> = match *self {
            RopeScaling::Linear { factor } => vec![("factor", factor)],
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                if high_freq_factor <= low_freq_factor {
                    return Err(TrainerError::invalid(
                        "rope_scaling.high_freq_factor",
                        high_freq_factor,
                        format!("must exceed low_freq_factor = {low_freq_factor}"),
                    ));
                }
                vec![
                    ("factor", factor),
                    ("low_freq_factor", low_freq_factor),
                    ("high_freq_factor", high_freq_factor),
                    ("original_max_position_embeddings", original_max_position_embeddings),
                ]
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                ..
            } => {
                vec![
                    ("factor", factor),
                    ("original_max_position_embeddings", original_max_position_embeddings),
                    ("attention_factor", attention_factor),
                    ("beta_fast", beta_fast),
                    ("beta_slow", beta_slow),
                ]
            }
        };
        for (key, v) in values {
            if !(v.is_finite() && v > 0.0) {
                return Err(TrainerError::invalid(format!("rope_scaling.{key}"), v, "must be finite and > 0"));
            }
        }
        Ok(())
    }

    /// The scaled inverse frequencies (`inv_freq` as `transformers` computes it in f32, here in f64 then rounded) and
    /// the factor on `cos`/`sin`.
    pub fn apply(&self, inv_freq: &[f64], rope_theta: f64, head_dim: usize) -> (Vec<f64>, f64) {
        use std::f64::consts::PI;
        match *self {
            RopeScaling::Linear { factor } => (inv_freq.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (low_wavelen, high_wavelen) = (
                    original_max_position_embeddings / low_freq_factor,
                    original_max_position_embeddings / high_freq_factor,
                );
                let scaled = inv_freq
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (scaled, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            } => {
                let dim = head_dim as f64;
                let correction = |rotations: f64| {
                    dim * (original_max_position_embeddings / (rotations * 2.0 * PI)).ln() / (2.0 * rope_theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let scaled = inv_freq
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / factor) * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect();
                (scaled, attention_factor)
            }
        }
    }
}

/// One pre-norm block.
#[derive(Module, Debug)]
pub struct Block {
    pub(crate) attn_norm: RmsNorm,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    pub(crate) mlp_norm: RmsNorm,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

/// The policy.
#[derive(Module, Debug)]
pub struct Policy {
    pub(crate) embed: Param<Tensor<2>>,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Option<Linear>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    cos: Tensor<2>,
    sin: Tensor<2>,
    /// IMAX's soft-prefix table (not part of `policy.bpk` or an export; the trainer saves it beside them).
    pub(crate) prefixes: Option<SoftPrefixes>,
    /// Mixed precision ([`ComputeDtype::Bf16`]): the matmuls of the blocks run in bf16.
    bf16: bool,
}

/// The precision the policy computes in (`model.dtype`). The parameters (master weights), their gradients and the
/// optimiser state are f32 in both cases.
///
/// `bf16` is mixed precision as `torch.autocast(dtype=torch.bfloat16)` does it (TRL's `bf16=True`): each linear layer
/// of the blocks casts its input and its f32 weight (and bias) to bf16 and returns its product in bf16, so the saved
/// activations of the projections and of the MLP (`silu(gate)·up`, the widest) are bf16, and the weight gradients
/// flow back through the cast into the f32 parameters. What autocast keeps in f32 stays f32: the embedding, the
/// residual stream, RMSNorm (input upcast, as `transformers` does), RoPE, attention (softmax in f32; the CPU backend's
/// fused attention is f32-only) and the LM head with its entropy / log-prob statistics (verl upcasts the logits to
/// f32 before them; here they are computed in f32 from the f32 head weight). On a backend without native bf16 matmul
/// (burn-flex converts bf16 operands to f32 inside the matmul) this saves activation memory and costs time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 matmuls in the blocks, the rest in f32.
    Bf16,
}

/// A table of trainable input embeddings `[rows, D]` addressed by the virtual ids `V + row` ([`Policy::with_prefixes`]):
/// IMAX's `K` soft prefixes of `L_p` embeddings each, prefix `k`'s `j`-th embedding at row `k·L_p + j`.
#[derive(Module, Debug)]
pub struct SoftPrefixes {
    /// `[rows, D]`.
    pub table: Param<Tensor<2>>,
}

/// Keys and values of the tokens seen so far, per block, and each row's number of leading pad tokens.
///
/// Each block's keys and values live in one preallocated `[B, H_kv, capacity, D_h]` buffer that new positions are
/// written into in place (burn's `slice_assign` on a uniquely held tensor), so decoding copies nothing per token; the
/// capacity doubles when a decode step would pass it. [`KvCache::retain_rows`] drops finished rows.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    pads: Vec<usize>,
    len: usize,
}

impl KvCache {
    /// Number of positions cached (pads included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.pads.len()
    }

    /// Positions the buffers hold before they grow.
    pub fn capacity(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    /// Keeps only the rows `keep` (indices into the current rows, in the order given): the rows of a generation that
    /// are still decoding, so that finished rows cost nothing in later steps.
    ///
    /// # Errors
    /// [`TrainerError::Shape`] for an index that is not a current row.
    pub fn retain_rows(&mut self, keep: &[usize]) -> Result<(), TrainerError> {
        let rows = self.rows();
        if let Some(&r) = keep.iter().find(|&&r| r >= rows) {
            return Err(TrainerError::Shape(format!("retain_rows: row {r} of a cache of {rows} rows")));
        }
        if keep.len() == rows && keep.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        self.pads = keep.iter().map(|&r| self.pads[r]).collect();
        let Some(device) = self.layers.iter().flatten().next().map(|(k, _)| k.device()) else {
            return Ok(());
        };
        let idx: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [keep.len()]), &device);
        for layer in self.layers.iter_mut().flatten() {
            *layer = (layer.0.clone().select(0, idx.clone()), layer.1.clone().select(0, idx.clone()));
        }
        Ok(())
    }
}

/// Positions and attention mask of one forward call.
struct Ctx {
    /// `[B, S]` position ids.
    positions: Tensor<2, Int>,
    /// `[B, 1, S, past + S]`, true = not attended.
    mask: Tensor<4, Bool>,
}

/// The longest context a policy may be built for (its RoPE tables hold `max_len × head_dim` values).
pub const MAX_CONTEXT: usize = 1 << 20;

impl PolicyConfig {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// Width of one head.
    pub fn head_width(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Checks sizes: nothing zero, `n_kv_heads | n_heads`, an even head width.
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] naming the offending sizes.
    pub fn validate(&self) -> Result<(), TrainerError> {
        if self.vocab_size == 0
            || self.d_model == 0
            || self.n_heads == 0
            || self.kv_heads() == 0
            || self.d_ff == 0
            || self.max_len == 0
            || self.head_width() == 0
        {
            return Err(TrainerError::invalid("model", format!("{self:?}"), "a size of the policy is zero"));
        }
        // Caps far above any released model keep every product of sizes (parameter counts, RoPE tables, KV caches)
        // inside `usize`, and turn a corrupt or careless size into an error instead of an abort on allocation.
        for (key, value, cap) in [
            ("model.max_len", self.max_len, MAX_CONTEXT),
            ("model.d_model", self.d_model, 1 << 16),
            ("model.n_heads", self.n_heads, 1 << 12),
            ("model.head_dim", self.head_width(), 1 << 12),
            ("model.d_ff", self.d_ff, 1 << 18),
            ("model.n_layers", self.n_layers, 1 << 12),
            ("model.vocab_size", self.vocab_size, 1 << 24),
        ] {
            if value > cap {
                return Err(TrainerError::invalid(key, value, format!("must be at most {cap}")));
            }
        }
        if self.head_dim.is_none() && !self.d_model.is_multiple_of(self.n_heads) {
            return Err(TrainerError::invalid(
                "model.n_heads",
                self.n_heads,
                format!("does not divide d_model = {} (and no head_dim is given)", self.d_model),
            ));
        }
        if !self.head_width().is_multiple_of(2) {
            return Err(TrainerError::invalid(
                "model.head_dim",
                self.head_width(),
                "the head width must be even (RoPE)",
            ));
        }
        if !self.n_heads.is_multiple_of(self.kv_heads()) {
            return Err(TrainerError::invalid(
                "model.n_kv_heads",
                self.kv_heads(),
                format!("must divide n_heads = {}", self.n_heads),
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        if self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
            || self.rope_theta.is_infinite()
            || self.rms_norm_eps.is_nan()
            || self.rms_norm_eps < 0.0
        {
            return Err(TrainerError::invalid(
                "model.rope_theta / rms_norm_eps",
                format!("{} / {}", self.rope_theta, self.rms_norm_eps),
                "rope_theta must be finite and > 0, rms_norm_eps >= 0",
            ));
        }
        Ok(())
    }

    /// Builds the policy on `device` with random weights (embedding N(0, 0.02), burn's default for the linears).
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] from [`PolicyConfig::validate`].
    pub fn init(&self, device: &Device) -> Result<Policy, TrainerError> {
        self.validate()?;
        let (d, dh) = (self.d_model, self.head_width());
        let (hq, hkv) = (self.n_heads * dh, self.kv_heads() * dh);
        let linear = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let norm = |n| RmsNormConfig::new(n).with_epsilon(self.rms_norm_eps).init(device);
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                attn_norm: norm(d),
                q: linear(d, hq, self.qkv_bias),
                k: linear(d, hkv, self.qkv_bias),
                v: linear(d, hkv, self.qkv_bias),
                o: linear(hq, d, self.o_bias),
                q_norm: self.qk_norm.then(|| norm(dh)),
                k_norm: self.qk_norm.then(|| norm(dh)),
                mlp_norm: norm(d),
                gate: linear(d, self.d_ff, self.mlp_bias),
                up: linear(d, self.d_ff, self.mlp_bias),
                down: linear(self.d_ff, d, self.mlp_bias),
            })
            .collect();
        let embed = Tensor::<2>::random([self.vocab_size, d], Distribution::Normal(0.0, 0.02), device);
        let lm_head = (!self.tie_embeddings).then(|| linear(d, self.vocab_size, false));
        Ok(self.assemble(Param::from_tensor(embed), blocks, norm(d), lm_head, device))
    }

    /// Puts parts together with this configuration's RoPE tables.
    pub(crate) fn assemble(
        &self,
        embed: Param<Tensor<2>>,
        blocks: Vec<Block>,
        norm: RmsNorm,
        lm_head: Option<Linear>,
        device: &Device,
    ) -> Policy {
        let dh = self.head_width();
        let half = dh / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / dh as f64)).collect();
        let (inv_freq, scale) = match &self.rope_scaling {
            Some(s) => s.apply(&inv_freq, self.rope_theta, dh),
            None => (inv_freq, 1.0),
        };
        let scale = scale as f32;
        let mut cos = Vec::with_capacity(self.max_len * half);
        let mut sin = Vec::with_capacity(self.max_len * half);
        for p in 0..self.max_len {
            for &f in &inv_freq {
                // transformers computes inv_freq in f32 and the angle p·inv_freq in f32; so do we.
                let angle = p as f32 * f as f32;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        Policy {
            embed,
            blocks,
            norm,
            lm_head,
            n_heads: self.n_heads,
            n_kv_heads: self.kv_heads(),
            head_dim: dh,
            cos: Tensor::from_data(TensorData::new(cos, [self.max_len, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [self.max_len, half]), device),
            prefixes: None,
            bf16: false,
        }
    }
}

/// Applies RoPE to `[B, H, S, Dh]` with per-row tables `[B, 1, S, Dh/2]`.
fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, s, dh] = x.dims();
    let half = dh / 2;
    let cos = cos.clone().expand([b, h, s, half]);
    let sin = sin.clone().expand([b, h, s, half]);
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(vec![x1.clone() * cos.clone() - x2.clone() * sin.clone(), x1 * sin + x2 * cos], 3)
}

/// Attention inputs shared by the blocks of one forward call.
struct Shared<'a> {
    ctx: &'a Ctx,
    cos: Tensor<4>,
    sin: Tensor<4>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// [`ComputeDtype::Bf16`].
    bf16: bool,
}

impl Shared<'_> {
    /// A linear layer in the compute dtype: in bf16, input, weight and bias cast to bf16 (the weight gradient flows
    /// back through the cast into the f32 parameter) and the product left in bf16.
    fn linear<const D: usize>(&self, l: &Linear, x: Tensor<D>) -> Tensor<D> {
        if !self.bf16 {
            return l.forward(x);
        }
        let bf16 = |t: Tensor<D>| if t.dtype() == DType::BF16 { t } else { t.cast(DType::BF16) };
        let weight = l.weight.val().cast(DType::BF16);
        linear(bf16(x), weight, l.bias.as_ref().map(|b| b.val().cast(DType::BF16)))
    }

    /// `x` in f32 (a no-op unless mixed precision left it in bf16).
    fn f32<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if x.dtype() == DType::F32 { x } else { x.cast(DType::F32) }
    }
}

/// Writes the new keys/values `[B, H_kv, S, D_h]` at positions `len..len + S` of a block's cache buffers (growing
/// them when full) and returns the keys/values of every position so far (views into the buffers).
fn append_kv(
    slot: &mut Option<(Tensor<4>, Tensor<4>)>,
    len: usize,
    k: Tensor<4>,
    v: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, hkv, s, dh] = k.dims();
    // `prefill` fills every slot; the slot is only empty while this function holds its buffers.
    let Some((mut kc, mut vc)) = slot.take() else {
        return (k, v);
    };
    let cap = kc.dims()[2];
    if len + s > cap {
        let extra = (len + s).max(2 * cap) - cap;
        let device = kc.device();
        let zeros = Tensor::<4>::zeros([b, hkv, extra, dh], &device);
        kc = Tensor::cat(vec![kc, zeros.clone()], 2);
        vc = Tensor::cat(vec![vc, zeros], 2);
    }
    let at = [0..b, 0..hkv, len..len + s, 0..dh];
    kc = kc.slice_assign(at.clone(), k);
    vc = vc.slice_assign(at, v);
    let out = (kc.clone().narrow(2, 0, len + s), vc.clone().narrow(2, 0, len + s));
    *slot = Some((kc, vc));
    out
}

/// RMSNorm `n` of `x` (fused on the CPU backend, composed elsewhere: [`rms_norm`]).
fn norm<const D: usize>(n: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    rms_norm(x, n.gamma.val(), n.epsilon)
}

impl Block {
    /// One block over new tokens `x: [B, S, D]`; `past` is this block's cache slot and the number of positions already
    /// in it: the new keys/values are written there and attention covers every cached position.
    ///
    /// Grouped-query attention runs without repeating the key/value heads ([`attention::causal_attention`]: the fused
    /// operation reads key/value head `h / rep` for query head `h`; the composed path stacks the `rep = H_q / H_kv`
    /// query heads of one key/value head along the query axis, `[B, H_kv, rep·S, D_h]`, so one batched matmul per
    /// key/value head serves them all.
    fn forward(
        &self,
        x: Tensor<3>,
        sh: &Shared<'_>,
        past: Option<(&mut Option<(Tensor<4>, Tensor<4>)>, usize)>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (hq, hkv, dh) = (sh.n_heads, sh.n_kv_heads, sh.head_dim);
        let h = norm(&self.attn_norm, x.clone());
        let heads = |l: &Linear, n: usize, norm: &Option<RmsNorm>| {
            let t = sh.f32(sh.linear(l, h.clone())).reshape([b, s, n, dh]);
            let t = match norm {
                Some(n) => self::norm(n, t),
                None => t,
            };
            t.swap_dims(1, 2) // [B, n, S, Dh]
        };
        let q = rope(heads(&self.q, hq, &self.q_norm), &sh.cos, &sh.sin);
        let mut k = rope(heads(&self.k, hkv, &self.k_norm), &sh.cos, &sh.sin);
        let mut v = heads(&self.v, hkv, &None);
        if let Some((slot, len)) = past {
            (k, v) = append_kv(slot, len, k, v);
        }
        // Query head h = g·rep + r reads key/value head g (fused on the CPU backend, composed elsewhere).
        let attn = attention::causal_attention(q, k, v, &sh.ctx.mask).swap_dims(1, 2).reshape([b, s, hq * dh]);
        let x = x + sh.f32(sh.linear(&self.o, attn));
        let m = norm(&self.mlp_norm, x.clone());
        let mlp = sh.linear(&self.down, swiglu(sh.linear(&self.gate, m.clone()), sh.linear(&self.up, m)));
        x + sh.f32(mlp)
    }
}

impl Policy {
    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed.dims()[0]
    }

    /// This policy with the soft-prefix table `prefixes` (`None` removes it). Its rows must be `D` wide.
    ///
    /// # Errors
    /// [`TrainerError::Shape`] for a table of another width or without rows.
    pub fn with_prefixes(mut self, prefixes: Option<SoftPrefixes>) -> Result<Self, TrainerError> {
        if let Some(p) = &prefixes {
            let ([rows, d], width) = (p.table.dims(), self.embed.dims()[1]);
            if d != width || rows == 0 {
                return Err(TrainerError::Shape(format!("soft prefixes [{rows}, {d}] for a policy of width {width}")));
            }
        }
        self.prefixes = prefixes;
        Ok(self)
    }

    /// This policy computing in `dtype` ([`ComputeDtype`]); the parameters stay f32.
    #[must_use]
    pub fn with_dtype(mut self, dtype: ComputeDtype) -> Self {
        self.bf16 = dtype == ComputeDtype::Bf16;
        self
    }

    /// The precision the policy computes in.
    pub fn dtype(&self) -> ComputeDtype {
        if self.bf16 { ComputeDtype::Bf16 } else { ComputeDtype::F32 }
    }

    /// Number of input ids: the vocabulary plus the soft-prefix rows (virtual ids `V..`).
    pub fn input_ids(&self) -> usize {
        self.vocab_size() + self.prefixes.as_ref().map_or(0, |p| p.table.dims()[0])
    }

    /// The soft-prefix table, when the policy carries one.
    pub fn prefixes(&self) -> Option<&SoftPrefixes> {
        self.prefixes.as_ref()
    }

    /// Removes and returns the soft-prefix table.
    pub fn take_prefixes(&mut self) -> Option<SoftPrefixes> {
        self.prefixes.take()
    }

    /// The input embeddings `[n, D]` of flat ids `[n]`: token rows, or soft-prefix rows for virtual ids `≥ V`.
    fn embed_ids(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        let embed = self.embed.val();
        let Some(prefixes) = &self.prefixes else {
            return embed.select(0, ids);
        };
        let [v, d] = embed.dims();
        let rows = prefixes.table.dims()[0];
        let n = ids.dims()[0];
        let virtual_id = ids.clone().greater_equal_elem(v as i64);
        let tokens = embed.select(0, ids.clone().clamp_max(v as i64 - 1));
        let soft = prefixes.table.val().select(0, ids.sub_scalar(v as i64).clamp(0, rows as i64 - 1));
        tokens.mask_where(virtual_id.reshape([n, 1]).expand([n, d]), soft)
    }

    /// The LM head weight as `[V, D]`: the embedding when tied, else `lm_head`'s weight (stored `[D, V]` by burn's
    /// `Linear`, transposed here as a view).
    pub fn head_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.weight.val().transpose(),
            None => self.embed.val(),
        }
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.embed.val().device()
    }

    /// Longest sequence the RoPE tables cover.
    pub fn max_len(&self) -> usize {
        self.cos.dims()[0]
    }

    fn check_len(&self, t: usize) -> Result<(), TrainerError> {
        if t > self.max_len() {
            return Err(TrainerError::ContextOverflow { tokens: t, context: self.max_len() });
        }
        Ok(())
    }

    /// Positions and mask for `s` new tokens after `past` cached ones, rows with `pads[b]` leading pad tokens.
    fn ctx(&self, pads: &[usize], s: usize, past: usize, device: &Device) -> Ctx {
        let b = pads.len();
        let tk = past + s;
        let positions: Vec<i64> =
            pads.iter().flat_map(|&p| (past..tk).map(move |a| a.saturating_sub(p) as i64)).collect();
        let positions = Tensor::<2, Int>::from_data(TensorData::new(positions, [b, s]), device);
        // Causal: key j > past + i is masked.
        let causal = Tensor::<2, Bool>::tril_mask([s, tk], past as i64, device).reshape([1, 1, s, tk]);
        let mask = if pads.iter().all(|&p| p == 0) {
            causal.expand([b, 1, s, tk])
        } else {
            // A real query never attends to a pad key; a pad query attends causally to everything (its output is
            // never used, and a fully masked row would be NaN).
            let pad_key: Vec<bool> = pads.iter().flat_map(|&p| (0..tk).map(move |j| j < p)).collect();
            let real_query: Vec<bool> = pads.iter().flat_map(|&p| (past..tk).map(move |a| a >= p)).collect();
            let pad_key = Tensor::<4, Bool>::from_data(TensorData::new(pad_key, [b, 1, 1, tk]), device);
            let real_query = Tensor::<4, Bool>::from_data(TensorData::new(real_query, [b, 1, s, 1]), device);
            let padding = pad_key.expand([b, 1, s, tk]).bool_and(real_query.expand([b, 1, s, tk]));
            causal.expand([b, 1, s, tk]).bool_or(padding)
        };
        Ctx { positions, mask }
    }

    fn run(&self, tokens: Tensor<2, Int>, ctx: &Ctx, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.trunk(tokens, ctx, cache))
    }

    /// Logits `[B, S, V]` of hidden states `[B, S, D]`.
    fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let weight = self.head_weight(); // [V, D]
        let v = weight.dims()[0];
        x.reshape([b * s, d]).matmul(weight.transpose()).reshape([b, s, v])
    }

    /// The blocks and the final norm: last-layer hidden states `[B, S, D]`.
    fn trunk(&self, tokens: Tensor<2, Int>, ctx: &Ctx, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [b, s] = tokens.dims();
        let half = self.head_dim / 2;
        let flat_pos = ctx.positions.clone().reshape([b * s]);
        let sh = Shared {
            ctx,
            cos: self.cos.clone().select(0, flat_pos.clone()).reshape([b, 1, s, half]),
            sin: self.sin.clone().select(0, flat_pos).reshape([b, 1, s, half]),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            bf16: self.bf16,
        };
        let d = self.embed.dims()[1];
        let mut x = self.embed_ids(tokens.reshape([b * s])).reshape([b, s, d]);
        for (i, block) in self.blocks.iter().enumerate() {
            let past = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.len));
            x = block.forward(x, &sh, past);
        }
        norm(&self.norm, x)
    }

    /// Last-layer hidden states `[B, T, D]` (after the final norm) of right-padded token ids, as SHEAR reads them.
    ///
    /// # Errors
    /// [`TrainerError::ContextOverflow`] when `T` exceeds the RoPE tables.
    pub fn hidden_states(&self, tokens: Tensor<2, Int>) -> Result<Tensor<3>, TrainerError> {
        let [b, t] = tokens.dims();
        self.check_len(t)?;
        let ctx = self.ctx(&vec![0; b], t, 0, &tokens.device());
        Ok(self.trunk(tokens, &ctx, None))
    }

    /// Next-token logits `[B, T, V]` for right-padded token ids `[B, T]` (positions `0..T`, causal mask).
    ///
    /// # Errors
    /// [`TrainerError::ContextOverflow`] when `T` exceeds the RoPE tables.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Result<Tensor<3>, TrainerError> {
        let [b, t] = tokens.dims();
        self.check_len(t)?;
        let ctx = self.ctx(&vec![0; b], t, 0, &tokens.device());
        Ok(self.run(tokens, &ctx, None))
    }

    /// Next-token logits `[B, T, V]` for left-padded token ids: row `b` starts with `pads[b]` pad tokens.
    ///
    /// # Errors
    /// [`TrainerError::ContextOverflow`]; [`TrainerError::Shape`] when `pads` does not have one entry per row or a
    /// row is all padding.
    pub fn forward_left_padded(&self, tokens: Tensor<2, Int>, pads: &[usize]) -> Result<Tensor<3>, TrainerError> {
        let [b, t] = tokens.dims();
        self.check_len(t)?;
        check_pads(pads, b, t)?;
        let ctx = self.ctx(pads, t, 0, &tokens.device());
        Ok(self.run(tokens, &ctx, None))
    }

    /// Runs a left-padded prompt batch and returns the logits of its last position `[B, 1, V]` (the only ones
    /// generation needs: with a 150k vocabulary, all `[B, T, V]` of a long prompt batch would not fit in memory) and
    /// the KV cache for [`Policy::decode`], with room for `capacity` positions (at least the prompt's; more positions
    /// grow it).
    ///
    /// # Errors
    /// As [`Policy::forward_left_padded`].
    pub fn prefill(
        &self,
        tokens: Tensor<2, Int>,
        pads: &[usize],
        capacity: usize,
    ) -> Result<(Tensor<3>, KvCache), TrainerError> {
        let [b, t] = tokens.dims();
        self.check_len(t)?;
        check_pads(pads, b, t)?;
        let device = tokens.device();
        let cap = capacity.clamp(t, self.max_len());
        let buffer = || Tensor::<4>::zeros([b, self.n_kv_heads, cap, self.head_dim], &device);
        let layers = (0..self.blocks.len()).map(|_| Some((buffer(), buffer()))).collect();
        let mut cache = KvCache { layers, pads: pads.to_vec(), len: 0 };
        let ctx = self.ctx(pads, t, 0, &device);
        let hidden = self.trunk(tokens, &ctx, Some(&mut cache));
        cache.len = t;
        Ok((self.head(hidden.narrow(1, t - 1, 1)), cache))
    }

    /// Logits `[B, S, V]` of `S` new tokens per row after the cached ones; extends the cache.
    ///
    /// # Errors
    /// [`TrainerError::ContextOverflow`] past the RoPE tables; [`TrainerError::Shape`] when the batch size differs
    /// from the cache's.
    pub fn decode(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Result<Tensor<3>, TrainerError> {
        let [b, s] = tokens.dims();
        if b != cache.rows() {
            return Err(TrainerError::Shape(format!("decode: {b} rows, the KV cache has {}", cache.pads.len())));
        }
        self.check_len(cache.len + s)?;
        let ctx = self.ctx(&cache.pads, s, cache.len, &tokens.device());
        let logits = self.run(tokens, &ctx, Some(cache));
        cache.len += s;
        Ok(logits)
    }
}

fn check_pads(pads: &[usize], b: usize, t: usize) -> Result<(), TrainerError> {
    if pads.len() != b {
        return Err(TrainerError::Shape(format!("{} pad counts for {b} rows", pads.len())));
    }
    if let Some(row) = pads.iter().position(|&p| p >= t) {
        return Err(TrainerError::Shape(format!("row {row} is all padding ({} pads, width {t})", pads[row])));
    }
    Ok(())
}
