//! Backend smoke test, run once per backend by `cargo xtask test --backend ...` (which sets `FORKRL_BACKEND`).
//! Without the variable it runs on the CPU backend.

use burn::module::Module;
use forkrl_core::Backend;
use forkrl_trainer::smoke::{TinyLmConfig, smoke_batch, smoke_step};

#[test]
fn forward_backward_adamw_step_lowers_the_loss() {
    let backend = Backend::from_env().expect("FORKRL_BACKEND names a known backend");
    let device = backend.device().expect("backend compiled into this test build");
    let report = smoke_step(&device, 7).expect("smoke step runs");
    eprintln!("backend {backend}: {report:?}");
    assert_eq!(report.params_with_grad, report.params_total, "every parameter gets a gradient");
    assert!(report.grad_norm.is_finite() && report.grad_norm > 0.0);
    // The loss starts near ln(V) for a random init and one AdamW step at lr 1e-2 lowers it on the same batch.
    let ln_v = (TinyLmConfig::new().vocab_size as f32).ln();
    assert!((report.loss_before - ln_v).abs() < 1.0, "initial loss {} vs ln V {}", report.loss_before, ln_v);
    assert!(report.loss_after < report.loss_before - 1e-3, "{report:?}");
}

#[test]
fn selected_backend_matches_the_cpu_forward_pass() {
    // The same weights (built on the CPU, then moved) and the same data must give the same loss on every backend.
    let backend = Backend::from_env().expect("known backend");
    let cpu = Backend::Cpu.device().expect("cpu");
    let device = backend.device().expect("compiled");
    cpu.seed(3);
    let model = TinyLmConfig::new().init(&cpu).expect("valid config");
    let reference = model.loss(smoke_batch(4, 16, 64, &cpu)).into_scalar::<f32>();
    let moved = model.to_device(&device);
    let loss = moved.loss(smoke_batch(4, 16, 64, &device)).into_scalar::<f32>();
    assert!((reference - loss).abs() < 1e-4, "cpu {reference} vs {backend} {loss}");
}

#[test]
fn bad_config_is_a_typed_error() {
    let device = Backend::Cpu.device().expect("cpu");
    let err = TinyLmConfig::new().with_n_heads(3).init(&device).expect_err("3 does not divide 32");
    assert!(err.to_string().contains("n_heads = 3"), "{err}");
}
