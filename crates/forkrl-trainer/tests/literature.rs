//! The methods of `docs/methods.md`'s literature table in the trainer, each on a fixed batch and an untrained tiny
//! policy (CPU backend): on-policy distillation (both estimators, the rock-token bypass and its alignment, online rock
//! detection, the teacher checks), SORT's repair update, and ReasonMaxxer's offline stage.

mod common;

use std::path::PathBuf;

use forkrl_core::Backend;
use forkrl_entropy::{RockAlignment, RockConfig, detect_rock_tokens, rock_aligned_ids};
use forkrl_trainer::{
    TrainConfig, Trainer, TrainerError,
    batch::RolloutBatch,
    model::{checkpoint, token_stats_host},
    rl::reasonmaxxer::ReasonMaxxerData,
    tasks::{Gold, Problem},
};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkrl-literature-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn config(toml: &str) -> TrainConfig {
    let mut config: TrainConfig = toml::from_str(toml).expect("valid option");
    config.sft.steps = 0;
    config.rl.prompts_per_step = 2;
    config.rl.ppo_epochs = 1;
    config.rl.max_response_len = 16;
    config.eval.size = 4;
    config
}

fn trainer(toml: &str) -> Trainer {
    Trainer::new(config(toml).check().expect("valid"), &Backend::Cpu.device().expect("cpu")).expect("builds")
}

/// A teacher: the tiny policy of another seed, saved as a forkrl checkpoint.
fn teacher_dir(tag: &str, seed: u64) -> PathBuf {
    let t = trainer(&format!("[run]\nseed = {seed}\n"));
    let dir = scratch(tag).join("teacher");
    checkpoint::save_policy(t.policy(), t.policy_config(), &dir).expect("saves");
    dir
}

/// Two prompts × four responses, rewards `[1, 0, 0, 1 | 0, 0, 0, 0]`, with the problems (and worked solutions) attached.
fn fixed_batch(t: &Trainer) -> RolloutBatch {
    let rows = [
        ("12+34-5=", "46|41", 1.0),
        ("12+34-5=", "46|40", 0.0),
        ("12+34-5=", "4", 0.0),
        ("12+34-5=", "46|41", 1.0),
        ("7+8+9=", "15|25", 0.0),
        ("7+8+9=", "15|23", 0.0),
        ("7+8+9=", "16|25", 0.0),
        ("7+8+9=", "15|24|9", 0.0),
    ];
    let mut batch = common::batch_of(t, &rows, vec![4, 4]);
    batch.problems = Some(vec![
        Problem { prompt: "12+34-5=".into(), solution: Some("46|41".into()), gold: Gold::LastInteger(41) },
        Problem { prompt: "7+8+9=".into(), solution: Some("7+8=15|15+9=24".into()), gold: Gold::LastInteger(24) },
    ]);
    batch
}

/// The fixed batch, scored by `t`.
fn scored(t: &mut Trainer) -> RolloutBatch {
    let mut batch = fixed_batch(t);
    t.score(&mut batch).expect("scores");
    batch
}

fn mean_reverse_kl(t: &mut Trainer, batch: &RolloutBatch) -> f64 {
    let mut b = batch.clone();
    t.score(&mut b).expect("scores");
    let d = b.scores.as_ref().and_then(|s| s.distill.clone()).expect("distill scores");
    let mask = b.response_mask();
    let n = mask.iter().filter(|&&m| m).count() as f64;
    d.reverse_kl.iter().zip(mask).filter(|(_, m)| **m).map(|(&k, _)| f64::from(k)).sum::<f64>() / n
}

