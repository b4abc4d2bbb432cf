//! userfaultfd write-protect trackers for a mapping of the application that wrote it.
//!
//! **Async** (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+): the kernel resolves a write to a
//! protected page by itself (no message, no signal, ~1 µs) and clears the page's
//! uffd-wp bit. [`UffdWpAsync::collect`] issues one `PAGEMAP_SCAN` ioctl on the
//! application's `/proc/PID/pagemap` with `PM_SCAN_WP_MATCHING`: it lists the pages whose
//! bit is clear (`PAGE_IS_WRITTEN`) and sets it again in the same walk, page-table lock
//! held, so a write is either in this answer or faults into the next.
//!
//! **Sync** (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`): the first write to a protected page
//! stops the writing thread and sends a message; a thread here marks the page, then
//! removes the protection (which wakes the writer). `collect` takes the marks and
//! protects those pages again. The two hold one lock, so the writer's store lands only
//! after its mark is set (a `collect` that starts after the write returns it) and a
//! late unprotect for a message queued before a `collect` cannot leave a page writable
//! without a mark.
//!
//! Only the sync tracker can **freeze** the writers (a migration's freeze by
//! write-protection): under the lock it sets `frozen` and protects the pages marked since
//! the last collect (the only writable ones: every other page is protected since the
//! registration or the collect that took its mark); from then on the fault thread marks a faulting page but *holds* the fault (keeps the page
//! protected, parks its address) instead of resolving it, so every writing thread stops
//! at its next store to a protected page. `thaw` unprotects the parked pages, which wakes
//! their writers. Dropping the tracker unprotects everything (held writers go on). In
//! async mode the kernel resolves write faults itself, so nothing can hold a writer.
//!
//! Who does what: the application creates the uffd, registers and protects its mapping
//! ([`prepare_async`], [`prepare_sync`]) and passes the descriptors to its agent; the
//! agent builds the tracker from them ([`UffdWpAsync::from_fds`],
//! [`UffdWpSync::from_fd`]). Every ioctl acts on the application's address space. If the
//! agent goes away, the last uffd descriptor closes, the registration goes with it and
//! the application's writes never wait on anyone.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{DirtyTracker, Ranges, TrackError};
use crate::fault::uffd::{self, UffdError};

