//! Tasks of the RLVR loop: the built-in generators ([`arithmetic`], [`countdown`], [`sum`]) and JSONL datasets
//! ([`jsonl`]), behind one [`task::Task`] that gives prompts, SFT targets and a verifier per problem ([`verify`]: exact,
//! no code execution).

pub mod arithmetic;
pub mod countdown;
pub mod jsonl;
pub mod sum;
pub mod task;
pub mod verify;

pub use task::{Gold, Problem, Task, TaskConfig};

/// The most draws rejection sampling makes for `n` problems of one split: far more than a split of 1 % of the space
/// needs, and a bound when a split is empty.
pub fn max_draws(n: usize) -> usize {
    n.saturating_mul(1000).saturating_add(100_000)
}

/// Whether a problem identified by a multiset of numbers (order-free) and a `seed` (the rest of its identity, e.g. a
/// target) is held out: a hash of the sorted numbers compared with `test_share`, so a problem is in one split only.
pub(crate) fn multiset_is_test(seed: u64, numbers: &[u32], test_share: f64) -> bool {
    let mut sorted = numbers.to_vec();
    sorted.sort_unstable();
    let mut h = seed;
    for n in sorted {
        h = forkrl_core::numeric::splitmix64(h ^ u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    (forkrl_core::numeric::splitmix64(h) as f64 / u64::MAX as f64) < test_share
}

/// The check of a generated task's `test_share`: strictly between 0 and 1 (a held-out split is needed for evaluation).
pub(crate) fn check_test_share(task: &str, test_share: f64) -> Result<(), String> {
    if test_share > 0.0 && test_share < 1.0 {
        Ok(())
    } else {
        Err(format!("{task}: test_share = {test_share} must be in (0, 1) (a held-out split is needed for evaluation)"))
    }
}

/// The error of a split that rejection sampling could not fill.
fn split_too_small(test: bool, found: usize, wanted: usize, space: u64) -> String {
    let split = if test { "held-out" } else { "training" };
    format!(
        "the {split} split of the task is too small: {found} of {wanted} problems found in {} draws from a space of \
         {space} (change task.test_share or enlarge the task)",
        max_draws(wanted)
    )
}

/// Bounded rejection sampling: calls `draw` (which sees the items kept so far and returns the next one to keep, or
/// `None` for a rejected draw) until `n` are kept or [`max_draws`]`(n)` draws are spent.
pub(crate) fn draw_up_to<T>(n: usize, mut draw: impl FnMut(&[T]) -> Option<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..max_draws(n) {
        if out.len() == n {
            break;
        }
        if let Some(item) = draw(&out) {
            out.push(item);
        }
    }
    out
}

/// `n` items of one split (`test` or training) by [`draw_up_to`], or a message naming the split when it is too small
/// (`space`: the size of the task's problem space, for the message).
pub(crate) fn fill_split<T>(
    n: usize,
    test: bool,
    space: u64,
    draw: impl FnMut(&[T]) -> Option<T>,
) -> Result<Vec<T>, String> {
    let out = draw_up_to(n, draw);
    if out.len() < n { Err(split_too_small(test, out.len(), n, space)) } else { Ok(out) }
}
