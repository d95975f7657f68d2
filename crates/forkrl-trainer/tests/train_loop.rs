//! The RLVR loop end to end on a very small budget (seconds): it runs SFT, RL and evaluation, delivers one metrics
//! row per step with verl's names to its observer, learns something during SFT, and rejects bad configurations with
//! errors that name the key. The stages one by one are tested in `stages.rs`.

use forkrl_core::Backend;
use forkrl_trainer::{Recorder, TrainConfig, TrainerError, rl::metrics::summary_svg, train};

#[test]
fn a_short_run_reports_metrics_and_learns_in_sft() {
    let device = Backend::from_env().expect("known backend").device().expect("compiled backend");
    let mut config = TrainConfig::default();
    config.sft.steps = 60;
    config.rl.steps = 2;
    config.rl.prompts_per_step = 4;
    config.eval.size = 40;
    config.eval.every = 1;
    let mut recorder = Recorder::default();
    let summary = train(config.check().expect("valid"), &device, &mut recorder).expect("trains");
    let sft: Vec<f64> = recorder.phase("sft").iter().map(|r| r.get("sft/loss").expect("loss")).collect();
    assert!(sft.last() < sft.first(), "SFT loss falls: {sft:?}");
    let rl = recorder.phase("rl");
    assert_eq!(rl.len(), 2);
    for key in [
        "actor/pg_loss",
        "actor/entropy",
        "actor/pg_clipfrac",
        "actor/ppo_kl",
        "actor/grad_norm",
        "critic/score/mean",
        "response_length/mean",
        "frac_reward_zero_std",
        "forking/frac_selected",
        "perf/throughput",
        "eval/acc",
    ] {
        assert!(rl[1].get(key).is_some_and(f64::is_finite), "{key} missing in {:?}", rl[1]);
    }
    assert_eq!(summary.eval_curve.len(), 3);
    assert!(summary_svg(&summary).starts_with("<svg"));
    // Events: SFT steps, evaluations, RL steps (the library prints nothing; an observer decides).
    assert!(recorder.events.iter().any(|e| e.starts_with("SftStep")));
    assert_eq!(recorder.events.iter().filter(|e| e.starts_with("RlStep")).count(), 2);
    // Rows serialise as one JSON object each, keys as verl names them.
    let json = rl[0].to_json();
    assert_eq!(json["phase"], "rl");
    assert_eq!(json["step"], 1);
}

#[test]
fn configuration_errors_name_the_key() {
    let err = toml::from_str::<TrainConfig>("[rl]\nlearning_rate = 1e-4\n").expect_err("unknown key");
    assert!(err.to_string().contains("learning_rate"), "{err}");
    let ok: TrainConfig =
        toml::from_str("[rl]\nlr = 1e-4\n[rl.policy_loss]\nloss_mode = \"cispo\"\neps_high = 4.0\n").expect("valid");
    assert_eq!(ok.rl.policy_loss.name(), "cispo");
    let mut bad = TrainConfig::default();
    bad.rl.group_size = 1;
    match bad.check() {
        Err(TrainerError::InvalidConfig { key, value, .. }) => {
            assert_eq!((key.as_str(), value.as_str()), ("rl.group_size", "1"))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn dynamic_sampling_gives_up_with_a_typed_error_when_no_group_has_mixed_outcomes() {
    // Greedy decoding makes the 8 responses of a group identical, so every group has one outcome and is filtered out;
    // one allowed generation batch is then not enough.
    let device = Backend::from_env().expect("known backend").device().expect("compiled backend");
    let mut config = TrainConfig::default();
    config.sft.steps = 0;
    config.rl.steps = 1;
    config.rl.prompts_per_step = 2;
    config.rl.decoding = forkrl_rollout::Decoding::Greedy;
    config.eval.size = 4;
    config.eval.pass_k_size = 2;
    config.rl.dynamic_sampling =
        Some(forkrl_rollout::DynamicSamplingConfig { max_num_gen_batches: 1, ..Default::default() });
    match train(config.check().expect("valid"), &device, &mut Recorder::default()) {
        Err(TrainerError::Core(forkrl_core::Error::SamplingExhausted { attempts: 1, kept: 0, needed: 2 })) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_metrics_write_failure_is_an_io_error_naming_the_file() {
    /// A writer on a full disk.
    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let device = Backend::from_env().expect("known backend").device().expect("compiled backend");
    let mut config = TrainConfig::default();
    config.sft.steps = 1;
    config.eval.size = 4;
    let mut writer = forkrl_trainer::JsonlWriter::new(Full, "runs/full/metrics.jsonl");
    match train(config.check().expect("valid"), &device, &mut writer) {
        Err(TrainerError::Io { path, source }) => {
            assert!(path.ends_with("metrics.jsonl"), "{}", path.display());
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
        }
        other => panic!("unexpected {other:?}"),
    }
}
