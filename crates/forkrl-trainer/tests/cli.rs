//! `forkrl-train` as a careless user runs it: a finished run is never deleted or overwritten by a second start, a bad
//! `--set` or a refused `--resume`; every refusal names what to do and happens before any file is touched.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkrl-cli-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// A finished-looking run `<out>/done/`.
fn previous_run(out: &Path) -> PathBuf {
    let run = out.join("done");
    fs::create_dir_all(run.join("checkpoints/step-000200")).expect("mkdir");
    fs::write(run.join("checkpoints/step-000200/state.json"), "{}").expect("write");
    fs::write(run.join("metrics.jsonl"), "{\"phase\":\"rl\",\"step\":200}\n").expect("write");
    fs::write(run.join("config.toml"), "# the finished run's\n").expect("write");
    run
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("ls") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

fn train(out: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_forkrl-train"))
        .args(["--set", &format!("run.out_dir={:?}", out.display().to_string()), "--name", "done"])
        .args(args)
        .output()
        .expect("runs");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_previous_run_survives_every_refused_start() {
    let out = scratch("survives");
    let run = previous_run(&out);
    let before = snapshot(&run);
    // A bad value: a typed error naming the key, before anything is touched.
    let (ok, err) = train(&out, &["--set", "rl.group_size=0"]);
    assert!(!ok && err.contains("rl.group_size"), "{err}");
    assert_eq!(snapshot(&run), before);
    // A valid configuration without --resume or --overwrite.
    let (ok, err) = train(&out, &["--set", "rl.steps=1"]);
    assert!(!ok && err.contains("--overwrite") && err.contains("--resume"), "{err}");
    assert_eq!(snapshot(&run), before);
    // A refused --resume (no `latest` checkpoint) leaves config.toml as it was.
    let (ok, err) = train(&out, &["--resume"]);
    assert!(!ok && err.contains("no checkpoint"), "{err}");
    assert_eq!(snapshot(&run), before);
    // Flags that contradict each other, and a stop step outside the run.
    let (ok, _) = train(&out, &["--resume", "--overwrite"]);
    assert!(!ok);
    let (ok, err) = train(&out, &["--stop-after", "999"]);
    assert!(!ok && err.contains("--stop-after"), "{err}");
    assert_eq!(snapshot(&run), before);
    let _ = fs::remove_dir_all(&out);
}

#[test]
fn cpu_backend_eval_and_export_read_a_saved_checkpoint_and_never_replace_their_output() {
    let out = scratch("eval");
    // A tiny finished run: a few SFT steps, one RL step, small evaluation sets.
    let sets =
        ["sft.steps=20", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2", "eval.size=8", "eval.pass_k_size=2"];
    let mut args: Vec<&str> = Vec::new();
    for s in &sets {
        args.extend(["--set", s]);
    }
    let (ok, err) = train(&out, &args);
    assert!(ok, "{err}");
    let data = out.join("extra.jsonl");
    fs::write(&data, "{\"question\": \"1+2+3=\", \"answer\": \"6\"}\n{\"question\": \"4+4+4=\", \"answer\": \"12\"}\n")
        .expect("write");
    let report = out.join("report.json");
    let eval = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_forkrl-train"))
            .args(["eval", "--checkpoint", &out.join("done").display().to_string(), "--k", "2"])
            .args(["--data", &data.display().to_string(), "--out", &report.display().to_string()])
            .args(extra)
            .output()
            .expect("runs");
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (ok, err) = eval(&[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&report).expect("written")).expect("json");
    assert_eq!(v["step"], 1);
    let sets = v["sets"].as_array().expect("sets");
    assert_eq!((sets.len(), sets[0]["problems"].as_u64(), sets[1]["problems"].as_u64()), (2, Some(8), Some(2)));
    for s in sets {
        for key in ["greedy_accuracy", "pass_at_1", "pass_at_k", "maj_at_k"] {
            let x = s[key].as_f64().expect("number");
            assert!((0.0..=1.0).contains(&x), "{key} = {x}");
        }
        assert!(s["pass_at_k"].as_f64() >= s["pass_at_1"].as_f64());
    }
    let before = fs::read(&report).expect("read");
    let (ok, err) = eval(&[]);
    assert!(!ok && err.contains("--overwrite"), "{err}");
    assert_eq!(fs::read(&report).expect("read"), before, "the report is untouched");
    let (ok, err) = eval(&["--k", "0"]);
    assert!(!ok && err.contains("--k"), "{err}");

    // export: a Hugging Face directory, never written over unasked.
    let hf = out.join("hf");
    let export = || {
        let output = Command::new(env!("CARGO_BIN_EXE_forkrl-train"))
            .args(["export", "--checkpoint", &out.join("done").display().to_string()])
            .args(["--out", &hf.display().to_string()])
            .output()
            .expect("runs");
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (ok, err) = export();
    assert!(ok, "{err}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
        assert!(hf.join(f).is_file(), "{f}");
    }
    let before = snapshot(&hf);
    let (ok, err) = export();
    assert!(!ok && err.contains("--overwrite"), "{err}");
    assert_eq!(snapshot(&hf), before);
    let _ = fs::remove_dir_all(&out);
}
