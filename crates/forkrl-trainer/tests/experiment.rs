//! A minimal paired experiment (1 seed, 2 arms, a few steps) on the CPU backend: the report's structure, and the
//! paired design — every arm starts from the seed's one SFT checkpoint, so the arms agree on everything before their
//! first update (post-SFT accuracy, the first rollout batch) and differ after it.

use forkrl_core::Backend;
use forkrl_trainer::{
    TrainConfig, TrainerError,
    experiment::{self, Arm, ExperimentConfig},
};

/// The experiment's own default (the free-order sum task), shrunk to a few steps.
fn tiny() -> TrainConfig {
    let mut c = experiment::forking_tokens_base();
    c.sft.steps = 40;
    c.rl.steps = 3;
    c.rl.prompts_per_step = 4;
    c.rl.group_size = 4;
    c.eval.size = 16;
    c.eval.every = 1;
    c.eval.pass_k = 2;
    c.eval.pass_k_size = 4;
    c
}

#[test]
fn cpu_backend_a_minimal_experiment_is_paired_and_reported() {
    let device = Backend::Cpu.device().expect("cpu");
    let out = std::env::temp_dir().join(format!("forkrl-experiment-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut config = experiment::forking_tokens(tiny(), Some(1), true, out.clone());
    config.arms.truncate(2); // top-20 %, all tokens
    config.jobs = 2; // the two arms run at once
    let mut seen = Vec::new();
    let report =
        experiment::run(&config, &device, false, |p| seen.push((p.arm.clone(), p.done, p.total))).expect("runs");
    // The SFT run first, alone; then both arms (in either order, each started after the SFT run finished).
    assert_eq!(seen[0], ("sft".to_string(), 0, 3));
    let mut arms: Vec<&str> = seen[1..].iter().map(|s| s.0.as_str()).collect();
    arms.sort_unstable();
    assert_eq!(arms, ["all tokens", "top-20%"]);
    assert!(seen[1..].iter().all(|s| (1..=2).contains(&s.1) && s.2 == 3), "{seen:?}");
    // Paired: one SFT checkpoint, the same post-SFT policy and the same first batch in both arms.
    let (top, all) = (&report.arm_runs("top-20%")[0], &report.arm_runs("all tokens")[0]);
    assert_eq!(top.sft_checkpoint, all.sft_checkpoint);
    assert!(top.sft_checkpoint.join("policy.bpk").is_file());
    assert_eq!(top.summary.sft_accuracy, all.summary.sft_accuracy);
    assert_eq!(top.summary.eval_curve[0], all.summary.eval_curve[0]);
    assert_eq!(top.summary.first_batch_entropy, all.summary.first_batch_entropy, "same SFT policy, same first batch");
    assert!(top.summary.first_batch_entropy.is_some());
    // The arms differ in what they train on: ρ of the tokens against all of them.
    assert!(top.tokens_per_step < 0.5 * all.tokens_per_step, "{} vs {}", top.tokens_per_step, all.tokens_per_step);
    // The report: the table with both arms, the baseline's own row without a difference, the files.
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("| arm | mean accuracy gain") && md.contains("| top-20% |") && md.contains("| all tokens |"));
    assert!(md.contains("(one seed: no CI)"), "{md}");
    for f in ["curves.svg", "entropy.svg", "runs.json", "seed-0/sft/metrics.jsonl", "seed-0/top-20pct/summary.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    for f in ["curves.png", "entropy.png"] {
        let png = std::fs::read(out.join(f)).expect("a PNG next to each SVG");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "{f}");
    }
    // The analyses: the SFT model's entropy on held-out responses, and each arm's final model against it.
    let a = report.analysis.as_ref().expect("analysed");
    assert_eq!(a.responses, 16, "eval.size held-out prompts");
    assert!(a.tokens > 0 && (0.0..=1.0).contains(&a.frac_below_0_01) && a.p80 >= 0.0);
    assert_eq!(a.overlap.iter().map(|(arm, _)| arm.as_str()).collect::<Vec<_>>(), ["top-20%", "all tokens"]);
    assert!(a.overlap.iter().all(|(_, o)| (0.0..=1.0).contains(o)));
    assert!(a.change.iter().all(|(_, bins)| bins.len() == 5));
    assert_eq!(a.two_temperature.len(), 4);
    assert!(md.contains("## Entropy analyses") && md.contains("| t_high | pass@1 |"), "{md}");
    assert!(out.join("analysis.json").is_file());
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("runs.json")).expect("read")).expect("json");
    assert_eq!(runs.as_array().map(Vec::len), Some(2));
    // A second experiment in the same folder is refused, and nothing is touched.
    let before = std::fs::read(out.join("report.md")).expect("read");
    assert!(matches!(experiment::run(&config, &device, false, |_| {}), Err(TrainerError::RunExists { .. })));
    assert_eq!(std::fs::read(out.join("report.md")).expect("read"), before);
    // Running the arms one after the other gives the same numbers: `jobs` changes the wall time only.
    let sequential = out.with_extension("sequential");
    let _ = std::fs::remove_dir_all(&sequential);
    let one = ExperimentConfig { jobs: 1, out_dir: sequential.clone(), ..config };
    let again = experiment::run(&one, &device, false, |_| {}).expect("runs");
    for (a, b) in report.runs.iter().zip(&again.runs) {
        assert_eq!((&a.arm, a.summary.eval_curve.clone()), (&b.arm, b.summary.eval_curve.clone()));
        assert_eq!(a.summary.final_accuracy, b.summary.final_accuracy);
        assert_eq!(a.tokens_per_step, b.tokens_per_step);
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&sequential);
}

