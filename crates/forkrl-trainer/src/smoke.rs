//! Backend smoke check: a tiny causal transformer, one forward + backward + AdamW step on a fixed batch.
//!
//! This is not the policy model (that is the Qwen2/Qwen3/Llama decoder of `forkrl-trainer`'s model module); it is the
//! smallest network that exercises every kind of op the policy needs — embedding, RMSNorm, batched matmul, causal
//! softmax attention, SiLU MLP, cross-entropy, autodiff and the optimiser — so that a backend which passes here can
//! run the trainer. It also serves as the workload of the CPU-backend comparison in `docs/backends.md`.

use burn::{
    config::Config,
    module::{Module, ModuleVisitor, Param},
    nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, loss::CrossEntropyLossConfig},
    optim::{AdamWConfig, GradientsParams},
    tensor::{Bool, Device, Int, Tensor, TensorData, activation},
};

use crate::TrainerError;

/// Shape of the smoke-test transformer.
#[derive(Config, Debug)]
pub struct TinyLmConfig {
    /// Vocabulary size.
    #[config(default = 64)]
    pub vocab_size: usize,
    /// Hidden width.
    #[config(default = 32)]
    pub d_model: usize,
    /// Attention heads (must divide `d_model`).
    #[config(default = 2)]
    pub n_heads: usize,
    /// MLP width.
    #[config(default = 64)]
    pub d_ff: usize,
    /// Number of blocks.
    #[config(default = 2)]
    pub n_layers: usize,
}

/// One pre-norm transformer block: causal multi-head self-attention and a SiLU-gated MLP.
#[derive(Module, Debug)]
pub struct TinyBlock {
    attn_norm: RmsNorm,
    qkv: Linear,
    out: Linear,
    mlp_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    n_heads: usize,
}

/// The smoke-test causal language model.
#[derive(Module, Debug)]
pub struct TinyLm {
    embed: Embedding,
    blocks: Vec<TinyBlock>,
    norm: RmsNorm,
    head: Linear,
}

impl TinyLmConfig {
    /// Builds the model on `device` (pass an autodiff device to train it).
    ///
    /// # Errors
    /// [`TrainerError::InvalidConfig`] when `n_heads` does not divide `d_model` or a size is zero.
    pub fn init(&self, device: &Device) -> Result<TinyLm, TrainerError> {
        if self.vocab_size == 0 || self.d_model == 0 || self.d_ff == 0 || self.n_heads == 0 {
            return Err(TrainerError::invalid("TinyLmConfig", format!("{self:?}"), "a size is zero"));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(TrainerError::invalid(
                "TinyLmConfig.n_heads",
                self.n_heads,
                format!("does not divide d_model = {}", self.d_model),
            ));
        }
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let blocks = (0..self.n_layers)
            .map(|_| TinyBlock {
                attn_norm: RmsNormConfig::new(self.d_model).init(device),
                qkv: linear(self.d_model, 3 * self.d_model),
                out: linear(self.d_model, self.d_model),
                mlp_norm: RmsNormConfig::new(self.d_model).init(device),
                gate: linear(self.d_model, self.d_ff),
                up: linear(self.d_model, self.d_ff),
                down: linear(self.d_ff, self.d_model),
                n_heads: self.n_heads,
            })
            .collect();
        Ok(TinyLm {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            blocks,
            norm: RmsNormConfig::new(self.d_model).init(device),
            head: linear(self.d_model, self.vocab_size),
        })
    }
}

impl TinyBlock {
    fn forward(&self, x: Tensor<3>, causal: Tensor<4, Bool>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let dh = d / h;
        let qkv = self.qkv.forward(self.attn_norm.forward(x.clone())); // [B, T, 3D]
        let heads = |i: usize| {
            qkv.clone().narrow(2, i * d, d).reshape([b, t, h, dh]).swap_dims(1, 2) // [B, H, T, Dh]
        };
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt()); // [B, H, T, T]
        let scores = scores.mask_fill(causal, f32::NEG_INFINITY);
        let attn = activation::softmax(scores, 3).matmul(v); // [B, H, T, Dh]
        let x = x + self.out.forward(attn.swap_dims(1, 2).reshape([b, t, d]));
        let m = self.mlp_norm.forward(x.clone());
        let mlp = self.down.forward(activation::silu(self.gate.forward(m.clone())) * self.up.forward(m));
        x + mlp
    }
}

