//! Update: `ppo_epochs` passes over query-preserved mini-batches of the scored batch, each split into micro-batches
//! whose gradients are accumulated before one optimiser step (verl's `ppo_mini_batch_size` /
//! `ppo_micro_batch_size_per_gpu`).
//!
//! Per mini-batch: the current policy's entropy of its response tokens (from the training forward itself when the
//! mini-batch is one micro-batch, else from a forward without a graph) → the forking arm's token mask
//! (`forkrl_entropy::TokenSelection`: top-ρ, bottom-(1 − ρ), random-ρ or all; ranked per micro-batch as the official
//! code, or over the mini-batch) and its denominators (`forkrl_advantage::forking_loss_mask`) → HTPO's token groups when
//! the loss is HTPO → per micro-batch: the training forward at the rollout temperature and the actor loss
//! (`forkrl_advantage::actor_loss`: policy loss − entropy bonus + KL loss), each divided by the mini-batch's global
//! denominators, so the accumulated gradient is the mini-batch's. The forking mask restricts the policy-gradient term
//! only; the entropy bonus and the KL loss (and the logged `actor/entropy`) cover every response token of the loss rows,
//! as in the official 80/20 code. Two terms are added per mini-batch, each with its own backward pass into the same
//! accumulated gradient: on-policy distillation's full-vocabulary reverse KL ([`crate::rl::distill`]) and SORT's
//! repair loss ([`crate::rl::sort`]). The optimiser step itself is the [`Trainer`](crate::Trainer)'s (it owns the
//! policy).

use burn::{
    optim::{GradientsAccumulator, GradientsParams},
    tensor::{Bool, Device, Tensor, TensorData},
};
use forkrl_advantage::{
    ActorLoss, ActorLossConfig, DistillEstimator, ForkingLossMask, GlobalDenominators, HtpoTokenGroups, LossContext,
    PolicyInputs, PolicyLoss, actor_loss, forking_loss_mask, htpo_token_groups, query_preserved_minibatches,
};
use forkrl_core::{ResponseRows, SeedStream, derive_seed};
use forkrl_entropy::ForkingMask;

use crate::{
    Result, TrainerError,
    batch::{RolloutBatch, Scores, gather_rows},
    config::{CheckedConfig, ForkingScope},
    host_f32,
    model::{policy::Policy, token_stats, token_stats_host},
    rl::distill,
};

/// verl's actor metrics of one update (means over the mini-batches of the last PPO epoch) and what the forking mask
/// selected in the last mini-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// `actor/pg_loss`.
    pub pg_loss: f64,
    /// `actor/entropy`, verl's meaning: the current policy's entropy in the update (last epoch), aggregated over the
    /// response tokens of the loss rows with `loss_agg_mode`.
    pub entropy: f64,
    /// `actor/pg_clipfrac` (token-weighted over the micro-batches).
    pub pg_clipfrac: f64,
    /// `actor/pg_clipfrac_lower`.
    pub pg_clipfrac_lower: f64,
    /// `actor/ppo_kl`.
    pub ppo_kl: f64,
    /// `actor/kl_loss` (0 when off).
    pub kl_loss: f64,
    /// `actor/grad_norm`: the global L2 norm of the accumulated gradient, before clipping.
    pub grad_norm: f64,
    /// `actor/lr`.
    pub lr: f64,
    /// `forking/threshold`: the entropy of the last selected token (`None`: nothing selected).
    pub forking_threshold: Option<f32>,
    /// `forking/frac_selected`.
    pub forking_frac_selected: f64,
    /// Mini-batches that entered the means.
    pub minibatches: usize,
    /// `distill/loss`: the full-vocabulary distillation term (NaN when off).
    pub distill_loss: f64,
    /// `sort/repair_loss`: SORT's repair term, `β · mean_q L_repair` (NaN when off; 0 for a mini-batch without a
    /// repair prompt).
    pub repair_loss: f64,
    /// `ugttt/nuclear_norm`: `‖[vec ΔW_m]‖_*` of UG-TTT's adapters before their update (NaN when off).
    pub adapter_nuclear_norm: f64,
    /// `imax/prefix_grad_norm`: the soft prefixes' gradient norm after clipping, mean over the last epoch's
    /// mini-batches (NaN when off).
    pub prefix_grad_norm: f64,
}

