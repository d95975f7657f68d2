//! The burn tensor path, run on the backend named by `FORKRL_BACKEND` (CPU by default): the chunked fast path equals
//! the log_softmax reference and the host kernel, in values and gradients.
#![cfg(feature = "burn")]

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use forkrl_core::{Backend, Error};
use forkrl_entropy::tensor::{check_finite_rows, entropy_and_logprobs, entropy_and_logprobs_reference, token_entropy};
use forkrl_entropy::{KernelOptions, token_stats};

fn device() -> Device {
    Backend::from_env().expect("known backend").device().expect("compiled backend")
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("f32 data")
}

fn random_case(device: &Device, [b, t, v]: [usize; 3]) -> (Tensor<3>, Tensor<2, Int>) {
    device.seed(42);
    let logits = Tensor::<3>::random([b, t, v], Distribution::Normal(0.0, 3.0), device);
    let ids: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 3) % v) as i64).collect();
    (logits, Tensor::from_data(TensorData::new(ids, [b, t]), device))
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn hand_value() {
    let device = device();
    let logits = Tensor::<3>::from_data(TensorData::new(vec![2.0f32, 1.0, 0.0, -1.0], [1, 1, 4]), &device);
    for (t, h) in [(1.0, 0.947537f32), (0.5, 0.455429), (2.0, 1.24505)] {
        let out = host(token_entropy(logits.clone(), t, 16).expect("valid"));
        assert!((out[0] - h).abs() < 1e-5, "T = {t}: {} vs {h}", out[0]);
    }
}

#[test]
fn fast_path_equals_reference_and_host_kernel() {
    let device = device();
    let shape = [3, 5, 37];
    let (logits, targets) = random_case(&device, shape);
    let (h, lp) = entropy_and_logprobs(logits.clone(), targets.clone(), 0.7, 4).expect("valid");
    let (h_ref, lp_ref) = entropy_and_logprobs_reference(logits.clone(), targets.clone(), 0.7).expect("valid");
    let (h, lp, h_ref, lp_ref) = (host(h), host(lp), host(h_ref), host(lp_ref));
    assert_close(&h, &h_ref, 1e-5, "entropy vs reference");
    assert_close(&lp, &lp_ref, 1e-5, "logprob vs reference");

    let flat: Vec<f32> = logits.into_data().try_into_vec_as::<f32>().expect("f32");
    let ids: Vec<u32> = targets.into_data().try_into_vec_as::<i64>().expect("ids").iter().map(|&i| i as u32).collect();
    let kernel = token_stats(&flat, shape[2], Some(&ids), KernelOptions { temperature: 0.7, threads: 1 }).expect("ok");
    assert_close(&h, &kernel.entropy, 1e-5, "entropy vs host kernel");
    assert_close(&lp, kernel.target_logprob.as_deref().expect("targets"), 1e-5, "logprob vs host kernel");
}

#[test]
fn chunk_size_does_not_matter() {
    let device = device();
    let (logits, targets) = random_case(&device, [2, 7, 11]);
    let base = host(entropy_and_logprobs(logits.clone(), targets.clone(), 1.0, 1000).expect("valid").0);
    for chunk in [1, 3, 14] {
        let h = host(entropy_and_logprobs(logits.clone(), targets.clone(), 1.0, chunk).expect("valid").0);
        assert_close(&h, &base, 1e-6, "chunked entropy");
    }
}

