//! One-pass token entropy and target log-prob over a host `[N, V]` logits buffer.
//!
//! For each row `z ∈ R^V` and temperature `T`, with `z' = z / T` and `p = softmax(z')`:
//!
//! ```text
//! H      = −Σ_j p_j log p_j = log s − w / s
//! log p_y = z'_y − m − log s
//! where m = max_j z'_j,  s = Σ_j e^{z'_j − m},  w = Σ_j e^{z'_j − m} (z'_j − m)
//! ```
//!
//! This is the online form of entropy-and-forking-tokens.md §1.2 (verl's `entropy_from_logits` is the two-pass form
//! `logsumexp(z') − Σ softmax(z')·z'`). `s`, `w` and `m` are running reductions: when the running maximum moves from
//! `m_old` to `m_new`, `s ← s·e^{m_old−m_new}` and `w ← e^{m_old−m_new}·(w + (m_old − m_new)·s)`. Centring `w` on the
//! running maximum makes both terms of `H = log s + (−w/s)` non-negative, so there is no cancellation even for
//! near-one-hot rows with large logits.
//!
//! Each row is read once, in blocks of [`BLOCK`] values that stay in L1: the block's maximum, then the exponentials
//! in [`LANES`] independent accumulators that the compiler vectorises on stable Rust (the exponential is a
//! branch-free polynomial, [`exp_nonpositive`]). Block sums are folded into f64 row accumulators; all element work is
//! f32, whatever the input type (`f32`, `bf16`, `f16`). Rows are split across threads. Nothing of size `[N, V]` is
//! allocated.
//!
//! Source of the definition: "Beyond the 80/20 Rule" (Wang et al., arXiv 2506.01939) Eq. 1; numerics: verl
//! `verl/utils/torch_functional.py::entropy_from_logits`.

use forkrl_core::{Error, Result};
use half::{bf16, f16};

/// Values per block: the unit of the running-maximum update.
pub const BLOCK: usize = 256;
/// Independent accumulator lanes inside a block (the vector width the compiler is given).
pub const LANES: usize = 16;

/// A logits element type the host kernel reads (converted to f32 on load).
pub trait LogitElement: Copy + Send + Sync + 'static {
    /// The value as f32.
    fn to_f32(self) -> f32;
}

impl LogitElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl LogitElement for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: a shift, which vectorises (half's own conversion does the same).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl LogitElement for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Options of [`token_stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelOptions {
    /// Temperature `T` applied to the logits before the softmax (the rollout temperature). Must be finite and > 0.
    pub temperature: f32,
    /// Worker threads; 0 means `std::thread::available_parallelism()`.
    pub threads: usize,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self { temperature: 1.0, threads: 0 }
    }
}

/// Per-row results of [`token_stats`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenStats {
    /// Entropy `H` of `softmax(z / T)` per row, in nats.
    pub entropy: Vec<f32>,
    /// `logsumexp(z / T)` per row (what a backward pass needs to recompute `p` without storing `[N, V]`).
    pub logsumexp: Vec<f32>,
    /// `log softmax(z / T)[target]` per row, when targets were given.
    pub target_logprob: Option<Vec<f32>>,
}

