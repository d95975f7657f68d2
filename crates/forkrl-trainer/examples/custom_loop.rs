//! Driving the trainer by hand and changing one stage: SFT, then RL steps whose reward is our own (the task's
//! verifier, minus a penalty for long responses), on the built-in tiny policy and the CPU backend.
//!
//! ```text
//! cargo run -p forkrl-trainer --example custom_loop
//! ```
//!
//! `Trainer::rl_step()` is exactly `rollout → score → update`; here the batch is changed between `rollout` and
//! `score`. Any stage can be replaced the same way: build or edit a `RolloutBatch`, then hand it on.

use forkrl_core::Backend;
use forkrl_trainer::{TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // What the `forkrl-train` binary does first: glibc keeps freed tensors for the next step (a no-op elsewhere).
    let _ = forkrl_core::allocator::retain_freed_memory();
    let mut config = TrainConfig::default();
    config.sft.steps = 100;
    config.rl.steps = 3;
    config.rl.prompts_per_step = 4;
    config.eval.size = 50;
    let mut trainer = Trainer::new(config.check()?, &Backend::Cpu.device()?)?;

    for _ in 0..trainer.config().sft.steps {
        trainer.sft_step()?;
    }
    let (accuracy, _) = trainer.finish_sft()?;
    println!("after SFT: held-out greedy accuracy {accuracy:.3}");

    for _ in 0..trainer.config().rl.steps {
        let mut batch = trainer.rollout()?;
        // Our reward: the verifier's, minus 0.05 per response token beyond 6.
        let shaped: Vec<f32> =
            batch.rollouts().iter().map(|r| r.reward - 0.05 * r.response.len().saturating_sub(6) as f32).collect();
        batch.rewards = shaped;
        trainer.score(&mut batch)?;
        let stats = trainer.update(&batch)?;
        let mean_reward = batch.rewards.iter().sum::<f32>() / batch.len() as f32;
        println!(
            "RL step {}: shaped reward {mean_reward:.3}, actor/pg_loss {:.4}, actor/grad_norm {:.3}, forking/frac_selected {:.2}",
            batch.step, stats.pg_loss, stats.grad_norm, stats.forking_frac_selected
        );
    }
    println!("after RL: held-out greedy accuracy {:.3}", trainer.evaluate()?);
    Ok(())
}
