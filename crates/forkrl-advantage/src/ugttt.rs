//! UG-TTT — "Epistemic Uncertainty for Test-Time Discovery" (Riaz, Mohsin, Bilal, Umer, Mohsin, Riaz, Subhan, Cioffi;
//! arXiv 2605.11328). A small ensemble of low-rank adapters over one policy; the disagreement of their next-token
//! predictions (epistemic uncertainty, [`forkrl_entropy::epistemic_mutual_information`]) is an exploration bonus in the
//! policy gradient, and a nuclear-norm regulariser keeps the adapters distinct. Spec:
//! `../shared/methods/exploration-extras.md` §3.
//!
//! **RECONSTRUCTION** (standard BALD; only the abstract and a short third-party description are public):
//!
//! ```text
//! MI_t   = H(p̄_t) − (1/M) Σ_m H(p_{m,t})                    epistemic uncertainty of position t
//! Ã_i,t  = A_i + β · sg(MI_t)                                 bonus in the advantage (default), or
//! r_i    = r_i + β · Σ_t MI_t                                 bonus in the reward
//! L_div  = −λ · ‖[vec(ΔW_1); …; vec(ΔW_M)]‖_*                 nuclear norm of the stacked adapter updates, maximised
//! ```
//!
//! Defaults M = 4, β = 0.1, λ = 1e-3 (the spec's reconstruction); adapter rank 4 (forkrl's choice).

use forkrl_core::{Error, Result, numeric::check_len};
use serde::{Deserialize, Serialize};

/// Where the epistemic bonus goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BonusTarget {
    /// `Ã_t = A + β·MI_t` on each response token.
    #[default]
    Advantage,
    /// `r + β·Σ_t MI_t` before the group advantages.
    Reward,
}

/// UG-TTT's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UgTttConfig {
    /// `M`: adapters in the ensemble.
    pub members: usize,
    /// Rank of each adapter.
    pub rank: usize,
    /// β of the bonus.
    pub beta: f32,
    /// λ of the nuclear-norm diversity regulariser.
    pub lambda: f32,
    /// Advantage or reward.
    pub bonus: BonusTarget,
}

impl Default for UgTttConfig {
    fn default() -> Self {
        Self { members: 4, rank: 4, beta: 0.1, lambda: 1e-3, bonus: BonusTarget::Advantage }
    }
}

impl UgTttConfig {
    /// Checks the parameters once.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the parameter.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("members", self.members), ("rank", self.rank)] {
            if v == 0 {
                return Err(Error::invalid_parameter(name, v, "must be ≥ 1"));
            }
        }
        for (name, v) in [("beta", self.beta), ("lambda", self.lambda)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid_parameter(name, v, "must be finite and ≥ 0"));
            }
        }
        Ok(())
    }
}

/// `[B, W]` token advantages `A_i + β·MI_t` on the masked positions (0 elsewhere).
///
/// # Errors
/// [`Error::ShapeMismatch`] for arrays that are not `[B, W]`; [`Error::InvalidParameter`] for a negative or
/// non-finite `MI` on a masked position.
pub fn ugttt_token_advantages(advantages: &[f32], mi: &[f32], mask: &[bool], beta: f32) -> Result<Vec<f32>> {
    check_len("ugttt_token_advantages: mi vs mask", mi.len(), mask.len())?;
    let b = advantages.len();
    if b == 0 || !mask.len().is_multiple_of(b) {
        return Err(Error::invalid_parameter("advantages", b, format!("must divide the {} positions", mask.len())));
    }
    if let Some(i) = mi.iter().zip(mask).position(|(v, &m)| m && !(v.is_finite() && *v >= 0.0)) {
        return Err(Error::invalid_parameter("mi", mi[i], format!("position {i}: must be finite and ≥ 0")));
    }
    let w = mask.len() / b;
    Ok((0..mask.len()).map(|t| if mask[t] { advantages[t / w] + beta * mi[t] } else { 0.0 }).collect())
}

/// The nuclear norm `Σ σ_i` of a `rows × cols` matrix (row-major), from the eigenvalues of its `rows × rows` Gram
/// matrix (cyclic Jacobi, f64): cheap when the matrix is a stack of a few flattened adapter updates.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the length is not `rows × cols`; [`Error::InvalidParameter`] for a non-finite entry.
pub fn nuclear_norm(matrix: &[f32], rows: usize, cols: usize) -> Result<f64> {
    let (lambda, _) = gram_eigen(matrix, rows, cols)?;
    Ok(lambda.iter().map(|l| l.sqrt()).sum())
}

/// The eigenvalues (clamped at 0) and eigenvectors (columns, row-major `rows × rows`) of the Gram matrix `X Xᵀ`,
/// after checking `X`.
fn gram_eigen(matrix: &[f32], rows: usize, cols: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    check_len("nuclear_norm: matrix", matrix.len(), rows * cols)?;
    if let Some(x) = matrix.iter().find(|x| !x.is_finite()) {
        return Err(Error::invalid_parameter("matrix", x, "must be finite"));
    }
    let row = |i: usize| &matrix[i * cols..(i + 1) * cols];
    let mut g = vec![0.0f64; rows * rows];
    for i in 0..rows {
        for j in i..rows {
            let d: f64 = row(i).iter().zip(row(j)).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            g[i * rows + j] = d;
            g[j * rows + i] = d;
        }
    }
    let vectors = jacobi_eigen(&mut g, rows);
    Ok(((0..rows).map(|i| g[i * rows + i].max(0.0)).collect(), vectors))
}

