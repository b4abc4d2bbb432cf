//! The reader's side of replication: an application on a replica host maps the replica's
//! copy of a region read-only and waits for epochs.
//!
//! The agent applies epochs in order; within an epoch, pieces land in offset order. So a
//! reader that wants a consistent view either reads after [`Replica::wait_epoch`] while
//! the writer is quiet, or checks its own invariant (e.g. a checksum stored at the end
//! of the region, which is applied last) and retries — what `examples/shared_buffer.rs`
//! does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::AttachError;
use crate::control::{ControlEvent, ControlRequest};

/// A replica's copy of a region, mapped read-only.
pub struct Replica {
    map: memmap2::MmapRaw,
    len: usize,
    region: String,
    control: PathBuf,
}

fn request(control: &Path, req: &ControlRequest) -> Result<ControlEvent, AttachError> {
    let s = UnixStream::connect(control).map_err(|source| AttachError::Connect {
        path: control.into(),
        source,
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| AttachError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&s).write_all(&line)?;
    let mut r = BufReader::new(s);
    let mut l = String::new();
    r.read_line(&mut l)?;
    match serde_json::from_str::<ControlEvent>(l.trim_end()) {
        Ok(ControlEvent::Error { message }) => Err(AttachError::Agent(message)),
        Ok(ev) => Ok(ev),
        Err(e) => Err(AttachError::Protocol(e.to_string())),
    }
}

/// Maps the local agent's copy of `region` (a region it serves, which an owner
/// replicates into).
pub fn open_replica(control: &Path, region: &str) -> Result<Replica, AttachError> {
    let ControlEvent::Status(st) = request(control, &ControlRequest::Status)? else {
        return Err(AttachError::Protocol("expected status".into()));
    };
    let r = st
        .regions
        .iter()
        .find(|r| r.name == region)
        .ok_or_else(|| AttachError::Agent(format!("the agent has no region {region:?}")))?;
    let file = std::fs::File::open(&r.path).map_err(AttachError::Map)?;
    let len = file.metadata().map_err(AttachError::Map)?.len() as usize;
    if len == 0 {
        return Err(AttachError::Agent(format!("region {region:?} is empty")));
    }
    let map = memmap2::MmapOptions::new()
        .len(len)
        .map_raw_read_only(&file)
        .map_err(AttachError::Map)?;
    Ok(Replica {
        map,
        len,
        region: region.into(),
        control: control.into(),
    })
}

impl Replica {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the read-only mapping.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Copies bytes out of the replica.
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.len));
        // SAFETY: inside the live mapping; a raw copy, never a reference to memory the
        // agent writes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// The last epoch applied in full; an error while nothing was applied
    /// ([`Replica::wait_epoch`] with 0 waits for the owner's first catch-up).
    pub fn epoch(&self) -> Result<u64, AttachError> {
        self.wait(None, Duration::ZERO)
    }

    /// Waits until epoch `n` is applied (or `timeout` passes: an error); returns the
    /// applied epoch.
    pub fn wait_epoch(&self, n: u64, timeout: Duration) -> Result<u64, AttachError> {
        self.wait(Some(n), timeout)
    }

    fn wait(&self, n: Option<u64>, timeout: Duration) -> Result<u64, AttachError> {
        let req = ControlRequest::Epoch {
            region: self.region.clone(),
            wait: n,
            timeout_ms: timeout.as_millis() as u64,
        };
        match request(&self.control, &req)? {
            ControlEvent::Epoch { epoch } => Ok(epoch),
            other => Err(AttachError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}
