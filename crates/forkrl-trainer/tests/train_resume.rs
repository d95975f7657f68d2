//! Checkpoints and `--resume` on the CPU backend: a run of N RL steps and a run stopped after k and resumed to N give
//! bit-identical parameters and metrics (timing metrics aside); a blow-up stops with a typed error and leaves the last
//! good checkpoint; the loop also runs a Hugging Face checkpoint on a JSONL dataset and the Countdown task.

use std::path::{Path, PathBuf};

use burn::{
    module::{Module, ModuleVisitor, Param},
    tensor::Tensor,
};
use forkrl_core::Backend;
use forkrl_trainer::{
    TrainerError,
    checkpoint::{POLICY_FILE, load_policy},
    rlvr::{Checkpointing, TrainConfig, latest_checkpoint, read_state, train, train_with_checkpoints},
    task::TaskConfig,
};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkrl-resume-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

fn small() -> TrainConfig {
    let mut c = TrainConfig::default();
    c.sft.steps = 150;
    c.rl.steps = 4;
    c.rl.prompts_per_step = 4;
    c.rl.group_size = 4;
    c.eval.size = 16;
    c.eval.every = 2;
    c.eval.pass_k = 2;
    c.eval.pass_k_size = 4;
    c.checkpoint.every = 2;
    c
}

/// Metrics lines without the wall-clock ones.
fn comparable(metrics: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8(metrics.to_vec())
        .expect("utf-8")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json");
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| !k.starts_with("perf/"));
            }
            v
        })
        .collect()
}

/// Every parameter value of a checkpoint, in module order.
fn params(checkpoint: &Path) -> Vec<u32> {
    struct Collect(Vec<u32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val().into_data().try_to_vec::<f32>().expect("f32");
            self.0.extend(values.iter().map(|v| v.to_bits()));
        }
    }
    assert!(checkpoint.join(POLICY_FILE).is_file());
    let (policy, _) = load_policy(checkpoint, &Backend::Cpu.device().expect("cpu")).expect("loads");
    let mut c = Collect(Vec::new());
    policy.visit(&mut c);
    c.0
}

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    if !on_the_cpu_suite() {
        return;
    }
    let device = Backend::Cpu.device().expect("cpu");
    let config = small();

    let a = scratch("a");
    let mut metrics_a = Vec::new();
    let ckpt_a = Checkpointing { dir: Some(a.clone()), ..Checkpointing::default() };
    let summary_a = train_with_checkpoints(&config, &device, &mut metrics_a, &ckpt_a).expect("run a");

    let b = scratch("b");
    let mut metrics_b = Vec::new();
    let stop = Checkpointing { dir: Some(b.clone()), resume: false, stop_after: Some(2) };
    train_with_checkpoints(&config, &device, &mut metrics_b, &stop).expect("run b, first half");
    let latest = latest_checkpoint(&b).expect("latest").expect("a checkpoint");
    let state = read_state(&latest).expect("state");
    assert_eq!(state.step, 2);
    metrics_b.truncate(
        String::from_utf8(metrics_b.clone())
            .expect("utf-8")
            .lines()
            .take(state.metrics_lines)
            .map(|l| l.len() + 1)
            .sum(),
    );
    let resume = Checkpointing { dir: Some(b.clone()), resume: true, stop_after: None };
    let summary_b = train_with_checkpoints(&config, &device, &mut metrics_b, &resume).expect("run b, resumed");

    let final_a = latest_checkpoint(&a).expect("latest").expect("final");
    let final_b = latest_checkpoint(&b).expect("latest").expect("final");
    assert!(final_a.ends_with("step-000004") && final_b.ends_with("step-000004"));
    let (pa, pb) = (params(&final_a), params(&final_b));
    assert!(pa.len() > 10_000);
    assert!(
        pa == pb,
        "parameters are bit-identical ({} of {} differ)",
        pa.iter().zip(&pb).filter(|(a, b)| a != b).count(),
        pa.len()
    );
    assert_eq!(comparable(&metrics_a), comparable(&metrics_b), "metrics are identical");
    // The steps after the resumption really moved the parameters (mixed rewards, non-zero gradients), so the
    // optimizer state had to be restored for the runs to agree.
    let late: Vec<serde_json::Value> =
        comparable(&metrics_a).into_iter().filter(|l| l["phase"] == "rl" && l["step"].as_u64() > Some(2)).collect();
    assert!(
        late.iter()
            .all(|l| l["actor/grad_norm"].as_f64() > Some(0.0) && l["frac_reward_zero_std"].as_f64() < Some(1.0)),
        "{late:?}"
    );
    assert_eq!(summary_a.eval_curve, summary_b.eval_curve);
    assert_eq!(summary_a.final_pass_at_k, summary_b.final_pass_at_k);
    // keep = 2: only the two newest checkpoints remain.
    let mut names: Vec<String> = std::fs::read_dir(&a)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-000002", "step-000004"]);

    // Resuming with another configuration is refused.
    let mut other = config.clone();
    other.rl.lr *= 2.0;
    let refuse = Checkpointing { dir: Some(b), resume: true, stop_after: None };
    assert!(matches!(
        train_with_checkpoints(&other, &device, &mut Vec::new(), &refuse),
        Err(TrainerError::Checkpoint { .. })
    ));
}

