//! [`Trainer`]: a steppable SFT + RLVR run, and [`train`], the loop over it.
//!
//! ```text
//! Trainer::new(config.check()?, &device) | Trainer::resume(checkpoints, &device)
//!   sft_step() × sft.steps, finish_sft()          warm start, held-out accuracy and pass@k after SFT
//!   rl_step() = rollout() -> score() -> update()  one RL step (metrics row back)
//!   evaluate(), evaluate_pass_at_k(), save(dir)
//! ```
//!
//! Every random draw is a pure function of (run seed, stream, step, ...) (`forkrl_core::derive_seed`), so a run
//! resumed from a checkpoint repeats exactly what an uninterrupted run does (bit-identical on the CPU backend).

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use burn::{
    module::Module,
    optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer},
    tensor::Device,
};

use forkrl_advantage::{AdaptiveBetaNeg, AdaptiveKlController, ImaxConfig};
use forkrl_entropy::OnlineRockDetector;
use forkrl_rollout::{PosteriorSource, PromptStatsStore};

use crate::{
    Result, TrainerError,
    batch::RolloutBatch,
    config::{Balance, CheckedConfig, KlCtrlKind, ReasonMaxxerSetup},
    eval, finite_scalar,
    model::{
        self, Vocab, checkpoint, gradients, hf_export,
        policy::{Policy, PolicyConfig},
    },
    rl::{
        balance::{self, RowBuffer},
        distill, dump,
        heal::HealData,
        imax,
        metrics::{Event, MetricsRow, Observer, TrainSummary, rl_step_row},
        reasonmaxxer::{self, ReasonMaxxerData},
        rollout,
        score::{self, ScoreContext},
        state::{
            ADAPTERS_FILE, ADAPTERS_OPTIMIZER_FILE, OPTIMIZER_FILE, OptimizerState, PREFIXES_FILE,
            PREFIXES_OPTIMIZER_FILE, TrainState, latest_checkpoint, read_state, remove_stale_temporaries, resumable,
            save_checkpoint,
        },
        ugttt::{self, Adapters},
        update::{StatsMean, UpdateStats, Updater},
    },
    sft::{sft_batch, sft_loss_over, sft_rows},
    tasks::{Problem, Task, TaskConfig, jsonl::JsonlConfig},
};

/// A training run that a caller steps through: the policy, its optimisers, the task and the run's state.
pub struct Trainer {
    config: CheckedConfig,
    device: Device,
    task: Task,
    test: Vec<Problem>,
    /// `None` only inside [`optimiser_step`], while the optimiser owns it.
    policy: Option<Policy>,
    policy_config: PolicyConfig,
    vocab: Vocab,
    sft_optim: ModuleOptimizer,
    optim: ModuleOptimizer,
    reference: Option<Policy>,
    /// The distillation teacher (`rl.distillation`), frozen, without a graph.
    teacher: Option<Policy>,
    /// Online rock-token detection (`rl.distillation.loss.rock` without a fixed rock set); kept in checkpoints.
    rock_detector: Option<OnlineRockDetector>,
    /// ReasonMaxxer's offline set (`rl.reasonmaxxer`), built from the base (`reference`) at the first step.
    reasonmaxxer: Option<ReasonMaxxerData>,
    /// HEAL's target and general sets (`rl.heal`), built at the first RL step; kept in checkpoints.
    heal: Option<HealData>,
    /// UG-TTT's head adapters and their optimizer (`rl.ugttt`); kept in checkpoints.
    adapters: Option<(Adapters, ModuleOptimizer)>,
    /// IMAX's soft-prefix optimizer (`rl.imax`; the prefixes ride on the policy); kept in checkpoints.
    prefix_optim: Option<ModuleOptimizer>,
    /// ReasonMaxxer's `adaptive_betaneg` controller (`rl.reasonmaxxer.loss.adaptive_betaneg`); kept in checkpoints.
    betaneg: Option<AdaptiveBetaNeg>,
    /// β of KL in the reward (adapted after each batch by verl's controller when `kl_ctrl.type = "adaptive"`).
    kl_coef: f64,
    /// HORA's per-prompt history and the last RL step recorded into it.
    prompt_stats: Option<(PromptStatsStore, usize)>,
    /// The buffered global balance's rows (`rl.balance = "buffered"`).
    buffer: Option<RowBuffer>,
    sft_steps_done: usize,
    sft_finished: bool,
    rl_steps_done: usize,
    summary: TrainSummary,
    metrics_lines: usize,
    checkpoints: Option<PathBuf>,
    rollout_dumps: Option<PathBuf>,
    resumed_from: Option<PathBuf>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("policy_config", &self.policy_config)
            .field("sft_steps_done", &self.sft_steps_done)
            .field("rl_steps_done", &self.rl_steps_done)
            .field("checkpoints", &self.checkpoints)
            .finish_non_exhaustive()
    }
}

/// The RL optimiser: AdamW with the configured weight decay, betas and ε. No burn clipping: the trainer clips by the
/// global norm itself ([`model::gradients`]).
fn rl_adamw(config: &CheckedConfig) -> ModuleOptimizer {
    let rl = &config.rl;
    AdamWConfig::new()
        .with_weight_decay(rl.weight_decay as f32)
        .with_beta_1(rl.betas[0] as f32)
        .with_beta_2(rl.betas[1] as f32)
        .with_epsilon(rl.eps as f32)
        .init()
}

/// The SFT optimiser: burn's AdamW defaults (weight decay 1e-4, ε 1e-5), clipped by the global norm like RL.
fn sft_adamw() -> ModuleOptimizer {
    AdamWConfig::new().init()
}

