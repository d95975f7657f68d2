//! forkrl-advantage without a trainer: from the rewards and token entropies of one rollout batch to the 80/20
//! forking-token loss of verl's `vanilla` PPO-clip (clip-higher), on the CPU backend.
//!
//! ```text
//! cargo run -p forkrl-advantage --example advantage_only
//! ```
//!
//! Two prompts × three responses, responses of up to 5 tokens. The log-probs here are made up; in a trainer they come
//! from the policy (`forkrl_entropy::tensor::entropy_and_logprobs`), with a graph.

use burn::tensor::{Bool, Tensor, TensorData};
use forkrl_advantage::{
    AdvantageConfig, AggMode, ForkingDenominator, LossContext, PolicyInputs, PolicyLoss, PpoClipConfig, RolloutView,
    TokenWeighting, forking_loss_mask, group_advantages,
};
use forkrl_core::Backend;
use forkrl_entropy::{SelectionRule, top_entropy_mask};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Group advantages (GRPO: (r − mean) / std within each prompt's group).
    let (group_sizes, rewards) = ([3, 3], [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0]);
    let adv = group_advantages(&rewards, &group_sizes, &AdvantageConfig::default())?;
    println!("sequence advantages: {:?}", adv.advantages);

    // 2. Per-token advantages (EAPO: entropy-aware; `TokenWeighting::None` is plain GRPO).
    let (b, t) = (6, 5);
    let lengths = [5, 3, 4, 5, 2, 4];
    let mask: Vec<bool> = (0..b * t).map(|i| i % t < lengths[i / t]).collect();
    let entropy: Vec<f32> = (0..b * t).map(|i| ((i * 7919) % 13) as f32 / 10.0).collect();
    let view = RolloutView {
        width: t,
        response_mask: &mask,
        group_sizes: &group_sizes,
        advantages: &adv.advantages,
        entropy: Some(&entropy),
        log_prob: None,
        hidden: None,
    };
    let token_adv = TokenWeighting::Eapo(Default::default()).token_advantages(&view)?;

    // 3. The 80/20 mask: the top 20 % highest-entropy response tokens of the batch carry the policy gradient.
    let forking = top_entropy_mask(&entropy, &mask, 0.2, SelectionRule::TopK)?;
    let loss_mask = forking_loss_mask(&mask, &forking, t, ForkingDenominator::Selected)?;
    println!(
        "forking tokens: {} of {} (threshold {:?})",
        forking.num_selected, forking.num_candidates, forking.threshold
    );

    // 4. The policy loss on burn tensors (differentiable in a trainer), aggregated with verl's token-mean.
    let device = Backend::Cpu.device()?;
    let float = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [b, t]), &device);
    let old_log_prob: Vec<f32> = entropy.iter().map(|h| -0.5 - h).collect();
    let log_prob: Vec<f32> = old_log_prob.iter().enumerate().map(|(i, l)| l + 0.05 * ((i % 5) as f32 - 2.0)).collect();
    let inputs = PolicyInputs {
        log_prob: float(log_prob),
        old_log_prob: float(old_log_prob),
        advantages: float(token_adv),
        mask: Tensor::<2, Bool>::from_data(TensorData::new(loss_mask.loss_mask.clone(), [b, t]), &device),
    };
    let loss = PolicyLoss::Vanilla(PpoClipConfig::clip_higher());
    loss.validate()?;
    let out = loss.compute(&inputs, AggMode::TokenMean, &loss_mask.denominators, &LossContext::new(0, 0))?;
    let value: f32 = out.loss.into_scalar();
    println!(
        "actor/pg_loss {value:.5}, actor/pg_clipfrac {:.3}, actor/ppo_kl {:.5}",
        out.metrics.pg_clipfrac, out.metrics.ppo_kl
    );
    Ok(())
}
