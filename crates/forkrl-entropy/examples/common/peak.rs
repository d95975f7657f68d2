//! Shared by the memory examples (`tensor_memory`, `head_memory`): the process's peak resident memory, and running each
//! path in a child process of its own (the high-water mark only ever grows).

/// The process's peak resident memory in MiB (`VmHWM`), when the OS reports it.
pub fn peak_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// With a path argument, runs `run(path)`; without one, runs this executable once per path of `paths`.
pub fn main_over(paths: &[&str], run: impl Fn(&str) -> Result<(), String>) -> std::process::ExitCode {
    let result = match std::env::args().nth(1) {
        Some(path) => run(&path),
        None => paths.iter().try_for_each(|path| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let status = std::process::Command::new(exe).arg(path).status().map_err(|e| e.to_string())?;
            if status.success() { Ok(()) } else { Err(format!("{path} failed: {status}")) }
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