const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_UFFDIO_WRITEPROTECT` in the ioctls a registration offers.
const IOCTL_WRITEPROTECT: u64 = 1 << 0x06;

/// `struct pm_scan_arg` (linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// Regions returned per `PAGEMAP_SCAN` call (24 bytes each).
const SCAN_VEC: usize = 4096;

fn setup(what: &'static str) -> impl Fn(UffdError) -> TrackError {
    move |e| TrackError::Setup {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

fn check_range(base: *mut u8, len: usize) -> Result<(), TrackError> {
    let page = uffd::page_size() as usize;
    if base.is_null() || (base as usize) % page != 0 || len == 0 || len % page != 0 {
        return Err(TrackError::Setup {
            what: "write-protect tracking",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    Ok(())
}

/// Creates a uffd for this process with `features` (all of them required), registers
/// `[base, base+len)` for write-protect faults and protects it.
fn prepare(base: *mut u8, len: usize, features: u64) -> Result<OwnedFd, TrackError> {
    check_range(base, len)?;
    let fd = uffd::create().map_err(setup("userfaultfd"))?;
    let raw = fd.as_raw_fd();
    let have = uffd::api_features(raw, features).map_err(setup("UFFDIO_API"))?;
    if have & features != features {
        return Err(TrackError::Setup {
            what: "UFFDIO_API",
            source: std::io::Error::other(format!(
                "kernel lacks userfaultfd features {:#x}",
                features & !have
            )),
        });
    }
    let ioctls = uffd::register_mode(raw, base as u64, len as u64, UFFDIO_REGISTER_MODE_WP)
        .map_err(setup("UFFDIO_REGISTER (write-protect)"))?;
    if ioctls & IOCTL_WRITEPROTECT == 0 {
        return Err(TrackError::Setup {
            what: "UFFDIO_REGISTER (write-protect)",
            source: std::io::Error::other("the mapping does not support UFFDIO_WRITEPROTECT"),
        });
    }
    uffd::writeprotect(raw, base as u64, len as u64, true).map_err(setup("UFFDIO_WRITEPROTECT"))?;
    Ok(fd)
}

/// Application side of the async tracker: a registered, protected uffd and this
/// process's pagemap, to hand to the agent.
pub fn prepare_async(base: *mut u8, len: usize) -> Result<(OwnedFd, File), TrackError> {
    let fd = prepare(
        base,
        len,
        UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    )?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|source| TrackError::Setup {
        what: "opening /proc/self/pagemap",
        source,
    })?;
    Ok((fd, pagemap))
}

/// Application side of the sync tracker: a registered, protected uffd for the agent.
pub fn prepare_sync(base: *mut u8, len: usize) -> Result<OwnedFd, TrackError> {
    prepare(
        base,
        len,
        UFFD_FEATURE_PAGEFAULT_FLAG_WP
            | UFFD_FEATURE_WP_UNPOPULATED
            | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    )
}

/// Whether this kernel offers the async tracker (WP_ASYNC and PAGEMAP_SCAN), tried once
/// on a scratch mapping.
pub fn async_supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let page = uffd::page_size() as usize;
        let Ok(map) = memmap2::MmapMut::map_anon(page) else {
            return false;
        };
        let Ok(mut t) = UffdWpAsync::new(map.as_ptr() as *mut u8, page) else {
            return false;
        };
        t.collect().is_ok()
    })
}

/// Whether this kernel offers the sync tracker, tried once.
pub fn sync_supported() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let page = uffd::page_size() as usize;
        let Ok(map) = memmap2::MmapMut::map_anon(page) else {
            return false;
        };
        prepare_sync(map.as_ptr() as *mut u8, page).is_ok()
    })
}

fn pages_to_ranges(base: u64, start: u64, end: u64) -> std::ops::Range<u64> {
    start - base..end - base
}

/// The async tracker (see the module docs).
pub struct UffdWpAsync {
    /// Kept open: closing the last copy would end the registration.
    _uffd: OwnedFd,
    pagemap: File,
    base: u64,
    len: u64,
    vec: Vec<PageRegion>,
}

impl UffdWpAsync {
    /// Tracks `[base, base+len)` of this process (page-aligned, mapped).
    pub fn new(base: *mut u8, len: usize) -> Result<UffdWpAsync, TrackError> {
        let (uffd, pagemap) = prepare_async(base, len)?;
        UffdWpAsync::from_fds(uffd, pagemap, base, len)
    }

    /// The agent's side: `uffd` and `pagemap` come from the application that called
    /// [`prepare_async`] for `[base, base+len)` of its address space. Checks them with
    /// one scan (which also tells whether the range really is registered async).
    pub fn from_fds(
        uffd: OwnedFd,
        pagemap: File,
        base: *mut u8,
        len: usize,
    ) -> Result<UffdWpAsync, TrackError> {
        check_range(base, len)?;
        let t = UffdWpAsync {
            _uffd: uffd,
            pagemap,
            base: base as u64,
            len: len as u64,
            vec: vec![PageRegion::default(); SCAN_VEC],
        };
        // A zero-length probe: fails with ENOTTY where PAGEMAP_SCAN is missing.
        let mut probe = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: t.base,
            end: t.base,
            ..Default::default()
        };
        scan_ioctl(t.pagemap.as_raw_fd(), &mut probe).map_err(|source| TrackError::Setup {
            what: "PAGEMAP_SCAN",
            source,
        })?;
        Ok(t)
    }
}

fn scan_ioctl(fd: RawFd, arg: &mut PmScanArg) -> std::io::Result<u64> {
    // SAFETY: `arg` is a live `#[repr(C)]` pm_scan_arg of the size encoded in the request
    // (checked above); `vec`, if non-zero, points at `vec_len` page_regions we own.
    let r = unsafe { libc::ioctl(fd, PAGEMAP_SCAN as libc::c_ulong, arg as *mut PmScanArg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

impl DirtyTracker for UffdWpAsync {
    fn name(&self) -> &'static str {
        "uffd-wp-async"
    }

    fn collect(&mut self) -> Result<Ranges, TrackError> {
        let end = self.base + self.len;
        let mut start = self.base;
        let mut out = Vec::new();
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                vec: self.vec.as_mut_ptr() as u64,
                vec_len: self.vec.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            let n = match scan_ioctl(self.pagemap.as_raw_fd(), &mut arg) {
                Ok(n) => n as usize,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(TrackError::Gone("the application exited".into()))
                }
                Err(source) => {
                    return Err(TrackError::Collect {
                        what: "PAGEMAP_SCAN",
                        source,
                    })
                }
            };
            for r in &self.vec[..n.min(self.vec.len())] {
                let (a, b) = (r.start.max(self.base), r.end.min(end));
                if a < b {
                    out.push(pages_to_ranges(self.base, a, b));
                }
            }
            if arg.walk_end <= start || arg.walk_end > end {
                // Walked everything (some kernels leave walk_end at `end`), or nothing
                // more can be made of it.
                break;
            }
            start = arg.walk_end;
        }
        Ok(super::normalize(out))
    }
}

