//! The stages of an RL step, one at a time, on a hand-built [`RolloutBatch`] and an untrained tiny policy (CPU
//! backend, milliseconds each): `score` (advantages, a caller's own reward, per-query balance, token weighting, the
//! reference policy), `update` (micro-batches with gradient accumulation give the whole mini-batch's update; HTPO's
//! token groups; stage order), and `rollout` (HORA and Mixed-CUTS allocation).

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use forkrl_advantage::{AggMode, ForkingDenominator, RolloutView, aggregate_host_with_counts, forking_loss_mask};
use forkrl_core::Backend;
use forkrl_entropy::{SelectionRule, top_entropy_mask, top_k_count};
use forkrl_trainer::{
    TrainConfig, Trainer, TrainerError,
    batch::{Rollout, RolloutBatch},
};

/// A trainer with an untrained policy (no SFT) and the option `toml` set.
fn trainer(toml: &str) -> Trainer {
    let mut config: TrainConfig = toml::from_str(toml).expect("valid option");
    config.sft.steps = 0;
    config.rl.prompts_per_step = 4;
    config.eval.size = 4;
    Trainer::new(config.check().expect("valid"), &Backend::Cpu.device().expect("cpu")).expect("builds")
}

/// Two prompts × four responses of the arithmetic task's alphabet, rewards `[1, 0, 0, 1 | 0, 0, 0, 1]`.
fn fixed_batch(t: &Trainer) -> RolloutBatch {
    let rows = [
        ("12+34-5=", "41|41", 1.0),
        ("12+34-5=", "46|40", 0.0),
        ("12+34-5=", "4", 0.0),
        ("12+34-5=", "46|41", 1.0),
        ("7+8+9=", "15|24", 0.0),
        ("7+8+9=", "15|23", 0.0),
        ("7+8+9=", "16|25", 0.0),
        ("7+8+9=", "15|24|9", 1.0),
    ];
    common::batch_of(t, &rows, vec![4, 4])
}

fn params<M: Module>(m: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.extend(param.val().into_data().try_to_vec::<f32>().expect("f32"));
        }
    }
    let mut c = Collect(Vec::new());
    m.visit(&mut c);
    c.0
}

#[test]
fn score_computes_group_advantages_from_the_batch_rewards_and_a_caller_may_replace_them() {
    let mut t = trainer("");
    let mut batch = fixed_batch(&t);
    t.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    // GRPO on [1, 0, 0, 1]: mean 0.5, unbiased std 0.577 → ±0.866.
    assert!((s.advantages[0] - 0.866_025).abs() < 1e-4 && (s.advantages[1] + 0.866_025).abs() < 1e-4, "{s:?}");
    assert_eq!(s.frac_reward_zero_std, 0.0);
    assert_eq!(s.train_mask, batch.response_mask(), "no balancing: every response token trains");
    assert!(s.old_log_prob.iter().zip(batch.response_mask()).all(|(&lp, &m)| !m || lp < 0.0));
    // Token weighting `none`: the sequence advantage on every position of the row.
    let w = batch.width();
    assert!(s.token_advantages[..w].iter().all(|&a| a == s.advantages[0]));

    // A custom reward: every response of the second prompt right except one.
    batch.rewards = vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    t.score(&mut batch).expect("scores again");
    let s = batch.scores.as_ref().expect("scored");
    assert!(s.advantages[7] < 0.0 && s.advantages[4] > 0.0, "{:?}", s.advantages);
}

#[test]
fn per_query_balance_keeps_as_many_positive_as_non_positive_rows() {
    let mut t = trainer("[rl]\nbalance = \"per_query\"\n");
    let mut batch = fixed_batch(&t);
    t.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    let w = batch.width();
    let trained: Vec<bool> = (0..batch.len()).map(|r| s.train_mask[r * w..(r + 1) * w].iter().any(|&m| m)).collect();
    // Group 0: 2 positive (rows 0, 3), 2 negative → all kept. Group 1: 1 positive (row 7) → the first negative (4).
    assert_eq!(trained, [true, true, true, true, true, false, false, true]);
}

