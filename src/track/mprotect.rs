//! The portable tracker: `mprotect(PROT_READ)` and a SIGSEGV handler, in the process
//! that writes the mapping (the client library runs it; the agent asks it to collect).
//!
//! The first write to a protected granule faults; the handler (async-signal-safe: atomic
//! operations, one `mprotect(2)`) sets the granule's bit in a bitmap and makes it
//! writable. [`MprotectTracker::collect`] takes the bits and protects the granules it
//! took. Handler and collector hold a per-region spin lock (never held by a thread that
//! writes the region, so a handler cannot interrupt its own holder): the faulting store
//! lands only after its bit is set, so a `collect` that starts after the write returns
//! it, and no handler can open a granule between a collect's take and protect.
//!
//! **Granules, not pages.** Protection changes split VMAs; page-granular protection of a
//! 1 GiB region written in random order makes tens of thousands of VMAs and `mprotect`
//! fails with ENOMEM past `vm.max_map_count` (65530 by default). The granule is the page
//! size or, for large regions, `len / 16384` rounded up to a power of two (64 KiB for
//! 1 GiB), so a region never has more than ~16k VMAs, and `collect` protects runs of
//! granules in one call (neighbours merge back). If `mprotect` still fails in the handler
//! (the process made many mappings of its own), the handler opens the whole region and
//! flags it: the next `collect` reports the whole region and protects it again, so
//! nothing is lost, only over-reported.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::fault::sigsegv::SegvHandler;

use super::{DirtyTracker, Ranges, TrackError};

/// Tracked mappings at once, per process.
pub const MAX_SLOTS: usize = 64;
/// Granules per region at most (bounds the VMA count a region can make).
pub const MAX_GRANULES: usize = 16384;

struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    shift: AtomicU32,
    bits: AtomicPtr<AtomicU64>,
    overflow: AtomicPtr<AtomicBool>,
    /// Handlers running on this slot (the tracker waits for zero before freeing).
    busy: AtomicUsize,
    /// Spin lock: a handler around mark + unprotect, `collect` around take + protect.
    lock: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    shift: AtomicU32::new(0),
    bits: AtomicPtr::new(std::ptr::null_mut()),
    overflow: AtomicPtr::new(std::ptr::null_mut()),
    busy: AtomicUsize::new(0),
    lock: AtomicBool::new(false),
};

