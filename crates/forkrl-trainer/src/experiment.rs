//! Paired experiments: arms × seeds over one base configuration, and their report.
//!
//! **Paired design.** Per seed, one SFT run writes a checkpoint (`seed-S/sft/checkpoints/step-000000`); every arm of
//! that seed starts RL from it ([`Trainer::from_sft_checkpoint`]) with the same run seed, so the arms see the same
//! SFT policy, the same prompts at each step (the prompt draw depends only on the seed and the step) and the same
//! sampling streams; what differs between arms is the arm. The effect of an arm is the per-seed difference of its
//! final held-out accuracy to the baseline arm's, averaged over seeds with a 95 % confidence interval from the
//! t-distribution with `n − 1` degrees of freedom (`mean ± t·sd/√n`; undefined for one seed).
//!
//! [`forking_tokens`] is the 80/20 experiment ("Beyond the 80/20 Rule", arXiv 2506.01939): top-20 % (the paper), all
//! tokens (baseline), bottom-80 % (the paper's ablation), random-20 % (a control with the top arm's token count) and a
//! ρ sweep (0.1, 0.5). [`run`] writes per run `metrics.jsonl`, `summary.json` and the final checkpoint, then
//! `report.md`, `curves.svg` (held-out accuracy per RL step per arm, and its gain over the SFT checkpoint with a
//! 95 % CI),
//! `entropy.svg` (the SFT model's token-entropy histogram with its 80th percentile, and the top arm's entropy
//! percentiles over training), a PNG of each, and the analyses of [`analyze`] (`analysis.json`, and in the report).
//! [`forking_tokens_base`] is the experiment's own default configuration (the free-order sum task). Runs go
//! `jobs` at a time on threads (every seed's SFT first, then the arms). Nothing is printed: progress goes to a
//! callback.

use std::{fmt::Write as _, path::PathBuf, time::Instant};

use burn::tensor::Device;
use forkrl_core::report::{Panel, Series, line_chart_png, line_chart_svg, write_atomic, write_atomic_bytes};
use serde::{Deserialize, Serialize};

use crate::{
    JsonlWriter, MetricsRow, Observer, Result, TrainConfig, Trainer, TrainerError,
    model::checkpoint::io,
    rl::metrics::{Event, TrainSummary},
};

/// One arm: a name and the settings it changes (`key=value`, as `--set`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    /// Name in the report and the run folder.
    pub name: String,
    /// Settings applied over the base configuration.
    pub sets: Vec<(String, String)>,
}

impl Arm {
    fn new(name: &str, sets: &[(&str, &str)]) -> Self {
        Self { name: name.into(), sets: sets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }
}

/// What an experiment runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentConfig {
    /// The experiment's name (`forking-tokens`).
    pub name: String,
    /// The configuration every run starts from (its `run.seed` is replaced by each seed).
    pub base: TrainConfig,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// The arms; `baseline` names the one the others are compared with.
    pub arms: Vec<Arm>,
    /// The baseline arm's name.
    pub baseline: String,
    /// Output folder (`runs/experiments/<name>`).
    pub out_dir: PathBuf,
    /// The command that made it, for the report.
    pub command: String,
    /// Runs trained at once, each on its own thread (the tiny model's runs use about one core each); the results do
    /// not depend on it.
    pub jobs: usize,
}

/// The 80/20 experiment's arms: top-20 %, all tokens (the baseline), bottom-80 %, random-20 %, and with `sweep` top-ρ
/// for ρ = 0.1 and 0.5. The quick variant runs the first three.
pub fn forking_tokens_arms(quick: bool) -> Vec<Arm> {
    let mut arms = vec![
        Arm::new("top-20%", &[("rl.forking.select", "top"), ("rl.forking.top_entropy_ratio", "0.2")]),
        Arm::new("all tokens", &[("rl.forking.select", "all")]),
        Arm::new("bottom-80%", &[("rl.forking.select", "bottom"), ("rl.forking.top_entropy_ratio", "0.2")]),
    ];
    if !quick {
        arms.push(Arm::new("random-20%", &[("rl.forking.select", "random"), ("rl.forking.top_entropy_ratio", "0.2")]));
        arms.push(Arm::new("top-10%", &[("rl.forking.select", "top"), ("rl.forking.top_entropy_ratio", "0.1")]));
        arms.push(Arm::new("top-50%", &[("rl.forking.select", "top"), ("rl.forking.top_entropy_ratio", "0.5")]));
    }
    arms
}

/// The 80/20 experiment's own default configuration (what `forkrl-train experiment forking-tokens` starts from
/// without `--config`): the free-order sum task ([`crate::tasks::sum`]: four numbers up to 49, chains of thought of
/// 20–30 tokens whose forks are the choice of the next number), responses up to 32 tokens, 700 SFT steps and 60 RL
/// steps with held-out evaluation every 10; everything else is [`TrainConfig::default`] (the tiny model,
/// the 80/20 recipe). `cargo xtask train` keeps its own, faster default.
pub fn forking_tokens_base() -> TrainConfig {
    let mut c = TrainConfig {
        task: crate::tasks::TaskConfig::Sum(crate::tasks::sum::SumConfig::default()),
        ..TrainConfig::default()
    };
    c.rl.max_response_len = 32;
    c.sft.steps = SFT_STEPS;
    c.rl.steps = RL_STEPS;
    c.eval.every = 10;
    c
}