#[test]
fn token_weighting_in_score_equals_the_library_contract_on_the_same_view() {
    for kind in ["eapo", "opefo"] {
        let mut t = trainer(&format!("[rl.token_weighting]\nkind = \"{kind}\"\n"));
        let mut batch = fixed_batch(&t);
        t.score(&mut batch).expect("scores");
        let s = batch.scores.as_ref().expect("scored");
        let view = RolloutView {
            width: batch.width(),
            response_mask: batch.response_mask(),
            group_sizes: batch.group_sizes(),
            advantages: &s.advantages,
            entropy: Some(&s.old_entropy),
            log_prob: Some(&s.old_log_prob),
            hidden: None,
        };
        let expect = t.config().rl.token_weighting.token_advantages(&view).expect("valid");
        assert_eq!(s.token_advantages, expect, "{kind}");
        // It really reweights: some response token's advantage differs from its sequence's.
        let w = batch.width();
        let moved = (0..batch.len() * w)
            .filter(|&i| batch.response_mask()[i])
            .any(|i| (s.token_advantages[i] - s.advantages[i / w]).abs() > 1e-6);
        assert!(moved, "{kind}");
    }
    // SHEAR needs the hidden states, which score computes.
    let mut t = trainer("[rl.token_weighting]\nkind = \"shear\"\nwindow = 2\nstride = 1\n");
    let mut batch = fixed_batch(&t);
    t.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    let w = batch.width();
    assert!(
        (0..batch.len() * w)
            .filter(|&i| batch.response_mask()[i])
            .any(|i| s.token_advantages[i] != s.advantages[i / w])
    );
}

