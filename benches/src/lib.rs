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
///
/// Like the kernel, it runs on the widest instruction set the CPU has (AVX-512, then AVX2, then the baseline build),
/// with four independent accumulator vectors, so that the floor measures memory and not a short dependency chain:
/// on the project's 2-core machine the baseline (SSE2) build of the same sum was about 30 % slower than this one.
pub fn read_floor<E: LogitElement>(data: &[E], vocab: usize, threads: usize) -> f32 {
    let sum = floor_sum::select::<E>();
    threaded_rows(data, vocab, threads, sum)
}

/// The read-and-write floor of a backward pass: copies `src` (widened to f32) into `dst`, with the same threading and
/// instruction sets as [`read_floor`]. A pass that reads every logit and writes its gradient cannot be faster.
pub fn copy_floor<E: LogitElement>(src: &[E], dst: &mut [f32], vocab: usize, threads: usize) {
    let rows = src.len() / vocab.max(1);
    let per = rows.div_ceil(threads.max(1)).max(1) * vocab;
    let copy = floor_sum::select_copy::<E>();
    std::thread::scope(|s| {
        for (src, dst) in src.chunks(per).zip(dst.chunks_mut(per)) {
            s.spawn(move || copy(src, dst));
        }
    });
}

#[inline(always)]
fn plain_copy<E: LogitElement>(src: &[E], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Four independent 16-lane accumulators over the chunk (`#[inline(always)]` so that it is compiled with the features
/// of the function it lands in).
#[inline(always)]
fn plain_sum<E: LogitElement>(chunk: &[E]) -> f32 {
    let mut acc = [0.0f32; 64];
    let (quads, rest) = chunk.as_chunks::<64>();
    for q in quads {
        acc = std::array::from_fn(|l| acc[l] + q[l].to_f32());
    }
    acc.iter().sum::<f32>() + rest.iter().map(|v| v.to_f32()).sum::<f32>()
}

#[allow(unsafe_code)]
mod floor_sum {
    use super::{LogitElement, plain_copy, plain_sum};

    /// `$name` runs `$body` on `$args` compiled with `$features` (`#[inline(always)]` helpers land in it).
    macro_rules! with_features {
        ($name:ident, $features:literal, ($($arg:ident: $ty:ty),*) -> $out:ty, $body:ident) => {
            #[cfg(target_arch = "x86_64")]
            fn $name<E: LogitElement>($($arg: $ty),*) -> $out {
                #[target_feature(enable = $features)]
                fn inner<E: LogitElement>($($arg: $ty),*) -> $out {
                    $body($($arg),*)
                }
                // SAFETY: `select` / `select_copy` return this function only after `is_x86_feature_detected!`
                // confirmed the features on the running CPU.
                unsafe { inner($($arg),*) }
            }
        };
    }

    with_features!(sum_avx512, "avx512f,avx2", (chunk: &[E]) -> f32, plain_sum);
    with_features!(sum_avx2, "avx2", (chunk: &[E]) -> f32, plain_sum);
    with_features!(copy_avx512, "avx512f,avx2", (src: &[E], dst: &mut [f32]) -> (), plain_copy);
    with_features!(copy_avx2, "avx2", (src: &[E], dst: &mut [f32]) -> (), plain_copy);

    /// Which of the builds this CPU runs: 2 = AVX-512, 1 = AVX2, 0 = baseline.
    fn level() -> u8 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return 2;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return 1;
            }
        }
        0
    }

    /// The widest variant of [`plain_sum`] this CPU runs.
    pub(super) fn select<E: LogitElement>() -> fn(&[E]) -> f32 {
        match level() {
            #[cfg(target_arch = "x86_64")]
            2 => sum_avx512::<E>,
            #[cfg(target_arch = "x86_64")]
            1 => sum_avx2::<E>,
            _ => plain_sum::<E>,
        }
    }

    /// The widest variant of [`plain_copy`] this CPU runs.
    pub(super) fn select_copy<E: LogitElement>() -> fn(&[E], &mut [f32]) {
        match level() {
            #[cfg(target_arch = "x86_64")]
            2 => copy_avx512::<E>,
            #[cfg(target_arch = "x86_64")]
            1 => copy_avx2::<E>,
            _ => plain_copy::<E>,
        }
    }
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
