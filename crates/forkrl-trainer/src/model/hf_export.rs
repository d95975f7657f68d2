//! Exporting a policy as a Hugging Face model directory that `transformers` loads (`AutoModelForCausalLM` /
//! `AutoTokenizer.from_pretrained(dir)`): the inverse of [`crate::model::hf::load`].
//!
//! Writes `config.json` (the architecture's keys: `model_type`, sizes, RoPE θ, norm ε, biases, tied embeddings, special
//! ids, `dtype`), `model.safetensors` (the same tensor names as the loader reads; linear weights transposed back
//! to PyTorch's `[out, in]`; in the source checkpoint's dtype — f32, bf16 or f16 — or f32 for the built-in model),
//! `generation_config.json` (EOS, pad, BOS) and `tokenizer.json` (the source checkpoint's, copied byte for byte; for the
//! built-in character tokenizer, an equivalent `WordLevel` tokenizer: one token per character, `<pad>` = 0, `<eos>` = 1,
//! decoded by fusing the tokens). The built-in tiny model is exported as Llama (`LlamaForCausalLM`, tied embeddings,
//! no biases: exactly its architecture). The directory appears atomically (temporary sibling + rename).

use std::path::Path;

use burn::{
    module::Param,
    nn::{Linear, RmsNorm},
    tensor::Tensor,
};
use safetensors::{Dtype, tensor::TensorView};
use serde_json::{Value, json};

use crate::{
    Result, TrainerError,
    model::{
        checkpoint::write_dir_atomic,
        hf::Architecture,
        policy::{Policy, PolicyConfig},
        tokenizer::{CHARS, EOS, PAD},
    },
};

/// Where the exported model comes from: a Hugging Face directory (its architecture, dtype, tokenizer and special ids
/// are kept) or the built-in tiny model.
#[derive(Debug, Clone, Copy)]
pub enum ExportSource<'a> {
    /// The run's `model.hf_dir`.
    HfDir(&'a Path),
    /// The built-in model and its character tokenizer.
    BuiltIn,
}

/// The weight dtype of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    /// `float32`.
    F32,
    /// `bfloat16` (rounded to nearest even).
    Bf16,
    /// `float16`.
    F16,
}

impl ExportDtype {
    fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
    }

    fn encode(self, values: &[f32]) -> (Dtype, Vec<u8>) {
        match self {
            ExportDtype::F32 => (Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ExportDtype::Bf16 => {
                (Dtype::BF16, values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect())
            }
            ExportDtype::F16 => {
                (Dtype::F16, values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect())
            }
        }
    }
}

/// The dtype a Hugging Face directory stores its weights in: `config.json`'s `dtype` / `torch_dtype`, else f32.
fn source_dtype(dir: &Path) -> Result<ExportDtype> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainerError::Io { path: path.clone(), source })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| TrainerError::HfConfig { path: path.clone(), reason: format!("not valid JSON: {e}") })?;
    Ok(match v.get("dtype").or_else(|| v.get("torch_dtype")).and_then(Value::as_str) {
        Some("bfloat16") => ExportDtype::Bf16,
        Some("float16") => ExportDtype::F16,
        _ => ExportDtype::F32,
    })
}

/// The `tokenizer.json` of the character tokenizer: a `WordLevel` model over single characters.
pub fn char_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<pad>".into(), json!(PAD));
    vocab.insert("<eos>".into(), json!(EOS));
    for (i, c) in CHARS.chars().enumerate() {
        vocab.insert(c.to_string(), json!(i + 2));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(PAD, "<pad>"), special(EOS, "<eos>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Collects the named tensors of a policy in the loader's names.
struct Tensors {
    dtype: ExportDtype,
    out: Vec<(String, Vec<usize>, Vec<u8>, Dtype)>,
}

impl Tensors {
    fn push(&mut self, name: String, shape: Vec<usize>, values: &[f32]) {
        let (dtype, bytes) = self.dtype.encode(values);
        self.out.push((name, shape, bytes, dtype));
    }

    fn param<const D: usize>(&mut self, name: String, p: &Param<Tensor<D>>) -> Result<()> {
        let t = p.val();
        let shape = t.dims().to_vec();
        self.push(name, shape, &crate::host_f32(t)?);
        Ok(())
    }

    fn norm(&mut self, name: String, n: &RmsNorm) -> Result<()> {
        self.param(name, &n.gamma)
    }

    /// burn's `[in, out]` weight → PyTorch's `[out, in]`, and the bias.
    fn linear(&mut self, prefix: &str, l: &Linear) -> Result<()> {
        let w = l.weight.val();
        let [d_in, d_out] = w.dims();
        let values = crate::host_f32(w)?;
        let mut t = vec![0.0f32; values.len()];
        for (i, row) in values.chunks_exact(d_out).enumerate() {
            for (o, &x) in row.iter().enumerate() {
                t[o * d_in + i] = x;
            }
        }
        self.push(format!("{prefix}.weight"), vec![d_out, d_in], &t);
        if let Some(b) = &l.bias {
            self.param(format!("{prefix}.bias"), b)?;
        }
        Ok(())
    }
}

/// `config.json` of the export.
fn config_json(
    arch: Architecture,
    c: &PolicyConfig,
    special: &Special,
    max_positions: usize,
    dtype: ExportDtype,
) -> Value {
    let (model_type, class) = match arch {
        Architecture::Llama => ("llama", "LlamaForCausalLM"),
        Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Architecture::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
    };
    let mut v = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_width(),
        "num_hidden_layers": c.n_layers,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "eos_token_id": special.eos_value(),
        "pad_token_id": special.pad,
        "bos_token_id": special.bos,
        "dtype": dtype.torch_name(),
        "use_cache": true,
    });
    let o = v.as_object_mut().expect("an object literal");
    if let Some(scaling) = &c.rope_scaling {
        let mut rope = serde_json::to_value(scaling).unwrap_or(Value::Null);
        if let Some(r) = rope.as_object_mut() {
            r.insert("rope_theta".into(), json!(c.rope_theta));
            // transformers writes the pre-training context as an integer.
            if let Some(n) = r
                .get("original_max_position_embeddings")
                .and_then(Value::as_f64)
                .filter(|n| n.fract() == 0.0 && *n >= 0.0)
            {
                r.insert("original_max_position_embeddings".into(), json!(n as u64));
            }
        }
        o.insert("rope_scaling".into(), rope);
    }
    match arch {
        Architecture::Llama => {
            o.insert("attention_bias".into(), json!(c.qkv_bias));
            o.insert("mlp_bias".into(), json!(c.mlp_bias));
        }
        Architecture::Qwen2 => {
            o.insert("use_sliding_window".into(), json!(false));
        }
        Architecture::Qwen3 => {
            o.insert("attention_bias".into(), json!(c.qkv_bias));
            o.insert("use_sliding_window".into(), json!(false));
        }
    }
    v
}