#[test]
fn micro_batches_with_gradient_accumulation_give_the_whole_mini_batch_update() {
    // The forking mask ranked over the mini-batch, so both select the same tokens (the official per-micro-batch scope
    // selects per micro-batch by design: its own test is below).
    let scope = "[rl.forking]\nscope = \"mini_batch\"\n";
    let mut whole = trainer(&format!("[rl]\nppo_epochs = 1\n{scope}"));
    let mut micro = trainer(&format!("[rl]\nppo_epochs = 1\nppo_micro_batch_size = 3\n{scope}"));
    assert_eq!(params(whole.policy()), params(micro.policy()), "same seed, same initial policy");
    let mut batch = fixed_batch(&whole);
    whole.score(&mut batch).expect("scores");
    let a = whole.update(&batch).expect("update");
    let b = micro.update(&batch).expect("update");
    for (name, x, y) in [
        ("pg_loss", a.pg_loss, b.pg_loss),
        ("grad_norm", a.grad_norm, b.grad_norm),
        ("pg_clipfrac", a.pg_clipfrac, b.pg_clipfrac),
        ("ppo_kl", a.ppo_kl, b.ppo_kl),
        ("forking_frac_selected", a.forking_frac_selected, b.forking_frac_selected),
    ] {
        assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{name}: whole {x}, micro-batches {y}");
    }
    assert!(a.grad_norm > 0.0);
    let (pa, pb) = (params(whole.policy()), params(micro.policy()));
    let max = pa.iter().zip(&pb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(max < 1e-5, "parameters after the update differ by {max}");
}

#[test]
fn the_forking_mask_selects_rho_of_the_tokens_and_htpo_all_of_them() {
    let mut t = trainer("");
    let mut batch = fixed_batch(&t);
    t.score(&mut batch).expect("scores");
    let stats = t.update(&batch).expect("update");
    let n = batch.response_mask().iter().filter(|&&m| m).count() as f64;
    // ρ = 0.2 of the batch's response tokens, counted as the official code: int(n·ρ + 0.9999).
    assert_eq!(stats.forking_frac_selected, top_k_count(n as usize, 0.2) as f64 / n, "{}", stats.forking_frac_selected);
    assert!(stats.forking_threshold.is_some());

    let mut h = trainer("[rl.policy_loss]\nloss_mode = \"htpo\"\n");
    let mut batch = fixed_batch(&h);
    h.score(&mut batch).expect("scores");
    let stats = h.update(&batch).expect("htpo update");
    assert_eq!(stats.forking_frac_selected, 1.0, "HTPO partitions by entropy itself");
    assert!(stats.pg_loss.is_finite() && stats.grad_norm > 0.0, "{stats:?}");
}

#[test]
fn the_kl_loss_uses_the_policy_as_rl_starts_and_stages_must_run_in_order() {
    let mut t =
        trainer("[rl]\nentropy_coeff = 0.001\n[rl.kl_loss]\nkl_loss_type = \"low_var_kl\"\nkl_loss_coef = 0.01\n");
    let batch = fixed_batch(&t);
    match t.update(&batch) {
        Err(TrainerError::Stage { stage: "update", .. }) => {}
        other => panic!("update before score: {other:?}"),
    }
    let mut batch = batch;
    t.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    assert_eq!(s.ref_log_prob.as_ref(), Some(&s.old_log_prob), "before any update the reference is the policy");
    let first = t.update(&batch).expect("update");
    // Two epochs: the second epoch's loss sees a policy that has left the reference.
    assert!(first.kl_loss > 0.0 && first.entropy > 0.0, "{first:?}");
}

#[test]
fn rollout_allocates_hora_and_mixed_cuts_budgets() {
    let t = trainer("[rl.hora]\nmin_per_prompt = 2\nsource = { kind = \"probe\", n0 = 2 }\n");
    let batch = t.rollout().expect("samples");
    assert_eq!(batch.len(), 4 * 8, "the budget stays prompts × group_size");
    assert!(batch.group_sizes().iter().all(|&n| n >= 2), "{:?}", batch.group_sizes());
    assert_eq!(batch.step, 1);

    let t = trainer("[rl.mixed_cuts]\ng_std = 4\ng_cuts = 4\n");
    let batch = t.rollout().expect("samples");
    assert_eq!(batch.group_sizes(), &[8, 8, 8, 8]);
    assert!(batch.rollouts().iter().all(|r| !r.response.is_empty()));
}

#[test]
fn dr_grpo_norm_mode_divides_the_sequence_sum_by_the_pinned_constant() {
    // On-policy (one epoch, one mini-batch) the two modes see the same tokens; only the constant C differs.
    let mut sum = trainer("[rl]\nppo_epochs = 1\nloss_agg_mode = \"seq-mean-token-sum\"\n");
    let mut norm =
        trainer("[rl]\nppo_epochs = 1\nloss_agg_mode = \"seq-mean-token-sum-norm\"\nloss_scale_factor = 9.0\n");
    let mut batch = fixed_batch(&sum);
    sum.score(&mut batch).expect("scores");
    let a = sum.update(&batch).expect("update");
    let b = norm.update(&batch).expect("Dr. GRPO's mode runs");
    assert!(a.pg_loss.abs() > 1e-4, "{a:?}");
    assert!(
        (b.pg_loss - a.pg_loss / 9.0).abs() <= 1e-6 * (1.0 + a.pg_loss.abs()),
        "{} vs {}",
        b.pg_loss,
        a.pg_loss / 9.0
    );
    assert!((b.grad_norm - a.grad_norm / 9.0).abs() <= 1e-4 * a.grad_norm, "{} vs {}", b.grad_norm, a.grad_norm);
}

/// Per-sequence response-token counts of the two groups of [`fixed_batch`] (rows 0..4 and 4..8).
fn group_counts(batch: &RolloutBatch) -> (usize, usize) {
    let w = batch.width();
    let count = |rows: std::ops::Range<usize>| {
        batch.response_mask()[rows.start * w..rows.end * w].iter().filter(|&&m| m).count()
    };
    (count(0..4), count(4..8))
}

#[test]
fn all_tokens_denominator_divides_each_sequence_by_its_response_length() {
    // One epoch, one mini-batch: the update's entropy is the rollout policy's, so the mask can be rebuilt here.
    let opts = "[rl]\nppo_epochs = 1\nloss_agg_mode = \"seq-mean-token-mean\"\n";
    let mut selected = trainer(opts);
    let mut all = trainer(&format!("{opts}[rl.forking]\ndenominator = \"all_tokens\"\n"));
    let mut batch = fixed_batch(&selected);
    selected.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    let (w, m) = (batch.width(), batch.response_mask());
    let forking = top_entropy_mask(&s.old_entropy, m, 0.2, SelectionRule::TopK).expect("valid");
    // On-policy PPO: the per-token loss is −Â.
    let loss: Vec<f32> = s.token_advantages.iter().map(|a| -a).collect();
    let expect = |d: ForkingDenominator| {
        let f = forking_loss_mask(m, &forking, w, d).expect("valid");
        aggregate_host_with_counts(&loss, &f.loss_mask, &f.count_mask, w, AggMode::SeqMeanTokenMean, &f.denominators)
            .expect("valid")
    };
    let a = selected.update(&batch).expect("update");
    let b = all.update(&batch).expect("update");
    assert!(
        (a.pg_loss - expect(ForkingDenominator::Selected)).abs() < 1e-5,
        "{} vs {}",
        a.pg_loss,
        expect(ForkingDenominator::Selected)
    );
    // Paper v1 / TRL: Σ_selected / |o_i| per sequence, every non-empty sequence counted.
    assert!(
        (b.pg_loss - expect(ForkingDenominator::AllTokens)).abs() < 1e-5,
        "{} vs {}",
        b.pg_loss,
        expect(ForkingDenominator::AllTokens)
    );
    assert!(
        (a.pg_loss - b.pg_loss).abs() > 1e-3,
        "the two denominators differ on this batch: {} {}",
        a.pg_loss,
        b.pg_loss
    );
}

#[test]
fn entropy_and_kl_cover_every_response_token_while_the_policy_gradient_is_masked() {
    let opts = "[rl]\nppo_epochs = 1\nentropy_coeff = 0.01\n";
    let mut top = trainer(opts);
    let mut every = trainer(&format!("{opts}[rl.forking]\nselect = \"all\"\n"));
    let mut batch = fixed_batch(&top);
    top.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    let m = batch.response_mask();
    let n = m.iter().filter(|&&x| x).count() as f64;
    let mean: f64 = s.old_entropy.iter().zip(m).filter(|(_, m)| **m).map(|(&h, _)| f64::from(h)).sum::<f64>() / n;
    let a = top.update(&batch).expect("update");
    let b = every.update(&batch).expect("update");
    // verl's actor/entropy: the update's entropy over the response tokens with token-mean, whatever the forking mask.
    assert!((a.entropy - mean).abs() < 1e-5, "top-20 %: {} vs the response mean {mean}", a.entropy);
    assert!((b.entropy - mean).abs() < 1e-5, "all tokens: {}", b.entropy);
    assert!(a.forking_frac_selected < 0.5 && b.forking_frac_selected == 1.0);
}

#[test]
fn bottom_and_random_arms_train_on_their_own_tokens() {
    let run = |opts: &str| {
        let mut t = trainer(&format!("[rl]\nppo_epochs = 1\n{opts}"));
        let mut batch = fixed_batch(&t);
        t.score(&mut batch).expect("scores");
        let n = batch.response_mask().iter().filter(|&&m| m).count();
        (t.update(&batch).expect("update"), n)
    };
    let (top, n) = run("");
    let (bottom, _) = run("[rl.forking]\nselect = \"bottom\"\n");
    let (random, _) = run("[rl.forking]\nselect = \"random\"\n");
    let (random_again, _) = run("[rl.forking]\nselect = \"random\"\n");
    let k = top_k_count(n, 0.2);
    assert_eq!(top.forking_frac_selected, k as f64 / n as f64);
    assert_eq!(bottom.forking_frac_selected, (n - k) as f64 / n as f64, "the other 1 − ρ");
    assert_eq!(random.forking_frac_selected, k as f64 / n as f64, "the top arm's token count");
    assert!(random.forking_threshold.is_none() && bottom.forking_threshold == top.forking_threshold);
    // Different tokens, different losses; the random arm is a pure function of the run seed and step.
    for (name, x) in [("bottom", bottom.pg_loss), ("random", random.pg_loss)] {
        assert!((x - top.pg_loss).abs() > 1e-6, "{name}: {x} vs top {}", top.pg_loss);
    }
    assert_eq!(random.pg_loss, random_again.pg_loss);
}

#[test]
fn forking_scope_micro_batch_ranks_each_micro_batch_as_the_official_code() {
    // ρ = 0.21 on groups of n₁ and n₂ tokens: per micro-batch k(n₁) + k(n₂) differs from the mini-batch's k(n₁ + n₂).
    let opts = "[rl]\nppo_epochs = 1\nppo_micro_batch_size = 4\n[rl.forking]\ntop_entropy_ratio = 0.21\n";
    let mut micro = trainer(opts);
    let mut mini = trainer(&format!("{opts}scope = \"mini_batch\"\n"));
    let mut batch = fixed_batch(&micro);
    micro.score(&mut batch).expect("scores");
    let (n1, n2) = group_counts(&batch);
    let (k_micro, k_mini) = (top_k_count(n1, 0.21) + top_k_count(n2, 0.21), top_k_count(n1 + n2, 0.21));
    assert_ne!(k_micro, k_mini, "the test needs counts that differ (n₁ = {n1}, n₂ = {n2})");
    let a = micro.update(&batch).expect("update");
    let b = mini.update(&batch).expect("update");
    let n = (n1 + n2) as f64;
    assert_eq!(a.forking_frac_selected, k_micro as f64 / n);
    assert_eq!(b.forking_frac_selected, k_mini as f64 / n);
}

#[test]
fn sequence_losses_use_every_token_by_default() {
    for mode in ["gspo", "geo_mean", "holder"] {
        let mut t = trainer(&format!("[rl]\nppo_epochs = 1\n[rl.policy_loss]\nloss_mode = \"{mode}\"\n"));
        let mut batch = fixed_batch(&t);
        t.score(&mut batch).expect("scores");
        let stats = t.update(&batch).expect("update");
        assert_eq!(stats.forking_frac_selected, 1.0, "{mode}: its paper uses every token");
    }
    // Asked for explicitly, the mask applies (and is reported).
    let mut t = trainer(
        "[rl]\nppo_epochs = 1\n[rl.policy_loss]\nloss_mode = \"gspo\"\n[rl.forking]\nselect = \"top\"\nmask_sequence_losses = true\n",
    );
    let mut batch = fixed_batch(&t);
    t.score(&mut batch).expect("scores");
    assert!(t.update(&batch).expect("update").forking_frac_selected < 0.5);
}

#[test]
fn weight_decay_shrinks_the_parameters_by_lr_times_decay() {
    // AdamW's decoupled decay: θ ← θ − lr·λ·θ − lr·adam(g). The difference of two runs that differ only in λ is
    // lr·λ·θ (the Adam part sees the same gradient).
    let opts = "[rl]\nppo_epochs = 1\nlr = 0.01\n";
    let mut plain = trainer(&format!("{opts}weight_decay = 0.0\n"));
    let mut decayed = trainer(&format!("{opts}weight_decay = 0.5\n"));
    let before = params(plain.policy());
    let mut batch = fixed_batch(&plain);
    plain.score(&mut batch).expect("scores");
    plain.update(&batch).expect("update");
    decayed.update(&batch).expect("update");
    let (a, b) = (params(plain.policy()), params(decayed.policy()));
    let worst = before
        .iter()
        .zip(a.iter().zip(&b))
        .map(|(&theta, (&x, &y))| ((x - y) - 0.01 * 0.5 * theta).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "decay differs from lr·λ·θ by up to {worst}");
    assert!(before.iter().zip(&a).zip(&b).any(|((t, x), y)| (x - y).abs() > 1e-4 && t.abs() > 0.0));
}

#[test]
fn sft_micro_batches_give_the_whole_batch_step() {
    // Three micro-batches of 3, 3 and 2 rows, each dividing by the batch's target count: the same loss and update.
    let mut whole = trainer("[sft]\nbatch_size = 8\n");
    let mut micro = trainer("[sft]\nbatch_size = 8\nmicro_batch_size = 3\n");
    let before = params(whole.policy());
    let (a, b) = (whole.sft_step().expect("step"), micro.sft_step().expect("step"));
    assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    let (x, y) = (params(whole.policy()), params(micro.policy()));
    let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "parameters differ by {worst}");
    assert!(before.iter().zip(&x).any(|(p, q)| (p - q).abs() > 1e-4), "the step moved the policy");
}

