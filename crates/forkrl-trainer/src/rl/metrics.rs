//! What a run reports, and to whom: [`Observer`] receives every metrics row ([`MetricsRow`], verl's names) and every
//! event ([`Event`]: SFT steps, evaluations, RL steps, checkpoints); the library never prints. [`JsonlWriter`] writes
//! rows as `metrics.jsonl`; [`Recorder`] keeps them in memory (tests, notebooks); [`TrainSummary`] is what a run
//! measured, and [`summary_svg`] draws it.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use forkrl_core::report::{Panel, Series, line_chart_svg};
use forkrl_entropy::entropy_stats::{EntropySummary, SummaryOptions, summarize};
use serde::{Deserialize, Serialize};

use crate::{
    Result, TrainerError,
    batch::{RolloutBatch, Scores},
    rl::update::UpdateStats,
};

/// One line of `metrics.jsonl`: a phase (`sft`, `rl`, `eval`), a step, and named values.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    /// `sft`, `rl` or `eval`.
    pub phase: &'static str,
    /// The SFT step, or the RL step (0: after SFT).
    pub step: usize,
    /// Metric name → value (NaN is written as `null`).
    pub values: BTreeMap<String, f64>,
}

impl MetricsRow {
    /// An empty row.
    pub fn new(phase: &'static str, step: usize) -> Self {
        Self { phase, step, values: BTreeMap::new() }
    }

    /// Adds a value.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: f64) -> Self {
        self.values.insert(key.into(), value);
        self
    }

    /// A value by name.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).copied()
    }

    /// The row as one JSON object (keys sorted; `phase` and `step` included).
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (k, &v) in &self.values {
            map.insert(k.clone(), serde_json::json!(v));
        }
        map.insert("phase".into(), self.phase.into());
        map.insert("step".into(), self.step.into());
        serde_json::Value::Object(map)
    }
}

/// Something that happened during a run, for progress displays and logs.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The run continues from a checkpoint after RL step `step`.
    Resumed {
        /// The checkpoint directory.
        checkpoint: &'a Path,
        /// Its RL step.
        step: usize,
    },
    /// One SFT optimiser step (0-based `step` of `total`).
    SftStep {
        /// The step.
        step: usize,
        /// SFT steps in all.
        total: usize,
        /// Its loss.
        loss: f64,
    },
    /// A held-out evaluation after RL step `step` (0: after SFT). `pass_at_k` is present after SFT and at the end.
    Evaluated {
        /// The RL step.
        step: usize,
        /// Greedy accuracy (absent for a pass@k-only evaluation).
        accuracy: Option<f64>,
        /// `(k, pass@1, pass@k)`.
        pass_at_k: Option<(usize, f64, f64)>,
    },
    /// One RL step done, with its metrics row.
    RlStep {
        /// The step.
        step: usize,
        /// RL steps in all.
        total: usize,
        /// Its metrics.
        row: &'a MetricsRow,
        /// Seconds left at the mean pace of this process.
        eta_seconds: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Its RL step.
        step: usize,
        /// Its directory.
        path: &'a Path,
    },
    /// The run stopped early after the checkpoint of RL step `step` (`stop_after`).
    Stopped {
        /// The step.
        step: usize,
    },
}

/// Receives a run's metrics rows and events.
pub trait Observer {
    /// One metrics row. A checkpoint records how many rows were delivered, so that a resumed run's `metrics.jsonl`
    /// can be cut back to them.
    ///
    /// # Errors
    /// A failed write ([`TrainerError::Io`]); the run stops with it.
    fn metrics(&mut self, row: &MetricsRow) -> Result<()>;

    /// An event (progress, evaluations, checkpoints). The default ignores it.
    fn event(&mut self, event: &Event<'_>) {
        let _ = event;
    }
}

/// Ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn metrics(&mut self, _row: &MetricsRow) -> Result<()> {
        Ok(())
    }
}

/// Keeps every row and a one-line description of every event.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    /// The rows, in order.
    pub rows: Vec<MetricsRow>,
    /// The events, formatted with `{:?}`.
    pub events: Vec<String>,
}

impl Recorder {
    /// The rows of one phase.
    pub fn phase(&self, phase: &str) -> Vec<&MetricsRow> {
        self.rows.iter().filter(|r| r.phase == phase).collect()
    }
}

impl Observer for Recorder {
    fn metrics(&mut self, row: &MetricsRow) -> Result<()> {
        self.rows.push(row.clone());
        Ok(())
    }

    fn event(&mut self, event: &Event<'_>) {
        self.events.push(format!("{event:?}"));
    }
}

/// Writes rows as JSON lines (`metrics.jsonl`).
#[derive(Debug)]
pub struct JsonlWriter<W: Write> {
    out: W,
    path: PathBuf,
}