impl Trainer {
    /// Builds the task and the policy (seeded by `run.seed`) on the autodiff form of `device`. Nothing is written.
    ///
    /// # Errors
    /// Task and model loading errors; [`TrainerError::InvalidConfig`] for SFT on a dataset without solutions.
    pub fn new(config: CheckedConfig, device: &Device) -> Result<Self> {
        let task = Task::new(&config.task)?;
        if config.sft.steps > 0 && !task.has_solutions() {
            return Err(TrainerError::invalid(
                "sft.steps",
                config.sft.steps,
                "the dataset has no worked solutions (`solution`, or a GSM8K `answer` with ####); set sft.steps = 0",
            ));
        }
        let device = if config.model.gradient_checkpointing {
            device.clone().autodiff().gradient_checkpointing()
        } else {
            device.clone().autodiff()
        };
        let built = model::build_seeded(&config.model, &device, config.run.seed)?;
        let teacher = match &config.rl.distillation {
            Some(setup) => Some(distill::load_teacher(setup, &config, built.config.vocab_size, &device)?),
            None => None,
        };
        let rock_detector = match config.rl.distillation.as_ref().and_then(|d| d.loss.rock.as_ref()) {
            Some(r) if r.tokens.is_empty() => Some(OnlineRockDetector::new(r.window, r.detection.clone())?),
            _ => None,
        };
        let adapters = config.rl.ugttt.as_ref().map(|u| {
            let [vocab, dim] = built.policy.head_weight().dims();
            (Adapters::new(u, vocab, dim, config.run.seed, &device), rl_adamw(&config))
        });
        let test = task.test_set(config.eval.size);
        if test.is_empty() {
            return Err(TrainerError::invalid(
                "task.test_share",
                "(the task's split)",
                "the task has no held-out problem to evaluate on",
            ));
        }
        Ok(Self {
            device,
            task,
            test,
            policy: Some(built.policy),
            policy_config: built.config,
            vocab: built.vocab,
            sft_optim: sft_adamw(),
            optim: rl_adamw(&config),
            reference: None,
            teacher,
            rock_detector,
            reasonmaxxer: None,
            heal: None,
            adapters,
            prefix_optim: config.rl.imax.map(|_| imax::prefix_adamw(config.rl.betas, config.rl.eps)),
            betaneg: config
                .rl
                .reasonmaxxer
                .as_ref()
                .filter(|r| r.loss.adaptive_betaneg)
                .map(|r| AdaptiveBetaNeg::new(&r.loss)),
            kl_coef: config.rl.kl_in_reward.map_or(0.0, |k| k.kl_ctrl.kl_coef),
            prompt_stats: match config.rl.hora.map(|h| h.source) {
                Some(PosteriorSource::History { decay }) => Some((PromptStatsStore::new(decay)?, 0)),
                _ => None,
            },
            buffer: match config.rl.balance {
                Balance::Buffered => Some(RowBuffer::new(config.rl.balance_buffer)?),
                _ => None,
            },
            sft_steps_done: 0,
            sft_finished: false,
            rl_steps_done: 0,
            summary: TrainSummary::default(),
            metrics_lines: 0,
            checkpoints: None,
            rollout_dumps: None,
            resumed_from: None,
            config,
        })
    }

    /// Saves checkpoints into `dir` during [`Trainer::run`] (after SFT, every `checkpoint.every` RL steps, at the end).
    #[must_use]
    pub fn with_checkpoints(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoints = Some(dir.into());
        self
    }

    /// Writes rollout dumps into `dir` every `rl.rollout_dump_every` RL steps (`forkrl-train` passes
    /// `runs/<name>/rollouts`).
    #[must_use]
    pub fn with_rollout_dumps(mut self, dir: impl Into<PathBuf>) -> Self {
        self.rollout_dumps = Some(dir.into());
        self
    }

    /// Continues from the newest checkpoint in `checkpoints`, with the configuration it was written with.
    ///
    /// # Errors
    /// [`TrainerError::Checkpoint`] for a missing or unreadable checkpoint; the errors of [`Trainer::new`].
    pub fn resume(checkpoints: &Path, device: &Device) -> Result<Self> {
        let (from, state) = newest(checkpoints)?;
        let config = state.config.clone().check()?;
        Self::resume_from(config, checkpoints, from, state, device)
    }

    /// Continues from the newest checkpoint in `checkpoints` with `config`, which must equal the checkpoint's except
    /// `rl.steps` (a run may be extended) and `run.name` / `run.out_dir` (a run may be moved).
    ///
    /// # Errors
    /// [`TrainerError::Checkpoint`] for another configuration or a missing checkpoint; the errors of [`Trainer::new`].
    pub fn resume_with(config: CheckedConfig, checkpoints: &Path, device: &Device) -> Result<Self> {
        let (from, state) = newest(checkpoints)?;
        if state.step > config.rl.steps {
            return Err(TrainerError::invalid(
                "rl.steps",
                config.rl.steps,
                format!("the checkpoint {} is already at RL step {}", from.display(), state.step),
            ));
        }
        if !resumable(&state.config, &config) {
            return Err(TrainerError::Checkpoint {
                path: from.join(crate::rl::state::STATE_FILE),
                reason: "the checkpoint was written with another configuration (only rl.steps, run.name and \
                         run.out_dir may change on resume)"
                    .into(),
            });
        }
        Self::resume_from(config, checkpoints, from, state, device)
    }