#[test]
fn gradient_checkpointing_gives_the_same_update() {
    // burn's balanced checkpointing recomputes memory-bound activations in the backward pass: same gradients, so the
    // same parameters after one update (up to rounding), and the device carries the strategy.
    let mut plain = trainer("[rl]\nppo_epochs = 1\n");
    let mut ckpt = trainer("[model]\ngradient_checkpointing = true\n[rl]\nppo_epochs = 1\n");
    assert_eq!(
        ckpt.policy().device().gradient_checkpointing_strategy(),
        Some(burn::tensor::GradientCheckpointingStrategy::Balanced)
    );
    let before = params(plain.policy());
    assert_eq!(before, params(ckpt.policy()), "same seed, same initial policy");
    let mut batch = fixed_batch(&plain);
    plain.score(&mut batch).expect("scores");
    plain.update(&batch).expect("update");
    ckpt.update(&batch).expect("update");
    let (a, b) = (params(plain.policy()), params(ckpt.policy()));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "checkpointed update differs by {worst}");
    assert!(before.iter().zip(&a).any(|(x, y)| (x - y).abs() > 1e-5), "the update moved the policy");
}

#[test]
fn bf16_mixed_precision_tracks_the_f32_update_keeps_f32_masters_and_sft_learns() {
    // The same update in bf16 (blocks' matmuls in bf16) and in f32, from the same policy on the same scored batch:
    // the parameters stay f32, the bf16 step differs (its matmuls do run in bf16) but points the same way.
    let mut plain = trainer("[rl]\nppo_epochs = 1\n");
    let mut bf16 = trainer("[model]\ndtype = \"bf16\"\n[rl]\nppo_epochs = 1\n");
    assert_eq!(bf16.policy().dtype(), forkrl_trainer::model::policy::ComputeDtype::Bf16);
    let before = params(plain.policy());
    assert_eq!(before, params(bf16.policy()), "same seed, same initial policy");
    let mut batch = fixed_batch(&plain);
    plain.score(&mut batch).expect("scores");
    let (a, b) = (plain.update(&batch).expect("update"), bf16.update(&batch).expect("update"));
    assert!((a.pg_loss - b.pg_loss).abs() < 0.02 * (1.0 + a.pg_loss.abs()), "{a:?} vs {b:?}");
    struct Dtypes(Vec<burn::tensor::DType>);
    impl ModuleVisitor for Dtypes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().dtype());
        }
    }
    let mut dtypes = Dtypes(Vec::new());
    bf16.policy().visit(&mut dtypes);
    assert!(dtypes.0.iter().all(|d| *d == burn::tensor::DType::F32), "master weights stay f32: {:?}", dtypes.0);
    let delta = |p: &[f32]| p.iter().zip(&before).map(|(x, y)| f64::from(x - y)).collect::<Vec<_>>();
    let (da, db) = (delta(&params(plain.policy())), delta(&params(bf16.policy())));
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    let cosine = dot(&da, &db) / (dot(&da, &da) * dot(&db, &db)).sqrt();
    assert!(cosine > 0.95, "bf16 and f32 updates point apart: cosine {cosine}");
    assert!(da.iter().zip(&db).any(|(x, y)| x != y), "bf16 gave the f32 update bit for bit");

    // Training in bf16: SFT's loss goes down.
    let mut config: TrainConfig = toml::from_str("[model]\ndtype = \"bf16\"\n").expect("valid option");
    config.sft.batch_size = 16;
    config.eval.size = 4;
    let mut sft = Trainer::new(config.check().expect("valid"), &Backend::Cpu.device().expect("cpu")).expect("builds");
    let first = sft.sft_step().expect("sft step");
    let last = (0..29).map(|_| sft.sft_step().expect("sft step")).last().expect("steps");
    assert!(last < 0.7 * first, "bf16 SFT loss {first} → {last}");
}