/// Special ids of the export.
struct Special {
    eos: Vec<u32>,
    pad: Option<u32>,
    bos: Option<u32>,
}

impl Special {
    fn eos_value(&self) -> Value {
        match self.eos.as_slice() {
            [one] => json!(one),
            many => json!(many),
        }
    }
}

/// Checks that the built-in model's switches fit Llama (the only architecture it is exported as).
fn check_llama_compatible(c: &PolicyConfig) -> Result<()> {
    if c.qk_norm || c.qkv_bias != c.o_bias {
        return Err(TrainerError::invalid(
            "export",
            format!("{c:?}"),
            "a policy with q/k norms or a bias on q/k/v but not o is not a Llama model",
        ));
    }
    Ok(())
}

/// Writes the Hugging Face directory `out` (atomically) for `policy` of shape `config`, taken from `source`.
///
/// # Errors
/// [`TrainerError::Io`] for file-system failures and an unreadable source; [`TrainerError::HfConfig`] for a source
/// whose `config.json` is not readable; [`TrainerError::Safetensors`] when serialisation fails.
pub fn export(policy: &Policy, config: &PolicyConfig, source: ExportSource<'_>, out: &Path) -> Result<()> {
    let (arch, dtype, special, max_positions) = match source {
        ExportSource::HfDir(dir) => {
            let c = crate::model::hf::read_config(dir, None)?;
            let s = Special { eos: c.special.eos, pad: c.special.pad, bos: c.special.bos };
            (c.architecture, source_dtype(dir)?, s, c.max_position_embeddings)
        }
        ExportSource::BuiltIn => {
            check_llama_compatible(config)?;
            (
                Architecture::Llama,
                ExportDtype::F32,
                Special { eos: vec![EOS], pad: Some(PAD), bos: None },
                config.max_len,
            )
        }
    };
    let mut tensors = Tensors { dtype, out: Vec::new() };
    tensors.param("model.embed_tokens.weight".into(), &policy.embed)?;
    for (i, b) in policy.blocks.iter().enumerate() {
        let p = format!("model.layers.{i}");
        tensors.norm(format!("{p}.input_layernorm.weight"), &b.attn_norm)?;
        for (name, l) in [("q_proj", &b.q), ("k_proj", &b.k), ("v_proj", &b.v), ("o_proj", &b.o)] {
            tensors.linear(&format!("{p}.self_attn.{name}"), l)?;
        }
        if let (Some(q), Some(k)) = (&b.q_norm, &b.k_norm) {
            tensors.norm(format!("{p}.self_attn.q_norm.weight"), q)?;
            tensors.norm(format!("{p}.self_attn.k_norm.weight"), k)?;
        }
        tensors.norm(format!("{p}.post_attention_layernorm.weight"), &b.mlp_norm)?;
        for (name, l) in [("gate_proj", &b.gate), ("up_proj", &b.up), ("down_proj", &b.down)] {
            tensors.linear(&format!("{p}.mlp.{name}"), l)?;
        }
    }
    tensors.norm("model.norm.weight".into(), &policy.norm)?;
    if let Some(head) = &policy.lm_head {
        tensors.linear("lm_head", head)?;
    }
    let safetensors_path = out.join("model.safetensors");
    let views = tensors
        .out
        .iter()
        .map(|(name, shape, bytes, dtype)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| TrainerError::Safetensors { path: safetensors_path.clone(), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| TrainerError::Safetensors { path: safetensors_path.clone(), reason: e.to_string() })?;
    let config_value = config_json(arch, config, &special, max_positions, dtype);
    let generation =
        json!({"eos_token_id": special.eos_value(), "pad_token_id": special.pad, "bos_token_id": special.bos});
    write_dir_atomic(out, |tmp| {
        let write = |name: &str, data: &[u8]| {
            let path = tmp.join(name);
            std::fs::write(&path, data).map_err(|source| TrainerError::Io { path, source })
        };
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default().into_bytes();
        write("model.safetensors", &bytes)?;
        write("config.json", &pretty(&config_value))?;
        write("generation_config.json", &pretty(&generation))?;
        match source {
            ExportSource::HfDir(dir) => {
                for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
                    let from = dir.join(name);
                    if from.is_file() {
                        std::fs::copy(&from, tmp.join(name))
                            .map_err(|source| TrainerError::Io { path: from, source })?;
                    }
                }
                Ok(())
            }
            ExportSource::BuiltIn => write("tokenizer.json", &pretty(&char_tokenizer_json())),
        }
    })
}