#[test]
fn a_blow_up_stops_with_a_typed_error_and_keeps_the_last_good_checkpoint() {
    if !on_the_cpu_suite() {
        return;
    }
    let device = Backend::Cpu.device().expect("cpu");
    let mut config = small();
    config.sft.steps = 5;
    config.rl.lr = 1e38; // the first update sends the parameters to ±1e38: the next forward overflows.
    config.checkpoint.every = 1;
    let dir = scratch("nan");
    let ckpt = Checkpointing { dir: Some(dir.clone()), ..Checkpointing::default() };
    let err = train_with_checkpoints(&config, &device, &mut Vec::new(), &ckpt).expect_err("blows up");
    let typed =
        matches!(err, TrainerError::NonFinite { .. } | TrainerError::Core(forkrl_core::Error::NonFinite { .. }));
    assert!(typed, "{err}");
    let latest = latest_checkpoint(&dir).expect("latest").expect("the checkpoint before the blow-up");
    let state = read_state(&latest).expect("readable state");
    assert!(state.step <= 1, "{}", state.step);
    load_policy(&latest, &device).expect("the last checkpoint loads");
}

#[test]
fn a_hugging_face_checkpoint_trains_on_a_jsonl_dataset() {
    if !on_the_cpu_suite() {
        return;
    }
    let device = Backend::Cpu.device().expect("cpu");
    let dir = scratch("jsonl");
    let data = dir.join("train.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            format!("{{\"question\": \"What is {i} + 7?\", \"answer\": \"{i} + 7 = {}.\\n#### {}\"}}", i + 7, i + 7)
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).expect("write");
    let mut config = small();
    config.model.hf_dir = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2-tied"));
    config.model.max_len = Some(128);
    config.task = TaskConfig::Jsonl(forkrl_trainer::jsonl::JsonlConfig {
        path: data,
        test_share: 0.2,
        template: "Q: {question}\nA:".into(),
        ..Default::default()
    });
    config.sft.steps = 3;
    config.sft.batch_size = 4;
    config.sft.lr = 1e-3;
    config.rl.steps = 2;
    config.rl.max_response_len = 12;
    config.eval.size = 4;
    let mut metrics = Vec::new();
    let summary = train(&config, &device, &mut metrics).expect("trains");
    let rl: Vec<serde_json::Value> = comparable(&metrics).into_iter().filter(|l| l["phase"] == "rl").collect();
    assert_eq!(rl.len(), 2);
    assert!(rl[1]["actor/pg_loss"].is_number() && rl[1]["response_length/mean"].as_f64().expect("len") > 0.0);
    assert_eq!(summary.eval_curve.len(), 2, "after SFT and at the last step");

    // The same dataset with the character tokenizer of the tiny model is a clear error, not a crash.
    config.model.hf_dir = None;
    match train(&config, &device, &mut Vec::new()) {
        Err(TrainerError::Tokenizer(msg)) => assert!(msg.contains("--model"), "{msg}"),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

#[test]
fn countdown_runs_and_sft_teaches_the_format() {
    if !on_the_cpu_suite() {
        return;
    }
    let device = Backend::Cpu.device().expect("cpu");
    let mut config = small();
    config.task = TaskConfig::Countdown(Default::default());
    config.sft.steps = 60;
    config.rl.steps = 1;
    config.rl.max_response_len = 28;
    config.eval.every = 1;
    let mut metrics = Vec::new();
    train(&config, &device, &mut metrics).expect("trains");
    let sft: Vec<f64> = comparable(&metrics)
        .iter()
        .filter(|l| l["phase"] == "sft")
        .map(|l| l["sft/loss"].as_f64().expect("loss"))
        .collect();
    assert!(sft.last() < sft.first(), "SFT loss falls: {sft:?}");
}

/// These tests exercise the loop's logic on the CPU backend whatever `FORKRL_BACKEND` says; `cargo xtask test` runs
/// the suite once per backend, and running them again in the wgpu pass would only repeat the CPU run.
fn on_the_cpu_suite() -> bool {
    let backend = Backend::from_env().expect("known backend");
    if backend != Backend::Cpu {
        eprintln!("CPU-backend test: checked in the FORKRL_BACKEND=cpu run, skipped in the {backend} run");
    }
    backend == Backend::Cpu
}
