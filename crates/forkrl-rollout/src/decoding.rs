//! Decoding operators: pure functions of one logits row, the response position and a seeded RNG.
//!
//! | operator | rule |
//! |---|---|
//! | greedy | `argmax z` (ties: lowest id) |
//! | temperature | `y ~ softmax(z / T)`; `T = 0` is greedy |
//! | top-k | the `k` largest logits (ties: lowest id), then `softmax(z / T)` over them |
//! | top-p | the smallest prefix of ids sorted by probability whose mass reaches `p` (the token crossing `p` included) |
//! | two-temperature | `T = T_high` where the row's entropy (at T = 1) exceeds τ, else `T_low` ("Beyond the 80/20 Rule", arXiv 2506.01939, Eq. 5; τ = 0.672, the paper's 80th percentile) |
//! | CUTS | ("Too Correct to Learn", arXiv 2604.18493) for `position < T_warm`: standard sampling; else `C = TopK(p, K)` on the **temperature-1** probabilities, `S = {v ∈ C : p(v) ≥ δ}`, optionally without EOS; `|S| = 0`: argmax; `|S| = 1`: that token; else uniform over `S` |
//!
//! Every call returns the token, its log-probability **under the operator** (what the sampler drew from; training
//! always recomputes `log π_θ`, never uses this), the row's entropy at T = 1 and whether a CUTS fallback fired.
//! Reproducibility: [`token_rng`] derives an independent ChaCha8 stream from `(seed, row, position)`, so
//! [`decode_rows`] gives the same tokens for any thread count and row order. CUTS defaults `K = 5`, `δ = 0.03`,
//! `T_warm = 5`, `exclude_eos = false` (RECONSTRUCTION option: the paper does not say). Sources:
//! `../shared/methods/rollout-allocation.md` §4, `entropy-and-forking-tokens.md` §2.4.

use forkrl_core::{Error, Result};
use forkrl_entropy::{KernelOptions, token_stats};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// CUTS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CutsConfig {
    /// Top-K candidates (5).
    pub k: usize,
    /// Drop candidates with temperature-1 probability below δ (0.03); δ ∈ (0, 1).
    pub delta: f64,
    /// Response tokens sampled normally before CUTS starts (5).
    pub warmup_tokens: usize,
    /// Never draw EOS uniformly (it may still be the argmax fallback).
    pub exclude_eos: bool,
    /// Temperature of the standard sampling during warm-up (1.0).
    pub temperature: f64,
}

impl Default for CutsConfig {
    fn default() -> Self {
        Self { k: 5, delta: 0.03, warmup_tokens: 5, exclude_eos: false, temperature: 1.0 }
    }
}

/// A decoding operator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Decoding {
    /// Argmax.
    Greedy,
    /// Softmax sampling at a temperature.
    Temperature {
        /// T ≥ 0 (0 = greedy).
        temperature: f64,
    },
    /// Top-k then temperature.
    TopK {
        /// k ≥ 1.
        k: usize,
        /// T ≥ 0.
        temperature: f64,
    },
    /// Nucleus sampling.
    TopP {
        /// p ∈ (0, 1].
        top_p: f64,
        /// T ≥ 0.
        temperature: f64,
    },
    /// Entropy-dependent temperature.
    TwoTemperature {
        /// Temperature where the row's entropy exceeds the threshold.
        t_high: f64,
        /// Temperature elsewhere.
        t_low: f64,
        /// Entropy threshold τ in nats (0.672).
        threshold: f64,
    },
    /// Constrained uniform top-K sampling.
    Cuts(CutsConfig),
}

impl Default for Decoding {
    fn default() -> Self {
        Decoding::Temperature { temperature: 1.0 }
    }
}

/// One decoded token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// `log q(token)` under the operator (0 for a deterministic choice).
    pub logprob: f32,
    /// Entropy of `softmax(z)` at T = 1, in nats.
    pub entropy: f32,
    /// A CUTS fallback fired (empty candidate set → argmax).
    pub fallback: bool,
}

fn check_temperature(t: f64) -> Result<()> {
    if t.is_finite() && t >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid_parameter("temperature", t, "must be finite and >= 0"))
    }
}

