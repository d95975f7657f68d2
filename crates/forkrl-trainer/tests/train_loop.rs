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
    match train(&config, &device, &mut Vec::new()) {
        Err(forkrl_trainer::TrainerError::Core(forkrl_core::Error::SamplingExhausted {
            attempts: 1,
            kept: 0,
            needed: 2,
        })) => {}
        other => panic!("unexpected {other:?}"),
    }
}

/// The loop's options end to end, two RL steps each after a short SFT: HORA (probe), Mixed-CUTS, EAPO and OPEFO token
/// weighting, query-preserved mini-batches, the KL loss to the reference policy with an entropy bonus, LR warm-up.
#[test]
fn every_loop_option_runs_and_shows_in_the_metrics() {
    if !on_the_cpu_suite() {
        return;
    }
    // Loop logic, not backend numerics: the CPU backend on every run of the suite.
    let device = Backend::Cpu.device().expect("cpu");
    let base = || {
        let mut c = TrainConfig::default();
        c.sft.steps = 120;
        c.rl.steps = 2;
        c.rl.prompts_per_step = 4;
        c.eval.size = 8;
        c.eval.every = 2;
        c.eval.pass_k = 2;
        c.eval.pass_k_size = 2;
        c
    };
    let rl_lines = |c: &TrainConfig| -> Vec<serde_json::Value> {
        let mut metrics = Vec::new();
        train(c, &device, &mut metrics).expect("trains");
        String::from_utf8(metrics)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .filter(|l| l["phase"] == "rl")
            .collect()
    };
    let set = |text: &str| -> TrainConfig {
        let mut c: TrainConfig = toml::from_str(text).expect("valid option");
        let b = base();
        c.sft = b.sft;
        c.rl.steps = b.rl.steps;
        c.rl.prompts_per_step = b.rl.prompts_per_step;
        c.eval = b.eval;
        c
    };

    // HORA with a probe of 2: every prompt gets at least 2 rollouts and the budget stays 4 × 8.
    let hora = rl_lines(&set("[rl.hora]\nmin_per_prompt = 2\nsource = { kind = \"probe\", n0 = 2 }\n"));
    assert!(hora.iter().all(|l| l["rollout/num_responses"].as_f64() == Some(32.0)), "{hora:?}");
    // Mixed-CUTS: 4 standard + 4 CUTS rollouts per group.
    let mixed = rl_lines(&set("[rl.mixed_cuts]\ng_std = 4\ng_cuts = 4\n"));
    assert_eq!(mixed.len(), 2);
    // Token weighting.
    for kind in ["eapo", "opefo", "shear"] {
        let lines = rl_lines(&set(&format!("[rl.token_weighting]\nkind = \"{kind}\"\n")));
        assert!(lines[1]["actor/pg_loss"].is_number(), "{kind}");
    }
    // Micro-batches of 8 rows with gradient accumulation give the update of the whole batch (up to rounding).
    let whole = rl_lines(&set(""));
    let micro = rl_lines(&set("[rl]\nppo_micro_batch_size = 8\n"));
    for key in ["actor/pg_loss", "actor/grad_norm", "actor/pg_clipfrac", "actor/ppo_kl", "critic/score/mean"] {
        let (a, m) = (whole[0][key].as_f64().expect(key), micro[0][key].as_f64().expect(key));
        assert!((a - m).abs() <= 1e-4 * (1.0 + a.abs()), "{key}: whole batch {a}, micro-batches {m}");
    }
    // Two mini-batches of 2 prompts per epoch.
    let mb = rl_lines(&set("[rl]\nppo_mini_batch_size = 2\n"));
    assert!(mb[1]["actor/grad_norm"].is_number());
    // KL loss and entropy bonus: after one update the policy has left the reference.
    let kl = rl_lines(&set(
        "[rl]\nentropy_coeff = 0.001\n[rl.kl_loss]\nkl_loss_type = \"low_var_kl\"\nkl_loss_coef = 0.01\n",
    ));
    // (logged from the last of the 2 epochs, after an update: the policy has already left the reference)
    assert!(kl.iter().all(|l| l["actor/kl_loss"].as_f64() > Some(0.0)), "{kl:?}");
    assert!(kl[1]["actor/entropy_loss"].as_f64() > Some(0.0));
    // verl's warm-up: lr 0 at the first step, lr/2 at the second with 2 warm-up steps.
    let warm = rl_lines(&set("[rl]\nlr_warmup_steps = 2\n"));
    assert_eq!(warm[0]["actor/lr"].as_f64(), Some(0.0));
    assert_eq!(warm[1]["actor/lr"].as_f64(), Some(0.5e-4));

    // HTPO in place of the policy loss; per-query reward balance (some rows leave the loss).
    let htpo = rl_lines(&set("[rl.htpo]\nclip_ratio_c = 10.0\n"));
    assert!(htpo.iter().all(|l| l["actor/pg_loss"].is_number()), "{htpo:?}");
    let balanced = rl_lines(&set("[rl]\nbalance = \"per_query\"\n"));
    assert!(balanced.iter().all(|l| l["rollout/frac_trained"].as_f64() < Some(1.0)), "{balanced:?}");

    // Options that cannot work are configuration errors, not crashes.
    for bad in [
        "[rl.mixed_cuts]\ng_std = 4\ng_cuts = 2\n",
        "[rl.hora]\nsource = { kind = \"history\", decay = 1.0 }\n",
        "[rl]\nppo_mini_batch_size = 0\n",
        "[rl.htpo]\n[rl.kl_loss]\nkl_loss_coef = 0.01\n",
    ] {
        assert!(
            matches!(train(&set(bad), &device, &mut Vec::new()), Err(forkrl_trainer::TrainerError::Config(_))),
            "{bad}"
        );
    }
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
