//! Times forward + backward of a small causal transformer on every CPU-capable backend compiled into this build.
//!
//! ```text
//! cargo run --release -p forkrl-trainer --example backend_compare                      # flex (+ wgpu if present)
//! cargo run --release -p forkrl-trainer --features ndarray --example backend_compare   # adds ndarray
//! ```
//!
//! The figures in docs/backends.md come from this program. Each backend is timed in the same run, on the same model
//! shape and data: median of `ITERS` steps after `WARMUP` untimed steps.

use std::time::Instant;

use burn::{optim::GradientsParams, tensor::Device};
use forkrl_trainer::smoke::{TinyLmConfig, gradient_stats, smoke_batch};

const WARMUP: usize = 3;
const ITERS: usize = 10;

fn time_fwd_bwd(name: &str, device: Device, config: &TinyLmConfig, batch: usize, seq: usize) -> Option<f64> {
    let device = device.autodiff();
    device.seed(0);
    let model = match config.init(&device) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{name}: {e}");
            return None;
        }
    };
    let tokens = smoke_batch(batch, seq, config.vocab_size, &device);
    let mut times = Vec::with_capacity(ITERS);
    for i in 0..WARMUP + ITERS {
        let start = Instant::now();
        let loss = model.loss(tokens.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // Reading the gradients back forces the whole backward pass to finish on asynchronous backends.
        let stats = gradient_stats(&model, &grads);
        assert!(stats.first_non_finite.is_none(), "{name}: non-finite gradient");
        if i >= WARMUP {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

fn main() {
    // A small decoder: 4 layers, d_model 256, 4 heads, MLP 1024, vocab 2048; batch 8 x 128 tokens.
    let config =
        TinyLmConfig::new().with_vocab_size(2048).with_d_model(256).with_n_heads(4).with_d_ff(1024).with_n_layers(4);
    let (batch, seq) = (8, 128);
    let mut backends: Vec<(&str, Device)> = vec![("flex", Device::flex())];
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // burn 0.22 deprecates ndarray; measured here only to justify the choice of flex.
    backends.push(("ndarray", Device::ndarray()));
    if std::env::args().any(|a| a == "--wgpu") {
        #[cfg(feature = "wgpu")]
        backends.push(("wgpu", Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)));
    }
    println!("model: {config:?}");
    println!("batch {batch} x {seq} tokens; median of {ITERS} forward+backward steps after {WARMUP} warm-up steps");
    println!("| backend | fwd+bwd ms | tokens/s |");
    println!("|---|---|---|");
    for (name, device) in backends {
        if let Some(ms) = time_fwd_bwd(name, device, &config, batch, seq) {
            println!("| {name} | {ms:.1} | {:.0} |", (batch * (seq - 1)) as f64 / (ms / 1e3));
        }
    }
}
