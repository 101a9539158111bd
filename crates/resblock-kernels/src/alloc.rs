//! Allocator tuning for training: glibc returns every freed multi-MB activation to the
//! kernel (munmap) by default, so each op paid page faults, zeroing and TLB shootdowns
//! (about 20 % of a training step).

/// Keeps freed memory in the process (no mmap for the main heap, no trimming). Call it
/// before other threads start; it does nothing off Linux/glibc.
///
/// Raising `M_MMAP_THRESHOLD` alone is not enough: glibc caps it at 32 MiB on 64-bit, and
/// larger blocks were still mapped fresh and returned on free. At ImageNet sizes most
/// activations are larger (a 256-channel 56x56 map at batch 32 is 98 MiB), and the
/// kernel's zeroing of their pages on first touch (`clear_page_erms`) was 40 % of a
/// ResNet-50 batch-32 training step. `M_MMAP_MAX = 0` serves every block of the main arena
/// from the heap, where freed blocks are reused; other threads' arenas still map what
/// does not fit their 64 MiB heaps (the ops allocate their outputs on the calling thread).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator tunables; it is called before other threads
        // start.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }
}
