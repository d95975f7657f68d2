//! Cancellation batching — "The Cancellation Hypothesis in Critic-Free RL: From Outcome Rewards to Token Credits"
//! (arXiv 2605.08666).
//!
//! Because `Σ_i Â_i = 0` within a group, a token shared by positive and negative rollouts of one prompt gets credit
//! that roughly cancels, while tokens specific to one side get a net push — but only when the opposing rollouts of a
//! prompt are in the **same gradient step**. Two interventions (`../shared/methods/token-credit.md` §6):
//!
//! 1. **Query-preserved mini-batching** ([`query_preserved_minibatches`]): groups are shuffled as units and never
//!    split across optimiser mini-batches (the author code's `couple`). With equal group sizes `G`, a mini-batch size
//!    that is not a multiple of `G` is an error, unless `round_up_to_group` is set, which rounds it up to the next
//!    multiple (each mini-batch then holds whole groups).
//! 2. **Reward-balanced batching**, both variants of the author repository (which one the paper used is unknown):
//!    (a) [`BalancedBuffer`], the buffered global balance (`_extract_balanced_batch`, `can_fill_batch`);
//!    (b) [`balance_per_query`], the per-query 1:1 mask (`balance-posneg`), the only one that keeps groups intact.
//!
//! Advantages are always computed on full groups **before** any subsetting ([`crate::group_advantages`] first); the
//! per-batch `Σ Â` is then no longer 0, as expected. Positive means score > 0 (the author code); pass the advantage
//! sign instead for non-binary rewards. The coupling derivation in the spec is a RECONSTRUCTION; the batching rules are
//! the author code's.

use forkrl_core::{Error, Result};
use rand::{SeedableRng, seq::SliceRandom, seq::index};
use serde::{Deserialize, Serialize};

/// Rows of each optimiser mini-batch (batch row indices, groups contiguous and whole).
///
/// `group_sizes` are the sizes of the contiguous groups of the rollout batch. `seed = Some(s)` shuffles the order of
/// the groups with a ChaCha8 RNG; `None` keeps it. Groups are packed in order into mini-batches of at most
/// `mini_batch_size` rows.
///
/// # Errors
/// [`Error::InvalidParameter`] for `mini_batch_size == 0`, for equal group sizes that do not divide it (unless
/// `round_up_to_group`), or for a group larger than a mini-batch; [`Error::EmptyGroup`] for a group of size 0.
pub fn query_preserved_minibatches(
    group_sizes: &[usize],
    mini_batch_size: usize,
    round_up_to_group: bool,
    seed: Option<u64>,
) -> Result<Vec<Vec<usize>>> {
    if mini_batch_size == 0 {
        return Err(Error::invalid_parameter("mini_batch_size", 0, "must be at least 1"));
    }
    if let Some(g) = group_sizes.iter().position(|&s| s == 0) {
        return Err(Error::EmptyGroup { op: "query_preserved_minibatches", group: g });
    }
    let mut size = mini_batch_size;
    if let Some(&g) = group_sizes.first()
        && group_sizes.iter().all(|&s| s == g)
        && !size.is_multiple_of(g)
    {
        if !round_up_to_group {
            return Err(Error::invalid_parameter(
                "mini_batch_size",
                size,
                format!(
                    "must be a multiple of the group size {g} so that groups are never split (or set round_up_to_group)"
                ),
            ));
        }
        size = size.div_ceil(g) * g;
    }
    if let Some(&big) = group_sizes.iter().find(|&&s| s > size) {
        return Err(Error::invalid_parameter("mini_batch_size", size, format!("smaller than a group of {big}")));
    }
    let mut offsets = Vec::with_capacity(group_sizes.len());
    let mut start = 0;
    for &s in group_sizes {
        offsets.push(start..start + s);
        start += s;
    }
    if let Some(s) = seed {
        offsets.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(s));
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for rows in offsets {
        if current.len() + rows.len() > size {
            batches.push(std::mem::take(&mut current));
        }
        current.extend(rows);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    Ok(batches)
}

/// Per-query 1:1 balance: in each group keep the first `min(n_pos, n_neg)` rollouts of each sign; a group whose
/// rollouts share one sign is dropped entirely. Returns a keep flag per row.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `Σ group_sizes ≠ positive.len()`.
pub fn balance_per_query(positive: &[bool], group_sizes: &[usize]) -> Result<Vec<bool>> {
    forkrl_core::numeric::check_len(
        "balance_per_query: positive vs group sizes",
        positive.len(),
        group_sizes.iter().sum(),
    )?;
    let mut keep = vec![false; positive.len()];
    let mut start = 0;
    for &size in group_sizes {
        let rows = start..start + size;
        start += size;
        let n_pos = rows.clone().filter(|&r| positive[r]).count();
        let quota = n_pos.min(size - n_pos);
        let (mut p, mut n) = (0, 0);
        for r in rows {
            let slot = if positive[r] { &mut p } else { &mut n };
            if *slot < quota {
                *slot += 1;
                keep[r] = true;
            }
        }
    }
    Ok(keep)
}

/// Balanced-buffer parameters (author-code defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// The minority must reach `⌈ratio_low · B⌉` (3/8).
    pub ratio_low: f64,
    /// The minority takes at most `⌊ratio_high · B⌋` (5/8).
    pub ratio_high: f64,
    /// Forced update after this many generation steps in the buffer (10).
    pub max_buffer_steps: usize,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self { ratio_low: 3.0 / 8.0, ratio_high: 5.0 / 8.0, max_buffer_steps: 10 }
    }
}