const SFT_STEPS: usize = 700;
const RL_STEPS: usize = 60;

/// The 80/20 experiment over `base`: `seeds` seeds (default 3; 2 when `quick`), the arms of [`forking_tokens_arms`].
pub fn forking_tokens(base: TrainConfig, seeds: Option<usize>, quick: bool, out_dir: PathBuf) -> ExperimentConfig {
    let n = seeds.unwrap_or(if quick { 2 } else { 3 });
    ExperimentConfig {
        name: "forking-tokens".into(),
        base,
        seeds: (0..n as u64).collect(),
        arms: forking_tokens_arms(quick),
        baseline: "all tokens".into(),
        out_dir,
        command: String::new(),
        jobs: std::thread::available_parallelism().map_or(1, usize::from),
    }
}

/// The on-policy distillation demonstration's teacher (issue 18): the built-in task with a larger tiny model (128 wide,
/// `d_ff` 384, SFT at lr 1e-3), SFT then GRPO as `cargo xtask train` runs them (quick: SFT only). Measured by
/// `cargo xtask experiment distillation`: 0.968 after SFT, 0.965 after 200 GRPO steps (docs/experiments.md).
pub fn distillation_teacher(quick: bool) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.d_model = 128;
    c.model.d_ff = 384;
    c.sft.lr = 1e-3;
    if quick {
        c.rl.steps = 0;
    }
    c
}

/// The distillation demonstration's students: the default 64-wide model from a weak start (250 SFT steps), then 300
/// RL steps (quick: 100) with held-out evaluation every 50.
pub fn distillation_base(quick: bool) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.sft.steps = 250;
    c.rl.steps = if quick { 100 } else { 300 };
    c.eval.every = 50;
    c
}

/// The distillation demonstration over `base`: per seed, GRPO (the baseline) and full-vocabulary on-policy distillation
/// from the checkpoint `teacher` at lr 3e-4, both from the seed's SFT checkpoint; `seeds` seeds (default 2).
pub fn distillation(
    base: TrainConfig,
    teacher: &std::path::Path,
    seeds: Option<usize>,
    out_dir: PathBuf,
) -> ExperimentConfig {
    ExperimentConfig {
        name: "distillation".into(),
        base,
        seeds: (0..seeds.unwrap_or(2) as u64).collect(),
        arms: vec![
            Arm::new("grpo", &[]),
            Arm {
                name: "distillation".into(),
                sets: vec![
                    ("rl.lr".into(), "3e-4".into()),
                    ("rl.distillation.teacher".into(), format!("{:?}", teacher.display().to_string())),
                ],
            },
        ],
        baseline: "grpo".into(),
        out_dir,
        command: String::new(),
        jobs: std::thread::available_parallelism().map_or(1, usize::from),
    }
}

/// Trains the distillation teacher from `config` and saves it as a forkrl checkpoint in `dir` (atomically); returns
/// its held-out greedy accuracy after SFT and at the end.
///
/// # Errors
/// The configuration's, the run's and the write's errors.
pub fn train_teacher(config: TrainConfig, device: &Device, dir: &std::path::Path) -> Result<(f64, f64)> {
    let mut trainer = Trainer::new(config.check()?, device)?;
    let summary = trainer.run(&mut crate::rl::metrics::NoObserver, None)?;
    crate::model::checkpoint::save_policy(trainer.policy(), trainer.policy_config(), dir)?;
    Ok((summary.sft_accuracy, summary.final_accuracy))
}

/// Whether `dir` exists and holds anything (an experiment's output folder that [`run`] refuses without `overwrite`).
pub fn occupied(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

/// Where a run of the experiment stands, for a progress display.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// `sft` or the arm's name.
    pub arm: String,
    /// The seed.
    pub seed: u64,
    /// Runs done so far and in all.
    pub done: usize,
    /// Runs in all (SFT runs included).
    pub total: usize,
    /// Estimated seconds left (from the runs so far; `None` before the first has finished).
    pub eta_seconds: Option<f64>,
}

/// One arm × seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmRun {
    /// The arm.
    pub arm: String,
    /// The seed.
    pub seed: u64,
    /// The SFT checkpoint RL started from (one per seed: the paired design).
    pub sft_checkpoint: PathBuf,
    /// The run's summary.
    pub summary: TrainSummary,
    /// Mean policy-gradient tokens trained per RL step (`forking/frac_selected × response tokens`).
    pub tokens_per_step: f64,
    /// `(step, p50, p80, p95)` of the rollout policy's token entropy per RL step.
    pub entropy_percentiles: Vec<(usize, f64, f64, f64)>,
}

/// An observer that writes `metrics.jsonl` and keeps what the report needs.
struct Collect {
    jsonl: JsonlWriter<std::fs::File>,
    tokens: Vec<f64>,
    percentiles: Vec<(usize, f64, f64, f64)>,
}

