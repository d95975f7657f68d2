//! The burn tensor path on [512, 151936] f32 logits on the backend named by `FORKRL_BACKEND` (CPU by default), against
//! baselines measured in the same run. Forward only: `entropy_and_logprobs` (the custom operation where it runs,
//! chunked), `entropy_and_logprobs_composed`, the log_softmax reference path, and a plain `sum` of the tensor (a read
//! floor of the backend). Forward + backward on an autodiff device: the same three paths, the gradient of
//! `Σ H + Σ log p` with respect to the logits. `cargo xtask bench` runs it with the dev profile and prints the ratios.

use std::hint::black_box;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkrl_core::Backend;
use forkrl_entropy::tensor::{
    DEFAULT_CHUNK_ROWS, entropy_and_logprobs, entropy_and_logprobs_composed, entropy_and_logprobs_reference,
};

type Path = fn(Tensor<3>, Tensor<2, Int>) -> (Tensor<2>, Tensor<2>);

const PATHS: [(&str, Path); 3] = [
    ("chunked", |z, y| entropy_and_logprobs(z, y, 1.0, DEFAULT_CHUNK_ROWS).expect("valid")),
    ("composed", |z, y| entropy_and_logprobs_composed(z, y, 1.0, DEFAULT_CHUNK_ROWS).expect("valid")),
    ("reference_log_softmax", |z, y| entropy_and_logprobs_reference(z, y, 1.0).expect("valid")),
];

const ROWS: usize = 512;
const VOCAB: usize = 151_936;

fn bench(c: &mut Criterion) {
    let device = Backend::from_env().and_then(Backend::device).expect("backend");
    device.seed(3);
    let logits = Tensor::<3>::random([1, ROWS, VOCAB], Distribution::Normal(0.0, 3.0), &device);
    let ids: Vec<i64> = (0..ROWS as i64).map(|r| (r * 7919) % VOCAB as i64).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, ROWS]), &device);
    let read = |t: Tensor<2>| t.into_data().try_into_vec_as::<f32>().map(|v| v[0]);
    let mut group = c.benchmark_group("entropy_tensor_path_512x151936");
    group.sample_size(10).throughput(Throughput::Bytes((ROWS * VOCAB * 4) as u64));
    group.bench_function("read_floor_sum", |b| {
        b.iter(|| black_box(logits.clone().sum().into_data().try_into_vec_as::<f32>().map(|v| v[0])))
    });
    for (name, path) in PATHS {
        group.bench_function(name, |b| b.iter(|| black_box(read(path(logits.clone(), targets.clone()).0))));
    }
    group.finish();

    let ad = device.autodiff();
    let logits = Tensor::<3>::from_data(logits.into_data(), &ad);
    let targets = Tensor::<2, Int>::from_data(targets.into_data(), &ad);
    let mut group = c.benchmark_group("entropy_tensor_path_fwd_bwd_512x151936");
    group.sample_size(10).throughput(Throughput::Bytes((ROWS * VOCAB * 4) as u64));
    for (name, path) in PATHS {
        group.bench_function(name, |b| {
            b.iter(|| {
                let x = logits.clone().detach().require_grad();
                let (h, lp) = path(x.clone(), targets.clone());
                let grads = (h.sum() + lp.sum()).backward();
                black_box(x.grad(&grads).map(|g| g.sum().into_scalar::<f32>()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
