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
    /// The online rock-token detector's window (distillation with a bypass and no fixed rock set); `None` otherwise.
    #[serde(default)]
    pub rock_detector: Option<forkrl_entropy::OnlineRockDetector>,
    /// HEAL's target and general sets (`rl.heal`); `None` otherwise.
    #[serde(default)]
    pub heal: Option<crate::rl::heal::HealData>,
    /// ReasonMaxxer's `adaptive_betaneg` controller.
    #[serde(default)]
    pub adaptive_betaneg: Option<forkrl_advantage::AdaptiveBetaNeg>,
}

/// UG-TTT's adapters inside a checkpoint directory.
pub const ADAPTERS_FILE: &str = "adapters.bpk";
/// Their optimizer's state.
pub const ADAPTERS_OPTIMIZER_FILE: &str = "adapters_optimizer.bpk";
/// IMAX's soft prefixes inside a checkpoint directory (`rl.imax`).
pub const PREFIXES_FILE: &str = "prefixes.bpk";
/// IMAX's prefix optimizer inside a checkpoint directory.
pub const PREFIXES_OPTIMIZER_FILE: &str = "prefixes_optimizer.bpk";

/// State file inside a checkpoint directory.
pub const STATE_FILE: &str = "state.json";
/// Optimizer file inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// File in the checkpoints folder naming the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";

/// Whether `name` is a checkpoint directory's name, `step-` and digits.
fn is_step_name(name: &str) -> bool {
    name.strip_prefix("step-").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `path` holds a whole checkpoint: a readable `state.json`, the policy files and the optimizer.
fn is_complete(path: &Path) -> bool {
    path.is_dir()
        && [checkpoint::POLICY_FILE, checkpoint::CONFIG_FILE, OPTIMIZER_FILE].iter().all(|f| path.join(f).is_file())
        && read_state(path).is_ok()
}

/// The newest complete checkpoint under `dir`, if any: the one `latest` names, or — when `latest` is missing (a crash
/// between a checkpoint's rename and the swap of `latest`), unreadable, or names a missing or incomplete directory —
/// the newest complete `step-*` directory.
///
/// # Errors
/// [`TrainerError::Io`] when `dir` exists but cannot be listed.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let latest = dir.join(LATEST_FILE);
    let named = fs::read_to_string(&latest).ok().map(|n| n.trim().to_string()).filter(|n| is_step_name(n));
    if let Some(path) = named.map(|n| dir.join(n)).filter(|p| is_complete(p)) {
        return Ok(Some(path));
    }
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut steps = step_dirs(dir)?;
    steps.retain(|p| is_complete(p));
    Ok(steps.pop())
}

/// The `step-*` directories of `dir`, oldest first.
fn step_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut steps: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|source| TrainerError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(is_step_name))
        .collect();
    steps.sort();
    Ok(steps)
}

/// Reads the state of a checkpoint directory.
///
/// # Errors
/// [`TrainerError::Io`] / [`TrainerError::Checkpoint`] for a missing or malformed `state.json`.
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
    (policy, policy_config): (&Policy, &PolicyConfig),
    optim: &impl OptimizerState,
    state: &TrainState,
    extra: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let name = format!("step-{:06}", state.step);
    let target = dir.join(&name);
    checkpoint::write_dir_atomic(&target, |tmp| {
        checkpoint::write_policy_files(policy, policy_config, tmp)?;
        optim.save_to(&tmp.join(OPTIMIZER_FILE))?;
        extra(tmp)?;
        let state_path = tmp.join(STATE_FILE);
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| TrainerError::Checkpoint { path: state_path.clone(), reason: e.to_string() })?;
        fs::write(&state_path, json).map_err(|source| TrainerError::Io { path: state_path, source })
    })?;
    let latest = dir.join(LATEST_FILE);
    write_atomic(&latest, &name).map_err(|source| TrainerError::Io { path: latest, source })?;
    // Drop the oldest step-* directories beyond `keep`, and what crashed writers left behind (temporary and
    // set-aside siblings of other processes).
    let steps = step_dirs(dir)?;
    for old in steps.iter().take(steps.len().saturating_sub(keep)) {
        fs::remove_dir_all(old).map_err(|source| TrainerError::Io { path: old.clone(), source })?;
    }
    remove_stale_temporaries(dir)?;
    Ok(target)
}

