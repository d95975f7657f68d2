//! The built-in tiny policy: a Llama-style decoder (RMSNorm, rotary position embeddings, multi-head causal
//! self-attention, SwiGLU MLP, tied input/output embedding) trained from scratch for the CPU default of
//! `cargo xtask train`.
//!
//! RoPE uses the Hugging Face "rotate half" convention with `rope_theta`: for head dimension `d` and position `p`,
//! `θ_i = rope_theta^(−2i/d)`, `x' = x·cos(pθ) + rotate_half(x)·sin(pθ)`. Loading Hugging Face checkpoints (Qwen2/Qwen3/
//! Llama with grouped-query attention) is not implemented yet; this module is the architecture they share.

use burn::{
    config::Config,
    module::{Module, Param},
    nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig},
    tensor::{Bool, Device, Distribution, Int, Tensor, TensorData, activation},
};

use crate::TrainerError;

/// Shape of the tiny policy.
#[derive(Config, Debug, PartialEq)]
pub struct PolicyConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    #[config(default = 64)]
    pub d_model: usize,
    /// Attention heads (must divide `d_model`, head width even).
    #[config(default = 4)]
    pub n_heads: usize,
    /// MLP width.
    #[config(default = 192)]
    pub d_ff: usize,
    /// Number of blocks.
    #[config(default = 2)]
    pub n_layers: usize,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Longest sequence (prompt + response).
    #[config(default = 32)]
    pub max_len: usize,
}

/// One pre-norm block.
#[derive(Module, Debug)]
pub struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The policy.
#[derive(Module, Debug)]
pub struct Policy {
    embed: Param<Tensor<2>>,
    blocks: Vec<Block>,
    norm: RmsNorm,
    n_heads: usize,
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl PolicyConfig {
    /// Builds the policy on `device`.
    ///
    /// # Errors
    /// [`TrainerError::Config`] for a zero size, heads that do not divide the width, or an odd head width.
    pub fn init(&self, device: &Device) -> Result<Policy, TrainerError> {
        if self.vocab_size == 0 || self.d_model == 0 || self.n_heads == 0 || self.d_ff == 0 || self.max_len == 0 {
            return Err(TrainerError::Config(format!("PolicyConfig has a zero size: {self:?}")));
        }
        if !self.d_model.is_multiple_of(self.n_heads) || !(self.d_model / self.n_heads).is_multiple_of(2) {
            return Err(TrainerError::Config(format!(
                "PolicyConfig: n_heads = {} must divide d_model = {} into even head widths",
                self.n_heads, self.d_model
            )));
        }
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let d = self.d_model;
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                attn_norm: RmsNormConfig::new(d).init(device),
                q: linear(d, d),
                k: linear(d, d),
                v: linear(d, d),
                o: linear(d, d),
                mlp_norm: RmsNormConfig::new(d).init(device),
                gate: linear(d, self.d_ff),
                up: linear(d, self.d_ff),
                down: linear(self.d_ff, d),
            })
            .collect();
        let half = d / self.n_heads / 2;
        let mut cos = Vec::with_capacity(self.max_len * half);
        let mut sin = Vec::with_capacity(self.max_len * half);
        for p in 0..self.max_len {
            for i in 0..half {
                let angle = p as f64 * self.rope_theta.powf(-(2.0 * i as f64) / (2 * half) as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let embed = Tensor::<2>::random([self.vocab_size, d], Distribution::Normal(0.0, 0.02), device);
        Ok(Policy {
            embed: Param::from_tensor(embed),
            blocks,
            norm: RmsNormConfig::new(d).init(device),
            n_heads: self.n_heads,
            cos: Tensor::from_data(TensorData::new(cos, [self.max_len, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [self.max_len, half]), device),
        })
    }
}

/// Applies RoPE to `[B, H, T, Dh]` with tables `[T, Dh/2]`.
fn rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [b, h, t, dh] = x.dims();
    let half = dh / 2;
    let cos = cos.clone().narrow(0, 0, t).reshape([1, 1, t, half]).expand([b, h, t, half]);
    let sin = sin.clone().narrow(0, 0, t).reshape([1, 1, t, half]).expand([b, h, t, half]);
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(vec![x1.clone() * cos.clone() - x2.clone() * sin.clone(), x1 * sin + x2 * cos], 3)
}

impl Block {
    fn forward(
        &self,
        x: Tensor<3>,
        n_heads: usize,
        causal: &Tensor<4, Bool>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
    ) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let dh = d / n_heads;
        let h = self.attn_norm.forward(x.clone());
        let split = |l: &Linear| l.forward(h.clone()).reshape([b, t, n_heads, dh]).swap_dims(1, 2); // [B, H, T, Dh]
        let q = rope(split(&self.q), cos, sin);
        let k = rope(split(&self.k), cos, sin);
        let v = split(&self.v);
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f32).sqrt());
        let scores = scores.mask_fill(causal.clone().expand([b, n_heads, t, t]), f32::NEG_INFINITY);
        let attn = activation::softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b, t, d]);
        let x = x + self.o.forward(attn);
        let m = self.mlp_norm.forward(x.clone());
        x.clone() + self.down.forward(activation::silu(self.gate.forward(m.clone())) * self.up.forward(m))
    }
}

impl Policy {
    /// Next-token logits `[B, T, V]` for token ids `[B, T]` (`T ≤ max_len`).
    ///
    /// # Errors
    /// [`TrainerError::Config`] when the sequence is longer than the RoPE tables.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Result<Tensor<3>, TrainerError> {
        let [b, t] = tokens.dims();
        let max = self.cos.dims()[0];
        if t > max {
            return Err(TrainerError::Config(format!("sequence of {t} tokens exceeds the model's max_len {max}")));
        }
        let device = tokens.device();
        let causal = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).reshape([1, 1, t, t]);
        let embed = self.embed.val();
        let [v, d] = embed.dims();
        let mut x = embed.clone().select(0, tokens.reshape([b * t])).reshape([b, t, d]);
        for block in &self.blocks {
            x = block.forward(x, self.n_heads, &causal, &self.cos, &self.sin);
        }
        let x = self.norm.forward(x).reshape([b * t, d]);
        Ok(x.matmul(embed.transpose()).reshape([b, t, v]))
    }
}
