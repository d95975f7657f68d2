//! What a checkpoint records and where runs live.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNN/` written atomically (temporary sibling + rename): the policy
//! (`policy.bpk`, `policy_config.json`), the optimiser (`optimizer.bpk`) and [`TrainState`] (`state.json`: step,
//! configuration, summary, metrics rows so far). `checkpoints/latest` names the newest complete one, replaced
//! atomically after it is written; the oldest beyond `checkpoint.keep` are removed after that. The reference policy of
//! the KL loss is saved once as `checkpoints/reference/`.
//!
//! [`RunDir`] is a run's folder (`runs/<name>/`): it refuses to replace a previous run unless asked, and cuts
//! `metrics.jsonl` back to a checkpoint's rows on resume.

use std::{
    fs,
    path::{Path, PathBuf},
};

use forkrl_core::report::write_atomic;
use serde::{Deserialize, Serialize};

use crate::{
    Result, TrainerError,
    config::TrainConfig,
    model::{
        checkpoint,
        policy::{Policy, PolicyConfig},
    },
    rl::metrics::{TrainSummary, summary_svg},
};

/// What a checkpoint records besides the parameters and the optimizer: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The last completed RL step (0: right after SFT).
    pub step: usize,
    /// The run's configuration (a resumed run must match it, `rl.steps` aside).
    pub config: TrainConfig,
    /// The summary so far.
    pub summary: TrainSummary,
    /// Lines of `metrics.jsonl` written so far (a resumed run truncates the file to them).
    pub metrics_lines: usize,
    /// β of KL in the reward after the last step (the adaptive controller's state); `None` when it is off.
    #[serde(default)]
    pub kl_coef: Option<f64>,
    /// HORA's per-prompt history (`source = { kind = "history" }`); `None` otherwise.
    #[serde(default)]
    pub prompt_stats: Option<forkrl_rollout::PromptStatsStore>,
    /// The buffered balance's rows (`rl.balance = "buffered"`); `None` otherwise.
    #[serde(default)]
    pub balance_buffer: Option<crate::rl::balance::RowBuffer>,
}

/// State file inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";
/// Optimizer file inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// File in the checkpoints folder naming the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";

/// The newest complete checkpoint under `dir`, if any.
///
/// # Errors
/// [`TrainerError::Io`] when `latest` exists but cannot be read.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let latest = dir.join(LATEST_FILE);
    if !latest.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&latest).map_err(|source| TrainerError::Io { path: latest.clone(), source })?;
    Ok(Some(dir.join(name.trim())))
}

/// Reads the state of a checkpoint directory.
///
/// # Errors
/// [`TrainerError::Io`] / [`TrainerError::Checkpoint`].
pub fn read_state(checkpoint: &Path) -> Result<TrainState> {
    let path = checkpoint.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|source| TrainerError::Io { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|e| TrainerError::Checkpoint { path, reason: e.to_string() })
}

/// The optimizer's save/load, named so the checkpoint code does not depend on burn's concrete optimizer type.
pub(crate) trait OptimizerState: Sized {
    fn save_to(&self, path: &Path) -> Result<()>;
    fn load_from(self, path: &Path) -> Result<Self>;
}

impl OptimizerState for burn::optim::ModuleOptimizer {
    fn save_to(&self, path: &Path) -> Result<()> {
        self.save(path).map_err(|e| TrainerError::Checkpoint { path: path.to_path_buf(), reason: format!("{e:?}") })
    }

    fn load_from(self, path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(TrainerError::Checkpoint {
                path: path.to_path_buf(),
                reason: "optimizer state missing".into(),
            });
        }
        self.load(path).map_err(|e| TrainerError::Checkpoint { path: path.to_path_buf(), reason: format!("{e:?}") })
    }
}

/// Writes the checkpoint of `state.step` into `dir` atomically, points `latest` at it, and removes the oldest beyond
/// `keep`. Returns its directory.
pub(crate) fn save_checkpoint(
    dir: &Path,
    keep: usize,
    policy: &Policy,
    policy_config: &PolicyConfig,
    optim: &impl OptimizerState,
    state: &TrainState,
) -> Result<PathBuf> {
    let name = format!("step-{:06}", state.step);
    let target = dir.join(&name);
    checkpoint::write_dir_atomic(&target, |tmp| {
        checkpoint::write_policy_files(policy, policy_config, tmp)?;
        optim.save_to(&tmp.join(OPTIMIZER_FILE))?;
        let state_path = tmp.join(STATE_FILE);
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| TrainerError::Checkpoint { path: state_path.clone(), reason: e.to_string() })?;
        fs::write(&state_path, json).map_err(|source| TrainerError::Io { path: state_path, source })
    })?;
    let latest = dir.join(LATEST_FILE);
    write_atomic(&latest, &name).map_err(|source| TrainerError::Io { path: latest, source })?;
    // Drop the oldest step-* directories beyond `keep`.
    let mut steps: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|source| TrainerError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-") && !n.contains('.'))
        })
        .collect();
    steps.sort();
    for old in steps.iter().take(steps.len().saturating_sub(keep)) {
        fs::remove_dir_all(old).map_err(|source| TrainerError::Io { path: old.clone(), source })?;
    }
    Ok(target)
}