#[test]
fn sampled_token_distillation_trains_on_minus_k1_and_full_vocabulary_lowers_the_reverse_kl() {
    let teacher = teacher_dir("opd", 11);
    let base = format!("[rl]\nlr = 3e-3\n[rl.distillation]\nteacher = {:?}\n", teacher.display().to_string());

    // Sampled token: A_t = −(log π_old − log q) on every response token, the forking mask off (all tokens).
    let mut t = trainer(&format!("{base}[rl.distillation.loss]\nestimator = \"sampled_token\"\n"));
    let batch = scored(&mut t);
    let s = batch.scores.as_ref().expect("scored");
    let d = s.distill.as_ref().expect("distill");
    for (i, &m) in batch.response_mask().iter().enumerate() {
        let expected = if m { -(s.old_log_prob[i] - d.teacher_log_prob[i]) } else { 0.0 };
        assert!((s.token_advantages[i] - expected).abs() < 1e-6, "position {i}");
        assert!(!m || d.reverse_kl[i] > 0.0, "two different policies disagree everywhere");
    }
    assert_eq!(t.config().token_selection(), forkrl_entropy::TokenSelection::All);
    // One step raises the surrogate Σ_t A_t log π(y_t): tokens the teacher prefers (k < 0) gain probability.
    let (advantages, old) = (s.token_advantages.clone(), s.old_log_prob.clone());
    t.update(&batch).expect("updates");
    let new = token_stats_host(t.policy(), batch.ids(), batch.width(), 1.0, 8).expect("stats").1;
    let surrogate: f64 = (0..new.len()).map(|i| f64::from(advantages[i]) * f64::from(new[i] - old[i])).sum();
    assert!(surrogate > 0.0, "{surrogate}");

    // Full vocabulary: the exact reverse KL is the loss; one step lowers it on the batch, and its metric is logged.
    let mut t = trainer(&base);
    let before = mean_reverse_kl(&mut t, &batch);
    let mut b = batch.clone();
    t.score(&mut b).expect("scores");
    assert!(b.scores.as_ref().expect("scored").token_advantages.iter().all(|&a| a == 0.0), "no env advantage");
    let stats = t.update(&b).expect("updates");
    assert!((stats.distill_loss - before).abs() < 1e-3 * before.max(1.0), "{} vs {before}", stats.distill_loss);
    assert!(mean_reverse_kl(&mut t, &batch) < 0.9 * before);

    // The teacher is the student: no KL, no signal.
    let t = trainer("");
    let same = scratch("opd-self").join("teacher");
    checkpoint::save_policy(t.policy(), t.policy_config(), &same).expect("saves");
    let mut c = config(&format!("[rl.distillation]\nteacher = {:?}\n", same.display().to_string()));
    c.run.seed = t.config().run.seed;
    let mut t = Trainer::new(c.check().expect("valid"), &Backend::Cpu.device().expect("cpu")).expect("builds");
    assert!(mean_reverse_kl(&mut t, &batch) < 1e-5);
}

#[test]
fn the_rock_bypass_silences_the_predicted_or_the_next_position_and_online_detection_ranks_kl_mass() {
    let teacher = teacher_dir("rock", 12);
    let sep = 2 + "0123456789+-=|*/(),>:".find('|').expect("in the alphabet") as u32;
    let setup = |extra: &str| {
        format!(
            "[rl.distillation]\nteacher = {:?}\n[rl.distillation.loss]\nestimator = \"sampled_token\"\n\
             [rl.distillation.loss.rock]\nfreeze_weight = 0.0\n{extra}",
            teacher.display().to_string()
        )
    };
    for (alignment, offset) in [("predicted", 1usize), ("context", 0)] {
        let mut t = trainer(&setup(&format!("tokens = [{sep}]\nalignment = \"{alignment}\"\n")));
        let batch = scored(&mut t);
        let s = batch.scores.as_ref().expect("scored");
        let d = s.distill.as_ref().expect("distill");
        let w = batch.width();
        for (i, &m) in batch.response_mask().iter().enumerate() {
            let rock = batch.ids()[i / w][i % w + offset] == sep;
            assert_eq!(d.weights[i], if m && !rock { 1.0 } else { 0.0 }, "{alignment} position {i}");
            assert_eq!(s.train_mask[i], m && !rock, "a full bypass leaves the loss rows");
            assert!(!(m && rock) || s.token_advantages[i] == 0.0);
        }
        assert!(d.weights.iter().zip(batch.response_mask()).any(|(&x, &m)| m && x == 0.0), "{alignment}: a rock");
    }
    // Every id a rock: nothing trains, the parameters stay.
    let all: Vec<String> = (0..30).map(|i| i.to_string()).collect();
    let mut t = trainer(&setup(&format!("tokens = [{}]\n", all.join(", "))));
    let batch = scored(&mut t);
    let before = token_stats_host(t.policy(), batch.ids(), batch.width(), 1.0, 8).expect("stats").1;
    t.update(&batch).expect("updates");
    assert_eq!(token_stats_host(t.policy(), batch.ids(), batch.width(), 1.0, 8).expect("stats").1, before);

    // Online detection over a one-step window = the library's ranking of this batch's ℓ by predicted token.
    let detection =
        "window = 1\n[rl.distillation.loss.rock.detection]\nmin_freq = 1\ndrop_most_frequent = 0\ntop_k = 2\n";
    let mut t = trainer(&setup(detection));
    let batch = scored(&mut t);
    let d = batch.scores.as_ref().and_then(|s| s.distill.clone()).expect("distill");
    let ids = rock_aligned_ids(batch.ids(), batch.width(), RockAlignment::Predicted).expect("aligned");
    let config = RockConfig { min_freq: 1, drop_most_frequent: 0, top_k: 2, control_k: 100 };
    let expected = detect_rock_tokens(&ids, &d.reverse_kl, batch.response_mask(), &config).expect("ranks");
    assert_eq!(d.rocks, expected.rocks);
    assert_eq!(d.rocks.len(), 2);
}

