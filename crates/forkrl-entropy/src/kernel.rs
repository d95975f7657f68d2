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
//! # How one row is read
//!
//! The row is read once, in blocks of [`BLOCK`] values. Pass 1 over a block loads it (converting bf16/f16 to f32),
//! scales it by `1/T` into an L1-resident buffer and takes its maximum; pass 2 runs over that buffer and accumulates
//! `e^{x}` and `e^{x}·x` with `x = z' − m`, in [`LANES`] independent f32 lanes that the compiler vectorises (the
//! exponential is a branch-free polynomial, [`exp_nonpositive`]). Lane sums are folded into f64 lane accumulators
//! once per block, and the lanes are added up once per row. Nothing of size `[N, V]` is allocated.
//!
//! - **Terms at the maximum.** A term with `x = 0` is exactly 1. It is counted apart (`s = n_max + s_rest`,
//!   `log s = log n_max + log1p(s_rest / n_max)`): in one f32 lane a 1.0 would swallow the tiny terms of a
//!   near-deterministic row (1 + 1e-8 == 1 in f32) and bias its entropy. Only a block whose maximum reaches the
//!   running maximum can hold such terms, so only those blocks pay for the comparison.
//! - **Non-finite input costs nothing on the fast path.** The polynomial returns exactly 0 for `x ≤ −88`
//!   ([`EXP_MIN_ARG`]) and propagates NaN, and `w` accumulates `e^{x}·x` with the unclamped `x`: a NaN gives NaN, a
//!   `+inf` gives `inf − inf = NaN`, a `−inf` gives `0·(−inf) = NaN`. A row whose sums are not finite is scanned
//!   again: a non-finite logit is reported as [`Error::NonFinite`] with its `[row, column]`; a row of finite logits
//!   so extreme that the f32 path overflowed (|z'| near `f32::MAX`) is recomputed in f64 by
//!   [`reference_row_stats`].
//! - **Memory and arithmetic overlap.** Pass 1 also asks for the cache lines [`PREFETCH_AHEAD`] bytes ahead (a
//!   prefetch hint, x86-64 only). Without it the hardware prefetcher sat idle during pass 2 and a row from memory
//!   cost about the sum of its read time and its arithmetic (0.61 ns per f32 value on one core of the project's
//!   machine, against 0.35 ns for a plain read and 0.22 ns for the arithmetic on cached rows); with it, 0.39 ns.
//! - **Instruction sets.** x86-64 picks AVX-512, then AVX2 + FMA, then the SSE2 baseline at run time
//!   (`is_x86_feature_detected!`). The FMA paths use fused multiply-adds and give bit-identical results to each
//!   other; the baseline rounds each product and sum separately (results agree to ~1e-7 relative).
//! - Results are bit-identical for any thread count: each row is computed by one thread, in a fixed order.
//!
//! Source of the definition: "Beyond the 80/20 Rule" (Wang et al., arXiv 2506.01939) Eq. 1; numerics: verl
//! `verl/utils/torch_functional.py::entropy_from_logits`.

use forkrl_core::{Error, Result};
use half::{bf16, f16};

/// Values per block: the unit of the running-maximum update (2 KiB of f32, well inside L1).
pub const BLOCK: usize = 512;
/// Independent accumulator lanes inside a block (the vector width the compiler is given).
pub const LANES: usize = 16;
/// Below this many logits per thread, starting a thread costs more than the work it takes over.
const MIN_ELEMENTS_PER_THREAD: usize = 1 << 16;

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
        // Branch-free widening, so that the load loop vectorises (half's conversion checks the CPU at run time on
        // each call): exponent and mantissa move to f32's positions, a product with 2^112 re-biases the exponent
        // (and normalises subnormals exactly), and infinities and NaNs get the all-ones exponent. Exhaustively
        // tested against `half`.
        let h = u32::from(self.to_bits());
        let magnitude = h & 0x7fff;
        let widened = f32::from_bits(magnitude << 13) * f32::from_bits(0x7780_0000); // · 2^112
        let special = if magnitude >= 0x7c00 { 0x7f80_0000 } else { 0 };
        f32::from_bits(widened.to_bits() | special | ((h & 0x8000) << 16))
    }
}

/// Options of [`token_stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelOptions {
    /// Temperature `T` applied to the logits before the softmax (the rollout temperature). Must be finite and > 0.
    pub temperature: f32,
    /// Most worker threads to use; 0 means `std::thread::available_parallelism()`. Small inputs use fewer (one
    /// thread per 65,536 logits at most); the results do not depend on the number.
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
    let rows = check_inputs(logits, vocab, targets, options.temperature)?;
    let t = options.temperature;

    let mut entropy = vec![0.0f32; rows];
    let mut logsumexp = vec![0.0f32; rows];
    let mut logprob = targets.map(|_| vec![0.0f32; rows]);
    let threads = thread_count(options.threads, rows, logits.len());
    let rows_per_thread = rows.div_ceil(threads).max(1);
    let work = select_worker::<E>();
    let job =
        |first_row: usize, h_out, l_out, lp_out| Job::new(logits, vocab, t, targets, first_row, h_out, l_out, lp_out);

    if threads == 1 {
        // One worker: run it here rather than paying for a thread (the decoder calls this once per sampled token).
        if let Some(err) = work(job(0, &mut entropy, &mut logsumexp, logprob.as_deref_mut())) {
            return Err(err);
        }
        return Ok(TokenStats { entropy, logsumexp, target_logprob: logprob });
    }

    // The first error of each worker, by row; the lowest row wins so that the report does not depend on threading.
    let mut failures: Vec<Option<Error>> = Vec::new();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut lp_chunks = logprob.as_mut().map(|lp| lp.chunks_mut(rows_per_thread));
        for (chunk_index, (h_out, l_out)) in
            entropy.chunks_mut(rows_per_thread).zip(logsumexp.chunks_mut(rows_per_thread)).enumerate()
        {
            let lp_out = lp_chunks.as_mut().and_then(Iterator::next);
            let job = job(chunk_index * rows_per_thread, h_out, l_out, lp_out);
            handles.push(scope.spawn(move || work(job)));
        }
        failures = handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Some(worker_panicked()))).collect();
    });
    if let Some(err) = failures.into_iter().flatten().next() {
        return Err(err);
    }
    Ok(TokenStats { entropy, logsumexp, target_logprob: logprob })
}

