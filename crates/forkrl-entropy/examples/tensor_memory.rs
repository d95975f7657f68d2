//! Peak process memory of one forward + backward pass through the entropy and target log-probs of `[1, 2048, 32768]`
//! f32 logits (256 MiB) on the CPU backend, for each implementation of the burn tensor path:
//!
//! ```text
//! cargo run --example tensor_memory -p forkrl-entropy            # runs every path, each in a child process
//! cargo run --example tensor_memory -p forkrl-entropy -- custom  # one path: custom | composed | reference | forward
//! ```
//!
//! `custom` is [`entropy_and_logprobs`] (the custom autodiff operation), `composed` is
//! [`entropy_and_logprobs_composed`], `reference` the `log_softmax` formula; `forward` is the custom operation
//! without autodiff. Peak memory is the process's high-water mark (`VmHWM`, Linux only).

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use forkrl_entropy::tensor::{entropy_and_logprobs, entropy_and_logprobs_composed, entropy_and_logprobs_reference};

#[path = "common/peak.rs"]
mod peak;
use peak::peak_mib;

const SHAPE: [usize; 3] = [1, 2048, 32_768];
const PATHS: [&str; 4] = ["forward", "custom", "composed", "reference"];

fn run(path: &str) -> Result<(), String> {
    let [b, t, v] = SHAPE;
    let device = if path == "forward" { Device::flex() } else { Device::flex().autodiff() };
    device.seed(0);
    let mut logits = Tensor::<3>::random(SHAPE, Distribution::Normal(0.0, 3.0), &device);
    if path != "forward" {
        logits = logits.require_grad();
    }
    let ids: Vec<i64> = (0..(b * t) as i64).map(|i| (i * 7 + 3) % v as i64).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
    let before = peak_mib();
    let (h, lp) = match path {
        "forward" | "custom" => entropy_and_logprobs(logits.clone(), targets, 1.0, 256),
        "composed" => entropy_and_logprobs_composed(logits.clone(), targets, 1.0, 256),
        "reference" => entropy_and_logprobs_reference(logits.clone(), targets, 1.0),
        other => return Err(format!("unknown path {other:?}; expected one of {PATHS:?}")),
    }
    .map_err(|e| e.to_string())?;
    let loss = h.sum() + lp.sum();
    let check = if path == "forward" {
        loss.into_scalar::<f32>()
    } else {
        let grads = loss.backward();
        let grad = logits.grad(&grads).ok_or("the logits got no gradient")?;
        grad.sum().into_scalar::<f32>()
    };
    let logits_mib = (b * t * v * 4) as f64 / (1024.0 * 1024.0);
    match (before, peak_mib()) {
        (Some(before), Some(peak)) => println!(
            "{path:>9}: peak {peak:6.0} MiB = logits ({logits_mib:.0} MiB) × {:.2}; {before:.0} MiB before the call \
             (checksum {check:.4e})",
            peak / logits_mib
        ),
        _ => println!("{path:>9}: this OS does not report peak memory (checksum {check:.4e})"),
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    peak::main_over(&PATHS, run)
}
