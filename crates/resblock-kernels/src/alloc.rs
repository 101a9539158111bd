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

/// Zeroed blocks from this size up are fresh mappings of the kernel's zero page where it
/// offers its huge one (see `zero_map`). Smaller ones gained nothing: at 1 MiB (a residual
/// MLP block's weight gradients) the heap's zero-filled block was still in L2 when Candle's
/// add read it, and the fill's time went to the add's reads from the zero page.
pub const ZERO_MAP_BLOCK: usize = HUGE_PAGE_BLOCK;

/// The size of a transparent huge page on x86-64 and most ARM64 kernels.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
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
/// with glibc it is the system allocator.
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
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
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
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
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
        if layout.size() >= ZERO_MAP_BLOCK {
            if let Some(p) = zero_map::alloc(layout) {
                return p;
            }
        }
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
        if layout.size() >= ZERO_MAP_BLOCK && zero_map::free(ptr, layout.size()) {
            return;
        }
        // SAFETY: `ptr` came from `alloc` with this layout, which `System` served.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if layout.size() >= ZERO_MAP_BLOCK && zero_map::holds(ptr) {
            // A zero mapping moves to the heap: copied, then unmapped.
            // SAFETY: `new` is non-zero and, rounded to the alignment, fits `isize` (the
            // caller's contract); the old block is readable for `layout.size()` bytes.
            unsafe {
                let to = std::alloc::Layout::from_size_align_unchecked(new, layout.align());
                let p = self.alloc(to);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new));
                    self.dealloc(ptr, layout);
                }
                return p;
            }
        }
        // SAFETY: forwarded; `ptr` came from this allocator (so from `System`) with `layout`.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() && new >= HUGE_PAGE_BLOCK {
            Self::advise(p, new);
        }
        p
    }
}

/// Whether `ptr` is a block [`HugePageAlloc`] serves from a fresh mapping of zero pages (a
/// zeroed block of at least [`HUGE_PAGE_BLOCK`] bytes where the kernel maps its huge zero
/// page): for tests.
#[doc(hidden)]
pub fn is_zero_mapped(ptr: *const u8) -> bool {
    zero_map::holds(ptr.cast_mut())
}

/// Zeroed blocks as fresh anonymous mappings that nothing has touched.
///
/// Candle's backward starts every gradient it accumulates as `zeros_like` (a `vec![0; n]`,
/// so `alloc_zeroed`) and adds the op's gradient to it on one thread. Zero-filled on the
/// heap, that block cost a write of its size and a read back from memory: with the add,
/// half of a BatchNorm + ReLU forward + backward at 16 channels, 128 images 32x32. A fresh
/// mapping advised for huge pages reads as the kernel's huge zero page (one 2 MiB page for
/// every read, so it stays in cache) until something writes to it; written, it faults in
/// huge pages the kernel zeroes, as the heap block would have been. Only where the kernel
/// maps the huge zero page (THP `always` or `madvise`, `use_zero_page` 1): with 4 KiB zero
/// pages each page read would fault. `RESBLOCK_ZERO_PAGES=0` turns it off.
///
/// A block read before it is written (a sum accumulated into zeros) faults in 4 KiB pages
/// on its writes, the kernel splitting the huge zero page: a ResNet-50 batch-32 step bench
/// run took 51K page faults against 34K, in the same time within the noise (4.52-4.71
/// against 4.37-5.11 s per step, interleaved).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod zero_map {
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    /// The most zero mappings alive at once; past it, zeroed blocks come from the heap.
    const SLOTS: usize = 512;

    /// The addresses of the live zero mappings (0: a free slot).
    static LIVE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

    /// 0: not yet read, 1: on, 2: off.
    static STATE: AtomicU8 = AtomicU8::new(0);

    /// The mapping's length for a block of `size` bytes: whole huge pages.
    fn mapped_len(size: usize) -> usize {
        size.next_multiple_of(super::HUGE_PAGE)
    }

    /// Whether the kernel maps its huge zero page into advised memory, and the environment
    /// does not turn zero mappings off. Read without allocating (this runs inside the
    /// allocator).
    fn on() -> bool {
        match STATE.load(Ordering::Relaxed) {
            1 => return true,
            2 => return false,
            _ => {}
        }
        let read = |path: &std::ffi::CStr, buf: &mut [u8; 128]| -> usize {
            // SAFETY: `path` is NUL-terminated; `read` writes at most `buf.len()` bytes into
            // `buf`; the descriptor is closed once read.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return 0;
                }
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                libc::close(fd);
                n.max(0) as usize
            }
        };
        let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        let mut buf = [0u8; 128];
        let n = read(c"/sys/kernel/mm/transparent_hugepage/enabled", &mut buf);
        let thp = contains(&buf[..n], b"[always]") || contains(&buf[..n], b"[madvise]");
        let n = read(
            c"/sys/kernel/mm/transparent_hugepage/use_zero_page",
            &mut buf,
        );
        let zero_page = buf[..n].first() == Some(&b'1');
        // SAFETY: the name is NUL-terminated; the value is only read, at once.
        let off = unsafe {
            let v = libc::getenv(c"RESBLOCK_ZERO_PAGES".as_ptr());
            !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == b"0"
        };
        let on = thp && zero_page && !off;
        STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
        on
    }

    /// A fresh zero mapping for `layout`, huge-page aligned, or `None` (off, an alignment
    /// over a huge page, the kernel refused, or every slot taken).
    pub(super) fn alloc(layout: std::alloc::Layout) -> Option<*mut u8> {
        if layout.align() > super::HUGE_PAGE || !on() {
            return None;
        }
        let len = mapped_len(layout.size());
        let total = len + super::HUGE_PAGE;
        // SAFETY: a new private anonymous mapping; the parts outside the aligned
        // `len` bytes are unmapped again, and those bytes are advised, never touched.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            let base = p as usize;
            let start = base.next_multiple_of(super::HUGE_PAGE);
            if start > base {
                libc::munmap(p, start - base);
            }
            let tail = base + total - (start + len);
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
            super::HugePageAlloc::advise(start as *mut u8, len);
            for slot in &LIVE {
                if slot
                    .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(start as *mut u8);
                }
            }
            libc::munmap(start as *mut libc::c_void, len);
            None
        }
    }

    /// Whether `ptr` is a live zero mapping.
    pub(super) fn holds(ptr: *mut u8) -> bool {
        STATE.load(Ordering::Relaxed) == 1
            && LIVE
                .iter()
                .any(|s| s.load(Ordering::Acquire) == ptr as usize)
    }

    /// Unmaps `ptr` (a block of `size` bytes) if it is a zero mapping; false if it is not.
    pub(super) fn free(ptr: *mut u8, size: usize) -> bool {
        if STATE.load(Ordering::Relaxed) != 1 {
            return false;
        }
        for slot in &LIVE {
            if slot
                .compare_exchange(ptr as usize, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // SAFETY: `alloc` mapped `mapped_len(size)` bytes at `ptr` for this block,
                // which its owner frees now.
                unsafe { libc::munmap(ptr.cast(), mapped_len(size)) };
                return true;
            }
        }
        false
    }
}

/// Elsewhere zeroed blocks come from the heap.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod zero_map {
    pub(super) fn alloc(_layout: std::alloc::Layout) -> Option<*mut u8> {
        None
    }

    pub(super) fn holds(_ptr: *mut u8) -> bool {
        false
    }

    pub(super) fn free(_ptr: *mut u8, _size: usize) -> bool {
        false
    }
}