/// Checks what [`token_stats`] and [`token_stats_backward`] share; returns the number of rows.
fn check_inputs<E>(logits: &[E], vocab: usize, targets: Option<&[u32]>, temperature: f32) -> Result<usize> {
    if vocab == 0 {
        return Err(Error::invalid_parameter("vocab", 0, "must be at least 1"));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::invalid_parameter("temperature", temperature, "must be finite and > 0"));
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
    Ok(rows)
}

/// Worker threads for `rows` rows of `elements` logits in all: at most the request (0 = all cores), one per row,
/// and one per [`MIN_ELEMENTS_PER_THREAD`] logits.
fn thread_count(requested: usize, rows: usize, elements: usize) -> usize {
    let requested = match requested {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    requested.min(rows).min(elements.div_ceil(MIN_ELEMENTS_PER_THREAD)).max(1)
}

fn worker_panicked() -> Error {
    Error::invalid_parameter("token_stats", "worker", "a worker thread panicked")
}

/// One worker's share of the rows: its input slice and the output slices it fills.
struct Job<'a, E> {
    logits: &'a [E],
    vocab: usize,
    temperature: f32,
    targets: Option<&'a [u32]>,
    h_out: &'a mut [f32],
    l_out: &'a mut [f32],
    lp_out: Option<&'a mut [f32]>,
    /// Index of the job's first row in the whole batch (for error positions).
    first_row: usize,
}

impl<'a, E> Job<'a, E> {
    /// The job of the rows `first_row..first_row + h_out.len()`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        logits: &'a [E],
        vocab: usize,
        temperature: f32,
        targets: Option<&'a [u32]>,
        first_row: usize,
        h_out: &'a mut [f32],
        l_out: &'a mut [f32],
        lp_out: Option<&'a mut [f32]>,
    ) -> Self {
        let rows = first_row..first_row + h_out.len();
        Self {
            logits: &logits[rows.start * vocab..rows.end * vocab],
            vocab,
            temperature,
            targets: targets.map(|tg| &tg[rows]),
            h_out,
            l_out,
            lp_out,
            first_row,
        }
    }
}

/// A row worker (one per instruction set).
type Worker<E> = fn(Job<'_, E>) -> Option<Error>;

/// Whether the baseline build has a native fused multiply-add (aarch64 always does; x86-64 when built with
/// `-C target-feature=+fma` or a `target-cpu` that has it). Without one, `f32::mul_add` is a libm call per element.
const BASELINE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// The instruction set the host kernels run on, detected at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2Fma,
    Baseline,
}

/// The widest instruction set this CPU supports: AVX-512, then AVX2 + FMA, then the baseline build (SSE2 on x86-64).
fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2_fma = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        if avx2_fma && std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if avx2_fma {
            return Isa::Avx2Fma;
        }
    }
    Isa::Baseline
}

/// The forward worker for this CPU. All paths run the same code on the same 16 explicit lanes in the same order; the
/// FMA paths are bit-identical to each other.
fn select_worker<E: LogitElement>() -> Worker<E> {
    match detect_isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => simd::worker_avx512::<E>,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => simd::worker_avx2::<E>,
        _ => worker::<E, BASELINE_FMA>,
    }
}

/// The backward worker for this CPU (as [`select_worker`]).
fn select_grad_worker<E: LogitElement>() -> GradWorker<E> {
    match detect_isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => simd::grad_worker_avx512::<E>,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => simd::grad_worker_avx2::<E>,
        _ => grad_worker::<E, BASELINE_FMA>,
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use super::{Error, GradJob, Job, LogitElement, grad_worker, worker};

    macro_rules! dispatch {
        ($name:ident, $worker:ident, $job:ident, $out:ty, $features:literal) => {
            pub(super) fn $name<E: LogitElement>(job: $job<'_, E>) -> $out {
                #[target_feature(enable = $features)]
                fn inner<E: LogitElement>(job: $job<'_, E>) -> $out {
                    // The worker and everything below it are `#[inline(always)]`, so they are compiled here with the
                    // enabled features.
                    $worker::<E, true>(job)
                }
                // SAFETY: `select_worker` / `select_grad_worker` return this function only after
                // `is_x86_feature_detected!` confirmed every feature in `$features` on the running CPU; it is not
                // reachable any other way (private module).
                unsafe { inner(job) }
            }
        };
    }

    dispatch!(worker_avx512, worker, Job, Option<Error>, "avx512f,avx2,fma");
    dispatch!(worker_avx2, worker, Job, Option<Error>, "avx2,fma");
    dispatch!(grad_worker_avx512, grad_worker, GradJob, (), "avx512f,avx2,fma");
    dispatch!(grad_worker_avx2, grad_worker, GradJob, (), "avx2,fma");

    /// Asks for the cache line at `p` to be brought into L1.
    #[inline(always)]
    pub(super) fn prefetch(p: *const u8) {
        // SAFETY: a prefetch is only a hint: it never faults and changes no program state, whatever the address
        // (callers point past the end of a row, possibly past the end of the buffer). SSE is in the x86-64 baseline.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast()) }
    }
}