impl Decoding {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter (`k = 0`, `top_p ∉ (0, 1]`, `δ ∉ (0, 1)`, a negative or
    /// non-finite temperature or threshold).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Decoding::Greedy => Ok(()),
            Decoding::Temperature { temperature } => check_temperature(temperature),
            Decoding::TopK { k, temperature } => {
                if k == 0 {
                    return Err(Error::invalid_parameter("k", 0, "must be at least 1"));
                }
                check_temperature(temperature)
            }
            Decoding::TopP { top_p, temperature } => {
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return Err(Error::invalid_parameter("top_p", top_p, "must lie in (0, 1]"));
                }
                check_temperature(temperature)
            }
            Decoding::TwoTemperature { t_high, t_low, threshold } => {
                check_temperature(t_high)?;
                check_temperature(t_low)?;
                if !(threshold.is_finite() && threshold >= 0.0) {
                    return Err(Error::invalid_parameter("threshold", threshold, "must be finite and >= 0"));
                }
                Ok(())
            }
            Decoding::Cuts(c) => {
                if c.k == 0 {
                    return Err(Error::invalid_parameter("k", 0, "CUTS needs K >= 1"));
                }
                if !(c.delta > 0.0 && c.delta < 1.0) {
                    return Err(Error::invalid_parameter("delta", c.delta, "must lie in (0, 1)"));
                }
                check_temperature(c.temperature)
            }
        }
    }
}

/// An independent ChaCha8 stream for `(seed, row, position)` (SplitMix64 mixing).
pub fn token_rng(seed: u64, row: u64, position: u64) -> ChaCha8Rng {
    use forkrl_core::numeric::splitmix64 as mix;
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ row) ^ position))
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &z) in row.iter().enumerate() {
        if z > row[best] {
            best = i;
        }
    }
    best
}

/// Draws from `softmax(z_i / t)` over the candidate ids (all ids when `None`); returns `(id, log q(id))`.
fn sample_softmax<R: Rng + ?Sized>(row: &[f32], ids: Option<&[usize]>, t: f64, rng: &mut R) -> (usize, f64) {
    let all: Vec<usize>;
    let ids = match ids {
        Some(ids) => ids,
        None => {
            all = (0..row.len()).collect();
            &all
        }
    };
    if t == 0.0 || ids.len() == 1 {
        let best =
            ids.iter().copied().fold(ids[0], |b, i| if row[i] > row[b] || (row[i] == row[b] && i < b) { i } else { b });
        return (best, 0.0);
    }
    let max = ids.iter().map(|&i| f64::from(row[i])).fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = ids.iter().map(|&i| ((f64::from(row[i]) - max) / t).exp()).sum();
    let target = rng.random::<f64>() * sum;
    let mut acc = 0.0;
    let mut chosen = *ids.last().unwrap_or(&0);
    for &i in ids {
        acc += ((f64::from(row[i]) - max) / t).exp();
        if acc > target {
            chosen = i;
            break;
        }
    }
    (chosen, (f64::from(row[chosen]) - max) / t - sum.ln())
}

/// Ids of the `k` largest entries of `values` (ties: lowest id), in descending order.
fn top_k_ids(values: &[f32], k: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..values.len()).collect();
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let k = k.min(ids.len());
    if k < ids.len() {
        ids.select_nth_unstable_by(k, cmp);
        ids.truncate(k);
    }
    ids.sort_by(cmp);
    ids
}