/// Computes entropy, logsumexp and (optionally) the target log-prob of every row of a row-major `[N, vocab]` buffer,
/// reading each row once.
///
/// # Errors
/// [`Error::InvalidParameter`] for `vocab == 0` or a temperature that is not finite and positive;
/// [`Error::ShapeMismatch`] when `logits.len()` is not a multiple of `vocab` or `targets` does not have one id per
/// row; [`Error::InvalidParameter`] for a target id `≥ vocab`; [`Error::NonFinite`] naming the `[row, column]` of the
/// first NaN or infinity in the lowest failing row.
pub fn token_stats<E: LogitElement>(
    logits: &[E],
    vocab: usize,
    targets: Option<&[u32]>,
    options: KernelOptions,
) -> Result<TokenStats> {
    if vocab == 0 {
        return Err(Error::invalid_parameter("vocab", 0, "must be at least 1"));
    }
    let t = options.temperature;
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::invalid_parameter("temperature", t, "must be finite and > 0"));
    }
    if !logits.len().is_multiple_of(vocab) {
        return Err(Error::ShapeMismatch {
            op: "token_stats logits [N, vocab]",
            expected: vec![logits.len() / vocab, vocab],
            actual: vec![logits.len()],
        });
    }
    let rows = logits.len() / vocab;
    if let Some(targets) = targets {
        if targets.len() != rows {
            return Err(Error::ShapeMismatch {
                op: "token_stats targets",
                expected: vec![rows],
                actual: vec![targets.len()],
            });
        }
        if let Some((row, &id)) = targets.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(Error::invalid_parameter("target id", id, format!("row {row}: must be < vocab = {vocab}")));
        }
    }

    let mut entropy = vec![0.0f32; rows];
    let mut logsumexp = vec![0.0f32; rows];
    let mut logprob = targets.map(|_| vec![0.0f32; rows]);
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
    .clamp(1, rows.max(1));
    let rows_per_thread = rows.div_ceil(threads).max(1);
    let inv_t = 1.0 / t;

    // The first error of each worker, by row; the lowest row wins so that the report does not depend on threading.
    let mut failures: Vec<Option<Error>> = Vec::new();
    let work = select_worker::<E>();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut lp_chunks = logprob.as_mut().map(|lp| lp.chunks_mut(rows_per_thread));
        for (chunk_index, (h_out, l_out)) in
            entropy.chunks_mut(rows_per_thread).zip(logsumexp.chunks_mut(rows_per_thread)).enumerate()
        {
            let first_row = chunk_index * rows_per_thread;
            let lp_out = lp_chunks.as_mut().and_then(Iterator::next);
            let rows_here = h_out.len();
            let block = &logits[first_row * vocab..(first_row + rows_here) * vocab];
            let tgt = targets.map(|tg| &tg[first_row..first_row + rows_here]);
            let job = Job { logits: block, vocab, inv_t, targets: tgt, h_out, l_out, lp_out, first_row };
            handles.push(scope.spawn(move || work(job)));
        }
        failures = handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Some(worker_panicked()))).collect();
    });
    if let Some(err) = failures.into_iter().flatten().next() {
        return Err(err);
    }
    Ok(TokenStats { entropy, logsumexp, target_logprob: logprob })
}

fn worker_panicked() -> Error {
    Error::invalid_parameter("token_stats", "worker", "a worker thread panicked")
}

/// One worker's share of the rows: its input slice and the output slices it fills.
struct Job<'a, E> {
    logits: &'a [E],
    vocab: usize,
    inv_t: f32,
    targets: Option<&'a [u32]>,
    h_out: &'a mut [f32],
    l_out: &'a mut [f32],
    lp_out: Option<&'a mut [f32]>,
    /// Index of the job's first row in the whole batch (for error positions).
    first_row: usize,
}

/// A row worker (one per instruction set).
type Worker<E> = fn(Job<'_, E>) -> Option<Error>;

/// Picks the widest instruction set this CPU supports: AVX-512, then AVX2 + FMA, then the baseline build (SSE2 on
/// x86-64). All paths run the same code on the same 16 explicit lanes in the same order, so their results are
/// bit-identical; only the vector width the compiler may use differs.
fn select_worker<E: LogitElement>() -> Worker<E> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return simd::worker_avx512::<E>;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return simd::worker_avx2::<E>;
        }
    }
    worker::<E>
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use super::{Error, Job, LogitElement, worker};

    macro_rules! dispatch {
        ($name:ident, $features:literal) => {
            pub(super) fn $name<E: LogitElement>(job: Job<'_, E>) -> Option<Error> {
                #[target_feature(enable = $features)]
                fn inner<E: LogitElement>(job: Job<'_, E>) -> Option<Error> {
                    // `worker` and everything below it are `#[inline(always)]`, so they are compiled here with the
                    // enabled features.
                    worker(job)
                }
                // SAFETY: `select_worker` returns this function only after `is_x86_feature_detected!` confirmed every
                // feature in `$features` on the running CPU; it is not reachable any other way (private module).
                unsafe { inner(job) }
            }
        };
    }

    dispatch!(worker_avx512, "avx512f,avx2,fma");
    dispatch!(worker_avx2, "avx2,fma");
}

#[inline(always)]
fn worker<E: LogitElement>(job: Job<'_, E>) -> Option<Error> {
    let Job { logits, vocab, inv_t, targets, h_out, l_out, mut lp_out, first_row } = job;
    for (i, row) in logits.chunks_exact(vocab).enumerate() {
        let stats = row_stats(row, inv_t);
        if !stats.finite {
            let column = row.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
            return Some(Error::NonFinite {
                what: "logits",
                position: vec![first_row + i, column],
                value: f64::from(row[column].to_f32()),
            });
        }
        let log_s = stats.s.ln();
        h_out[i] = (log_s - stats.w / stats.s) as f32;
        l_out[i] = (f64::from(stats.m) + log_s) as f32;
        if let (Some(lp), Some(tg)) = (lp_out.as_deref_mut(), targets) {
            let zy = row[tg[i] as usize].to_f32() * inv_t;
            lp[i] = (f64::from(zy) - f64::from(stats.m) - log_s) as f32;
        }
    }
    None
}