#[test]
fn overlong_shaping_moves_the_reward_and_filtering_drops_truncated_rows() {
    // L_max 9, L_cache 4: lengths ≤ 5 are free, 6 costs 0.25, 8 costs 0.75 (responses count their EOS).
    let mut t = trainer("[rl.overlong]\nmax_response_length = 9\nbuffer_length = 4\n");
    let mut batch = fixed_batch(&t);
    let truncated = batch.rollouts()[5].clone();
    let mut rollouts = batch.rollouts().to_vec();
    rollouts[5] = Rollout { truncated: true, ..truncated };
    batch = RolloutBatch::new(1, rollouts, vec![4, 4], t.vocab().pad).expect("valid batch");
    t.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    let lengths: Vec<usize> = batch.rollouts().iter().map(|r| r.response.len()).collect();
    for (i, &len) in lengths.iter().enumerate() {
        let penalty = if len <= 5 { 0.0 } else { (5.0 - len as f32) / 4.0 };
        assert!((s.rewards[i] - (batch.rewards[i] + penalty)).abs() < 1e-6, "row {i}: length {len}, {}", s.rewards[i]);
    }
    assert!(lengths.iter().any(|&l| l > 5), "{lengths:?}");
    let expect =
        forkrl_advantage::group_advantages(&s.rewards, batch.group_sizes(), &t.config().rl.advantage).expect("valid");
    assert_eq!(s.advantages, expect.advantages, "advantages come from the shaped reward");
    let w = batch.width();
    assert!(!s.train_mask[5 * w..6 * w].iter().any(|&m| m), "the truncated row leaves the loss");
    assert!(s.train_mask[4 * w..5 * w].iter().any(|&m| m));
}