impl Observer for Collect {
    fn metrics(&mut self, row: &MetricsRow) -> Result<()> {
        if row.phase == "rl" {
            let get = |k: &str| row.get(k).unwrap_or(f64::NAN);
            self.tokens.push(get("forking/frac_selected") * get("response_length/mean") * get("rollout/num_responses"));
            let p = |q: &str| get(&format!("rollout/entropy/{q}"));
            self.percentiles.push((row.step, p("p50"), p("p80"), p("p95")));
        }
        self.jsonl.metrics(row)
    }

    fn event(&mut self, _: &Event<'_>) {}
}

/// Runs every seed's SFT, then every arm from it, and writes the report. Refuses an output folder that is not empty
/// unless `overwrite` (nothing is deleted otherwise).
///
/// # Errors
/// [`TrainerError::RunExists`] for an existing experiment; [`TrainerError::InvalidConfig`] for an arm whose settings
/// do not apply or a baseline that is not an arm; the errors of the runs and of the writes.
pub fn run(
    config: &ExperimentConfig,
    device: &Device,
    overwrite: bool,
    progress: impl FnMut(&Progress) + Send,
) -> Result<ExperimentReport> {
    // Every configuration is built and checked before anything runs or is written.
    let mut runs: Vec<(u64, Option<&Arm>, crate::CheckedConfig)> = Vec::new();
    for &seed in &config.seeds {
        let mut sft = config.base.clone();
        sft.run.seed = seed;
        sft.rl.steps = 0;
        runs.push((seed, None, sft.check()?));
        for arm in &config.arms {
            let mut c = config.base.with_sets(&arm.sets)?;
            c.run.seed = seed;
            runs.push((seed, Some(arm), c.check()?));
        }
    }
    if !config.arms.iter().any(|a| a.name == config.baseline) {
        return Err(TrainerError::invalid("baseline", &config.baseline, "is not one of the arms"));
    }
    // A folder with anything in it (a finished experiment, or the runs of an interrupted one) is never replaced
    // unasked.
    if occupied(&config.out_dir) && !overwrite {
        return Err(TrainerError::RunExists { path: config.out_dir.clone() });
    }
    let start = Instant::now();
    let total = runs.len();
    let progress = std::sync::Mutex::new((progress, 0usize));
    let run_one = |(seed, arm, checked): (u64, Option<&Arm>, crate::CheckedConfig)| -> Result<Option<ArmRun>> {
        let name = arm.map_or("sft".to_string(), |a| a.name.clone());
        {
            let mut guard = progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let done = guard.1;
            let eta = (done > 0).then(|| start.elapsed().as_secs_f64() / done as f64 * (total - done) as f64);
            (guard.0)(&Progress { arm: name.clone(), seed, done, total, eta_seconds: eta });
        }
        let run = train_one(config, device, seed, arm, checked)?;
        progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1 += 1;
        Ok(run)
    };
    // Every seed's SFT first (the arms start from its checkpoint), then every arm; `jobs` runs at once in each phase.
    let (sft_runs, rl_runs): (Vec<_>, Vec<_>) = runs.into_iter().partition(|r| r.1.is_none());
    in_parallel(config.jobs, sft_runs, &run_one)?;
    let arm_runs: Vec<ArmRun> = in_parallel(config.jobs, rl_runs, &run_one)?.into_iter().flatten().collect();
    let analysis = match config.seeds.first() {
        Some(&seed) => Some(analyze(config, seed, device)?),
        None => None,
    };
    let report =
        ExperimentReport { config: config.clone(), runs: arm_runs, analysis, seconds: start.elapsed().as_secs_f64() };
    report.write()?;
    Ok(report)
}

/// One run of the experiment: the seed's SFT run (`arm` `None`) or an arm's RL run from the seed's SFT checkpoint,
/// in its own folder (replaced: only reached with `overwrite`), with `metrics.jsonl` and `summary.json`.
fn train_one(
    config: &ExperimentConfig,
    device: &Device,
    seed: u64,
    arm: Option<&Arm>,
    checked: crate::CheckedConfig,
) -> Result<Option<ArmRun>> {
    let seed_dir = config.out_dir.join(format!("seed-{seed}"));
    let sft_checkpoint = seed_dir.join("sft").join("checkpoints").join("step-000000");
    let dir = seed_dir.join(folder_name(arm.map_or("sft", |a| a.name.as_str())));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?; // only reached with `overwrite`
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let metrics = dir.join("metrics.jsonl");
    let file = std::fs::File::create(&metrics).map_err(io(&metrics))?;
    let mut observer = Collect { jsonl: JsonlWriter::new(file, &metrics), tokens: Vec::new(), percentiles: Vec::new() };
    let mut trainer = match arm {
        None => Trainer::new(checked, device)?.with_checkpoints(dir.join("checkpoints")),
        Some(_) => {
            Trainer::from_sft_checkpoint(checked, &sft_checkpoint, device)?.with_checkpoints(dir.join("checkpoints"))
        }
    };
    let summary = trainer.run(&mut observer, None)?;
    observer.jsonl.flush()?;
    let text = serde_json::to_string_pretty(&summary).map_err(|e| TrainerError::Shape(e.to_string()))?;
    let path = dir.join("summary.json");
    write_atomic(&path, &text).map_err(io(&path))?;
    Ok(arm.map(|a| ArmRun {
        arm: a.name.clone(),
        seed,
        sft_checkpoint,
        summary,
        tokens_per_step: finite_mean(&observer.tokens),
        entropy_percentiles: observer.percentiles,
    }))
}

/// `f` over `items` on up to `jobs` threads, results in the order of `items`; after the first error no new item is
/// started, and the first error (in item order) is returned.
fn in_parallel<T: Send, R: Send>(jobs: usize, items: Vec<T>, f: &(impl Fn(T) -> Result<R> + Sync)) -> Result<Vec<R>> {
    use std::sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    };
    let n = items.len();
    let queue = Mutex::new(items.into_iter().enumerate());
    let results: Mutex<Vec<Option<Result<R>>>> = Mutex::new((0..n).map(|_| None).collect());
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            scope.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let Some((i, item)) = queue.lock().unwrap_or_else(PoisonError::into_inner).next() else { break };
                    let r = f(item);
                    failed.fetch_or(r.is_err(), Ordering::SeqCst);
                    results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(PoisonError::into_inner).into_iter().flatten().collect()
}

