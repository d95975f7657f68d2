//! Unbiased pass@k, maj@k and avg@k — "Evaluating Large Language Models Trained on Code" (Chen et al.,
//! arXiv 2107.03374).
//!
//! ```text
//! pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)          (1 when n − c < k)
//! ```
//!
//! The product has only `c` factors in [0, 1] (no overflow); above 1000 samples it is summed in log space with
//! `log1p(−k/i)`. `k > n` is an error (the estimator is undefined). `maj@k` is the majority vote over `k` answers
//! (missing answers do not vote; ties go to the answer seen first); `avg@k` the mean accuracy of `k` samples.
//! Source: `../shared/methods/rollout-allocation.md` §5.

use std::{collections::HashMap, hash::Hash};

use forkrl_core::{Error, Result};

/// Unbiased pass@k of one problem with `n` samples of which `c` are correct.
///
/// # Errors
/// [`Error::InvalidParameter`] for `k == 0`, `k > n` or `c > n`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Result<f64> {
    if k == 0 || k > n {
        return Err(Error::invalid_parameter("k", k, format!("must lie in [1, n = {n}]")));
    }
    if c > n {
        return Err(Error::invalid_parameter("c", c, format!("correct samples cannot exceed n = {n}")));
    }
    if n - c < k {
        return Ok(1.0);
    }
    let factors = (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64);
    if n > 1000 { Ok(-(factors.map(|f| f.ln()).sum::<f64>()).exp_m1()) } else { Ok(1.0 - factors.product::<f64>()) }
}

/// Mean pass@k over problems given as `(n, c)`.
///
/// # Errors
/// As [`pass_at_k`]; [`Error::EmptyBatch`] for no problem.
pub fn mean_pass_at_k(problems: &[(usize, usize)], k: usize) -> Result<f64> {
    if problems.is_empty() {
        return Err(Error::EmptyBatch { op: "mean_pass_at_k" });
    }
    Ok(problems.iter().map(|&(n, c)| pass_at_k(n, c, k)).sum::<Result<f64>>()? / problems.len() as f64)
}

/// avg@k: the fraction of correct samples.
///
/// # Errors
/// [`Error::EmptyBatch`] for no sample.
pub fn avg_at_k(correct: &[bool]) -> Result<f64> {
    if correct.is_empty() {
        return Err(Error::EmptyBatch { op: "avg_at_k" });
    }
    Ok(correct.iter().filter(|&&c| c).count() as f64 / correct.len() as f64)
}

/// maj@k: 1 if the most frequent answer among `answers` is correct, else 0. `None` answers (nothing extracted) do
/// not vote; ties go to the answer that appears first; no answer at all scores 0.
pub fn maj_at_k<A: Eq + Hash>(answers: &[Option<A>], is_correct: impl Fn(&A) -> bool) -> f64 {
    let mut counts: HashMap<&A, (usize, usize)> = HashMap::new();
    for (i, a) in answers.iter().enumerate() {
        if let Some(a) = a {
            counts.entry(a).or_insert((0, i)).0 += 1;
        }
    }
    let winner = counts.into_iter().max_by(|(_, (ca, fa)), (_, (cb, fb))| ca.cmp(cb).then(fb.cmp(fa)));
    winner.map_or(0.0, |(a, _)| f64::from(u8::from(is_correct(a))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(n: usize, c: usize, k: usize) -> f64 {
        let choose = |n: usize, k: usize| -> f64 { (0..k).map(|i| (n - i) as f64 / (k - i) as f64).product() };
        if n - c < k { 1.0 } else { 1.0 - choose(n - c, k) / choose(n, k) }
    }

    #[test]
    fn test_vector_2j() {
        for (n, c, k, v) in [
            (16, 4, 1, 0.25),
            (16, 4, 4, 0.728022),
            (16, 4, 8, 0.961538),
            (16, 4, 16, 1.0),
            (10, 0, 5, 0.0),
            (5, 3, 3, 1.0),
            (100, 1, 10, 0.1),
        ] {
            assert!((pass_at_k(n, c, k).expect("valid") - v).abs() < 1e-6, "({n}, {c}, {k})");
        }
        for n in 1..40 {
            for c in 0..=n {
                for k in 1..=n {
                    assert!((pass_at_k(n, c, k).expect("valid") - exact(n, c, k)).abs() < 1e-12);
                }
            }
        }
        // Log-space branch agrees with the product in its range.
        assert!(
            (pass_at_k(5000, 37, 100).expect("valid")
                - (1.0 - (4964..=5000).map(|i| 1.0 - 100.0 / i as f64).product::<f64>()))
            .abs()
                < 1e-12
        );
        assert!(matches!(pass_at_k(4, 1, 5), Err(Error::InvalidParameter { name: "k", .. })));
        assert!(matches!(pass_at_k(4, 5, 1), Err(Error::InvalidParameter { name: "c", .. })));
    }

    #[test]
    fn maj_and_avg() {
        let answers = [Some("12"), Some("7"), Some("12"), None, Some("7")];
        assert_eq!(maj_at_k(&answers, |a| *a == "12"), 1.0); // tie 2–2: "12" appeared first
        assert_eq!(maj_at_k(&answers, |a| *a == "7"), 0.0);
        assert_eq!(maj_at_k::<&str>(&[None, None], |_| true), 0.0);
        assert_eq!(avg_at_k(&[true, false, true, true]).expect("valid"), 0.75);
        assert!(avg_at_k(&[]).is_err());
        assert!((mean_pass_at_k(&[(16, 4), (10, 0)], 1).expect("valid") - 0.125).abs() < 1e-12);
    }
}