/// Bytes ahead of the block being loaded whose cache lines are requested (see the module doc); 2–12 KiB measured
/// the same on the project's machine.
pub const PREFETCH_AHEAD: usize = 4096;

/// Requests the cache line at `p` (a hint; a no-op where no prefetch instruction is wired up).
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    simd::prefetch(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline(always)]
fn worker<E: LogitElement, const FMA: bool>(job: Job<'_, E>) -> Option<Error> {
    let Job { logits, vocab, temperature, targets, h_out, l_out, mut lp_out, first_row } = job;
    let inv_t = 1.0 / temperature;
    let mut buf = Block([0.0; BLOCK]);
    for (i, row) in logits.chunks_exact(vocab).enumerate() {
        let target = targets.map(|tg| tg[i] as usize);
        let (h, lse, lp) = match row_stats::<E, FMA>(row, inv_t, &mut buf) {
            Some(stats) => {
                let lp = target.map_or(f64::NAN, |y| f64::from(row[y].to_f32() * inv_t) - stats.lse);
                (stats.entropy, stats.lse, lp)
            }
            None => {
                if let Some(column) = row.iter().position(|v| !v.to_f32().is_finite()) {
                    return Some(Error::NonFinite {
                        what: "logits",
                        position: vec![first_row + i, column],
                        value: f64::from(row[column].to_f32()),
                    });
                }
                // Finite logits so large that `z / T` or `z' − m` overflowed f32: the f64 reference handles them.
                reference_row_stats(row, f64::from(temperature), target)
            }
        };
        h_out[i] = h as f32;
        l_out[i] = lse as f32;
        if let Some(lp_row) = lp_out.as_deref_mut() {
            lp_row[i] = lp as f32;
        }
    }
    None
}

/// The f32 block buffer, aligned to a cache line so that vector loads from it never straddle two.
#[repr(align(64))]
struct Block([f32; BLOCK]);

/// Statistics of one finished row.
#[derive(Debug, Clone, Copy)]
struct RowStats {
    entropy: f64,
    /// `m + log s`.
    lse: f64,
}

/// Running per-lane accumulators of one row, relative to the running maximum `m`.
#[derive(Debug, Clone, Copy)]
struct RowAcc {
    m: f32,
    /// Number of terms equal to the running maximum (each contributes `e^0 = 1` to `s`).
    at_max: [f64; LANES],
    /// `Σ e^{x}` over the other terms.
    rest: [f64; LANES],
    /// `Σ e^{x}·x`.
    w: [f64; LANES],
}

/// The one-pass reduction of a row (scaled by `inv_t`); `None` when a sum is not finite (see the module doc).
#[inline(always)]
fn row_stats<E: LogitElement, const FMA: bool>(row: &[E], inv_t: f32, buf: &mut Block) -> Option<RowStats> {
    let mut acc = RowAcc { m: f32::NEG_INFINITY, at_max: [0.0; LANES], rest: [0.0; LANES], w: [0.0; LANES] };
    for block in row.chunks(BLOCK) {
        let n = block.len();
        let block_max = load_block(block, inv_t, &mut buf.0);
        if block_max > acc.m {
            if acc.m > f32::NEG_INFINITY {
                // The old terms at the maximum become ordinary ones: s ← e^δ s, w ← e^δ (w + δ s), δ = m_old − m_new.
                let delta = f64::from(acc.m) - f64::from(block_max);
                let scale = delta.exp();
                for l in 0..LANES {
                    let s = acc.at_max[l] + acc.rest[l];
                    acc.w[l] = scale * (acc.w[l] + delta * s);
                    acc.rest[l] = scale * s;
                    acc.at_max[l] = 0.0;
                }
            }
            acc.m = block_max;
        }
        let sums = if n < BLOCK {
            block_sums::<FMA, true, true>(&buf.0, n, acc.m)
        } else if block_max == acc.m {
            block_sums::<FMA, true, false>(&buf.0, n, acc.m)
        } else {
            block_sums::<FMA, false, false>(&buf.0, n, acc.m)
        };
        for l in 0..LANES {
            acc.at_max[l] += f64::from(sums.at_max[l]);
            acc.rest[l] += f64::from(sums.rest[l]);
            acc.w[l] += f64::from(sums.w[l]);
        }
    }
    let at_max: f64 = acc.at_max.iter().sum();
    let rest: f64 = acc.rest.iter().sum();
    let w: f64 = acc.w.iter().sum();
    if !(acc.m.is_finite() && rest.is_finite() && w.is_finite() && at_max >= 1.0) {
        return None;
    }
    let log_s = at_max.ln() + (rest / at_max).ln_1p();
    Some(RowStats { entropy: log_s - w / (at_max + rest), lse: f64::from(acc.m) + log_s })
}

