//! userfaultfd, the few ioctls pagewire needs, on raw file descriptors (`libc::ioctl`;
//! the `userfaultfd` crate needs libclang at build time). Structures and numbers follow
//! `linux/userfaultfd.h`; their sizes are checked at compile time.
//!
//! Who calls what: the application (client library) creates the uffd, negotiates the API
//! and registers its mapping; the agent, holding a copy of the fd received over
//! SCM_RIGHTS, reads fault events and installs pages. Every ioctl acts on the address
//! space of the process that created the uffd, whoever calls it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x03,
    std::mem::size_of::<UffdioCopy>(),
);
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x04,
    std::mem::size_of::<UffdioZeropage>(),
);
// Values from linux/userfaultfd.h, spelled out so a typo in `ioc` shows up here.
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);

/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd (`_IO(0xAA, 0x00)`).
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
/// `UFFD_USER_MODE_ONLY`: only faults from user space (no privilege needed).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;

/// The features pagewire asks for: shmem (memfd) faults, the thread that faulted (to
/// deliver SIGBUS on timeout), and unmap/remove/remap events (to follow the mapping and
/// end the session when the application unmaps it).
pub const FEATURES: u64 = UFFD_FEATURE_MISSING_SHMEM
    | UFFD_FEATURE_THREAD_ID
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_REMAP;

/// The ioctls a MISSING registration must offer us.
const NEED_IOCTLS: u64 = (1 << 0x03) | (1 << 0x04) | (1 << 0x02); // COPY, ZEROPAGE, WAKE

/// A userfaultfd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// userfaultfd(2) and /dev/userfaultfd both refused (EPERM, ENOSYS, seccomp...).
    #[error("userfaultfd unavailable: {0}")]
    Unavailable(std::io::Error),
    /// The API handshake failed or lacks a feature we need.
    #[error("userfaultfd API: {0}")]
    Api(String),
    /// Registering the mapping failed.
    #[error("registering the mapping with userfaultfd: {0}")]
    Register(std::io::Error),
    /// An ioctl failed.
    #[error("{op}: {source}")]
    Ioctl {
        op: &'static str,
        source: std::io::Error,
    },
    /// The process that owns the mapping is gone (ESRCH), or it unmapped the range
    /// (ENOENT).
    #[error("the application's mapping is gone")]
    Gone,
}

/// One message read from a uffd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page (or, `wp`, wrote a write-protected one).
    Fault {
        addr: u64,
        tid: u32,
        write: bool,
        wp: bool,
    },
    /// The application unmapped `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// `madvise(DONTNEED/REMOVE)` on `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// Something we did not ask for.
    Other(u8),
}

/// Size of `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

impl Event {
    /// Parses one `struct uffd_msg`.
    pub fn parse(m: &[u8; MSG_SIZE]) -> Event {
        let u = |o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().unwrap_or([0; 8]));
        match m[0] {
            UFFD_EVENT_PAGEFAULT => Event::Fault {
                // flags at 8, address at 16, ptid at 24
                write: u(8) & 1 != 0,
                wp: u(8) & 2 != 0,
                addr: u(16),
                tid: u32::from_ne_bytes(m[24..28].try_into().unwrap_or([0; 4])),
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: u(8),
                end: u(16),
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: u(8),
                end: u(16),
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: u(8),
                to: u(16),
                len: u(24),
            },
            e => Event::Other(e),
        }
    }
}

