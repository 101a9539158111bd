//! `alloc::keep_freed_memory`: a freed activation-sized block (over glibc's 32 MiB cap on
//! the mmap threshold) is reused by the next allocation instead of being mapped fresh, so
//! writing it again costs no page faults. (Its own test binary: the fault count is the
//! whole process's.)

/// Minor page faults of this process so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults() -> i64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: filled above (and zeroed before).
    unsafe { u.assume_init() }.ru_minflt
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_large_blocks_are_reused_without_page_faults() {
    resblock_kernels::alloc::keep_freed_memory();
    const LEN: usize = 40 << 20; // bytes: above the 32 MiB cap, in one arena's heap
    let touch = || {
        let mut v = vec![0u8; LEN];
        // Write every page (calloc'd fresh memory may not be touched otherwise).
        for i in (0..LEN).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
    };
    touch();
    let before = minor_faults();
    touch();
    let faults = minor_faults() - before;
    // Mapped fresh, the block would fault once per 4 KiB page: 10240 times.
    assert!(
        faults < 1024,
        "the second 40 MiB block took {faults} page faults: it was mapped fresh"
    );
}
