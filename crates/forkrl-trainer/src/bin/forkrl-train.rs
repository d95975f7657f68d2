//! `forkrl-train`: the RLVR trainer's command line (`cargo xtask train` builds and runs it).
//!
//! ```text
//! forkrl-train [--config FILE.toml] [--set key.path=value]... [--backend cpu|wgpu|cuda] [--name NAME]
//!              [--model HF_DIR] [--data FILE.jsonl] [--resume] [--stop-after RL_STEP]
//! ```
//!
//! With no arguments it runs the built-in default: the tiny policy on two-step arithmetic, SFT then GRPO with the
//! forking-token mask (ρ = 0.2). `--model` trains a Hugging Face checkpoint directory (`model.hf_dir`), `--data` a
//! JSONL dataset (`task.kind = "jsonl"`, `task.path`). Outputs go to `runs/<name>/`: `config.toml` (the resolved
//! configuration), `metrics.jsonl` (one line per step, verl metric names), `checkpoints/` (`latest` names the newest
//! complete one), `summary.json` and `plot.svg`. `--resume` continues from `checkpoints/latest` with the same
//! configuration (`rl.steps` may grow): the result is the one an uninterrupted run gives. `--stop-after K` stops
//! right after the checkpoint of RL step K (a checkpoint step), as a preempted job would.

use std::{fs, io::Write, path::PathBuf, process::ExitCode};

use forkrl_core::{Backend, report::write_atomic};
use forkrl_trainer::rlvr::{
    Checkpointing, TrainConfig, latest_checkpoint, read_state, summary_svg, train_with_checkpoints,
};

fn set_path(root: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().ok_or_else(|| format!("empty key in --set {path}"))?;
    let mut table = root;
    for p in parts {
        table = table
            .entry(p)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("--set {path}: {p} is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(text: &str) -> toml::Value {
    // A TOML literal (number, bool, inline table, quoted string), else a bare string.
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut table = toml::Table::new();
    let mut sets = Vec::new();
    let mut resume = false;
    let mut stop_after = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => {
                let path = value()?;
                let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
                table = toml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
            }
            "--set" => sets.push(value()?),
            "--backend" => sets.push(format!("run.backend=\"{}\"", value()?)),
            "--name" => sets.push(format!("run.name=\"{}\"", value()?)),
            "--model" => sets.push(format!("model.hf_dir={}", toml::Value::String(value()?))),
            "--data" => {
                sets.push("task.kind=\"jsonl\"".into());
                sets.push(format!("task.path={}", toml::Value::String(value()?)));
            }
            "--resume" => resume = true,
            "--stop-after" => {
                let v = value()?;
                stop_after = Some(v.parse::<usize>().map_err(|e| format!("--stop-after {v}: {e}"))?);
            }
            "-h" | "--help" => {
                println!(
                    "forkrl-train [--config FILE.toml] [--set key.path=value]... [--backend cpu|wgpu|cuda] [--name NAME]\n\
                     \x20            [--model HF_DIR] [--data FILE.jsonl] [--resume] [--stop-after RL_STEP]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other} (see --help)")),
        }
    }
    for s in sets {
        let (k, v) = s.split_once('=').ok_or_else(|| format!("--set {s}: expected key=value"))?;
        set_path(&mut table, k.trim(), parse_value(v.trim()))?;
    }
    // `--set task.x=...` without a kind keeps the default task.
    if let Some(task) = table.get_mut("task").and_then(toml::Value::as_table_mut) {
        task.entry("kind").or_insert_with(|| toml::Value::String("arithmetic".into()));
    }
    let config: TrainConfig = toml::Value::Table(table).try_into().map_err(|e| format!("configuration: {e}"))?;
    let backend: Backend = config.run.backend.parse().map_err(|e| format!("{e}"))?;
    let device = backend.device().map_err(|e| format!("{e}"))?;
    let dir: PathBuf = config.run.out_dir.join(&config.run.name);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let resolved = toml::to_string(&config).map_err(|e| e.to_string())?;
    write_atomic(&dir.join("config.toml"), &resolved).map_err(|e| format!("{}: {e}", dir.display()))?;
    let metrics_path = dir.join("metrics.jsonl");
    let checkpoints = dir.join("checkpoints");
    let mut metrics = if resume {
        // Keep exactly the metrics lines the checkpoint had written.
        let latest = latest_checkpoint(&checkpoints)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("--resume: no checkpoint in {}", checkpoints.display()))?;
        let state = read_state(&latest).map_err(|e| e.to_string())?;
        let text = fs::read_to_string(&metrics_path).map_err(|e| format!("{}: {e}", metrics_path.display()))?;
        let kept: Vec<&str> = text.lines().take(state.metrics_lines).collect();
        if kept.len() < state.metrics_lines {
            return Err(format!(
                "--resume: {} has {} lines, the checkpoint expects {}",
                metrics_path.display(),
                kept.len(),
                state.metrics_lines
            ));
        }
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        write_atomic(&metrics_path, &body).map_err(|e| format!("{}: {e}", metrics_path.display()))?;
        fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(|e| format!("{}: {e}", metrics_path.display()))?
    } else {
        if checkpoints.exists() {
            fs::remove_dir_all(&checkpoints).map_err(|e| format!("{}: {e}", checkpoints.display()))?;
        }
        fs::File::create(&metrics_path).map_err(|e| format!("{}: {e}", metrics_path.display()))?
    };
    println!("training on {backend}; outputs in {}", dir.display());
    let ckpt = Checkpointing { dir: Some(checkpoints), resume, stop_after };
    let summary = train_with_checkpoints(&config, &device, &mut metrics, &ckpt).map_err(|e| e.to_string())?;
    metrics.flush().map_err(|e| format!("{}: {e}", metrics_path.display()))?;
    let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    write_atomic(&dir.join("summary.json"), &json).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_atomic(&dir.join("plot.svg"), &summary_svg(&summary)).map_err(|e| format!("{}: {e}", dir.display()))?;
    let k = config.eval.pass_k;
    if let Some(step) = stop_after.filter(|&s| s < config.rl.steps) {
        println!(
            "\nstopped after RL step {step} of {} (held-out greedy accuracy {:.3}); continue with the same arguments \
             and --resume instead of --stop-after",
            config.rl.steps, summary.final_accuracy
        );
        return Ok(());
    }
    println!(
        "\nheld-out greedy accuracy: {:.3} after SFT -> {:.3} after {} RL steps; pass@1 {:.3} -> {:.3}, pass@{k} {:.3} -> {:.3} ({:.0} s).\nWrote {}/{{config.toml, metrics.jsonl, summary.json, plot.svg}}",
        summary.sft_accuracy,
        summary.final_accuracy,
        config.rl.steps,
        summary.sft_pass_at_k.0,
        summary.final_pass_at_k.0,
        summary.sft_pass_at_k.1,
        summary.final_pass_at_k.1,
        summary.seconds,
        dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkrl-train: {e}");
            ExitCode::FAILURE
        }
    }
}
