//! Loading Hugging Face model directories (`save_pretrained` output) into a [`Policy`].
//!
//! Reads `config.json` (`model_type` ∈ {`llama`, `qwen2`, `qwen3`}; anything else is
//! [`TrainerError::UnsupportedArchitecture`]), the weights from `model.safetensors` or from the shards listed in
//! `model.safetensors.index.json` (f32, bf16 or f16, converted exactly to f32), and the special ids from
//! `generation_config.json` / `config.json`. The tokenizer is [`crate::model::tokenizer::HfTokenizer`].
//!
//! Key mapping (per block `i`, `transformers` name → policy part; linear weights are stored `[out, in]` by PyTorch and
//! transposed to burn's `[in, out]`):
//! `model.embed_tokens.weight` → embedding; `model.layers.i.input_layernorm.weight` → attention norm;
//! `model.layers.i.self_attn.{q,k,v,o}_proj.{weight,bias}`; `model.layers.i.self_attn.{q,k}_norm.weight` (Qwen3);
//! `model.layers.i.post_attention_layernorm.weight` → MLP norm; `model.layers.i.mlp.{gate,up,down}_proj.weight`;
//! `model.norm.weight`; `lm_head.weight` (untied models only; ignored when the embeddings are tied).
//!
//! Supported RoPE: the default (`rope_scaling` absent or null, or `rope_type = "default"`) and the `linear`, `llama3`
//! (Llama 3.1+) and `yarn` scalings ([`RopeScaling`]); any other scaling (`dynamic`, `longrope`, ...) is an
//! [`TrainerError::HfConfig`] error rather than silently wrong positions. Sliding-window attention likewise.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use burn::{
    module::Param,
    nn::{Linear, RmsNorm},
    tensor::{Device, Tensor, TensorData},
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::{
    TrainerError,
    model::policy::{Block, Policy, PolicyConfig, RopeScaling},
};

type Result<T> = std::result::Result<T, TrainerError>;

/// The architectures [`load`] implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// `LlamaForCausalLM`.
    Llama,
    /// `Qwen2ForCausalLM`.
    Qwen2,
    /// `Qwen3ForCausalLM`.
    Qwen3,
}

/// Special token ids of a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpecialTokens {
    /// End-of-sequence ids (`generation_config.json` first, then `config.json`; either may list several).
    pub eos: Vec<u32>,
    /// Padding id, when the files name one.
    pub pad: Option<u32>,
    /// Beginning-of-sequence id, when the files name one.
    pub bos: Option<u32>,
}

/// What `config.json` describes.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// The policy shape (its `max_len` is `min(max_position_embeddings, the caller's cap)`).
    pub policy: PolicyConfig,
    /// Special ids.
    pub special: SpecialTokens,
    /// `max_position_embeddings` of the file.
    pub max_position_embeddings: usize,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct HfModel {
    /// The policy with the checkpoint's weights.
    pub policy: Policy,
    /// The parsed configuration.
    pub config: HfConfig,
}

struct Json<'a> {
    path: &'a Path,
    value: &'a Value,
}

impl Json<'_> {
    fn err(&self, reason: String) -> TrainerError {
        TrainerError::HfConfig { path: self.path.to_path_buf(), reason }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| self.err(format!("`{key}` = {v} is not a count"))))
            .transpose()
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| self.err(format!("missing `{key}`")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.err(format!("`{key}` = {v} is not a number")))).transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.err(format!("`{key}` = {v} is not a boolean"))))
            .transpose()
    }

    /// An id or a list of ids.
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| self.err(format!("`{key}` = {v} is not a token id or a list of them"));
        let one = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| bad(v));
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainerError::Io { path: path.into(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| TrainerError::HfConfig { path: path.into(), reason: format!("not valid JSON: {e}") })
}

