//! Demand paging: the kernel interfaces post-copy rests on, shared by the client library
//! (which sets a mapping up) and the agent (which fills it).
//!
//! * [`uffd`] — userfaultfd MISSING mode: the application registers its mapping and hands
//!   the fd to the agent, which reads fault events and installs whole chunks with
//!   `UFFDIO_COPY` (atomic per page; never over a page that is already there).
//! * [`sigsegv`] — the fallback where userfaultfd is refused: the mapping starts
//!   `PROT_NONE`, a SIGSEGV handler asks the agent for the chunk over a seqpacket socket,
//!   waits on a futex word in a [`ChunkTable`] shared with the agent, and makes the chunk
//!   accessible once the agent has written it into the shared file.
//! * [`fdpass`] — SCM_RIGHTS over the control socket.

pub mod fdpass;
pub mod hold;
pub mod sigsegv;
pub mod uffd;

use std::fs::File;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How faults on a lazily attached mapping reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// userfaultfd where the kernel and the backing allow it, else mprotect.
    #[default]
    Auto,
    /// userfaultfd MISSING mode (needs a memfd or tmpfs backing).
    Userfaultfd,
    /// PROT_NONE + SIGSEGV handler (any MAP_SHARED backing).
    Mprotect,
}

impl Mechanism {
    /// Parses `auto`, `userfaultfd` (or `uffd`), `mprotect`.
    pub fn parse(s: &str) -> Result<Mechanism, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Mechanism::Auto),
            "userfaultfd" | "uffd" => Ok(Mechanism::Userfaultfd),
            "mprotect" | "sigsegv" => Ok(Mechanism::Mprotect),
            o => Err(format!(
                "unknown fault mechanism {o:?} (auto, userfaultfd, mprotect)"
            )),
        }
    }

    /// The name used in status and config.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Auto => "auto",
            Mechanism::Userfaultfd => "userfaultfd",
            Mechanism::Mprotect => "mprotect",
        }
    }
}

/// Chunk states in a [`ChunkTable`] (one `u32` futex word per chunk).
pub mod state {
    /// Not here; nobody asked yet.
    pub const MISSING: u32 = 0;
    /// The application asked the agent for it.
    pub const REQUESTED: u32 = 1;
    /// The agent is writing it.
    pub const INSTALLING: u32 = 2;
    /// Written into the shared file: the application may map it readable and writable.
    pub const PRESENT: u32 = 3;
    /// The agent gave up on it (peer gone past the fault timeout, or the agent died):
    /// a thread touching it gets SIGBUS.
    pub const FAILED: u32 = 4;
}

/// A table of per-chunk state words in a shared memfd, mapped by both the application
/// and the agent. Futex waits and wakes on it are process-shared.
pub struct ChunkTable {
    map: memmap2::MmapRaw,
    chunks: u64,
}

// SAFETY: the table is only accessed through atomics.
unsafe impl Send for ChunkTable {}
// SAFETY: as above.
unsafe impl Sync for ChunkTable {}

impl ChunkTable {
    /// Bytes needed for `chunks` states.
    pub fn bytes(chunks: u64) -> u64 {
        (chunks * 4).max(4)
    }

    /// Maps `file` (at least [`ChunkTable::bytes`] long) as the table of `chunks` states.
    pub fn map(file: &File, chunks: u64) -> std::io::Result<ChunkTable> {
        let len = file.metadata()?.len();
        if len < Self::bytes(chunks) {
            return Err(std::io::Error::other(format!(
                "chunk table is {len} bytes, need {}",
                Self::bytes(chunks)
            )));
        }
        let map = memmap2::MmapOptions::new()
            .len(Self::bytes(chunks) as usize)
            .map_raw(file)?;
        Ok(ChunkTable { map, chunks })
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The first state word (for the signal handler, which cannot take references).
    pub fn as_ptr(&self) -> *mut u32 {
        self.map.as_mut_ptr().cast()
    }

    /// The state word of chunk `i` (`None` past the end).
    pub fn word(&self, i: u64) -> Option<&AtomicU32> {
        if i >= self.chunks {
            return None;
        }
        // SAFETY: the mapping is at least `chunks * 4` bytes, page-aligned, lives as long
        // as `self`, and is only accessed atomically.
        Some(unsafe { &*(self.as_ptr().add(i as usize) as *const AtomicU32) })
    }

    /// The state of chunk `i` (FAILED past the end).
    pub fn get(&self, i: u64) -> u32 {
        self.word(i)
            .map(|w| w.load(Ordering::Acquire))
            .unwrap_or(state::FAILED)
    }

    /// Claims chunk `i` for writing: true unless it is present, failed, or being
    /// written by someone else.
    pub fn claim(&self, i: u64) -> bool {
        let Some(w) = self.word(i) else { return false };
        let mut cur = w.load(Ordering::Acquire);
        loop {
            if cur != state::MISSING && cur != state::REQUESTED {
                return false;
            }
            match w.compare_exchange(cur, state::INSTALLING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(c) => cur = c,
            }
        }
    }

    /// Sets chunk `i` to `s` and wakes every thread waiting on it.
    pub fn set(&self, i: u64, s: u32) {
        if let Some(w) = self.word(i) {
            w.store(s, Ordering::Release);
            futex_wake(w);
        }
    }

    /// Sets every chunk that is not present to FAILED and wakes their waiters.
    pub fn fail_missing(&self) {
        for i in 0..self.chunks {
            if let Some(w) = self.word(i) {
                if w.load(Ordering::Acquire) != state::PRESENT {
                    w.store(state::FAILED, Ordering::Release);
                    futex_wake(w);
                }
            }
        }
    }
}

/// Wakes all waiters on `w` (process-shared futex).
pub fn futex_wake(w: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32; no memory is written.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

/// Waits while `*w == val`, up to `timeout` (async-signal-safe: one system call).
pub fn futex_wait(w: &AtomicU32, val: u32, timeout: Duration) {
    let w = w.as_ptr() as *const u32;
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 at `w`, borrowed for this call; the
    // timespec lives on this stack frame.
    unsafe {
        libc::syscall(libc::SYS_futex, w, libc::FUTEX_WAIT, val, &ts as *const _);
    }
}

/// Creates an anonymous shared-memory file (memfd) of `len` bytes.
pub fn memfd(name: &str, len: u64) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len)?;
    Ok(f)
}

/// True when `file` lives on tmpfs/shmem (userfaultfd MISSING mode works on it).
pub fn is_shmem(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs writes into the zeroed struct we pass.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a pointer to a statfs on our stack.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut s) };
    r == 0 && s.f_type as i64 == libc::TMPFS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_states() {
        let f = memfd("t", ChunkTable::bytes(3)).unwrap();
        let t = ChunkTable::map(&f, 3).unwrap();
        assert_eq!(t.get(0), state::MISSING);
        assert!(t.claim(0));
        assert!(!t.claim(0), "already installing");
        t.set(0, state::PRESENT);
        assert!(!t.claim(0));
        t.set(1, state::REQUESTED);
        assert!(t.claim(1));
        assert_eq!(t.get(3), state::FAILED);
        assert!(!t.claim(3));
        t.fail_missing();
        assert_eq!(t.get(0), state::PRESENT);
        assert_eq!(t.get(2), state::FAILED);
        assert!(is_shmem(&f));
        assert_eq!(Mechanism::parse("uffd").unwrap(), Mechanism::Userfaultfd);
        assert!(Mechanism::parse("x").is_err());
    }
}