impl UpdateStats {
    /// The stats of a step that did not update (the buffered balance waiting for a balanced batch): NaN losses,
    /// no mini-batch.
    pub fn skipped(lr: f64) -> Self {
        let nan = f64::NAN;
        Self {
            pg_loss: nan,
            entropy: nan,
            pg_clipfrac: nan,
            pg_clipfrac_lower: nan,
            ppo_kl: nan,
            kl_loss: nan,
            grad_norm: nan,
            lr,
            forking_threshold: None,
            forking_frac_selected: nan,
            minibatches: 0,
            distill_loss: nan,
            repair_loss: nan,
            adapter_nuclear_norm: nan,
            prefix_grad_norm: nan,
        }
    }
}

/// The loss inputs of one mini-batch: its rows, masks and (when it is one micro-batch) its training forward.
pub(crate) struct Minibatch {
    idx: Vec<usize>,
    forking: ForkingMask,
    loss_mask: ForkingLossMask,
    /// The loss rows' response tokens and their denominators: the entropy bonus and the KL loss.
    regularizer: (Vec<bool>, GlobalDenominators),
    htpo: Option<HtpoTokenGroups>,
    whole: Option<(Tensor<2>, Tensor<2>)>,
    micro: usize,
}

/// Sums of one mini-batch's micro-batch metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct MinibatchStats {
    pg_loss: f64,
    entropy: f64,
    kl_loss: f64,
    clip: f64,
    clip_lower: f64,
    ppo_kl: f64,
    tokens: usize,
    forking: Option<ForkingMask>,
    distill_loss: Option<f64>,
    repair_loss: Option<f64>,
}

impl MinibatchStats {
    fn add(&mut self, out: &ActorLoss, tokens: usize) {
        let t = tokens as f64;
        self.pg_loss += out.pg_loss;
        self.entropy += out.entropy.unwrap_or(f64::NAN);
        self.kl_loss += out.kl_loss.unwrap_or(0.0);
        self.clip += out.metrics.pg_clipfrac * t;
        self.clip_lower += out.metrics.pg_clipfrac_lower * t;
        self.ppo_kl += out.metrics.ppo_kl * t;
        self.tokens += tokens;
    }
}

/// Means over the mini-batches of the last epoch.
#[derive(Debug, Clone)]
pub(crate) struct StatsMean {
    sum: UpdateStats,
}

impl StatsMean {
    pub(crate) fn new(lr: f64) -> Self {
        Self {
            sum: UpdateStats {
                pg_loss: 0.0,
                entropy: 0.0,
                pg_clipfrac: 0.0,
                pg_clipfrac_lower: 0.0,
                ppo_kl: 0.0,
                kl_loss: 0.0,
                grad_norm: 0.0,
                lr,
                forking_threshold: None,
                forking_frac_selected: 0.0,
                minibatches: 0,
                distill_loss: f64::NAN,
                repair_loss: f64::NAN,
                adapter_nuclear_norm: f64::NAN,
                prefix_grad_norm: f64::NAN,
            },
        }
    }

