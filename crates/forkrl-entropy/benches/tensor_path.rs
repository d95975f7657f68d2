//! The burn tensor path (`forkrl_entropy::tensor::entropy_and_logprobs`, chunked) on [512, 151936] f32 logits on the
//! backend named by `FORKRL_BACKEND` (CPU by default), against baselines measured in the same run: the log_softmax
//! reference path on the same tensor, and a plain `sum` of the tensor (a read floor of the backend). Forward only.
//! `cargo xtask bench` runs it with the dev profile and prints the ratios.

use std::hint::black_box;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkrl_core::Backend;
use forkrl_entropy::tensor::{DEFAULT_CHUNK_ROWS, entropy_and_logprobs, entropy_and_logprobs_reference};

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
    group.bench_function("chunked", |b| {
        b.iter(|| {
            let (h, _) = entropy_and_logprobs(logits.clone(), targets.clone(), 1.0, DEFAULT_CHUNK_ROWS).expect("valid");
            black_box(read(h))
        })
    });
    group.bench_function("reference_log_softmax", |b| {
        b.iter(|| {
            let (h, _) = entropy_and_logprobs_reference(logits.clone(), targets.clone(), 1.0).expect("valid");
            black_box(read(h))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