/// Running statistics of one row: `m = max z'`, `s = Σ e^{z'−m}`, `w = Σ e^{z'−m}(z'−m)`.
#[derive(Debug, Clone, Copy)]
struct RowAcc {
    m: f32,
    s: f64,
    w: f64,
    /// Neumaier compensation terms of `s` and `w`: lane sums far below the running total (a near-one-hot row) would
    /// otherwise lose most of their bits when folded in.
    s_c: f64,
    w_c: f64,
    finite: bool,
}

/// Neumaier's compensated `sum += x`.
#[inline(always)]
fn add_compensated(sum: &mut f64, comp: &mut f64, x: f64) {
    let t = *sum + x;
    *comp += if sum.abs() >= x.abs() { (*sum - t) + x } else { (x - t) + *sum };
    *sum = t;
}

/// The one-pass reduction of a row (scaled by `inv_t`).
#[inline(always)]
fn row_stats<E: LogitElement>(row: &[E], inv_t: f32) -> RowAcc {
    let mut acc = RowAcc { m: f32::NEG_INFINITY, s: 0.0, w: 0.0, s_c: 0.0, w_c: 0.0, finite: true };
    let mut buf = [0.0f32; BLOCK];
    for block in row.chunks(BLOCK) {
        let n = block.len();
        // Load and scale.
        for (dst, src) in buf[..n].iter_mut().zip(block) {
            *dst = src.to_f32() * inv_t;
        }
        // Finiteness: `z * 0` is NaN exactly when z is NaN or ±inf (no fast-math, so this is not folded away).
        let mut lane_bad = [0.0f32; LANES];
        let full = n - n % LANES;
        for lanes in buf[..full].chunks_exact(LANES) {
            for l in 0..LANES {
                lane_bad[l] += lanes[l] * 0.0;
            }
        }
        for (l, v) in buf[full..n].iter().enumerate() {
            lane_bad[l] += v * 0.0;
        }
        if lane_bad.iter().any(|b| b.is_nan()) {
            acc.finite = false;
            return acc;
        }
        // A short last block is padded with -inf: no effect on the maximum, and e^{max(-inf - m, EXP_MIN_ARG)} ≈ 1.6e-38
        // per padded value is far below the f32 resolution of s ≥ 1.
        buf[n..].fill(f32::NEG_INFINITY);
        let mut lane_max = [f32::NEG_INFINITY; LANES];
        for lanes in buf.chunks_exact(LANES) {
            for l in 0..LANES {
                lane_max[l] = lane_max[l].max(lanes[l]);
            }
        }
        let block_max = lane_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if block_max > acc.m {
            if acc.s > 0.0 {
                let delta = f64::from(acc.m) - f64::from(block_max); // < 0
                let scale = delta.exp();
                let (s, w) = (acc.s + acc.s_c, acc.w + acc.w_c);
                acc.w = scale * (w + delta * s);
                acc.s = scale * s;
                (acc.s_c, acc.w_c) = (0.0, 0.0);
            }
            acc.m = block_max;
        }
        let m = acc.m;
        // Terms at the running maximum (e = 1 exactly) are counted apart from the others: in one f32 lane, a 1.0
        // would swallow the tiny terms of a near-deterministic row (1 + 1e-8 == 1 in f32) and bias its entropy.
        let mut lane_s = [0.0f32; LANES];
        let mut lane_w = [0.0f32; LANES];
        let mut lane_ones = [0.0f32; LANES];
        for lanes in buf.chunks_exact(LANES) {
            for l in 0..LANES {
                let x = lanes[l] - m; // <= 0, or -inf for padding
                let x = x.max(EXP_MIN_ARG);
                let at_max = x == 0.0;
                let e = exp_nonpositive(x);
                lane_s[l] += if at_max { 0.0 } else { e };
                lane_ones[l] += if at_max { 1.0 } else { 0.0 };
                lane_w[l] += e * x;
            }
        }
        let ones: f32 = lane_ones.iter().sum(); // small exact integers
        add_compensated(&mut acc.s, &mut acc.s_c, f64::from(ones));
        for l in 0..LANES {
            add_compensated(&mut acc.s, &mut acc.s_c, f64::from(lane_s[l]));
            add_compensated(&mut acc.w, &mut acc.w_c, f64::from(lane_w[l]));
        }
    }
    acc.s += acc.s_c;
    acc.w += acc.w_c;
    if acc.s <= 0.0 {
        // Only possible for an empty row, which the caller rules out (vocab >= 1).
        acc.finite = acc.finite && acc.m.is_finite();
        acc.s = 1.0;
    }
    acc
}