    pub(crate) fn add(&mut self, mb: MinibatchStats, grad_norm: f64) {
        let (s, t) = (&mut self.sum, mb.tokens.max(1) as f64);
        s.pg_loss += mb.pg_loss;
        s.entropy += mb.entropy;
        s.kl_loss += mb.kl_loss;
        s.pg_clipfrac += mb.clip / t;
        s.pg_clipfrac_lower += mb.clip_lower / t;
        s.ppo_kl += mb.ppo_kl / t;
        s.grad_norm += grad_norm;
        s.minibatches += 1;
        for (sum, v) in [(&mut s.distill_loss, mb.distill_loss), (&mut s.repair_loss, mb.repair_loss)] {
            if let Some(v) = v {
                *sum = if sum.is_nan() { v } else { *sum + v };
            }
        }
        if let Some(f) = mb.forking {
            s.forking_threshold = f.threshold;
            s.forking_frac_selected = f.frac_selected();
        }
    }

    pub(crate) fn finish(self) -> UpdateStats {
        let mut s = self.sum;
        let n = s.minibatches.max(1) as f64;
        for v in [
            &mut s.pg_loss,
            &mut s.entropy,
            &mut s.kl_loss,
            &mut s.pg_clipfrac,
            &mut s.pg_clipfrac_lower,
            &mut s.ppo_kl,
            &mut s.grad_norm,
            &mut s.distill_loss,
            &mut s.repair_loss,
        ] {
            *v /= n;
        }
        s
    }
}

/// The update's view of one scored batch.
pub(crate) struct Updater<'a> {
    config: &'a CheckedConfig,
    actor: ActorLossConfig,
    batch: &'a RolloutBatch,
    scores: &'a Scores,
    device: &'a Device,
    teacher: Option<&'a Policy>,
}

impl<'a> Updater<'a> {
    pub(crate) fn new(
        config: &'a CheckedConfig,
        batch: &'a RolloutBatch,
        device: &'a Device,
        teacher: Option<&'a Policy>,
    ) -> Result<Self> {
        Ok(Self { config, actor: config.actor_loss(), batch, scores: batch.scored("update")?, device, teacher })
    }

    /// The rows of each mini-batch of `epoch`: the whole batch, or groups of `ppo_mini_batch_size` prompts in a
    /// shuffled order (groups are never split).
    pub(crate) fn minibatches(&self, epoch: usize) -> Result<Vec<Vec<usize>>> {
        let (rl, sizes) = (&self.config.rl, self.batch.group_sizes());
        match rl.ppo_mini_batch_size {
            None => Ok(vec![(0..self.batch.len()).collect()]),
            Some(prompts) => {
                let rows = (prompts * rl.group_size).max(sizes.iter().copied().max().unwrap_or(1));
                let seed = derive_seed(
                    self.config.run.seed,
                    SeedStream::MinibatchShuffle,
                    &[self.batch.step as u64, epoch as u64],
                );
                Ok(query_preserved_minibatches(sizes, rows, true, Some(seed))?)
            }
        }
    }

    /// The token ids of the mini-batch rows `rows` (indices into `idx`).
    fn sequences(&self, idx: &[usize], rows: &[usize]) -> Vec<Vec<u32>> {
        let ids = self.batch.ids();
        rows.iter().map(|&k| ids[idx[k]].clone()).collect()
    }

    /// Entropy and log-prob `[n, W]` of the mini-batch rows `rows` (indices into `idx`).
    fn forward(&self, policy: &Policy, idx: &[usize], rows: &[usize]) -> Result<(Tensor<2>, Tensor<2>)> {
        token_stats(policy, &self.sequences(idx, rows), self.batch.width(), self.config.temperature())
    }

