//! The writer's side of replication: an application owns a region in memory and the
//! local agent replicates what it writes to replicas on other hosts, found by a dirty
//! tracker (no call from the app says what it wrote).
//!
//! ```no_run
//! use pagewire::client::publish::{publish, PublishOptions};
//! let p = publish(&PublishOptions::new("/run/pagewire.sock", "counters", 1 << 20, &["beta"]))?;
//! p.write_at(0, b"hello");
//! let epoch = p.flush(std::time::Duration::from_secs(10))?; // every replica has it
//! # Ok::<(), pagewire::client::AttachError>(())
//! ```
//!
//! Trackers (`PublishOptions::tracker`; with `Auto`, the `PAGEWIRE_TRACKER` environment
//! variable can choose): `uffd-wp-async` (default where the kernel has WP_ASYNC and PAGEMAP_SCAN:
//! no signal per write; the agent reads and re-protects written pages in one ioctl on
//! this process's pagemap), `uffd-wp-sync` (a write fault per page per epoch, handled by
//! the agent), `mprotect` (PROT_READ granules and a SIGSEGV handler in this process; the
//! agent asks this library to collect). The region is served by the agent under its
//! name while published (peers can pull or mount it), and unpublished when this handle
//! drops or the process exits.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::AttachError;
use crate::control::{ControlEvent, ControlRequest, PublishArgs};
use crate::fault::{self, fdpass};
use crate::track::{uffd_wp, DirtyTracker};

/// How a published region's writes are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerKind {
    /// `uffd-wp-async` where supported, else `mprotect`.
    Auto,
    UffdWpAsync,
    UffdWpSync,
    Mprotect,
}

