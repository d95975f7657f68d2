//! The methods of `docs/methods.md`'s literature table in the trainer, each on a fixed batch and an untrained tiny
//! policy (CPU backend): on-policy distillation (both estimators, the rock-token bypass and its alignment, online rock
//! detection, the teacher checks), SORT's repair update, ReasonMaxxer's offline stage, HEAL, UG-TTT and IMAX.

mod common;

use std::path::PathBuf;

use forkrl_core::Backend;
use forkrl_entropy::{RockAlignment, RockConfig, detect_rock_tokens, rock_aligned_ids};
use forkrl_trainer::{
    TrainConfig, Trainer, TrainerError,
    batch::{Rollout, RolloutBatch},
    model::{checkpoint, token_stats_host},
    rl::{imax::PrefixIds, reasonmaxxer::ReasonMaxxerData},
    tasks::{Gold, Problem},
};

fn scratch(tag: &str) -> common::Scratch {
    common::Scratch::new(&format!("literature-{tag}"))
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

/// A teacher: the tiny policy of another seed, saved as a forkrl checkpoint in `<scratch>/teacher` (the scratch
/// folder lives as long as the returned guard).
fn teacher_dir(tag: &str, seed: u64) -> (common::Scratch, PathBuf) {
    let t = trainer(&format!("[run]\nseed = {seed}\n"));
    let scratch = scratch(tag);
    let dir = scratch.join("teacher");
    checkpoint::save_policy(t.policy(), t.policy_config(), &dir).expect("saves");
    (scratch, dir)
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
    let (_scratch, teacher) = teacher_dir("opd", 11);
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
    let same_scratch = scratch("opd-self");
    let same = same_scratch.join("teacher");
    checkpoint::save_policy(t.policy(), t.policy_config(), &same).expect("saves");
    let mut c = config(&format!("[rl.distillation]\nteacher = {:?}\n", same.display().to_string()));
    c.run.seed = t.config().run.seed;
    let mut t = Trainer::new(c.check().expect("valid"), &Backend::Cpu.device().expect("cpu")).expect("builds");
    assert!(mean_reverse_kl(&mut t, &batch) < 1e-5);
}

#[test]
fn the_rock_bypass_silences_the_predicted_or_the_next_position_and_online_detection_ranks_kl_mass() {
    let (_scratch, teacher) = teacher_dir("rock", 12);
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
    assert_eq!(key("[rl.imax]\nnum_prefixes = 2\nprefixes_per_prompt = 3\n"), "rl.imax.prefixes_per_prompt");
    assert_eq!(key("[rl.imax]\nprefix_lr = 0.0\n"), "rl.imax.prefix_lr");
    assert_eq!(key("[rl.imax]\n[rl.reasonmaxxer]\n"), "rl.imax");
    assert_eq!(
        key("[rl.distillation]\nteacher = \"/x\"\n[rl.distillation.loss]\nkl_discount = 2.0\n"),
        "rl.distillation.loss.kl_discount"
    );
}

/// ReasonMaxxer on the fixed batch as its offline set, with `loss` as the `[rl.reasonmaxxer.loss]` lines.
fn reasonmaxxer_on_fixed_batch(loss: &str, rl: &str) -> Trainer {
    let t = trainer(&format!(
        "[rl]\n{rl}[rl.reasonmaxxer]\nbatch_size = 8\n[rl.reasonmaxxer.loss]\ngated_fraction = 0.5\n{loss}"
    ));
    let setup = t.config().rl.reasonmaxxer.clone().expect("set");
    let mut batch = fixed_batch(&t);
    batch.problems = None;
    let data = ReasonMaxxerData::from_batch(t.policy(), batch, t.config(), &setup).expect("offline set");
    t.with_reasonmaxxer_data(data)
}

#[test]
fn reasonmaxxers_negative_floor_removes_the_push_on_improbable_negative_tokens() {
    let first_decision_loss = |floor: f64| {
        let mut t = reasonmaxxer_on_fixed_batch(&format!("neg_prob_floor = {floor}\n"), "");
        t.rl_step().expect("step").get("reasonmaxxer/decision_loss").expect("logged")
    };
    let (off, on) = (first_decision_loss(0.0), first_decision_loss(0.99));
    // An untrained policy gives every token probability < 0.99: the floor drops every negative term (Â · CE < 0).
    assert!(on > 0.0 && on > off, "with the floor {on}, without {off}");
}

#[test]
fn reasonmaxxers_delta_hinge_pays_each_token_up_to_its_margin() {
    // At the first step the policy is the base (Δ = 0 everywhere), so every decision token's hinge is
    // |c|·m: the decision loss is linear in the margin and 0 at margin 0 (then no decision token is pushed).
    let first = |m: f64| {
        let loss = format!("decision_objective = \"delta_hinge\"\nhinge_margin_pos = {m}\nhinge_margin_neg = {m}\n");
        let mut t = reasonmaxxer_on_fixed_batch(&loss, "");
        t.rl_step().expect("step").get("reasonmaxxer/decision_loss").expect("logged")
    };
    let (zero, one, two) = (first(0.0), first(1.0), first(2.0));
    assert!(one > 0.0, "{one}");
    assert!((two - 2.0 * one).abs() < 1e-4 * one, "{two} vs 2 × {one}");
    assert!(zero.abs() < 1e-4 * one, "{zero}");
    // adv_ce's surrogate on the same step is not a hinge: its value is Σ c·CE, not Σ |c|·m.
    let mut t = reasonmaxxer_on_fixed_batch("", "");
    let adv_ce = t.rl_step().expect("step").get("reasonmaxxer/decision_loss").expect("logged");
    assert!((adv_ce - one).abs() > 1e-3, "{adv_ce} vs {one}");
}

#[test]
fn reasonmaxxers_adaptive_betaneg_follows_the_positive_tokens_delta() {
    let mut t = reasonmaxxer_on_fixed_batch("adaptive_betaneg = true\nadaptive_betaneg_ema = 0.5\n", "lr = 1e-2\n");
    let config = t.config().rl.reasonmaxxer.clone().expect("set").loss;
    let mut replay = forkrl_advantage::AdaptiveBetaNeg::new(&config);
    let mut seen = Vec::new();
    for _ in 0..8 {
        let row = t.rl_step().expect("step");
        let beta = row.get("reasonmaxxer/beta_neg").expect("logged");
        assert!((beta - f64::from(replay.beta_neg)).abs() < 1e-6, "the step used the controller's β_neg");
        replay.update(row.get("reasonmaxxer/dlogp_plus").expect("logged"));
        seen.push(beta);
    }
    assert_eq!(seen[0], 1.0, "it starts at the configured β_neg");
    assert!(seen.iter().any(|&b| b < 1.0), "a falling Δ⁺ shrinks β_neg: {seen:?}");
}

/// The fixed batch with soft prefix 0 before the first prompt's rows and prefix 1 before the second's (the trainer's
/// prefixes made by `prepare_rl`).
fn prefixed_batch(t: &mut Trainer) -> (RolloutBatch, PrefixIds) {
    t.prepare_rl().expect("makes the prefixes");
    let ids = PrefixIds::new(t.policy(), t.config().rl.imax.as_ref().expect("imax on"));
    let plain = fixed_batch(t);
    let rollouts = plain
        .rollouts()
        .iter()
        .enumerate()
        .map(|(i, r)| Rollout { prompt: ids.prefixed(&r.prompt, i / 4), ..r.clone() })
        .collect();
    let mut batch = RolloutBatch::new(1, rollouts, vec![4, 4], t.vocab().pad).expect("valid batch");
    batch.problems = plain.problems;
    (batch, ids)
}

#[test]
fn imax_adds_the_infomax_reward_of_the_prefixes_likelihoods() {
    let mut t = trainer("[rl.imax]\nnum_prefixes = 3\nprefix_len = 2\nlambda = 0.5\nprefix_init = \"vocab\"\n");
    let (batch, ids) = prefixed_batch(&mut t);
    assert_eq!(t.policy().input_ids(), t.policy().vocab_size() + 6, "K·L_p prefix rows");
    let mut scored = batch.clone();
    t.score(&mut scored).expect("scores");
    let s = scored.scores.as_ref().expect("scored");
    let info = s.info.as_ref().expect("info rewards");
    // By hand: ℓ_j = mean response log-prob with prefix j in place, r_info = ℓ_k − logsumexp_j ℓ_j + ln K.
    let w = batch.width();
    let loglik: Vec<Vec<f64>> = (0..3)
        .map(|j| {
            let seqs: Vec<Vec<u32>> = batch.ids().iter().map(|seq| ids.prefixed(&seq[2..], j)).collect();
            let lp = token_stats_host(t.policy(), &seqs, w, 1.0, 8).expect("stats").1;
            (0..batch.len())
                .map(|r| {
                    let v = batch.response_values(&lp, r);
                    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
                })
                .collect()
        })
        .collect();
    for row in 0..batch.len() {
        let k = row / 4;
        let m = (0..3).map(|j| loglik[j][row]).fold(f64::NEG_INFINITY, f64::max);
        let lse = m + (0..3).map(|j| (loglik[j][row] - m).exp()).sum::<f64>().ln();
        let expected = loglik[k][row] - lse + 3f64.ln();
        assert!((f64::from(info[row]) - expected).abs() < 1e-4, "row {row}: {} vs {expected}", info[row]);
        assert!(f64::from(info[row]) <= 3f64.ln() + 1e-6);
        let shaped = f64::from(s.rewards[row] - batch.rewards[row]);
        assert!((shaped - 0.5 * f64::from(info[row])).abs() < 1e-5, "row {row}: r + λ r_info");
    }
    assert!(info.iter().any(|&x| x.abs() > 1e-4), "different prefixes give different likelihoods");

    // Zero prefixes (the default) are all equal: r_info = 0 until they differ.
    let mut t = trainer("[rl.imax]\nnum_prefixes = 3\nprefix_len = 2\nlambda = 0.5\n");
    let (batch, _) = prefixed_batch(&mut t);
    let mut scored = batch.clone();
    t.score(&mut scored).expect("scores");
    let info = scored.scores.as_ref().and_then(|s| s.info.clone()).expect("info");
    assert!(info.iter().all(|x| x.abs() < 1e-6), "{info:?}");

    // The correctness gate pays r_info only to rewarded rows.
    let mut t = trainer(
        "[rl.imax]\nnum_prefixes = 3\nprefix_len = 2\nlambda = 0.5\ngate_by_correctness = true\nprefix_init = \"vocab\"\n",
    );
    let (batch, _) = prefixed_batch(&mut t);
    let mut scored = batch.clone();
    t.score(&mut scored).expect("scores");
    let s = scored.scores.as_ref().expect("scored");
    for row in 0..batch.len() {
        let bonus = s.rewards[row] - batch.rewards[row];
        assert!(batch.rewards[row] > 0.0 || bonus == 0.0, "row {row}");
    }
}

#[test]
fn imax_moves_the_prefixes_along_the_infomax_advantage_and_can_freeze_the_backbone() {
    let frozen = "[rl.imax]\nnum_prefixes = 2\nprefix_len = 2\nlambda = 1.0\nprefix_lr = 0.01\nfreeze_backbone = true\nprefix_init = \"vocab\"\n";
    let mut t = trainer(frozen);
    let (batch, _) = prefixed_batch(&mut t);
    let plain = fixed_batch(&t);
    let backbone = |t: &Trainer| token_stats_host(t.policy(), plain.ids(), plain.width(), 1.0, 8).expect("stats").1;
    let table = |t: &Trainer| {
        let p = t.policy().prefixes().expect("carried");
        p.table.val().into_data().try_to_vec::<f32>().expect("f32")
    };
    let (before_backbone, before_table) = (backbone(&t), table(&t));
    let mut b = batch.clone();
    t.score(&mut b).expect("scores");
    let s = b.scores.as_ref().expect("scored");
    // The second group's verifier rewards are all 0: only r_info gives it advantages, ordered as r_info.
    let info = s.info.as_ref().expect("info");
    let second: Vec<usize> = (4..8).collect();
    assert!(second.iter().any(|&r| s.advantages[r].abs() > 1e-3), "{:?}", &s.advantages[4..]);
    for &i in &second {
        for &j in &second {
            if info[i] > info[j] + 1e-6 {
                assert!(s.advantages[i] > s.advantages[j], "rows {i}, {j}");
            }
        }
    }
    let (advantages, old) = (s.advantages.clone(), s.old_log_prob.clone());
    let stats = t.update(&b).expect("updates");
    assert!(stats.prefix_grad_norm.is_finite() && stats.prefix_grad_norm > 0.0);
    assert_eq!(backbone(&t), before_backbone, "a frozen backbone does not move");
    assert_ne!(table(&t), before_table, "the prefixes learn");
    // The prefixes alone raise the surrogate Σ_i A_i Σ_t Δ log π(y_t | x, z_k) of the r_info-only group.
    let new = token_stats_host(t.policy(), batch.ids(), batch.width(), 1.0, 8).expect("stats").1;
    let surrogate: f64 = second
        .iter()
        .map(|&r| {
            let delta: f64 = batch.response_positions(r).map(|i| f64::from(new[i] - old[i])).sum();
            f64::from(advantages[r]) * delta
        })
        .sum();
    assert!(surrogate > 0.0, "{surrogate}");

    // λ = 0: the second group has no signal at all.
    let mut t = trainer("[rl.imax]\nnum_prefixes = 2\nprefix_len = 2\nlambda = 0.0\n");
    let (batch, _) = prefixed_batch(&mut t);
    let mut b = batch.clone();
    t.score(&mut b).expect("scores");
    assert!(b.scores.as_ref().expect("scored").advantages[4..].iter().all(|&a| a == 0.0));

    // Without the freeze the backbone learns too.
    let mut t = trainer("[rl.imax]\nnum_prefixes = 2\nprefix_len = 2\n[rl]\nlr = 1e-3\n");
    let (batch, _) = prefixed_batch(&mut t);
    let before = backbone(&t);
    let mut b = batch.clone();
    t.score(&mut b).expect("scores");
    t.update(&b).expect("updates");
    assert_ne!(backbone(&t), before);
}

#[test]
fn imax_rollouts_put_one_prefix_per_group_and_the_prefixes_survive_a_checkpoint() {
    let mut t = trainer("[rl.imax]\nnum_prefixes = 4\nprefix_len = 2\nprefixes_per_prompt = 2\n");
    t.prepare_rl().expect("prefixes");
    let ids = PrefixIds::new(t.policy(), t.config().rl.imax.as_ref().expect("on"));
    let batch = t.rollout().expect("rolls out");
    let sizes = batch.group_sizes().to_vec();
    assert_eq!(sizes.len(), 2 * 2, "prompts_per_step × prefixes_per_prompt groups");
    let mut start = 0;
    let mut per_group = Vec::new();
    for &n in &sizes {
        let rows = &batch.rollouts()[start..start + n];
        let k = ids.prefix_of(&rows[0].prompt).expect("prefixed");
        assert!(rows.iter().all(|r| r.prompt == rows[0].prompt), "a group is one (prompt, prefix) pair");
        per_group.push(k);
        start += n;
    }
    assert_ne!(per_group[0], per_group[1], "one prompt's two groups have distinct prefixes");

    let dir = scratch("imax-ckpt");
    let saved = t.save(&dir).expect("saves");
    assert!(saved.join("prefixes.bpk").is_file() && saved.join("prefixes_optimizer.bpk").is_file());
    let resumed = Trainer::resume(&dir, &Backend::Cpu.device().expect("cpu")).expect("resumes");
    let table = |t: &Trainer| t.policy().prefixes().expect("carried").table.val().into_data().try_to_vec::<f32>();
    assert_eq!(table(&resumed).expect("f32"), table(&t).expect("f32"));
}
