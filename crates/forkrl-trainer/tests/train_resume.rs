//! Checkpoints and `--resume` on the CPU backend: a run of N RL steps and a run stopped after k and resumed to N give
//! bit-identical parameters and metrics (timing metrics aside); a blow-up stops with a typed error and leaves the last
//! good checkpoint; the loop also runs a Hugging Face checkpoint on a JSONL dataset and the Countdown task.
//!
//! These tests build a CPU device whatever `FORKRL_BACKEND` says. `cargo xtask test` runs them in its CPU pass and
//! filters them out of the other passes by their `cpu_backend_` prefix, so those report them as filtered out, not as
//! passed again.

mod common;

use std::path::Path;

use burn::{
    module::{Module, ModuleVisitor, Param},
    tensor::Tensor,
};
use forkrl_core::Backend;
use forkrl_trainer::{
    JsonlWriter, Recorder, TrainConfig, Trainer, TrainerError,
    model::checkpoint::{POLICY_FILE, load_policy},
    rl::state::{latest_checkpoint, read_state},
    tasks::{TaskConfig, jsonl::JsonlConfig},
    train,
};

fn scratch(tag: &str) -> common::Scratch {
    common::Scratch::new(&format!("resume-{tag}"))
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
fn cpu_backend_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let device = Backend::Cpu.device().expect("cpu");
    let config = small();

    let checked = config.clone().check().expect("valid");

    let a = scratch("a");
    let mut metrics_a = JsonlWriter::new(Vec::new(), "a/metrics.jsonl");
    let summary_a = Trainer::new(checked.clone(), &device)
        .expect("builds")
        .with_checkpoints(&a)
        .run(&mut metrics_a, None)
        .expect("run a");
    let metrics_a = metrics_a.into_inner();

    let b = scratch("b");
    let mut metrics_b = JsonlWriter::new(Vec::new(), "b/metrics.jsonl");
    let mut first = Trainer::new(checked.clone(), &device).expect("builds").with_checkpoints(&b);
    first.run(&mut metrics_b, Some(2)).expect("run b, first half");
    // An observer that failed after the checkpoint is cut back to the checkpoint's rows: simulate extra lines.
    let mut metrics_b = metrics_b.into_inner();
    metrics_b.extend_from_slice(b"{\"phase\":\"rl\",\"step\":3}\n");
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
    let mut resumed = Trainer::resume_with(checked.clone(), &b, &device).expect("resumes");
    assert_eq!((resumed.step(), resumed.metrics_lines()), (2, state.metrics_lines));
    let mut writer = JsonlWriter::new(metrics_b, "b/metrics.jsonl");
    let summary_b = resumed.run(&mut writer, None).expect("run b, resumed");
    let metrics_b = writer.into_inner();

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
    // A step after the resumption really moved the parameters (mixed rewards, a non-zero gradient), so the optimizer
    // state had to be restored for the runs to agree.
    let late: Vec<serde_json::Value> =
        comparable(&metrics_a).into_iter().filter(|l| l["phase"] == "rl" && l["step"].as_u64() > Some(2)).collect();
    assert!(
        late.iter()
            .any(|l| l["actor/grad_norm"].as_f64() > Some(0.0) && l["frac_reward_zero_std"].as_f64() < Some(1.0)),
        "{late:?}"
    );
    assert_eq!(summary_a.eval_curve, summary_b.eval_curve);
    assert_eq!(summary_a.final_pass_at_k, summary_b.final_pass_at_k);
    // summary.json byte for byte, wall time aside: the resumed run read its summary back from state.json exactly.
    let json = |s: &forkrl_trainer::TrainSummary| {
        serde_json::to_string(&forkrl_trainer::TrainSummary { seconds: 0.0, ..s.clone() }).expect("json")
    };
    assert_eq!(json(&summary_a), json(&summary_b));
    // keep = 2: only the two newest checkpoints remain.
    let mut names: Vec<String> = std::fs::read_dir(&a)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-000002", "step-000004"]);

    // Resuming with another configuration is refused; a moved run (another name or folder) and a longer run are not.
    let mut other = config.clone();
    other.rl.lr *= 2.0;
    let refused = Trainer::resume_with(other.check().expect("valid"), &b, &device);
    assert!(matches!(refused, Err(TrainerError::Checkpoint { .. })), "{refused:?}");
    let mut moved = config.clone();
    moved.run.name = "elsewhere".into();
    moved.run.out_dir = "/moved".into();
    moved.rl.steps = 6;
    let moved = Trainer::resume_with(moved.check().expect("valid"), &b, &device).expect("a moved run resumes");
    assert_eq!(moved.step(), 4);
    // The checkpoint's own configuration, as `Trainer::resume` reads it.
    assert_eq!(Trainer::resume(&b, &device).expect("resumes").config().rl, config.rl);
    // Fewer steps than the checkpoint has done would mislabel the model.
    let mut shorter = config.clone();
    shorter.rl.steps = 3;
    match Trainer::resume_with(shorter.check().expect("valid"), &b, &device) {
        Err(TrainerError::InvalidConfig { key, .. }) => assert_eq!(key, "rl.steps"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn cpu_backend_a_blow_up_stops_with_a_typed_error_and_keeps_the_last_good_checkpoint() {
    let device = Backend::Cpu.device().expect("cpu");
    let mut config = small();
    config.sft.steps = 5;
    config.rl.lr = 1e38; // the first update sends the parameters to ±1e38: the next forward overflows.
    config.checkpoint.every = 1;
    let dir = scratch("nan");
    let err = Trainer::new(config.check().expect("valid"), &device)
        .expect("builds")
        .with_checkpoints(&dir)
        .run(&mut Recorder::default(), None)
        .expect_err("blows up");
    let typed = matches!(
        err,
        TrainerError::NonFinite { .. }
            | TrainerError::NonFiniteParameters { .. }
            | TrainerError::Core(forkrl_core::Error::NonFinite { .. })
    );
    assert!(typed, "{err}");
    let latest = latest_checkpoint(&dir).expect("latest").expect("the checkpoint before the blow-up");
    let state = read_state(&latest).expect("readable state");
    assert!(state.step <= 1, "{}", state.step);
    load_policy(&latest, &device).expect("the last checkpoint loads");
    let bits = params(&latest);
    assert!(bits.iter().all(|&b| f32::from_bits(b).is_finite()), "the last checkpoint's parameters are finite");
}

#[test]
fn cpu_backend_a_hugging_face_checkpoint_trains_on_a_jsonl_dataset() {
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
    config.task = TaskConfig::Jsonl(JsonlConfig {
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
    let mut recorder = Recorder::default();
    let summary = train(config.clone().check().expect("valid"), &device, &mut recorder).expect("trains");
    let rl = recorder.phase("rl");
    assert_eq!(rl.len(), 2);
    assert!(rl[1].get("actor/pg_loss").is_some() && rl[1].get("response_length/mean").expect("len") > 0.0);
    assert_eq!(summary.eval_curve.len(), 2, "after SFT and at the last step");

    // The same dataset with the character tokenizer of the tiny model is a clear error, not a crash.
    config.model.hf_dir = None;
    match train(config.check().expect("valid"), &device, &mut Recorder::default()) {
        Err(TrainerError::Tokenizer(msg)) => assert!(msg.contains("--model"), "{msg}"),
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}

#[test]
fn cpu_backend_countdown_runs_and_sft_teaches_the_format() {
    let device = Backend::Cpu.device().expect("cpu");
    let mut config = small();
    config.task = TaskConfig::Countdown(Default::default());
    config.sft.steps = 60;
    config.rl.steps = 1;
    config.rl.max_response_len = 28;
    config.eval.every = 1;
    let mut recorder = Recorder::default();
    train(config.check().expect("valid"), &device, &mut recorder).expect("trains");
    let sft: Vec<f64> = recorder.phase("sft").iter().map(|r| r.get("sft/loss").expect("loss")).collect();
    assert!(sft.last() < sft.first(), "SFT loss falls: {sft:?}");
}

#[test]
fn cpu_backend_stateful_options_resume_bit_identically() {
    // The state beyond the weights and the optimizer: HORA's prompt history, the buffered balance's rows (two steps
    // buffered, so the checkpoint of step 2 holds rows), and the adaptive KL controller's β. In bf16 mixed precision,
    // which the policy and the reference loaded from the checkpoint must keep.
    let device = Backend::Cpu.device().expect("cpu");
    let text = "[model]\ndtype = \"bf16\"\n[rl]\nbalance = \"buffered\"\n[rl.balance_buffer]\nmax_buffer_steps = 2\n\
                [rl.hora]\nsource = { kind = \"history\", decay = 0.9 }\n\
                [rl.kl_in_reward]\nkl_ctrl = { type = \"adaptive\", kl_coef = 0.05, target_kl = 0.01, horizon = 64 }\n";
    let mut config: TrainConfig = toml::from_str(text).expect("valid");
    let base = small();
    (config.sft, config.eval, config.checkpoint) = (base.sft, base.eval, base.checkpoint);
    (config.rl.steps, config.rl.prompts_per_step, config.rl.group_size) = (4, 4, 4);
    let checked = config.check().expect("valid");
    let a = scratch("stateful-a");
    let mut metrics_a = JsonlWriter::new(Vec::new(), "a/metrics.jsonl");
    Trainer::new(checked.clone(), &device).expect("builds").with_checkpoints(&a).run(&mut metrics_a, None).expect("a");
    let b = scratch("stateful-b");
    let mut metrics_b = JsonlWriter::new(Vec::new(), "b/metrics.jsonl");
    let mut first = Trainer::new(checked.clone(), &device).expect("builds").with_checkpoints(&b);
    first.run(&mut metrics_b, Some(2)).expect("b, first half");
    let state = read_state(&latest_checkpoint(&b).expect("latest").expect("one")).expect("state");
    let held = state.balance_buffer.as_ref().map(|buf| buf.counts()).expect("buffered");
    assert!(held.0 + held.1 > 0, "rows are buffered at the checkpoint: {held:?}");
    assert!(state.prompt_stats.as_ref().is_some_and(|s| !s.is_empty()) && state.kl_coef.is_some());
    let mut resumed = Trainer::resume_with(checked, &b, &device).expect("resumes");
    assert_eq!(resumed.policy().dtype(), forkrl_trainer::model::policy::ComputeDtype::Bf16);
    resumed.run(&mut metrics_b, None).expect("b, resumed");
    let (pa, pb) = (
        params(&latest_checkpoint(&a).expect("latest").expect("final")),
        params(&latest_checkpoint(&b).expect("latest").expect("final")),
    );
    assert!(pa == pb, "parameters differ in {} of {}", pa.iter().zip(&pb).filter(|(x, y)| x != y).count(), pa.len());
    let (ma, mb) = (comparable(&metrics_a.into_inner()), comparable(&metrics_b.into_inner()));
    assert_eq!(ma, mb);
    assert!(ma.iter().any(|l| l["balance/updated"].as_f64() == Some(1.0)), "some step updated");
    let _ = std::fs::remove_dir_all(a);
    let _ = std::fs::remove_dir_all(b);
}

/// A straight run and a run stopped after step 2 and resumed give the same parameters and metrics.
fn assert_resumes_bit_identically(config: TrainConfig, tag: &str) {
    let device = Backend::Cpu.device().expect("cpu");
    let checked = config.check().expect("valid");
    let a = scratch(&format!("{tag}-a"));
    let mut metrics_a = JsonlWriter::new(Vec::new(), "a/metrics.jsonl");
    Trainer::new(checked.clone(), &device).expect("builds").with_checkpoints(&a).run(&mut metrics_a, None).expect("a");
    let b = scratch(&format!("{tag}-b"));
    let mut metrics_b = JsonlWriter::new(Vec::new(), "b/metrics.jsonl");
    let mut first = Trainer::new(checked.clone(), &device).expect("builds").with_checkpoints(&b);
    first.run(&mut metrics_b, Some(2)).expect("b, first half");
    let mut resumed = Trainer::resume_with(checked, &b, &device).expect("resumes");
    resumed.run(&mut metrics_b, None).expect("b, resumed");
    let (pa, pb) = (
        params(&latest_checkpoint(&a).expect("latest").expect("final")),
        params(&latest_checkpoint(&b).expect("latest").expect("final")),
    );
    assert!(
        pa == pb,
        "{tag}: parameters differ in {} of {}",
        pa.iter().zip(&pb).filter(|(x, y)| x != y).count(),
        pa.len()
    );
    assert_eq!(comparable(&metrics_a.into_inner()), comparable(&metrics_b.into_inner()), "{tag}");
    let _ = std::fs::remove_dir_all(a);
    let _ = std::fs::remove_dir_all(b);
}

#[test]
fn cpu_backend_literature_options_resume_bit_identically() {
    // The state of issue 18's methods: HEAL's problem sets, the online rock detector's window, UG-TTT's adapters and
    // their optimizer (SORT and distillation's teacher are stateless); then ReasonMaxxer's base and offline set; then
    // IMAX's prefixes.
    let teacher_scratch = scratch("literature-teacher");
    let teacher_dir = teacher_scratch.join("teacher");
    let device = Backend::Cpu.device().expect("cpu");
    let mut teacher_config = small();
    teacher_config.run.seed = 5;
    let teacher = Trainer::new(teacher_config.check().expect("valid"), &device).expect("builds");
    forkrl_trainer::model::checkpoint::save_policy(teacher.policy(), teacher.policy_config(), &teacher_dir)
        .expect("saves");
    let text = format!(
        "[rl.distillation]\nteacher = {:?}\n[rl.distillation.loss.rock]\nwindow = 2\n\
         [rl.distillation.loss.rock.detection]\ntop_k = 2\ndrop_most_frequent = 0\n\
         [rl.sort]\n[rl.ugttt]\nbonus = \"reward\"\n\
         [rl.heal]\ngeneral = {{ kind = \"sum\" }}\ntarget_problems = 8\ngeneral_pool = 8\ngeneral_keep = 4\n\
         selection_rollouts = 2\n[rl.heal.eda]\nmin_len = 2\n",
        teacher_dir.display().to_string()
    );
    let mut config: TrainConfig = toml::from_str(&text).expect("valid");
    let base = small();
    (config.sft, config.eval, config.checkpoint) = (base.sft, base.eval, base.checkpoint);
    (config.rl.steps, config.rl.prompts_per_step, config.rl.group_size) = (4, 4, 4);
    assert_resumes_bit_identically(config, "literature");

    let mut config: TrainConfig = toml::from_str(
        "[rl.reasonmaxxer]\nproblems = 64\nrollouts_per_problem = 8\nkeep_problems = 8\nbatch_size = 4\n\
         [rl.reasonmaxxer.loss]\nadaptive_betaneg = true\ndecision_objective = \"delta_hinge\"\n",
    )
    .expect("valid");
    (config.sft, config.eval, config.checkpoint) = (base.sft, base.eval, base.checkpoint);
    config.sft.steps = 300;
    config.rl.steps = 4;
    assert_resumes_bit_identically(config, "reasonmaxxer");

    // IMAX's soft prefixes and their optimizer, two prefixes per prompt, with a KL loss reading the current prefixes.
    let mut config: TrainConfig =
        toml::from_str("[rl.imax]\nprefixes_per_prompt = 2\nprefix_len = 2\n[rl.kl_loss]\n").expect("valid");
    (config.sft, config.eval, config.checkpoint) = (base.sft, base.eval, base.checkpoint);
    (config.rl.steps, config.rl.prompts_per_step, config.rl.group_size) = (4, 2, 4);
    assert_resumes_bit_identically(config, "imax");
}