#[test]
fn kl_in_the_reward_subtracts_beta_times_the_summed_kl_and_the_adaptive_controller_moves_beta() {
    let mut t = trainer(
        "[rl]\nlr = 0.01\n[rl.kl_in_reward]\nkl_ctrl = { type = \"adaptive\", kl_coef = 0.5, target_kl = 0.01, horizon = 16 }\n",
    );
    let mut batch = fixed_batch(&t);
    t.score(&mut batch).expect("scores");
    let s = batch.scores.as_ref().expect("scored");
    assert_eq!(s.reward_kl, Some((0.5, 0.0)), "before any update the reference is the policy: no KL");
    assert_eq!(s.rewards, batch.rewards);
    t.update(&batch).expect("update");
    // β after the first batch: kl = 0 → e = −0.2 clipped, β·(1 − 0.2·8/16) = 0.45.
    let mut again = fixed_batch(&t);
    t.score(&mut again).expect("scores again");
    let s = again.scores.as_ref().expect("scored");
    let (beta, current) = s.reward_kl.expect("on");
    assert!((beta - 0.45).abs() < 1e-12, "{beta}");
    let (w, m) = (again.width(), again.response_mask());
    let reference = s.ref_log_prob.as_ref().expect("kept");
    let mut means = Vec::new();
    for i in 0..again.len() {
        let kl: f64 = (i * w..(i + 1) * w)
            .filter(|&j| m[j])
            .map(|j| f64::from(s.old_log_prob[j]) - f64::from(reference[j]))
            .sum();
        let n = (i * w..(i + 1) * w).filter(|&j| m[j]).count() as f64;
        means.push(kl / n);
        let expect = f64::from(again.rewards[i]) - beta * kl;
        assert!((f64::from(s.rewards[i]) - expect).abs() < 1e-5, "row {i}: {} vs {expect}", s.rewards[i]);
    }
    assert!((current - means.iter().sum::<f64>() / means.len() as f64).abs() < 1e-9);
    assert!(current.abs() > 1e-6, "the policy moved away from the reference");
}

