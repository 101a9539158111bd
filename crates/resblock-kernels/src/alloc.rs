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
            // The heap grows in steps of at least this much address space (resident only
            // when written), so that each step holds whole huge pages for `HugePageAlloc`.
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        }
    }
}

/// Blocks from this size up get transparent huge pages from [`HugePageAlloc`].
pub const HUGE_PAGE_BLOCK: usize = 4 << 20;

/// The size of a transparent huge page on x86-64 and most ARM64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// The system allocator, with every block of [`HUGE_PAGE_BLOCK`] bytes or more advised to
/// use transparent huge pages (`madvise(MADV_HUGEPAGE)` on the whole 2 MiB pages inside it)
/// before anything touches it. A binary opts in with
/// `#[global_allocator] static ALLOC: resblock_kernels::alloc::HugePageAlloc = HugePageAlloc;`.
///
/// Training streams activation-sized buffers (megabytes each) through every op; on 4 KiB
/// pages each pass over one crosses a page every 1024 floats, where the hardware prefetcher
/// stops and the TLB misses. Linux's default THP mode (`madvise`) gives huge pages only to
/// memory advised so. A ResNet-20 training step ran about 2% faster with glibc's own
/// equivalent (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), which a program cannot set for
/// itself once started. Only whole huge pages inside a block are advised, so no memory
/// outside the block is touched; the advice is one system call per large block. Off Linux
/// it is the system allocator.
pub struct HugePageAlloc;

/// The program break up to which [`HugePageAlloc`] has advised the main heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static ADVISED_BRK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl HugePageAlloc {
    /// Advises what the main heap grew by since the last call (glibc's `sbrk(0)` reads a
    /// cached value: no system call unless it moved).
    fn advise_heap_growth() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            use std::sync::atomic::Ordering;
            // SAFETY: `sbrk(0)` only reads the current break.
            let brk = unsafe { libc::sbrk(0) } as usize;
            let last = ADVISED_BRK.load(Ordering::Relaxed);
            if brk > last
                && ADVISED_BRK
                    .compare_exchange(last, brk, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                && last > 0
            {
                Self::advise(last as *mut u8, brk - last);
            }
        }
    }

    /// Advises the whole huge pages of `[p, p + len)`.
    fn advise(p: *mut u8, len: usize) {
        #[cfg(target_os = "linux")]
        {
            let start = (p as usize).next_multiple_of(HUGE_PAGE);
            let end = (p as usize + len) / HUGE_PAGE * HUGE_PAGE;
            if end > start {
                // SAFETY: the range lies inside a block the allocator just handed out, so it is
                // mapped and ours; MADV_HUGEPAGE changes how its pages are backed, never their
                // contents. A failure (no THP support) leaves the pages as they were.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (p, len);
    }
}

// SAFETY: every call is forwarded to `System` with its arguments; `advise` only changes how
// the pages of a returned block are backed.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { std::alloc::System.alloc(layout) };
        Self::advise_heap_growth();
        if !p.is_null() && layout.size() >= HUGE_PAGE_BLOCK {
            Self::advise(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() < HUGE_PAGE_BLOCK {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { std::alloc::System.alloc_zeroed(layout) };
        }
        // Advised before the zeroing touches the pages.
        // SAFETY: as `alloc`; the block is `layout.size()` bytes, all written with zeros.
        unsafe {
            let p = self.alloc(layout);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout, which `System` served.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded; `ptr` came from this allocator (so from `System`) with `layout`.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() && new >= HUGE_PAGE_BLOCK {
            Self::advise(p, new);
        }
        p
    }
}
