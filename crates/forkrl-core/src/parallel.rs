//! Work split for the host kernels of the fused model operations ([`crate::rms_norm`], [`crate::swiglu`]): items
//! (disjoint output chunks whose boundaries never depend on the thread count) spread over scoped threads, so every
//! result is the same whatever the number of cores.

/// Below this many elements of work a kernel runs in the calling thread (starting threads would cost more).
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Runs `job` on every item, on up to `available_parallelism` scoped threads when `work` (elements touched) is at
/// least [`PARALLEL_MIN_WORK`], else in the calling thread. Items are handed out in contiguous runs.
pub(crate) fn for_each<I: Send>(items: Vec<I>, work: usize, job: impl Fn(I) + Sync) {
    let threads =
        if work < PARALLEL_MIN_WORK { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
    if threads <= 1 || items.len() <= 1 {
        items.into_iter().for_each(job);
        return;
    }
    let per = items.len().div_ceil(threads);
    let mut items = items.into_iter();
    let job = &job;
    std::thread::scope(|scope| {
        loop {
            let run: Vec<I> = items.by_ref().take(per).collect();
            if run.is_empty() {
                break;
            }
            scope.spawn(move || run.into_iter().for_each(job));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_inline_and_threaded() {
        for work in [0, PARALLEL_MIN_WORK] {
            let mut out = vec![0u32; 37];
            let items: Vec<(usize, &mut [u32])> = out.chunks_mut(5).enumerate().collect();
            for_each(items, work, |(i, chunk)| chunk.iter_mut().for_each(|x| *x += i as u32 + 1));
            let want: Vec<u32> = (0..37).map(|j| j as u32 / 5 + 1).collect();
            assert_eq!(out, want, "work {work}");
        }
    }
}
