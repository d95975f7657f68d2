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