/// `(‖X‖_*, ∂‖X‖_*/∂X)` of a `rows × cols` matrix: the gradient is `U Vᵀ = (X Xᵀ)^{-1/2} X` (from the Gram matrix's
/// eigenvectors); directions whose singular value is below `1e-6 · σ_max` are left out (a subgradient where `X` is
/// rank-deficient). What the diversity regulariser `−λ ‖X‖_*` differentiates through.
///
/// # Errors
/// As [`nuclear_norm`].
pub fn nuclear_norm_grad(matrix: &[f32], rows: usize, cols: usize) -> Result<(f64, Vec<f32>)> {
    let (lambda, vectors) = gram_eigen(matrix, rows, cols)?;
    let norm = lambda.iter().map(|l| l.sqrt()).sum();
    let floor = lambda.iter().copied().fold(0.0f64, f64::max) * 1e-12;
    // S^{-1/2} = Σ_k λ_k^{-1/2} q_k q_kᵀ over the directions above the floor.
    let mut inv_sqrt = vec![0.0f64; rows * rows];
    for k in (0..rows).filter(|&k| lambda[k] > floor && lambda[k] > 0.0) {
        let s = 1.0 / lambda[k].sqrt();
        for i in 0..rows {
            for j in 0..rows {
                inv_sqrt[i * rows + j] += s * vectors[i * rows + k] * vectors[j * rows + k];
            }
        }
    }
    let mut grad = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for c in 0..cols {
            grad[i * cols + c] =
                (0..rows).map(|j| inv_sqrt[i * rows + j] * f64::from(matrix[j * cols + c])).sum::<f64>() as f32;
        }
    }
    Ok((norm, grad))
}

/// Diagonalises the symmetric `n × n` matrix `a` in place (its diagonal ends up holding the eigenvalues) and returns
/// the eigenvectors as the columns of an `n × n` row-major matrix.
fn jacobi_eigen(a: &mut [f64], n: usize) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n * n).map(|i| f64::from(u8::from(i / n.max(1) == i % n.max(1)))).collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        let scale: f64 = (0..n).map(|i| a[i * n + i].powi(2)).sum::<f64>().max(f64::MIN_POSITIVE);
        if off <= 1e-30 * scale {
            return v;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bonus_by_hand() {
        let a = ugttt_token_advantages(&[1.0, -1.0], &[0.5, 0.2, 0.0, 0.7], &[true, false, true, true], 0.1)
            .expect("valid");
        assert_eq!(a, vec![1.05, 0.0, -1.0, -0.93]);
        assert!(ugttt_token_advantages(&[1.0], &[-0.1], &[true], 0.1).is_err());
        assert!(ugttt_token_advantages(&[1.0, 2.0], &[0.1; 3], &[true; 3], 0.1).is_err());
        assert!(UgTttConfig { members: 0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn nuclear_norm_by_hand() {
        // diag(3, 4): 7. A rank-one matrix: its Frobenius norm.
        assert!((nuclear_norm(&[3.0, 0.0, 0.0, 4.0], 2, 2).expect("valid") - 7.0).abs() < 1e-9);
        let r1 = [1.0f32, 2.0, 2.0, 2.0, 4.0, 4.0];
        assert!((nuclear_norm(&r1, 2, 3).expect("valid") - 45f64.sqrt()).abs() < 1e-9);
        // [[1, 1], [0, 1]]: singular values √((3 ± √5)/2), sum √5.
        assert!((nuclear_norm(&[1.0, 1.0, 0.0, 1.0], 2, 2).expect("valid") - 5f64.sqrt()).abs() < 1e-9);
        // Orthogonal rows of norms 1, 2, 3: 6.
        let m = [1.0f32, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0];
        assert!((nuclear_norm(&m, 3, 4).expect("valid") - 6.0).abs() < 1e-9);
        assert_eq!(nuclear_norm(&[], 0, 3).expect("valid"), 0.0);
        // The gradient against central differences.
        let x = [0.3f32, -1.2, 0.7, 2.0, 0.1, 0.5, -0.4, 1.1, -0.9, 0.2, 0.8, -0.6];
        let (n, g) = nuclear_norm_grad(&x, 3, 4).expect("valid");
        assert!((n - nuclear_norm(&x, 3, 4).expect("valid")).abs() < 1e-12);
        for i in 0..12 {
            let (mut up, mut down) = (x, x);
            up[i] += 1e-3;
            down[i] -= 1e-3;
            let fd = (nuclear_norm(&up, 3, 4).expect("valid") - nuclear_norm(&down, 3, 4).expect("valid")) / 2e-3;
            assert!((fd - f64::from(g[i])).abs() < 1e-3, "entry {i}: {fd} vs {}", g[i]);
        }
        assert!(nuclear_norm(&[1.0], 2, 2).is_err());
    }
}