#[test]
fn a_bad_teacher_is_refused_before_anything_runs() {
    let missing = config("[rl.distillation]\nteacher = \"/nonexistent/teacher\"\n").check();
    assert!(matches!(missing, Err(TrainerError::InvalidConfig { ref key, .. }) if key == "rl.distillation.teacher"));
    // A Hugging Face fixture has another vocabulary than the built-in character tokenizer.
    let hf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2-tied");
    let c = config(&format!("[rl.distillation]\nteacher = {:?}\n", hf.display().to_string())).check().expect("valid");
    let err = Trainer::new(c, &Backend::Cpu.device().expect("cpu")).expect_err("another vocabulary");
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let c = config("[rl]\nbalance = \"per_query\"\n[rl.distillation]\nteacher = \"/x\"\n");
    assert!(c.check().is_err());
}

#[test]
fn sort_repairs_only_all_wrong_groups_and_raises_the_reference_likelihood() {
    let reference_lp = |t: &Trainer| {
        let v = t.vocab();
        let mut seq = v.encode("7+8+9=").expect("encodes");
        let prompt = seq.len();
        seq.extend(v.encode("7+8=15|15+9=24").expect("encodes"));
        seq.push(v.eos[0]);
        let w = seq.len() - 1;
        let lp = token_stats_host(t.policy(), &[seq], w, 1.0, 1).expect("stats").1;
        lp[prompt - 1..].iter().map(|&x| f64::from(x)).sum::<f64>()
    };
    let mut gains = Vec::new();
    for toml in ["[rl]\nlr = 3e-3\n", "[rl]\nlr = 3e-3\n[rl.sort]\nweighting = { kind = \"uniform\" }\n"] {
        let mut t = trainer(toml);
        let batch = scored(&mut t);
        let before = reference_lp(&t);
        let stats = t.update(&batch).expect("updates");
        gains.push(reference_lp(&t) - before);
        if let Some(s) = batch.scores.as_ref().and_then(|s| s.sort.clone()) {
            assert_eq!(s.groups, vec![1], "only the all-wrong group");
            assert_eq!(s.planned, 1, "the character tokenizer takes the compact plan");
            let repair = s.repair.as_ref().expect("rows");
            let on: Vec<f32> = repair.response_values(&s.weights, 0);
            assert!(on.iter().all(|&w| w == 1.0) && on.len() == "7+8=15|15+9=24".len() + 1);
            assert!(stats.repair_loss > 0.0);
        }
    }
    assert!(gains[1] > gains[0] + 0.1, "the repair term raises log π(y*): {gains:?}");

    // Geometric weights lie in (0, 1]; a batch without problems repairs nothing.
    let mut t = trainer("[rl.sort]\n");
    let batch = scored(&mut t);
    let s = batch.scores.as_ref().and_then(|s| s.sort.clone()).expect("sort");
    let repair = s.repair.as_ref().expect("rows");
    assert!(repair.response_values(&s.weights, 0).iter().all(|&w| w > 0.0 && w <= 1.0));
    let mut bare = fixed_batch(&t);
    bare.problems = None;
    t.score(&mut bare).expect("scores");
    assert!(bare.scores.as_ref().and_then(|s| s.sort.clone()).expect("sort").groups.is_empty());
}