    fn resume_from(
        config: CheckedConfig,
        checkpoints: &Path,
        from: PathBuf,
        state: TrainState,
        device: &Device,
    ) -> Result<Self> {
        let mut t = Self::new(config, device)?.with_policy_from(&from)?;
        let fresh = rl_adamw(&t.config);
        t.optim = std::mem::replace(&mut t.optim, fresh).load_from(&from.join(OPTIMIZER_FILE))?;
        if let Some(beta) = state.kl_coef {
            t.kl_coef = beta;
        }
        if let (Some(stats), Some(store)) = (t.prompt_stats.as_mut(), state.prompt_stats) {
            *stats = (store, state.step);
        }
        if let (Some(buffer), Some(saved)) = (t.buffer.as_mut(), state.balance_buffer) {
            *buffer = saved;
        }
        if let (Some(detector), Some(saved)) = (t.rock_detector.as_mut(), state.rock_detector) {
            *detector = saved;
        }
        t.heal = state.heal;
        if let (Some(controller), Some(saved)) = (t.betaneg.as_mut(), state.adaptive_betaneg) {
            *controller = saved;
        }
        // IMAX's prefixes exist from the first RL step on (a checkpoint written before it has none).
        if let (Some(setup), Some(mut optim)) = (t.config.rl.imax, t.prefix_optim.take()) {
            if from.join(PREFIXES_FILE).is_file() {
                let width = t.policy().head_weight().dims()[1];
                let fresh = (imax::empty_prefixes(&setup, width, &t.device), optim);
                let prefixes;
                (prefixes, optim) = load_module(&from, fresh, (PREFIXES_FILE, PREFIXES_OPTIMIZER_FILE))?;
                t.policy = t.policy.take().map(|p| p.with_prefixes(Some(prefixes))).transpose()?;
            }
            t.prefix_optim = Some(optim);
        }
        if let Some(fresh) = t.adapters.take() {
            t.adapters = Some(load_module(&from, fresh, (ADAPTERS_FILE, ADAPTERS_OPTIMIZER_FILE))?);
        }
        if (t.config.needs_reference() || t.config.rl.reasonmaxxer.is_some()) && state.step > 0 {
            let (reference, _) = checkpoint::load_policy(&checkpoints.join("reference"), &t.device)?;
            t.reference = Some(reference.with_dtype(t.config.model.dtype).valid());
        }
        t.sft_steps_done = t.config.sft.steps;
        t.sft_finished = true;
        t.rl_steps_done = state.step;
        t.summary = state.summary;
        t.metrics_lines = state.metrics_lines;
        remove_stale_temporaries(checkpoints)?;
        t.checkpoints = Some(checkpoints.to_path_buf());
        t.resumed_from = Some(from);
        Ok(t)
    }

    /// The checked configuration.
    pub fn config(&self) -> &CheckedConfig {
        &self.config
    }

    /// The policy (on the autodiff device).
    pub fn policy(&self) -> &Policy {
        // Only `optimiser_step` takes it out, and it puts it back before returning.
        self.policy.as_ref().expect("the policy is present outside optimiser_step")
    }

    /// The policy's shape.
    pub fn policy_config(&self) -> &PolicyConfig {
        &self.policy_config
    }

    /// The tokenizer and special ids.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The task.
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// HORA's per-prompt history (`rl.hora.source = { kind = "history" }`), recorded by [`Trainer::score`] once per
    /// step.
    pub fn prompt_history(&self) -> Option<&PromptStatsStore> {
        self.prompt_stats.as_ref().map(|(store, _)| store)
    }

    /// HEAL's target and general sets, once built (`rl.heal`).
    pub fn heal_data(&self) -> Option<&HealData> {
        self.heal.as_ref()
    }

    /// The held-out problems (`eval.size` of them at most).
    pub fn test_set(&self) -> &[Problem] {
        &self.test
    }

    /// RL steps completed (0 during and right after SFT).
    pub fn step(&self) -> usize {
        self.rl_steps_done
    }

    /// What the run measured so far.
    pub fn summary(&self) -> &TrainSummary {
        &self.summary
    }

    /// Metrics rows [`Trainer::run`] has delivered (a checkpoint records it).
    pub fn metrics_lines(&self) -> usize {
        self.metrics_lines
    }

    /// One SFT step on a fresh batch of worked solutions; returns its loss.
    ///
    /// # Errors
    /// [`TrainerError::NonFinite`] for a NaN/inf loss; tokenizer and backend errors.
    pub fn sft_step(&mut self) -> Result<f64> {
        let sft = self.config.sft;
        let batch = sft_batch(&self.task, &self.vocab, sft.batch_size, self.config.run.seed, self.sft_steps_done)?;
        // Micro-batches (one when `sft.micro_batch_size` is unset): each divides by the whole batch's target count,
        // gradients are summed (a single micro-batch's gradient is taken as is).
        let micro = sft.micro_batch_size.unwrap_or(batch.len()).clamp(1, batch.len().max(1));
        let targets = batch.response_mask().iter().filter(|&&x| x).count();
        let mut accumulator = GradientsAccumulator::<Policy>::new();
        let mut value = 0.0f32;
        for start in (0..batch.len()).step_by(micro) {
            let part = sft_rows(&batch, start..(start + micro).min(batch.len()), self.vocab.pad)?;
            let loss = sft_loss_over(self.policy(), &part, targets)?;
            value += finite_scalar("SFT loss", &loss)?;
            accumulator.accumulate(self.policy(), GradientsParams::from_grads(loss.backward(), self.policy()));
        }
        let grads = accumulator.grads();
        let (grads, _) = clipped(self.policy(), grads, self.config.rl.grad_clip, "SFT gradient")?;
        optimiser_step(&mut self.sft_optim, &mut self.policy, sft.lr, grads);
        self.sft_steps_done += 1;
        Ok(f64::from(value))
    }

    /// Ends SFT: held-out greedy accuracy and `(pass@1, pass@k)`, which start the summary.
    ///
    /// # Errors
    /// Evaluation errors.
    pub fn finish_sft(&mut self) -> Result<(f64, (f64, f64))> {
        let accuracy = self.evaluate()?;
        let pass = self.evaluate_pass_at_k()?;
        self.summary = TrainSummary {
            sft_accuracy: accuracy,
            final_accuracy: accuracy,
            sft_pass_at_k: pass,
            final_pass_at_k: pass,
            eval_curve: vec![(0, accuracy)],
            ..TrainSummary::default()
        };
        self.sft_finished = true;
        Ok((accuracy, pass))
    }

    /// Samples and verifies the batch of the next RL step.
    ///
    /// # Errors
    /// As [`rollout::rollout`].
    pub fn rollout(&self) -> Result<RolloutBatch> {
        let history = self.prompt_stats.as_ref().map(|(store, _)| store);
        let step = self.rl_steps_done + 1;
        match (&self.config.rl.heal, &self.heal) {
            (None, _) => rollout::rollout(self.policy(), &self.vocab, &self.task, &self.config, step, history),
            (Some(setup), Some(data)) => {
                let draw = |n: usize, seed: u64| match data.draw(n, setup.general_share, seed) {
                    p if p.is_empty() => Err(TrainerError::Stage {
                        stage: "rollout",
                        reason: "HEAL's target and general sets are both empty (a damaged checkpoint?)".into(),
                    }),
                    p => Ok(p),
                };
                rollout::rollout_from(self.policy(), &self.vocab, &draw, &self.config, step, history)
            }
            (Some(_), None) => Err(TrainerError::Stage {
                stage: "rollout",
                reason: "HEAL's problem sets are not built yet: call Trainer::prepare_rl (rl_step does) first".into(),
            }),
        }
    }