fn folder_name(arm: &str) -> String {
    arm.replace('%', "pct").chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect()
}

fn finite_mean(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() { f64::NAN } else { f.iter().sum::<f64>() / f.len() as f64 }
}

/// The paper's §3–4 analyses in miniature, for one seed, on a fixed set of held-out responses: up to
/// [`ANALYSIS_RESPONSES`] held-out prompts, one response each sampled from the SFT model at the rollout decoding, then
/// teacher-forced through the SFT model and each arm's final model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntropyAnalysis {
    /// The seed analysed.
    pub seed: u64,
    /// Responses and response tokens analysed.
    pub responses: usize,
    /// Response tokens.
    pub tokens: usize,
    /// SFT model: share of tokens with entropy below 0.01 (paper: 50.6 %).
    pub frac_below_0_01: f64,
    /// SFT model: 80th percentile of token entropy (paper: 0.672).
    pub p80: f64,
    /// SFT model: the highest-mean-entropy tokens seen more than 5 times ("forking tokens"), decoded.
    pub forking_tokens: Vec<forkrl_entropy::TokenEntropy>,
    /// SFT model: the lowest-mean-entropy tokens seen more than 5 times, decoded.
    pub low_entropy_tokens: Vec<forkrl_entropy::TokenEntropy>,
    /// Per arm: the share of the SFT model's top-20 % entropy positions that stay in the final model's top 20 % (the
    /// paper's Table 1).
    pub overlap: Vec<(String, f64)>,
    /// Per arm: entropy change (final − SFT) binned by the SFT model's entropy percentile (the paper's Fig. 4).
    pub change: Vec<(String, Vec<forkrl_entropy::EntropyChangeBin>)>,
    /// Two-temperature decoding of the SFT model (the paper's Fig. 3): `(t_high, pass@1, pass@k)` with the temperature
    /// `t_high` at tokens whose entropy exceeds the SFT model's 80th percentile and the rollout temperature elsewhere;
    /// `t_high` equal to the rollout temperature is plain sampling.
    pub two_temperature: Vec<(f64, f64, f64)>,
    /// `k` of the pass@k above.
    pub k: usize,
}

/// Held-out prompts of [`EntropyAnalysis`] (at most).
pub const ANALYSIS_RESPONSES: usize = 100;

/// Entropy `[rows, W]` of `batch`'s target tokens under `policy` at `temperature`, on the host.
fn entropies(
    policy: &crate::model::policy::Policy,
    batch: &crate::batch::RolloutBatch,
    temperature: f32,
) -> Result<Vec<f32>> {
    let (h, _) = crate::model::token_stats(policy, batch.ids(), batch.width(), temperature)?;
    crate::host_f32(h)
}