/// Below this argument `e^x` (< 1.7e-38) is negligible next to the row's maximum term `e^0 = 1`.
pub const EXP_MIN_ARG: f32 = -87.0;

/// `e^x` for `x ∈ [EXP_MIN_ARG, 0]`, branch-free so that loops over it vectorise.
///
/// Range reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, with round-to-nearest through the 1.5·2^23 trick (no
/// `round` instruction needed on baseline x86-64), then a degree-7 Taylor polynomial of `e^r` (truncation error
/// < 6e-9 relative) and `2^n` built in the exponent bits. Relative error about 2 ulp.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    // Plain multiply-add, not `mul_add`: without an FMA target feature `mul_add` is a libm call per element.
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let pow2n = f32::from_bits(((ni + 127) << 23) as u32);
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * pow2n
}

/// Reference two-pass computation in f64, for tests and as the path the fast kernel is checked against.
///
/// Uses `H = Σ_j p_j (lse − z'_j)`, a sum of non-negative terms. verl's algebraically equal form
/// `lse − Σ_j p_j z'_j` cancels catastrophically on near-one-hot rows with large logits — even in f64 it returns
/// exactly 0 for the row `z_17 = 40`, zeros elsewhere (V = 1000), whose entropy is 1.70e-13.
///
/// Returns `(entropy, logsumexp, log p_target)` of one row (`NaN` for the log-prob without a target).
pub fn reference_row_stats<E: LogitElement>(row: &[E], temperature: f64, target: Option<usize>) -> (f64, f64, f64) {
    let z: Vec<f64> = row.iter().map(|v| f64::from(v.to_f32()) / temperature).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|&v| (v - m).exp()).sum();
    let lse = m + s.ln();
    let entropy: f64 = z.iter().map(|&v| (v - lse).exp() * (lse - v)).sum();
    let lp = target.map_or(f64::NAN, |y| z[y] - lse);
    (entropy, lse, lp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f32) -> KernelOptions {
        KernelOptions { temperature, threads: 1 }
    }

    #[test]
    fn hand_values_from_test_vectors() {
        // test-vectors.md §1.1 and §2.A.
        let z = [2.0f32, 1.0, 0.0, -1.0];
        for (t, h) in [(1.0, 0.947537), (0.5, 0.455429), (2.0, 1.245050)] {
            let out = token_stats(&z, 4, None, opts(t)).expect("valid");
            assert!((f64::from(out.entropy[0]) - h).abs() < 1e-5, "T = {t}: {} vs {h}", out.entropy[0]);
        }
        let uniform = token_stats(&[0.3f32; 4], 4, None, opts(1.0)).expect("valid");
        assert!((f64::from(uniform.entropy[0]) - 4f64.ln()).abs() < 1e-6);
        let two = token_stats(&[0.0f32, 3f32.ln()], 2, Some(&[1]), opts(1.0)).expect("valid");
        assert!((f64::from(two.entropy[0]) - 0.562335).abs() < 1e-6);
        let lp = two.target_logprob.expect("targets given")[0];
        assert!((f64::from(lp) - 0.75f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn exp_is_accurate_on_its_range() {
        let mut worst = 0.0f64;
        let mut x = EXP_MIN_ARG;
        while x <= 0.0 {
            let rel = (f64::from(exp_nonpositive(x)) - f64::from(x).exp()).abs() / f64::from(x).exp();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn rows_longer_than_a_block_and_ragged_tails() {
        for vocab in [1, 3, LANES - 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let logits: Vec<f32> =
                (0..2 * vocab).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - (i % 5) as f32 * 3.0).collect();
            let targets: Vec<u32> = vec![0, (vocab - 1) as u32];
            let out = token_stats(&logits, vocab, Some(&targets), opts(0.7)).expect("valid");
            for row in 0..2 {
                let (h, lse, lp) =
                    reference_row_stats(&logits[row * vocab..(row + 1) * vocab], 0.7, Some(targets[row] as usize));
                assert!((f64::from(out.entropy[row]) - h).abs() <= 1e-5 * h.max(1e-2), "V={vocab} H");
                assert!((f64::from(out.logsumexp[row]) - lse).abs() <= 1e-5 * lse.abs().max(1.0), "V={vocab} lse");
                let lp_fast = f64::from(out.target_logprob.as_ref().expect("targets")[row]);
                assert!((lp_fast - lp).abs() <= 1e-5 * lp.abs().max(1.0), "V={vocab} lp {lp_fast} vs {lp}");
            }
        }
    }

    #[test]
    fn near_one_hot_rows_have_tiny_accurate_entropy() {
        // Large logits: the centred accumulator avoids the cancellation of m + log s − E[z].
        let mut row = vec![0.0f32; 1000];
        row[17] = 40.0;
        let out = token_stats(&row, 1000, Some(&[17]), opts(1.0)).expect("valid");
        let (_, _, lp) = reference_row_stats(&row, 1.0, Some(17));
        // Exact: s = 1 + ε with ε = 999·e^-40, w = −40ε, H = ln(1 + ε) + 40ε/(1 + ε) ≈ 41ε = 1.740e-13.
        let eps = 999.0 * (-40f64).exp();
        let exact = eps.ln_1p() + 40.0 * eps / (1.0 + eps);
        assert!((f64::from(out.entropy[0]) - exact).abs() < 1e-3 * exact, "{} vs {exact}", out.entropy[0]);
        assert!((f64::from(out.target_logprob.expect("targets")[0]) - lp).abs() < 1e-9);
    }

    #[test]
    fn tiny_terms_sharing_a_lane_with_the_maximum_are_kept() {
        // Regression (found by the f64-reference property test): z_0 = 24, zeros elsewhere. In f32, lane 0 held
        // 1 + 15 terms of e^-24 = 3.8e-11 and dropped them, biasing H by 0.2 %. Exact: s = 1 + ε, ε = 255·e^-24,
        // H = ln(1 + ε) + 24ε/(1 + ε).
        let mut row = vec![0.0f32; BLOCK];
        row[0] = 24.0;
        let out = token_stats(&row, BLOCK, None, opts(1.0)).expect("valid");
        let eps = 255.0 * (-24f64).exp();
        let exact = eps.ln_1p() + 24.0 * eps / (1.0 + eps);
        let rel = (f64::from(out.entropy[0]) - exact).abs() / exact;
        assert!(rel < 1e-5, "{} vs {exact} (relative error {rel})", out.entropy[0]);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let mut z = vec![0.0f32; 3 * 300];
        z[2 * 300 + 257] = f32::NAN;
        z[2 * 300 + 5] = f32::INFINITY;
        match token_stats(&z, 300, None, KernelOptions { temperature: 1.0, threads: 2 }) {
            Err(Error::NonFinite { what: "logits", position, .. }) => assert_eq!(position, vec![2, 5]),
            other => panic!("unexpected {other:?}"),
        }
        z[2 * 300 + 5] = f32::NEG_INFINITY;
        z[2 * 300 + 257] = 0.0;
        assert!(matches!(token_stats(&z, 300, None, opts(1.0)), Err(Error::NonFinite { .. })));
        assert!(matches!(token_stats(&[0.0f32; 5], 2, None, opts(1.0)), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(token_stats(&[0.0f32; 4], 0, None, opts(1.0)), Err(Error::InvalidParameter { .. })));
        assert!(matches!(token_stats(&[0.0f32; 4], 2, None, opts(0.0)), Err(Error::InvalidParameter { .. })));
        assert!(matches!(token_stats(&[0.0f32; 4], 2, None, opts(f32::NAN)), Err(Error::InvalidParameter { .. })));
        assert!(matches!(token_stats(&[0.0f32; 4], 2, Some(&[0]), opts(1.0)), Err(Error::ShapeMismatch { .. })));
        let err = token_stats(&[0.0f32; 4], 2, Some(&[0, 2]), opts(1.0)).expect_err("id 2 >= vocab 2");
        assert!(err.to_string().contains("row 1"), "{err}");
    }

    #[test]
    fn simd_paths_are_bit_identical_to_the_baseline() {
        let vocab = 3 * BLOCK + 5;
        let logits: Vec<f32> = (0..4 * vocab).map(|i| ((i * 2654435761usize) % 10007) as f32 / 300.0 - 15.0).collect();
        let targets = [0u32, 1, 2, 3];
        let run = |work: Worker<f32>| {
            let (mut h, mut l, mut lp) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]);
            let job = Job {
                logits: &logits,
                vocab,
                inv_t: 0.8,
                targets: Some(&targets),
                h_out: &mut h,
                l_out: &mut l,
                lp_out: Some(&mut lp),
                first_row: 0,
            };
            assert!(work(job).is_none());
            (h, l, lp)
        };
        assert_eq!(run(select_worker::<f32>()), run(worker::<f32>));
    }

    #[test]
    fn empty_batch_gives_empty_stats() {
        let out = token_stats::<f32>(&[], 8, Some(&[]), KernelOptions::default()).expect("no rows is fine");
        assert!(out.entropy.is_empty() && out.target_logprob.expect("targets").is_empty());
    }
}