    /// Builds what the RL phase draws from before its first step: HEAL's target and general sets (with the policy as
    /// it stands) and IMAX's soft prefixes. Nothing to do otherwise, or when they exist (a resumed run keeps its own).
    ///
    /// # Errors
    /// As [`HealData::build`].
    pub fn prepare_rl(&mut self) -> Result<()> {
        if let (Some(setup), None) = (&self.config.rl.heal, &self.heal) {
            self.heal = Some(HealData::build(self.policy(), &self.vocab, &self.task, &self.config, setup)?);
        }
        if let Some(setup) = &self.config.rl.imax
            && self.policy().prefixes().is_none()
        {
            let prefixes = imax::init_prefixes(self.policy(), setup, self.config.run.seed);
            self.policy = self.policy.take().map(|p| p.with_prefixes(Some(prefixes))).transpose()?;
        }
        Ok(())
    }

    /// Adds advantages, `log π_old`, `log π_ref`, entropies, token advantages and the loss rows to `batch`. The
    /// reference policy of the KL loss is the policy as RL starts: taken (and saved beside the checkpoints) on the
    /// first call.
    ///
    /// # Errors
    /// As [`score::score`].
    pub fn score(&mut self, batch: &mut RolloutBatch) -> Result<()> {
        if self.config.needs_reference() && self.reference.is_none() {
            if let Some(dir) = &self.checkpoints {
                checkpoint::save_policy(self.policy(), &self.policy_config, &dir.join("reference"))?;
            }
            self.reference = Some(self.policy().valid());
        }
        let snapshot = self.policy().valid();
        // IMAX: the reference reads the current prefixes (the KL measures the backbone's drift on the same input).
        let with_prefixes = match (&self.reference, snapshot.prefixes()) {
            (Some(r), Some(p)) => Some(r.clone().with_prefixes(Some(p.clone()))?),
            _ => None,
        };
        let ctx = ScoreContext {
            reference: with_prefixes.as_ref().or(self.reference.as_ref()),
            teacher: self.teacher.as_ref(),
            rock_detector: self.rock_detector.as_mut(),
            heal: self.config.rl.heal.as_ref().zip(self.heal.as_ref()),
            adapters: self.adapters.as_ref().map(|(a, _)| a),
            kl_coef: self.kl_coef,
        };
        score::score(&snapshot, &self.vocab, &self.config, batch, ctx)?;
        if let Some((store, recorded)) = self.prompt_stats.as_mut().filter(|(_, recorded)| batch.step > *recorded) {
            // HORA's history: each prompt's verifier rewards of this step, once per step.
            let mut start = 0;
            for &n in batch.group_sizes() {
                let id = rollout::prompt_id(&batch.rollouts()[start].prompt);
                store.record(id, &batch.rewards[start..start + n], batch.step as u64)?;
                start += n;
            }
            *recorded = batch.step;
        }
        if let (Some(k), Some((_, current_kl))) =
            (self.config.rl.kl_in_reward, batch.scores.as_ref().and_then(|s| s.reward_kl))
            && k.kl_ctrl.kind == KlCtrlKind::Adaptive
        {
            let c = &k.kl_ctrl;
            let mut ctrl = AdaptiveKlController { value: self.kl_coef, target: c.target_kl, horizon: c.horizon };
            ctrl.update(current_kl, batch.len());
            self.kl_coef = ctrl.value;
        }
        Ok(())
    }

    /// `ppo_epochs` passes over query-preserved mini-batches of a scored batch, one optimiser step per mini-batch;
    /// the batch's step is then the last completed RL step.
    ///
    /// # Errors
    /// [`TrainerError::Stage`] for an unscored batch; [`TrainerError::NonFinite`] for a NaN/inf loss or gradient
    /// or a parameter that the step made non-finite (the run cannot continue; checkpoints written before it are the
    /// last good ones); backend errors.
    pub fn update(&mut self, batch: &RolloutBatch) -> Result<UpdateStats> {
        let (lr, epochs) = (self.config.rl_lr(batch.step), self.config.rl.ppo_epochs);
        let updater = Updater::new(&self.config, batch, &self.device, self.teacher.as_ref())?;
        let mut mean = StatsMean::new(lr);
        let mut prefix_norms = Vec::new();
        for epoch in 0..epochs {
            for idx in updater.minibatches(epoch)? {
                let Some(mb) = updater.prepare(self.policy(), idx)? else { continue };
                let (grads, stats) = updater.gradients(self.policy(), mb)?;
                let (mut grads, norm) = clipped(self.policy(), grads, self.config.rl.grad_clip, "RL gradient")?;
                let prefix_norm = prefix_step(
                    self.config.rl.imax.as_ref(),
                    self.prefix_optim.as_mut(),
                    &mut self.policy,
                    &mut grads,
                )?;
                if !self.config.rl.imax.is_some_and(|i| i.freeze_backbone) {
                    optimiser_step(&mut self.optim, &mut self.policy, lr, grads);
                }
                if let Some(tensor) = model::first_non_finite_parameter(self.policy())? {
                    // The policy is beyond repair; the checkpoints written before this step stay the last good ones.
                    return Err(TrainerError::NonFiniteParameters { step: batch.step, tensor });
                }
                if epoch + 1 == epochs {
                    mean.add(stats, norm);
                    if let Some(n) = prefix_norm {
                        prefix_norms.push(n);
                    }
                }
            }
        }
        let mut stats = mean.finish();
        if self.config.rl.imax.is_some() {
            stats.prefix_grad_norm = prefix_norms.iter().sum::<f64>() / prefix_norms.len().max(1) as f64;
        }
        if let (Some(u), Some((adapters, mut optim))) = (&self.config.rl.ugttt, self.adapters.take()) {
            let scores = batch.scored("update")?;
            let inputs = (scores.token_advantages.as_slice(), scores.train_mask.as_slice());
            let knobs = (self.config.temperature(), u.lambda);
            let (loss, norm) = ugttt::adapter_loss(self.policy(), &adapters, batch, inputs, knobs, &self.device)?;
            finite_scalar("UG-TTT adapter loss", &loss)?;
            let grads = GradientsParams::from_grads(loss.backward(), &adapters);
            let adapters = optim.step(lr, adapters, grads);
            self.adapters = Some((adapters, optim));
            stats.adapter_nuclear_norm = norm;
        }
        self.rl_steps_done = batch.step;
        Ok(stats)
    }