/// Removes what writers killed mid-write left in a checkpoints folder: temporary and set-aside siblings
/// (`*.tmp-<pid>`, `*.old-<pid>`) of other processes. Called after each checkpoint and when a run resumes.
///
/// # Errors
/// [`TrainerError::Io`] when the folder cannot be listed or an entry removed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let ours = format!("-{}", std::process::id());
    let stale: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|source| TrainerError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| checkpoint::is_stale_temporary(n) && !n.ends_with(&ours))
        })
        .collect();
    for path in stale {
        let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        removed.map_err(|source| TrainerError::Io { path, source })?;
    }
    Ok(())
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
        remove_stale_temporaries(&self.path)?;
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
        remove_stale_temporaries(&self.path)?;
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

    /// A checkpoint directory with every file present and a valid state of `step`.
    fn fake_checkpoint(dir: &Path, step: usize) -> PathBuf {
        let path = dir.join(format!("step-{step:06}"));
        fs::create_dir_all(&path).expect("mkdir");
        for f in [checkpoint::POLICY_FILE, checkpoint::CONFIG_FILE, OPTIMIZER_FILE] {
            fs::write(path.join(f), b"x").expect("write");
        }
        let state = TrainState {
            step,
            config: TrainConfig::default(),
            summary: TrainSummary::default(),
            metrics_lines: step,
            kl_coef: None,
            prompt_stats: None,
            balance_buffer: None,
            rock_detector: None,
            heal: None,
            adaptive_betaneg: None,
        };
        fs::write(path.join(STATE_FILE), serde_json::to_string(&state).expect("json")).expect("write");
        path
    }

    #[test]
    fn latest_falls_back_to_the_newest_complete_checkpoint() {
        let dir = scratch("latest");
        fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(latest_checkpoint(&dir).expect("lists"), None);
        let one = fake_checkpoint(&dir, 1);
        // No `latest` yet (a crash between the rename and the swap): the newest complete one.
        assert_eq!(latest_checkpoint(&dir).expect("lists"), Some(one.clone()));
        let two = fake_checkpoint(&dir, 2);
        fs::write(dir.join(LATEST_FILE), "step-000002\n").expect("write");
        assert_eq!(latest_checkpoint(&dir).expect("lists"), Some(two.clone()));
        // `latest` names a missing directory, garbage, or a path outside: the newest complete one (step 2).
        for text in ["step-000009", "", "../../etc", "step-00000x", "\u{0}"] {
            fs::write(dir.join(LATEST_FILE), text).expect("write");
            assert_eq!(latest_checkpoint(&dir).expect("lists"), Some(two.clone()), "{text:?}");
        }
        // A newer directory with a corrupt state or a missing file is skipped.
        let three = fake_checkpoint(&dir, 3);
        fs::write(three.join(STATE_FILE), "{ not json").expect("write");
        let four = fake_checkpoint(&dir, 4);
        fs::remove_file(four.join(OPTIMIZER_FILE)).expect("rm");
        fs::write(dir.join(LATEST_FILE), "step-000003").expect("write");
        assert_eq!(latest_checkpoint(&dir).expect("lists"), Some(two));
        fs::remove_dir_all(dir.join("step-000002")).expect("rm");
        assert_eq!(latest_checkpoint(&dir).expect("lists"), Some(one));
        assert_eq!(latest_checkpoint(&dir.join("missing")).expect("no folder"), None);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn stale_temporaries_are_recognised_and_checkpoints_are_not() {
        for stale in ["step-000002.tmp-123", "reference.old-9", "latest.tmp-4242"] {
            assert!(checkpoint::is_stale_temporary(stale), "{stale}");
        }
        for kept in ["step-000002", "latest", "reference", "step-000002.tmp-", "a.tmp-x1", "notes.tmp"] {
            assert!(!checkpoint::is_stale_temporary(kept), "{kept}");
        }
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
