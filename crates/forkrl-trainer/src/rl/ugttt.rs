//! UG-TTT in the trainer (`[rl.ugttt]`; the library side is `forkrl_advantage::ugttt` and
//! `forkrl_entropy::epistemic`, spec `../shared/methods/exploration-extras.md` §3; the formulas are a RECONSTRUCTION).
//!
//! - **Ensemble**: `M` low-rank adapters on the LM head, `ΔW_m = B_m A_m` (`A_m: [r, d]`, `B_m: [V, r]`). Member `m`
//!   predicts `softmax(h (W + ΔW_m)ᵀ / T)` from the policy's last hidden states `h` and head `W`. The policy samples
//!   as before; the adapters only measure disagreement. Initialisation (forkrl's choice, RECONSTRUCTION): `A ~ N(0, 1/d)`,
//!   `B ~ N(0, 0.02²)`, each member from its own seed, so the members disagree from the start (LoRA's `B = 0` would
//!   make them identical and the bonus 0).
//! - **Score**: `MI_t` of every response position (the rollout policy's hidden states, no graph), then
//!   `Ã_t = A + β MI_t` on the response tokens (or `r + β Σ_t MI_t` before the advantages).
//! - **Adapter update** (after the policy's, once per step, with their own AdamW at `rl.lr`): each member's REINFORCE
//!   loss `−Σ_t Ã_t log p_m(y_t) / (M · #tokens)` on the batch (the policy's hidden states and head as constants), plus
//!   the diversity term `−λ ‖[vec ΔW_1; …; vec ΔW_M]‖_*`, differentiated through its exact gradient `U Vᵀ`
//!   (`forkrl_advantage::nuclear_norm_grad`: the surrogate `−λ ⟨sg(U Vᵀ), X⟩` has the same gradient).
//! - The adapters and their optimizer are saved in each checkpoint (`adapters.bpk`, `adapters_optimizer.bpk`).
//!
//! Cost: `M` extra `[rows, W, V]` logits per scoring chunk: meant for the built-in tasks' small vocabularies.

use burn::{
    module::{Module, Param},
    tensor::{Device, Int, Tensor, TensorData, activation::log_softmax},
};
use forkrl_advantage::{UgTttConfig, nuclear_norm_grad};
use forkrl_core::{SeedStream, derive_seed};
use forkrl_entropy::epistemic_mutual_information;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    Result,
    batch::RolloutBatch,
    host_f32,
    model::{ids_tensor, policy::Policy},
};

/// One low-rank update `ΔW = B A` of the head.
#[derive(Module, Debug)]
pub struct LowRank {
    /// `[r, d]`.
    pub a: Param<Tensor<2>>,
    /// `[V, r]`.
    pub b: Param<Tensor<2>>,
}

/// The ensemble of head adapters.
#[derive(Module, Debug)]
pub struct Adapters {
    /// The members.
    pub members: Vec<LowRank>,
}

/// A `[rows, cols]` tensor of `N(0, std²)` draws from `seed` (Box–Muller on a host RNG: independent of burn's global
/// generator).
fn normal(rows: usize, cols: usize, std: f64, seed: u64, device: &Device) -> Tensor<2> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

impl Adapters {
    /// `config.members` adapters of rank `config.rank` for a head `[vocab, dim]`, seeded by `seed`.
    pub fn new(config: &UgTttConfig, vocab: usize, dim: usize, seed: u64, device: &Device) -> Self {
        let members = (0..config.members)
            .map(|m| {
                let s = |k: u64| derive_seed(seed, SeedStream::Control, &[0x5547_5454, m as u64, k]);
                LowRank {
                    a: Param::from_tensor(normal(config.rank, dim, 1.0 / (dim as f64).sqrt(), s(0), device)),
                    b: Param::from_tensor(normal(vocab, config.rank, 0.02, s(1), device)),
                }
            })
            .collect();
        Self { members }
    }

    /// Member `m`'s logits `[n, V]` from hidden states `[n, d]` and the head `[V, d]` (constants).
    fn logits(&self, m: usize, hidden: Tensor<2>, head: Tensor<2>) -> Tensor<2> {
        let lr = &self.members[m];
        let base = hidden.clone().matmul(head.transpose());
        base.add(hidden.matmul(lr.a.val().transpose()).matmul(lr.b.val().transpose()))
    }