    /// With `rl.balance = "buffered"`: pushes a scored batch into the buffer and returns the balanced update batch when
    /// one is due (`None`: this step does not update), with `(minority_take, majority_take)`. Without it the batch
    /// itself is the update batch: `Some` of a copy.
    ///
    /// # Errors
    /// [`TrainerError::Stage`] for an unscored batch.
    pub fn balanced_batch(&mut self, batch: &RolloutBatch) -> Result<Option<(RolloutBatch, (usize, usize))>> {
        let Some(buffer) = self.buffer.as_mut() else {
            return Ok(Some((batch.clone(), (0, batch.len()))));
        };
        let rl = &self.config.rl;
        let size = rl.prompts_per_step * rl.group_size;
        let last = batch.step >= rl.steps;
        let drawn = balance::push_and_draw(buffer, batch, size, last, self.config.run.seed, self.vocab.pad)?;
        Ok(drawn.map(|(b, info)| (b, (info.minority_take, info.majority_take))))
    }

    /// The buffered balance's `(positives, negatives)` held, when it is on.
    pub fn buffer_counts(&self) -> Option<(usize, usize)> {
        self.buffer.as_ref().map(RowBuffer::counts)
    }

    /// One RL step: `rollout → score → update` (with the buffered balance, the update runs on the buffer's balanced
    /// batch when one is due, and is skipped otherwise); returns its metrics row and records its curves in the summary.
    ///
    /// # Errors
    /// The errors of the three stages.
    pub fn rl_step(&mut self) -> Result<MetricsRow> {
        if let Some(setup) = self.config.rl.reasonmaxxer.clone() {
            return self.reasonmaxxer_step(&setup);
        }
        let start = Instant::now();
        self.prepare_rl()?;
        let mut batch = self.rollout()?;
        self.score(&mut batch)?;
        let stats = if self.buffer.is_some() {
            match self.balanced_batch(&batch)? {
                Some((train, _)) => self.update(&train)?,
                None => {
                    self.rl_steps_done = batch.step;
                    UpdateStats::skipped(self.config.rl_lr(batch.step))
                }
            }
        } else {
            self.update(&batch)?
        };
        let every = self.config.rl.rollout_dump_every;
        if let Some(dir) = self.rollout_dumps.as_ref().filter(|_| every > 0 && batch.step.is_multiple_of(every)) {
            dump::write_dump(dir, &batch, &self.vocab)?;
        }
        let (mut row, entropy) = rl_step_row(&batch, batch.scored("rl_step")?, &stats, start.elapsed().as_secs_f64())?;
        if let Some((p, n)) = self.buffer_counts() {
            row = row
                .with("balance/updated", if stats.minibatches > 0 { 1.0 } else { 0.0 })
                .with("balance/buffer_positives", p as f64)
                .with("balance/buffer_negatives", n as f64);
        }
        let step = batch.step;
        let s = &mut self.summary;
        s.reward_curve.push((step, row.get("critic/score/mean").unwrap_or(f64::NAN)));
        s.entropy_curve.push((step, entropy.mean));
        s.response_length_curve.push((step, row.get("response_length/mean").unwrap_or(f64::NAN)));
        if s.first_batch_entropy.is_none() {
            s.first_batch_entropy = Some(entropy.clone());
        }
        s.last_batch_entropy = Some(entropy);
        Ok(row)
    }

    /// One optimiser step of ReasonMaxxer's offline stage (`rl.reasonmaxxer`, in place of an RL step): the base is
    /// the policy at the first call (saved beside the checkpoints as `reference`), the offline set is built from it
    /// then, and each step trains on the next `batch_size` sequences.
    ///
    /// # Errors
    /// The errors of [`ReasonMaxxerData::build`] and [`reasonmaxxer::step_loss`]; non-finite losses, gradients or
    /// parameters.
    pub fn reasonmaxxer_step(&mut self, setup: &ReasonMaxxerSetup) -> Result<MetricsRow> {
        let start = Instant::now();
        if self.reference.is_none() {
            if let Some(dir) = &self.checkpoints {
                checkpoint::save_policy(self.policy(), &self.policy_config, &dir.join("reference"))?;
            }
            self.reference = Some(self.policy().valid());
        }
        let base = self.reference.as_ref().ok_or_else(|| TrainerError::Stage {
            stage: "reasonmaxxer",
            reason: "the base policy is missing".into(),
        })?;
        let data = match self.reasonmaxxer.take() {
            Some(d) => d,
            None => ReasonMaxxerData::build(base, &self.vocab, &self.task, &self.config, setup)?,
        };
        let step = self.rl_steps_done + 1;
        let rows = data.rows(step, setup.batch_size, self.config.run.seed);
        let mut setup = setup.clone();
        if let Some(controller) = &self.betaneg {
            setup.loss.beta_neg = controller.beta_neg;
        }
        let out = reasonmaxxer::step_loss(self.policy(), base, &data, &rows, &setup, &self.device)?;
        let loss = finite_scalar("ReasonMaxxer loss", &out.loss)?;
        let (dec, anchor, plus, minus) = out.parts;
        let mut row = MetricsRow::new("rl", step)
            .with("reasonmaxxer/loss", f64::from(loss))
            .with("reasonmaxxer/decision_loss", dec)
            .with("reasonmaxxer/anchor_kl", anchor)
            .with("reasonmaxxer/dlogp_plus", plus)
            .with("reasonmaxxer/dlogp_minus", minus)
            .with("reasonmaxxer/gated_fraction", data.gated_fraction)
            .with("reasonmaxxer/tau", f64::from(data.tau.0))
            .with("reasonmaxxer/sequences", data.batch.len() as f64)
            .with("reasonmaxxer/problems_kept", data.problems.1 as f64)
            .with("critic/score/mean", data.mean_reward)
            .with("reasonmaxxer/beta_neg", f64::from(setup.loss.beta_neg));
        if let Some(controller) = self.betaneg.as_mut() {
            controller.update(plus);
        }
        let grads = GradientsParams::from_grads(out.loss.backward(), self.policy());
        let (grads, norm) = clipped(self.policy(), grads, self.config.rl.grad_clip, "ReasonMaxxer gradient")?;
        let lr = self.config.rl_lr(step);
        optimiser_step(&mut self.optim, &mut self.policy, lr, grads);
        if let Some(tensor) = model::first_non_finite_parameter(self.policy())? {
            return Err(TrainerError::NonFiniteParameters { step, tensor });
        }
        self.rl_steps_done = step;
        row = row
            .with("actor/grad_norm", norm)
            .with("actor/lr", lr)
            .with("perf/time_per_step", start.elapsed().as_secs_f64());
        self.summary.reward_curve.push((step, data.mean_reward));
        self.reasonmaxxer = Some(data);
        Ok(row)
    }

