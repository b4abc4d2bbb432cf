//! The destination side of a live migration, for the application that takes the region
//! over (post-copy): map a fresh region, hand it to the local agent, wait until the
//! migration's handover makes this host the owner, then run at once. Pages still stale at
//! the handover are fetched from the source when first touched (userfaultfd MISSING; the
//! touching thread waits for its chunk), while the rest streams in behind.
//!
//! ```no_run
//! use pagewire::client::receive::{receive, ReceiveOptions};
//! let mut r = receive(&ReceiveOptions::new("/run/pagewire.sock", "vm0", 1 << 30))?;
//! r.wait_owner(None)?; // returns at the handover
//! // ... the application runs on r.as_ptr() .. r.len() ...
//! # Ok::<(), pagewire::client::AttachError>(())
//! ```
//!
//! Do not touch the mapping before [`Receiving::wait_owner`] returns: until then it holds
//! a partial copy that the source is still changing. If the agent goes away during
//! post-copy, threads touching a page not yet here wait (this handle keeps the
//! userfaultfd open, so they never read a hole as zeros). If the *source* is lost
//! during post-copy (it restarted, or stayed away longer than the agent's
//! `fault_timeout`), [`Receiving::wait_received`] fails with the reason and a thread
//! touching a page that is not here gets SIGBUS.

use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::{read_event, send_line, AttachError};
use crate::control::{ControlEvent, ControlRequest, ReceiveArgs};
use crate::fault::{self, uffd};

/// What to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub control: PathBuf,
    /// The region's name (the source migrates a region of this name and size).
    pub region: String,
    pub size: u64,
}

impl ReceiveOptions {
    pub fn new(control: impl Into<PathBuf>, region: &str, size: u64) -> ReceiveOptions {
        ReceiveOptions {
            control: control.into(),
            region: region.into(),
            size,
        }
    }
}

/// A region being migrated into this process: raw pointer and length.
pub struct Receiving {
    // Fields drop in this order (after `Drop::drop` unregistered the range): the mapping,
    // then the descriptors, then the connection.
    _map: memmap2::MmapRaw,
    /// Kept open so that faults wait (rather than reading holes) if the agent dies.
    uffd: OwnedFd,
    _file: File,
    reader: BufReader<UnixStream>,
    ptr: *mut u8,
    len: usize,
    owner: bool,
    received: bool,
}

// SAFETY: a shared mapping and descriptors; access to the bytes is the application's
// business.
unsafe impl Send for Receiving {}
// SAFETY: as above; methods copy through raw pointers.
unsafe impl Sync for Receiving {}

/// Maps a new region of `opts.size` bytes and registers it with the local agent as the
/// destination of a migration of `opts.region`.
pub fn receive(opts: &ReceiveOptions) -> Result<Receiving, AttachError> {
    if opts.size == 0 {
        return Err(AttachError::Agent("cannot receive an empty region".into()));
    }
    let page = uffd::page_size();
    let map_len = opts.size.next_multiple_of(page);
    let file =
        fault::memfd(&format!("pagewire:{}", opts.region), opts.size).map_err(AttachError::Map)?;
    let map = memmap2::MmapOptions::new()
        .len(map_len as usize)
        .map_raw(&file)
        .map_err(AttachError::Map)?;
    let base = map.as_mut_ptr();
    let fd = uffd::create()?;
    uffd::api(fd.as_raw_fd())?;
    uffd::register_missing(fd.as_raw_fd(), base as u64, map_len)?;
    let stream = UnixStream::connect(&opts.control).map_err(|source| AttachError::Connect {
        path: opts.control.clone(),
        source,
    })?;
    send_line(
        &stream,
        &ControlRequest::Receive(ReceiveArgs {
            region: opts.region.clone(),
            size: opts.size,
            base: base as u64,
            map_len,
        }),
        &[file.as_raw_fd(), fd.as_raw_fd()],
    )?;
    let mut reader = BufReader::new(stream);
    match read_event(&mut reader)? {
        Some(ControlEvent::Receiving { .. }) => {}
        Some(ControlEvent::Error { message }) => return Err(AttachError::Agent(message)),
        other => {
            return Err(AttachError::Protocol(format!(
                "expected receiving, got {other:?}"
            )))
        }
    }
    Ok(Receiving {
        ptr: base,
        len: opts.size as usize,
        reader,
        owner: false,
        received: false,
        uffd: fd,
        _map: map,
        _file: file,
    })
}

impl Drop for Receiving {
    fn drop(&mut self) {
        // Unregister first: munmap of a registered range waits until the userfaultfd's
        // reader has read the unmap event, and the agent reads it only while a migration
        // into this region runs (an app giving up before one would hang here).
        let _ = uffd::unregister(
            self.uffd.as_raw_fd(),
            self.ptr as u64,
            self._map.len() as u64,
        );
    }
}

impl Receiving {
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the agent's next event, waiting at most `timeout` (`None`: forever).
    /// `Ok(false)`: timed out.
    fn next(&mut self, timeout: Option<Duration>) -> Result<bool, AttachError> {
        self.reader.get_ref().set_read_timeout(timeout)?;
        let ev = match read_event(&mut self.reader) {
            Ok(ev) => ev,
            Err(AttachError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        match ev {
            Some(ControlEvent::Owner { .. }) => self.owner = true,
            Some(ControlEvent::Received) => {
                self.owner = true;
                self.received = true;
            }
            Some(ControlEvent::Error { message }) => return Err(AttachError::Agent(message)),
            Some(_) => {}
            None => return Err(AttachError::Agent("the agent closed the connection".into())),
        }
        Ok(true)
    }

    /// Waits until the handover made this host the region's owner (the application may
    /// run now). `Ok(false)`: not yet after `timeout`.
    pub fn wait_owner(&mut self, timeout: Option<Duration>) -> Result<bool, AttachError> {
        let end = timeout.map(|t| std::time::Instant::now() + t);
        while !self.owner {
            let left = end.map(|e| e.saturating_duration_since(std::time::Instant::now()));
            if left.is_some_and(|l| l.is_zero()) || !self.next(left)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits until every chunk is here (post-copy finished). `Ok(false)`: not yet after
    /// `timeout`.
    pub fn wait_received(&mut self, timeout: Option<Duration>) -> Result<bool, AttachError> {
        let end = timeout.map(|t| std::time::Instant::now() + t);
        while !self.received {
            let left = end.map(|e| e.saturating_duration_since(std::time::Instant::now()));
            if left.is_some_and(|l| l.is_zero()) || !self.next(left)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Copies `buf.len()` bytes at `offset` out of the region (faulting in what is not
    /// here yet).
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.len));
        // SAFETY: the range is inside the live mapping; copies go through raw pointers.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) }
    }

    /// Copies `data` into the region at `offset`.
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.len));
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) }
    }
}
