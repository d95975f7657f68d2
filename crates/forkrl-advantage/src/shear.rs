//! SHEAR — "Hidden States Know Where Reasoning Diverges: Credit Assignment via Span-Level Wasserstein Distance"
//! (arXiv 2604.23318).
//!
//! For rollout `i` with sliding spans `S_k` (window `w`, stride `s`) over its response tokens, each span is the
//! empirical distribution of its last-layer hidden states. With `O(i)` the rollouts of the same prompt whose
//! advantage has the opposite sign:
//!
//! ```text
//! d_{i,k} = min_{j ∈ O(i)} min_q W_ε(P̂_{i,k}, P̂_{j,q})             entropic Wasserstein-1, Euclidean cost
//! ω_{i,t} = max_{k: t ∈ S_k} d_{i,k} / n̄,   n̄ = mean ‖h‖ over the group's response tokens
//! Ã_{i,t} = A_i · ω_{i,t}                                            ω is a constant (no gradient)
//! ```
//!
//! Defaults w = 100, s = 25 (SECONDARY). **RECONSTRUCTION** (library defaults, all parameters): Sinkhorn in the log
//! domain with `ε = 0.05 · mean(C)`, at most 100 iterations, stopping when the row-marginal L1 error is below 1e-3,
//! uniform marginals, reporting the transport cost `⟨π, C⟩` as `W_ε`; a final window `[T−w, T)` covers a tail the
//! stride grid misses; a response shorter than `w` is one span; `ω = 1` when `O(i)` is empty or `A_i = 0`;
//! `n̄` is floored at 1e-6. Source: `../shared/methods/token-credit.md` §4.

use forkrl_core::{BatchLayout, Error, Result, numeric::check_len};
use serde::{Deserialize, Serialize};

/// SHEAR parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShearConfig {
    /// Span length `w` (100).
    pub window: usize,
    /// Span stride `s` (25).
    pub stride: usize,
    /// Sinkhorn settings.
    pub sinkhorn: SinkhornConfig,
}

impl Default for ShearConfig {
    fn default() -> Self {
        Self { window: 100, stride: 25, sinkhorn: SinkhornConfig::default() }
    }
}

/// Log-domain Sinkhorn settings (RECONSTRUCTION defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkhornConfig {
    /// ε as a fraction of the mean cost (0.05).
    pub epsilon_scale: f64,
    /// Iteration cap (100).
    pub max_iter: usize,
    /// Stop when `Σ_a |Σ_b π_ab − 1/n|` falls below this (1e-3).
    pub tolerance: f64,
}

impl Default for SinkhornConfig {
    fn default() -> Self {
        Self { epsilon_scale: 0.05, max_iter: 100, tolerance: 1e-3 }
    }
}

/// Sliding spans `[start, end)` over `len` tokens (test vector 2.M, 0-based).
pub fn shear_spans(len: usize, window: usize, stride: usize) -> Vec<(usize, usize)> {
    if len == 0 || window == 0 || stride == 0 {
        return Vec::new();
    }
    if len <= window {
        return vec![(0, len)];
    }
    let mut spans: Vec<(usize, usize)> =
        (0..).map(|k| k * stride).take_while(|s| s + window <= len).map(|s| (s, s + window)).collect();
    if spans.last().is_some_and(|&(_, e)| e < len) {
        spans.push((len - window, len));
    }
    spans
}

fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let top = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY { top } else { top + values.map(|v| (v - top).exp()).sum::<f64>().ln() }
}