    /// Trains ReasonMaxxer's offline stage on a caller's own offline set (e.g. from
    /// [`ReasonMaxxerData::from_batch`] on rollouts of the current policy) instead of drawing one at the first step.
    #[must_use]
    pub fn with_reasonmaxxer_data(mut self, data: ReasonMaxxerData) -> Self {
        self.reasonmaxxer = Some(data);
        self
    }

    /// Held-out greedy accuracy.
    ///
    /// # Errors
    /// Tokenizer and sampler errors.
    pub fn evaluate(&self) -> Result<f64> {
        eval::greedy_accuracy(self.policy(), &self.vocab, &self.test, self.config.rl.max_response_len)
    }

    /// Held-out `(pass@1, pass@k)` with `eval.pass_k` samples per problem at the rollout decoding, on the first
    /// `eval.pass_k_size` test problems.
    ///
    /// # Errors
    /// Tokenizer and sampler errors.
    pub fn evaluate_pass_at_k(&self) -> Result<(f64, f64)> {
        let (c, rl) = (&self.config, &self.config.rl);
        let set = &self.test[..c.eval.pass_k_size.min(self.test.len())];
        let k = c.eval.pass_k.max(1);
        eval::pass_at_k(self.policy(), &self.vocab, set, k, rl.decoding, rl.max_response_len, c.run.seed)
    }

    /// A trainer holding the policy of one checkpoint directory (`checkpoints/step-NNNNNN`) with the configuration it
    /// was written with, for evaluation or export (no optimiser state, no reference policy).
    ///
    /// # Errors
    /// [`TrainerError::Checkpoint`] / [`TrainerError::Io`] for a missing or unreadable checkpoint; the errors of
    /// [`Trainer::new`].
    pub fn from_checkpoint(checkpoint: &Path, device: &Device) -> Result<Self> {
        let state = read_state(checkpoint)?;
        let mut t = Self::new(state.config.check()?, device)?.with_policy_from(checkpoint)?;
        (t.sft_steps_done, t.sft_finished, t.rl_steps_done, t.summary) =
            (t.config.sft.steps, true, state.step, state.summary);
        Ok(t)
    }

    /// A new run whose RL starts from the policy of `checkpoint` (an SFT checkpoint, typically `step-000000`) with
    /// `config`'s RL settings: no SFT (the post-SFT evaluation still runs, on the loaded policy), a fresh RL optimiser,
    /// RL steps counted from 1. The paired design of an experiment: every arm of a seed starts from one SFT
    /// checkpoint. The policy shapes must agree.
    ///
    /// # Errors
    /// [`TrainerError::Checkpoint`] for a missing or mismatched checkpoint; the errors of [`Trainer::new`].
    pub fn from_sft_checkpoint(config: CheckedConfig, checkpoint: &Path, device: &Device) -> Result<Self> {
        let mut t = Self::new(config, device)?.with_policy_from(checkpoint)?;
        t.sft_steps_done = t.config.sft.steps;
        Ok(t)
    }

    /// This trainer with the policy of `checkpoint`, whose shape must be the configuration's.
    fn with_policy_from(mut self, checkpoint: &Path) -> Result<Self> {
        let (loaded, loaded_config) = checkpoint::load_policy(checkpoint, &self.device)?;
        if loaded_config != self.policy_config {
            return Err(TrainerError::Checkpoint {
                path: checkpoint.join(checkpoint::CONFIG_FILE),
                reason: "the checkpoint's policy shape differs from the configuration's".into(),
            });
        }
        self.policy = Some(loaded.with_dtype(self.config.model.dtype));
        Ok(self)
    }

    /// [`eval::EvalReport`] of the current policy: the task's held-out set (`eval.size` problems) and every problem
    /// of each of `datasets` (JSONL files; prompted and verified with the run's template and extraction when the run
    /// trained on a JSONL dataset, else with the bare question as the built-in tasks prompt), each with greedy accuracy,
    /// pass@1, pass@k and maj@k from `k` samples at the rollout decoding.
    ///
    /// # Errors
    /// Dataset, tokenizer and sampler errors.
    pub fn evaluate_report(&self, checkpoint: &str, datasets: &[PathBuf], k: usize) -> Result<eval::EvalReport> {
        let (c, rl) = (&self.config, &self.config.rl);
        let settings = (k, rl.decoding, rl.max_response_len, c.run.seed);
        let mut sets = vec![eval::evaluate_set(self.policy(), &self.vocab, "held-out", &self.test, settings)?];
        let base = match &c.task {
            TaskConfig::Jsonl(j) => JsonlConfig { template: j.template.clone(), extraction: j.extraction, ..j.clone() },
            _ => JsonlConfig { template: "{question}".into(), ..JsonlConfig::default() },
        };
        for path in datasets {
            let task = Task::new(&TaskConfig::Jsonl(JsonlConfig {
                path: path.clone(),
                test_path: Some(path.clone()),
                ..base.clone()
            }))?;
            let problems = task.test_set(usize::MAX);
            let name = path.display().to_string();
            sets.push(eval::evaluate_set(self.policy(), &self.vocab, &name, &problems, settings)?);
        }
        Ok(eval::EvalReport { checkpoint: checkpoint.to_string(), step: self.rl_steps_done, seed: c.run.seed, sets })
    }