/// What one extraction took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancedExtraction<T> {
    /// The extracted rollouts (minority first, then majority).
    pub items: Vec<T>,
    /// Whether positives were the minority (ties count positives as the minority).
    pub minority_positive: bool,
    /// How many came from the minority side.
    pub minority_take: usize,
    /// How many came from the majority side.
    pub majority_take: usize,
}

/// The buffered global balance: rollouts (with advantages already computed on their full groups) accumulate across
/// generation steps until a balanced update batch of `batch_size` can be drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancedBuffer<T> {
    positives: Vec<T>,
    negatives: Vec<T>,
    steps: usize,
    config: BalanceConfig,
}

impl<T> BalancedBuffer<T> {
    /// An empty buffer.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `0 ≤ ratio_low ≤ ratio_high ≤ 1`.
    pub fn new(config: BalanceConfig) -> Result<Self> {
        if !(0.0 <= config.ratio_low && config.ratio_low <= config.ratio_high && config.ratio_high <= 1.0) {
            return Err(Error::invalid_parameter(
                "ratio_low/ratio_high",
                format!("{}/{}", config.ratio_low, config.ratio_high),
                "need 0 <= low <= high <= 1",
            ));
        }
        Ok(Self { positives: Vec::new(), negatives: Vec::new(), steps: 0, config })
    }

    /// Adds the rollouts of one generation step.
    pub fn push_step(&mut self, rollouts: impl IntoIterator<Item = (T, bool)>) {
        for (item, positive) in rollouts {
            if positive { self.positives.push(item) } else { self.negatives.push(item) }
        }
        self.steps += 1;
    }

    /// `(positives, negatives)` held.
    pub fn counts(&self) -> (usize, usize) {
        (self.positives.len(), self.negatives.len())
    }

    /// Generation steps since the last extraction.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// `min ≥ ⌈ratio_low·B⌉` and `max ≥ B − ⌊ratio_high·B⌋` (`can_fill_batch`).
    pub fn can_fill(&self, batch_size: usize) -> bool {
        let (p, n) = self.counts();
        let b = batch_size as f64;
        p.min(n) as f64 >= (self.config.ratio_low * b).ceil()
            && p.max(n) as f64 >= b - (self.config.ratio_high * b).floor()
    }

    /// Whether to update now: balanced, or `max_buffer_steps` reached, or the last step of training.
    pub fn should_update(&self, batch_size: usize, last_step: bool) -> bool {
        self.can_fill(batch_size) || self.steps >= self.config.max_buffer_steps || last_step
    }