/// Entropic Wasserstein-1 transport cost `⟨π, C⟩` between the uniform empirical distributions of the rows of `x`
/// (`n × dim`) and `y` (`m × dim`), Euclidean cost, log-domain Sinkhorn. Identical point clouds with zero cost give 0.
///
/// # Errors
/// [`Error::ShapeMismatch`] when a buffer is not a multiple of `dim`; [`Error::InvalidParameter`] for an empty set or
/// bad Sinkhorn settings.
pub fn sinkhorn_w1(x: &[f32], y: &[f32], dim: usize, config: &SinkhornConfig) -> Result<f64> {
    if dim == 0 || !x.len().is_multiple_of(dim) || !y.len().is_multiple_of(dim) {
        return Err(Error::ShapeMismatch {
            op: "sinkhorn_w1: [n, dim] buffers",
            expected: vec![dim],
            actual: vec![x.len(), y.len()],
        });
    }
    let (n, m) = (x.len() / dim, y.len() / dim);
    if n == 0 || m == 0 {
        return Err(Error::invalid_parameter("sinkhorn_w1 points", format!("{n} x {m}"), "both sets need a point"));
    }
    if !(config.epsilon_scale > 0.0 && config.tolerance >= 0.0) {
        return Err(Error::invalid_parameter("epsilon_scale", config.epsilon_scale, "must be > 0"));
    }
    let norm2 = |v: &[f32]| v.iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>();
    let xn: Vec<f64> = x.chunks(dim).map(norm2).collect();
    let yn: Vec<f64> = y.chunks(dim).map(norm2).collect();
    let mut c = vec![0.0f64; n * m];
    for (a, xa) in x.chunks(dim).enumerate() {
        for (b, yb) in y.chunks(dim).enumerate() {
            let dot: f64 = xa.iter().zip(yb).map(|(&p, &q)| f64::from(p) * f64::from(q)).sum();
            c[a * m + b] = (xn[a] + yn[b] - 2.0 * dot).max(0.0).sqrt();
        }
    }
    let mean_c = c.iter().sum::<f64>() / c.len() as f64;
    if mean_c == 0.0 {
        return Ok(0.0);
    }
    let eps = config.epsilon_scale * mean_c;
    let (log_a, log_b) = (-(n as f64).ln(), -(m as f64).ln());
    let (mut f, mut g) = (vec![0.0f64; n], vec![0.0f64; m]);
    for _ in 0..config.max_iter.max(1) {
        for a in 0..n {
            f[a] = eps * log_a - eps * log_sum_exp((0..m).map(|b| (g[b] - c[a * m + b]) / eps));
        }
        for b in 0..m {
            g[b] = eps * log_b - eps * log_sum_exp((0..n).map(|a| (f[a] - c[a * m + b]) / eps));
        }
        // After the g update the columns are exact; check the rows.
        let err: f64 = (0..n)
            .map(|a| ((0..m).map(|b| ((f[a] + g[b] - c[a * m + b]) / eps).exp()).sum::<f64>() - 1.0 / n as f64).abs())
            .sum();
        if err < config.tolerance {
            break;
        }
    }
    Ok((0..n)
        .flat_map(|a| (0..m).map(move |b| (a, b)))
        .map(|(a, b)| ((f[a] + g[b] - c[a * m + b]) / eps).exp() * c[a * m + b])
        .sum())
}