impl TrackerKind {
    pub fn parse(s: &str) -> Result<TrackerKind, String> {
        match s {
            "auto" => Ok(TrackerKind::Auto),
            "uffd-wp-async" | "uffd-wp" => Ok(TrackerKind::UffdWpAsync),
            "uffd-wp-sync" => Ok(TrackerKind::UffdWpSync),
            "mprotect" => Ok(TrackerKind::Mprotect),
            o => Err(format!(
                "unknown tracker {o:?} (auto, uffd-wp-async, uffd-wp-sync, mprotect)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TrackerKind::Auto => "auto",
            TrackerKind::UffdWpAsync => "uffd-wp-async",
            TrackerKind::UffdWpSync => "uffd-wp-sync",
            TrackerKind::Mprotect => "mprotect",
        }
    }
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub control: PathBuf,
    /// The region's name (the replicas serve a region of this name and size).
    pub region: String,
    pub size: u64,
    /// Replica peers.
    pub to: Vec<String>,
    pub tracker: TrackerKind,
    /// How often the agent collects and pushes changes.
    pub interval: Duration,
}

impl PublishOptions {
    pub fn new(
        control: impl Into<PathBuf>,
        region: &str,
        size: u64,
        to: &[&str],
    ) -> PublishOptions {
        PublishOptions {
            control: control.into(),
            region: region.into(),
            size,
            to: to.iter().map(|s| s.to_string()).collect(),
            tracker: TrackerKind::Auto,
            interval: Duration::from_millis(50),
        }
    }
}

/// A published region: raw pointer and length (write through them, or `write_at`).
pub struct Published {
    ptr: *mut u8,
    len: usize,
    tracker: TrackerKind,
    region: String,
    control: PathBuf,
    stream: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The mprotect tracker lives here (it must run in this process).
    local: Option<Arc<Mutex<Box<dyn DirtyTracker>>>>,
    _map: memmap2::MmapRaw,
    _file: File,
}

// SAFETY: a shared mapping and descriptors; access to the bytes is the application's
// business.
unsafe impl Send for Published {}
// SAFETY: as above.
unsafe impl Sync for Published {}

/// Maps a new region of `opts.size` bytes (zeros) and has the local agent replicate it.
pub fn publish(opts: &PublishOptions) -> Result<Published, AttachError> {
    if opts.size == 0 {
        return Err(AttachError::Agent("cannot publish an empty region".into()));
    }
    let page = fault::uffd::page_size();
    let map_len = opts.size.next_multiple_of(page);
    let file =
        fault::memfd(&format!("pagewire:{}", opts.region), opts.size).map_err(AttachError::Map)?;
    let map = memmap2::MmapOptions::new()
        .len(map_len as usize)
        .map_raw(&file)
        .map_err(AttachError::Map)?;
    let base = map.as_mut_ptr();
    let mut tracker = opts.tracker;
    if tracker == TrackerKind::Auto {
        // Operators and tests can pick the tracker without changing the application.
        if let Ok(v) = std::env::var("PAGEWIRE_TRACKER") {
            tracker = TrackerKind::parse(&v).map_err(AttachError::Agent)?;
        }
    }
    if tracker == TrackerKind::Auto {
        tracker = if uffd_wp::async_supported() {
            TrackerKind::UffdWpAsync
        } else {
            TrackerKind::Mprotect
        };
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut local = None;
    match tracker {
        TrackerKind::UffdWpAsync => {
            let (uffd, pagemap) = uffd_wp::prepare_async(base, map_len as usize)
                .map_err(|e| AttachError::Agent(format!("uffd-wp-async: {e}")))?;
            fds.push(uffd);
            fds.push(pagemap.into());
        }
        TrackerKind::UffdWpSync => {
            let uffd = uffd_wp::prepare_sync(base, map_len as usize)
                .map_err(|e| AttachError::Agent(format!("uffd-wp-sync: {e}")))?;
            fds.push(uffd);
        }
        TrackerKind::Mprotect => {
            let t = crate::track::mprotect::MprotectTracker::new(base, map_len as usize, None)
                .map_err(|e| AttachError::Agent(format!("mprotect tracker: {e}")))?;
            local = Some(Arc::new(Mutex::new(Box::new(t) as Box<dyn DirtyTracker>)));
        }
        TrackerKind::Auto => unreachable!("resolved above"),
    }
    let stream = UnixStream::connect(&opts.control).map_err(|source| AttachError::Connect {
        path: opts.control.clone(),
        source,
    })?;
    let req = ControlRequest::Publish(PublishArgs {
        region: opts.region.clone(),
        size: opts.size,
        base: base as u64,
        map_len,
        tracker: tracker.name().into(),
        to: opts.to.clone(),
        interval_ms: opts.interval.as_millis() as u64,
    });
    let mut line = serde_json::to_vec(&req).map_err(|e| AttachError::Protocol(e.to_string()))?;
    line.push(b'\n');
    let mut send: Vec<RawFd> = vec![file.as_raw_fd()];
    send.extend(fds.iter().map(|f| f.as_raw_fd()));
    fdpass::send_with_fds(stream.as_raw_fd(), &line, &send)?;
    // The agent has its copies now. Ours go: if the agent dies, its descriptors close,
    // the write protection goes with them and writes here never block on it.
    drop(fds);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut l = String::new();
    reader.read_line(&mut l)?;
    match serde_json::from_str::<ControlEvent>(l.trim_end()) {
        Ok(ControlEvent::Published { .. }) => {}
        Ok(ControlEvent::Error { message }) => return Err(AttachError::Agent(message)),
        Ok(other) => return Err(AttachError::Protocol(format!("unexpected {other:?}"))),
        Err(e) => return Err(AttachError::Protocol(e.to_string())),
    }
    let writer = stream.try_clone()?;
    let t = local.clone();
    let range = (base as usize, map_len as usize);
    let thread = std::thread::Builder::new()
        .name("pagewire-publish".into())
        .spawn(move || serve_agent(reader, writer, t, range))?;
    Ok(Published {
        ptr: base,
        len: opts.size as usize,
        tracker,
        region: opts.region.clone(),
        control: opts.control.clone(),
        stream,
        thread: Some(thread),
        local,
        _map: map,
        _file: file,
    })
}

fn locked(t: &Mutex<Box<dyn DirtyTracker>>) -> std::sync::MutexGuard<'_, Box<dyn DirtyTracker>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers the agent's requests until the session ends: collects (mprotect tracker)
/// and a migration's hold/release of the writers. Writers still held when the session
/// ends (the region migrated away, or the agent went) are let go.
fn serve_agent(
    mut reader: BufReader<UnixStream>,
    mut writer: UnixStream,
    tracker: Option<Arc<Mutex<Box<dyn DirtyTracker>>>>,
    (base, len): (usize, usize),
) {
    // Without a local tracker (uffd-wp-async) the hold is ours.
    let mut hold: Option<fault::hold::Hold> = None;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let reply = match serde_json::from_str::<ControlEvent>(line.trim_end()) {
            Ok(ControlEvent::Collect) => match &tracker {
                Some(t) => match locked(t).collect() {
                    Ok(r) => ControlRequest::Collected {
                        ranges: r.into_iter().map(|r| (r.start, r.end)).collect(),
                        error: None,
                    },
                    Err(e) => ControlRequest::Collected {
                        ranges: Vec::new(),
                        error: Some(e.to_string()),
                    },
                },
                None => ControlRequest::Collected {
                    ranges: Vec::new(),
                    error: Some("this process has no local tracker".into()),
                },
            },
            Ok(ControlEvent::Hold) => {
                let r = match &tracker {
                    Some(t) => locked(t).freeze().map_err(|e| e.to_string()),
                    None if hold.is_some() => Ok(()),
                    None => fault::hold::Hold::new(base as *mut u8, len)
                        .map(|h| hold = Some(h))
                        .map_err(|e| format!("holding the writers: {e}")),
                };
                ControlRequest::Held { error: r.err() }
            }
            Ok(ControlEvent::Release) => {
                let r = match &tracker {
                    Some(t) => locked(t).thaw().map_err(|e| e.to_string()),
                    None => {
                        if let Some(h) = hold.take() {
                            h.release(true);
                        }
                        Ok(())
                    }
                };
                ControlRequest::Held { error: r.err() }
            }
            _ => continue,
        };
        let Ok(mut out) = serde_json::to_vec(&reply) else {
            break;
        };
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            break;
        }
    }
    if let Some(h) = hold.take() {
        h.release(true);
    }
    if let Some(t) = &tracker {
        let _ = locked(t).thaw();
    }
}

impl Published {
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tracker in use.
    pub fn tracker(&self) -> TrackerKind {
        self.tracker
    }

