//! The KV-cache sampler on a random policy with grouped-query attention: the cache changes nothing but speed, rows
//! finish independently, a row's continuation does not depend on the other rows or on its left padding, and a seed
//! fixes everything.

use burn::tensor::Device;
use forkrl_core::Backend;
use forkrl_rollout::Decoding;
use forkrl_trainer::model::{
    policy::{Policy, PolicyConfig},
    sampler::{Generation, SampleRow, SamplerConfig, generate, generate_rows},
};

fn device() -> Device {
    Backend::from_env().expect("known backend").device().expect("compiled backend")
}

fn policy(device: &Device) -> Policy {
    device.seed(7);
    PolicyConfig::new(40)
        .with_d_model(32)
        .with_n_heads(4)
        .with_n_kv_heads(Some(2))
        .with_d_ff(48)
        .with_qkv_bias(true)
        .with_max_len(48)
        .init(device)
        .expect("policy")
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![3, 4, 5, 6, 7, 8], vec![9, 10], vec![11, 12, 13, 14], vec![15]]
}

fn assert_close(a: &Generation, b: &Generation, what: &str) {
    assert_eq!(a.tokens, b.tokens, "{what}: tokens");
    assert_eq!(a.truncated, b.truncated, "{what}: truncation");
    for (ra, rb) in a.logprobs.iter().zip(&b.logprobs).chain(a.entropies.iter().zip(&b.entropies)) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() <= 1e-4, "{what}: {x} vs {y}");
        }
    }
}

#[test]
fn kv_cache_equals_recomputation() {
    let device = device();
    let policy = policy(&device);
    for op in [Decoding::Temperature { temperature: 1.0 }, Decoding::Greedy] {
        let config = SamplerConfig { max_new_tokens: 20, eos: vec![1], seed: 11, ..SamplerConfig::default() };
        let cached = generate(&policy, &prompts(), op, &config).expect("cached");
        let plain = SamplerConfig { use_cache: false, ..config.clone() };
        let recomputed = generate(&policy, &prompts(), op, &plain).expect("recomputed");
        assert_close(&cached, &recomputed, &format!("{op:?}"));
        assert!(cached.num_tokens() > 20, "the rows generate");
        let again = generate(&policy, &prompts(), op, &config).expect("again");
        assert_eq!(cached, again, "deterministic under a seed");
    }
}

#[test]
fn rows_finish_independently_and_ignore_their_neighbours() {
    let device = device();
    let policy = policy(&device);
    let op = Decoding::Temperature { temperature: 1.0 };
    let free = SamplerConfig { max_new_tokens: 12, eos: vec![], seed: 5, ..SamplerConfig::default() };
    let long = generate(&policy, &prompts(), op, &free).expect("no eos");
    assert!(long.truncated.iter().all(|&t| t) && long.tokens.iter().all(|r| r.len() == 12));

    // Make row 0's third token the EOS: row 0 stops there, the others go on exactly as before up to their own EOS.
    let eos = long.tokens[0][2];
    let config = SamplerConfig { eos: vec![eos], ..free.clone() };
    let out = generate(&policy, &prompts(), op, &config).expect("with eos");
    for (row, (got, before)) in out.tokens.iter().zip(&long.tokens).enumerate() {
        let stop = before.iter().position(|&t| t == eos);
        let want = stop.map_or(before.as_slice(), |i| &before[..=i]);
        assert_eq!(got.as_slice(), want, "row {row}");
        assert_eq!(out.truncated[row], stop.is_none(), "row {row}");
    }
    assert!(out.tokens[0].len() <= 3);
    let (ids, mask, w) = out.padded(0);
    assert_eq!(w, out.tokens.iter().map(Vec::len).max().expect("rows"));
    assert_eq!(mask.iter().filter(|&&m| m).count(), out.num_tokens());
    assert_eq!(ids.len(), 4 * w);

    // Each row alone (no padding) continues exactly as in the padded batch, with its own row id.
    for (row, prompt) in prompts().iter().enumerate() {
        let alone = generate_rows(&policy, &[SampleRow { prompt, op, row_id: row as u64 }], &config).expect("alone");
        assert_eq!(alone.tokens[0], out.tokens[row], "row {row} alone");
        for (x, y) in alone.logprobs[0].iter().zip(&out.logprobs[row]) {
            assert!((x - y).abs() <= 1e-4, "row {row}: {x} vs {y}");
        }
    }
}

