//! The allocation limit of fuzzing runs. libFuzzer's own (`-malloc_limit_mb`) needs a
//! sanitizer's allocator hooks, which a build without a sanitizer (stable toolchain)
//! lacks; this wrapper of the system allocator does the same job in a few lines.
//! Active only under `cfg(fuzzing)`: tests and programs keep the plain allocator.

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation a decoder may make for one input. Ferry's biggest frame is
/// 64 KiB and its biggest file 64 MiB; fuzz inputs are far smaller than either, so an
/// allocation this large can only come from trusting a length field.
pub const MAX_ALLOCATION: usize = 64 << 20;

pub struct Guard;

// SAFETY: forwards to the system allocator unchanged; only refuses to be asked for
// more than MAX_ALLOCATION, by aborting (which libFuzzer reports as a crash with the
// input that caused it).
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // No allocation here: formatting could recurse into the allocator.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"ferry-fuzz: a single allocation above MAX_ALLOCATION (64 MiB)\n",
        );
        std::process::abort();
    }
}

#[cfg(fuzzing)]
#[global_allocator]
static GUARD: Guard = Guard;