/// Parses `dir/config.json` (and `generation_config.json` when present). `max_len` caps the context the policy's
/// RoPE tables cover (`None`: `max_position_embeddings`).
///
/// # Errors
/// [`TrainerError::Io`] when `config.json` cannot be read; [`TrainerError::UnsupportedArchitecture`];
/// [`TrainerError::HfConfig`] naming a missing or mistyped key, an activation other than SiLU, RoPE scaling or
/// sliding-window attention.
pub fn read_config(dir: &Path, max_len: Option<usize>) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let value = read_json(&path)?;
    let j = Json { path: &path, value: &value };
    let model_type = j.get("model_type").and_then(Value::as_str).ok_or_else(|| j.err("missing `model_type`".into()))?;
    let architecture = match model_type {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => return Err(TrainerError::UnsupportedArchitecture { model_type: other.to_string() }),
    };
    if let Some(act) = j.get("hidden_act").filter(|a| a.as_str() != Some("silu")) {
        return Err(j.err(format!("`hidden_act` = {act}: only \"silu\" (SwiGLU) is implemented")));
    }
    // RoPE: transformers ≥ 5 writes `rope_parameters`, older versions `rope_theta` and `rope_scaling`.
    let rope_params = j.get("rope_parameters").or_else(|| j.get("rope_scaling")).filter(|p| !p.is_null());
    let rope_scaling = match rope_params {
        Some(p) => rope_scaling(&j, p)?,
        None => None,
    };
    let rope_theta = match j.f64("rope_theta")? {
        Some(t) => t,
        None => rope_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(10000.0),
    };
    if j.bool("use_sliding_window")?.unwrap_or(false) {
        return Err(j.err("`use_sliding_window` = true: sliding-window attention is not implemented".into()));
    }
    let d_model = j.req_usize("hidden_size")?;
    let n_heads = j.req_usize("num_attention_heads")?;
    let max_position_embeddings = j.req_usize("max_position_embeddings")?;
    let attention_bias = j.bool("attention_bias")?.unwrap_or(false);
    let (qkv_bias, o_bias) = match architecture {
        Architecture::Qwen2 => (true, false),
        Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
    };
    let policy = PolicyConfig {
        vocab_size: j.req_usize("vocab_size")?,
        d_model,
        n_heads,
        n_kv_heads: Some(j.usize("num_key_value_heads")?.unwrap_or(n_heads)),
        head_dim: Some(j.usize("head_dim")?.unwrap_or(d_model / n_heads.max(1))),
        d_ff: j.req_usize("intermediate_size")?,
        n_layers: j.req_usize("num_hidden_layers")?,
        rope_theta,
        rms_norm_eps: j.f64("rms_norm_eps")?.unwrap_or(1e-6),
        tie_embeddings: j.bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        o_bias,
        mlp_bias: j.bool("mlp_bias")?.unwrap_or(false),
        qk_norm: architecture == Architecture::Qwen3,
        max_len: max_len.map_or(max_position_embeddings, |m| m.min(max_position_embeddings)),
        rope_scaling,
    };
    policy.validate().map_err(|e| j.err(e.to_string()))?;
    let mut special = SpecialTokens { eos: j.ids("eos_token_id")?, pad: None, bos: None };
    special.pad = j.ids("pad_token_id")?.first().copied();
    special.bos = j.ids("bos_token_id")?.first().copied();
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let gen_value = read_json(&gen_path)?;
        let g = Json { path: &gen_path, value: &gen_value };
        let eos = g.ids("eos_token_id")?;
        if !eos.is_empty() {
            special.eos = eos;
        }
        special.pad = g.ids("pad_token_id")?.first().copied().or(special.pad);
        special.bos = g.ids("bos_token_id")?.first().copied().or(special.bos);
    }
    // Every special id is an embedding row: an id outside the vocabulary would fail inside a gather.
    let ids = special.eos.iter().map(|&i| ("eos_token_id", i)).chain(special.pad.map(|i| ("pad_token_id", i)));
    for (key, id) in ids.chain(special.bos.map(|i| ("bos_token_id", i))) {
        if id as usize >= policy.vocab_size {
            return Err(j.err(format!("`{key}` = {id} is outside the vocabulary of {}", policy.vocab_size)));
        }
    }
    Ok(HfConfig { architecture, policy, special, max_position_embeddings })
}