#[test]
fn gradients_equal_the_reference_path() {
    let device = device().autodiff();
    let (logits, targets) = random_case(&device, [2, 3, 9]);
    let weights_h = Tensor::<2>::from_data(TensorData::new(vec![0.3f32, -1.0, 0.5, 2.0, 0.1, -0.7], [2, 3]), &device);
    let weights_lp = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.2, -0.4, 0.9, -1.5, 0.6], [2, 3]), &device);
    let grad_of = |fast: bool| {
        let x = logits.clone().detach().require_grad();
        let (h, lp) = if fast {
            entropy_and_logprobs(x.clone(), targets.clone(), 0.8, 2).expect("valid")
        } else {
            entropy_and_logprobs_reference(x.clone(), targets.clone(), 0.8).expect("valid")
        };
        let loss = (h * weights_h.clone() + lp * weights_lp.clone()).sum();
        let grads = loss.backward();
        let g = x.grad(&grads).expect("logits get a gradient");
        g.into_data().try_into_vec_as::<f32>().expect("f32")
    };
    let (fast, reference) = (grad_of(true), grad_of(false));
    assert!(fast.iter().all(|g| g.is_finite()));
    assert_close(&fast, &reference, 1e-5, "d loss / d logits");
}

#[test]
fn bad_input_and_empty_batches() {
    let device = device();
    let (logits, _) = random_case(&device, [1, 2, 5]);
    assert!(matches!(token_entropy(logits.clone(), 0.0, 8), Err(Error::InvalidParameter { .. })));
    assert!(matches!(token_entropy(logits.clone(), 1.0, 0), Err(Error::InvalidParameter { .. })));
    let wrong = Tensor::<2, Int>::zeros([2, 1], &device);
    assert!(matches!(entropy_and_logprobs(logits.clone(), wrong, 1.0, 8), Err(Error::ShapeMismatch { .. })));
    assert!(check_finite_rows(&logits).is_ok());

    let mut values = vec![0.0f32; 2 * 3 * 4];
    values[(3 + 2) * 4 + 1] = f32::NAN; // batch 1, position 2
    let bad = Tensor::<3>::from_data(TensorData::new(values, [2, 3, 4]), &device);
    match check_finite_rows(&bad) {
        Err(Error::NonFinite { position, .. }) => assert_eq!(position, vec![1, 2]),
        other => panic!("unexpected {other:?}"),
    }
    // Documented behaviour: the NaN row is NaN, the others are unaffected.
    let h = host(token_entropy(bad, 1.0, 2).expect("valid"));
    assert!(h[5].is_nan() && h.iter().enumerate().all(|(i, x)| i == 5 || (x - 4f32.ln()).abs() < 1e-5));

    let empty = Tensor::<3>::zeros([0, 3, 5], &device);
    assert_eq!(token_entropy(empty, 1.0, 8).expect("valid").dims(), [0, 3]);
}

/// `(H, lse, lp)` per row of `[N, V]` logits by `log_softmax` (the reference for the custom operation's columns).
fn reference_columns(logits: Tensor<2>, ids: Tensor<1, Int>, temperature: f32) -> Tensor<2> {
    let [n, v] = logits.dims();
    let z = logits.div_scalar(temperature);
    let lsm = burn::tensor::activation::log_softmax(z.clone(), 1); // [N, V]
    let h = (lsm.clone().exp() * lsm.clone()).sum_dim(1).neg(); // [N, 1]
    let lse = z.clone() - lsm.clone(); // every column holds lse
    let lse = lse.slice([0..n, 0..1]);
    let lp = lsm.gather(1, ids.reshape([n, 1]));
    assert!(v > 0);
    Tensor::cat(vec![h, lse, lp], 1)
}