/// Pass 1: `buf[..n] = block · inv_t`, returning its maximum (NaNs are skipped here and caught in pass 2).
#[inline(always)]
fn load_block<E: LogitElement>(block: &[E], inv_t: f32, buf: &mut [f32; BLOCK]) -> f32 {
    let n = block.len();
    debug_assert!(n <= BLOCK);
    // The hardware prefetcher idles while pass 2 computes; ask for the data of a later block now, so that its
    // memory latency overlaps this block's arithmetic. Past the end of the buffer this is a harmless hint.
    for line in (0..n).step_by(64 / size_of::<E>().max(1)) {
        prefetch(block[line..].as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD));
    }
    // Convert and scale as a plain map (vectorises for every element type), then take the maximum from L1.
    for (dst, src) in buf[..n].iter_mut().zip(block) {
        *dst = src.to_f32() * inv_t;
    }
    // `if >` rather than `f32::max`: one vector max instruction, no NaN fix-up. Four vectors per step, in four
    // independent accumulators: one would make each step wait for the previous one's result.
    let max = |a: f32, b: f32| if b > a { b } else { a };
    let (quads, rest) = buf[..n].as_chunks::<{ 4 * LANES }>();
    let mut quad_max = [f32::NEG_INFINITY; 4 * LANES];
    for q in quads {
        quad_max = std::array::from_fn(|l| max(quad_max[l], q[l]));
    }
    let mut lane_max: [f32; LANES] = std::array::from_fn(|l| {
        max(max(quad_max[l], quad_max[l + LANES]), max(quad_max[l + 2 * LANES], quad_max[l + 3 * LANES]))
    });
    for (i, &v) in rest.iter().enumerate() {
        lane_max[i % LANES] = max(lane_max[i % LANES], v);
    }
    max_of(&lane_max)
}

/// The maximum of the lanes as a tree (a sequential fold would be one long dependency chain per block).
#[inline(always)]
fn max_of(lanes: &[f32; LANES]) -> f32 {
    let max = |a: f32, b: f32| if b > a { b } else { a };
    let h: [f32; LANES / 2] = std::array::from_fn(|l| max(lanes[l], lanes[l + LANES / 2]));
    let q: [f32; LANES / 4] = std::array::from_fn(|l| max(h[l], h[l + LANES / 4]));
    let e: [f32; LANES / 8] = std::array::from_fn(|l| max(q[l], q[l + LANES / 8]));
    e.iter().fold(f32::NEG_INFINITY, |a, &b| max(a, b))
}

/// Lane sums of one block.
#[derive(Debug, Clone, Copy)]
struct BlockSums {
    at_max: [f32; LANES],
    rest: [f32; LANES],
    w: [f32; LANES],
}

/// Pass 2 over the buffer of a block: per lane, the count of terms at the maximum, `Σ e^{x}` over the others and
/// `Σ e^{x}·x`, with `x = buf − m`. `AT_MAX = false` is for blocks whose maximum is below `m` (no term is at it);
/// `TAIL = true` is for a short last block (the first `n` values are real).
#[inline(always)]
fn block_sums<const FMA: bool, const AT_MAX: bool, const TAIL: bool>(
    buf: &[f32; BLOCK],
    n: usize,
    m: f32,
) -> BlockSums {
    let mut sums = BlockSums { at_max: [0.0; LANES], rest: [0.0; LANES], w: [0.0; LANES] };
    let vectors = if TAIL { n.div_ceil(LANES) } else { BLOCK / LANES };
    for (k, lanes) in buf.as_chunks::<LANES>().0.iter().take(vectors).enumerate() {
        for l in 0..LANES {
            // Past the end of a short block: x = EXP_MIN_ARG, so e = 0 and e·x = 0.
            let x = if TAIL && k * LANES + l >= n { EXP_MIN_ARG } else { lanes[l] - m };
            // Clamp for the polynomial; written so that a NaN x stays NaN.
            let clamped = if x < EXP_MIN_ARG { EXP_MIN_ARG } else { x };
            let e = exp_poly::<FMA>(clamped);
            if AT_MAX {
                let at_max = x == 0.0;
                sums.at_max[l] += if at_max { 1.0 } else { 0.0 };
                sums.rest[l] += if at_max { 0.0 } else { e };
            } else {
                sums.rest[l] += e;
            }
            // The unclamped x: e = 0 there, and 0·(−inf) = NaN flags a −inf logit.
            sums.w[l] = madd::<FMA>(e, x, sums.w[l]);
        }
    }
    sums
}

pub use forkrl_core::numeric::{EXP_MIN_ARG, exp_nonpositive};
use forkrl_core::numeric::{exp_poly, madd};

/// Upstream gradients of a loss with respect to the per-row outputs of [`token_stats`], for
/// [`token_stats_backward`].
#[derive(Debug, Clone, Copy)]
pub struct StatsGrad<'a> {
    /// `∂L/∂H` per row.
    pub entropy: &'a [f32],
    /// `∂L/∂logsumexp` per row.
    pub logsumexp: &'a [f32],
    /// `∂L/∂log p_target` per row (needs the targets).
    pub target_logprob: Option<&'a [f32]>,
}

/// The gradient `∂L/∂z` of a loss `L` with respect to every logit, given `∂L` with respect to the entropy,
/// logsumexp and target log-prob of each row (the backward pass of [`token_stats`]), in one read of each row.
///
/// With `log p_i = z_i / T − lse` and `p_i = e^{log p_i}` recomputed from the forward pass's `lse` and `H`:
///
/// ```text
/// ∂L/∂z_i = (1/T) · ( p_i · (g_lse − g_lp − g_H (log p_i + H)) + g_lp · 1[i = y] )
/// ```
///
/// (from `∂H/∂z'_i = −p_i (log p_i + H)`, `∂lse/∂z'_i = p_i`, `∂ log p_y/∂z'_i = 1[i = y] − p_i`,
/// entropy-and-forking-tokens.md §1.2). Returns a row-major `[N, vocab]` buffer. Threads and instruction sets as
/// [`token_stats`]. A NaN logit or statistic gives NaN in that row's gradient; a `−inf` logit gets gradient 0.
///
/// # Errors
/// As [`token_stats`] for `vocab`, the temperature, the shape of `logits` and the target ids;
/// [`Error::ShapeMismatch`] when `stats` or a gradient does not have one value per row, or `grad.target_logprob` is
/// given without targets.
pub fn token_stats_backward<E: LogitElement>(
    logits: &[E],
    vocab: usize,
    targets: Option<&[u32]>,
    stats: &TokenStats,
    grad: StatsGrad<'_>,
    options: KernelOptions,
) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; logits.len()];
    token_stats_backward_into(logits, vocab, targets, stats, grad, options, &mut out)?;
    Ok(out)
}