/// A run's folder: `config.toml`, `metrics.jsonl`, `checkpoints/`, `summary.json`, `plot.svg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// The run folder `path` (nothing is created yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// Whether the folder holds a run (metrics or checkpoints) that a new run would replace.
    pub fn holds_run(&self) -> bool {
        self.metrics_path().exists() || self.checkpoints().exists()
    }

    /// Refuses a new run in a folder that holds one, unless `overwrite`. Call it before anything runs.
    ///
    /// # Errors
    /// [`TrainerError::RunExists`].
    pub fn check_new(&self, overwrite: bool) -> Result<()> {
        if self.holds_run() && !overwrite { Err(TrainerError::RunExists { path: self.path.clone() }) } else { Ok(()) }
    }

    /// Prepares a new run: removes a previous run's checkpoints when `overwrite`, writes `config.toml`, and returns
    /// an empty `metrics.jsonl`.
    ///
    /// # Errors
    /// [`TrainerError::RunExists`] (see [`RunDir::check_new`]); [`TrainerError::Io`].
    pub fn start(&self, config: &TrainConfig, overwrite: bool) -> Result<fs::File> {
        self.check_new(overwrite)?;
        let checkpoints = self.checkpoints();
        if checkpoints.exists() {
            fs::remove_dir_all(&checkpoints).map_err(|source| TrainerError::Io { path: checkpoints, source })?;
        }
        self.write_config(config)?;
        let path = self.metrics_path();
        fs::File::create(&path).map_err(|source| TrainerError::Io { path, source })
    }

    /// Prepares a resumed run: writes `config.toml` and returns `metrics.jsonl` cut back to its first
    /// `metrics_lines` lines (what the checkpoint had written), open for appending.
    ///
    /// # Errors
    /// [`TrainerError::Checkpoint`] when the file has fewer lines; [`TrainerError::Io`].
    pub fn resume(&self, config: &TrainConfig, metrics_lines: usize) -> Result<fs::File> {
        let path = self.metrics_path();
        let io = |source| TrainerError::Io { path: path.clone(), source };
        let text = fs::read_to_string(&path).map_err(io)?;
        let kept: Vec<&str> = text.lines().take(metrics_lines).collect();
        if kept.len() < metrics_lines {
            return Err(TrainerError::Checkpoint {
                path: path.clone(),
                reason: format!("--resume: {} lines, the checkpoint expects {metrics_lines}", kept.len()),
            });
        }
        self.write_config(config)?;
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        write_atomic(&path, &body).map_err(io)?;
        fs::OpenOptions::new().append(true).open(&path).map_err(io)
    }

    /// Writes `summary.json` and `plot.svg`, atomically.
    ///
    /// # Errors
    /// [`TrainerError::Io`].
    pub fn write_summary(&self, summary: &TrainSummary) -> Result<()> {
        let json = serde_json::to_string_pretty(summary)
            .map_err(|e| TrainerError::Checkpoint { path: self.path.join("summary.json"), reason: e.to_string() })?;
        for (name, body) in [("summary.json", json), ("plot.svg", summary_svg(summary))] {
            let path = self.path.join(name);
            write_atomic(&path, &body).map_err(|source| TrainerError::Io { path, source })?;
        }
        Ok(())
    }

    fn write_config(&self, config: &TrainConfig) -> Result<()> {
        fs::create_dir_all(&self.path).map_err(|source| TrainerError::Io { path: self.path.clone(), source })?;
        let path = self.path.join("config.toml");
        let text = toml::to_string(config)
            .map_err(|e| TrainerError::invalid("config", "(resolved)", format!("cannot be written as TOML: {e}")))?;
        write_atomic(&path, &text).map_err(|source| TrainerError::Io { path, source })
    }
}

/// Whether a checkpoint's configuration allows resuming with `config`: equal except `rl.steps` (a run may be
/// extended) and the run's name and folder (a run may be moved).
pub fn resumable(theirs: &TrainConfig, config: &TrainConfig) -> bool {
    let mut theirs = theirs.clone();
    theirs.rl.steps = config.rl.steps;
    theirs.run.name.clone_from(&config.run.name);
    theirs.run.out_dir.clone_from(&config.run.out_dir);
    theirs == *config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("forkrl-rundir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_run_folder_is_replaced_only_when_asked_and_resume_cuts_metrics_back() {
        let run = RunDir::new(scratch("a"));
        let config = TrainConfig::default();
        assert!(!run.holds_run());
        drop(run.start(&config, false).expect("a new folder"));
        assert!(run.holds_run());
        fs::create_dir_all(run.checkpoints().join("step-000000")).expect("mkdir");
        fs::write(run.metrics_path(), "a\nb\nc\n").expect("write");
        assert!(matches!(run.start(&config, false), Err(TrainerError::RunExists { .. })));
        assert_eq!(fs::read_to_string(run.metrics_path()).expect("read"), "a\nb\nc\n", "untouched");
        // Resume keeps the checkpoint's two rows and appends after them.
        let mut file = run.resume(&config, 2).expect("resumes");
        std::io::Write::write_all(&mut file, b"d\n").expect("append");
        assert_eq!(fs::read_to_string(run.metrics_path()).expect("read"), "a\nb\nd\n");
        // A checkpoint that expects more rows than the file has is an error, and the file stays.
        assert!(matches!(run.resume(&config, 9), Err(TrainerError::Checkpoint { .. })));
        assert_eq!(fs::read_to_string(run.metrics_path()).expect("read"), "a\nb\nd\n");
        // --overwrite replaces the run: no checkpoints, empty metrics.
        drop(run.start(&config, true).expect("overwrites"));
        assert!(!run.checkpoints().exists());
        assert_eq!(fs::read_to_string(run.metrics_path()).expect("read"), "");
        let _ = fs::remove_dir_all(run.path());
    }

    #[test]
    fn resumable_ignores_steps_name_and_folder_only() {
        let a = TrainConfig::default();
        let mut b = a.clone();
        b.rl.steps += 10;
        b.run.name = "moved".into();
        b.run.out_dir = "/elsewhere".into();
        assert!(resumable(&a, &b));
        b.rl.lr *= 2.0;
        assert!(!resumable(&a, &b));
    }
}
