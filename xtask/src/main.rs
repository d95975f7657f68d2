//! `cargo xtask`: the project's task runner (matklad's cargo-xtask pattern).
//!
//! A plain binary that only depends on clap and runs cargo through `std::process`, so it compiles in seconds and never
//! pulls in burn. Every subcommand prints the commands it runs.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "forkrl's task runner: test, bench, simulate, train, experiment", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Format check, clippy with -D warnings, then the workspace tests on the chosen backends; the CPU pass also runs
    /// the examples `advantage_only` (forkrl-advantage) and `custom_loop` (forkrl-trainer).
    ///
    /// `--backend all` (the default) runs the test suite on every backend this machine can run and compile-checks
    /// the others; the summary at the end says which backend was run and which was only compiled.
    Test {
        /// Backend(s) to test on.
        #[arg(long, value_enum, default_value_t = BackendArg::All)]
        backend: BackendArg,
        /// Skip `cargo fmt --check` and clippy (for quick local iterations; CI never skips them).
        #[arg(long)]
        no_lints: bool,
    },
    /// Criterion benchmarks, then a summary of throughput and ratios against the baselines measured in the same run.
    ///
    /// The host entropy/log-prob kernel at [512, 151936] f32 and bf16 (against a read floor and the naive
    /// materialising formula); host advantage estimators on 100k groups and host aggregation; the burn policy losses
    /// with aggregation on [512, 4096] tokens (dev profile, CPU backend unless FORKRL_BACKEND says otherwise); HORA
    /// allocation of 1M rollouts over 100k prompts; the decoding operators on a 151,936-wide row; sampling (KV cache
    /// vs recomputing the prefix) and training tokens/s of the built-in tiny policy.
    ///
    /// `--scale` runs the real-scale benchmark instead: a Qwen2.5-0.5B-shaped policy with random weights (load, sampling
    /// 8 x 128 tokens, one GRPO step of 8 prompts x 4 responses x 256 tokens; time and peak RSS per phase), beside the
    /// same phases in PyTorch eager when the interpreter `FORKRL_PEER_PYTHON` (default `python3`) has torch and
    /// transformers (benches/peers/scale_peer.py). Tens of minutes on 2 cores.
    Bench {
        /// Run the real-scale benchmark (crates/forkrl-trainer/examples/scale.rs) instead of the criterion benches.
        #[arg(long)]
        scale: bool,
        /// After the criterion benches, run the PyTorch peer of the tiny-policy, loss and entropy benches
        /// (benches/peers/tiny_peer.py, with FORKRL_PEER_PYTHON or python3) and print forkrl / PyTorch ratios.
        #[arg(long)]
        peers: bool,
        /// Extra arguments passed to the criterion binary after `--` (e.g. a benchmark name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Rollout-allocation simulator: uniform vs HORA vs dynamic sampling at equal budget, Mixed-CUTS vs standard
    /// sampling on saturated prompts. Writes runs/simulate/{table.md, report.json, plot.svg}.
    Simulate {
        /// Options of the simulator (`--out DIR`, `--seed N`, `--rounds N`, `--prompts N`, `--batch-prompts N`,
        /// `--group-size N`, `--cuts-success-ratio X`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Train a policy with RLVR. With no arguments: the built-in tiny policy on two-step arithmetic, SFT then GRPO with
    /// the forking-token mask (rho = 0.2); outputs in runs/default/.
    Train {
        /// Trainer arguments: `--config FILE.toml`, `--set key.path=value`, `--backend cpu|wgpu|cuda`, `--name NAME`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A paired experiment: per seed one SFT run, every arm's RL from its checkpoint with the same seed, then a report
    /// with paired 95 % CIs.
    /// `cargo xtask experiment forking-tokens [--seeds N] [--quick] [--jobs N] [--set key=value]...`
    /// (the 80/20 arms: top-20 %, all tokens, bottom-80 %, random-20 %, rho 0.1 and 0.5; --quick: 2 seeds, 3 arms).
    /// `cargo xtask experiment distillation [--seeds N] [--quick]`: a 128-wide teacher trained first (into
    /// runs/experiments/distillation/teacher), then GRPO vs on-policy distillation of the 64-wide student from a weak
    /// start (--quick: the teacher without GRPO, 100 student steps).
    /// Writes runs/experiments/<name>/{report.md, curves.svg/png, entropy.svg/png, runs.json, analysis.json}.
    Experiment {
        /// The experiment's name, then its options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    /// burn's flex CPU backend.
    Cpu,
    /// burn's wgpu backend (Mesa lavapipe on a CPU-only machine).
    Wgpu,
    /// burn's CUDA backend.
    Cuda,
    /// Run every backend this machine can run, compile-check the rest.
    All,
}

/// What happened to one backend during `cargo xtask test`.
#[derive(Debug)]
enum Outcome {
    Ran,
    CompileChecked(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Test { backend, no_lints } => test(backend, no_lints),
        Task::Bench { scale: true, .. } => scale_bench(),
        Task::Bench { args, peers, .. } => bench(&args).and_then(|()| if peers { tiny_peers() } else { Ok(()) }),
        Task::Simulate { args } => {
            let mut cmd = vec!["run", "--release", "--quiet", "-p", "forkrl-rollout", "--example", "simulate", "--"];
            cmd.extend(args.iter().map(String::as_str));
            run(&cargo(), &cmd, &[])
        }
        Task::Train { args } => train(&args),
        Task::Experiment { args } => {
            let args: Vec<String> = std::iter::once("experiment".to_string()).chain(args).collect();
            train(&args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask/Cargo.toml lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command in the workspace root, echoing it, and fails with its exit status.
fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<(), String> {
    let shown_env: String = envs.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    println!("\n$ {shown_env}{program} {}", args.join(" "));
    let start = Instant::now();
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("could not start `{program}`: {e}"))?;
    println!("  ({:.1} s)", start.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown_env}{program} {}` failed with {status}", args.join(" ")))
    }
}

/// The cargo target folder (`CARGO_TARGET_DIR`, else `target/` of the workspace).
fn target_dir() -> PathBuf {
    env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join("target"))
}

fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

fn test(backend: BackendArg, no_lints: bool) -> Result<(), String> {
    let cargo = cargo();
    let start = Instant::now();
    if !no_lints {
        run(&cargo, &["fmt", "--all", "--", "--check"], &[])?;
        // Default features (flex + wgpu): the same feature set as the tests, so burn compiles once for both.
        run(&cargo, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    }

    let wanted: Vec<BackendArg> = match backend {
        BackendArg::All => vec![BackendArg::Cpu, BackendArg::Wgpu, BackendArg::Cuda],
        one => vec![one],
    };
    let mut summary = Vec::new();
    for b in wanted {
        let outcome = match b {
            BackendArg::Cpu => {
                run(&cargo, &["test", "--workspace"], &[("FORKRL_BACKEND", "cpu"), MMAP_THRESHOLD, TRIM_THRESHOLD])?;
                examples(&cargo)?;
                Outcome::Ran
            }
            BackendArg::Wgpu => match vulkan_available() {
                Ok(()) => {
                    // Tests named `cpu_backend_*` build a CPU device whatever FORKRL_BACKEND says: the CPU pass ran
                    // them, so this pass reports them as filtered out instead of passing them a second time.
                    let args = ["test", "--workspace", "--", "--skip", CPU_ONLY_PREFIX];
                    run(&cargo, &args, &[("FORKRL_BACKEND", "wgpu"), MMAP_THRESHOLD, TRIM_THRESHOLD])?;
                    Outcome::Ran
                }
                Err(why) if backend == BackendArg::All => {
                    // wgpu is in the default feature set, so the clippy and CPU test builds above compiled it.
                    run(&cargo, &["check", "--workspace", "--all-targets"], &[])?;
                    Outcome::CompileChecked(why)
                }
                Err(why) => return Err(format!("cannot run the wgpu tests: {why}")),
            },
            BackendArg::Cuda => cuda(&cargo, backend == BackendArg::All)?,
            BackendArg::All => unreachable!("expanded above"),
        };
        summary.push((b, outcome));
    }

    println!("\nbackend summary ({:.0} s in all):", start.elapsed().as_secs_f64());
    for (b, outcome) in &summary {
        match outcome {
            Outcome::Ran => println!("  {:<5} tests RAN", format!("{b:?}").to_lowercase()),
            Outcome::CompileChecked(why) => {
                println!("  {:<5} compile-checked only, NOT run: {why}", format!("{b:?}").to_lowercase())
            }
        }
    }
    Ok(())
}

/// glibc's allocator settings of `forkrl_core::allocator::retain_freed_memory` (which the `forkrl-train` binary
/// calls), given to the test processes through the environment: the tests drive the trainer in-process, and freed
/// tensors then stay with the allocator instead of costing fresh zeroed pages at every step. Ignored by other C
/// libraries; results do not depend on it.
const MMAP_THRESHOLD: (&str, &str) = ("MALLOC_MMAP_THRESHOLD_", "33554432");
const TRIM_THRESHOLD: (&str, &str) = ("MALLOC_TRIM_THRESHOLD_", "1073741824");

/// Prefix of the tests that always run on the CPU backend (the loop's logic, not backend numerics).
const CPU_ONLY_PREFIX: &str = "cpu_backend_";

/// The examples that CI runs: built with the workspace's feature set (so burn is not rebuilt for a `-p` build), then
/// run from the target folder.
const EXAMPLES: [&str; 2] = ["advantage_only", "custom_loop"];

fn examples(cargo: &str) -> Result<(), String> {
    run(cargo, &["build", "--workspace", "--examples", "--quiet"], &[])?;
    let target = target_dir();
    for name in EXAMPLES {
        let binary = target.join("debug").join("examples").join(format!("{name}{}", env::consts::EXE_SUFFIX));
        run(binary.to_str().ok_or("target path is not UTF-8")?, &[], &[])?;
    }
    Ok(())
}

/// The CUDA backend: run its tests where a GPU and a full build are possible, otherwise compile-check it.
fn cuda(cargo: &str, lenient: bool) -> Result<Outcome, String> {
    let gpu = Command::new("nvidia-smi").arg("-L").output().map(|o| o.status.success()).unwrap_or(false);
    if gpu {
        let args = ["test", "--workspace", "--features", "forkrl-trainer/cuda", "--", "--skip", CPU_ONLY_PREFIX];
        run(cargo, &args, &[("FORKRL_BACKEND", "cuda"), MMAP_THRESHOLD, TRIM_THRESHOLD])?;
        return Ok(Outcome::Ran);
    }
    if !lenient {
        return Err("no NVIDIA GPU found (`nvidia-smi -L` failed); `--backend all` compile-checks CUDA instead".into());
    }
    // cubecl-cuda links cubecl-llvm, whose build script downloads an LLVM archive from GitHub. `DOCS_RS=1` makes that
    // build script skip the download (and the native link), which is enough for `cargo check`: type-checks every
    // line of ours against burn's CUDA backend without a CUDA toolkit. See docs/backends.md. The artifacts of this
    // feature set sit beside the default ones in the same target folder (cargo keys them by feature hash), so the
    // check reuses the build scripts and proc-macros already built and invalidates nothing.
    run(cargo, &["check", "--workspace", "--all-targets", "--features", "forkrl-trainer/cuda"], &[("DOCS_RS", "1")])?;
    Ok(Outcome::CompileChecked("no NVIDIA GPU on this machine".into()))
}

/// Whether a Vulkan loader and at least one installable client driver (ICD) are present, so that wgpu can find an
/// adapter. On a CPU-only Debian machine this is `libvulkan1` + `mesa-vulkan-drivers` (lavapipe).
fn vulkan_available() -> Result<(), String> {
    if cfg!(target_os = "macos") {
        return Ok(()); // wgpu uses Metal there.
    }
    let loader =
        ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
            .iter()
            .any(|dir| Path::new(dir).join("libvulkan.so.1").exists());
    if !loader {
        return Err(
            "no Vulkan loader (libvulkan.so.1); on Debian: apt-get install libvulkan1 mesa-vulkan-drivers".into()
        );
    }
    let icd_dirs = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"];
    let has_icd = env::var_os("VK_ICD_FILENAMES").is_some()
        || env::var_os("VK_DRIVER_FILES").is_some()
        || icd_dirs.iter().any(|d| std::fs::read_dir(d).map(|mut it| it.next().is_some()).unwrap_or(false));
    if !has_icd {
        return Err("no Vulkan driver (ICD); on a CPU-only Debian machine: apt-get install mesa-vulkan-drivers".into());
    }
    Ok(())
}

fn train(args: &[String]) -> Result<(), String> {
    // Built with the test suite's feature set (`--workspace --all-targets`), so burn is compiled once for both; a CUDA
    // run adds the `cuda` feature (a separate, full build of burn's CUDA stack, on a machine with the CUDA toolkit).
    let cuda = args.windows(2).any(|w| w[0] == "--backend" && w[1] == "cuda");
    let mut build = vec!["build", "--workspace", "--all-targets", "--quiet"];
    if cuda {
        build.extend(["--features", "forkrl-trainer/cuda"]);
    }
    run(&cargo(), &build, &[])?;
    let target = target_dir();
    let binary = target.join("debug").join(format!("forkrl-train{}", env::consts::EXE_SUFFIX));
    let binary = binary.to_str().ok_or("target path is not UTF-8")?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(binary, &args, &[])
}

/// Runs the criterion benches and prints GB/s and the ratio of each fast path to the read floor of the same run.
fn bench(args: &[String]) -> Result<(), String> {
    let cargo = cargo();
    let extra: Vec<&str> =
        if args.is_empty() { vec![] } else { ["--"].into_iter().chain(args.iter().map(String::as_str)).collect() };
    // Host benches: release profile, no burn.
    for bench in ["entropy_kernel", "advantage_host", "rollout"] {
        let mut cmd = vec!["bench", "-p", "forkrl-benches", "--bench", bench];
        cmd.extend(&extra);
        run(&cargo, &cmd, &[])?;
    }
    // Tensor benches: the dev profile, whose burn is already compiled at opt-level 3 for the tests.
    for bench in ["losses", "tensor_path", "throughput"] {
        let mut cmd = vec!["bench", "--workspace", "--profile", "dev", "--bench", bench];
        cmd.extend(&extra);
        run(&cargo, &cmd, &[])?;
    }

    bench_summary(&target_dir());
    Ok(())
}

/// The tables of [`bench`] from this run's criterion estimates under `target`.
fn bench_summary(target: &Path) {
    entropy_kernel_summary(target);
    throughput_summary(target);
    ratio_tables(target);
}

/// The host entropy kernel against its memory floors.
fn entropy_kernel_summary(target: &Path) {
    println!(
        "\nentropy kernel, [512, 151936] (criterion mean of this run; GB/s counts the bytes read, and written for"
    );
    println!(
        "the backward pass; each path against its floor: read_floor for the forward, copy_floor for the backward):"
    );
    println!("| input | path | ms | GB/s | ratio to its floor |");
    println!("|---|---|---|---|---|");
    let elements = 512.0 * 151_936.0;
    for (group, input_bytes) in [("entropy_kernel_f32", 4.0), ("entropy_kernel_bf16", 2.0)] {
        let rows = [
            ("read_floor", "read_floor", input_bytes),
            ("forkrl", "read_floor", input_bytes),
            ("naive_materialising", "read_floor", input_bytes),
            ("copy_floor", "copy_floor", input_bytes + 4.0),
            ("forkrl_backward", "copy_floor", input_bytes + 4.0),
        ];
        for (name, floor_name, bytes_per_element) in rows {
            let (Some(ns), Some(floor)) =
                (criterion_mean_ns(target, group, name), criterion_mean_ns(target, group, floor_name))
            else {
                continue;
            };
            let input = group.trim_start_matches("entropy_kernel_");
            let gbs = elements * bytes_per_element / ns;
            println!("| {input} | {name} | {:.1} | {gbs:.2} | {:.3} |", ns / 1e6, floor / ns);
        }
    }
}

/// The tiny policy's sampling and training tokens/s against their baselines.
fn throughput_summary(target: &Path) {
    println!("\ntiny policy throughput (criterion mean of this run):");
    println!("| group | path | ms | tokens/s | ratio to baseline |");
    println!("|---|---|---|---|---|");
    let throughput: [(&str, f64, &str, &[&str]); 2] = [
        (
            "policy_tiny_sampling_64x128",
            64.0 * 128.0,
            "recompute_prefix",
            &["recompute_prefix", "kv_cache_composed_ops", "kv_cache"],
        ),
        (
            "policy_tiny_train_64x136",
            64.0 * 135.0,
            "forward_backward",
            &[
                "forward_backward",
                "forward_backward_fused_head_composed_ops",
                "forward_backward_fused_head_composed_norm_mlp",
                "forward_backward_fused_head",
            ],
        ),
    ];
    for (group, tokens, base, names) in throughput {
        let Some(base_ns) = criterion_mean_ns(target, group, base) else { continue };
        for name in names {
            if let Some(ns) = criterion_mean_ns(target, group, name) {
                println!("| {group} | {name} | {:.1} | {:.0} | {:.3} |", ns / 1e6, tokens / (ns / 1e9), ns / base_ns);
            }
        }
    }
}

/// The other groups, each path's time as a ratio to its group's baseline.
fn ratio_tables(target: &Path) {
    let tables: [(&str, &str, &[&str]); 7] = [
        (
            "entropy_tensor_path_512x151936",
            "read_floor_sum",
            &["read_floor_sum", "chunked", "composed", "reference_log_softmax"],
        ),
        (
            "entropy_tensor_path_fwd_bwd_512x151936",
            "reference_log_softmax",
            &["chunked", "composed", "reference_log_softmax"],
        ),
        ("hora_1m_rollouts_100k_prompts", "uniform", &["uniform", "hora"]),
        (
            "decode_row_151936",
            "read_floor",
            &["read_floor", "greedy", "temperature", "top_k_50", "top_p_0.95", "two_temperature", "cuts"],
        ),
        ("advantage_host_100k_groups", "read_floor", &["read_floor", "grpo", "dr_grpo", "rloo"]),
        ("aggregate_host_512x4096", "token-mean", &["token-mean", "seq-mean-token-mean"]),
        (
            "policy_loss_512x4096",
            "baseline_exp_sum_fwd_bwd",
            &[
                "baseline_exp_sum_fwd_bwd",
                "vanilla_token-mean_fwd",
                "vanilla_token-mean_fwd_bwd",
                "cispo_token-mean_fwd",
                "cispo_token-mean_fwd_bwd",
                "holder_token-mean_fwd",
                "holder_token-mean_fwd_bwd",
            ],
        ),
    ];
    for (group, base, names) in tables {
        let Some(base_ns) = criterion_mean_ns(target, group, base) else { continue };
        println!("\n{group} (criterion mean of this run; ratio = time / {base}):");
        println!("| path | ms | ratio |");
        println!("|---|---|---|");
        for name in names {
            if let Some(ns) = criterion_mean_ns(target, group, name) {
                println!("| {name} | {:.2} | {:.2} |", ns / 1e6, ns / base_ns);
            }
        }
    }
}

/// The interpreter of the PyTorch peers, when it can import torch and transformers.
fn peer_python() -> Result<String, String> {
    let python = env::var("FORKRL_PEER_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let ok = Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "PyTorch peer SKIPPED: `{python}` cannot import torch and transformers (set FORKRL_PEER_PYTHON to an \
             interpreter that can, e.g. a venv with `pip install torch transformers`)."
        ))
    }
}

/// Runs benches/peers/tiny_peer.py and prints forkrl / PyTorch ratios against this run's criterion means.
fn tiny_peers() -> Result<(), String> {
    let python = match peer_python() {
        Ok(p) => p,
        Err(skip) => {
            println!("\n{skip}");
            return Ok(());
        }
    };
    let script = workspace_root().join("benches").join("peers").join("tiny_peer.py");
    let script = script.to_str().ok_or("path is not UTF-8")?.to_string();
    let text = run_captured(&python, &[&script])?;
    let peer_ms = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.contains(&format!("\"name\": \"{name}\"")))?;
        let at = line.find("\"ms\":")? + 5;
        line[at..].trim_end_matches('}').trim().parse().ok()
    };
    let target = target_dir();
    let rows: [(&str, &str, &str); 8] = [
        ("policy_tiny_sampling_64x128", "kv_cache", "sampling_kv_cache"),
        ("policy_tiny_sampling_64x128", "kv_cache", "sampling_manual_kv_loop"),
        ("policy_tiny_train_64x136", "forward_backward_fused_head", "train_fwd_bwd"),
        ("policy_tiny_train_64x136", "forward_backward_fused_head", "train_fwd_bwd_compiled"),
        ("policy_tiny_train_64x136", "forward_backward", "train_fwd_bwd"),
        ("policy_loss_512x4096", "vanilla_token-mean_fwd_bwd", "policy_loss_fwd_bwd"),
        ("policy_loss_512x4096", "baseline_exp_sum_fwd_bwd", "baseline_exp_sum_fwd_bwd"),
        ("entropy_tensor_path_512x151936", "chunked", "entropy_verl_fwd"),
    ];
    println!(
        "\nforkrl against PyTorch eager, same machine, same run (speed-up = PyTorch ms / forkrl ms; > 1: forkrl faster):"
    );
    println!("| forkrl bench | PyTorch peer | forkrl ms | PyTorch ms | speed-up |");
    println!("|---|---|---|---|---|");
    for (group, name, peer) in rows {
        if let (Some(ns), Some(ms)) = (criterion_mean_ns(&target, group, name), peer_ms(peer)) {
            println!("| {group}/{name} | {peer} | {:.1} | {ms:.1} | {:.2} |", ns / 1e6, ms / (ns / 1e6));
        }
    }
    for line in text.lines().filter(|l| l.contains("\"skipped\"")) {
        println!("\nPyTorch peer row skipped: {line}");
    }
    Ok(())
}

/// One phase's JSON line: (seconds, peak RSS MiB, the rest of the line).
fn phase_line(out: &str) -> Option<(f64, f64, String)> {
    let line = out.lines().rev().find(|l| l.trim_start().starts_with("{\"phase\""))?;
    let num = |key: &str| -> Option<f64> {
        let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
        let rest = &line[at..];
        rest[..rest.find([',', '}'])?].trim().parse().ok()
    };
    Some((num("seconds")?, num("peak_rss_mib")?, line.to_string()))
}

/// Runs `program args` capturing stdout (stderr passes through); the phase line it printed.
fn run_phase(program: &str, args: &[&str]) -> Result<(f64, f64, String), String> {
    let text = run_captured(program, args)?;
    phase_line(&text).ok_or_else(|| format!("`{program} {}` printed no phase line", args.join(" ")))
}

/// Runs `program args` from the workspace root, stderr passing through; its stdout, echoed and returned.
fn run_captured(program: &str, args: &[&str]) -> Result<String, String> {
    println!("\n$ {program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("could not start `{program}`: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    print!("{text}");
    if !out.status.success() {
        return Err(format!("`{program} {}` failed with {}", args.join(" "), out.status));
    }
    Ok(text)
}

/// The real-scale benchmark (see `Task::Bench`): forkrl's phases, then the PyTorch peer's when it can run, then a
/// table of both with time and peak-memory ratios from this run.
fn scale_bench() -> Result<(), String> {
    let cargo = cargo();
    run(&cargo, &["build", "--workspace", "--examples", "--quiet"], &[])?;
    let target = target_dir();
    let exe = target.join("debug").join("examples").join(format!("scale{}", env::consts::EXE_SUFFIX));
    let exe = exe.to_str().ok_or("target path is not UTF-8")?.to_string();
    let dir = target.join("scale-bench").join("qwen2.5-0.5b");
    let dir_s = dir.to_str().ok_or("target path is not UTF-8")?.to_string();
    if !dir.join("model.safetensors").is_file() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().ok_or("no parent")?).map_err(|e| e.to_string())?;
        run_phase(&exe, &["prepare", &dir_s])?;
    }
    let phases = ["load", "sample", "grpo"];
    let mut ours = Vec::new();
    for phase in phases {
        ours.push(run_phase(&exe, &[phase, &dir_s])?);
    }
    let mut peer = Vec::new();
    match peer_python() {
        Ok(python) => {
            let script = workspace_root().join("benches").join("peers").join("scale_peer.py");
            let script = script.to_str().ok_or("path is not UTF-8")?.to_string();
            for phase in phases {
                peer.push(run_phase(&python, &[&script, phase, &dir_s])?);
            }
        }
        Err(skip) => println!("\n{skip}"),
    }
    println!("\nQwen2.5-0.5B-shaped policy, CPU (this run; ratio = forkrl / PyTorch):");
    println!(
        "| phase | forkrl s | forkrl peak RSS MiB | PyTorch s | PyTorch peak RSS MiB | time ratio | memory ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, phase) in phases.iter().enumerate() {
        let (s, m, _) = &ours[i];
        match peer.get(i) {
            Some((ps, pm, _)) => {
                println!("| {phase} | {s:.1} | {m:.0} | {ps:.1} | {pm:.0} | {:.2} | {:.2} |", s / ps, m / pm)
            }
            None => println!("| {phase} | {s:.1} | {m:.0} | – | – | – | – |"),
        }
    }
    Ok(())
}

/// The mean point estimate (ns) criterion stored for `group/name` in this run, read without a JSON dependency.
fn criterion_mean_ns(target: &Path, group: &str, name: &str) -> Option<f64> {
    let path = target.join("criterion").join(group).join(name).join("new").join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let after = &text[text.find("\"mean\"")?..];
    let after = &after[after.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = after.find([',', '}'])?;
    after[..end].trim().parse().ok()
}

#[cfg(test)]
mod scale_tests {
    use super::phase_line;

    #[test]
    fn phase_lines_of_the_rust_and_python_phases_parse() {
        let rust =
            "building\n{\"phase\": \"grpo\", \"seconds\": 1145.702, \"peak_rss_mib\": 10062, \"score_seconds\": 2.0}\n";
        let (s, m, line) = phase_line(rust).expect("parses");
        assert_eq!((s, m), (1145.702, 10062.0));
        assert!(line.contains("score_seconds"));
        let python = "{\"phase\": \"load\", \"seconds\": 2.851, \"peak_rss_mib\": 3549}";
        assert_eq!(phase_line(python).map(|(s, m, _)| (s, m)), Some((2.851, 3549.0)));
        assert!(phase_line("no phase here").is_none());
    }
}