/// SHEAR token weights `ω` (row-major `[B, T]`, 0 on padding) from last-layer hidden states `hidden` (`[B, T, dim]`,
/// row-major), the batch layout and per-sequence advantages.
///
/// # Errors
/// [`Error::ShapeMismatch`] for buffers that do not match the layout; [`Error::NonFinite`] for a non-finite advantage;
/// the errors of [`sinkhorn_w1`]; [`Error::InvalidParameter`] for a zero window or stride.
pub fn shear_weights(
    hidden: &[f32],
    dim: usize,
    layout: &BatchLayout,
    advantages: &[f32],
    config: &ShearConfig,
) -> Result<Vec<f32>> {
    if config.window == 0 || config.stride == 0 {
        return Err(Error::invalid_parameter(
            "window/stride",
            format!("{}/{}", config.window, config.stride),
            "must be > 0",
        ));
    }
    let [b, t] = layout.shape();
    check_len("shear_weights: hidden [B, T, dim]", hidden.len(), b * t * dim)?;
    layout.check_per_sequence("advantages", advantages.len())?;
    forkrl_core::numeric::check_finite("advantages", advantages, &[advantages.len()])?;
    let mask = layout.response_mask();
    let positions = |row: usize| -> Vec<usize> { (0..t).filter(|&c| mask[row * t + c]).collect() };
    let span_points = |row: usize, pos: &[usize], (s, e): (usize, usize)| -> Vec<f32> {
        pos[s..e].iter().flat_map(|&c| hidden[(row * t + c) * dim..(row * t + c + 1) * dim].iter().copied()).collect()
    };
    let mut omega = vec![0.0f32; b * t];
    for group in layout.groups() {
        let rows: Vec<usize> = group.rows.collect();
        let pos: Vec<Vec<usize>> = rows.iter().map(|&r| positions(r)).collect();
        let norms: Vec<f64> = rows
            .iter()
            .zip(&pos)
            .flat_map(|(&r, p)| p.iter().map(move |&c| (r, c)))
            .map(|(r, c)| {
                hidden[(r * t + c) * dim..(r * t + c + 1) * dim]
                    .iter()
                    .map(|&v| f64::from(v).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let n_bar = (norms.iter().sum::<f64>() / norms.len().max(1) as f64).max(1e-6);
        let spans: Vec<Vec<(usize, usize)>> =
            pos.iter().map(|p| shear_spans(p.len(), config.window, config.stride)).collect();
        for (i, &row) in rows.iter().enumerate() {
            let a = advantages[row];
            let opposing: Vec<usize> =
                (0..rows.len()).filter(|&j| a * advantages[rows[j]] < 0.0 && !pos[j].is_empty()).collect();
            if a == 0.0 || opposing.is_empty() {
                pos[i].iter().for_each(|&c| omega[row * t + c] = 1.0);
                continue;
            }
            for &(s, e) in &spans[i] {
                let x = span_points(row, &pos[i], (s, e));
                let mut d = f64::INFINITY;
                for &j in &opposing {
                    for &span_j in &spans[j] {
                        d = d.min(sinkhorn_w1(&x, &span_points(rows[j], &pos[j], span_j), dim, &config.sinkhorn)?);
                    }
                }
                let w = (d / n_bar) as f32;
                for &c in &pos[i][s..e] {
                    omega[row * t + c] = omega[row * t + c].max(w);
                }
            }
        }
    }
    Ok(omega)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vector_2m_spans() {
        let one_based = |len| shear_spans(len, 100, 25).into_iter().map(|(s, e)| (s + 1, e)).collect::<Vec<_>>();
        assert_eq!(one_based(60), vec![(1, 60)]);
        assert_eq!(one_based(100), vec![(1, 100)]);
        assert_eq!(one_based(230), vec![(1, 100), (26, 125), (51, 150), (76, 175), (101, 200), (126, 225), (131, 230)]);
        assert_eq!(one_based(250), vec![(1, 100), (26, 125), (51, 150), (76, 175), (101, 200), (126, 225), (151, 250)]);
        assert!(shear_spans(0, 100, 25).is_empty());
    }

    #[test]
    fn test_vector_2m_sinkhorn() {
        let p = [0.0f32, 0.0, 1.0, 0.0];
        let q = [0.0f32, 1.0, 1.0, 1.0];
        let w = sinkhorn_w1(&p, &q, 2, &SinkhornConfig::default()).expect("valid");
        assert!((w - 1.000433).abs() < 1e-6, "{w}");
        let same = sinkhorn_w1(&p, &p, 2, &SinkhornConfig::default()).expect("valid");
        assert!(same < 1e-12, "{same}");
        assert!(sinkhorn_w1(&p, &q[..3], 2, &SinkhornConfig::default()).is_err());
    }

    #[test]
    fn weights_are_large_only_after_the_divergence() {
        // Two rollouts share hidden states for 4 tokens, then diverge; spans of 2, stride 1.
        let dim = 2;
        let shared = [[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]];
        let mut hidden = Vec::new();
        for (row, tail) in [[3.0f32, 3.0], [-3.0, -3.0]].iter().enumerate() {
            let _ = row;
            for h in shared {
                hidden.extend(h);
            }
            hidden.extend(tail);
            hidden.extend(tail);
        }
        let layout = BatchLayout::from_lengths(&[2], &[6, 6], 6).expect("valid");
        let cfg = ShearConfig { window: 2, stride: 1, ..ShearConfig::default() };
        let w = shear_weights(&hidden, dim, &layout, &[1.0, -1.0], &cfg).expect("valid");
        assert!(w[..3].iter().all(|&x| x < 1e-3), "shared prefix: {w:?}");
        assert!(w[4] > 1.0 && w[5] > 1.0, "diverged tail: {w:?}");
        // No opposing rollout: ω = 1.
        let same = shear_weights(&hidden, dim, &layout, &[1.0, 1.0], &cfg).expect("valid");
        assert!(same.iter().all(|&x| x == 1.0));
    }
}
