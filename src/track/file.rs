//! Trackers for file regions changed by other processes: inotify says *that* the file
//! changed (write(2), truncate, close-after-write by any process), xxh3 chunk hashes say
//! *where*. inotify does not report writes through a `MAP_SHARED` mapping (inotify(7);
//! verified here), so a periodic full hash scan is the only way to see those.
//!
//! [`FileTracker`] is both: `inotify` mode rehashes the file only after an event (and
//! every `scan_interval` if set); `hash-scan` mode rehashes at every collection.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{normalize, DirtyTracker, Ranges, TrackError};
use crate::region::{FileRegion, Geometry};

/// Which events count.
const MASK: u32 = libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_MOVE_SELF
    | libc::IN_DELETE_SELF;

/// An inotify watch on one file.
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    /// Watches `path` for writes, truncation, moves and deletion.
    pub fn watch(path: &Path) -> Result<Inotify, TrackError> {
        let setup = |e| TrackError::Setup {
            what: "inotify",
            source: e,
        };
        // SAFETY: inotify_init1 takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(setup(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| setup(std::io::Error::other(e)))?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cpath.as_ptr(), MASK) };
        if wd < 0 {
            return Err(setup(std::io::Error::last_os_error()));
        }
        Ok(Inotify { fd })
    }

    /// Drains pending events: `Ok(true)` when any arrived. The buffer is parsed
    /// defensively (each record's length is checked against what was read).
    pub fn drain(&self) -> Result<bool, TrackError> {
        let mut any = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a stack buffer of the given size.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(any),
                    Some(libc::EINTR) => continue,
                    _ => Err(TrackError::Collect {
                        what: "reading inotify events",
                        source: e,
                    }),
                };
            }
            let n = n as usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut off = 0;
            while off + header <= n {
                // The name length is the last u32 of the header.
                let len = u32::from_ne_bytes(
                    buf[off + header - 4..off + header]
                        .try_into()
                        .unwrap_or([0; 4]),
                ) as usize;
                let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap_or([0; 4]));
                if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0 {
                    return Err(TrackError::Gone(
                        "the file was deleted or moved away".into(),
                    ));
                }
                any = true;
                off += header + len;
            }
            if n == 0 {
                return Ok(any);
            }
        }
    }

    /// Waits up to `timeout` for an event to be readable.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on our stack.
        let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        r > 0
    }
}

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// A file region's tracker (`inotify` or `hash-scan`).
pub struct FileTracker {
    region: FileRegion,
    hashes: Vec<u64>,
    inotify: Option<Inotify>,
    scan_every: Option<Duration>,
    last_scan: Instant,
    scans: u64,
    /// The last rescan found the file gone (resized, deleted, replaced): every
    /// collection checks again until it is back, rather than reporting no change.
    gone: bool,
}

impl FileTracker {
    /// Tracks the file at `path` as a region of `geometry`. With `use_inotify`, chunks
    /// are rehashed only after inotify events, plus every `scan_every`; without, at
    /// every collection. The current contents are the baseline.
    pub fn new(
        path: &Path,
        geometry: Geometry,
        use_inotify: bool,
        scan_every: Option<Duration>,
    ) -> Result<FileTracker, TrackError> {
        let setup = |e: String| TrackError::Setup {
            what: "file tracker",
            source: std::io::Error::other(e),
        };
        // Watch first, then hash: a write in between is seen by both, never by neither.
        let inotify = if use_inotify {
            Some(Inotify::watch(path)?)
        } else {
            None
        };
        let file = File::open(path).map_err(|e| setup(format!("{}: {e}", path.display())))?;
        let region = FileRegion::from_file("tracked", path, file, geometry.chunk_size)
            .map_err(|e| setup(e.to_string()))?;
        if region.geometry() != geometry {
            return Err(setup(format!(
                "{} is {} bytes, the region {}",
                path.display(),
                region.geometry().size,
                geometry.size
            )));
        }
        let hashes = region.chunk_hashes().map_err(|e| setup(e.to_string()))?;
        Ok(FileTracker {
            region,
            hashes,
            inotify,
            scan_every,
            last_scan: Instant::now(),
            scans: 1,
            gone: false,
        })
    }

    /// Full hash scans done so far (the first one at creation).
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// The inotify watch, if any (to wait for events).
    pub fn inotify(&self) -> Option<&Inotify> {
        self.inotify.as_ref()
    }

    /// The current chunk hashes.
    pub fn chunk_hashes(&self) -> &[u64] {
        &self.hashes
    }

    /// Why the file the tracker has open is no longer the region's file at its path.
    fn replaced(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let path = self.region.path();
        let open = self.region.file().metadata().ok()?;
        let now = std::fs::metadata(path).ok();
        let same = now
            .as_ref()
            .is_some_and(|m| (m.dev(), m.ino()) == (open.dev(), open.ino()));
        if open.nlink() > 0 && same {
            return None;
        }
        Some(format!(
            "{} is no longer the file this agent serves ({}); the served copy is the old one: write the file in place, and restart the agent to serve the new one",
            path.display(),
            if now.is_some() {
                "it was replaced, e.g. renamed over as editors, rsync and sed -i do"
            } else {
                "it was deleted"
            }
        ))
    }

    fn rescan(&mut self) -> Result<Ranges, TrackError> {
        let r = self.rescan_inner();
        self.gone = matches!(r, Err(TrackError::Gone(_)));
        r
    }