fn spin_lock(l: &AtomicBool) {
    while l
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        // SAFETY: sched_yield is async-signal-safe and has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

fn spin_unlock(l: &AtomicBool) {
    l.store(false, Ordering::Release);
}

static SLOTS: [Slot; MAX_SLOTS] = [EMPTY; MAX_SLOTS];
static REGISTER: Mutex<()> = Mutex::new(());
static CHAIN: SegvHandler = SegvHandler::new();

fn install() -> Result<(), TrackError> {
    CHAIN.install(handler).map_err(|source| TrackError::Setup {
        what: "installing the SIGSEGV handler",
        source,
    })
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; we restore what the interrupted code saw.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut handled = false;
    for s in SLOTS.iter() {
        let (len, base) = (
            s.len.load(Ordering::Acquire),
            s.base.load(Ordering::Acquire),
        );
        if len == 0 || addr < base || addr >= base + len {
            continue;
        }
        // Announce ourselves, then look again: a tracker being dropped opened the
        // region before leaving the slot, so if it left, retrying the access succeeds.
        s.busy.fetch_add(1, Ordering::AcqRel);
        if s.len.load(Ordering::Acquire) == len && s.base.load(Ordering::Acquire) == base {
            mark(s, base, len, addr);
        }
        s.busy.fetch_sub(1, Ordering::AcqRel);
        handled = true;
        break;
    }
    if !handled {
        CHAIN.chain(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Marks the granule at `addr`, then opens it, under the slot's lock.
fn mark(s: &Slot, base: usize, len: usize, addr: usize) {
    let shift = s.shift.load(Ordering::Acquire);
    let g = (addr - base) >> shift;
    let start = base + (g << shift);
    let glen = (1usize << shift).min(base + len - start);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    spin_lock(&s.lock);
    if crate::fault::hold::is_held(addr) {
        // Frozen for a migration (checked under the lock `freeze` takes): the store
        // must not land. Wait for the thaw; the retried store faults again.
        spin_unlock(&s.lock);
        crate::fault::hold::park(addr);
        return;
    }
    let bits = s.bits.load(Ordering::Acquire);
    // SAFETY: `bits` has one bit per granule and lives until `busy` drops to zero after
    // the slot is cleared; mprotect is async-signal-safe and the range lies in the
    // registered mapping.
    unsafe {
        (*bits.add(g / 64)).fetch_or(1 << (g % 64), Ordering::AcqRel);
        if libc::mprotect(start as *mut libc::c_void, glen, rw) != 0 {
            // Out of VMAs (or memory): flag it and open the whole region (one VMA).
            (*s.overflow.load(Ordering::Acquire)).store(true, Ordering::Release);
            libc::mprotect(base as *mut libc::c_void, len, rw);
        }
    }
    spin_unlock(&s.lock);
}

/// Tracks writes to `[base, base+len)` of this process (see the module docs).
pub struct MprotectTracker {
    slot: usize,
    base: usize,
    len: usize,
    shift: u32,
    granules: usize,
    bits: Box<[AtomicU64]>,
    overflow: Box<AtomicBool>,
    /// Writers held for a migration's freeze ([`DirtyTracker::freeze`]).
    hold: Option<crate::fault::hold::Hold>,
}

// SAFETY: the raw address is only passed to mprotect; the bitmap is atomic.
unsafe impl Send for MprotectTracker {}

/// The granule for a region of `len` bytes: the page size, or `len / MAX_GRANULES`
/// rounded up to a power of two.
pub fn granule_for(len: usize, page: usize) -> usize {
    page.max(len.div_ceil(MAX_GRANULES).next_power_of_two())
}

impl MprotectTracker {
    /// Protects `[base, base+len)` (page-aligned, mapped read-write) and starts
    /// tracking; `granule` (a power of two, at least a page) overrides the default.
    pub fn new(base: *mut u8, len: usize, granule: Option<usize>) -> Result<Self, TrackError> {
        let page = crate::fault::uffd::page_size() as usize;
        let g = granule.unwrap_or_else(|| granule_for(len, page));
        let bad = |m: &str| TrackError::Setup {
            what: "mprotect tracker",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string()),
        };
        if base.is_null() || (base as usize) % page != 0 || len == 0 || len % page != 0 {
            return Err(bad("the range must be page-aligned and non-empty"));
        }
        if !g.is_power_of_two() || g < page {
            return Err(bad("the granule must be a power of two of at least a page"));
        }
        install()?;
        let granules = len.div_ceil(g);
        let bits: Box<[AtomicU64]> = (0..granules.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let overflow = Box::new(AtomicBool::new(false));
        let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        let slot = SLOTS
            .iter()
            .position(|s| s.len.load(Ordering::Acquire) == 0)
            .ok_or_else(|| bad("too many tracked mappings in this process"))?;
        let s = &SLOTS[slot];
        s.base.store(base as usize, Ordering::Release);
        s.shift.store(g.trailing_zeros(), Ordering::Release);
        s.bits
            .store(bits.as_ptr() as *mut AtomicU64, Ordering::Release);
        s.overflow.store(
            &*overflow as *const AtomicBool as *mut AtomicBool,
            Ordering::Release,
        );
        s.len.store(len, Ordering::Release);
        let t = MprotectTracker {
            slot,
            base: base as usize,
            len,
            shift: g.trailing_zeros(),
            granules,
            bits,
            overflow,
            hold: None,
        };
        // Protect only once the handler knows the range.
        t.protect(0, granules).map_err(|source| TrackError::Setup {
            what: "mprotect(PROT_READ)",
            source,
        })?;
        Ok(t)
    }

    /// The protection granule in bytes.
    pub fn granule(&self) -> usize {
        1 << self.shift
    }

    /// Protects granules `[first, first+n)`.
    fn protect(&self, first: usize, n: usize) -> std::io::Result<()> {
        let start = self.base + (first << self.shift);
        let len = (n << self.shift).min(self.base + self.len - start);
        // SAFETY: inside our mapping.
        if unsafe { libc::mprotect(start as *mut libc::c_void, len, libc::PROT_READ) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl DirtyTracker for MprotectTracker {
    fn name(&self) -> &'static str {
        "mprotect"
    }

    fn collect(&mut self) -> Result<Ranges, TrackError> {
        let lock = &SLOTS[self.slot].lock;
        spin_lock(lock);
        let r = self.take_and_protect();
        spin_unlock(lock);
        r
    }

    fn can_freeze(&self) -> bool {
        true
    }

    /// Holds the writers in the SIGSEGV handler ([`crate::fault::hold`]): taken under
    /// the slot's lock, so no handler opens a granule after it; granules open before it
    /// are protected again and keep their marks.
    fn freeze(&mut self) -> Result<(), TrackError> {
        if self.hold.is_some() {
            return Ok(());
        }
        let lock = &SLOTS[self.slot].lock;
        spin_lock(lock);
        let h = crate::fault::hold::Hold::new(self.base as *mut u8, self.len);
        spin_unlock(lock);
        self.hold = Some(h.map_err(|source| TrackError::Setup {
            what: "holding the writers (mprotect)",
            source,
        })?);
        Ok(())
    }

    /// The region stays protected: released stores fault again and are tracked.
    fn thaw(&mut self) -> Result<(), TrackError> {
        if let Some(h) = self.hold.take() {
            h.release(false);
        }
        Ok(())
    }
}

impl MprotectTracker {
    /// `collect` with the slot's lock held.
    fn take_and_protect(&self) -> Result<Ranges, TrackError> {
        let collect_err = |source| TrackError::Collect {
            what: "mprotect(PROT_READ)",
            source,
        };
        if self.overflow.swap(false, Ordering::AcqRel) {
            // The whole region is reported and protected again.
            for w in self.bits.iter() {
                w.store(0, Ordering::Release);
            }
            self.protect(0, self.granules).map_err(collect_err)?;
            return Ok(std::iter::once(0..self.len as u64).collect());
        }
        let runs = super::take_runs(&self.bits);
        let mut out = Vec::with_capacity(runs.len());
        for (first, n) in runs {
            self.protect(first, n).map_err(collect_err)?;
            let a = (first << self.shift) as u64;
            out.push(a..((first + n) << self.shift).min(self.len) as u64);
        }
        Ok(out)
    }
}

impl Drop for MprotectTracker {
    fn drop(&mut self) {
        // Open the region first (no new faults), then leave the slot, then wait for
        // handlers still reading our bitmap.
        // SAFETY: inside our mapping.
        unsafe {
            libc::mprotect(
                self.base as *mut libc::c_void,
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        // Writers still held (a migration that moved the region away) go on now, into
        // the writable region, as when a uffd tracker's descriptor closes.
        if let Some(h) = self.hold.take() {
            h.release(false);
        }
        let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        let s = &SLOTS[self.slot];
        s.len.store(0, Ordering::Release);
        while s.busy.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        s.bits.store(std::ptr::null_mut(), Ordering::Release);
        s.overflow.store(std::ptr::null_mut(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn write(p: *mut u8, off: usize, b: u8) {
        // SAFETY: callers stay inside their mapping.
        unsafe { std::ptr::write_volatile(p.add(off), b) }
    }

    #[test]
    fn reports_written_granules_and_reprotects() {
        let page = crate::fault::uffd::page_size() as usize;
        let m = memmap2::MmapMut::map_anon(64 * page).unwrap();
        let p = m.as_ptr() as *mut u8;
        let mut t = MprotectTracker::new(p, m.len(), None).unwrap();
        assert_eq!(t.granule(), page);
        assert_eq!(t.collect().unwrap(), vec![]);
        write(p, 5 * page + 7, 1);
        write(p, 6 * page, 2);
        write(p, 40 * page + 1, 3);
        let pg = page as u64;
        assert_eq!(t.collect().unwrap(), vec![5 * pg..7 * pg, 40 * pg..41 * pg]);
        assert_eq!(t.collect().unwrap(), vec![]);
        write(p, 40 * page + 2, 4);
        assert_eq!(t.collect().unwrap(), vec![40 * pg..41 * pg]);
        drop(t);
        write(p, 0, 9); // writable again, no handler
    }

    /// A freeze holds a writer at its next store (reads go on); what was written before
    /// it is still reported; after the thaw the held store lands and is reported.
    #[test]
    fn freeze_holds_writers_until_thaw() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let page = crate::fault::uffd::page_size() as usize;
        let m = memmap2::MmapMut::map_anon(16 * page).unwrap();
        let p = m.as_ptr() as *mut u8;
        let mut t = MprotectTracker::new(p, m.len(), None).unwrap();
        assert!(t.can_freeze());
        write(p, 2 * page, 1); // opens granule 2
        t.freeze().unwrap();
        let addr = p as usize;
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let w = std::thread::spawn(move || {
            // Granule 2 is open no more, granule 9 never was: both are held.
            write(addr as *mut u8, 2 * page + 1, 2);
            write(addr as *mut u8, 9 * page, 3);
            d.store(true, Ordering::Release);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!done.load(Ordering::Acquire), "a store landed while frozen");
        // SAFETY: inside the mapping; reads are not held.
        assert_eq!(unsafe { std::ptr::read_volatile(p.add(2 * page + 1)) }, 0);
        let pg = page as u64;
        assert_eq!(t.collect().unwrap(), vec![2 * pg..3 * pg]);
        assert!(
            !done.load(Ordering::Acquire),
            "collect let a held store through"
        );
        t.thaw().unwrap();
        w.join().unwrap();
        assert_eq!(t.collect().unwrap(), vec![2 * pg..3 * pg, 9 * pg..10 * pg]);
        // Frozen again, then dropped (the region moved away): the writer goes on.
        t.freeze().unwrap();
        let w = std::thread::spawn(move || write(addr as *mut u8, 5 * page, 4));
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(t);
        w.join().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile(p.add(5 * page)) }, 4);
    }

    /// 1 GiB written at random pages: page-granular protection would pass
    /// vm.max_map_count; the coarse granule keeps the VMA count bounded and every
    /// written page is reported.
    #[test]
    fn one_gib_random_writes_stay_under_the_map_count() {
        let len = 1usize << 30;
        let page = crate::fault::uffd::page_size() as usize;
        let m = memmap2::MmapOptions::new().len(len).map_anon().unwrap();
        let p = m.as_ptr() as *mut u8;
        let mut t = MprotectTracker::new(p, len, None).unwrap();
        assert_eq!(t.granule(), 64 << 10);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut written = std::collections::BTreeSet::new();
        for round in 0..3 {
            for _ in 0..40_000 {
                let pg = rng.gen_range(0..len / page);
                write(p, pg * page + 3, round as u8 + 1);
                written.insert(pg);
            }
            let maps = std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .count();
            assert!(maps < 40_000, "{maps} mappings");
            let got = t.collect().unwrap();
            for &pg in &written {
                let off = (pg * page) as u64;
                assert!(
                    got.iter().any(|r| r.start <= off && off < r.end),
                    "page {pg} written but not reported"
                );
            }
            written.clear();
        }
    }
}