/// The RoPE scaling of a `rope_scaling` / `rope_parameters` object: `None` for `default`, the parameters of `linear`,
/// `llama3` and `yarn` with `transformers`' defaults, an error naming any other type.
fn rope_scaling(j: &Json<'_>, p: &Value) -> Result<Option<RopeScaling>> {
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<Option<f64>> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| j.err(format!("RoPE `{key}` = {v} is not a number"))),
        }
    };
    let req = |key: &str| num(key)?.ok_or_else(|| j.err(format!("RoPE scaling {kind:?} needs `{key}`")));
    // The pre-training context: in the RoPE object, else top-level (Phi-3), else `max_position_embeddings`.
    let original = || -> Result<f64> {
        match num("original_max_position_embeddings")? {
            Some(v) => Ok(v),
            None => match j.f64("original_max_position_embeddings")? {
                Some(v) => Ok(v),
                None => Ok(j.req_usize("max_position_embeddings")? as f64),
            },
        }
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: req("factor")? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: req("factor")?,
            low_freq_factor: req("low_freq_factor")?,
            high_freq_factor: req("high_freq_factor")?,
            original_max_position_embeddings: original()?,
        }),
        "yarn" => {
            let original = original()?;
            let factor = match num("factor")? {
                Some(f) => f,
                None => j.req_usize("max_position_embeddings")? as f64 / original,
            };
            let mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
            let attention_factor = match (num("attention_factor")?, num("mscale")?, num("mscale_all_dim")?) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                _ => mscale(1.0),
            };
            let truncate = match p.get("truncate") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_bool().ok_or_else(|| j.err(format!("RoPE `truncate` = {v} is not a boolean")))?,
            };
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast: num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                truncate,
            })
        }
        other => {
            return Err(j.err(format!(
                "RoPE scaling `rope_type` = {other:?} is not implemented (default, linear, llama3 and yarn are)"
            )));
        }
    })
}

/// Where one tensor lies: its file, dtype, shape and byte range in the file.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

/// The checkpoint's safetensors files, read into memory, with each file's header parsed (and validated) once.
struct Weights {
    files: Vec<Vec<u8>>,
    index: BTreeMap<String, Entry>,
    dir: PathBuf,
}

impl Weights {
    fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index_path.exists() {
            let v = read_json(&index_path)?;
            let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| TrainerError::HfConfig {
                path: index_path.clone(),
                reason: "missing `weight_map` object".into(),
            })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| TrainerError::HfConfig {
                    path: index_path.clone(),
                    reason: format!("`weight_map.{name}` is not a file name"),
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(TrainerError::HfConfig {
                        path: index_path.clone(),
                        reason: format!("`weight_map.{name}` = {file:?} is not a plain file name in the directory"),
                    });
                }
                if !files.iter().any(|f| f.as_os_str() == file) {
                    files.push(file.into());
                }
            }
            files
        } else {
            vec!["model.safetensors".into()]
        };
        let mut files = Vec::with_capacity(names.len());
        let mut index = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|source| TrainerError::Io { path: path.clone(), source })?;
            // Checks the header and that the data section has exactly the bytes the header describes.
            let (header, meta) = SafeTensors::read_metadata(&bytes)
                .map_err(|e| TrainerError::Safetensors { path: path.clone(), reason: e.to_string() })?;
            let data_start = 8 + header;
            for (n, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: data_start + a..data_start + b,
                };
                index.insert(n, entry);
            }
            files.push(bytes);
        }
        Ok(Self { files, index, dir: dir.to_path_buf() })
    }

    /// The tensor `name` as f32 values, checked against `shape`.
    fn take(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self
            .index
            .get(name)
            .ok_or_else(|| TrainerError::MissingTensor { name: name.into(), path: self.dir.clone() })?;
        if entry.shape != shape {
            return Err(TrainerError::TensorMismatch {
                name: name.into(),
                expected: format!("shape {shape:?}"),
                found: format!("shape {:?}", entry.shape),
            });
        }
        let data = &self.files[entry.file][entry.bytes.clone()];
        let values = match entry.dtype {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(TrainerError::TensorMismatch {
                    name: name.into(),
                    expected: "dtype F32, BF16 or F16".into(),
                    found: format!("dtype {other:?}"),
                });
            }
        };
        Ok(values)
    }

    fn vector(&self, name: &str, n: usize, device: &Device) -> Result<Tensor<1>> {
        Ok(Tensor::from_data(TensorData::new(self.take(name, &[n])?, [n]), device))
    }

    fn norm(&self, name: &str, n: usize, eps: f64, device: &Device) -> Result<RmsNorm> {
        Ok(RmsNorm { gamma: Param::from_tensor(self.vector(name, n, device)?), epsilon: eps })
    }

    /// `prefix.weight` `[out, in]` (PyTorch) → burn's `[in, out]`, and `prefix.bias` when `bias`.
    fn linear(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool, device: &Device) -> Result<Linear> {
        let w = self.take(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let mut t = vec![0.0f32; w.len()];
        for (o, row) in w.chunks_exact(d_in).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                t[i * d_out + o] = x;
            }
        }
        let weight = Param::from_tensor(Tensor::from_data(TensorData::new(t, [d_in, d_out]), device));
        let bias =
            if bias { Some(Param::from_tensor(self.vector(&format!("{prefix}.bias"), d_out, device)?)) } else { None };
        Ok(Linear { weight, bias })
    }
}

