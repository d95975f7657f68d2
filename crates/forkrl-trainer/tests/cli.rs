//! `forkrl-train` as a careless user runs it: a finished run is never deleted or overwritten by a second start, a bad
//! `--set` or a refused `--resume`; every refusal names what to do and happens before any file is touched.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn scratch(tag: &str) -> common::Scratch {
    common::Scratch::new(&format!("cli-{tag}"))
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
    // A closed stdout (`forkrl-train eval ... | head -1`) is not a panic: the report is still written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkrl-train"))
        .args(["eval", "--checkpoint", &out.join("done").display().to_string(), "--k", "2", "--overwrite"])
        .args(["--out", &report.display().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawns");
    drop(child.stdout.take());
    let closed = child.wait_with_output().expect("waits");
    assert!(closed.status.success(), "{}", String::from_utf8_lossy(&closed.stderr));

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

/// The parameter values of a run's newest checkpoint, as bit patterns in module order (the file itself also holds
/// per-process parameter ids).
fn policy_bits(run: &Path) -> Vec<u32> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Collect(Vec<u32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<burn::tensor::Tensor<D>>) {
            let values = param.val().into_data().try_to_vec::<f32>().expect("f32");
            self.0.extend(values.iter().map(|v| v.to_bits()));
        }
    }
    let latest = fs::read_to_string(run.join("checkpoints/latest")).expect("latest");
    let device = forkrl_core::Backend::Cpu.device().expect("cpu");
    let (policy, _) =
        forkrl_trainer::model::checkpoint::load_policy(&run.join("checkpoints").join(latest.trim()), &device)
            .expect("loads");
    let mut c = Collect(Vec::new());
    policy.visit(&mut c);
    c.0
}

#[test]
fn cpu_backend_a_run_killed_at_random_points_and_resumed_ends_as_a_straight_run() {
    let out = scratch("crash");
    let sets = [
        "sft.steps=30",
        "rl.steps=6",
        "rl.prompts_per_step=2",
        "rl.group_size=4",
        "eval.size=8",
        "eval.every=2",
        "eval.pass_k_size=2",
        "checkpoint.every=1",
        "checkpoint.keep=2",
    ];
    let args = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--set".into(), format!("run.out_dir={:?}", out.display().to_string())];
        v.extend(["--name".into(), name.into()]);
        for s in &sets {
            v.extend(["--set".into(), (*s).into()]);
        }
        v.extend(extra.iter().map(|s| (*s).to_string()));
        v
    };
    let bin = env!("CARGO_BIN_EXE_forkrl-train");
    let started = std::time::Instant::now();
    let straight = Command::new(bin).args(args("straight", &[])).output().expect("runs");
    assert!(straight.status.success(), "{}", String::from_utf8_lossy(&straight.stderr));
    // Kill points are spread over the straight run's own length, so the test does not depend on how fast it runs.
    let length_ms = (started.elapsed().as_millis() as u64).max(50);
    // The crashed run: SIGKILL after a pseudo-random delay (within the first half of the straight run's length),
    // then resume — or start over when no checkpoint was written yet — until a run finishes.
    let run = out.join("crashed");
    let mut delay_ms: u64 = length_ms / 5;
    let mut kills = 0;
    for attempt in 0..40 {
        let extra: &[&str] = if run.join("checkpoints/latest").exists() { &["--resume"] } else { &["--overwrite"] };
        let mut child = Command::new(bin)
            .args(args("crashed", extra))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawns");
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().expect("polls").is_none() && attempt < 30 {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        let status = child.wait_with_output().expect("waits");
        if status.status.success() {
            break;
        }
        assert!(kills > 0, "failed without a kill: {}", String::from_utf8_lossy(&status.stderr));
        delay_ms = length_ms / 20 + (delay_ms * 7919 + 13) % (length_ms / 2); // spread the kill points
    }
    assert!(kills >= 3, "the test killed only {kills} times");
    let (a, b) = (policy_bits(&run), policy_bits(&out.join("straight")));
    assert!(a.len() > 1000);
    assert!(
        a == b,
        "final parameters differ in {} of {} values",
        a.iter().zip(&b).filter(|(x, y)| x != y).count(),
        a.len()
    );
    let metrics = |r: &Path| -> Vec<serde_json::Value> {
        fs::read_to_string(r.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("a whole json line");
                v.as_object_mut().expect("object").retain(|k, _| !k.starts_with("perf/"));
                v
            })
            .collect()
    };
    assert_eq!(metrics(&run), metrics(&out.join("straight")), "identical metrics, no torn or repeated line");
    // Nothing a killed writer left behind survives a resumption.
    for entry in fs::read_dir(run.join("checkpoints")).expect("ls") {
        let name = entry.expect("entry").file_name().into_string().expect("utf-8");
        assert!(name == "latest" || name.starts_with("step-") && !name.contains('.'), "left behind: {name}");
    }
    for entry in fs::read_dir(&run).expect("ls") {
        let name = entry.expect("entry").file_name().into_string().expect("utf-8");
        assert!(!name.contains(".tmp-"), "left behind: {name}");
    }
    let _ = fs::remove_dir_all(&out);
}
