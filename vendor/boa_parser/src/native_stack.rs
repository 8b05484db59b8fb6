//! How much native stack the running thread has left (fazt patch, see vendor/PATCHES.md).
//!
//! The parser, the compiler and several builtins recurse on the native stack as deep as
//! their input nests, so untrusted input (a 20,000-deep literal, `!!!!…x`, `f()()()…`)
//! could overflow it and abort the process. Recursive places check [`low`] and fail
//! with an error instead. The stack bounds come from `pthread_getattr_np` once per thread;
//! where they cannot be read, the check never fires (the previous behaviour).

use std::cell::Cell;

std::thread_local! {
    // (lowest usable address, stack size) of this thread's stack; (0, 0) until read,
    // (1, 0) when unknown.
    static BOUNDS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Stack that must stay free at every check: what the code between two checks may use.
/// Between checks run at most: one parser production chain, one regex compilation
/// (regress caps its nesting at 256), a bounded JSON conversion step, or the entry of a
/// native function. A quarter of the stack caps it for small (test) threads.
pub const MARGIN: usize = 512 * 1024;

/// Bytes of native stack left below the current frame, or `usize::MAX` if unknown.
#[must_use]
#[inline(never)]
pub fn remaining() -> usize {
    let here = 0u8;
    let sp: *const u8 = std::hint::black_box(&here);
    let sp = sp as usize;
    let (low, _) = bounds();
    if low <= 1 {
        return usize::MAX;
    }
    sp.saturating_sub(low)
}

/// Whether the stack is too low to start more recursion: less than [`MARGIN`] (or a
/// quarter of the thread's stack, whichever is smaller) is left.
#[must_use]
#[inline]
pub fn low() -> bool {
    let left = remaining();
    if left == usize::MAX {
        return false;
    }
    let (_, size) = bounds();
    left < MARGIN.min(size / 4)
}

fn bounds() -> (usize, usize) {
    BOUNDS.with(|b| {
        let v = b.get();
        if v.0 != 0 {
            return v;
        }
        let v = read_bounds().unwrap_or((1, 0));
        b.set(v);
        v
    })
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn read_bounds() -> Option<(usize, usize)> {
    // SAFETY: `attr` is initialised by pthread_getattr_np before it is read and
    // destroyed once; the out-pointers are valid locals.
    unsafe {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let r = libc::pthread_attr_getstack(attr.as_ptr(), &raw mut addr, &raw mut size);
        let mut guard: libc::size_t = 0;
        let g = libc::pthread_attr_getguardsize(attr.as_ptr(), &raw mut guard);
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        if r != 0 || addr.is_null() {
            return None;
        }
        // The guard page may be reported inside the range: never count it as usable.
        let guard = if g == 0 { guard } else { 0 };
        Some((addr as usize + guard, size.saturating_sub(guard)))
    }
}

#[cfg(not(target_os = "linux"))]
fn read_bounds() -> Option<(usize, usize)> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn remaining_shrinks_with_depth() {
        fn down(n: usize) -> usize {
            let pad = [0u8; 1024];
            std::hint::black_box(&pad);
            if n == 0 { super::remaining() } else { down(n - 1) }
        }
        let top = super::remaining();
        assert!(top != usize::MAX && top > 0);
        let deep = down(100);
        assert!(deep < top && top - deep >= 100 * 1024, "{top} {deep}");
        assert!(!super::low());
    }
}