    /// `[M, V·d]`: the flattened updates `B_m A_m`.
    fn stacked(&self) -> Tensor<2> {
        let rows: Vec<Tensor<2>> = self
            .members
            .iter()
            .map(|lr| {
                let w = lr.b.val().matmul(lr.a.val());
                let [v, d] = w.dims();
                w.reshape([1, v * d])
            })
            .collect();
        Tensor::cat(rows, 0)
    }
}

/// The policy's last hidden states `[n·W, d]` of `rows`' first `W` tokens and its head, without a graph (on the
/// policy's inner device).
fn hidden_and_head(policy: &Policy, rows: &[Vec<u32>], w: usize) -> Result<(Tensor<2>, Tensor<2>)> {
    let valid = policy.valid();
    let h = valid.hidden_states(ids_tensor(rows, &valid.device()).narrow(1, 0, w))?;
    let [n, _, d] = h.dims();
    Ok((h.reshape([n * w, d]), valid.head_weight()))
}

/// `t` as a constant on `device` (the adapters' autodiff device).
fn constant_on(t: Tensor<2>, device: &Device) -> Result<Tensor<2>> {
    let dims = t.dims();
    Ok(Tensor::from_data(TensorData::new(host_f32(t)?, dims), device))
}

/// `MI_t` `[B, W]` of every position of `batch` at `temperature`, `micro` rows at a time.
///
/// # Errors
/// Forward and library errors.
pub fn mutual_information(
    policy: &Policy,
    adapters: &Adapters,
    batch: &RolloutBatch,
    temperature: f32,
    micro: usize,
) -> Result<Vec<f32>> {
    let (w, members) = (batch.width(), adapters.members.len());
    let valid = adapters.valid();
    let mut out = Vec::with_capacity(batch.len() * w);
    for rows in batch.ids().chunks(micro.max(1)) {
        let (hidden, head) = hidden_and_head(policy, rows, w)?;
        let mut logits = Vec::new();
        for m in 0..members {
            logits.extend(host_f32(valid.logits(m, hidden.clone(), head.clone()))?);
        }
        let vocab = head.dims()[0];
        out.extend(epistemic_mutual_information(&logits, members, vocab, temperature)?);
    }
    Ok(out)
}

/// The adapters' loss on `batch` with token advantages `advantages` (`[B, W]`, 0 off the loss tokens) and
/// `mask` (`[B, W]`): the members' REINFORCE term plus the diversity surrogate; returns it with `‖X‖_*`.
///
/// # Errors
/// Forward and library errors.
pub fn adapter_loss(
    policy: &Policy,
    adapters: &Adapters,
    batch: &RolloutBatch,
    (advantages, mask): (&[f32], &[bool]),
    (temperature, lambda): (f32, f32),
    device: &Device,
) -> Result<(Tensor<1>, f64)> {
    let (w, n) = (batch.width(), batch.len());
    let members = adapters.members.len();
    let (hidden, head) = hidden_and_head(policy, batch.ids(), w)?;
    let (hidden, head) = (constant_on(hidden, device)?, constant_on(head, device)?);
    // Soft-prefix ids (IMAX) are never predicted: their prompt positions (outside the loss) read the last real token.
    let last = head.dims()[0] as i64 - 1;
    let targets: Vec<i64> = batch.ids().iter().flat_map(|r| r[1..=w].iter().map(|&t| i64::from(t).min(last))).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n * w, 1]), device);
    let tokens = mask.iter().filter(|&&m| m).count().max(1) as f32;
    let coef: Vec<f32> =
        advantages.iter().zip(mask).map(|(&a, &m)| if m { -a / (tokens * members as f32) } else { 0.0 }).collect();
    let coef = Tensor::<2>::from_data(TensorData::new(coef, [n * w, 1]), device);
    let mut loss: Option<Tensor<1>> = None;
    for m in 0..members {
        let lp = log_softmax(adapters.logits(m, hidden.clone(), head.clone()).div_scalar(temperature), 1);
        let term = lp.gather(1, targets.clone()).mul(coef.clone()).sum();
        loss = Some(match loss {
            Some(l) => l.add(term),
            None => term,
        });
    }
    let stacked = adapters.stacked();
    let [rows, cols] = stacked.dims();
    let (norm, grad) = nuclear_norm_grad(&host_f32(stacked.clone().detach())?, rows, cols)?;
    let grad = Tensor::<2>::from_data(TensorData::new(grad, [rows, cols]), device);
    let diversity = stacked.mul(grad).sum().mul_scalar(-lambda);
    let loss = match loss {
        Some(l) => l.add(diversity),
        None => diversity,
    };
    Ok((loss, norm))
}