    /// Writes the current policy as a Hugging Face directory `out` (atomically) that `transformers` loads: the source
    /// checkpoint's architecture, dtype and tokenizer, or Llama with an equivalent `tokenizer.json` for the built-in
    /// model (`model::hf_export`).
    ///
    /// # Errors
    /// As [`hf_export::export`].
    pub fn export(&self, out: &Path) -> Result<()> {
        let source = match &self.config.model.hf_dir {
            Some(dir) => hf_export::ExportSource::HfDir(dir),
            None => hf_export::ExportSource::BuiltIn,
        };
        hf_export::export(self.policy(), &self.policy_config, source, out)
    }

    /// Writes a checkpoint of the current step into `dir` (atomically; `latest` then names it). Returns its
    /// directory.
    ///
    /// # Errors
    /// [`TrainerError::Io`] / [`TrainerError::Checkpoint`].
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let state = TrainState {
            step: self.rl_steps_done,
            config: (*self.config).clone(),
            summary: self.summary.clone(),
            metrics_lines: self.metrics_lines,
            kl_coef: self.config.rl.kl_in_reward.map(|_| self.kl_coef),
            prompt_stats: self.prompt_stats.as_ref().map(|(store, _)| store.clone()),
            balance_buffer: self.buffer.clone(),
            rock_detector: self.rock_detector.clone(),
            heal: self.heal.clone(),
            adaptive_betaneg: self.betaneg,
        };
        let extra = |tmp: &Path| -> Result<()> {
            if let (Some(prefixes), Some(optim)) = (self.policy().prefixes(), &self.prefix_optim) {
                save_module(tmp, prefixes, optim, (PREFIXES_FILE, PREFIXES_OPTIMIZER_FILE))?;
            }
            if let Some((adapters, optim)) = &self.adapters {
                save_module(tmp, adapters, optim, (ADAPTERS_FILE, ADAPTERS_OPTIMIZER_FILE))?;
            }
            Ok(())
        };
        let policy = (self.policy(), &self.policy_config);
        save_checkpoint(dir, self.config.checkpoint.keep, policy, &self.optim, &state, &extra)
    }

    /// Runs what is left of the run (SFT unless done or resumed, then RL to `rl.steps`), reporting to `observer` and
    /// checkpointing into the [`Trainer::with_checkpoints`] folder. `stop_after = Some(k)` stops right after RL step
    /// `k` with a checkpoint, as a preempted job would.
    ///
    /// # Errors
    /// The errors of the stages and of the observer; a non-finite loss or gradient stops the run (checkpoints
    /// written before it remain the last good ones).
    pub fn run(&mut self, observer: &mut impl Observer, stop_after: Option<usize>) -> Result<TrainSummary> {
        let start = Instant::now();
        if let Some(from) = self.resumed_from.take() {
            observer.event(&Event::Resumed { checkpoint: &from, step: self.rl_steps_done });
        }
        if !self.sft_finished {
            self.run_sft(observer)?;
        }
        let (rl_start, first) = (Instant::now(), self.rl_steps_done + 1);
        while self.rl_steps_done < self.config.rl.steps {
            let row = self.rl_step()?;
            let step = self.rl_steps_done;
            let eta =
                rl_start.elapsed().as_secs_f64() / (step + 1 - first) as f64 * (self.config.rl.steps - step) as f64;
            self.after_rl_step(observer, row, eta, stop_after)?;
            if stop_after == Some(step) && step < self.config.rl.steps {
                observer.event(&Event::Stopped { step });
                break;
            }
        }
        self.summary.seconds = start.elapsed().as_secs_f64();
        self.summary.warnings = collapse_warning(&self.summary).into_iter().collect();
        Ok(self.summary.clone())
    }

    fn emit(&mut self, observer: &mut impl Observer, row: &MetricsRow) -> Result<()> {
        observer.metrics(row)?;
        self.metrics_lines += 1;
        Ok(())
    }

    fn checkpoint(&mut self, observer: &mut impl Observer) -> Result<()> {
        if let Some(dir) = self.checkpoints.clone() {
            let path = self.save(&dir)?;
            observer.event(&Event::Checkpoint { step: self.rl_steps_done, path: &path });
        }
        Ok(())
    }

    fn run_sft(&mut self, observer: &mut impl Observer) -> Result<()> {
        let total = self.config.sft.steps;
        while self.sft_steps_done < total {
            let step = self.sft_steps_done;
            let loss = self.sft_step()?;
            observer.event(&Event::SftStep { step, total, loss });
            if step.is_multiple_of(25) || step + 1 == total {
                self.emit(observer, &MetricsRow::new("sft", step).with("sft/loss", loss))?;
            }
        }
        let (accuracy, (p1, pk)) = self.finish_sft()?;
        let k = self.config.eval.pass_k.max(1);
        let row = MetricsRow::new("eval", 0)
            .with("eval/acc", accuracy)
            .with("eval/pass@1", p1)
            .with(format!("eval/pass@{k}"), pk);
        self.emit(observer, &row)?;
        observer.event(&Event::Evaluated { step: 0, accuracy: Some(accuracy), pass_at_k: Some((k, p1, pk)) });
        self.checkpoint(observer)
    }

    /// Evaluation when due, the step's row and events, the final pass@k, and the checkpoint when due.
    fn after_rl_step(
        &mut self,
        observer: &mut impl Observer,
        mut row: MetricsRow,
        eta_seconds: f64,
        stop_after: Option<usize>,
    ) -> Result<()> {
        let (step, total) = (self.rl_steps_done, self.config.rl.steps);
        let evaluated = step.is_multiple_of(self.config.eval.every.max(1)) || step == total;
        if evaluated {
            let accuracy = self.evaluate()?;
            row.values.insert("eval/acc".into(), accuracy);
            self.summary.eval_curve.push((step, accuracy));
            self.summary.final_accuracy = accuracy;
        }
        observer.event(&Event::RlStep { step, total, row: &row, eta_seconds });
        self.emit(observer, &row)?;
        if evaluated {
            observer.event(&Event::Evaluated { step, accuracy: row.get("eval/acc"), pass_at_k: None });
        }
        if step == total {
            let (p1, pk) = self.evaluate_pass_at_k()?;
            self.summary.final_pass_at_k = (p1, pk);
            let k = self.config.eval.pass_k.max(1);
            let row = MetricsRow::new("eval", step).with("eval/pass@1", p1).with(format!("eval/pass@{k}"), pk);
            self.emit(observer, &row)?;
            observer.event(&Event::Evaluated { step, accuracy: None, pass_at_k: Some((k, p1, pk)) });
        }
        let every = self.config.checkpoint.every;
        if step == total || (every > 0 && step.is_multiple_of(every)) || stop_after == Some(step) {
            self.checkpoint(observer)?;
        }
        Ok(())
    }
}