    fn rescan_inner(&mut self) -> Result<Ranges, TrackError> {
        if let Some(why) = self.replaced() {
            return Err(TrackError::Gone(why));
        }
        let size = self.region.file().metadata().map(|m| m.len()).unwrap_or(0);
        if size != self.region.geometry().size {
            return Err(TrackError::Gone(format!(
                "the file changed size ({} -> {size} bytes); a region's size is fixed",
                self.region.geometry().size
            )));
        }
        let now = self
            .region
            .chunk_hashes()
            .map_err(|e| TrackError::Collect {
                what: "hashing the file",
                source: std::io::Error::other(e.to_string()),
            })?;
        self.scans += 1;
        self.last_scan = Instant::now();
        let g = self.region.geometry();
        let changed = now
            .iter()
            .zip(&self.hashes)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(c, _)| {
                let c = c as u64;
                g.offset(c)..g.offset(c) + g.chunk_len(c) as u64
            })
            .collect();
        self.hashes = now;
        Ok(normalize(changed))
    }
}

impl DirtyTracker for FileTracker {
    fn scan_interval(&self) -> Option<Duration> {
        self.scan_every.filter(|_| self.inotify.is_some())
    }

    fn name(&self) -> &'static str {
        if self.inotify.is_some() {
            "inotify"
        } else {
            "hash-scan"
        }
    }

    fn collect(&mut self) -> Result<Ranges, TrackError> {
        let due = self
            .scan_every
            .is_some_and(|every| self.last_scan.elapsed() >= every);
        let changed = match self.inotify.as_ref().map(|i| i.drain()) {
            None => true,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                self.gone = matches!(e, TrackError::Gone(_));
                return Err(e);
            }
        };
        if changed || due || self.gone {
            self.rescan()
        } else {
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let p = d.path().join("f");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&[7; 100], 3 << 16).unwrap();
        (d, p)
    }

    #[test]
    fn hash_scan_finds_changed_chunks_and_nothing_else() {
        let size = (8 << 20) + 5;
        let (_d, p) = file(size);
        let g = Geometry::new(size, 64 << 10).unwrap();
        let mut t = FileTracker::new(&p, g, false, None).unwrap();
        assert!(t.collect().unwrap().is_empty());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.write_all_at(b"x", 10).unwrap();
        f.write_all_at(b"y", size - 1).unwrap();
        f.write_all_at(&[7; 100], 3 << 16).unwrap(); // same bytes: no change
        assert_eq!(t.collect().unwrap(), vec![0..65536, (128 << 16)..size]);
        assert!(t.collect().unwrap().is_empty());
        // Writes through a mapping are seen too.
        // SAFETY: a private temp file nobody truncates.
        let mut m = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        m[5 << 16] = 1;
        m.flush().unwrap();
        assert_eq!(t.collect().unwrap(), vec![(5 << 16)..(6 << 16)]);
    }

    #[test]
    fn inotify_sees_write_2_by_another_process_and_not_mmap_writes() {
        let size = 4 << 20;
        let (_d, p) = file(size);
        let g = Geometry::new(size, 64 << 10).unwrap();
        let mut t = FileTracker::new(&p, g, true, None).unwrap();
        assert!(t.collect().unwrap().is_empty());
        let scans = t.scans();
        assert!(t.collect().unwrap().is_empty());
        assert_eq!(t.scans(), scans, "no event, no rehash");
        let st = std::process::Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=4096",
                "seek=17",
                "count=1",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("of={}", p.display()))
            .status()
            .unwrap();
        assert!(st.success());
        assert!(t.inotify().unwrap().wait(Duration::from_secs(5)));
        assert_eq!(t.collect().unwrap(), vec![(64 << 10)..(128 << 10)]);
        // An mmap write makes no inotify event...
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        // SAFETY: a private temp file nobody truncates.
        let mut m = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        m[2 << 20] = 9;
        m.flush().unwrap();
        assert!(t.collect().unwrap().is_empty());
        // ...but the periodic scan finds it.
        let mut t2 = FileTracker::new(&p, g, true, Some(Duration::ZERO)).unwrap();
        m[3 << 20] = 9;
        assert_eq!(
            t2.collect().unwrap(),
            vec![(3 << 20)..((3 << 20) + (64 << 10))]
        );
    }

    #[test]
    fn a_size_change_is_an_error() {
        let (_d, p) = file(1 << 20);
        let g = Geometry::new(1 << 20, 64 << 10).unwrap();
        let mut t = FileTracker::new(&p, g, false, None).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        assert!(matches!(t.collect(), Err(TrackError::Gone(_))));
    }

    /// With inotify, an error stays until the file is right again (the events that
    /// showed it are drained: the next collection must not say "no change"); a file
    /// renamed over the served one (editors, rsync, sed -i) is such an error.
    #[test]
    fn a_resized_or_replaced_file_stays_an_error_until_it_is_back() {
        let (d, p) = file(1 << 20);
        let g = Geometry::new(1 << 20, 64 << 10).unwrap();
        let mut t = FileTracker::new(&p, g, true, None).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(512 << 10).unwrap();
        assert!(t.inotify().unwrap().wait(Duration::from_secs(5)));
        assert!(matches!(t.collect(), Err(TrackError::Gone(_))));
        assert!(matches!(t.collect(), Err(TrackError::Gone(_))), "sticky");
        f.set_len(1 << 20).unwrap();
        assert!(t.collect().is_ok(), "back to its size");
        let new = d.path().join("new");
        std::fs::write(&new, vec![5u8; 1 << 20]).unwrap();
        std::fs::rename(&new, &p).unwrap();
        let e = match t.collect() {
            Err(TrackError::Gone(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(e.contains("replaced"), "{e}");
        assert!(matches!(t.collect(), Err(TrackError::Gone(_))), "sticky");
    }
}