/// Loads the model in `dir` (see the module doc for the files and key mapping); `max_len` caps the context.
///
/// # Errors
/// Those of [`read_config`]; [`TrainerError::Io`] for an unreadable weight file; [`TrainerError::Safetensors`] for a
/// truncated or corrupt one; [`TrainerError::MissingTensor`] / [`TrainerError::TensorMismatch`] naming the tensor.
pub fn load(dir: &Path, max_len: Option<usize>, device: &Device) -> Result<HfModel> {
    let config = read_config(dir, max_len)?;
    let c = &config.policy;
    let w = Weights::open(dir)?;
    let (d, dh, eps) = (c.d_model, c.head_width(), c.rms_norm_eps);
    let (hq, hkv) = (c.n_heads * dh, c.kv_heads() * dh);
    let embed = w.take("model.embed_tokens.weight", &[c.vocab_size, d])?;
    let embed = Param::from_tensor(Tensor::<2>::from_data(TensorData::new(embed, [c.vocab_size, d]), device));
    let mut blocks = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        let qk_norm = |n: &str| -> Result<Option<RmsNorm>> {
            c.qk_norm.then(|| w.norm(&format!("{p}.self_attn.{n}.weight"), dh, eps, device)).transpose()
        };
        blocks.push(Block {
            attn_norm: w.norm(&format!("{p}.input_layernorm.weight"), d, eps, device)?,
            q: w.linear(&format!("{p}.self_attn.q_proj"), d, hq, c.qkv_bias, device)?,
            k: w.linear(&format!("{p}.self_attn.k_proj"), d, hkv, c.qkv_bias, device)?,
            v: w.linear(&format!("{p}.self_attn.v_proj"), d, hkv, c.qkv_bias, device)?,
            o: w.linear(&format!("{p}.self_attn.o_proj"), hq, d, c.o_bias, device)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            mlp_norm: w.norm(&format!("{p}.post_attention_layernorm.weight"), d, eps, device)?,
            gate: w.linear(&format!("{p}.mlp.gate_proj"), d, c.d_ff, c.mlp_bias, device)?,
            up: w.linear(&format!("{p}.mlp.up_proj"), d, c.d_ff, c.mlp_bias, device)?,
            down: w.linear(&format!("{p}.mlp.down_proj"), c.d_ff, d, c.mlp_bias, device)?,
        });
    }
    let norm = w.norm("model.norm.weight", d, eps, device)?;
    let lm_head = if c.tie_embeddings { None } else { Some(w.linear("lm_head", d, c.vocab_size, false, device)?) };
    let policy = c.assemble(embed, blocks, norm, lm_head, device);
    Ok(HfModel { policy, config })
}