#[test]
fn reasonmaxxer_raises_positive_decision_tokens_lowers_negative_ones_and_anchors_the_rest() {
    let rm = "[rl]\nlr = 3e-3\n[rl.reasonmaxxer]\nbatch_size = 8\n[rl.reasonmaxxer.loss]\ngated_fraction = 0.5\n";
    let t = trainer(rm);
    let setup = t.config().rl.reasonmaxxer.clone().expect("set");
    let base = t.policy().clone();
    let mut batch = fixed_batch(&t);
    batch.problems = None;
    let data = ReasonMaxxerData::from_batch(&base, batch.clone(), t.config(), &setup).expect("offline set");
    // Group 0 [1, 0, 0, 1]: A = ±1; group 1 all wrong: A = 0 (its tokens go to the anchor only).
    assert_eq!(data.advantages, vec![1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    let generated = batch.response_mask().iter().filter(|&&m| m).count() as f64;
    let gated = data.decision.iter().filter(|&&d| d).count() as f64;
    // τ from the target fraction: at most ⌊0.5 n⌋ tokens strictly above it (fewer where duplicated rows tie).
    assert!(gated >= 1.0 && gated <= (0.5 * generated).floor(), "{gated} of {generated}");
    assert!(data.decision.iter().zip(batch.response_mask()).all(|(&d, &m)| !d || m), "only generated tokens");

    let decision = data.decision.clone();
    let mut t = t.with_reasonmaxxer_data(data);
    let before = token_stats_host(t.policy(), batch.ids(), batch.width(), 1.0, 8).expect("stats").1;
    let mut row = t.rl_step().expect("step");
    for _ in 0..4 {
        row = t.rl_step().expect("step");
    }
    let after = token_stats_host(t.policy(), batch.ids(), batch.width(), 1.0, 8).expect("stats").1;
    let w = batch.width();
    let mean_delta = |keep: &dyn Fn(usize) -> bool| {
        let picked: Vec<f64> = (0..after.len()).filter(|&i| keep(i)).map(|i| f64::from(after[i] - before[i])).collect();
        picked.iter().sum::<f64>() / picked.len().max(1) as f64
    };
    // A negative row's token that continues a prefix of a positive row is the same (context, token) pair: the two
    // advantages meet there. Compare the tokens only the negative rows have.
    let ids = batch.ids();
    let shared = |i: usize| [0, 3].iter().any(|&p| ids[p][..i % w + 2] == ids[i / w][..i % w + 2]);
    let positive = mean_delta(&|i| decision[i] && [0, 3].contains(&(i / w)));
    let negative = mean_delta(&|i| decision[i] && [1, 2].contains(&(i / w)) && !shared(i));
    assert!(positive > 0.05 && negative < -0.05, "positive {positive}, negative {negative}");
    assert!(row.get("reasonmaxxer/dlogp_plus").expect("logged") > 0.0);
    // (dlogp_minus averages the shared tokens too, which the positive rows outnumber here.)
    assert!(row.get("reasonmaxxer/dlogp_minus").expect("logged") < row.get("reasonmaxxer/dlogp_plus").expect("logged"));
    // The anchor holds the non-decision tokens of the zero-advantage group far closer than the trained ones move.
    let anchored = mean_delta(&|i| batch.response_mask()[i] && !decision[i] && i / w >= 4).abs();
    assert!(anchored < positive.min(-negative), "anchored {anchored}");
}

#[test]
fn reasonmaxxer_without_mixed_outcomes_says_so() {
    let mut t = trainer("[rl.reasonmaxxer]\nproblems = 3\nrollouts_per_problem = 2\n");
    let err = t.rl_step().expect_err("an untrained policy solves nothing");
    assert!(err.to_string().contains("both a correct and a wrong"), "{err}");
    assert!(config("[rl.reasonmaxxer]\ntrim_fraction = 0.0\n").check().is_err());
    assert!(config("[rl.reasonmaxxer]\n[rl.sort]\n").check().is_err());
}

#[test]
fn heal_mixes_selected_general_problems_and_adds_the_eda_reward() {
    let toml = "[rl.heal]\ngeneral = { kind = \"sum\" }\ntarget_problems = 4\ngeneral_pool = 8\ngeneral_keep = 4\n\
                selection_rollouts = 2\n[rl.heal.eda]\nmin_len = 2\n";
    let mut t = trainer(toml);
    assert!(t.rollout().is_err(), "the sets are built by prepare_rl");
    t.prepare_rl().expect("selects");
    let mut batch = t.rollout().expect("rolls out");
    let problems = batch.problems.clone().expect("problems");
    // prompts_per_step = 2, general_share = ½: one sum problem (its prompt ends with a comma list), one arithmetic.
    let general: Vec<bool> = problems.iter().map(|p| p.prompt.contains(',')).collect();
    assert_eq!(general, vec![true, false]);
    t.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    let (eda, rows_general) = s.heal.clone().expect("heal scores");
    let w = batch.width();
    let entropy: Vec<Vec<f32>> = (0..batch.len()).map(|r| batch.response_values(&s.old_entropy, r)).collect();
    let views: Vec<&[f32]> = entropy.iter().map(Vec::as_slice).collect();
    let cfg = t.config().rl.heal.clone().expect("set").eda;
    assert_eq!(eda, forkrl_advantage::eda_rewards(&views, &rows_general, &cfg).expect("library"));
    for r in 0..batch.len() {
        assert_eq!(s.rewards[r], batch.rewards[r] + eda[r], "row {r}");
        assert_eq!(rows_general[r], general[batch.group_of()[r]]);
    }
    assert!(eda.iter().any(|&e| e > 0.0), "some trajectory is paid for its entropy dynamics");
    assert!(w > 0);
    // Without HEAL's reward (eda_coef = 0) the advantages are the verifier's alone.
    let mut t0 = trainer(&toml.replace("min_len = 2", "min_len = 2\neda_coef = 0.0"));
    t0.prepare_rl().expect("selects");
    let mut b0 = t0.rollout().expect("rolls out");
    t0.score(&mut b0).expect("scores");
    let s0 = b0.scores.as_ref().expect("scored");
    assert_eq!(s0.rewards, b0.rewards);
    // A set emptied (a hand-edited checkpoint) draws from the other; both empty is a typed error, not a panic.
    let mut data = forkrl_trainer::rl::heal::HealData { general: Vec::new(), ..t.heal_data().expect("built").clone() };
    assert!(data.draw(4, 0.5, 7).iter().all(|p| !p.prompt.contains(',')));
    data.target.clear();
    assert!(data.draw(4, 0.5, 7).is_empty());
    assert!(config("[rl.heal]\ngeneral_share = 1.5\n").check().is_err());
    assert!(config("[rl.heal]\ngeneral_keep = 10\ngeneral_pool = 5\n").check().is_err());
}

#[test]
fn ugttt_adds_the_ensembles_disagreement_and_its_regulariser_spreads_the_adapters() {
    let mut t = trainer("[rl.ugttt]\nbeta = 0.5\n");
    let batch = scored(&mut t);
    let s = batch.scores.as_ref().expect("scored");
    let mi = s.epistemic.clone().expect("MI");
    let w = batch.width();
    for (i, &m) in batch.response_mask().iter().enumerate() {
        assert!(mi[i] >= 0.0 && f64::from(mi[i]) <= 4f64.ln() + 1e-6);
        let expected = if m { s.advantages[i / w] + 0.5 * mi[i] } else { 0.0 };
        assert!((s.token_advantages[i] - expected).abs() < 1e-6, "position {i}");
    }
    assert!(mi.iter().any(|&x| x > 1e-4), "randomly initialised members disagree");

    // The bonus in the reward instead: r + β Σ_t MI_t.
    let mut t = trainer("[rl.ugttt]\nbeta = 0.5\nbonus = \"reward\"\n");
    let batch = scored(&mut t);
    let s = batch.scores.as_ref().expect("scored");
    for r in 0..batch.len() {
        let bonus: f32 = batch.response_positions(r).map(|i| mi[i]).sum();
        assert!((s.rewards[r] - batch.rewards[r] - 0.5 * bonus).abs() < 1e-5, "row {r}");
    }

    // The diversity regulariser: with λ the adapters' nuclear norm grows faster than without.
    let norm_after = |lambda: f64| {
        let mut t = trainer(&format!("[rl]\nlr = 1e-2\n[rl.ugttt]\nlambda = {lambda}\n"));
        let mut last = 0.0;
        for _ in 0..3 {
            let mut b = fixed_batch(&t);
            t.score(&mut b).expect("scores");
            last = t.update(&b).expect("updates").adapter_nuclear_norm;
        }
        last
    };
    let (without, with) = (norm_after(0.0), norm_after(1.0));
    assert!(with > without, "{with} vs {without}");
    assert!(config("[rl.ugttt]\n[rl.token_weighting]\nkind = \"opefo\"\n").check().is_err());
    assert!(config("[rl.ugttt]\nbonus = \"reward\"\n[rl.token_weighting]\nkind = \"opefo\"\n").check().is_ok());
}

#[test]
fn ugttt_adapters_survive_a_checkpoint() {
    let mut t = trainer("[rl]\nlr = 1e-2\n[rl.ugttt]\n");
    let mut b = fixed_batch(&t);
    t.score(&mut b).expect("scores");
    t.update(&b).expect("updates");
    let dir = scratch("ugttt-resume");
    t.save(&dir).expect("saves");
    let mut resumed = Trainer::resume(&dir, &Backend::Cpu.device().expect("cpu")).expect("resumes");
    let (mut x, mut y) = (fixed_batch(&t), fixed_batch(&t));
    t.score(&mut x).expect("scores");
    resumed.score(&mut y).expect("scores");
    let mi = |b: &RolloutBatch| b.scores.as_ref().and_then(|s| s.epistemic.clone()).expect("MI");
    assert_eq!(mi(&x), mi(&y), "the updated adapters were saved and loaded");
}

#[test]
fn bad_literature_knobs_name_their_key() {
    let key = |toml: &str| match config(toml).check() {
        Err(TrainerError::InvalidConfig { key, .. }) => key,
        other => panic!("{toml}: {other:?}"),
    };
    assert_eq!(key("[rl.sort]\nweighting = { kind = \"geometric\", lambda = 2.0 }\n"), "rl.sort.weighting.lambda");
    assert_eq!(key("[rl.sort]\nbeta = -1.0\n"), "rl.sort.beta");
    assert_eq!(key("[rl.ugttt]\nmembers = 0\n"), "rl.ugttt.members");
    assert_eq!(key("[rl.reasonmaxxer.loss]\ngated_fraction = 0.0\n"), "rl.reasonmaxxer.loss.gated_fraction");
    assert_eq!(key("[rl.heal.eda]\ntop_fraction = 2.0\n"), "rl.heal.eda.top_fraction");
    assert_eq!(
        key("[rl.distillation]\nteacher = \"/x\"\n[rl.distillation.loss]\nkl_discount = 2.0\n"),
        "rl.distillation.loss.kl_discount"
    );
}

#[test]
fn reasonmaxxers_negative_floor_removes_the_push_on_improbable_negative_tokens() {
    let first_decision_loss = |floor: f64| {
        let t = trainer(&format!(
            "[rl.reasonmaxxer]\nbatch_size = 8\n[rl.reasonmaxxer.loss]\ngated_fraction = 0.5\nneg_prob_floor = {floor}\n"
        ));
        let setup = t.config().rl.reasonmaxxer.clone().expect("set");
        let mut batch = fixed_batch(&t);
        batch.problems = None;
        let data = ReasonMaxxerData::from_batch(t.policy(), batch, t.config(), &setup).expect("offline set");
        let mut t = t.with_reasonmaxxer_data(data);
        t.rl_step().expect("step").get("reasonmaxxer/decision_loss").expect("logged")
    };
    let (off, on) = (first_decision_loss(0.0), first_decision_loss(0.99));
    // An untrained policy gives every token probability < 0.99: the floor drops every negative term (Â · CE < 0).
    assert!(on > 0.0 && on > off, "with the floor {on}, without {off}");
}
