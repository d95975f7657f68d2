//! On-policy distillation in the trainer (`[rl.distillation]`; the library side is `forkrl_advantage::distillation`,
//! spec `../shared/methods/sparse-selection-and-distillation.md` §3).
//!
//! - **Teacher**: a frozen second policy with the student's vocabulary, loaded once when the trainer is built
//!   ([`load_teacher`]), never updated.
//! - **Score** ([`score`]): student and teacher forwards without a graph over the rollout batch, `log_prob_micro_batch_size`
//!   rows at a time, give the per-position reverse KL `ℓ_t = KL(π_θ ‖ q)` of the rollout policy and the teacher's
//!   log-prob of each sampled token (both at the rollout temperature, 1 by default as in both reference stacks). The
//!   rock set (fixed, or detected online over the last `window` steps from `ℓ_t` attributed to the predicted token)
//!   gives the bypass weights `w_t`.
//! - **Loss**: the sampled-token estimator feeds `A_t = w_t (A_env − c_KL k_t)` to the configured policy loss (with one
//!   update per batch the ratio is 1 and the clip inactive: Tinker's `importance_sampling`); the full-vocabulary
//!   estimator adds `c_KL Σ_t w_t ℓ_t / max(Σ w, 1)` over each mini-batch ([`Updater`](crate::rl::update) computes it
//!   from the student's full logits with a graph, so it holds `[micro, W, V]` logits: meant for the small vocabularies
//!   of the built-in tasks; the sampled-token estimator needs only log-probs).
//! - Positions with weight 0 (full bypass) leave the loss rows, so token-mean divides by `Σ w` for a hard bypass.

use std::path::Path;

use burn::{
    module::Module,
    tensor::{Device, Tensor, TensorData, activation::log_softmax},
};
use forkrl_advantage::{DistillEstimator, reverse_kl_from_logits};
use forkrl_entropy::{OnlineRockDetector, RockAlignment, rock_aligned_ids, rock_bypass_weights};

use crate::{
    Result, TrainerError,
    batch::RolloutBatch,
    config::{CheckedConfig, DistillationSetup},
    host_f32,
    model::{self, checkpoint, ids_tensor, policy::Policy},
};

/// What distillation adds to a scored batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillScores {
    /// `[B, W]`: the teacher's log-prob of each sampled token (0 off the response).
    pub teacher_log_prob: Vec<f32>,
    /// `[B, W]`: `ℓ_t = KL(π_old ‖ q)` at each response position (0 elsewhere).
    pub reverse_kl: Vec<f32>,
    /// `[B, W]`: the bypass weights (1 without a bypass; 0 off the response).
    pub weights: Vec<f32>,
    /// The rock ids in force this step.
    pub rocks: Vec<u32>,
}

impl DistillScores {
    /// `(mean ℓ, mean k1, bypassed share, rock share of Σ ℓ)` over the response positions: the metrics
    /// `distill/reverse_kl`, `distill/k1`, `distill/frac_bypassed`, `distill/rock_kl_share`.
    pub fn metrics(&self, mask: &[bool], old_log_prob: &[f32]) -> (f64, f64, f64, f64) {
        let (mut n, mut kl, mut k1, mut bypassed, mut rock_kl) = (0usize, 0.0f64, 0.0f64, 0usize, 0.0f64);
        for t in (0..mask.len()).filter(|&t| mask[t]) {
            n += 1;
            kl += f64::from(self.reverse_kl[t]);
            k1 += f64::from(old_log_prob[t]) - f64::from(self.teacher_log_prob[t]);
            if self.weights[t] < 1.0 {
                bypassed += 1;
                rock_kl += f64::from(self.reverse_kl[t]);
            }
        }
        let n = n.max(1) as f64;
        (kl / n, k1 / n, bypassed as f64 / n, if kl > 0.0 { rock_kl / kl } else { 0.0 })
    }
}

/// Loads the teacher of `setup` on `device` (without a graph) and checks its vocabulary against the student's.
///
/// # Errors
/// The loaders' errors; [`TrainerError::InvalidConfig`] (`rl.distillation.teacher`) for another vocabulary.
pub fn load_teacher(
    setup: &DistillationSetup,
    config: &CheckedConfig,
    student_vocab: usize,
    device: &Device,
) -> Result<Policy> {
    let dir = &setup.teacher;
    let (policy, vocab) = if dir.join(checkpoint::CONFIG_FILE).is_file() {
        let (p, c) = checkpoint::load_policy(dir, device)?;
        (p.with_dtype(config.model.dtype), c.vocab_size)
    } else {
        let m = model::hf::load(dir, config.model.max_len.or(Some(4096)), device)?;
        if let Some(student) = &config.model.hf_dir {
            same_tokenizer(student, dir)?;
        }
        (m.policy.with_dtype(config.model.dtype), m.config.policy.vocab_size)
    };
    if vocab != student_vocab {
        return Err(TrainerError::invalid(
            "rl.distillation.teacher",
            dir.display(),
            format!("its vocabulary has {vocab} ids, the student's {student_vocab}: distillation needs one tokenizer"),
        ));
    }
    Ok(policy.valid())
}

