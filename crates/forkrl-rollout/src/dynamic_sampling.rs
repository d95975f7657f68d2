//! DAPO dynamic sampling (arXiv 2503.14476 §3.2; verl `recipe/dapo`, `algorithm.filter_groups`).
//!
//! Over-sample prompts and keep a group only when its **raw verifiable metric** (`acc`) varies: std > tolerance, or
//! the group has a single response (kept, as verl). Generation repeats until `train_batch_size` groups are kept; the
//! result is truncated to exactly that many. After `max_num_gen_batches` generation batches without filling the
//! batch, [`DynamicSampler::add_batch`] fails with [`Error::SamplingExhausted`] instead of looping forever (verl
//! raises too). Filter on `acc`, never on the shaped reward: a length penalty can give an all-wrong group a non-zero
//! reward std. Source: `../shared/methods/rollout-allocation.md` §1.

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Dynamic-sampling parameters (the 80/20 and HTPO recipes use 10 batches).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicSamplingConfig {
    /// Give up after this many generation batches (0 = unlimited, as verl's `0`).
    pub max_num_gen_batches: usize,
    /// A group whose metric std is at most this counts as constant.
    pub zero_std_tolerance: f64,
}

impl Default for DynamicSamplingConfig {
    fn default() -> Self {
        Self { max_num_gen_batches: 10, zero_std_tolerance: 1e-6 }
    }
}

/// Whether each group (contiguous, sizes `group_sizes`) has a varying metric or is a singleton.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `Σ group_sizes ≠ metric.len()`; [`Error::NonFinite`] for a NaN/inf metric;
/// [`Error::EmptyGroup`] for a size-0 group.
pub fn keep_groups(metric: &[f32], group_sizes: &[usize], tolerance: f64) -> Result<Vec<bool>> {
    forkrl_core::numeric::check_len("keep_groups: metric vs group sizes", metric.len(), group_sizes.iter().sum())?;
    forkrl_core::numeric::check_finite("acc", metric, &[metric.len()])?;
    let mut start = 0;
    let mut keep = Vec::with_capacity(group_sizes.len());
    for (g, &size) in group_sizes.iter().enumerate() {
        if size == 0 {
            return Err(Error::EmptyGroup { op: "keep_groups", group: g });
        }
        let v = &metric[start..start + size];
        start += size;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / size as f64;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (size.max(2) - 1) as f64;
        keep.push(size == 1 || var.sqrt() > tolerance);
    }
    Ok(keep)
}

/// Accumulates kept groups across generation batches.
#[derive(Debug, Clone)]
pub struct DynamicSampler<T> {
    config: DynamicSamplingConfig,
    needed: usize,
    kept: Vec<T>,
    attempts: usize,
    seen_groups: usize,
    zero_std_groups: usize,
}

impl<T> DynamicSampler<T> {
    /// A sampler that fills `train_batch_size` groups.
    pub fn new(train_batch_size: usize, config: DynamicSamplingConfig) -> Self {
        Self { config, needed: train_batch_size, kept: Vec::new(), attempts: 0, seen_groups: 0, zero_std_groups: 0 }
    }

    /// Adds one generation batch: `groups` (payloads), their `acc` values and sizes. Returns the full training batch
    /// (exactly `train_batch_size` groups, in arrival order) once enough groups were kept, else `None`.
    ///
    /// # Errors
    /// [`Error::SamplingExhausted`] when `max_num_gen_batches` batches did not fill it; the errors of [`keep_groups`];
    /// [`Error::ShapeMismatch`] when `groups` and `group_sizes` differ in length.
    pub fn add_batch(&mut self, groups: Vec<T>, acc: &[f32], group_sizes: &[usize]) -> Result<Option<Vec<T>>> {
        forkrl_core::numeric::check_len(
            "DynamicSampler::add_batch: groups vs group sizes",
            groups.len(),
            group_sizes.len(),
        )?;
        let keep = keep_groups(acc, group_sizes, self.config.zero_std_tolerance)?;
        self.attempts += 1;
        self.seen_groups += groups.len();
        self.zero_std_groups += keep.iter().filter(|&&k| !k).count();
        self.kept.extend(groups.into_iter().zip(keep).filter(|(_, k)| *k).map(|(g, _)| g));
        if self.kept.len() >= self.needed {
            let mut batch = std::mem::take(&mut self.kept);
            batch.truncate(self.needed);
            return Ok(Some(batch));
        }
        if self.config.max_num_gen_batches > 0 && self.attempts >= self.config.max_num_gen_batches {
            return Err(Error::SamplingExhausted {
                attempts: self.attempts,
                kept: self.kept.len(),
                needed: self.needed,
            });
        }
        Ok(None)
    }

    /// Generation batches drawn so far.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// `frac_reward_zero_std` over every group seen (before filtering).
    pub fn frac_zero_std(&self) -> f64 {
        if self.seen_groups == 0 { 0.0 } else { self.zero_std_groups as f64 / self.seen_groups as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_mixed_groups_and_singletons() {
        let acc = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0];
        assert_eq!(keep_groups(&acc, &[2, 2, 1, 3], 1e-6).expect("valid"), vec![false, false, true, true]);
        assert!(matches!(keep_groups(&[f32::NAN], &[1], 1e-6), Err(Error::NonFinite { .. })));
    }

    #[test]
    fn fills_then_truncates_or_gives_up() {
        let mut s = DynamicSampler::new(2, DynamicSamplingConfig { max_num_gen_batches: 3, ..Default::default() });
        assert_eq!(s.add_batch(vec!["a", "b"], &[1.0, 0.0, 1.0, 1.0], &[2, 2]).expect("ok"), None);
        let full = s.add_batch(vec!["c", "d"], &[0.0, 1.0, 1.0, 0.0], &[2, 2]).expect("ok");
        assert_eq!(full, Some(vec!["a", "c"]));
        assert!((s.frac_zero_std() - 0.25).abs() < 1e-12);
        let mut s = DynamicSampler::new(5, DynamicSamplingConfig { max_num_gen_batches: 2, ..Default::default() });
        assert_eq!(s.add_batch(vec![1], &[1.0, 1.0], &[2]).expect("ok"), None);
        match s.add_batch(vec![2], &[0.0, 1.0], &[2]) {
            Err(Error::SamplingExhausted { attempts: 2, kept: 1, needed: 5 }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
