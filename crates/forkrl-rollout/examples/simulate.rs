//! The rollout-allocation simulator: uniform vs HORA vs dynamic sampling at an equal rollout budget, and Mixed-CUTS vs
//! standard sampling on saturated prompts. Run it with `cargo xtask simulate` (or
//! `cargo run --release -p forkrl-rollout --example simulate -- --out runs/simulate`). Writes `table.md`,
//! `report.json` and `plot.svg` under the output folder (each atomically: temp file, then rename).
//!
//! Options: `--out DIR`, `--seed N`, `--rounds N`, `--prompts N`, `--batch-prompts N`, `--group-size N`,
//! `--cuts-success-ratio X`.

use std::{fs, path::Path, process::ExitCode};

use forkrl_core::report::write_atomic;
use forkrl_rollout::simulate::{SimulationConfig, simulate};

fn run() -> Result<(), String> {
    let mut cfg = SimulationConfig::default();
    let mut out = String::from("runs/simulate");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let int = || value.parse::<usize>().map_err(|e| format!("{flag} {value}: {e}"));
        match flag.as_str() {
            "--out" => out = value.clone(),
            "--seed" => cfg.seed = value.parse().map_err(|e| format!("--seed {value}: {e}"))?,
            "--rounds" => cfg.rounds = int()?,
            "--prompts" => cfg.prompts = int()?,
            "--batch-prompts" => cfg.batch_prompts = int()?,
            "--group-size" => cfg.group_size = int()?,
            "--cuts-success-ratio" => {
                cfg.cuts_success_ratio = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    let report = simulate(&cfg).map_err(|e| e.to_string())?;
    let dir = Path::new(&out);
    fs::create_dir_all(dir).map_err(|e| format!("{out}: {e}"))?;
    let table = report.markdown();
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    for (name, text) in
        [("table.md", table.as_str()), ("report.json", json.as_str()), ("plot.svg", report.svg().as_str())]
    {
        write_atomic(&dir.join(name), text).map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
    }
    println!("{table}\nwrote {out}/table.md, {out}/report.json and {out}/plot.svg");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::FAILURE
        }
    }
}