    /// The masks of mini-batch `idx`; `None` when none of its rows enters the loss.
    pub(crate) fn prepare(&self, policy: &Policy, idx: Vec<usize>) -> Result<Option<Minibatch>> {
        let (rl, w) = (&self.config.rl, self.batch.width());
        let mb_mask = self.batch.gather_rows(&self.scores.train_mask, &idx);
        if !mb_mask.iter().any(|&m| m) {
            return Ok(None); // every row was balanced away
        }
        let mb = idx.len();
        let micro = rl.ppo_micro_batch_size.unwrap_or(mb).clamp(1, mb);
        let all: Vec<usize> = (0..mb).collect();
        let (entropy, whole) = if micro == mb {
            let (entropy, log_prob) = self.forward(policy, &idx, &all)?;
            (host_f32(entropy.clone().detach())?, Some((entropy, log_prob)))
        } else {
            let lp_micro = self.config.log_prob_micro_batch_size().unwrap_or(mb);
            let seqs = self.sequences(&idx, &all);
            let (entropy, _) =
                token_stats_host(policy, &seqs, self.batch.width(), self.config.temperature(), lp_micro)?;
            (entropy, None)
        };
        let forking = self.select(&entropy, &mb_mask, micro, &idx)?;
        let mut loss_mask = forking_loss_mask(&mb_mask, &forking, w, rl.forking.denominator)?;
        loss_mask.denominators.loss_scale_factor = rl.loss_scale_factor;
        let mut reg_denominators = GlobalDenominators::from_mask(&mb_mask, w)?;
        reg_denominators.loss_scale_factor = rl.loss_scale_factor;
        let htpo = match &rl.policy_loss {
            PolicyLoss::Htpo(c) => Some(self.htpo_groups(&idx, &entropy, &mb_mask, c)?),
            _ => None,
        };
        Ok(Some(Minibatch { idx, forking, loss_mask, regularizer: (mb_mask, reg_denominators), htpo, whole, micro }))
    }

    /// The forking arm's mask over the mini-batch's `[rows, W]` tokens: ranked over all of them (`mini_batch` scope, or
    /// one micro-batch), or over each micro-batch's rows separately (`micro_batch` scope, the official code).
    fn select(&self, entropy: &[f32], mask: &[bool], micro: usize, idx: &[usize]) -> Result<ForkingMask> {
        let (f, w) = (&self.config.rl.forking, self.batch.width());
        let arm = self.config.token_selection();
        let seed = |chunk: usize| {
            let first = idx.first().copied().unwrap_or(0) as u64;
            derive_seed(self.config.run.seed, SeedStream::Control, &[self.batch.step as u64, first, chunk as u64])
        };
        if f.scope == ForkingScope::MiniBatch || micro * w >= mask.len() {
            return Ok(arm.select(entropy, mask, f.top_entropy_ratio, f.rule, seed(0))?);
        }
        let mut out =
            ForkingMask { mask: Vec::with_capacity(mask.len()), threshold: None, num_selected: 0, num_candidates: 0 };
        for (chunk, (h, m)) in entropy.chunks(micro * w).zip(mask.chunks(micro * w)).enumerate() {
            let part = arm.select(h, m, f.top_entropy_ratio, f.rule, seed(chunk))?;
            out.mask.extend(part.mask);
            out.threshold = match (out.threshold, part.threshold) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            out.num_selected += part.num_selected;
            out.num_candidates += part.num_candidates;
        }
        Ok(out)
    }

    /// HTPO's token groups of a mini-batch: per-sequence entropy ranks over its response tokens and the group
    /// accuracy of its prompts.
    fn htpo_groups(
        &self,
        idx: &[usize],
        entropy: &[f32],
        mask: &[bool],
        config: &forkrl_advantage::HtpoConfig,
    ) -> Result<HtpoTokenGroups> {
        let group_of = self.batch.group_of();
        let mut sizes: Vec<usize> = Vec::new();
        for (k, &r) in idx.iter().enumerate() {
            match sizes.len() {
                n if n > 0 && group_of[idx[k - 1]] == group_of[r] => sizes[n - 1] += 1,
                _ => sizes.push(1),
            }
        }
        let correct: Vec<bool> = idx.iter().map(|&r| self.batch.rewards[r] > 0.0).collect();
        let rows = ResponseRows::new(mask, self.batch.width(), &sizes)?;
        let g = htpo_token_groups(&rows.compact(entropy, 1)?, rows.layout(), &correct, config)?;
        Ok(HtpoTokenGroups {
            hard_correct_high: rows.scatter(&g.hard_correct_high, false)?,
            wrong_high: rows.scatter(&g.wrong_high, false)?,
            dropped: rows.scatter(&g.dropped, false)?,
            hard: g.hard,
        })
    }

