//! The stages of an RL step, one at a time, on a hand-built [`RolloutBatch`] and an untrained tiny policy (CPU
//! backend, milliseconds each): `score` (advantages, a caller's own reward, per-query balance, token weighting, the
//! reference policy), `update` (micro-batches with gradient accumulation give the whole mini-batch's update; HTPO's
//! token groups; stage order), and `rollout` (HORA and Mixed-CUTS allocation).

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use forkrl_advantage::RolloutView;
use forkrl_core::Backend;
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
    let v = t.vocab();
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
    let rollouts = rows
        .iter()
        .map(|(p, r, reward)| {
            let mut response = v.encode(r).expect("encodes");
            response.push(v.eos[0]);
            Rollout { prompt: v.encode(p).expect("encodes"), response, truncated: false, reward: *reward }
        })
        .collect();
    RolloutBatch::new(1, rollouts, vec![4, 4], v.pad).expect("valid batch")
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
    let mut whole = trainer("[rl]\nppo_epochs = 1\n");
    let mut micro = trainer("[rl]\nppo_epochs = 1\nppo_micro_batch_size = 3\n");
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
    // ρ = 0.2 of the batch's response tokens, rounded as the official code (int(n·ρ + 0.9999) or the library's rule).
    assert!((stats.forking_frac_selected - 0.2).abs() <= 1.0 / n + 1e-9, "{}", stats.forking_frac_selected);
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