/// Two Hugging Face directories share a tokenizer when their `tokenizer.json` files are identical.
fn same_tokenizer(student: &Path, teacher: &Path) -> Result<()> {
    let read = |d: &Path| std::fs::read(d.join("tokenizer.json")).map_err(checkpoint::io(d));
    if read(student)? != read(teacher)? {
        return Err(TrainerError::invalid(
            "rl.distillation.teacher",
            teacher.display(),
            format!(
                "its tokenizer.json differs from the student's ({}): cross-tokenizer distillation is out of scope",
                student.display()
            ),
        ));
    }
    Ok(())
}

/// Scores `batch` for distillation with the rollout policy `student` and the `teacher`; pushes this step's `ℓ_t` into
/// the online rock detector first when there is one.
///
/// # Errors
/// The forwards' errors; the library's for non-finite logits.
pub fn score(
    student: &Policy,
    teacher: &Policy,
    batch: &RolloutBatch,
    config: &CheckedConfig,
    setup: &DistillationSetup,
    detector: Option<&mut OnlineRockDetector>,
) -> Result<DistillScores> {
    let (w, mask, temperature) = (batch.width(), batch.response_mask(), config.temperature());
    let micro = config.log_prob_micro_batch_size().unwrap_or(batch.len()).max(1);
    let targets = rock_aligned_ids(batch.ids(), w, RockAlignment::Predicted)?;
    let (mut reverse_kl, mut teacher_log_prob) = (Vec::with_capacity(mask.len()), Vec::with_capacity(mask.len()));
    for (chunk, rows) in batch.ids().chunks(micro).enumerate() {
        let logits = |p: &Policy| -> Result<Vec<f32>> {
            let ids = ids_tensor(rows, &p.device()).narrow(1, 0, w);
            host_f32(p.forward(ids)?)
        };
        let start = chunk * micro * w;
        let t = &targets[start..start + rows.len() * w];
        let (kl, lq) =
            reverse_kl_from_logits(&logits(student)?, &logits(teacher)?, t, student.vocab_size(), temperature)?;
        reverse_kl.extend(kl);
        teacher_log_prob.extend(lq);
    }
    for ((kl, lq), &m) in reverse_kl.iter_mut().zip(teacher_log_prob.iter_mut()).zip(mask) {
        if !m {
            (*kl, *lq) = (0.0, 0.0);
        }
    }
    let (weights, rocks) = match &setup.loss.rock {
        None => (mask.iter().map(|&m| f32::from(u8::from(m))).collect(), Vec::new()),
        Some(r) => {
            let rocks = match detector {
                Some(d) if r.tokens.is_empty() => {
                    d.push(&targets, &reverse_kl, mask)?;
                    d.report()?.rocks
                }
                _ => r.tokens.clone(),
            };
            let weights = match r.alignment {
                RockAlignment::Predicted => rock_bypass_weights(&targets, mask, &rocks, r.freeze_weight)?,
                RockAlignment::Context => {
                    let context = rock_aligned_ids(batch.ids(), w, RockAlignment::Context)?;
                    rock_bypass_weights(&context, mask, &rocks, r.freeze_weight)?
                }
            };
            (weights, rocks)
        }
    };
    Ok(DistillScores { teacher_log_prob, reverse_kl, weights, rocks })
}

/// The per-token advantages distillation trains on: `w_t (A_env − c_KL k_t)` (sampled token), or the environment
/// advantages (`env_advantage`) or 0 (full vocabulary: the signal is the added KL term).
///
/// # Errors
/// The library's errors.
pub fn token_advantages(
    batch: &RolloutBatch,
    setup: &DistillationSetup,
    scores: &DistillScores,
    old_log_prob: &[f32],
    advantages: &[f32],
) -> Result<Vec<f32>> {
    let (w, mask) = (batch.width(), batch.response_mask());
    let env = setup.loss.env_advantage.then_some(advantages);
    match setup.loss.estimator {
        DistillEstimator::SampledToken => Ok(forkrl_advantage::opd_token_advantages(
            old_log_prob,
            &scores.teacher_log_prob,
            mask,
            w,
            env,
            Some(&scores.weights),
            &setup.loss,
        )?),
        DistillEstimator::FullVocabulary => {
            Ok((0..mask.len()).map(|t| if mask[t] { env.map_or(0.0, |a| a[t / w.max(1)]) } else { 0.0 }).collect())
        }
    }
}

/// The full-vocabulary term of micro-batch `rows` of a mini-batch: `c_KL Σ_t w_t ℓ_t / z`, with a graph through the
/// student (`[n, W, V]` logits) and the teacher's log-distribution as a constant.
///
/// # Errors
/// The forwards' errors.
pub fn full_vocabulary_loss(
    student: &Policy,
    teacher: &Policy,
    seqs: &[Vec<u32>],
    weights: Vec<f32>,
    (w, temperature, coef, z): (usize, f32, f32, f32),
    device: &Device,
) -> Result<Tensor<1>> {
    let n = seqs.len();
    let lp = log_softmax(student.forward(ids_tensor(seqs, device).narrow(1, 0, w))?.div_scalar(temperature), 2);
    let teacher_ids = ids_tensor(seqs, &teacher.device()).narrow(1, 0, w);
    let lq = log_softmax(teacher.forward(teacher_ids)?.div_scalar(temperature), 2);
    let lq = Tensor::<3>::from_data(TensorData::new(host_f32(lq)?, [n, w, student.vocab_size()]), device);
    let kl = lp.clone().exp().mul(lp.sub(lq)).sum_dim(2).reshape([n, w]);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [n, w]), device);
    Ok(kl.mul(weights).sum().mul_scalar(coef / z))
}