    /// Draws an update batch: `minority_take = min(n_minority, ⌊ratio_high·B⌋)`,
    /// `majority_take = min(B − minority_take, n_majority)`, each side sampled without replacement (ChaCha8, `seed`).
    /// If every buffered rollout has one sign the whole buffer is returned. The rest stays buffered.
    pub fn extract(&mut self, batch_size: usize, seed: u64) -> BalancedExtraction<T> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        self.steps = 0;
        let (p, n) = self.counts();
        let minority_positive = p <= n;
        let (minority, majority) = if minority_positive {
            (&mut self.positives, &mut self.negatives)
        } else {
            (&mut self.negatives, &mut self.positives)
        };
        if minority.is_empty() {
            let items: Vec<T> = std::mem::take(majority);
            let majority_take = items.len();
            return BalancedExtraction { items, minority_positive, minority_take: 0, majority_take };
        }
        let minority_take = minority.len().min((self.config.ratio_high * batch_size as f64).floor() as usize);
        let majority_take = (batch_size - minority_take.min(batch_size)).min(majority.len());
        let mut items = take_random(minority, minority_take, &mut rng);
        items.extend(take_random(majority, majority_take, &mut rng));
        BalancedExtraction { items, minority_positive, minority_take, majority_take }
    }
}

/// Removes `k` uniformly chosen items from `v` (order of the rest kept).
fn take_random<T>(v: &mut Vec<T>, k: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<T> {
    let mut chosen: Vec<usize> = index::sample(rng, v.len(), k).into_vec();
    chosen.sort_unstable();
    let mut out = Vec::with_capacity(k);
    for &i in chosen.iter().rev() {
        out.push(v.remove(i));
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_preserved_keeps_groups_whole() {
        let b = query_preserved_minibatches(&[4; 6], 8, false, Some(3)).expect("valid");
        assert_eq!(b.len(), 3);
        for mb in &b {
            assert_eq!(mb.len(), 8);
            for pair in mb.chunks(4) {
                assert!(pair[0] % 4 == 0 && pair.windows(2).all(|w| w[1] == w[0] + 1), "{mb:?}");
            }
        }
        let mut all: Vec<usize> = b.concat();
        all.sort_unstable();
        assert_eq!(all, (0..24).collect::<Vec<_>>());
        assert_eq!(b, query_preserved_minibatches(&[4; 6], 8, false, Some(3)).expect("valid"));
        assert!(matches!(query_preserved_minibatches(&[4; 6], 6, false, None), Err(Error::InvalidParameter { .. })));
        let rounded = query_preserved_minibatches(&[4; 6], 6, true, None).expect("valid");
        assert_eq!(rounded.iter().map(Vec::len).collect::<Vec<_>>(), vec![8, 8, 8]);
        assert!(matches!(
            query_preserved_minibatches(&[2, 0], 2, false, None),
            Err(Error::EmptyGroup { group: 1, .. })
        ));
        // Uneven groups (HORA): packed greedily, never split.
        let uneven = query_preserved_minibatches(&[3, 5, 6, 2, 3], 8, false, None).expect("valid");
        assert_eq!(uneven, vec![(0..8).collect::<Vec<_>>(), (8..16).collect(), (16..19).collect()]);
    }

    #[test]
    fn test_vector_2l_per_query() {
        let signs = [true, true, true, false, false, false, false, false];
        assert_eq!(
            balance_per_query(&signs, &[8]).expect("valid"),
            vec![true, true, true, true, true, true, false, false]
        );
        assert_eq!(balance_per_query(&[true; 4], &[4]).expect("valid"), vec![false; 4]);
    }

    #[test]
    fn test_vector_2l_buffered() {
        for (np, nn, ready, minority_positive, min_take, maj_take) in [
            (300, 900, false, true, 300, 724),
            (500, 900, true, true, 500, 524),
            (700, 700, true, true, 640, 384),
            (1200, 400, true, false, 400, 624),
        ] {
            let mut buf = BalancedBuffer::new(BalanceConfig::default()).expect("valid");
            buf.push_step((0..np).map(|i| (i, true)).chain((0..nn).map(|i| (i, false))));
            assert_eq!(buf.can_fill(1024), ready, "({np}, {nn})");
            let x = buf.extract(1024, 42);
            assert_eq!(
                (x.minority_positive, x.minority_take, x.majority_take),
                (minority_positive, min_take, maj_take)
            );
            assert_eq!(x.items.len(), min_take + maj_take);
            let (p, n) = buf.counts();
            assert_eq!(p + n, np + nn - min_take - maj_take);
        }
        let mut one_sided = BalancedBuffer::new(BalanceConfig::default()).expect("valid");
        one_sided.push_step((0..10).map(|i| (i, false)));
        assert!(one_sided.should_update(1024, true) && !one_sided.should_update(1024, false));
        assert_eq!(one_sided.extract(1024, 0).items.len(), 10);
    }
}
