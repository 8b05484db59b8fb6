//! Cooperative interruption of a running match (fazt patch, see vendor/PATCHES.md).
//!
//! A backtracking match can take exponential time (`/(a+)+$/` against `"aaaa…b"`), and
//! an embedder running untrusted patterns needs a way to stop it from another thread.
//! [`with_interrupt`] installs a flag for the calling thread; the backtracking engine
//! looks at it every [`CHECK_EVERY`] backtracks and, once it reads true, abandons the
//! match: the search reports no match, and the caller, who owns the flag, knows why.

use core::cell::Cell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Backtracks between two looks at the flag: a look costs one thread-local read and one
/// relaxed load, so this keeps the overhead unmeasurable while a runaway match still
/// notices a stop within microseconds.
pub(crate) const CHECK_EVERY: u32 = 1 << 12;

std::thread_local! {
    // The flag installed by the innermost `with_interrupt` on this thread, or null.
    static FLAG: Cell<*const AtomicBool> = const { Cell::new(core::ptr::null()) };
}

/// Runs `f` with `flag` as this thread's interrupt flag: any match run inside `f` stops
/// (reporting no match) soon after `flag` becomes true. Nested calls restore the outer
/// flag when they return, also when `f` panics.
pub fn with_interrupt<R>(flag: &AtomicBool, f: impl FnOnce() -> R) -> R {
    struct Restore(*const AtomicBool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FLAG.with(|c| c.set(self.0));
        }
    }
    let previous = FLAG.with(|c| c.replace(flag as *const AtomicBool));
    let _restore = Restore(previous);
    f()
}

/// Whether the flag installed on this thread (if any) reads true.
pub(crate) fn interrupted() -> bool {
    FLAG.with(|c| {
        let p = c.get();
        // SAFETY: a non-null pointer was installed by `with_interrupt` from a reference
        // that outlives the closure it runs, and is removed before that call returns.
        !p.is_null() && unsafe { (*p).load(Ordering::Relaxed) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Regex;
    use std::string::String;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn catastrophic_backtracking_stops_when_the_flag_is_set() {
        let re = Regex::new(r"(a+)+$").expect("valid pattern");
        let mut text = String::from("a").repeat(40);
        text.push('b');
        let flag = Arc::new(AtomicBool::new(false));
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                flag.store(true, Ordering::Relaxed);
            })
        };
        let start = Instant::now();
        let found = with_interrupt(&flag, || re.find(&text).is_some());
        let took = start.elapsed();
        setter.join().expect("setter thread");
        assert!(!found);
        // Without the patch this match runs for hours.
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }

    #[test]
    fn utf16_search_stops_too() {
        let re = Regex::new(r"(x+x+)+y").expect("valid pattern");
        let text: std::vec::Vec<u16> = "x".repeat(5000).encode_utf16().collect();
        let flag = AtomicBool::new(true);
        let start = Instant::now();
        let found = with_interrupt(&flag, || re.find_from_utf16(&text, 0).next().is_some());
        assert!(!found);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn ordinary_matches_are_unaffected_and_the_flag_is_scoped() {
        let re = Regex::new(r"(\d+)-(\d+)").expect("valid pattern");
        let flag = AtomicBool::new(false);
        let m = with_interrupt(&flag, || re.find("tel 12-34"));
        assert_eq!(m.map(|m| m.range()), Some(4..9));
        let set = AtomicBool::new(true);
        with_interrupt(&set, || {});
        // The set flag was uninstalled when its closure returned.
        assert!(!interrupted());
        assert!(re.find("12-34").is_some());
    }
}
