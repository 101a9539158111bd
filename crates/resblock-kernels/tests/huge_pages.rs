//! `alloc::HugePageAlloc` as this test binary's global allocator: blocks keep their contents
//! through `alloc`, `alloc_zeroed` and `realloc`, and a large block's memory is advised for
//! transparent huge pages where the kernel offers them (its own test binary: the allocator
//! is the whole process's). Large zeroed blocks are fresh zero-page mappings where the kernel
//! maps its huge zero page, and behave as any other block.

use resblock_kernels::alloc::{is_zero_mapped, HugePageAlloc, HUGE_PAGE_BLOCK, ZERO_MAP_BLOCK};

#[global_allocator]
static ALLOC: HugePageAlloc = HugePageAlloc;

/// Whether the kernel gives huge pages to advised memory (THP mode `always` or `madvise`).
fn thp_offered() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

/// Whether the kernel maps its huge zero page into advised memory that is only read.
fn huge_zero_page() -> bool {
    thp_offered()
        && std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/use_zero_page")
            .is_ok_and(|s| s.trim() == "1")
}

/// The `THPeligible` flag of the mapping that holds `addr`, from `/proc/self/smaps`.
fn thp_eligible(addr: usize) -> Option<bool> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("THPeligible:") {
                return Some(v.trim() == "1");
            }
        }
    }
    None
}

#[test]
fn large_blocks_keep_their_contents_and_get_huge_pages() {
    let len = 4 * HUGE_PAGE_BLOCK / 4; // f32s: a 4x-threshold block
    let mut v: Vec<f32> = (0..len).map(|i| i as f32).collect();
    assert!(v.iter().enumerate().all(|(i, x)| *x == i as f32));
    let zeros = vec![0f32; len];
    assert!(zeros.iter().all(|x| *x == 0.0), "alloc_zeroed");
    // Grown by realloc, the old values stay.
    v.reserve_exact(len);
    v.extend((0..len).map(|i| -(i as f32)));
    assert!(v[..len].iter().enumerate().all(|(i, x)| *x == i as f32));
    assert!(v[len..].iter().enumerate().all(|(i, x)| *x == -(i as f32)));
    let small: Vec<u8> = vec![7; 1000];
    assert!(small.iter().all(|x| *x == 7));
    // Under user-mode QEMU (`cargo xtask aarch64`) /proc/self/smaps describes the emulator,
    // whose addresses are not the guest's.
    let emulated = std::env::var_os("RESBLOCK_UNDER_QEMU").is_some();
    if cfg!(target_os = "linux") && thp_offered() && !emulated {
        // The middle of a large block lies in a whole advised huge page.
        let mid = v.as_ptr() as usize + v.len() * 2;
        assert_eq!(
            thp_eligible(mid),
            Some(true),
            "a large block is not THP-eligible"
        );
        let mid = zeros.as_ptr() as usize + zeros.len() * 2;
        assert_eq!(
            thp_eligible(mid),
            Some(true),
            "a zeroed block is not THP-eligible"
        );
    }
}

#[test]
fn large_zeroed_blocks_are_zero_mappings_that_read_write_grow_and_free() {
    let len = 3 * ZERO_MAP_BLOCK / 4 + 5; // f32s: not a whole number of huge pages
    let mut z = vec![0f32; len];
    // Under user-mode QEMU (`cargo xtask aarch64`) the guest reads the host's THP settings
    // but its mappings are the emulator's: whether a block is mapped is not checked there.
    let emulated = std::env::var_os("RESBLOCK_UNDER_QEMU").is_some();
    let expected = cfg!(all(target_os = "linux", target_env = "gnu"))
        && huge_zero_page()
        && std::env::var_os("RESBLOCK_ZERO_PAGES").is_none_or(|v| v != "0");
    let check = |p: *const u8| {
        if !emulated {
            assert_eq!(is_zero_mapped(p), expected);
        }
    };
    check(z.as_ptr().cast());
    assert!(z.iter().all(|x| *x == 0.0), "a zero mapping reads zeros");
    // Written, it holds what was written (the pages fault in as the writes reach them).
    for (i, x) in z.iter_mut().enumerate().step_by(1000) {
        *x = i as f32;
    }
    assert!(z
        .iter()
        .enumerate()
        .all(|(i, x)| *x == if i % 1000 == 0 { i as f32 } else { 0.0 }));
    // Grown by realloc, it moves to the heap with its values.
    z.extend(std::iter::repeat_n(-1f32, len));
    assert!(!is_zero_mapped(z.as_ptr().cast()));
    assert!(z[..len]
        .iter()
        .enumerate()
        .all(|(i, x)| *x == if i % 1000 == 0 { i as f32 } else { 0.0 }));
    assert!(z[len..].iter().all(|x| *x == -1.0));
    // Blocks freed and allocated again many times (more than there are slots for live
    // mappings) stay zero and come back as mappings.
    for round in 0..600 {
        let mut b = vec![0u8; ZERO_MAP_BLOCK];
        check(b.as_ptr());
        assert!(b[round * 7 % ZERO_MAP_BLOCK] == 0 && b[ZERO_MAP_BLOCK - 1] == 0);
        b[round] = 1;
    }
    // Below the threshold, zeroed blocks come from the heap.
    let small = vec![0f32; ZERO_MAP_BLOCK / 8];
    assert!(!is_zero_mapped(small.as_ptr().cast()));
    assert!(small.iter().all(|x| *x == 0.0));
}