/// [`EntropyAnalysis`] of `seed` from its SFT checkpoint and its arms' final checkpoints.
///
/// # Errors
/// Checkpoint, sampler and library errors.
pub fn analyze(config: &ExperimentConfig, seed: u64, device: &Device) -> Result<EntropyAnalysis> {
    use forkrl_core::{SeedStream, derive_seed};
    use forkrl_entropy::{
        SummaryOptions, entropy_change_by_base_percentile, summarize, token_entropy_table, top_entropy_overlap,
        top_high_entropy_tokens,
    };
    use forkrl_rollout::Decoding;

    use crate::{
        batch::{Rollout, RolloutBatch},
        eval,
    };

    let seed_dir = config.out_dir.join(format!("seed-{seed}"));
    let sft = Trainer::from_checkpoint(&seed_dir.join("sft").join("checkpoints").join("step-000000"), device)?;
    let (c, vocab) = (sft.config(), sft.vocab());
    let problems: Vec<crate::tasks::Problem> = sft.test_set().iter().take(ANALYSIS_RESPONSES).cloned().collect();
    let prompts: Vec<Vec<u32>> = problems.iter().map(|p| vocab.encode(&p.prompt)).collect::<Result<_>>()?;
    let stream = derive_seed(c.run.seed, SeedStream::Control, &[0xA7A1_7515]);
    let out = eval::generate(sft.policy(), vocab, &prompts, c.rl.decoding, c.rl.max_response_len, stream)?;
    let rollouts: Vec<Rollout> = prompts
        .iter()
        .zip(out)
        .map(|(p, (response, truncated))| Rollout { prompt: p.clone(), response, truncated, reward: 0.0 })
        .collect();
    let n = rollouts.len();
    let batch = RolloutBatch::new(0, rollouts, vec![1; n], vocab.pad)?;
    let (mask, w) = (batch.response_mask().to_vec(), batch.width());
    let temperature = c.temperature();
    let sft_policy = burn::module::Module::valid(sft.policy());
    let base = entropies(&sft_policy, &batch, temperature)?;
    let summary = summarize(&base, &mask, &SummaryOptions::default())?;
    let targets: Vec<u32> = batch.ids().iter().flat_map(|row| row[1..=w].iter().copied()).collect();
    let table = token_entropy_table(&targets, &base, &mask)?;
    let decode = |id: u32| {
        if vocab.eos.contains(&id) { "<eos>".to_string() } else { vocab.tokenizer.decode_response(&[id], &[]) }
    };
    let forking_tokens = top_high_entropy_tokens(&table, 5, 15, decode);
    let mut low: Vec<&forkrl_entropy::TokenEntropy> = table.iter().filter(|t| t.count > 5).collect();
    low.sort_by(|a, b| a.mean_entropy.total_cmp(&b.mean_entropy).then(b.count.cmp(&a.count)));
    let low_entropy_tokens = low
        .into_iter()
        .take(10)
        .map(|t| forkrl_entropy::TokenEntropy { text: Some(decode(t.id)), ..t.clone() })
        .collect();
    let (mut overlap, mut change) = (Vec::new(), Vec::new());
    for arm in &config.arms {
        let dir = seed_dir.join(folder_name(&arm.name)).join("checkpoints");
        let Some(last) = crate::rl::state::latest_checkpoint(&dir)? else { continue };
        let (policy, _) = crate::model::checkpoint::load_policy(&last, device)?;
        let policy = policy.with_dtype(c.model.dtype);
        let trained = entropies(&policy, &batch, temperature)?;
        overlap.push((arm.name.clone(), top_entropy_overlap(&base, &trained, &mask, 0.2)?));
        change.push((arm.name.clone(), entropy_change_by_base_percentile(&base, &trained, &mask, 5)?));
    }
    let p80 = summary.percentiles.iter().find(|(q, _)| *q == 80.0).map_or(f64::NAN, |x| x.1);
    let k = c.eval.pass_k.max(1);
    let t = f64::from(temperature);
    let mut two_temperature = Vec::new();
    for t_high in [t, 0.5 * t, 1.5 * t, 2.0 * t] {
        let decoding = if t_high == t {
            c.rl.decoding
        } else {
            Decoding::TwoTemperature { t_high, t_low: t, threshold: p80.max(0.0) }
        };
        let (p1, pk) = eval::pass_at_k(sft.policy(), vocab, &problems, k, decoding, c.rl.max_response_len, stream)?;
        two_temperature.push((t_high, p1, pk));
    }
    Ok(EntropyAnalysis {
        seed,
        responses: n,
        tokens: summary.count,
        frac_below_0_01: summary.frac_below.iter().find(|(x, _)| (*x - 1e-2).abs() < 1e-12).map_or(f64::NAN, |x| x.1),
        p80,
        forking_tokens,
        low_entropy_tokens,
        overlap,
        change,
        two_temperature,
        k,
    })
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom (1.96 beyond 30).
pub fn t_975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        _ => 1.96,
    }
}

fn analysis_markdown(a: &EntropyAnalysis) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Entropy analyses (seed {}, {} held-out responses sampled from the SFT model, {} response tokens)\n",
        a.seed, a.responses, a.tokens
    );
    let _ = writeln!(
        s,
        "SFT model: {:.1} % of tokens below 0.01 nats (paper: 50.6 %); 80th percentile {:.3} nats (paper: 0.672).\n",
        100.0 * a.frac_below_0_01,
        a.p80
    );
    let list = |v: &[forkrl_entropy::TokenEntropy]| -> String {
        v.iter()
            .map(|t| format!("`{}` ({:.3}, ×{})", t.text.as_deref().unwrap_or("?"), t.mean_entropy, t.count))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ =
        writeln!(s, "Forking tokens (highest mean entropy, seen more than 5 times): {}.\n", list(&a.forking_tokens));
    let _ = writeln!(s, "Lowest-entropy tokens: {}.\n", list(&a.low_entropy_tokens));
    let _ = writeln!(
        s,
        "| arm | top-20 % overlap SFT → final (Table 1) | entropy change by SFT-entropy quintile (Fig. 4), low → high |"
    );
    let _ = writeln!(s, "|---|---|---|");
    for ((arm, o), (_, bins)) in a.overlap.iter().zip(&a.change) {
        let bins: Vec<String> = bins.iter().map(|b| format!("{:+.3}", b.mean_change)).collect();
        let _ = writeln!(s, "| {arm} | {:.1} % | {} |", 100.0 * o, bins.join(" / "));
    }
    let _ = writeln!(
        s,
        "\nTwo-temperature decoding of the SFT model (Fig. 3): temperature `t_high` above the 80th-percentile entropy, \
         the rollout temperature below.\n"
    );
    let _ = writeln!(s, "| t_high | pass@1 | pass@{} |", a.k);
    let _ = writeln!(s, "|---|---|---|");
    for (t, p1, pk) in &a.two_temperature {
        let _ = writeln!(s, "| {t:.2} | {p1:.3} | {pk:.3} |");
    }
    s
}