#[test]
fn custom_operation_gradients_of_every_column_equal_the_reference() {
    use burn::backend::Dispatch;
    use forkrl_entropy::tensor_op::{EntropyBackend, runs_on};
    let base = device();
    if !runs_on(base.as_dispatch()) {
        eprintln!("the custom operation does not run on {base:?} in this build; the composed path is tested instead");
        return;
    }
    for device in [base.clone().autodiff(), base.autodiff().gradient_checkpointing()] {
        let (n, v, temperature) = (7, 13, 0.6f32);
        device.seed(7);
        let logits = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 2.5), &device);
        let ids =
            Tensor::<1, Int>::from_data(TensorData::new((0..n as i64).map(|i| (i * 5) % 13).collect(), [n]), &device);
        let weights: Vec<f32> = (0..n * 3).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
        let weights = Tensor::<2>::from_data(TensorData::new(weights, [n, 3]), &device);
        let run = |custom: bool| {
            let x = logits.clone().detach().require_grad();
            let stats = if custom {
                Tensor::<2>::from_dispatch(<Dispatch as EntropyBackend>::entropy_stats(
                    x.clone().into_dispatch(),
                    ids.clone().into_dispatch(),
                    temperature,
                    3,
                ))
            } else {
                reference_columns(x.clone(), ids.clone(), temperature)
            };
            let values = stats.clone().into_data().try_into_vec_as::<f32>().expect("f32");
            let grads = (stats * weights.clone()).sum().backward();
            let g = x.grad(&grads).expect("gradient").into_data().try_into_vec_as::<f32>().expect("f32");
            (values, g)
        };
        let ((values, grad), (values_ref, grad_ref)) = (run(true), run(false));
        assert_close(&values, &values_ref, 1e-5, "H, lse, lp");
        assert_close(&grad, &grad_ref, 1e-5, "d (w · [H, lse, lp]) / d logits");
    }
}

#[test]
fn entropy_bonus_gradient_and_checkpointing() {
    // The entropy alone (verl's entropy_coeff term), on a plain and a gradient-checkpointing autodiff device.
    let base = device();
    for device in [base.clone().autodiff(), base.autodiff().gradient_checkpointing()] {
        let (logits, targets) = random_case(&device, [2, 4, 19]);
        let grad_of = |fast: bool| {
            let x = logits.clone().detach().require_grad();
            let h = if fast {
                token_entropy(x.clone(), 1.3, 3).expect("valid")
            } else {
                entropy_and_logprobs_reference(x.clone(), targets.clone(), 1.3).expect("valid").0
            };
            let grads = h.sum().backward();
            x.grad(&grads).expect("gradient").into_data().try_into_vec_as::<f32>().expect("f32")
        };
        assert_close(&grad_of(true), &grad_of(false), 1e-5, "d ΣH / d logits");
    }
}

#[test]
fn target_ids_outside_the_vocabulary_and_an_empty_vocabulary_are_typed_errors() {
    let device = device();
    let (logits, _) = random_case(&device, [1, 3, 6]);
    for bad in [6i64, -1, 100] {
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, bad, 2], [1, 3]), &device);
        match entropy_and_logprobs(logits.clone(), ids, 1.0, 8) {
            Err(Error::InvalidParameter { value, .. }) => assert_eq!(value, bad.to_string()),
            other => panic!("id {bad}: unexpected {other:?}"),
        }
    }
    let empty_vocab = Tensor::<3>::zeros([1, 3, 0], &device);
    assert!(matches!(token_entropy(empty_vocab.clone(), 1.0, 8), Err(Error::InvalidParameter { .. })));
    let ids = Tensor::<2, Int>::zeros([1, 3], &device);
    assert!(matches!(entropy_and_logprobs(empty_vocab, ids, 1.0, 8), Err(Error::InvalidParameter { .. })));
}

#[test]
fn half_precision_logits_are_computed_in_f32() {
    use burn::tensor::DType;
    let device = device();
    if !device.supports_dtype(DType::BF16) {
        eprintln!("{device:?} has no bf16 tensors; skipped");
        return;
    }
    let (logits, targets) = random_case(&device, [2, 3, 50]);
    let half = logits.cast(DType::BF16);
    let widened = half.clone().cast(DType::F32);
    let (h, lp) = entropy_and_logprobs(half, targets.clone(), 1.0, 4).expect("valid");
    let (h32, lp32) = entropy_and_logprobs(widened, targets, 1.0, 4).expect("valid");
    assert_close(&host(h.cast(DType::F32)), &host(h32), 1e-5, "bf16 entropy");
    assert_close(&host(lp.cast(DType::F32)), &host(lp32), 1e-5, "bf16 log-prob");
}
