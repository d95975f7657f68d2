//! Every parser of untrusted input, fed arbitrary and boundary inputs: JSONL records, `config.json`, the TOML
//! configuration, and (in `tasks/verify.rs`, `tasks/countdown.rs`) answers and Countdown expressions. Each must return a
//! value or a typed error — never panic, hang or allocate without bound. Boundary values: empty input, 1 MB inputs,
//! numbers at and past every integer width (`u64::MAX`, `i128::MIN`, `1e309`), powers of two, deep nesting.
//! (`cargo fuzz` needs a nightly toolchain and a sanitizer build of burn, beyond CI's budget: these proptests run in
//! every CI run instead.)

use std::path::Path;

use forkrl_trainer::{TrainConfig, model::hf, tasks::jsonl::parse_line};
use proptest::prelude::*;

/// JSON values that stress a typed reader: every JSON type, integers at the edges, huge floats, long strings.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-170141183460469231731687303715884105728".to_string()),
        Just("1e309".to_string()),
        Just("-0.0".to_string()),
        Just("4294967296".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(|x| format!("{x:e}")),
        ".{0,12}".prop_map(|s| serde_json::to_string(&s).expect("a string")),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((".{0,6}", inner), 0..4).prop_map(|kv| {
                let body: Vec<String> =
                    kv.iter().map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).expect("key"))).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

const CONFIG_KEYS: [&str; 20] = [
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "rope_scaling",
    "use_sliding_window",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn jsonl_records_never_panic(text in ".{0,300}", value in json_value()) {
        let path = Path::new("data.jsonl");
        let _ = parse_line(path, 1, &text);
        let _ = parse_line(path, 1, &value);
        let record = format!("{{\"question\": {value}, \"answer\": {value}, \"solution\": {value}}}");
        let _ = parse_line(path, 7, &record);
    }

    #[test]
    fn config_json_of_any_shape_is_a_typed_error_or_a_valid_shape(
        values in prop::collection::vec(json_value(), CONFIG_KEYS.len()),
        model_type in prop_oneof![Just("llama"), Just("qwen2"), Just("qwen3"), Just("gpt2")],
    ) {
        let dir = std::env::temp_dir().join(format!("forkrl-parsers-{}-{}", std::process::id(), rand_tag(&values)));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut body: Vec<String> =
            CONFIG_KEYS.iter().zip(&values).skip(1).map(|(k, v)| format!("\"{k}\": {v}")).collect();
        body.push(format!("\"model_type\": \"{model_type}\""));
        std::fs::write(dir.join("config.json"), format!("{{{}}}", body.join(","))).expect("write");
        if let Ok(c) = hf::read_config(&dir, Some(64)) {
            // Whatever parsed is a shape the policy accepts.
            prop_assert!(c.policy.validate().is_ok());
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn toml_configuration_never_panics(
        key in prop_oneof![
            Just("rl.group_size"), Just("rl.lr"), Just("rl.max_response_len"), Just("model.max_len"),
            Just("rl.forking.top_entropy_ratio"), Just("rl.betas"), Just("task.max_operand"), Just("eval.size"),
            Just("rl.overlong.buffer_length"), Just("rl.kl_in_reward.kl_ctrl.horizon"), Just("rl.vps.num_segments"),
        ],
        value in prop_oneof![
            Just("0".to_string()), Just("-1".to_string()), Just("nan".to_string()), Just("inf".to_string()),
            Just("9223372036854775807".to_string()), Just("1e308".to_string()), Just("[0.9, 2.0]".to_string()),
            Just("\"x\"".to_string()), any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(|x| format!("{x:e}")),
        ],
        text in ".{0,200}",
    ) {
        let (section, leaf) = key.rsplit_once('.').expect("dotted");
        let doc = format!("[{section}]\n{leaf} = {value}\n");
        if let Ok(config) = toml::from_str::<TrainConfig>(&doc) {
            let _ = config.check();
        }
        if let Ok(config) = toml::from_str::<TrainConfig>(&text) {
            let _ = config.check();
        }
    }
}

fn rand_tag(values: &[String]) -> u64 {
    values
        .iter()
        .flat_map(|v| v.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

#[test]
fn megabyte_inputs_are_bounded() {
    let path = Path::new("data.jsonl");
    let big = "9".repeat(1 << 20);
    let record = format!("{{\"question\": \"{big}\", \"answer\": \"{big}\"}}");
    let _ = parse_line(path, 1, &record);
    let nested = format!("{}{}", "[".repeat(1 << 20), "]".repeat(1 << 20));
    assert!(parse_line(path, 1, &nested).is_err(), "serde_json's recursion limit refuses deep nesting");
    let toml_text = format!("[run]\nname = \"{}\"\n", "a".repeat(1 << 20));
    let config: TrainConfig = toml::from_str(&toml_text).expect("a long name parses");
    assert_eq!(config.run.name.len(), 1 << 20);
    let _ = config.check();
    // Answers of a megabyte, powers of two and i128::MIN through the verifier: a reward, no panic.
    use forkrl_trainer::tasks::{Gold, Problem, verify::Extraction};
    let p = Problem {
        prompt: String::new(),
        solution: None,
        gold: Gold::Math { answer: "-170141183460469231731687303715884105728".into(), extraction: Extraction::Auto },
    };
    for response in [
        format!("\\boxed{{{big}}}"),
        "\\boxed{-170141183460469231731687303715884105728}".to_string(),
        "\\boxed{\\frac{-170141183460469231731687303715884105728}{-1}}".to_string(),
        "\\boxed{340282366920938463463374607431768211456}".to_string(),
        "\\boxed{\\frac{1}{170141183460469231731687303715884105728}}".to_string(),
        String::new(),
    ] {
        let r = p.reward(&response);
        assert!(r == 0.0 || r == 1.0);
    }
    assert_eq!(p.reward("\\boxed{-170141183460469231731687303715884105728}"), 1.0);
}