/// `(mean, half-width of the 95 % CI)` of a sample (half-width NaN for fewer than two values).
pub fn mean_ci(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t_975(n - 1) * (var / n as f64).sqrt())
}

/// An experiment's runs and its statistics.
#[derive(Debug, Clone)]
pub struct ExperimentReport {
    /// What ran.
    pub config: ExperimentConfig,
    /// Every arm × seed.
    pub runs: Vec<ArmRun>,
    /// The entropy analyses of the first seed.
    pub analysis: Option<EntropyAnalysis>,
    /// Wall time of the whole experiment.
    pub seconds: f64,
}

/// One arm's row of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmRow {
    /// The arm.
    pub arm: String,
    /// Mean over seeds of `final − SFT` held-out greedy accuracy.
    pub gain: f64,
    /// Mean paired difference of the final accuracy to the baseline's, and its 95 % CI half-width.
    pub diff: (f64, f64),
    /// Mean final pass@1 and pass@k.
    pub pass: (f64, f64),
    /// Mean policy-gradient tokens per RL step.
    pub tokens_per_step: f64,
    /// Mean wall time per run, seconds.
    pub seconds: f64,
}

impl ExperimentReport {
    /// The runs of `arm`, in seed order.
    pub fn arm_runs(&self, arm: &str) -> Vec<&ArmRun> {
        let mut v: Vec<&ArmRun> = self.runs.iter().filter(|r| r.arm == arm).collect();
        v.sort_by_key(|r| r.seed);
        v
    }

    /// The table's rows, in the arms' order.
    pub fn rows(&self) -> Vec<ArmRow> {
        let base = self.arm_runs(&self.config.baseline);
        self.config
            .arms
            .iter()
            .map(|a| {
                let runs = self.arm_runs(&a.name);
                let mean = |f: &dyn Fn(&ArmRun) -> f64| finite_mean(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
                let diffs: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| base.iter().find(|b| b.seed == r.seed))
                    .zip(&runs)
                    .map(|(b, r)| r.summary.final_accuracy - b.summary.final_accuracy)
                    .collect();
                ArmRow {
                    arm: a.name.clone(),
                    gain: mean(&|r| r.summary.final_accuracy - r.summary.sft_accuracy),
                    diff: mean_ci(&diffs),
                    pass: (mean(&|r| r.summary.final_pass_at_k.0), mean(&|r| r.summary.final_pass_at_k.1)),
                    tokens_per_step: mean(&|r| r.tokens_per_step),
                    seconds: mean(&|r| r.summary.seconds),
                }
            })
            .collect()
    }

    /// `report.md`.
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let k = c.base.eval.pass_k;
        let mut s = String::new();
        let _ = writeln!(s, "# Experiment `{}`\n", c.name);
        if !c.command.is_empty() {
            let _ = writeln!(s, "Made by `{}` in {:.0} s.\n", c.command, self.seconds);
        }
        let _ = writeln!(
            s,
            "Paired design: per seed, one SFT run ({} steps) whose checkpoint every arm starts from, with the same RL \
             seed in every arm; {} RL steps per arm; held-out greedy accuracy on {} problems; seeds {:?}. The \
             difference to `{}` is per seed, then averaged, with a 95 % CI from the t-distribution (n − 1 degrees of \
             freedom; none for one seed).\n",
            c.base.sft.steps, c.base.rl.steps, c.base.eval.size, c.seeds, c.baseline
        );
        let _ = writeln!(
            s,
            "| arm | mean accuracy gain (after RL − after SFT) | paired difference to {} [95 % CI] | pass@1 | pass@{k} | \
             tokens trained / step | time / run (s) |",
            c.baseline
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for r in self.rows() {
            let diff = if r.arm == c.baseline {
                "—".to_string()
            } else if r.diff.1.is_finite() {
                format!("{:+.3} [{:+.3}, {:+.3}]", r.diff.0, r.diff.0 - r.diff.1, r.diff.0 + r.diff.1)
            } else {
                format!("{:+.3} (one seed: no CI)", r.diff.0)
            };
            let _ = writeln!(
                s,
                "| {} | {:+.3} | {} | {:.3} | {:.3} | {:.0} | {:.0} |",
                r.arm, r.gain, diff, r.pass.0, r.pass.1, r.tokens_per_step, r.seconds
            );
        }
        let _ = writeln!(s, "\nPer seed (held-out greedy accuracy after SFT → after RL):\n");
        let _ = writeln!(s, "| seed | {} |", c.arms.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(c.arms.len()));
        for &seed in &c.seeds {
            let cells: Vec<String> = c
                .arms
                .iter()
                .map(|a| {
                    self.runs.iter().find(|r| r.arm == a.name && r.seed == seed).map_or("—".into(), |r| {
                        format!("{:.3} → {:.3}", r.summary.sft_accuracy, r.summary.final_accuracy)
                    })
                })
                .collect();
            let _ = writeln!(s, "| {seed} | {} |", cells.join(" | "));
        }
        if let Some(a) = &self.analysis {
            s.push_str(&analysis_markdown(a));
        }
        if let Some(h) = self.sft_entropy() {
            let below = h.frac_below.iter().find(|(t, _)| (*t - 1e-2).abs() < 1e-12).map_or(f64::NAN, |x| x.1);
            let p80 = h.percentiles.iter().find(|(q, _)| *q == 80.0).map_or(f64::NAN, |x| x.1);
            let _ = writeln!(
                s,
                "\nThe SFT model's token entropy (the first RL batch of seed {}, {} response tokens): {:.1} % of tokens \
                 below 0.01 nats (paper: 50.6 %), 80th percentile {:.3} (paper: 0.672). `entropy.svg` shows the \
                 histogram and the top arm's percentiles over training; `curves.svg` the held-out accuracy per arm.",
                c.seeds.first().copied().unwrap_or(0),
                h.count,
                100.0 * below,
                p80
            );
        }
        s
    }