    /// The accumulated gradient of a mini-batch and its metrics.
    pub(crate) fn gradients(&self, policy: &Policy, mut mb: Minibatch) -> Result<(GradientsParams, MinibatchStats)> {
        let mut accumulator = GradientsAccumulator::<Policy>::new();
        let mut stats = MinibatchStats::default();
        let all: Vec<usize> = (0..mb.idx.len()).collect();
        for rows in all.chunks(mb.micro) {
            let (entropy, log_prob) = match mb.whole.take() {
                Some(t) => t,
                None => self.forward(policy, &mb.idx, rows)?,
            };
            let (out, tokens) = self.micro_loss(&mb, rows, entropy, log_prob)?;
            if !out.pg_loss.is_finite() {
                return Err(TrainerError::NonFinite { what: "RL policy loss", value: out.pg_loss });
            }
            crate::finite_scalar("RL actor loss", &out.loss)?;
            accumulator.accumulate(policy, GradientsParams::from_grads(out.loss.backward(), policy));
            stats.add(&out, tokens);
        }
        stats.distill_loss = self.distill_term(policy, &mb, &mut accumulator)?;
        stats.repair_loss = self.repair_term(policy, &mb, &mut accumulator)?;
        stats.forking = Some(mb.forking);
        Ok((accumulator.grads(), stats))
    }

    /// The full-vocabulary distillation term of a mini-batch, `c_KL Σ_t w_t ℓ_t / max(Σ w, 1)` over its loss tokens,
    /// accumulated micro-batch by micro-batch; `None` when it is off.
    fn distill_term(
        &self,
        policy: &Policy,
        mb: &Minibatch,
        accumulator: &mut GradientsAccumulator<Policy>,
    ) -> Result<Option<f64>> {
        let (Some(setup), Some(d), Some(teacher)) = (&self.config.rl.distillation, &self.scores.distill, self.teacher)
        else {
            return Ok(None);
        };
        if setup.loss.estimator != DistillEstimator::FullVocabulary {
            return Ok(None);
        }
        let w = self.batch.width();
        // The mini-batch's bypass weights on its loss tokens, `[mb, W]`.
        let masked: Vec<f32> = self
            .batch
            .gather_rows(&d.weights, &mb.idx)
            .into_iter()
            .zip(self.batch.gather_rows(&self.scores.train_mask, &mb.idx))
            .map(|(x, m)| if m { x } else { 0.0 })
            .collect();
        let z = masked.iter().sum::<f32>().max(1.0);
        let all: Vec<usize> = (0..mb.idx.len()).collect();
        let mut total = 0.0f64;
        for rows in all.chunks(mb.micro) {
            let shape = (w, self.config.temperature(), setup.loss.kl_penalty_coef, z);
            let weights = gather_rows(&masked, w, rows);
            let seqs = self.sequences(&mb.idx, rows);
            let loss = distill::full_vocabulary_loss(policy, teacher, &seqs, weights, shape, self.device)?;
            total += f64::from(crate::finite_scalar("distillation loss", &loss)?);
            accumulator.accumulate(policy, GradientsParams::from_grads(loss.backward(), policy));
        }
        Ok(Some(total))
    }

