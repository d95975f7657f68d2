//! The RL phase, one file per stage of a step (`docs/architecture.md`):
//!
//! - [`trainer`]: [`trainer::Trainer`] (holds the policy, the optimisers and the run's state; `rollout → score →
//!   update`) and [`trainer::train`], the loop over it;
//! - [`rollout`]: allocate (uniform, HORA after an in-step probe, DAPO dynamic sampling) → sample → verify;
//! - [`score`]: group advantages, the rollout and reference policies' log-probs and entropies, token weighting, the
//!   loss rows;
//! - [`update`]: PPO epochs × query-preserved mini-batches × micro-batches, the forking mask, the actor loss, the
//!   optimiser step;
//! - [`balance`]: the buffered global reward balance across steps;
//! - [`dump`]: rollout dumps (per-token entropy and log-prob of every response, every K steps);
//! - [`vps`]: GRPO-VPS's probe rollouts from mid-response prefixes;
//! - [`distill`]: on-policy distillation from a frozen teacher, with the rock-token bypass;
//! - [`sort`]: SORT's plan-guided repair of all-wrong groups;
//! - [`heal`]: HEAL's target / general problem sets and its entropy-dynamics-alignment reward;
//! - [`ugttt`]: UG-TTT's head-adapter ensemble, its epistemic bonus and diversity regulariser;
//! - [`reasonmaxxer`]: ReasonMaxxer's offline stage (base rollouts, entropy gate, contrastive loss + KL anchor) in
//!   place of RL;
//! - [`metrics`]: [`metrics::Observer`] and its events, the metrics rows (verl names), the run summary;
//! - [`state`]: what a checkpoint records, atomic checkpoint writes, and the run directory.

pub mod balance;
pub mod distill;
pub mod dump;
pub mod heal;
pub mod imax;
pub mod metrics;
pub mod reasonmaxxer;
pub mod rollout;
pub mod score;
pub mod sort;
pub mod state;
pub mod trainer;
pub mod ugttt;
pub mod update;
pub mod vps;
