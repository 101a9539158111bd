//! Allocator tuning for training: glibc returns every freed multi-MB activation to the
//! kernel (munmap) by default, so each op paid page faults, zeroing and TLB shootdowns
//! (about 20 % of a training step).

/// Keeps freed memory in the process (large mmap and trim thresholds). Call it before other
/// threads start; it does nothing off Linux/glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's limit for M_MMAP_THRESHOLD is 32 MiB on 64-bit; larger blocks are still
        // mapped.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only sets allocator tunables; it is called before other threads
        // start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }
}