    /// The SFT model's token-entropy summary: the first RL batch of the first seed's first arm.
    pub fn sft_entropy(&self) -> Option<&forkrl_entropy::EntropySummary> {
        let seed = self.config.seeds.first()?;
        let arm = self.config.arms.first()?;
        self.runs.iter().find(|r| r.seed == *seed && r.arm == arm.name)?.summary.first_batch_entropy.as_ref()
    }

    /// `curves.svg`: per arm and evaluation step, the mean held-out accuracy over seeds (left) and the mean gain over
    /// each seed's post-SFT accuracy with its 95 % confidence interval as a band (right; paired per seed, no band with
    /// one seed).
    pub fn curves_svg(&self) -> String {
        line_chart_svg(&self.curves_panels())
    }

    fn curves_panels(&self) -> Vec<Panel> {
        // Per arm: the steps evaluated, and per step the accuracy of each seed's run and its gain over the run's
        // post-SFT accuracy (step 0); the gain is paired per seed, so its CI leaves out the spread between seeds' SFT
        // checkpoints.
        let (mut means, mut gains) = (Vec::new(), Vec::new());
        let (mut low, mut high) = (0.0f64, 0.0f64);
        for a in &self.config.arms {
            let runs = self.arm_runs(&a.name);
            let steps: Vec<usize> =
                runs.first().map(|r| r.summary.eval_curve.iter().map(|p| p.0).collect()).unwrap_or_default();
            let (mut mean, mut gain, mut band) = (Vec::new(), Vec::new(), Vec::new());
            for (i, &step) in steps.iter().enumerate() {
                let at = |r: &&ArmRun, k: usize| r.summary.eval_curve.get(k).map(|p| p.1);
                let acc: Vec<f64> = runs.iter().filter_map(|r| at(r, i)).collect();
                let delta: Vec<f64> = runs.iter().filter_map(|r| Some(at(r, i)? - at(r, 0)?)).collect();
                mean.push((step as f64, mean_ci(&acc).0));
                let (m, half) = mean_ci(&delta);
                gain.push((step as f64, m));
                band.push((step as f64, m - half, m + half));
                for v in [m, m - half, m + half].into_iter().filter(|v| v.is_finite()) {
                    (low, high) = (low.min(v), high.max(v));
                }
            }
            means.push(Series::new(a.name.clone(), mean));
            gains.push(Series { name: a.name.clone(), points: gain, band });
        }
        let margin = 0.05 * (high - low).max(0.1);
        vec![
            Panel {
                title: format!("held-out greedy accuracy, mean over {} seeds", self.config.seeds.len()),
                x_label: "RL step".into(),
                y_min: 0.0,
                y_max: 1.0,
                series: means,
            },
            Panel {
                title: "gain over the SFT checkpoint: mean, 95% CI".into(),
                x_label: "RL step".into(),
                y_min: low - margin,
                y_max: high + margin,
                series: gains,
            },
        ]
    }

    /// `entropy.svg`: the SFT model's token-entropy histogram (share of tokens per log-spaced bin) with its 80th
    /// percentile marked, and the first arm's percentiles per RL step (first seed).
    pub fn entropy_svg(&self) -> String {
        line_chart_svg(&self.entropy_panels())
    }

