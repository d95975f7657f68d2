//! Peak process memory and time of one forward + backward pass from the last hidden states to the entropy and target
//! log-probs, at a Qwen2.5-0.5B-shaped head (`[2048, 896]` hidden states, a `[151936, 896]` head weight; the logits
//! would be `[2048, 151936]` f32 = 1187 MiB), on the CPU backend:
//!
//! ```text
//! cargo run --example head_memory                # both paths, each in a child process
//! cargo run --example head_memory -- fused       # one path: fused | unfused
//! ```
//!
//! `fused` is [`head_entropy_and_logprobs`] (chunks of [`chunk_rows_for`] rows, 256 MiB of logits each); `unfused` is
//! `hidden · Wᵀ` then [`entropy_and_logprobs`] (the custom entropy operation on the full logits). The loss is
//! `Σ H + Σ log p`; both gradients (hidden states and head weight) are computed. Peak memory is the process's
//! high-water mark (`VmHWM`, Linux only).

use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use forkrl_entropy::fused_head::{DEFAULT_CHUNK_BYTES, chunk_rows_for, head_entropy_and_logprobs};
use forkrl_entropy::tensor::entropy_and_logprobs;

#[path = "common/peak.rs"]
mod peak;
use peak::peak_mib;

const N: usize = 2048;
const D: usize = 896;
const V: usize = 151_936;
const PATHS: [&str; 2] = ["fused", "unfused"];

fn run(path: &str) -> Result<(), String> {
    let device = Device::flex().autodiff();
    device.seed(0);
    let hidden = Tensor::<3>::random([1, N, D], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let weight = Tensor::<2>::random([V, D], Distribution::Normal(0.0, 0.02), &device).require_grad();
    let ids: Vec<i64> = (0..N as i64).map(|i| (i * 7919 + 3) % V as i64).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, N]), &device);
    let _ = (hidden.clone().sum().into_scalar::<f32>(), weight.clone().sum().into_scalar::<f32>());
    let before = peak_mib();
    let start = Instant::now();
    let (h, lp) = match path {
        "fused" => head_entropy_and_logprobs(
            hidden.clone(),
            weight.clone(),
            targets,
            1.0,
            chunk_rows_for(V, DEFAULT_CHUNK_BYTES),
        ),
        "unfused" => {
            let logits = hidden.clone().matmul(weight.clone().transpose().unsqueeze::<3>());
            entropy_and_logprobs(logits, targets, 1.0, 4096)
        }
        other => return Err(format!("unknown path {other:?}; expected one of {PATHS:?}")),
    }
    .map_err(|e| e.to_string())?;
    let grads = (h.sum() + lp.sum()).backward();
    let dh = hidden.grad(&grads).ok_or("no hidden-state gradient")?.sum().into_scalar::<f32>();
    let dw = weight.grad(&grads).ok_or("no head-weight gradient")?.sum().into_scalar::<f32>();
    let seconds = start.elapsed().as_secs_f64();
    let logits_mib = (N * V * 4) as f64 / (1024.0 * 1024.0);
    match (before, peak_mib()) {
        (Some(before), Some(peak)) => println!(
            "{path:>8}: {seconds:.2} s, peak {peak:6.0} MiB ({:.0} MiB above the {before:.0} MiB of inputs; the \
             logits would be {logits_mib:.0} MiB) (checksums {dh:.4e}, {dw:.4e})",
            peak - before
        ),
        _ => println!("{path:>8}: {seconds:.2} s; this OS does not report peak memory (checksums {dh:.4e}, {dw:.4e})"),
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    peak::main_over(&PATHS, run)
}
