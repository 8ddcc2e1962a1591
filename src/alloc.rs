//! The process's allocator: glibc's malloc, with a small per-thread cache in front of it for
//! blocks of 1–16 KiB. glibc serves blocks up to ~1 KiB from its own per-thread cache, but
//! larger ones take its slow path (sorting the unsorted bin, consolidating fast bins, splitting
//! and coalescing chunks), and every proxied request allocates and frees three of them: the
//! request's state (3.3 KiB), the response's header map (1.2 KiB) and, often, an 8 KiB read
//! buffer. A profile of the proxy under load put glibc's slow path at ~3.4% of its CPU. Here
//! such a block goes back to a per-thread stack for its size class (512-byte steps) and is
//! taken again from there: no lock, no search. Each thread keeps at most [`DEPTH`] blocks per
//! class and [`MAX_CACHED`] bytes in all; the rest goes to glibc as before, and a thread's
//! cache is handed back to glibc when the thread ends.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;

/// Blocks above glibc's own per-thread cache (1032 bytes) and up to 16 KiB are cached.
const MIN: usize = 1025;
const MAX: usize = 16 << 10;
const STEP: usize = 512;
const CLASSES: usize = MAX / STEP;
/// Blocks kept per class and thread.
const DEPTH: usize = 16;
/// Bytes kept per thread, all classes together.
const MAX_CACHED: usize = 256 << 10;
/// Blocks of the cache are aligned for any type up to this (malloc's guarantee).
const ALIGN: usize = 16;

pub struct CachedMalloc;

struct Cache {
    blocks: [[*mut u8; DEPTH]; CLASSES],
    len: [u8; CLASSES],
    bytes: usize,
}

impl Drop for Cache {
    fn drop(&mut self) {
        for class in 0..CLASSES {
            for &block in &self.blocks[class][..self.len[class] as usize] {
                // SAFETY: every cached block came from `System.alloc` with its class's layout
                // and is owned by the cache alone.
                unsafe { System.dealloc(block, class_layout(class)) };
            }
            self.len[class] = 0;
        }
        self.bytes = 0;
    }
}

thread_local! {
    static CACHE: UnsafeCell<Cache> = const {
        UnsafeCell::new(Cache { blocks: [[std::ptr::null_mut(); DEPTH]; CLASSES], len: [0; CLASSES], bytes: 0 })
    };
}

/// The size class of `layout`, when its blocks are cached.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    (layout.align() <= ALIGN && (MIN..=MAX).contains(&size)).then(|| size.div_ceil(STEP) - 1)
}

fn class_size(class: usize) -> usize {
    (class + 1) * STEP
}

fn class_layout(class: usize) -> Layout {
    // SAFETY: a class size is a non-zero multiple of 512 far below isize::MAX, and ALIGN is a
    // power of two.
    unsafe { Layout::from_size_align_unchecked(class_size(class), ALIGN) }
}

/// A cached block of `class`, if this thread has one.
fn take(class: usize) -> Option<*mut u8> {
    CACHE
        .try_with(|cache| {
            // SAFETY: the cache belongs to this thread, and nothing below calls back into the
            // allocator, so this is the only reference to it.
            let cache = unsafe { &mut *cache.get() };
            let n = cache.len[class] as usize;
            if n == 0 {
                return None;
            }
            cache.len[class] -= 1;
            cache.bytes -= class_size(class);
            Some(cache.blocks[class][n - 1])
        })
        .ok()
        .flatten()
}

/// Keeps `block` of `class` for later; false when the cache is full (or being torn down).
fn keep(class: usize, block: *mut u8) -> bool {
    CACHE
        .try_with(|cache| {
            // SAFETY: as in `take`.
            let cache = unsafe { &mut *cache.get() };
            let n = cache.len[class] as usize;
            if n == DEPTH || cache.bytes + class_size(class) > MAX_CACHED {
                return false;
            }
            cache.blocks[class][n] = block;
            cache.len[class] += 1;
            cache.bytes += class_size(class);
            true
        })
        .unwrap_or(false)
}

// SAFETY: blocks of a cached class are allocated with the class's layout (size rounded up to the
// class size, ALIGN), so any block of the class fits any layout of the class; every other layout
// goes to `System` unchanged. A block is either in one thread's cache or in use, never both.
unsafe impl GlobalAlloc for CachedMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => match take(class) {
                Some(block) => block,
                // SAFETY: a valid non-zero layout.
                None => unsafe { System.alloc(class_layout(class)) },
            },
            // SAFETY: the caller's layout, as GlobalAlloc requires.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            // A cached block is zeroed here; a new one comes from calloc, which leaves fresh
            // pages untouched (zeroing them would make them resident: +2 KiB per idle client
            // connection, measured).
            Some(class) => match take(class) {
                Some(block) => {
                    // SAFETY: the block holds at least `layout.size()` bytes.
                    unsafe { std::ptr::write_bytes(block, 0, layout.size()) };
                    block
                }
                // SAFETY: a valid non-zero layout.
                None => unsafe { System.alloc_zeroed(class_layout(class)) },
            },
            // SAFETY: the caller's layout.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout) {
            Some(class) => {
                if !keep(class, ptr) {
                    // SAFETY: the block was allocated with its class's layout.
                    unsafe { System.dealloc(ptr, class_layout(class)) }
                }
            }
            // SAFETY: allocated by `System` with this layout.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees that `new_size` with the old alignment is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let (old_class, new_class) = (class_of(layout), class_of(new_layout));
        if old_class.is_some() && old_class == new_class {
            // The block is already its class's size.
            return ptr;
        }
        // glibc's realloc, which can grow a block in place, on what malloc gave: a cached
        // class's block has its class's size, and a block that becomes one is given it.
        let old = old_class.map_or(layout, class_layout);
        let size = new_class.map_or(new_size, class_size);
        // SAFETY: `ptr` was allocated by `System` with `old`; `size` fits the new layout.
        unsafe { System.realloc(ptr, old, size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_map_to_classes_that_fit_them() {
        let l = |size, align| Layout::from_size_align(size, align).expect("layout");
        assert_eq!(class_of(l(1024, 8)), None);
        assert_eq!(class_of(l(16385, 8)), None);
        assert_eq!(class_of(l(2048, 64)), None);
        for size in [1025, 1248, 1536, 1537, 3296, 8192, 16384] {
            let class = class_of(l(size, 16)).expect("cached");
            assert!(class_size(class) >= size && class_size(class) < size + STEP, "{size}");
        }
    }

    #[test]
    fn blocks_are_reused_and_reallocated_across_classes() {
        // Through the global allocator: a freed block of a class comes back for the next one.
        let a = vec![7u8; 2600];
        let pa = a.as_ptr();
        drop(a);
        let b = vec![9u8; 3000];
        assert_eq!(b.as_ptr(), pa, "a block of the same class is reused");
        assert!(b.iter().all(|x| *x == 9));
        // Growing out of the cached range and back keeps the contents.
        let mut v: Vec<u8> = (0..1500).map(|i| i as u8).collect();
        v.reserve_exact(20_000 - v.len());
        v.extend((1500..20_000).map(|i| i as u8));
        v.truncate(2000);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, x)| *x == i as u8));
        let z = vec![0u8; 4000];
        assert!(z.iter().all(|x| *x == 0));
        // Blocks freed on another thread are kept there, or handed back to glibc.
        let c = vec![1u8; 5000];
        std::thread::spawn(move || drop(c)).join().expect("thread");
    }
}
