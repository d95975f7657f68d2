//! The C allocator's settings for a training process: keep freed memory for the next allocation instead of returning
//! it to the kernel.
//!
//! A training step on the CPU backend allocates and frees many tensors of 0.1–30 MB (activations, their gradients,
//! the attention kernels' outputs). glibc's `malloc` serves those above its dynamic mmap threshold with fresh
//! `mmap`s and unmaps them on `free`, and trims the top of its heap when more than its trim threshold is free; the
//! next step then takes a page fault (and a zeroed page from the kernel) for every 4 KiB it touches again.
//! [`retain_freed_memory`] sets the mmap threshold to glibc's maximum (32 MiB, so larger buffers still come and go
//! with `mmap`) and the trim threshold to 1 GiB, so that freed blocks are reused.
//!
//! Measured on the tiny policy's training step in one `cargo xtask bench` run (2-core machine, docs/benchmarks.md):
//! `policy_tiny_train_64x136/forward_backward_fused_head_glibc_default_allocator` 199.7 ms, then with this setting
//! `forward_backward_fused_head` 125.0 ms. PyTorch's step in the peer script (`benches/peers/tiny_peer.py`, run with
//! and without the environment variables below) is unchanged by the same settings (110.6 and 111.9 ms).
//!
//! This changes process-wide state, so the library never calls it: the `forkrl-train` binary and the benchmarks do,
//! and a program that drives `forkrl_trainer::Trainer` itself may (the `MALLOC_MMAP_THRESHOLD_` and
//! `MALLOC_TRIM_THRESHOLD_` environment variables do the same without code; `cargo xtask test` sets them for the
//! test processes). The cost is resident memory: up to the trim threshold of freed memory stays mapped (it is reused
//! by later allocations; the peak of live memory does not change). Elsewhere than Linux with glibc it does nothing.

/// glibc's largest accepted mmap threshold (`HEAP_MAX_SIZE / 2` on 64-bit targets): larger allocations keep their
/// own `mmap`.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory at the top of the heap kept before glibc returns it to the kernel.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// Sets glibc's mmap threshold to [`MMAP_THRESHOLD`] and its trim threshold to [`TRIM_THRESHOLD`] (see the module
/// documentation). Returns whether both settings were taken: `false` where the C library is not glibc (nothing is
/// changed) or where glibc refused one of them (the other may be set); nothing else depends on the result.
#[must_use = "false means the allocator kept its defaults"]
pub fn retain_freed_memory() -> bool {
    imp::retain_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    use super::{MMAP_THRESHOLD, TRIM_THRESHOLD};

    pub(super) fn retain_freed_memory() -> bool {
        let (Ok(mmap), Ok(trim)) = (libc::c_int::try_from(MMAP_THRESHOLD), libc::c_int::try_from(TRIM_THRESHOLD))
        else {
            return false;
        };
        // SAFETY: `mallopt` only changes the allocator's parameters under its own lock; it is safe to call at any
        // time from any thread, and memory already allocated is unaffected. It returns 1 on success, 0 on error.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn retain_freed_memory() -> bool {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn minor_faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `getrusage` writes one `rusage` into the pointer it is given, which is valid and aligned.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
        assert_eq!(rc, 0, "getrusage failed");
        // SAFETY: initialised by the successful call above (and zeroed before it).
        unsafe { usage.assume_init() }.ru_minflt
    }

    /// Faults taken while filling a fresh 16 MiB buffer, after one of the same size was filled and freed.
    fn faults_of_a_reused_buffer() -> i64 {
        const BYTES: usize = 16 << 20;
        drop(std::hint::black_box(vec![1u8; BYTES]));
        let before = minor_faults();
        let again = std::hint::black_box(vec![2u8; BYTES]);
        let faults = minor_faults() - before;
        drop(again);
        faults
    }

    #[test]
    fn freed_memory_is_reused_without_page_faults() {
        // Run in a thread of its own: its allocator arena and its fault count are not shared with other tests.
        let faults = std::thread::spawn(|| {
            assert!(
                retain_freed_memory(),
                "glibc refused an mmap threshold of {MMAP_THRESHOLD} or a trim of {TRIM_THRESHOLD}"
            );
            faults_of_a_reused_buffer()
        })
        .join()
        .expect("the test thread panicked");
        // 16 MiB are 4,096 pages: a buffer served by a fresh mapping faults on every one of them.
        assert!(faults < 256, "{faults} page faults refilling a reused 16 MiB buffer");
    }
}