impl<W: Write> JsonlWriter<W> {
    /// Writes to `out`; `path` names it in errors.
    pub fn new(out: W, path: impl Into<PathBuf>) -> Self {
        Self { out, path: path.into() }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Flushes the writer.
    ///
    /// # Errors
    /// [`TrainerError::Io`] naming the path.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|source| TrainerError::Io { path: self.path.clone(), source })
    }
}

impl<W: Write> Observer for JsonlWriter<W> {
    fn metrics(&mut self, row: &MetricsRow) -> Result<()> {
        writeln!(self.out, "{}", row.to_json()).map_err(|source| TrainerError::Io { path: self.path.clone(), source })
    }
}

/// The metrics row of one RL step (verl's names, plus ours), and the entropy statistics of its rollout tokens.
///
/// # Errors
/// The entropy summary's errors (a non-finite entropy on a response token).
pub fn rl_step_row(
    batch: &RolloutBatch,
    scores: &Scores,
    stats: &UpdateStats,
    seconds: f64,
) -> Result<(MetricsRow, EntropySummary)> {
    let entropy = summarize(&scores.old_entropy, batch.response_mask(), &SummaryOptions::default())?;
    let b = batch.len() as f64;
    let tokens = batch.num_response_tokens() as f64;
    let trained = scores.train_mask.iter().filter(|&&m| m).count() as f64;
    let response_tokens = batch.response_mask().iter().filter(|&&m| m).count().max(1) as f64;
    let truncated = batch.rollouts().iter().filter(|r| r.truncated).count() as f64;
    let mut row = MetricsRow::new("rl", batch.step)
        .with("actor/pg_loss", stats.pg_loss)
        .with("actor/entropy", stats.entropy)
        .with("actor/pg_clipfrac", stats.pg_clipfrac)
        .with("actor/pg_clipfrac_lower", stats.pg_clipfrac_lower)
        .with("actor/ppo_kl", stats.ppo_kl)
        .with("actor/kl_loss", stats.kl_loss)
        .with("actor/grad_norm", stats.grad_norm)
        .with("actor/lr", stats.lr)
        .with("critic/score/mean", batch.rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / b)
        .with("critic/advantages/max", scores.advantages.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x))))
        .with("response_length/mean", tokens / b)
        .with("response_length/clip_ratio", truncated / b)
        .with("frac_reward_zero_std", batch.frac_zero_std_before_filter.unwrap_or(scores.frac_reward_zero_std))
        .with("forking/threshold", stats.forking_threshold.map_or(f64::NAN, f64::from))
        .with("forking/frac_selected", stats.forking_frac_selected)
        .with("rollout/frac_trained", trained / response_tokens)
        .with("rollout/num_responses", b)
        .with("rollout/group_size_max", batch.group_sizes().iter().copied().max().unwrap_or(0) as f64)
        .with("perf/throughput", tokens / seconds)
        .with("perf/time_per_step", seconds)
        .with("rollout/entropy/mean", entropy.mean)
        .with("critic/rewards/mean", scores.rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / b);
    if let Some((beta, kl)) = scores.reward_kl {
        row = row.with("actor/reward_kl_penalty", kl).with("actor/reward_kl_penalty_coeff", beta);
    }
    row = method_metrics(row, batch, scores, stats);
    // The paper's entropy analyses per step: percentiles of the rollout policy's token entropy and the shares below
    // 1e-2 and 0.672 (its 50.6 % and 80th percentile).
    for &(q, v) in &entropy.percentiles {
        row = row.with(format!("rollout/entropy/p{q:.0}"), v);
    }
    for &(t, frac) in &entropy.frac_below {
        row = row.with(format!("rollout/entropy/frac_below_{t}"), frac);
    }
    Ok((row, entropy))
}

/// The metrics of issue 18's methods that are on: `distill/*`, `heal/*`, `ugttt/*`, `imax/*`, `sort/*`.
fn method_metrics(mut row: MetricsRow, batch: &RolloutBatch, scores: &Scores, stats: &UpdateStats) -> MetricsRow {
    if let Some(d) = &scores.distill {
        let (kl, k1, bypassed, rock_share) = d.metrics(batch.response_mask(), &scores.old_log_prob);
        row = row
            .with("distill/reverse_kl", kl)
            .with("distill/k1", k1)
            .with("distill/frac_bypassed", bypassed)
            .with("distill/rock_kl_share", rock_share)
            .with("distill/num_rocks", d.rocks.len() as f64)
            .with("distill/loss", stats.distill_loss);
    }
    if let Some((eda, general)) = &scores.heal {
        let mean = |keep: &dyn Fn(usize) -> bool, v: &dyn Fn(usize) -> f64| {
            let rows: Vec<usize> = (0..eda.len()).filter(|&r| keep(r)).collect();
            rows.iter().map(|&r| v(r)).sum::<f64>() / rows.len().max(1) as f64
        };
        let reward = |r: usize| f64::from(batch.rewards[r]);
        row = row
            .with("heal/eda_reward", mean(&|_| true, &|r| f64::from(eda[r])))
            .with("heal/general_rows", general.iter().filter(|&&g| g).count() as f64)
            .with("heal/target_score", mean(&|r| !general[r], &reward))
            .with("heal/general_score", mean(&|r| general[r], &reward));
    }
    if let Some(mi) = &scores.epistemic {
        let mask = batch.response_mask();
        let n = mask.iter().filter(|&&m| m).count().max(1) as f64;
        let sum: f64 = mi.iter().zip(mask).filter(|(_, m)| **m).map(|(&x, _)| f64::from(x)).sum();
        row = row.with("ugttt/mi", sum / n).with("ugttt/nuclear_norm", stats.adapter_nuclear_norm);
    }
    if let Some(info) = &scores.info {
        let n = info.len().max(1) as f64;
        row = row
            .with("imax/info_reward", info.iter().map(|&x| f64::from(x)).sum::<f64>() / n)
            .with("imax/prefix_grad_norm", stats.prefix_grad_norm);
    }
    if let Some(s) = &scores.sort {
        let (mean_w, gain, frac_gain) = s.stats;
        row = row
            .with("sort/repair_prompts", s.groups.len() as f64)
            .with("sort/planned", s.planned as f64)
            .with("sort/mean_weight", mean_w)
            .with("sort/mean_log_gain", gain)
            .with("sort/frac_gain", frac_gain)
            .with("sort/repair_loss", stats.repair_loss);
    }
    row
}