/// [`token_stats_backward`] into a caller's `[N, vocab]` buffer (every value is overwritten).
///
/// # Errors
/// As [`token_stats_backward`]; [`Error::ShapeMismatch`] when `out` does not have one value per logit.
pub fn token_stats_backward_into<E: LogitElement>(
    logits: &[E],
    vocab: usize,
    targets: Option<&[u32]>,
    stats: &TokenStats,
    grad: StatsGrad<'_>,
    options: KernelOptions,
    out: &mut [f32],
) -> Result<()> {
    let rows = check_inputs(logits, vocab, targets, options.temperature)?;
    if out.len() != logits.len() {
        return Err(Error::ShapeMismatch {
            op: "token_stats_backward_into out [N, vocab]",
            expected: vec![rows, vocab],
            actual: vec![out.len()],
        });
    }
    let per_row = [
        ("token_stats_backward stats.entropy", stats.entropy.len()),
        ("token_stats_backward stats.logsumexp", stats.logsumexp.len()),
        ("token_stats_backward grad.entropy", grad.entropy.len()),
        ("token_stats_backward grad.logsumexp", grad.logsumexp.len()),
        ("token_stats_backward grad.target_logprob", grad.target_logprob.map_or(rows, <[f32]>::len)),
    ];
    if let Some(&(op, len)) = per_row.iter().find(|&&(_, len)| len != rows) {
        return Err(Error::ShapeMismatch { op, expected: vec![rows], actual: vec![len] });
    }
    if grad.target_logprob.is_some() && targets.is_none() {
        return Err(Error::ShapeMismatch {
            op: "token_stats_backward targets (needed by grad.target_logprob)",
            expected: vec![rows],
            actual: vec![0],
        });
    }
    let threads = thread_count(options.threads, rows, logits.len());
    let rows_per_thread = rows.div_ceil(threads).max(1);
    let work = select_grad_worker::<E>();
    let t = options.temperature;
    let job = |first, out| GradJob::new(logits, vocab, t, targets, stats, grad, first, out);
    if threads == 1 {
        work(job(0, out));
        return Ok(());
    }
    let mut panicked = false;
    std::thread::scope(|scope| {
        let handles: Vec<_> = out
            .chunks_mut(rows_per_thread * vocab)
            .enumerate()
            .map(|(k, chunk)| {
                let job = job(k * rows_per_thread, chunk);
                scope.spawn(move || work(job))
            })
            .collect();
        // Join every worker before answering.
        let failed: Vec<bool> = handles.into_iter().map(|h| h.join().is_err()).collect();
        panicked = failed.contains(&true);
    });
    if panicked {
        return Err(worker_panicked());
    }
    Ok(())
}

/// One worker's share of the rows of [`token_stats_backward`].
struct GradJob<'a, E> {
    logits: &'a [E],
    vocab: usize,
    temperature: f32,
    targets: Option<&'a [u32]>,
    entropy: &'a [f32],
    logsumexp: &'a [f32],
    g_entropy: &'a [f32],
    g_logsumexp: &'a [f32],
    g_logprob: Option<&'a [f32]>,
    out: &'a mut [f32],
}

impl<'a, E> GradJob<'a, E> {
    /// The job of the rows `first..first + out.len() / vocab`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        logits: &'a [E],
        vocab: usize,
        temperature: f32,
        targets: Option<&'a [u32]>,
        stats: &'a TokenStats,
        grad: StatsGrad<'a>,
        first: usize,
        out: &'a mut [f32],
    ) -> Self {
        let rows = first..first + out.len() / vocab;
        Self {
            logits: &logits[rows.start * vocab..rows.end * vocab],
            vocab,
            temperature,
            targets: targets.map(|tg| &tg[rows.clone()]),
            entropy: &stats.entropy[rows.clone()],
            logsumexp: &stats.logsumexp[rows.clone()],
            g_entropy: &grad.entropy[rows.clone()],
            g_logsumexp: &grad.logsumexp[rows.clone()],
            g_logprob: grad.target_logprob.map(|g| &g[rows]),
            out,
        }
    }
}

/// A backward row worker (one per instruction set).
type GradWorker<E> = fn(GradJob<'_, E>);

#[inline(always)]
fn grad_worker<E: LogitElement, const FMA: bool>(job: GradJob<'_, E>) {
    let GradJob { logits, vocab, temperature, targets, entropy, logsumexp, g_entropy, g_logsumexp, g_logprob, out } =
        job;
    let inv_t = 1.0 / temperature;
    for (i, (row, dz)) in logits.chunks_exact(vocab).zip(out.chunks_exact_mut(vocab)).enumerate() {
        let g_lp = g_logprob.map_or(0.0, |g| g[i]);
        // ∂L/∂z_j = p_j · (k0 + k1 · log p_j) (+ g_lp / T at the target).
        let k0 = inv_t * (g_logsumexp[i] - g_lp - g_entropy[i] * entropy[i]);
        let k1 = -inv_t * g_entropy[i];
        let lse = logsumexp[i];
        let (src, src_tail) = row.as_chunks::<LANES>();
        let (dst, dst_tail) = dz.as_chunks_mut::<LANES>();
        for (d, z) in dst.iter_mut().zip(src) {
            prefetch(z.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD));
            *d = std::array::from_fn(|l| grad_element::<FMA>(z[l].to_f32(), inv_t, lse, k0, k1));
        }
        for (d, z) in dst_tail.iter_mut().zip(src_tail) {
            *d = grad_element::<FMA>(z.to_f32(), inv_t, lse, k0, k1);
        }
        if let Some(tg) = targets {
            dz[tg[i] as usize] += inv_t * g_lp;
        }
    }
}