fn last() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` struct whose size is
    // encoded in `req` (checked by the const asserts above); the kernel reads and writes
    // only within it.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(last())
    } else {
        Ok(())
    }
}

/// Creates a userfaultfd (non-blocking, close-on-exec) for this process's address space.
/// Tries, in order: the syscall (kernel-mode faults included, needs privilege when
/// `vm.unprivileged_userfaultfd` is 0), `/dev/userfaultfd` (its file mode grants access),
/// then the syscall with `UFFD_USER_MODE_ONLY` (then a system call such as `write(2)`
/// that reads a missing page of the region fails with EFAULT instead of waiting for it).
pub fn create() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let sys = |f: libc::c_int| -> Option<OwnedFd> {
        // SAFETY: userfaultfd takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, f) };
        // SAFETY: the kernel just gave us this fd; nobody else owns it.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    };
    if let Some(fd) = sys(flags) {
        return Ok(fd);
    }
    let first = last();
    if let Ok(dev) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value.
        let fd =
            unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::c_ulong, flags) };
        if fd >= 0 {
            // SAFETY: as above, a fresh fd from the kernel.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    sys(flags | UFFD_USER_MODE_ONLY).ok_or(UffdError::Unavailable(first))
}

/// Negotiates the API with [`FEATURES`].
pub fn api(fd: RawFd) -> Result<(), UffdError> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features: FEATURES,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_API, &mut a).map_err(|e| UffdError::Api(e.to_string()))?;
    if a.features & FEATURES != FEATURES {
        return Err(UffdError::Api(format!(
            "kernel lacks features {:#x}",
            FEATURES & !a.features
        )));
    }
    Ok(())
}

/// Negotiates the API asking for `features`; returns the features the kernel offers
/// (a subset of what was asked is not an error here: the caller decides).
pub(crate) fn api_features(fd: RawFd, features: u64) -> Result<u64, UffdError> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_API, &mut a).map_err(|e| UffdError::Api(e.to_string()))?;
    Ok(a.features)
}

/// Registers `[start, start+len)` in `mode` (`UFFDIO_REGISTER_MODE_*`); returns the
/// ioctls the range supports.
pub(crate) fn register_mode(fd: RawFd, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r).map_err(UffdError::Register)?;
    Ok(r.ioctls)
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);

/// `UFFDIO_WRITEPROTECT`: write-protects `[start, start+len)` when `protect`, else
/// removes the protection (and wakes threads waiting on it).
pub(crate) fn writeprotect(
    fd: RawFd,
    start: u64,
    len: u64,
    protect: bool,
) -> Result<(), UffdError> {
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: protect as u64, // UFFDIO_WRITEPROTECT_MODE_WP
    };
    ioctl(fd, UFFDIO_WRITEPROTECT, &mut w).map_err(|e| gone_or("UFFDIO_WRITEPROTECT", e))
}

/// Registers `[start, start+len)` for MISSING faults.
pub fn register_missing(fd: RawFd, start: u64, len: u64) -> Result<(), UffdError> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r).map_err(UffdError::Register)?;
    if r.ioctls & NEED_IOCTLS != NEED_IOCTLS {
        return Err(UffdError::Register(std::io::Error::other(format!(
            "mapping does not support COPY/ZEROPAGE/WAKE (ioctls {:#x})",
            r.ioctls
        ))));
    }
    Ok(())
}

fn gone_or(op: &'static str, e: std::io::Error) -> UffdError {
    // ESRCH: the process exited; ENOENT: the range is no longer mapped and registered.
    if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT)) {
        UffdError::Gone
    } else {
        UffdError::Ioctl { op, source: e }
    }
}

/// Unregisters `[start, start+len)`: faults there no longer reach us.
pub fn unregister(fd: RawFd, start: u64, len: u64) -> Result<(), UffdError> {
    let mut r = UffdioRange { start, len };
    ioctl(fd, UFFDIO_UNREGISTER, &mut r).map_err(|e| gone_or("UFFDIO_UNREGISTER", e))
}

/// Wakes threads waiting on faults in `[start, start+len)`.
pub fn wake(fd: RawFd, start: u64, len: u64) -> Result<(), UffdError> {
    let mut r = UffdioRange { start, len };
    ioctl(fd, UFFDIO_WAKE, &mut r).map_err(|e| gone_or("UFFDIO_WAKE", e))
}

/// What [`copy`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// Pages installed from our buffer.
    pub pages: u64,
    /// Pages skipped because they were already there (the application wrote them, or
    /// another install won the race): never overwritten.
    pub existing: u64,
}

/// Installs `src` (page-multiple length) at `dst` in the registered mapping, atomically
/// per page, waking threads that wait on it. Pages already present are left alone
/// (EEXIST); EAGAIN (the mapping is changing) is retried.
///
/// # Safety
/// `src` must be readable for `len` bytes in this process.
pub unsafe fn copy(
    fd: RawFd,
    dst: u64,
    src: *const u8,
    len: u64,
    page: u64,
) -> Result<Installed, UffdError> {
    let mut done = 0u64;
    let mut out = Installed::default();
    let mut again = 0u32;
    while done < len {
        let mut c = UffdioCopy {
            dst: dst + done,
            src: src as u64 + done,
            len: len - done,
            mode: 0,
            copy: 0,
        };
        let r = ioctl(fd, UFFDIO_COPY, &mut c);
        if c.copy > 0 {
            done += c.copy as u64;
            out.pages += c.copy as u64 / page;
        }
        match r {
            Ok(()) => {}
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    if c.copy <= 0 {
                        // The page at `done` is there already: keep it, go on.
                        done += page;
                        out.existing += 1;
                        wake(fd, dst + done - page, page)?;
                    }
                }
                Some(libc::EAGAIN) => {
                    again += 1;
                    if again > 1000 {
                        return Err(UffdError::Ioctl {
                            op: "UFFDIO_COPY",
                            source: e,
                        });
                    }
                    std::thread::yield_now();
                }
                _ => return Err(gone_or("UFFDIO_COPY", e)),
            },
        }
    }
    Ok(out)
}

/// Installs zero pages over `[dst, dst+len)`; pages already there are left alone.
pub fn zero(fd: RawFd, dst: u64, len: u64, page: u64) -> Result<Installed, UffdError> {
    let mut done = 0u64;
    let mut out = Installed::default();
    let mut again = 0u32;
    while done < len {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst + done,
                len: len - done,
            },
            mode: 0,
            zeropage: 0,
        };
        let r = ioctl(fd, UFFDIO_ZEROPAGE, &mut z);
        if z.zeropage > 0 {
            done += z.zeropage as u64;
            out.pages += z.zeropage as u64 / page;
        }
        match r {
            Ok(()) => {}
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    if z.zeropage <= 0 {
                        done += page;
                        out.existing += 1;
                        wake(fd, dst + done - page, page)?;
                    }
                }
                Some(libc::EAGAIN) => {
                    again += 1;
                    if again > 1000 {
                        return Err(UffdError::Ioctl {
                            op: "UFFDIO_ZEROPAGE",
                            source: e,
                        });
                    }
                    std::thread::yield_now();
                }
                _ => return Err(gone_or("UFFDIO_ZEROPAGE", e)),
            },
        }
    }
    Ok(out)
}

/// Reads one event; `None` when none is pending (the fd is non-blocking).
pub fn read_event(fd: RawFd) -> std::io::Result<Option<Event>> {
    let mut m = [0u8; MSG_SIZE];
    // SAFETY: reading at most MSG_SIZE bytes into a buffer of that size.
    let n = unsafe { libc::read(fd, m.as_mut_ptr().cast(), MSG_SIZE) };
    if n < 0 {
        let e = last();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    if n as usize != MSG_SIZE {
        return Err(std::io::Error::other(format!("short uffd read: {n} bytes")));
    }
    Ok(Some(Event::parse(&m)))
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_fault() {
        let mut m = [0u8; MSG_SIZE];
        m[0] = UFFD_EVENT_PAGEFAULT;
        m[8..16].copy_from_slice(&1u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x7000_1000u64.to_ne_bytes());
        m[24..28].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(
            Event::parse(&m),
            Event::Fault {
                addr: 0x7000_1000,
                tid: 42,
                write: true,
                wp: false
            }
        );
        m[0] = 0x99;
        assert_eq!(Event::parse(&m), Event::Other(0x99));
    }
}