    fn entropy_panels(&self) -> Vec<Panel> {
        let mut panels = Vec::new();
        if let Some(h) = self.sft_entropy() {
            let hist = &h.histogram;
            let total = (hist.counts.iter().sum::<u64>() + hist.underflow + hist.overflow).max(1) as f64;
            let points: Vec<(f64, f64)> =
                hist.edges.iter().zip(&hist.counts).map(|(&lo, &c)| (lo.log10(), c as f64 / total)).collect();
            let top = points.iter().map(|p| p.1).fold(0.0, f64::max);
            let mut series = vec![Series::new("share of tokens", points)];
            if let Some(&(_, p80)) = h.percentiles.iter().find(|(q, _)| *q == 80.0) {
                let x = p80.max(1e-12).log10();
                series.push(Series::new(format!("80th percentile {p80:.3}"), vec![(x, 0.0), (x, top)]));
            }
            panels.push(Panel {
                title: format!(
                    "SFT model: token entropy ({:.0} % below the first bin)",
                    100.0 * hist.underflow as f64 / total
                ),
                x_label: "log10 entropy (nats)".into(),
                y_max: top,
                y_min: 0.0,
                series,
            });
        }
        if let (Some(arm), Some(seed)) = (self.config.arms.first(), self.config.seeds.first())
            && let Some(r) = self.runs.iter().find(|r| r.arm == arm.name && r.seed == *seed)
        {
            let pick = |f: fn(&(usize, f64, f64, f64)) -> f64| -> Vec<(f64, f64)> {
                r.entropy_percentiles.iter().map(|p| (p.0 as f64, f(p))).collect()
            };
            let top = r.entropy_percentiles.iter().map(|p| p.3).fold(0.0, f64::max);
            panels.push(Panel {
                title: format!("{}: rollout token entropy over training (seed {seed})", arm.name),
                x_label: "RL step".into(),
                y_max: top,
                y_min: 0.0,
                series: vec![
                    Series::new("p50", pick(|p| p.1)),
                    Series::new("p80", pick(|p| p.2)),
                    Series::new("p95", pick(|p| p.3)),
                ],
            });
        }
        panels
    }

    /// Writes `report.md`, `curves.svg` and `curves.png`, `entropy.svg` and `entropy.png`, `runs.json` (every run's
    /// numbers) and `analysis.json`, each atomically.
    ///
    /// # Errors
    /// [`TrainerError::Io`].
    pub fn write(&self) -> Result<()> {
        let dir = &self.config.out_dir;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let runs = serde_json::to_string_pretty(&self.runs).map_err(|e| TrainerError::Shape(e.to_string()))?;
        let analysis = serde_json::to_string_pretty(&self.analysis).map_err(|e| TrainerError::Shape(e.to_string()))?;
        let (curves, entropy) = (self.curves_panels(), self.entropy_panels());
        let png = |panels: &[Panel], name: &str| line_chart_png(panels).map_err(io(&dir.join(name)));
        for (name, bytes) in [
            ("analysis.json", analysis.into_bytes()),
            ("curves.svg", line_chart_svg(&curves).into_bytes()),
            ("curves.png", png(&curves, "curves.png")?),
            ("entropy.svg", line_chart_svg(&entropy).into_bytes()),
            ("entropy.png", png(&entropy, "entropy.png")?),
            ("runs.json", runs.into_bytes()),
            ("report.md", self.markdown().into_bytes()),
        ] {
            let path = dir.join(name);
            write_atomic_bytes(&path, &bytes).map_err(io(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ci_uses_student_t() {
        // d = [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, t(2) = 4.303 → half-width 4.303 · 0.1 / √3.
        let (m, h) = mean_ci(&[0.1, 0.2, 0.3]);
        assert!((m - 0.2).abs() < 1e-12 && (h - 4.303 * 0.1 / 3f64.sqrt()).abs() < 1e-9, "{m} {h}");
        assert!(mean_ci(&[0.5]).1.is_nan() && mean_ci(&[]).0.is_nan());
        assert_eq!((t_975(1), t_975(30), t_975(100)), (12.706, 2.042, 1.96));
    }

    #[test]
    fn the_arms_are_the_papers_and_a_control() {
        let quick: Vec<String> = forking_tokens_arms(true).into_iter().map(|a| a.name).collect();
        assert_eq!(quick, ["top-20%", "all tokens", "bottom-80%"]);
        let full = forking_tokens_arms(false);
        assert_eq!(full.len(), 6);
        let base = forking_tokens_base();
        assert!(matches!(base.task, crate::tasks::TaskConfig::Sum(_)));
        for arm in &full {
            let c = base.with_sets(&arm.sets).expect("applies").check().expect("valid");
            let expect = arm.sets.iter().find(|(k, _)| k == "rl.forking.select").map(|(_, v)| v.as_str());
            assert_eq!(Some(c.token_selection().name()), expect, "{}", arm.name);
        }
        assert_eq!(folder_name("top-20%"), "top-20pct");
    }

    #[test]
    fn in_parallel_keeps_order_and_stops_at_the_first_error() {
        let squares = in_parallel(3, (0..10).collect(), &|i: u64| Ok(i * i)).expect("no error");
        assert_eq!(squares, (0..10).map(|i| i * i).collect::<Vec<u64>>());
        let started = std::sync::atomic::AtomicUsize::new(0);
        let failing = |i: u64| {
            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i == 0 { Err(TrainerError::Shape("first".into())) } else { Ok(i) }
        };
        let err = in_parallel(1, (0..10).collect(), &failing).expect_err("fails");
        assert!(err.to_string().contains("first"), "{err}");
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1, "nothing starts after an error");
        assert!(in_parallel(4, Vec::<u64>::new(), &|i| Ok(i)).expect("empty").is_empty());
    }
}