/// Decodes one token from a logits row at response position `position`.
///
/// # Errors
/// [`Error::InvalidParameter`] from [`Decoding::validate`] or for an empty row; [`Error::NonFinite`] naming the column
/// of a NaN/inf logit.
pub fn decode<R: Rng + ?Sized>(
    row: &[f32],
    op: &Decoding,
    position: usize,
    eos: Option<u32>,
    rng: &mut R,
) -> Result<Sampled> {
    op.validate()?;
    if row.is_empty() {
        return Err(Error::invalid_parameter("logits row", 0, "needs at least one entry"));
    }
    let entropy = token_stats(row, row.len(), None, KernelOptions { temperature: 1.0, threads: 1 })
        .map_err(|e| match e {
            Error::NonFinite { what, position, value } => {
                Error::NonFinite { what, position: position[1..].to_vec(), value }
            }
            other => other,
        })?
        .entropy[0];
    let done = |(token, logprob): (usize, f64), fallback| Sampled {
        token: token as u32,
        logprob: logprob as f32,
        entropy,
        fallback,
    };
    Ok(match *op {
        Decoding::Greedy => done((argmax(row), 0.0), false),
        Decoding::Temperature { temperature } => done(sample_softmax(row, None, temperature, rng), false),
        Decoding::TopK { k, temperature } => {
            done(sample_softmax(row, Some(&top_k_ids(row, k)), temperature, rng), false)
        }
        Decoding::TopP { top_p, temperature } => {
            if top_p >= 1.0 || temperature == 0.0 {
                done(sample_softmax(row, None, temperature, rng), false)
            } else {
                let max = f64::from(row[argmax(row)]);
                let weights: Vec<f64> = row.iter().map(|&z| ((f64::from(z) - max) / temperature).exp()).collect();
                let total: f64 = weights.iter().sum();
                let mut ids: Vec<usize> = (0..row.len()).collect();
                ids.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
                let mut mass = 0.0;
                let mut keep = 0;
                for &i in &ids {
                    mass += weights[i] / total;
                    keep += 1;
                    if mass >= top_p {
                        break;
                    }
                }
                done(sample_softmax(row, Some(&ids[..keep]), temperature, rng), false)
            }
        }
        Decoding::TwoTemperature { t_high, t_low, threshold } => {
            let t = if f64::from(entropy) > threshold { t_high } else { t_low };
            done(sample_softmax(row, None, t, rng), false)
        }
        Decoding::Cuts(c) => {
            if position < c.warmup_tokens {
                return Ok(done(sample_softmax(row, None, c.temperature, rng), false));
            }
            let max = f64::from(row[argmax(row)]);
            let sum: f64 = row.iter().map(|&z| (f64::from(z) - max).exp()).sum();
            let prob = |i: usize| (f64::from(row[i]) - max).exp() / sum;
            let set: Vec<usize> = top_k_ids(row, c.k)
                .into_iter()
                .filter(|&i| prob(i) >= c.delta && !(c.exclude_eos && eos == Some(i as u32)))
                .collect();
            match set.len() {
                0 => done((argmax(row), 0.0), true),
                1 => done((set[0], 0.0), false),
                n => done((set[rng.random_range(0..n)], -(n as f64).ln()), false),
            }
        }
    })
}

/// What to decode for one row of a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRequest {
    /// The operator.
    pub op: Decoding,
    /// Response position of the token being drawn (CUTS warm-up, RNG stream).
    pub position: usize,
    /// Stable id of the sequence (RNG stream), e.g. its index in the rollout batch.
    pub row_id: u64,
}

/// Decodes one token per row of a row-major `[N, V]` buffer in parallel: row `r` follows `rows[r]` and draws from the
/// stream `token_rng(seed, row_id, position)`, so the result does not depend on `threads`.
///
/// # Errors
/// [`Error::ShapeMismatch`] for inconsistent lengths; the errors of [`decode`] (the first failing row).
pub fn decode_rows(
    logits: &[f32],
    vocab: usize,
    rows: &[RowRequest],
    eos: Option<u32>,
    seed: u64,
    threads: usize,
) -> Result<Vec<Sampled>> {
    if vocab == 0 || !logits.len().is_multiple_of(vocab) {
        return Err(Error::ShapeMismatch {
            op: "decode_rows: logits [N, V]",
            expected: vec![vocab],
            actual: vec![logits.len()],
        });
    }
    let n = logits.len() / vocab;
    forkrl_core::numeric::check_len("decode_rows: rows", rows.len(), n)?;
    let one = |r: usize| {
        let req = rows[r];
        let mut rng = token_rng(seed, req.row_id, req.position as u64);
        decode(&logits[r * vocab..(r + 1) * vocab], &req.op, req.position, eos, &mut rng)
    };
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return (0..n).map(one).collect();
    }
    let chunk = n.div_ceil(threads);
    let parts: Vec<Result<Vec<Sampled>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| s.spawn(move || (start..(start + chunk).min(n)).map(one).collect()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    let mut out = Vec::with_capacity(n);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Mixed-CUTS group composition: `g_std` standard rollouts then `g_cuts` CUTS rollouts per prompt; one GRPO advantage
/// over the combined group (compute it with `forkrl_advantage::group_advantages` on all `G = g_std + g_cuts`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixedCuts {
    /// Standard rollouts per prompt (8).
    pub g_std: usize,
    /// CUTS rollouts per prompt (8).
    pub g_cuts: usize,
    /// The CUTS operator.
    pub cuts: CutsConfig,
}