    /// Copies `data` into the region at `offset`.
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.len));
        // SAFETY: inside the live mapping; raw copy, no reference to shared memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) }
    }

    /// Copies bytes out of the region.
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.len));
        // SAFETY: as in `write_at`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) }
    }

    /// Returns once every replica has applied everything written before the call; the
    /// epoch that carried it.
    pub fn flush(&self, timeout: Duration) -> Result<u64, AttachError> {
        let s = UnixStream::connect(&self.control).map_err(|source| AttachError::Connect {
            path: self.control.clone(),
            source,
        })?;
        let req = ControlRequest::Flush {
            region: self.region.clone(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut line =
            serde_json::to_vec(&req).map_err(|e| AttachError::Protocol(e.to_string()))?;
        line.push(b'\n');
        (&s).write_all(&line)?;
        let mut r = BufReader::new(s);
        let mut l = String::new();
        r.read_line(&mut l)?;
        match serde_json::from_str::<ControlEvent>(l.trim_end()) {
            Ok(ControlEvent::Flushed { epoch }) => Ok(epoch),
            Ok(ControlEvent::Error { message }) => Err(AttachError::Agent(message)),
            Ok(other) => Err(AttachError::Protocol(format!("unexpected {other:?}"))),
            Err(e) => Err(AttachError::Protocol(e.to_string())),
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.local.take();
    }
}