    /// SORT's repair term of a mini-batch: `β · mean_q (−Σ_t w_t log π(y*_t) / Σ_t w_t)` over the repair prompts of
    /// its groups; `None` when SORT is off.
    fn repair_term(
        &self,
        policy: &Policy,
        mb: &Minibatch,
        accumulator: &mut GradientsAccumulator<Policy>,
    ) -> Result<Option<f64>> {
        let (Some(config), Some(sort)) = (&self.config.rl.sort, &self.scores.sort) else { return Ok(None) };
        let Some(repair) = &sort.repair else { return Ok(Some(0.0)) };
        let group_of = self.batch.group_of();
        let rows: Vec<usize> =
            (0..sort.groups.len()).filter(|&q| mb.idx.iter().any(|&r| group_of[r] == sort.groups[q])).collect();
        if rows.is_empty() {
            return Ok(Some(0.0));
        }
        let w = repair.width();
        let mut coef = repair.gather_rows(&sort.weights, &rows);
        for row in coef.chunks_mut(w) {
            let sum: f32 = row.iter().sum();
            let scale = if sum > 0.0 { config.beta / sum / rows.len() as f32 } else { 0.0 };
            row.iter_mut().for_each(|x| *x *= scale);
        }
        let seqs: Vec<Vec<u32>> = rows.iter().map(|&q| repair.ids()[q].clone()).collect();
        let (_, log_prob) = token_stats(policy, &seqs, w, 1.0)?;
        let coef = Tensor::<2>::from_data(TensorData::new(coef, [rows.len(), w]), self.device);
        let loss = log_prob.mul(coef).sum().neg();
        let value = f64::from(crate::finite_scalar("SORT repair loss", &loss)?);
        accumulator.accumulate(policy, GradientsParams::from_grads(loss.backward(), policy));
        Ok(Some(value))
    }

    /// The actor loss of micro-batch `rows` (indices into the mini-batch), divided by the mini-batch's denominators,
    /// and its loss-token count.
    fn micro_loss(
        &self,
        mb: &Minibatch,
        rows: &[usize],
        entropy: Tensor<2>,
        log_prob: Tensor<2>,
    ) -> Result<(ActorLoss, usize)> {
        let (w, n) = (self.batch.width(), rows.len());
        let batch_rows: Vec<usize> = rows.iter().map(|&k| mb.idx[k]).collect();
        let tensor = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [n, w]), self.device);
        let pick = |v: &[bool]| gather_rows(v, w, rows);
        let chunk_mask = pick(&mb.loss_mask.loss_mask);
        let tokens = chunk_mask.iter().filter(|&&m| m).count();
        let bool_tensor = |v: Vec<bool>| Tensor::<2, Bool>::from_data(TensorData::new(v, [n, w]), self.device);
        let count_mask = bool_tensor(pick(&mb.loss_mask.count_mask));
        let reg_mask = bool_tensor(pick(&mb.regularizer.0));
        let inputs = PolicyInputs {
            log_prob,
            old_log_prob: tensor(self.batch.gather_rows(&self.scores.old_log_prob, &batch_rows)),
            advantages: tensor(self.batch.gather_rows(&self.scores.token_advantages, &batch_rows)),
            mask: Tensor::from_data(TensorData::new(chunk_mask, [n, w]), self.device),
        };
        let htpo = mb.htpo.as_ref().map(|g| HtpoTokenGroups {
            hard_correct_high: pick(&g.hard_correct_high),
            wrong_high: pick(&g.wrong_high),
            dropped: pick(&g.dropped),
            hard: rows.iter().map(|&k| g.hard[k]).collect(),
        });
        let step = self.batch.step as u64;
        let mut ctx = LossContext::new(step, derive_seed(self.config.run.seed, SeedStream::ClipCov, &[step]))
            .with_count_mask(&count_mask)
            .with_regularizer(&reg_mask, &mb.regularizer.1);
        if let Some(g) = &htpo {
            ctx = ctx.with_htpo_groups(g);
        }
        let reference = self.scores.ref_log_prob.as_ref().map(|r| tensor(self.batch.gather_rows(r, &batch_rows)));
        let out = actor_loss(&self.actor, &inputs, Some(entropy), reference, &mb.loss_mask.denominators, &ctx)?;
        Ok((out, tokens))
    }
}