/// `p · (k0 + k1 · log p)` with `log p = z·inv_t − lse`, clamped to `[EXP_MIN_ARG, 0]` (a NaN stays NaN).
#[inline(always)]
fn grad_element<const FMA: bool>(z: f32, inv_t: f32, lse: f32, k0: f32, k1: f32) -> f32 {
    let log_p = z * inv_t - lse;
    let log_p = log_p.clamp(EXP_MIN_ARG, 0.0); // NaN stays NaN
    exp_poly::<FMA>(log_p) * madd::<FMA>(k1, log_p, k0)
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

/// Reference gradient in f64 of `g_H·H + g_lse·lse + g_lp·log p_target` with respect to one row of logits, for tests
/// of [`token_stats_backward`]: `(1/T)(p_i (g_lse − g_lp − g_H (log p_i + H)) + g_lp 1[i = y])`.
pub fn reference_row_grad<E: LogitElement>(
    row: &[E],
    temperature: f64,
    target: Option<usize>,
    [g_h, g_lse, g_lp]: [f64; 3],
) -> Vec<f64> {
    let (h, lse, _) = reference_row_stats(row, temperature, target);
    let mut grad: Vec<f64> = row
        .iter()
        .map(|v| {
            let log_p = f64::from(v.to_f32()) / temperature - lse;
            log_p.exp() * (g_lse - g_lp - g_h * (log_p + h)) / temperature
        })
        .collect();
    if let Some(y) = target {
        grad[y] += g_lp / temperature;
    }
    grad
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

    /// Worst relative error of `exp` over `[lo, 0]` on a fine grid.
    fn worst_exp_error(exp: impl Fn(f32) -> f32, lo: f32) -> f64 {
        let mut worst = 0.0f64;
        let mut x = lo;
        while x <= 0.0 {
            let exact = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - exact).abs() / exact);
            x += 0.000_37;
        }
        worst
    }

    #[test]
    fn exp_is_accurate_on_its_range_and_exact_at_its_ends() {
        // Down to where e^x is still a normal f32 (e^-87.3 ≈ f32::MIN_POSITIVE).
        let lo = -87.3;
        let plain = worst_exp_error(exp_nonpositive, lo);
        let fused = worst_exp_error(exp_poly::<true>, lo);
        assert!(plain < 3e-7, "worst relative error without FMA {plain}");
        assert!(fused < 3e-7, "worst relative error with FMA {fused}");
        for exp in [exp_poly::<false> as fn(f32) -> f32, exp_poly::<true>] {
            assert_eq!(exp(0.0), 1.0);
            assert_eq!(exp(EXP_MIN_ARG), 0.0);
            assert!(exp(f32::NAN).is_nan());
            // Monotone across the reduction boundaries, where n changes.
            let mut prev = 0.0;
            let mut x = EXP_MIN_ARG;
            while x <= 0.0 {
                let e = exp(x);
                assert!(e >= prev, "exp not monotone at {x}");
                prev = e;
                x += 0.0031;
            }
        }
    }

    #[test]
    fn f16_widening_matches_half_on_every_value() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let ours = LogitElement::to_f32(h);
            let theirs = f16::to_f32(h);
            assert!(ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()), "{bits:#06x}");
        }
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
    fn the_maximum_may_move_up_ties_and_sit_in_any_block() {
        // Rows of 4 blocks + a tail whose maximum sits in the first, a middle or the tail block, rises block after
        // block, or is tied across blocks: all must equal the f64 reference.
        let vocab = 4 * BLOCK + 100;
        let base: Vec<f32> = (0..vocab).map(|i| ((i * 2_654_435_761) % 997) as f32 / 97.0 - 5.0).collect();
        let mut cases: Vec<Vec<f32>> = Vec::new();
        for at in [0, BLOCK + 3, 4 * BLOCK + 50, vocab - 1] {
            let mut row = base.clone();
            row[at] = 12.0;
            cases.push(row);
        }
        cases.push((0..vocab).map(|i| i as f32 / 100.0).collect()); // rising
        let mut tied = base.clone();
        for at in [5, BLOCK + 7, 2 * BLOCK + 7, 4 * BLOCK + 99] {
            tied[at] = 9.0;
        }
        cases.push(tied);
        for (c, row) in cases.iter().enumerate() {
            let out = token_stats(row, vocab, Some(&[7]), opts(1.3)).expect("valid");
            let (h, lse, lp) = reference_row_stats(row, 1.3, Some(7));
            assert!((f64::from(out.entropy[0]) - h).abs() <= 1e-6 * h, "case {c}: H {} vs {h}", out.entropy[0]);
            assert!((f64::from(out.logsumexp[0]) - lse).abs() <= 1e-6 * lse.abs(), "case {c}: lse");
            assert!((f64::from(out.target_logprob.expect("targets")[0]) - lp).abs() <= 1e-6 * lp.abs(), "case {c}");
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
        assert!((f64::from(out.entropy[0]) - exact).abs() < 1e-5 * exact, "{} vs {exact}", out.entropy[0]);
        assert!((f64::from(out.target_logprob.expect("targets")[0]) - lp).abs() < 1e-9);
    }

    #[test]
    fn tiny_terms_sharing_a_lane_with_the_maximum_are_kept() {
        // Regression (found by the f64-reference property test): z_0 = 24, zeros elsewhere. In f32, lane 0 held
        // 1 + 15 terms of e^-24 = 3.8e-11 and dropped them, biasing H by 0.2 %. Exact: s = 1 + ε, ε = (V−1)·e^-24,
        // H = ln(1 + ε) + 24ε/(1 + ε).
        for vocab in [256, BLOCK, 3 * BLOCK + 5] {
            let mut row = vec![0.0f32; vocab];
            row[0] = 24.0;
            let out = token_stats(&row, vocab, None, opts(1.0)).expect("valid");
            let eps = (vocab - 1) as f64 * (-24f64).exp();
            let exact = eps.ln_1p() + 24.0 * eps / (1.0 + eps);
            let rel = (f64::from(out.entropy[0]) - exact).abs() / exact;
            assert!(rel < 1e-5, "V = {vocab}: {} vs {exact} (relative error {rel})", out.entropy[0]);
        }
    }

    #[test]
    fn masked_logits_add_nothing() {
        // Vocabulary padding masked with a large finite negative value (f32::MIN as torch.finfo(float32).min, or
        // −1e9) must give the entropy of the unmasked part: e = 0 exactly there, and so is e·x.
        let live: Vec<f32> = (0..300).map(|i| (i % 17) as f32 / 3.0 - 2.0).collect();
        let expected = token_stats(&live, live.len(), Some(&[4]), opts(1.0)).expect("valid");
        for fill in [f32::MIN, -1e9, -200.0] {
            let mut row = live.clone();
            row.extend(std::iter::repeat_n(fill, 2 * BLOCK + 33));
            let out = token_stats(&row, row.len(), Some(&[4]), opts(1.0)).expect("valid");
            assert!((out.entropy[0] - expected.entropy[0]).abs() <= 1e-6, "fill {fill}: {:?}", out.entropy);
            assert_eq!(out.logsumexp, expected.logsumexp, "fill {fill}");
        }
    }

    #[test]
    fn extreme_finite_logits_fall_back_to_the_f64_path() {
        // z / T overflows f32 (and z' − m would too): finite input, so a result, not an error.
        let row = [3.0e38f32, -3.0e38, 1.0e38, 0.0];
        for t in [1.0f32, 0.5] {
            let out = token_stats(&row, 4, Some(&[2]), opts(t)).expect("finite logits are valid");
            let (h, lse, lp) = reference_row_stats(&row, f64::from(t), Some(2));
            assert_eq!(f64::from(out.entropy[0]), f64::from(h as f32));
            assert_eq!(f64::from(out.logsumexp[0]), f64::from(lse as f32));
            assert_eq!(f64::from(out.target_logprob.expect("targets")[0]), f64::from(lp as f32));
        }
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
    fn every_non_finite_value_anywhere_is_found() {
        // The fast path finds non-finite values through its sums (no per-element check): try each kind in the
        // first block, a middle block, the tail, at a lane boundary, and as the whole row.
        let vocab = 2 * BLOCK + 40;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, LANES - 1, BLOCK, BLOCK + 17, 2 * BLOCK, vocab - 1] {
                let mut z: Vec<f32> = (0..2 * vocab).map(|i| (i % 13) as f32 - 6.0).collect();
                z[vocab + at] = bad;
                for t in [1.0, 0.25] {
                    match token_stats(&z, vocab, Some(&[0, 1]), opts(t)) {
                        Err(Error::NonFinite { position, .. }) => assert_eq!(position, vec![1, at], "{bad} at {at}"),
                        other => panic!("{bad} at {at}: {other:?}"),
                    }
                }
            }
            let row = vec![bad; vocab];
            assert!(matches!(token_stats(&row, vocab, None, opts(1.0)), Err(Error::NonFinite { .. })), "{bad}");
        }
    }

    #[test]
    fn fma_paths_are_bit_identical_and_match_the_baseline() {
        let vocab = 3 * BLOCK + 5;
        let logits: Vec<f32> = (0..4 * vocab).map(|i| ((i * 2654435761usize) % 10007) as f32 / 300.0 - 15.0).collect();
        let targets = [0u32, 1, 2, 3];
        let run = |work: Worker<f32>| {
            let (mut h, mut l, mut lp) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]);
            let job = Job {
                logits: &logits,
                vocab,
                temperature: 1.25,
                targets: Some(&targets),
                h_out: &mut h,
                l_out: &mut l,
                lp_out: Some(&mut lp),
                first_row: 0,
            };
            assert!(work(job).is_none());
            (h, l, lp)
        };
        let selected = run(select_worker::<f32>());
        let plain = run(worker::<f32, false>);
        for (a, b) in selected.0.iter().chain(&selected.1).chain(&selected.2).zip(plain.0.iter().chain(&plain.1)) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            let avx2 = run(simd::worker_avx2::<f32>);
            assert_eq!(avx2, run(worker::<f32, true>), "AVX2 vs the portable FMA build");
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert_eq!(run(simd::worker_avx512::<f32>), avx2, "AVX-512 vs AVX2");
            }
        }
    }

    #[test]
    fn one_thread_inline_and_many_threads_agree_bitwise() {
        let vocab = 1000;
        let logits: Vec<f32> = (0..300 * vocab).map(|i| ((i * 40503) % 4099) as f32 / 200.0 - 10.0).collect();
        let one = token_stats(&logits, vocab, None, KernelOptions { temperature: 0.9, threads: 1 }).expect("ok");
        let four = token_stats(&logits, vocab, None, KernelOptions { temperature: 0.9, threads: 4 }).expect("ok");
        assert_eq!(one, four);
    }

    #[test]
    fn backward_matches_finite_differences_of_the_f64_forward() {
        // Central differences of g·(H, lse, lp) in f64 check the analytic reference; the kernel matches it.
        let row: Vec<f32> = vec![1.5, -0.25, 0.75, 3.0, -2.0, 0.0, 1.0];
        let (t, y, g) = (0.8f64, 3usize, [0.7f64, -0.4, 1.3]);
        let objective = |z: &[f64]| {
            let lse = z.iter().map(|v| v / t).fold(f64::NEG_INFINITY, f64::max);
            let lse = lse + z.iter().map(|v| (v / t - lse).exp()).sum::<f64>().ln();
            let h: f64 = z.iter().map(|v| (v / t - lse).exp() * (lse - v / t)).sum();
            g[0] * h + g[1] * lse + g[2] * (z[y] / t - lse)
        };
        let z64: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
        let analytic = reference_row_grad(&row, t, Some(y), g);
        for i in 0..row.len() {
            let (mut up, mut down) = (z64.clone(), z64.clone());
            up[i] += 1e-6;
            down[i] -= 1e-6;
            let numeric = (objective(&up) - objective(&down)) / 2e-6;
            assert!((numeric - analytic[i]).abs() < 1e-7, "dz[{i}]: {numeric} vs {analytic:?}");
        }
        let stats = token_stats(&row, row.len(), Some(&[y as u32]), opts(t as f32)).expect("valid");
        let grad = StatsGrad { entropy: &[0.7], logsumexp: &[-0.4], target_logprob: Some(&[1.3]) };
        let fast = token_stats_backward(&row, row.len(), Some(&[y as u32]), &stats, grad, opts(t as f32)).expect("ok");
        for (a, b) in fast.iter().zip(&analytic) {
            assert!((f64::from(*a) - b).abs() <= 1e-6 * b.abs().max(1.0), "{fast:?} vs {analytic:?}");
        }
    }

    #[test]
    fn backward_fma_paths_threads_and_bad_input() {
        let vocab = 3 * BLOCK + 5;
        let logits: Vec<f32> = (0..6 * vocab).map(|i| ((i * 2654435761usize) % 10007) as f32 / 300.0 - 15.0).collect();
        let targets = [0u32, 1, 2, 3, 4, 5];
        let o = |threads| KernelOptions { temperature: 1.25, threads };
        let stats = token_stats(&logits, vocab, Some(&targets), o(1)).expect("valid");
        let (gh, gl, gp) = ([0.5f32, -1.0, 2.0, 0.0, 1.0, -0.5], [1.0f32; 6], [0.25f32, 1.0, -1.0, 0.5, 0.0, 2.0]);
        let grad = StatsGrad { entropy: &gh, logsumexp: &gl, target_logprob: Some(&gp) };
        let one = token_stats_backward(&logits, vocab, Some(&targets), &stats, grad, o(1)).expect("valid");
        let three = token_stats_backward(&logits, vocab, Some(&targets), &stats, grad, o(3)).expect("valid");
        assert_eq!(one, three, "thread count");
        let run = |work: GradWorker<f32>| {
            let mut out = vec![0.0f32; logits.len()];
            work(GradJob::new(&logits, vocab, 1.25, Some(&targets), &stats, grad, 0, &mut out));
            out
        };
        let plain = run(grad_worker::<f32, false>);
        for (a, b) in one.iter().zip(&plain) {
            assert!((a - b).abs() <= 5e-6 * b.abs().max(1e-3), "{a} vs {b}");
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            let avx2 = run(simd::grad_worker_avx2::<f32>);
            assert_eq!(avx2, run(grad_worker::<f32, true>), "AVX2 vs the portable FMA build");
            if std::arch::is_x86_feature_detected!("avx512f") {
                assert_eq!(run(simd::grad_worker_avx512::<f32>), avx2, "AVX-512 vs AVX2");
            }
        }
        let short = StatsGrad { entropy: &gh[..5], logsumexp: &gl, target_logprob: None };
        assert!(matches!(
            token_stats_backward(&logits, vocab, None, &stats, short, o(1)),
            Err(Error::ShapeMismatch { .. })
        ));
        let needs_targets = StatsGrad { entropy: &gh, logsumexp: &gl, target_logprob: Some(&gp) };
        assert!(matches!(
            token_stats_backward(&logits, vocab, None, &stats, needs_targets, o(1)),
            Err(Error::ShapeMismatch { .. })
        ));
        let bad_id = [0u32, 1, 2, 3, 4, vocab as u32];
        let no_lp = StatsGrad { entropy: &gh, logsumexp: &gl, target_logprob: None };
        assert!(matches!(
            token_stats_backward(&logits, vocab, Some(&bad_id), &stats, no_lp, o(1)),
            Err(Error::InvalidParameter { .. })
        ));
    }

    #[test]
    fn empty_batch_gives_empty_stats() {
        let out = token_stats::<f32>(&[], 8, Some(&[]), KernelOptions::default()).expect("no rows is fine");
        assert!(out.entropy.is_empty() && out.target_logprob.expect("targets").is_empty());
    }
}