#[test]
fn rollout_dumps_hold_every_response_with_its_per_token_entropy_and_log_prob() {
    let dir = std::env::temp_dir().join(format!("forkrl-dumps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = trainer("[rl]\nrollout_dump_every = 2\nppo_epochs = 1\n").with_rollout_dumps(&dir);
    t.rl_step().expect("step 1");
    assert!(!dir.exists(), "step 1 is not a dump step");
    t.rl_step().expect("step 2");
    let text = std::fs::read_to_string(dir.join("step-000002.jsonl")).expect("written");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(lines.len(), 4 * 8);
    for l in &lines {
        let n = l["response_ids"].as_array().expect("ids").len();
        assert_eq!(l["entropy"].as_array().expect("entropy").len(), n, "{l}");
        assert_eq!(l["log_prob"].as_array().expect("log_prob").len(), n);
        assert!(l["log_prob"].as_array().expect("lp").iter().all(|v| v.as_f64() <= Some(0.0)));
        assert!(l["prompt"].as_str().expect("prompt").ends_with('='), "{l}");
        assert_eq!(l["step"], 2);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hora_history_records_each_prompt_once_per_step_and_allocates_from_it() {
    use forkrl_rollout::{BetaPosterior, hora_allocate};
    use forkrl_trainer::rl::rollout::prompt_id;
    let dir = std::env::temp_dir().join(format!("forkrl-hora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let data = dir.join("recurring.jsonl");
    std::fs::write(&data, "{\"question\": \"1+2=\", \"answer\": \"3\"}\n{\"question\": \"4+4=\", \"answer\": \"8\"}\n")
        .expect("write");
    let path = data.display().to_string();
    let mut t = trainer(&format!(
        "[task]\nkind = \"jsonl\"\npath = {path:?}\ntest_path = {path:?}\ntemplate = \"{{question}}\"\n\
         [rl]\ngroup_size = 4\n[rl.hora]\nsource = {{ kind = \"history\", decay = 1.0 }}\n"
    ));
    let mut batch = t.rollout().expect("samples");
    assert_eq!(batch.len(), 4 * 4, "the budget stays prompts × group_size");
    // A caller's rewards: the rows of the first prompt all right, the rest all wrong.
    let first = batch.group_sizes()[0];
    let id_first = prompt_id(&batch.rollouts()[0].prompt);
    batch.rewards = batch.rollouts().iter().map(|r| if prompt_id(&r.prompt) == id_first { 1.0 } else { 0.0 }).collect();
    t.score(&mut batch).expect("scores");
    t.score(&mut batch).expect("scoring twice records once");
    let store = t.prompt_history().expect("history on");
    // Every row of that prompt counted once (it may be drawn in several groups of the batch).
    let rows = batch.rollouts().iter().filter(|r| prompt_id(&r.prompt) == id_first).count();
    let s0 = store.get(id_first);
    assert_eq!((s0.successes, s0.failures, s0.last_seen), (rows as f64, 0.0, 1), "{s0:?}");
    assert!(rows >= first);
    assert_eq!(store.len(), 2, "both prompts of the recurring set were seen: {store:?}");
    // The next batch allocates from those counts, as the library does.
    let next = t.rollout().expect("samples again");
    let prompts: Vec<u64> = {
        let mut start = 0;
        next.group_sizes()
            .iter()
            .map(|&n| {
                let id = prompt_id(&next.rollouts()[start].prompt);
                start += n;
                id
            })
            .collect()
    };
    let posteriors: Vec<BetaPosterior> = prompts
        .iter()
        .map(|&id| {
            let s = store.get(id);
            BetaPosterior::from_counts(s.successes, s.failures, 1.0, 1.0).expect("valid")
        })
        .collect();
    let expect = hora_allocate(&posteriors, 16, 2, 16).expect("valid").counts;
    let expect: Vec<usize> = expect.into_iter().filter(|&c| c > 0).collect();
    assert_eq!(next.group_sizes(), expect.as_slice(), "{:?}", store);
    // The always-right prompt needs no more rollouts to be hit: the budget goes to the always-wrong one.
    let size_of = |right: bool| {
        prompts.iter().zip(next.group_sizes()).filter(|(id, _)| (**id == id_first) == right).map(|(_, &n)| n).max()
    };
    if let (Some(right), Some(wrong)) = (size_of(true), size_of(false)) {
        assert!(right < wrong, "groups of the solved prompt {right}, of the unsolved one {wrong}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn vps_probes_give_each_segment_its_belief_gain() {
    use forkrl_advantage::{VpsConfig, vps_advantages, vps_segments};
    // Every token a split candidate (z = −10), three segments, two probes per prefix.
    let mut t = trainer(
        "[rl]\nmax_response_len = 9\n[rl.vps]\nnum_segments = 3\nhigh_entropy_z = -10.0\nprobes_per_prefix = 2\nalpha = 0.5\n",
    );
    let mut batch = t.rollout().expect("samples (with the problems VPS verifies against)");
    // A caller's reward: every other row right, so C_K differs from the probes somewhere.
    batch.rewards = (0..batch.len()).map(|i| (i % 2) as f32).collect();
    t.score(&mut batch).expect("scores with probes");
    let s = batch.scores.as_ref().expect("scored");
    let probes = s.vps.as_ref().expect("VPS on");
    let (w, m) = (batch.width(), batch.response_mask());
    let cfg = VpsConfig { num_segments: 3, high_entropy_z: -10.0, alpha: 0.5 };
    let mut moved = false;
    for r in 0..batch.len() {
        let h: Vec<f32> = (r * w..(r + 1) * w).filter(|&i| m[i]).map(|i| s.old_entropy[i]).collect();
        assert_eq!(probes.segments[r], vps_segments(&h, &cfg).expect("valid"), "row {r}");
        let b = &probes.beliefs[r];
        assert_eq!(b.len(), probes.segments[r].last().map_or(0, |k| k + 1) + 1, "C_0..C_K");
        assert_eq!(*b.last().expect("C_K"), batch.rewards[r], "C_K is the response's own reward");
        assert!(b[..b.len() - 1].iter().all(|&c| c == 0.0 || c == 0.5 || c == 1.0), "shares of 2 probes: {b:?}");
        let expect = vps_advantages(s.advantages[r], &probes.segments[r], b, 0.5).expect("valid");
        let got: Vec<f32> = (r * w..(r + 1) * w).filter(|&i| m[i]).map(|i| s.token_advantages[i]).collect();
        assert_eq!(got, expect, "row {r}");
        moved |= got.iter().any(|&a| (a - s.advantages[r]).abs() > 1e-6);
    }
    assert!(moved, "the process term changes some token's advantage");
    // A hand-built batch has no problems to verify probes against: a typed error, not a panic.
    let mut hand = fixed_batch(&t);
    assert!(matches!(t.score(&mut hand), Err(TrainerError::Stage { stage: "score", .. })));
}

#[test]
fn the_buffered_balance_waits_then_updates_on_a_balanced_batch_of_the_scored_rows() {
    // B = 4 prompts × 8 = 32 rows; the fixed batch has 3 positive and 5 negative advantages: not fillable
    // (minority 3 < ⌈3/8 · 32⌉ = 12), so the buffer waits until its third step.
    let mut t = trainer("[rl]\nbalance = \"buffered\"\nppo_epochs = 1\n[rl.balance_buffer]\nmax_buffer_steps = 3\n");
    let mut batch = fixed_batch(&t);
    t.score(&mut batch).expect("scores");
    assert!(t.balanced_batch(&batch).expect("pushes").is_none());
    assert!(t.balanced_batch(&batch).expect("pushes").is_none());
    assert_eq!(t.buffer_counts(), Some((6, 10)));
    let (train, (minority, majority)) = t.balanced_batch(&batch).expect("pushes").expect("forced after 3 steps");
    // Minority (positives, 9) all taken (≤ ⌊5/8 · 32⌋ = 20), majority fills up to 32 (15 held).
    assert_eq!((minority, majority), (9, 15));
    assert_eq!(train.len(), 24);
    assert_eq!(train.group_sizes(), vec![1; 24].as_slice(), "each row its own group");
    assert_eq!(t.buffer_counts(), Some((0, 0)));
    // Every drawn row carries the per-token values it was scored with, at its own positions.
    let s = batch.scores.as_ref().expect("scored");
    let ts = train.scores.as_ref().expect("scored rows");
    let (w, tw) = (batch.width(), train.width());
    for r in 0..train.len() {
        let original = (0..batch.len()).find(|&i| batch.rollouts()[i] == train.rollouts()[r]).expect("a batch row");
        let pick = |v: &[f32], width: usize, mask: &[bool], row: usize| -> Vec<f32> {
            (row * width..(row + 1) * width).filter(|&i| mask[i]).map(|i| v[i]).collect()
        };
        assert_eq!(
            pick(&ts.old_log_prob, tw, train.response_mask(), r),
            pick(&s.old_log_prob, w, batch.response_mask(), original)
        );
        assert_eq!(ts.advantages[r], s.advantages[original]);
        assert_eq!(
            pick(&ts.token_advantages, tw, train.response_mask(), r),
            pick(&s.token_advantages, w, batch.response_mask(), original)
        );
    }
    let positives = ts.advantages.iter().filter(|&&a| a > 0.0).count();
    assert_eq!(positives, 9);
    let stats = t.update(&train).expect("updates on the drawn rows");
    assert!(stats.grad_norm > 0.0 && stats.minibatches == 1, "{stats:?}");
}