/// A policy that RL made markedly worse (held-out accuracy below half of its value after SFT) trains silently: say so.
fn collapse_warning(s: &TrainSummary) -> Option<String> {
    (s.eval_curve.len() > 1 && s.sft_accuracy >= 0.05 && s.final_accuracy < 0.5 * s.sft_accuracy).then(|| {
        format!(
            "held-out accuracy fell from {:.3} after SFT to {:.3} after RL: the policy collapsed (check rl.lr and \
             the metrics actor/grad_norm, actor/pg_clipfrac)",
            s.sft_accuracy, s.final_accuracy
        )
    })
}

/// The gradients clipped by their global norm, and that norm before clipping (`actor/grad_norm`).
fn clipped(
    policy: &Policy,
    grads: GradientsParams,
    max_norm: f64,
    what: &'static str,
) -> Result<(GradientsParams, f64)> {
    let norm = gradients::global_grad_norm(policy, &grads)?;
    if !norm.is_finite() {
        return Err(TrainerError::NonFinite { what, value: norm });
    }
    Ok((gradients::clip_grad_norm(policy, grads, norm, max_norm), norm))
}

/// One optimiser step on the policy in `slot`, moved in and out so that the optimiser updates its tensors in place.
fn optimiser_step(optim: &mut ModuleOptimizer, slot: &mut Option<Policy>, lr: f64, grads: GradientsParams) {
    if let Some(policy) = slot.take() {
        *slot = Some(optim.step(lr, policy, grads));
    }
}

/// IMAX: takes the soft prefixes' gradient out of `grads` and applies it with their own AdamW at `prefix_lr`; returns
/// its norm (`None` when IMAX is off or the policy carries no prefixes).
fn prefix_step(
    setup: Option<&ImaxConfig>,
    optim: Option<&mut ModuleOptimizer>,
    slot: &mut Option<Policy>,
    grads: &mut GradientsParams,
) -> Result<Option<f64>> {
    let (Some(setup), Some(optim)) = (setup, optim) else {
        return Ok(None);
    };
    let Some(prefixes) = slot.as_mut().and_then(Policy::take_prefixes) else {
        return Ok(None);
    };
    let id = prefixes.table.id;
    let (prefixes, norm) = match grads.remove::<2>(id) {
        Some(g) => {
            let norm = f64::from(crate::host_f32(g.clone().powi_scalar(2).sum())?[0]).sqrt();
            let mut own = GradientsParams::new();
            own.register(id, g);
            (optim.step(setup.prefix_lr, prefixes, own), Some(norm))
        }
        None => (prefixes, None),
    };
    if let Some(policy) = slot.take() {
        *slot = Some(policy.with_prefixes(Some(prefixes))?);
    }
    Ok(norm)
}

/// Writes a module kept beside the policy (UG-TTT's adapters, IMAX's prefixes) and its optimizer into the checkpoint
/// being written in `tmp`, as `files`.
fn save_module<M: Module>(tmp: &Path, module: &M, optim: &ModuleOptimizer, files: (&str, &str)) -> Result<()> {
    let path = tmp.join(files.0);
    module.clone().save_file(&path).map_err(|e| TrainerError::Checkpoint { path, reason: format!("{e:?}") })?;
    optim.save_to(&tmp.join(files.1))
}

/// Loads what [`save_module`] wrote in the checkpoint `from` into a fresh module of the same shape and its optimizer.
fn load_module<M: Module>(
    from: &Path,
    (module, optim): (M, ModuleOptimizer),
    files: (&str, &str),
) -> Result<(M, ModuleOptimizer)> {
    let path = from.join(files.0);
    let module =
        module.try_load_file(&path).map_err(|e| TrainerError::Checkpoint { path, reason: format!("{e:?}") })?;
    Ok((module, optim.load_from(&from.join(files.1))?))
}

/// The newest checkpoint of a folder and its state.
fn newest(checkpoints: &Path) -> Result<(PathBuf, TrainState)> {
    let from = latest_checkpoint(checkpoints)?.ok_or_else(|| TrainerError::Checkpoint {
        path: checkpoints.to_path_buf(),
        reason: "--resume: no checkpoint to resume from".into(),
    })?;
    let state = read_state(&from)?;
    Ok((from, state))
}

/// Runs SFT then RL without checkpoints, reporting to `observer`.
///
/// # Errors
/// As [`Trainer::new`] and [`Trainer::run`].
pub fn train(config: CheckedConfig, device: &Device, observer: &mut impl Observer) -> Result<TrainSummary> {
    Trainer::new(config, device)?.run(observer, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collapsed_policy_is_flagged_and_a_learning_one_is_not() {
        let mut s = TrainSummary { sft_accuracy: 0.6, final_accuracy: 0.05, ..TrainSummary::default() };
        s.eval_curve = vec![(0, 0.6), (200, 0.05)];
        assert!(collapse_warning(&s).is_some_and(|w| w.contains("0.600") && w.contains("0.050")));
        s.final_accuracy = 0.7;
        assert!(collapse_warning(&s).is_none());
        // No RL evaluation yet, or nothing learned in SFT to lose: nothing to say.
        s.final_accuracy = 0.0;
        s.eval_curve.truncate(1);
        assert!(collapse_warning(&s).is_none());
        let untrained = TrainSummary { eval_curve: vec![(0, 0.01), (5, 0.0)], sft_accuracy: 0.01, ..s };
        assert!(collapse_warning(&untrained).is_none());
    }
}
