//! Holding the writers of a mapping in this process (a migration's freeze by
//! write-protection, done by the client library where the agent cannot hold them: the
//! uffd-wp-async tracker, whose write faults the kernel resolves by itself, and the
//! mprotect tracker, which runs here).
//!
//! [`Hold::new`] registers the range as held, then makes it `PROT_READ`: the next store
//! of any thread faults, and the SIGSEGV handler parks that thread on a futex until
//! [`Hold::release`]. Reads go on. When `Hold::new` returns, no store can land any more
//! (mprotect returns after the TLB shootdown). A system call that writes into a held
//! range (`read(2)` into it, say) fails with EFAULT instead of waiting.
//!
//! The handler does only async-signal-safe work (atomic loads, `futex(2)`); a fault
//! outside every held range goes to the handler installed before ours.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::sigsegv::SegvHandler;

/// Held ranges at once, per process.
pub const MAX_HOLDS: usize = 64;

struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    /// 1 while held (the futex word parked threads wait on).
    held: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    held: AtomicU32::new(0),
};

static SLOTS: [Slot; MAX_HOLDS] = [EMPTY; MAX_HOLDS];
/// Slots in use: the mprotect tracker asks [`is_held`] on every write fault, and almost
/// always nothing is held.
static IN_USE: AtomicUsize = AtomicUsize::new(0);
static REGISTER: Mutex<()> = Mutex::new(());
static CHAIN: SegvHandler = SegvHandler::new();

fn slot_of(addr: usize) -> Option<&'static Slot> {
    if IN_USE.load(Ordering::Acquire) == 0 {
        return None;
    }
    SLOTS.iter().find(|s| {
        let (base, len) = (
            s.base.load(Ordering::Acquire),
            s.len.load(Ordering::Acquire),
        );
        len != 0 && addr >= base && addr < base + len && s.held.load(Ordering::Acquire) == 1
    })
}

/// Whether `addr` lies in a held range (async-signal-safe).
pub(crate) fn is_held(addr: usize) -> bool {
    slot_of(addr).is_some()
}

/// Parks the calling thread while `addr` lies in a held range (async-signal-safe: for
/// a SIGSEGV handler). Returns at once when it does not.
pub(crate) fn park(addr: usize) {
    while let Some(s) = slot_of(addr) {
        // The timeout only bounds a missed wake-up; release wakes every waiter.
        super::futex_wait(&s.held, 1, Duration::from_millis(200));
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; we restore what the interrupted code saw.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if is_held(addr) {
        // Parked until released; then the store is retried (and faults again into
        // whichever handler owns the range now, or lands).
        park(addr);
    } else {
        CHAIN.chain(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// A held range; [`release`](Self::release) lets its writers go (dropping it does too,
/// making the range writable again).
pub struct Hold {
    slot: usize,
    base: usize,
    len: usize,
}

impl Hold {
    /// Holds every writer of `[base, base+len)` (page-aligned, mapped read-write in this
    /// process) from now on.
    pub fn new(base: *mut u8, len: usize) -> std::io::Result<Hold> {
        let page = super::uffd::page_size() as usize;
        if base.is_null() || (base as usize) % page != 0 || len == 0 || len % page != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a held range must be page-aligned and non-empty",
            ));
        }
        CHAIN.install(handler)?;
        let slot = {
            let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
            let slot = SLOTS
                .iter()
                .position(|s| s.len.load(Ordering::Acquire) == 0)
                .ok_or_else(|| std::io::Error::other("too many held ranges in this process"))?;
            let s = &SLOTS[slot];
            s.base.store(base as usize, Ordering::Release);
            s.held.store(1, Ordering::Release);
            s.len.store(len, Ordering::Release);
            IN_USE.fetch_add(1, Ordering::AcqRel);
            slot
        };
        let h = Hold {
            slot,
            base: base as usize,
            len,
        };
        // Registered first: a store that faults from here on parks.
        // SAFETY: inside the caller's mapping.
        if unsafe { libc::mprotect(base as *mut libc::c_void, len, libc::PROT_READ) } != 0 {
            let e = std::io::Error::last_os_error();
            h.release(false);
            return Err(e);
        }
        Ok(h)
    }

    /// Lets the held writers go. With `writable`, the range becomes read-write first (a
    /// range nothing else protects); without, it stays `PROT_READ` and a released
    /// store faults again into the handler that protected it before the hold (the
    /// mprotect tracker, which marks and opens its granule).
    pub fn release(self, writable: bool) {
        let h = std::mem::ManuallyDrop::new(self);
        h.undo(writable);
    }

    fn undo(&self, writable: bool) {
        if writable {
            // SAFETY: inside the caller's mapping.
            unsafe {
                libc::mprotect(
                    self.base as *mut libc::c_void,
                    self.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
        }
        let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        let s = &SLOTS[self.slot];
        s.held.store(0, Ordering::Release);
        super::futex_wake(&s.held);
        s.len.store(0, Ordering::Release);
        IN_USE.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.undo(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A writer that stores into a held page waits until the release, then its store
    /// lands; reads go on meanwhile; an unheld mapping is not affected.
    #[test]
    fn a_held_writer_waits_for_the_release() {
        let page = crate::fault::uffd::page_size() as usize;
        let m = memmap2::MmapMut::map_anon(4 * page).unwrap();
        let other = memmap2::MmapMut::map_anon(page).unwrap();
        let p = m.as_ptr() as usize;
        let h = Hold::new(p as *mut u8, 4 * page).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let w = std::thread::spawn(move || {
            // SAFETY: inside the live mapping `m`, which outlives the thread (joined).
            unsafe { std::ptr::write_volatile((p + page + 5) as *mut u8, 42) };
            d.store(true, Ordering::Release);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!done.load(Ordering::Acquire), "the store landed while held");
        // SAFETY: as above; reads are not held.
        assert_eq!(
            unsafe { std::ptr::read_volatile((p + page + 5) as *const u8) },
            0
        );
        // SAFETY: a mapping nobody holds.
        unsafe { std::ptr::write_volatile(other.as_ptr() as *mut u8, 1) };
        h.release(true);
        w.join().unwrap();
        assert!(done.load(Ordering::Acquire));
        // SAFETY: as above.
        assert_eq!(
            unsafe { std::ptr::read_volatile((p + page + 5) as *const u8) },
            42
        );
        // Writable again, no handler involved.
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p as *mut u8, 7) };
    }
}