#[test]
fn bad_requests_are_typed_errors() {
    let device = device();
    let policy = policy(&device);
    let config = SamplerConfig { max_new_tokens: 4, ..SamplerConfig::default() };
    let empty = generate(&policy, &[vec![]], Decoding::Greedy, &config);
    assert!(matches!(empty, Err(forkrl_trainer::TrainerError::Shape(_))), "{empty:?}");
    let outside = generate(&policy, &[vec![99]], Decoding::Greedy, &config);
    assert!(matches!(outside, Err(forkrl_trainer::TrainerError::Shape(_))), "{outside:?}");
    let bad_op = generate(&policy, &[vec![3]], Decoding::Temperature { temperature: -1.0 }, &config);
    assert!(matches!(bad_op, Err(forkrl_trainer::TrainerError::Core(_))), "{bad_op:?}");
    let none = generate(&policy, &[], Decoding::Greedy, &config).expect("empty batch");
    assert_eq!(none.tokens.len(), 0);
}

#[test]
fn the_kv_cache_grows_past_its_capacity_and_keeps_only_retained_rows() {
    use burn::tensor::{Int, Tensor, TensorData};
    let device = device();
    let policy = policy(&device);
    // Three left-padded rows of width 4; every step appends the same new id to every row.
    let rows = [vec![0u32, 0, 3, 4], vec![5, 6, 7, 8], vec![0, 9, 10, 11]];
    let pads = [2usize, 0, 1];
    let ids = |rows: &[Vec<u32>]| {
        let flat: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
        Tensor::<2, Int>::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), &device)
    };
    let last_logits = |rows: &[Vec<u32>], pads: &[usize]| -> Vec<f32> {
        let w = rows[0].len();
        let logits = policy.forward_left_padded(ids(rows), pads).expect("forward");
        logits.narrow(1, w - 1, 1).into_data().try_to_vec::<f32>().expect("f32")
    };
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{what}: differs by {worst}");
    };
    let (_, mut cache) = policy.prefill(ids(&rows), &pads, 4).expect("prefill");
    assert_eq!(cache.capacity(), 4, "room for the prompt only");
    let mut seqs: Vec<Vec<u32>> = rows.to_vec();
    for step in 0..3u32 {
        let new: Vec<Vec<u32>> = (0..seqs.len()).map(|r| vec![12 + step + r as u32]).collect();
        let cached = policy.decode(ids(&new), &mut cache).expect("decode");
        for (s, n) in seqs.iter_mut().zip(&new) {
            s.push(n[0]);
        }
        close(&cached.into_data().try_to_vec::<f32>().expect("f32"), &last_logits(&seqs, &pads), "grown cache");
    }
    assert!(cache.capacity() >= 7, "the buffers grew: {}", cache.capacity());
    // Rows 2 and 0 keep decoding, in that order; row 1 leaves.
    cache.retain_rows(&[2, 0]).expect("valid rows");
    assert_eq!(cache.rows(), 2);
    let kept: Vec<Vec<u32>> = vec![seqs[2].clone(), seqs[0].clone()];
    let mut kept_seqs = kept;
    let new = vec![vec![30u32], vec![31]];
    let cached = policy.decode(ids(&new), &mut cache).expect("decode after retain");
    kept_seqs[0].push(30);
    kept_seqs[1].push(31);
    close(&cached.into_data().try_to_vec::<f32>().expect("f32"), &last_logits(&kept_seqs, &[1, 2]), "retained rows");
    assert!(cache.retain_rows(&[5]).is_err(), "a row that is not there is a typed error");
    assert!(policy.decode(ids(&[vec![1u32], vec![2], vec![3]]), &mut cache).is_err(), "three rows, cache of two");
}
