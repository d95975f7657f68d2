//! The RLVR loop end to end on a very small budget (seconds): it runs SFT, RL and evaluation, writes one metrics line
//! per step with verl's names, learns something during SFT, and rejects a configuration with an unknown key.

use forkrl_core::Backend;
use forkrl_trainer::rlvr::{TrainConfig, summary_svg, train};

#[test]
fn a_short_run_writes_metrics_and_learns_in_sft() {
    let device = Backend::from_env().expect("known backend").device().expect("compiled backend");
    let mut config = TrainConfig::default();
    config.sft.steps = 60;
    config.rl.steps = 2;
    config.rl.prompts_per_step = 4;
    config.eval.size = 40;
    config.eval.every = 1;
    let mut metrics = Vec::new();
    let summary = train(&config, &device, &mut metrics).expect("trains");
    let text = String::from_utf8(metrics).expect("utf-8");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    let sft: Vec<f64> =
        lines.iter().filter(|l| l["phase"] == "sft").map(|l| l["sft/loss"].as_f64().expect("loss")).collect();
    assert!(sft.last() < sft.first(), "SFT loss falls: {sft:?}");
    let rl: Vec<&serde_json::Value> = lines.iter().filter(|l| l["phase"] == "rl").collect();
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
        assert!(rl[1][key].is_number(), "{key} missing in {}", rl[1]);
    }
    assert_eq!(summary.eval_curve.len(), 3);
    assert!(summary_svg(&summary).starts_with("<svg"));
}

#[test]
fn unknown_config_keys_are_errors_naming_the_key() {
    let err = toml::from_str::<TrainConfig>("[rl]\nlearning_rate = 1e-4\n").expect_err("unknown key");
    assert!(err.to_string().contains("learning_rate"), "{err}");
    let ok: TrainConfig =
        toml::from_str("[rl]\nlr = 1e-4\n[rl.policy_loss]\nloss_mode = \"cispo\"\neps_high = 4.0\n").expect("valid");
    assert_eq!(ok.rl.policy_loss.name(), "cispo");
    let bad = TrainConfig {
        rl: forkrl_trainer::rlvr::RlConfig { group_size: 1, ..Default::default() },
        ..Default::default()
    };
    let device = Backend::Cpu.device().expect("cpu");
    assert!(train(&bad, &device, &mut Vec::new()).is_err());
}

#[test]
fn dynamic_sampling_gives_up_with_a_typed_error_on_an_untrained_policy() {
    // Without SFT the policy is never right, every group is all-wrong, and one allowed generation batch is not enough.
    let device = Backend::from_env().expect("known backend").device().expect("compiled backend");
    let mut config = TrainConfig::default();
    config.sft.steps = 0;
    config.rl.steps = 1;
    config.rl.prompts_per_step = 2;
    config.eval.size = 4;
    config.eval.pass_k_size = 2;
    config.rl.dynamic_sampling =
        Some(forkrl_rollout::DynamicSamplingConfig { max_num_gen_batches: 1, ..Default::default() });
    match train(&config, &device, &mut Vec::new()) {
        Err(forkrl_trainer::TrainerError::Core(forkrl_core::Error::SamplingExhausted {
            attempts: 1,
            kept: 0,
            needed: 2,
        })) => {}
        other => panic!("unexpected {other:?}"),
    }
}