impl TinyLm {
    /// Next-token logits `[B, T, V]` for token ids `[B, T]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        // true above the diagonal: position i may not attend to j > i.
        let causal = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).reshape([1, 1, t, t]);
        let mut x = self.embed.forward(tokens); // [B, T, D]
        for block in &self.blocks {
            x = block.forward(x, causal.clone().expand([b, block.n_heads, t, t]));
        }
        self.head.forward(self.norm.forward(x))
    }

    /// Mean next-token cross-entropy of a `[B, T]` batch (positions `0..T-1` predict `1..T`).
    pub fn loss(&self, tokens: Tensor<2, Int>) -> Tensor<1> {
        let [b, t] = tokens.dims();
        let logits = self.forward(tokens.clone().narrow(1, 0, t - 1)); // [B, T-1, V]
        let [_, _, v] = logits.dims();
        let targets = tokens.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
        CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.reshape([b * (t - 1), v]), targets)
    }
}

/// What one smoke step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokeReport {
    /// Loss on the fixed batch before the optimiser step.
    pub loss_before: f32,
    /// Loss on the same batch after one AdamW step.
    pub loss_after: f32,
    /// Global L2 norm of the gradient.
    pub grad_norm: f32,
    /// Parameter tensors that received a gradient.
    pub params_with_grad: usize,
    /// Parameter tensors in the model.
    pub params_total: usize,
}

/// A deterministic `[B, T]` batch of token ids with learnable structure (each row counts up modulo `vocab`).
pub fn smoke_batch(batch: usize, seq_len: usize, vocab: usize, device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..batch * seq_len)
        .map(|i| {
            let (row, col) = (i / seq_len, i % seq_len);
            ((row * 7 + col * (row % 3 + 1)) % vocab) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq_len]), device)
}

/// Runs forward + backward + one AdamW step of [`TinyLm`] on `device` (autodiff is added here).
///
/// # Errors
/// [`TrainerError::NonFinite`] when the loss or a gradient is not finite; [`TrainerError::Backend`] when data cannot be
/// read back from the device.
pub fn smoke_step(device: &Device, seed: u64) -> Result<SmokeReport, TrainerError> {
    let device = device.clone().autodiff();
    device.seed(seed);
    let config = TinyLmConfig::new();
    let model = config.init(&device)?;
    let tokens = smoke_batch(4, 16, config.vocab_size, &device);

    let loss = model.loss(tokens.clone());
    let loss_before = scalar(loss.clone())?;
    if !loss_before.is_finite() {
        return Err(TrainerError::NonFinite { what: "smoke loss before the step", value: loss_before as f64 });
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let stats = gradient_stats(&model, &grads);
    if let Some(value) = stats.first_non_finite {
        return Err(TrainerError::NonFinite { what: "smoke gradient", value });
    }
    let grad_norm = stats.norm as f32;
    let (params_with_grad, params_total) = (stats.with_grad, stats.total);

    let mut optim = AdamWConfig::new().init();
    let model = optim.step(1e-2, model, grads);
    let loss_after = scalar(model.loss(tokens))?;
    if !loss_after.is_finite() {
        return Err(TrainerError::NonFinite { what: "smoke loss after the step", value: loss_after as f64 });
    }
    Ok(SmokeReport { loss_before, loss_after, grad_norm, params_with_grad, params_total })
}

fn scalar(t: Tensor<1>) -> Result<f32, TrainerError> {
    let values = t.into_data().try_to_vec::<f32>().map_err(|e| TrainerError::Backend(format!("{e:?}")))?;
    values.first().copied().ok_or_else(|| TrainerError::Backend("empty scalar tensor".into()))
}

/// Gradient statistics of a module: global L2 norm, parameters with a gradient, first non-finite entry.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GradientStats {
    /// Global L2 norm over every parameter's gradient.
    pub norm: f64,
    /// Parameter tensors that received a gradient.
    pub with_grad: usize,
    /// Parameter tensors in the module.
    pub total: usize,
    /// The first NaN or infinite gradient entry met, if any.
    pub first_non_finite: Option<f64>,
}

/// Reads every parameter's gradient back to the host (which also waits for an asynchronous backward to finish) and
/// summarises it.
pub fn gradient_stats<M: Module>(module: &M, grads: &GradientsParams) -> GradientStats {
    let mut visitor = ParamsGradVisitor { grads, stats: GradientStats::default(), sum_sq: 0.0 };
    module.visit(&mut visitor);
    GradientStats { norm: visitor.sum_sq.sqrt(), ..visitor.stats }
}

struct ParamsGradVisitor<'a> {
    grads: &'a GradientsParams,
    stats: GradientStats,
    sum_sq: f64,
}

impl ModuleVisitor for ParamsGradVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.stats.total += 1;
        let Some(grad) = self.grads.get::<D>(param.id) else { return };
        self.stats.with_grad += 1;
        match grad.into_data().try_to_vec::<f32>() {
            Ok(values) => {
                for v in values {
                    if !v.is_finite() {
                        self.stats.first_non_finite.get_or_insert(f64::from(v));
                    }
                    self.sum_sq += f64::from(v) * f64::from(v);
                }
            }
            Err(_) => {
                self.stats.first_non_finite.get_or_insert(f64::NAN);
            }
        }
    }
}