impl Default for MixedCuts {
    fn default() -> Self {
        Self { g_std: 8, g_cuts: 8, cuts: CutsConfig::default() }
    }
}

impl MixedCuts {
    /// The operator of each member of one group: `standard` for the first `g_std`, CUTS for the rest.
    pub fn operators(&self, standard: Decoding) -> Vec<Decoding> {
        let mut ops = vec![standard; self.g_std];
        ops.extend(std::iter::repeat_n(Decoding::Cuts(self.cuts), self.g_cuts));
        ops
    }
}

/// The variance identity behind Mixed-CUTS: for sub-groups with shares `w₁, w₂`, population variances and means,
/// `σ² = w₁σ₁² + w₂σ₂² + w₁w₂(μ₁ − μ₂)²` (½, ½, ¼ for equal halves). Returns `(decomposed, direct)`.
///
/// # Errors
/// [`Error::EmptyBatch`] when either sub-group is empty.
pub fn mixed_group_variance(standard: &[f32], cuts: &[f32]) -> Result<(f64, f64)> {
    if standard.is_empty() || cuts.is_empty() {
        return Err(Error::EmptyBatch { op: "mixed_group_variance" });
    }
    let stats = |v: &[f32]| {
        let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        (m, v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / v.len() as f64)
    };
    let ((m1, v1), (m2, v2)) = (stats(standard), stats(cuts));
    let n = (standard.len() + cuts.len()) as f64;
    let (w1, w2) = (standard.len() as f64 / n, cuts.len() as f64 / n);
    let all: Vec<f32> = standard.iter().chain(cuts).copied().collect();
    Ok((w1 * v1 + w2 * v2 + w1 * w2 * (m1 - m2).powi(2), stats(&all).1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(p: &[f64]) -> Vec<f32> {
        p.iter().map(|&x| x.ln() as f32).collect()
    }

    #[test]
    fn test_vector_2k_cuts_sets() {
        let row = logits(&[0.40, 0.25, 0.12, 0.08, 0.05, 0.04, 0.03, 0.03]);
        let draw = |delta: f64, n: usize| {
            let op = Decoding::Cuts(CutsConfig { delta, ..CutsConfig::default() });
            let mut seen = std::collections::BTreeSet::new();
            let mut lp = 0.0;
            for i in 0..n {
                let s = decode(&row, &op, 10, None, &mut token_rng(1, 0, i as u64)).expect("valid");
                seen.insert(s.token);
                lp = s.logprob;
            }
            (seen.into_iter().collect::<Vec<_>>(), lp)
        };
        let (ids, lp) = draw(0.03, 400);
        assert_eq!((ids, (lp - (1.0f32 / 5.0).ln()).abs() < 1e-6), (vec![0, 1, 2, 3, 4], true));
        assert_eq!(draw(0.06, 400).0, vec![0, 1, 2, 3]);
        let (ids, lp) = draw(0.30, 50);
        assert_eq!((ids, lp), (vec![0], 0.0));
        let flat = vec![0.0f32; 40];
        let s =
            decode(&flat, &Decoding::Cuts(CutsConfig::default()), 10, None, &mut token_rng(0, 0, 0)).expect("valid");
        assert!(s.fallback && s.token == 0);
        // Warm-up: standard sampling can draw the tail.
        let op = Decoding::Cuts(CutsConfig::default());
        let tail = (0..2000).any(|i| decode(&row, &op, 0, None, &mut token_rng(2, 0, i)).expect("valid").token >= 5);
        assert!(tail);
        // EOS exclusion.
        let op = Decoding::Cuts(CutsConfig { exclude_eos: true, ..CutsConfig::default() });
        assert!((0..200).all(|i| decode(&row, &op, 10, Some(1), &mut token_rng(3, 0, i)).expect("valid").token != 1));
    }

    #[test]
    fn test_vector_2k_mixed_variance() {
        let std = [1.0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
        let cuts = [1.0f32, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0];
        let (decomposed, direct) = mixed_group_variance(&std, &cuts).expect("valid");
        assert!((decomposed - 0.214844).abs() < 1e-6 && (direct - decomposed).abs() < 1e-12);
        let ops = MixedCuts::default().operators(Decoding::default());
        assert_eq!((ops.len(), ops[7], matches!(ops[8], Decoding::Cuts(_))), (16, Decoding::default(), true));
    }

    #[test]
    fn operators_by_hand() {
        let row = logits(&[0.1, 0.6, 0.3]);
        let mut rng = token_rng(0, 0, 0);
        let g = decode(&row, &Decoding::Greedy, 0, None, &mut rng).expect("valid");
        assert_eq!((g.token, g.logprob), (1, 0.0));
        let h = -(0.1f64 * 0.1f64.ln() + 0.6 * 0.6f64.ln() + 0.3 * 0.3f64.ln());
        assert!((f64::from(g.entropy) - h).abs() < 1e-5);
        // Temperature 1: log q = log p.
        let s = decode(&row, &Decoding::default(), 0, None, &mut rng).expect("valid");
        assert!((f64::from(s.logprob) - [0.1f64, 0.6, 0.3][s.token as usize].ln()).abs() < 1e-5);
        // Top-k 1 and top-p 0.5 are greedy here; top-p 0.8 keeps {1, 2}.
        for op in [Decoding::TopK { k: 1, temperature: 1.0 }, Decoding::TopP { top_p: 0.5, temperature: 1.0 }] {
            assert_eq!(decode(&row, &op, 0, None, &mut rng).expect("valid").token, 1);
        }
        let op = Decoding::TopP { top_p: 0.8, temperature: 1.0 };
        for i in 0..200 {
            let s = decode(&row, &op, 0, None, &mut token_rng(9, 0, i)).expect("valid");
            assert!(s.token != 0);
            let q = if s.token == 1 { 0.6 / 0.9 } else { 0.3 / 0.9 };
            assert!((f64::from(s.logprob) - f64::ln(q)).abs() < 1e-5);
        }
        // Two temperatures: entropy 0.898 > 0.672 → T_high = 0 is greedy; with a high threshold T_low = 0.
        let hot = Decoding::TwoTemperature { t_high: 0.0, t_low: 5.0, threshold: 0.672 };
        assert_eq!(decode(&row, &hot, 0, None, &mut rng).expect("valid").token, 1);
    }

    #[test]
    fn bad_input_is_typed() {
        let mut rng = token_rng(0, 0, 0);
        let row = [0.0f32, f32::NAN, 1.0];
        match decode(&row, &Decoding::Greedy, 0, None, &mut rng) {
            Err(Error::NonFinite { position, .. }) => assert_eq!(position, vec![1]),
            other => panic!("unexpected {other:?}"),
        }
        let ok = [0.0f32, 1.0];
        for (op, name) in [
            (Decoding::Cuts(CutsConfig { delta: 1.0, ..CutsConfig::default() }), "delta"),
            (Decoding::Cuts(CutsConfig { k: 0, ..CutsConfig::default() }), "k"),
            (Decoding::TopP { top_p: 0.0, temperature: 1.0 }, "top_p"),
            (Decoding::Temperature { temperature: -1.0 }, "temperature"),
        ] {
            match decode(&ok, &op, 0, None, &mut rng) {
                Err(Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(decode(&[], &Decoding::Greedy, 0, None, &mut rng).is_err());
    }

    #[test]
    fn parallel_rows_are_reproducible() {
        let (n, v) = (37, 50);
        let logits: Vec<f32> = (0..n * v).map(|i| ((i * 7919) % 101) as f32 / 17.0).collect();
        let rows: Vec<RowRequest> = (0..n)
            .map(|r| RowRequest {
                op: if r % 2 == 0 { Decoding::default() } else { Decoding::Cuts(CutsConfig::default()) },
                position: r % 9,
                row_id: r as u64,
            })
            .collect();
        let one = decode_rows(&logits, v, &rows, None, 5, 1).expect("valid");
        for threads in [2, 3, 8] {
            assert_eq!(decode_rows(&logits, v, &rows, None, 5, threads).expect("valid"), one);
        }
        assert_ne!(decode_rows(&logits, v, &rows, None, 6, 2).expect("valid"), one);
        assert!(decode_rows(&logits[1..], v, &rows, None, 5, 1).is_err());
    }
}
