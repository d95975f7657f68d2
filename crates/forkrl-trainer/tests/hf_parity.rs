//! Parity with `transformers` on the committed fixtures (`tests/fixtures/hf/`, written by
//! `scripts/make_hf_fixtures.py`): four tiny random checkpoints (Qwen2 tied in bf16, Qwen2 untied sharded f32, Qwen3
//! in f16 with q/k norms and an explicit head_dim, Llama with one kv head), their full-sequence logits, greedy
//! continuations of a left-padded batch, and tokenizer cases. Also the loader's typed errors on broken directories.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use forkrl_core::Backend;
use forkrl_rollout::Decoding;
use forkrl_trainer::{
    TrainerError,
    model::{
        hf::{self, Architecture},
        sampler::{SamplerConfig, generate},
        tokenizer::HfTokenizer,
    },
};
use safetensors::SafeTensors;

const MODELS: [&str; 6] = ["qwen2-tied", "qwen2-untied", "qwen3", "llama", "llama3-rope", "qwen2-yarn"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn device() -> Device {
    Backend::from_env().expect("known backend").device().expect("compiled backend")
}

fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn configs_parse_to_the_right_architecture() {
    let want = [
        ("qwen2-tied", Architecture::Qwen2, true, 2, 16),
        ("qwen2-untied", Architecture::Qwen2, false, 2, 16),
        ("qwen3", Architecture::Qwen3, false, 2, 32),
        ("llama", Architecture::Llama, false, 1, 16),
    ];
    for (name, arch, tied, kv, head_dim) in want {
        let c = hf::read_config(&fixture(name), Some(64)).expect("config");
        assert_eq!(c.architecture, arch, "{name}");
        assert_eq!(c.policy.tie_embeddings, tied, "{name}");
        assert_eq!(c.policy.kv_heads(), kv, "{name}");
        assert_eq!(c.policy.head_width(), head_dim, "{name}");
        assert_eq!(c.policy.qkv_bias, arch == Architecture::Qwen2, "{name}");
        assert_eq!(c.policy.qk_norm, arch == Architecture::Qwen3, "{name}");
        assert_eq!(c.policy.max_len, 64, "{name}: capped by the caller");
        assert_eq!(c.max_position_embeddings, 128);
        assert_eq!(c.special.eos, vec![2], "{name}");
        assert_eq!(c.special.pad, Some(0), "{name}");
    }
    let untied = hf::read_config(&fixture("qwen2-untied"), None).expect("config");
    assert_eq!(untied.policy.rope_theta, 1e6);
    assert_eq!(untied.policy.max_len, 128);
    assert_eq!(untied.policy.rope_scaling, None);
}

#[test]
fn rope_scalings_parse_with_the_transformers_defaults() {
    use forkrl_trainer::model::policy::RopeScaling;
    let llama3 = hf::read_config(&fixture("llama3-rope"), None).expect("config").policy.rope_scaling;
    assert_eq!(
        llama3,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0
        })
    );
    let Some(RopeScaling::Yarn { factor, attention_factor, beta_fast, beta_slow, truncate, .. }) =
        hf::read_config(&fixture("qwen2-yarn"), None).expect("config").policy.rope_scaling
    else {
        panic!("yarn expected");
    };
    assert_eq!((factor, beta_fast, beta_slow, truncate), (4.0, 32.0, 1.0, true));
    assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12, "{attention_factor}");
    // Unknown scalings and bad parameters are errors naming config.json.
    for (rope, why) in [
        (serde_json::json!({"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        (serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                               "original_max_position_embeddings": 32}),
            "high_freq_factor",
        ),
        (serde_json::json!({"rope_type": "linear", "factor": -1.0}), "factor"),
    ] {
        let dir = scratch("llama3-rope", why);
        edit_config(&dir, |c| {
            c.insert("rope_parameters".into(), rope.clone());
        });
        let err = hf::read_config(&dir, None).expect_err("refused").to_string();
        assert!(err.contains(why) && err.contains("config.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The committed reference of fixture `name`: its input ids as `[B, T]` tokens on `device` and transformers' f32 logits.
fn reference_logits(name: &str, device: &Device) -> (Tensor<2, Int>, Vec<f32>) {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let input = st.tensor("input_ids").expect("input_ids");
    let input_ids: Vec<i64> =
        input.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    let logits = st.tensor("logits").expect("logits");
    let want: Vec<f32> =
        logits.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    let [b, t] = [input.shape()[0], input.shape()[1]];
    (Tensor::<2, Int>::from_data(TensorData::new(input_ids, [b, t]), device), want)
}

#[test]
fn full_sequence_logits_match_transformers() {
    let device = device();
    for name in MODELS {
        let model = hf::load(&fixture(name), None, &device).expect("loads");
        let (tokens, want) = reference_logits(name, &device);
        let got: Vec<f32> =
            model.policy.forward(tokens).expect("forward").into_data().try_to_vec::<f32>().expect("f32");
        assert_eq!(got.len(), want.len(), "{name}");
        let max_err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|w| w.abs()).fold(0.0f32, f32::max);
        assert!(max_err <= 1e-4, "{name}: max |Δlogit| = {max_err:e} (logits up to {scale})");
        assert!(scale > 1.0, "{name}: reference logits are not trivially small ({scale})");
    }
}

/// `model.dtype = bf16` (mixed precision: the blocks' matmuls in bf16) against transformers' f32 logits: relative RMS
/// error ≤ 2.5 % and max error ≤ 3 % of the logit range on every fixture, and not bit-equal to the f32 path (the bf16
/// matmuls do run). For scale, `torch.autocast("cpu", bfloat16)` on the same fixtures is off by 0.9–1.5 % (relative
/// RMS) and 0.053–0.093 (max) (`scripts/bf16_autocast_reference.py`); these give 0.052–0.120 (max).
#[test]
fn bf16_mixed_precision_logits_stay_within_tolerance_of_transformers() {
    use forkrl_trainer::{config::ModelConfig, model::policy::ComputeDtype};
    let device = device();
    if !device.supports_dtype(burn::tensor::DType::BF16) {
        // wgpu on lavapipe: no bf16 arithmetic, so the option is refused before any model is built.
        let config = ModelConfig { hf_dir: Some(fixture(MODELS[0])), dtype: ComputeDtype::Bf16, ..Default::default() };
        let Err(err) = forkrl_trainer::model::build(&config, &device) else { panic!("bf16 accepted on {device:?}") };
        assert!(matches!(&err, TrainerError::InvalidConfig { key, .. } if key == "model.dtype"), "{err}");
        eprintln!("skipped the bf16 parity on {device:?}: {err}");
        return;
    }
    for name in MODELS {
        let model = hf::load(&fixture(name), None, &device).expect("loads");
        let (tokens, want) = reference_logits(name, &device);
        let f32_logits: Vec<f32> =
            model.policy.forward(tokens.clone()).expect("forward").into_data().try_to_vec::<f32>().expect("f32");
        let policy = model.policy.with_dtype(ComputeDtype::Bf16);
        assert_eq!(policy.dtype(), ComputeDtype::Bf16);
        let got: Vec<f32> = policy.forward(tokens).expect("forward").into_data().try_to_vec::<f32>().expect("f32");
        let max_err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        let moved = got.iter().zip(&f32_logits).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|w| w.abs()).fold(0.0f32, f32::max);
        let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        let rel_rms = norm(&mut got.iter().zip(&want).map(|(g, w)| g - w)) / norm(&mut want.iter().copied());
        eprintln!("{name}: bf16 max |Δlogit| = {max_err:e}, relative RMS {rel_rms:e} (logits up to {scale})");
        assert!(rel_rms <= 0.025, "{name}: bf16 relative RMS error {rel_rms:e}");
        assert!(max_err <= 0.03 * scale, "{name}: bf16 max |Δlogit| = {max_err:e} (logits up to {scale})");
        assert!(moved > 0.0, "{name}: bf16 gave the f32 logits bit for bit");
    }
}

#[test]
fn greedy_generation_matches_transformers_token_for_token() {
    let device = device();
    for name in MODELS {
        let model = hf::load(&fixture(name), None, &device).expect("loads");
        let r = reference_json(name);
        let prompts: Vec<Vec<u32>> = r["prompts"].as_array().expect("prompts").iter().map(ids).collect();
        assert_ne!(prompts[0].len(), prompts[1].len(), "the fixture exercises left padding");
        let want: Vec<Vec<u32>> = r["greedy_new_tokens"].as_array().expect("greedy").iter().map(ids).collect();
        for use_cache in [true, false] {
            let config = SamplerConfig {
                max_new_tokens: r["max_new_tokens"].as_u64().expect("n") as usize,
                eos: model.config.special.eos.clone(),
                pad: model.config.special.pad.expect("pad"),
                use_cache,
                ..SamplerConfig::default()
            };
            let out = generate(&model.policy, &prompts, Decoding::Greedy, &config).expect("generates");
            for (row, want_row) in want.iter().enumerate() {
                // transformers pads a finished row with pad ids; ours stops at the EOS.
                let trimmed: Vec<u32> = match want_row.iter().position(|t| model.config.special.eos.contains(t)) {
                    Some(i) => want_row[..=i].to_vec(),
                    None => want_row.clone(),
                };
                assert_eq!(out.tokens[row], trimmed, "{name} row {row} use_cache={use_cache}");
            }
        }
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let tok = HfTokenizer::from_file(&fixture("qwen2-tied").join("tokenizer.json")).expect("tokenizer");
    let r = reference_json("qwen2-tied");
    for case in r["tokenizer_cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text).expect("encodes"), want, "encode {text:?}");
        assert_eq!(tok.decode(&want).expect("decodes"), case["decoded"].as_str().expect("decoded"), "decode {text:?}");
    }
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.vocab_size(), 320);
    // Ids past the tokenizer's vocabulary (models often pad their embedding beyond it) are skipped, as in
    // transformers: `decode([5, 100000, 6]) == "#$"`.
    assert_eq!(tok.decode(&[5, 100_000, 6]).expect("decodes"), "#$");
}

/// A scratch copy of a fixture directory, to break.
fn scratch(name: &str, tag: &str) -> common::Scratch {
    let dir = common::Scratch::new(&format!("hf-{tag}"));
    for entry in std::fs::read_dir(fixture(name)).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    f(v.as_object_mut().expect("object"));
    std::fs::write(&path, serde_json::to_string(&v).expect("json")).expect("write");
}

#[test]
fn broken_checkpoints_are_typed_errors() {
    let device = device();

    let dir = scratch("llama", "arch");
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "mistral".into());
    });
    match hf::load(&dir, None, &device) {
        Err(TrainerError::UnsupportedArchitecture { model_type }) => assert_eq!(model_type, "mistral"),
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }

    let dir = scratch("llama", "key");
    edit_config(&dir, |c| {
        c.remove("num_hidden_layers");
    });
    let err = hf::load(&dir, None, &device).expect_err("missing key");
    assert!(err.to_string().contains("num_hidden_layers"), "{err}");

    let dir = scratch("llama", "rope");
    edit_config(&dir, |c| {
        c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "longrope", "factor": 4.0}));
    });
    let err = hf::load(&dir, None, &device).expect_err("rope scaling");
    assert!(err.to_string().contains("longrope"), "{err}");

    // Sizes that would overflow or exhaust memory, and special ids outside the vocabulary, are errors naming the key.
    for (key, value, named) in [
        ("head_dim", serde_json::json!(1u64 << 62), "head_dim"),
        ("max_position_embeddings", serde_json::json!(1_000_000_000_000u64), "max_len"),
        ("eos_token_id", serde_json::json!(1_000_000), "eos_token_id"),
        ("pad_token_id", serde_json::json!(1_000_000), "pad_token_id"),
    ] {
        let dir = scratch("llama", key);
        edit_config(&dir, |c| {
            c.insert(key.into(), value.clone());
        });
        let _ = std::fs::remove_file(dir.join("generation_config.json"));
        match hf::load(&dir, None, &device) {
            Err(TrainerError::HfConfig { reason, .. }) => assert!(reason.contains(named), "{key}: {reason}"),
            other => panic!("{key}: expected HfConfig, got {other:?}"),
        }
    }

    // A wider MLP in the config than in the weights: the tensor and both shapes are named.
    let dir = scratch("llama", "shape");
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), 100.into());
    });
    match hf::load(&dir, None, &device) {
        Err(TrainerError::TensorMismatch { name, expected, found }) => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, "shape [100, 64]");
            assert_eq!(found, "shape [96, 64]");
        }
        other => panic!("expected TensorMismatch, got {other:?}"),
    }

    // An untied model whose lm_head is gone.
    let dir = scratch("qwen3", "missing");
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| n != "lm_head.weight").collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).expect("write");
    match hf::load(&dir, None, &device) {
        Err(TrainerError::MissingTensor { name, .. }) => assert_eq!(name, "lm_head.weight"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    // A truncated weight file (an interrupted download).
    let dir = scratch("qwen2-tied", "truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read");
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    match hf::load(&dir, None, &device) {
        Err(TrainerError::Safetensors { path, .. }) => assert!(path.ends_with("model.safetensors")),
        other => panic!("expected Safetensors, got {other:?}"),
    }

    // A shard listed in the index but absent.
    let dir = scratch("qwen2-untied", "shard");
    std::fs::remove_file(dir.join("model-00003-of-00007.safetensors")).expect("rm");
    match hf::load(&dir, None, &device) {
        Err(TrainerError::Io { path, .. }) => assert!(path.ends_with("model-00003-of-00007.safetensors")),
        other => panic!("expected Io, got {other:?}"),
    }

    // Prompt + new tokens beyond the context.
    let model = hf::load(&fixture("llama"), Some(16), &device).expect("loads");
    let config = SamplerConfig { max_new_tokens: 10, eos: vec![2], ..SamplerConfig::default() };
    let long = vec![vec![5u32; 10]];
    match generate(&model.policy, &long, Decoding::Greedy, &config) {
        Err(TrainerError::ContextOverflow { tokens, context }) => assert_eq!((tokens, context), (20, 16)),
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
}

#[test]
fn sft_targets_get_no_bos_from_a_tokenizer_that_adds_one() {
    use forkrl_trainer::{
        model::{Vocab, tokenizer::TextTokenizer},
        sft::sft_batch,
        tasks::{Task, TaskConfig},
    };
    // The Llama fixture with a post-processor that adds BOS (`<|im_start|>`, id 1) to every encoded text, as Llama's.
    let dir = scratch("llama", "bos");
    let path = dir.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    t["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
    });
    std::fs::write(&path, serde_json::to_string(&t).expect("json")).expect("write");
    let tok = HfTokenizer::from_file(&path).expect("valid tokenizer");
    assert_eq!(tok.encode("ab").expect("encodes").first(), Some(&1), "the edited tokenizer adds BOS");
    let vocab = Vocab { tokenizer: TextTokenizer::Hf(Box::new(tok)), eos: vec![2], pad: 0 };
    let data = dir.join("data.jsonl");
    std::fs::write(&data, "{\"prompt\": \"1+1=\", \"answer\": \"2\", \"solution\": \"so 2\"}\n".repeat(4))
        .expect("write");
    let task: TaskConfig = toml::from_str(&format!(
        "kind = \"jsonl\"\npath = {:?}\ntest_path = {:?}\n",
        data.display().to_string(),
        data.display().to_string()
    ))
    .expect("task config");
    let task = Task::new(&task).expect("loads the dataset");
    let batch = sft_batch(&task, &vocab, 2, 0, 0).expect("builds");
    for r in batch.rollouts() {
        assert_eq!(r.prompt.first(), Some(&1), "the prompt starts the sequence: BOS kept");
        assert!(!r.response.contains(&1), "no BOS inside the sequence: {:?}", r.response);
        assert_eq!(r.response.last(), Some(&2));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Logits of `ids` under a policy, as f32 values.
fn logits_of(policy: &forkrl_trainer::model::policy::Policy, ids: &[i64], device: &Device) -> Vec<f32> {
    let t = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device);
    policy.forward(t).expect("forward").into_data().try_to_vec::<f32>().expect("f32")
}

#[test]
fn an_exported_hugging_face_checkpoint_loads_back_with_the_same_logits_dtype_and_tokenizer() {
    use forkrl_trainer::model::hf_export::{ExportSource, export};
    let device = device();
    for name in ["qwen2-tied", "qwen3", "llama", "llama3-rope", "qwen2-yarn"] {
        let model = hf::load(&fixture(name), Some(16), &device).expect("loads");
        let out_scratch = scratch(name, "export");
        let out = out_scratch.join("out");
        export(&model.policy, &model.config.policy, ExportSource::HfDir(&fixture(name)), &out).expect("exports");
        let back = hf::load(&out, Some(16), &device).expect("the export loads");
        assert_eq!(back.config.architecture, model.config.architecture, "{name}");
        assert_eq!(back.config.special, model.config.special, "{name}");
        let ids: Vec<i64> = vec![3, 17, 42, 5, 99, 7];
        assert_eq!(logits_of(&back.policy, &ids, &device), logits_of(&model.policy, &ids, &device), "{name}");
        // Weights in the source dtype (bf16 / f16 values convert to f32 and back exactly).
        let read = |dir: &Path| std::fs::read(dir.join("model.safetensors")).expect("read");
        let (src, dst) = (read(&fixture(name)), read(&out));
        let dtype = |bytes: &[u8]| {
            SafeTensors::deserialize(bytes).expect("valid").tensor("model.embed_tokens.weight").expect("embed").dtype()
        };
        if fixture(name).join("model.safetensors").is_file() {
            assert_eq!(dtype(&dst), dtype(&src), "{name}");
        }
        assert_eq!(
            std::fs::read(out.join("tokenizer.json")).expect("copied"),
            std::fs::read(fixture(name).join("tokenizer.json")).expect("source"),
        );
        assert!(out.join("generation_config.json").is_file());
        let _ = std::fs::remove_dir_all(out.parent().expect("scratch"));
    }
}

#[test]
fn the_built_in_model_exports_as_llama_with_an_equivalent_tokenizer() {
    use burn::module::Module;
    use forkrl_trainer::{TrainConfig, Trainer, model::tokenizer::CharTokenizer};
    let mut config = TrainConfig::default();
    config.sft.steps = 0;
    let trainer = Trainer::new(config.check().expect("valid"), &device()).expect("builds");
    let out = std::env::temp_dir().join(format!("forkrl-export-builtin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    trainer.export(&out).expect("exports");
    let back = hf::load(&out, None, &device()).expect("loads as a Hugging Face checkpoint");
    assert_eq!(back.config.architecture, Architecture::Llama);
    let ids: Vec<i64> = CharTokenizer.encode("12+34-5=41|41").expect("chars").iter().map(|&i| i64::from(i)).collect();
    let ours = logits_of(&trainer.policy().valid(), &ids, &device());
    let theirs = logits_of(&back.policy, &ids, &device());
    let max = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert_eq!(max, 0.0, "f32 export: identical logits");
    let tok = HfTokenizer::from_file(&out.join("tokenizer.json")).expect("a valid tokenizer.json");
    let text = "4,6,3>21:(4*6)-3/1|42";
    assert_eq!(tok.encode(text).expect("encodes"), CharTokenizer.encode(text).expect("chars"));
    assert_eq!(tok.decode(&CharTokenizer.encode(text).expect("chars")).expect("decodes"), text);
    assert!(tok.encode("a").is_err(), "an unknown character is an error, as in the character tokenizer");
    let _ = std::fs::remove_dir_all(out);
}