#[test]
fn bad_arms_are_refused_before_anything_runs() {
    let out = std::env::temp_dir().join(format!("forkrl-experiment-bad-{}", std::process::id()));
    let config = ExperimentConfig {
        name: "x".into(),
        base: tiny(),
        seeds: vec![0],
        arms: vec![Arm { name: "a".into(), sets: vec![("rl.forking.select".into(), "sideways".into())] }],
        baseline: "a".into(),
        out_dir: out.clone(),
        command: String::new(),
        jobs: 1,
    };
    let device = Backend::Cpu.device().expect("cpu");
    assert!(experiment::run(&config, &device, false, |_| panic!("nothing runs")).is_err());
    assert!(!out.exists(), "nothing written");
    // Bad task knobs are refused by the configuration check, before any run starts or anything is written.
    let mut base = tiny();
    base.task = forkrl_trainer::tasks::TaskConfig::Sum(forkrl_trainer::tasks::sum::SumConfig {
        numbers: 9,
        ..Default::default()
    });
    let bad_task = ExperimentConfig { base, arms: experiment::forking_tokens_arms(true), ..config };
    let err = experiment::run(&bad_task, &device, false, |_| panic!("nothing runs")).expect_err("bad knobs");
    assert!(matches!(err, TrainerError::InvalidConfig { .. }) && err.to_string().contains("task"), "{err}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn cpu_backend_the_distillation_demonstration_trains_its_teacher_then_pairs_grpo_with_distillation() {
    let device = Backend::Cpu.device().expect("cpu");
    let out = std::env::temp_dir().join(format!("forkrl-experiment-distill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // The shipped recipe: a wider teacher, a weak-start student, the GRPO baseline and the distillation arm.
    let (teacher, student) = (experiment::distillation_teacher(false), experiment::distillation_base(false));
    assert!(teacher.model.d_model > student.model.d_model && teacher.rl.steps > 0);
    assert_eq!((student.sft.steps, student.rl.steps), (250, 300));
    assert_eq!(experiment::distillation_teacher(true).rl.steps, 0);
    // Shrunk to a few steps: the teacher is trained and saved, then both arms run from each seed's SFT checkpoint.
    let mut small_teacher = experiment::distillation_teacher(true);
    (small_teacher.sft.steps, small_teacher.eval.size, small_teacher.eval.pass_k_size) = (30, 16, 4);
    let dir = out.join("teacher");
    let (sft, last) = experiment::train_teacher(small_teacher, &device, &dir).expect("teacher");
    assert!((0.0..=1.0).contains(&sft) && sft == last, "SFT only: {sft} {last}");
    assert!(dir.join("policy_config.json").is_file());
    let mut base = tiny();
    base.task = TrainConfig::default().task; // the built-in arithmetic, the teacher's
    base.rl.max_response_len = TrainConfig::default().rl.max_response_len;
    let mut config = experiment::distillation(base, &dir, Some(1), out.clone());
    config.jobs = 2;
    let report = experiment::run(&config, &device, true, |_| {}).expect("runs");
    let arms: Vec<&str> = report.runs.iter().map(|r| r.arm.as_str()).collect();
    assert_eq!(arms, ["grpo", "distillation"]);
    assert_eq!(report.runs[0].summary.sft_accuracy, report.runs[1].summary.sft_accuracy, "paired");
    assert!(out.join("report.md").is_file() && dir.join("policy.bpk").is_file(), "the teacher stays beside the report");
    let _ = std::fs::remove_dir_all(&out);
}