/// Dirty marks shared by the sync tracker's fault thread and `collect`.
struct Marks {
    words: Box<[AtomicU64]>,
}

impl Marks {
    fn new(pages: usize) -> Marks {
        Marks {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn set(&self, page: usize) {
        if let Some(w) = self.words.get(page / 64) {
            w.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }

    /// Takes every mark: runs of marked pages `(first, count)`, marks cleared.
    fn take_runs(&self) -> Vec<(usize, usize)> {
        super::take_runs(&self.words)
    }

    /// Runs of marked pages, marks kept.
    fn runs(&self) -> Vec<(usize, usize)> {
        super::runs(&self.words, false)
    }
}

/// Whether writers are held (see the module docs), and the pages of the held faults.
#[derive(Default)]
struct Hold {
    frozen: bool,
    parked: Vec<u64>,
}

/// The sync tracker (see the module docs).
pub struct UffdWpSync {
    uffd: Arc<OwnedFd>,
    base: u64,
    len: u64,
    page: u64,
    marks: Arc<Marks>,
    /// Held by the fault thread around mark + unprotect and by `collect` around take +
    /// protect; the freeze state lives under it.
    lock: Arc<Mutex<Hold>>,
    stop: Arc<AtomicBool>,
    /// Set by the fault thread when it gave up (the uffd failed): everything is dirty.
    broken: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UffdWpSync {
    /// Tracks `[base, base+len)` of this process.
    pub fn new(base: *mut u8, len: usize) -> Result<UffdWpSync, TrackError> {
        let uffd = prepare_sync(base, len)?;
        UffdWpSync::from_fd(uffd, base, len)
    }

    /// The agent's side: `uffd` comes from the application that called
    /// [`prepare_sync`] for `[base, base+len)`. Starts the fault thread.
    pub fn from_fd(uffd: OwnedFd, base: *mut u8, len: usize) -> Result<UffdWpSync, TrackError> {
        check_range(base, len)?;
        let page = uffd::page_size();
        let uffd = Arc::new(uffd);
        let marks = Arc::new(Marks::new(len / page as usize));
        let stop = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicBool::new(false));
        let lock = Arc::new(Mutex::new(Hold::default()));
        let (u, m, s, b) = (uffd.clone(), marks.clone(), stop.clone(), broken.clone());
        let l = lock.clone();
        let (base, len) = (base as u64, len as u64);
        let thread = std::thread::Builder::new()
            .name("pagewire-uffd-wp".into())
            .spawn(move || fault_loop(&u, base, len, page, &m, &l, &s, &b))
            .map_err(|source| TrackError::Setup {
                what: "starting the write-fault thread",
                source,
            })?;
        Ok(UffdWpSync {
            uffd,
            base,
            len,
            page,
            marks,
            lock,
            stop,
            broken,
            thread: Some(thread),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn fault_loop(
    uffd: &OwnedFd,
    base: u64,
    len: u64,
    page: u64,
    marks: &Marks,
    lock: &Mutex<Hold>,
    stop: &AtomicBool,
    broken: &AtomicBool,
) {
    let fd = uffd.as_raw_fd();
    while !stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, 100) };
        if r <= 0 {
            continue;
        }
        if p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            broken.store(true, Ordering::Release);
            return;
        }
        loop {
            match uffd::read_event(fd) {
                Ok(Some(uffd::Event::Fault { addr, wp: true, .. })) => {
                    let a = addr & !(page - 1);
                    if a < base || a >= base + len {
                        continue;
                    }
                    // Mark, then unprotect, under the lock (see the module docs).
                    let mut hold = lock.lock().unwrap_or_else(|e| e.into_inner());
                    marks.set(((a - base) / page) as usize);
                    if hold.frozen {
                        // Frozen: the writer waits until `thaw` (or forever).
                        hold.parked.push(a);
                        continue;
                    }
                    match uffd::writeprotect(fd, a, page, false) {
                        Ok(()) => {}
                        Err(UffdError::Gone) => return,
                        Err(e) => {
                            tracing::warn!("uffd-wp: unprotecting a written page: {e}");
                            broken.store(true, Ordering::Release);
                            let _ = uffd::writeprotect(fd, base, len, false);
                            return;
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::warn!("uffd-wp: reading events: {e}");
                    broken.store(true, Ordering::Release);
                    return;
                }
            }
        }
    }
}

impl DirtyTracker for UffdWpSync {
    fn name(&self) -> &'static str {
        "uffd-wp-sync"
    }

    fn collect(&mut self) -> Result<Ranges, TrackError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(TrackError::Gone(
                "the write-fault thread stopped (the application's mapping is gone)".into(),
            ));
        }
        let fd = self.uffd.as_raw_fd();
        let mut out = Vec::new();
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        for (first, n) in self.marks.take_runs() {
            let (a, l) = (first as u64 * self.page, n as u64 * self.page);
            match uffd::writeprotect(fd, self.base + a, l, true) {
                Ok(()) => {}
                Err(UffdError::Gone) => {
                    return Err(TrackError::Gone("the application's mapping is gone".into()))
                }
                Err(e) => {
                    return Err(TrackError::Collect {
                        what: "UFFDIO_WRITEPROTECT",
                        source: std::io::Error::other(e.to_string()),
                    })
                }
            }
            out.push(a..(a + l).min(self.len));
        }
        Ok(out)
    }

    fn can_freeze(&self) -> bool {
        true
    }

    fn freeze(&mut self) -> Result<(), TrackError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(TrackError::Gone(
                "the write-fault thread stopped (the application's mapping is gone)".into(),
            ));
        }
        let mut hold = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        hold.frozen = true;
        // Only the pages marked since the last collect are writable: the fault thread
        // marks a page before it unprotects it, `collect` protects every run it takes,
        // `thaw` marks before it unprotects, all under this lock; the registration
        // protected the whole range. So protecting the marked runs (marks kept: those
        // pages are dirty) holds every writer, at a cost in what was written since the
        // last collect rather than in the region's size (a whole-range protect walked
        // every page table entry: ~26 ms per populated GiB here). A store that
        // completed before this is marked already; any later one faults and is held.
        let fd = self.uffd.as_raw_fd();
        for (first, n) in self.marks.runs() {
            let (a, l) = (first as u64 * self.page, n as u64 * self.page);
            if let Err(e) = uffd::writeprotect(fd, self.base + a, l, true) {
                hold.frozen = false;
                return Err(match e {
                    UffdError::Gone => TrackError::Gone("the application's mapping is gone".into()),
                    e => TrackError::Collect {
                        what: "UFFDIO_WRITEPROTECT (freeze)",
                        source: std::io::Error::other(e.to_string()),
                    },
                });
            }
        }
        Ok(())
    }