/// What a run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Held-out greedy accuracy after SFT, before RL.
    pub sft_accuracy: f64,
    /// Held-out greedy accuracy after RL.
    pub final_accuracy: f64,
    /// Held-out `(pass@1, pass@k)` of `k` samples at the rollout decoding, after SFT.
    pub sft_pass_at_k: (f64, f64),
    /// The same after RL.
    pub final_pass_at_k: (f64, f64),
    /// `(rl step, held-out accuracy)` at each evaluation.
    pub eval_curve: Vec<(usize, f64)>,
    /// `(rl step, mean training reward)`.
    pub reward_curve: Vec<(usize, f64)>,
    /// `(rl step, mean entropy of the response tokens)`.
    pub entropy_curve: Vec<(usize, f64)>,
    /// `(rl step, mean response length in tokens)`.
    pub response_length_curve: Vec<(usize, f64)>,
    /// Entropy statistics (percentiles, log-spaced histogram) of the response tokens of the last RL batch.
    pub last_batch_entropy: Option<EntropySummary>,
    /// The same for the first RL batch of this process: the policy as RL starts (after SFT) on a fresh run.
    #[serde(default)]
    pub first_batch_entropy: Option<EntropySummary>,
    /// Wall time of SFT and RL, seconds (of this process: a resumed run counts from its resumption).
    pub seconds: f64,
    /// What looks wrong with the run (e.g. a policy that RL made markedly worse).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The summary as an SVG chart: reward (train) and held-out accuracy, the entropy of the response tokens and the mean
/// response length against the RL step (0 = after SFT), and the entropy histogram of the last RL batch (share of
/// response tokens per log-spaced bin, against log10 of the bin's lower edge).
pub fn summary_svg(s: &TrainSummary) -> String {
    let series =
        |name: &str, pts: &[(usize, f64)]| Series::new(name, pts.iter().map(|&(x, y)| (x as f64, y)).collect());
    let max_h = s.entropy_curve.iter().map(|p| p.1).fold(0.0, f64::max);
    let max_len = s.response_length_curve.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut panels = vec![
        Panel {
            title: "reward (train) and accuracy (held-out)".into(),
            x_label: "RL step".into(),
            y_max: 1.0,
            y_min: 0.0,
            series: vec![series("reward", &s.reward_curve), series("held-out accuracy", &s.eval_curve)],
        },
        Panel {
            title: "entropy of response tokens (nats)".into(),
            x_label: "RL step".into(),
            y_max: max_h,
            y_min: 0.0,
            series: vec![series("entropy", &s.entropy_curve)],
        },
        Panel {
            title: "response length (tokens)".into(),
            x_label: "RL step".into(),
            y_max: max_len,
            y_min: 0.0,
            series: vec![series("mean length", &s.response_length_curve)],
        },
    ];
    if let Some(h) = &s.last_batch_entropy {
        let hist = &h.histogram;
        let total = (hist.counts.iter().sum::<u64>() + hist.underflow + hist.overflow).max(1) as f64;
        let points: Vec<(f64, f64)> =
            hist.edges.iter().zip(&hist.counts).map(|(&lo, &c)| (lo.log10(), c as f64 / total)).collect();
        let top = points.iter().map(|p| p.1).fold(0.0, f64::max);
        panels.push(Panel {
            title: format!(
                "entropy histogram, last batch ({:.0}% below 1st bin)",
                100.0 * hist.underflow as f64 / total
            ),
            x_label: "log10 entropy (nats)".into(),
            y_max: top,
            y_min: 0.0,
            series: vec![Series::new("share of tokens", points)],
        });
    }
    line_chart_svg(&panels)
}
