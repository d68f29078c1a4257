//! The process allocator: mimalloc, asked for a plain block whenever a layout needs no more
//! alignment than every mimalloc block has.
//!
//! `mimalloc::MiMalloc` passes every request to `mi_malloc_aligned`, whose fast path covers
//! only small blocks (up to 1 KiB) that happen to sit at the right alignment; anything else,
//! every larger buffer included, takes its generic aligned path. Under callgrind that was ~100
//! instructions per allocation of the batch-ingest path, where `mi_malloc` takes ~20.
//!
//! Invariant: a block is requested from the aligned API exactly when the layout asks for more
//! than a machine word of alignment. Every mimalloc block is word-aligned (block sizes are
//! whole words and pages start aligned), so a plain `mi_malloc` block satisfies any layout
//! aligned to a word or less. Blocks of either kind are freed with `mi_free`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// Alignment every mimalloc block has.
const BLOCK_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator (see the module docs).
pub struct Allocator;

/// Whether a plain mimalloc block serves `layout` (the module invariant): it asks for no more
/// alignment than every block has.
#[inline]
fn plain(layout: &Layout) -> bool {
    layout.align() <= BLOCK_ALIGN
}

// SAFETY: every pointer returned comes from mimalloc for at least `layout.size()` bytes at
// `layout.align()` (the module invariant), or is null on failure; `dealloc` and `realloc` only
// receive pointers this allocator returned, which mimalloc frees or resizes whatever API
// allocated them.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain C calls; the size is nonzero as `GlobalAlloc` requires of callers.
        unsafe {
            if plain(&layout) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if plain(&layout) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the new block keeps its
        // alignment by the same rule as `alloc`.
        unsafe {
            if plain(&layout) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::Allocator;

    /// Blocks of every size class up to a few pages, at every alignment up to a page, come
    /// back aligned, writable, and keep their bytes through growth.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1..=64).chain([100, 1000, 1024, 1025, 5000, 70_000]) {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: nonzero sizes; each block is written within its size, grown with
                // its own layout, and freed once.
                unsafe {
                    let p = Allocator.alloc(layout);
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{size} @ {align}"
                    );
                    p.write_bytes(0xA5, size);
                    let q = Allocator.realloc(p, layout, size * 3);
                    assert!(
                        !q.is_null() && (q as usize).is_multiple_of(align),
                        "grown {size} @ {align}"
                    );
                    assert!((0..size).all(|i| *q.add(i) == 0xA5), "{size} @ {align}");
                    Allocator.dealloc(q, Layout::from_size_align(size * 3, align).expect("l"));
                    let z = Allocator.alloc_zeroed(layout);
                    assert!(
                        (z as usize).is_multiple_of(align) && (0..size).all(|i| *z.add(i) == 0)
                    );
                    Allocator.dealloc(z, layout);
                }
            }
        }
    }
}
