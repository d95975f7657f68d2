//! Shared helpers of forkrl's criterion benchmarks: deterministic inputs and the baselines every ratio is taken
//! against (a memory-read floor and a naive materialising formula), measured in the same run as the fast paths.

use forkrl_entropy::LogitElement;

/// Deterministic pseudo-random logits in roughly [-8, 8] (an xorshift stream; no RNG dependency).
pub fn logits<E: Copy>(rows: usize, vocab: usize, convert: impl Fn(f32) -> E) -> Vec<E> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..rows * vocab)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            convert(((state >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0)
        })
        .collect()
}

/// Splits `rows` rows of width `vocab` across `threads` scoped threads, as the kernel does, and sums `f` per chunk.
fn threaded_rows<E: Sync>(data: &[E], vocab: usize, threads: usize, f: impl Fn(&[E]) -> f32 + Sync) -> f32 {
    let rows = data.len() / vocab;
    let per = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = data.chunks(per * vocab).map(|chunk| s.spawn(|| f(chunk))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(f32::NAN)).sum()
    })
}

/// The read floor: a plain vectorised sum over the same buffer with the same threading. Nothing that reads every
/// element can be faster than this on the same machine.
pub fn read_floor<E: LogitElement>(data: &[E], vocab: usize, threads: usize) -> f32 {
    threaded_rows(data, vocab, threads, |chunk| {
        let mut lanes = [0.0f32; 16];
        let full = chunk.len() - chunk.len() % 16;
        for block in chunk[..full].chunks_exact(16) {
            for l in 0..16 {
                lanes[l] += block[l].to_f32();
            }
        }
        lanes.iter().sum::<f32>() + chunk[full..].iter().map(|v| v.to_f32()).sum::<f32>()
    })
}

/// The common PyTorch formula written out: materialise `p = softmax(z)` for every row (an `[N, V]` allocation), then
/// `H = logsumexp(z) − Σ p·z`, with std's `exp`. Same threading. Returns the sum of entropies.
pub fn naive_materialising<E: LogitElement>(data: &[E], vocab: usize, threads: usize) -> f32 {
    threaded_rows(data, vocab, threads, |chunk| {
        let z: Vec<f32> = chunk.iter().map(|v| v.to_f32()).collect();
        let mut p = vec![0.0f32; z.len()];
        let mut total = 0.0;
        for (zr, pr) in z.chunks(vocab).zip(p.chunks_mut(vocab)) {
            let m = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = zr.iter().map(|x| (x - m).exp()).sum();
            let lse = m + s.ln();
            for (pv, &x) in pr.iter_mut().zip(zr) {
                *pv = (x - lse).exp();
            }
            total += lse - pr.iter().zip(zr).map(|(a, b)| a * b).sum::<f32>();
        }
        total
    })
}