    fn thaw(&mut self) -> Result<(), TrackError> {
        let mut hold = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        hold.frozen = false;
        let fd = self.uffd.as_raw_fd();
        for a in std::mem::take(&mut hold.parked) {
            // The held store lands after this: mark again (a collect while frozen may
            // have taken the fault's mark), then unprotect, as the fault thread does.
            self.marks.set(((a - self.base) / self.page) as usize);
            match uffd::writeprotect(fd, a, self.page, false) {
                Ok(()) | Err(UffdError::Gone) => {}
                Err(e) => {
                    // Never leave a writer held: let every page go (tracking then
                    // over-reports nothing it should not; marks are kept).
                    tracing::warn!("uffd-wp: releasing a held writer: {e}");
                    let _ = uffd::writeprotect(fd, self.base, self.len, false);
                    self.broken.store(true, Ordering::Release);
                    return Err(TrackError::Collect {
                        what: "UFFDIO_WRITEPROTECT (thaw)",
                        source: std::io::Error::other(e.to_string()),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Drop for UffdWpSync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).frozen = false;
        // Let writers go (held ones too) before the thread that would have let them go
        // stops.
        let _ = uffd::writeprotect(self.uffd.as_raw_fd(), self.base, self.len, false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(len: usize) -> memmap2::MmapMut {
        memmap2::MmapMut::map_anon(len).unwrap()
    }

    fn write(m: &memmap2::MmapMut, off: usize, b: u8) {
        // SAFETY: inside the mapping; a volatile write so it really happens.
        unsafe { std::ptr::write_volatile((m.as_ptr() as *mut u8).add(off), b) }
    }

    fn check(t: &mut dyn DirtyTracker, m: &memmap2::MmapMut) {
        let page = uffd::page_size() as usize;
        assert_eq!(t.collect().unwrap(), vec![]);
        write(m, 5 * page + 7, 1);
        write(m, 6 * page, 2);
        write(m, 40 * page + 1, 3);
        let got = t.collect().unwrap();
        assert_eq!(
            got,
            vec![
                (5 * page) as u64..(7 * page) as u64,
                (40 * page) as u64..(41 * page) as u64
            ]
        );
        assert_eq!(t.collect().unwrap(), vec![], "collect re-protects");
        write(m, 40 * page + 2, 4);
        assert_eq!(
            t.collect().unwrap(),
            vec![(40 * page) as u64..(41 * page) as u64]
        );
    }

    #[test]
    fn async_tracker_reports_written_pages() {
        if !async_supported() {
            eprintln!("skipped: kernel lacks WP_ASYNC/PAGEMAP_SCAN");
            return;
        }
        let m = map(64 * uffd::page_size() as usize);
        let mut t = UffdWpAsync::new(m.as_ptr() as *mut u8, m.len()).unwrap();
        check(&mut t, &m);
    }

    #[test]
    fn sync_tracker_reports_written_pages() {
        if !sync_supported() {
            eprintln!("skipped: kernel lacks userfaultfd write-protect");
            return;
        }
        let m = map(64 * uffd::page_size() as usize);
        let mut t = UffdWpSync::new(m.as_ptr() as *mut u8, m.len()).unwrap();
        check(&mut t, &m);
    }

    /// Every write that returned before `collect` started is in that `collect` (the
    /// writer's store lands only after its mark is set). Found missing by the tracking
    /// bench: one page in 262144 used to arrive a collect late.
    #[test]
    fn sync_tracker_reports_every_completed_write_in_the_next_collect() {
        if !sync_supported() {
            return;
        }
        let page = uffd::page_size() as usize;
        let pages = 8192;
        let m = map(pages * page);
        let mut t = UffdWpSync::new(m.as_ptr() as *mut u8, m.len()).unwrap();
        for round in 0..5u8 {
            for i in 0..pages {
                write(&m, i * page, round);
            }
            assert_eq!(
                t.collect().unwrap(),
                vec![0..m.len() as u64],
                "round {round}"
            );
        }
    }

    /// WP_ASYNC works on shared file mappings too: tmpfs and a disk file system (the
    /// sync mode refuses ext4 with EINVAL).
    #[test]
    fn async_tracker_on_tmpfs_and_disk_file_mappings() {
        if !async_supported() {
            return;
        }
        let page = uffd::page_size() as usize;
        let tmp = std::env::temp_dir(); // a disk file system on our machines (ext4 here)
        for dir in [std::path::Path::new("/dev/shm"), tmp.as_path()] {
            let Ok(d) = tempfile::tempdir_in(dir) else {
                continue;
            };
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(d.path().join("wp"))
                .unwrap();
            f.set_len(64 * page as u64).unwrap();
            let m = unsafe { memmap2::MmapOptions::new().map_mut(&f) }.unwrap();
            let mut t = UffdWpAsync::new(m.as_ptr() as *mut u8, m.len())
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            check(&mut t, &m);
        }
    }

    #[test]
    fn async_tracker_on_a_shared_memfd() {
        if !async_supported() {
            return;
        }
        let page = uffd::page_size() as usize;
        let f = crate::fault::memfd("wp-test", 64 * page as u64).unwrap();
        let m = unsafe { memmap2::MmapOptions::new().map_mut(&f) }.unwrap();
        let mut t = UffdWpAsync::new(m.as_ptr() as *mut u8, m.len()).unwrap();
        check(&mut t, &m);
    }

    /// The client library holds an async tracker's writers with a [`Hold`]
    /// (mprotect in the writing process): the held store waits, and the tracking is
    /// intact across the hold (pages written before it, the held store after it, and
    /// clean pages stay clean).
    ///
    /// [`Hold`]: crate::fault::hold::Hold
    #[test]
    fn async_tracker_survives_a_hold() {
        if !async_supported() {
            return;
        }
        let page = uffd::page_size() as usize;
        let f = crate::fault::memfd("wp-hold", 64 * page as u64).unwrap();
        let m = unsafe { memmap2::MmapOptions::new().map_mut(&f) }.unwrap();
        let mut t = UffdWpAsync::new(m.as_ptr() as *mut u8, m.len()).unwrap();
        assert_eq!(t.collect().unwrap(), vec![]);
        write(&m, 3 * page, 1);
        write(&m, 4 * page, 1);
        let base = m.as_ptr() as usize;
        let h = crate::fault::hold::Hold::new(base as *mut u8, m.len()).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        let w = std::thread::spawn(move || {
            // SAFETY: inside the mapping, which outlives the join below.
            unsafe { std::ptr::write_volatile((base + 9 * page) as *mut u8, 7) };
            d.fetch_add(1, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(done.load(Ordering::SeqCst), 0, "a store landed while held");
        let pg = page as u64;
        assert_eq!(t.collect().unwrap(), vec![3 * pg..5 * pg]);
        h.release(true);
        w.join().unwrap();
        assert_eq!(m[9 * page], 7);
        // Page 3 was collected (clean again) before the release: a write to it is
        // reported, like the held store; nothing else is.
        write(&m, 3 * page, 2);
        assert_eq!(t.collect().unwrap(), vec![3 * pg..4 * pg, 9 * pg..10 * pg]);
        assert_eq!(t.collect().unwrap(), vec![]);
    }

    #[test]
    fn sync_tracker_freeze_holds_writers_until_thaw() {
        if !sync_supported() {
            eprintln!("uffd-wp sync not supported here: skipped");
            return;
        }
        let page = uffd::page_size() as usize;
        let m = map(64 * page);
        let mut t = UffdWpSync::new(m.as_ptr() as *mut u8, m.len()).unwrap();
        assert!(t.can_freeze());
        write(&m, 3 * page, 1);
        t.freeze().unwrap();
        // One thread per page stores `v` into it; `done` counts the stores that
        // completed. The mapping outlives every join below.
        let base = m.as_ptr() as usize;
        let store = |pages: &[usize], v: u8, done: &Arc<AtomicU64>| -> Vec<_> {
            let writers = pages
                .iter()
                .map(|&p| {
                    let d = done.clone();
                    std::thread::spawn(move || {
                        // SAFETY: inside the mapping, which outlives the joins.
                        unsafe { std::ptr::write_volatile((base + p * page) as *mut u8, v) };
                        d.fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(300));
            writers
        };
        // A store to a page written before the freeze and one to a fresh page: both
        // writers are held.
        let done = Arc::new(AtomicU64::new(0));
        let writers = store(&[3, 9], 7, &done);
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "a writer got through the freeze"
        );
        // Collecting while frozen reports the page written before it and keeps the
        // writers held. Reads go on.
        let got = t.collect().unwrap();
        assert!(
            got.contains(&((3 * page) as u64..(4 * page) as u64)),
            "{got:?}"
        );
        assert_eq!(m[3 * page], 1);
        assert_eq!(done.load(Ordering::SeqCst), 0);
        t.thaw().unwrap();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!((m[3 * page], m[9 * page]), (7, 7));
        // The held writes are reported like any other.
        let got = t.collect().unwrap();
        assert!(
            got.contains(&((9 * page) as u64..(10 * page) as u64)),
            "{got:?}"
        );
        // After the thaw writes go through again. The freeze protects only what was
        // marked since the last collect, so the second freeze must hold a store to a
        // page written and collected before (3), one written since (20, writable until
        // the freeze) and a fresh one (30). Dropping a frozen tracker lets them go.
        write(&m, 20 * page, 1);
        t.freeze().unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let writers = store(&[3, 20, 30], 5, &done);
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "a writer got through the second freeze"
        );
        drop(t);
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!((m[3 * page], m[20 * page], m[30 * page]), (5, 5, 5));
    }

    #[test]
    fn the_async_tracker_cannot_freeze() {
        if !async_supported() {
            return;
        }
        let m = map(16 * uffd::page_size() as usize);
        let mut t = UffdWpAsync::new(m.as_ptr() as *mut u8, m.len()).unwrap();
        assert!(!t.can_freeze());
        assert!(matches!(
            t.freeze(),
            Err(TrackError::CannotFreeze("uffd-wp-async"))
        ));
    }
}
