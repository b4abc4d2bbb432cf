//! File-backed regions (tmpfs, /dev/shm or disk; sparse files welcome).
//!
//! The serving side reads with `pread`, not through a mapping: a file region may be
//! truncated by another process at any time, and a load through a mapping past the new end
//! raises SIGBUS in the agent, while `pread` just returns short (an error reply). Holes are
//! found with `SEEK_DATA`, so sparse chunks are never read (reading a tmpfs hole through a
//! mapping would even allocate it).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{is_zero, Geometry, GeometryError};

/// Opening or using a region's file failed.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The file could not be opened or created.
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file's size does not fit the chunk limits.
    #[error("{path}: {source}")]
    Geometry {
        path: PathBuf,
        source: GeometryError,
    },
    /// Reading or writing a chunk failed (the file may have been truncated).
    #[error("{op} chunk {chunk} of {path}: {source}")]
    Io {
        op: &'static str,
        chunk: u64,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The served file is shorter than the region it was opened as (truncated since).
    #[error("{path} is now {now} bytes, shorter than the {size} bytes it is served as: it was truncated while served (restart the agent to serve it at its new size)")]
    Shrunk { path: PathBuf, size: u64, now: u64 },
    /// The file is already served under another region name.
    #[error("{path} is already served as region {other:?}: serve a file under one name only (a migration or replication of one name would change the other's bytes under it)")]
    AlreadyServed { path: PathBuf, other: String },
}

/// The chunk hash replication compares (xxh3-64 of the chunk's bytes).
/// Bytes [`FileRegion::chunk_hashes`] reads at a time.
const HASH_BLOCK: u64 = 256 << 10;
/// Threads [`FileRegion::chunk_hashes`] uses at most.
const HASH_THREADS: usize = 4;

pub fn chunk_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// What reading a chunk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRead {
    /// The chunk is all zero bytes (nothing was copied into the buffer, or it was zero).
    Zero,
    /// `len` bytes of data were read into the buffer.
    Data(u32),
}

/// A region served from a file.
#[derive(Debug)]
pub struct FileRegion {
    name: String,
    path: PathBuf,
    file: File,
    geometry: Geometry,
}

impl FileRegion {
    /// Opens an existing file as a region of its current size.
    pub fn open(name: &str, path: &Path, chunk_size: u32) -> Result<FileRegion, RegionError> {
        let open_err = |source| RegionError::Open {
            path: path.into(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(std::io::Error::other(
                "not a regular file (a region is served from a file)",
            )));
        }
        let size = meta.len();
        let geometry =
            Geometry::new(size, chunk_size as u64).map_err(|source| RegionError::Geometry {
                path: path.into(),
                source,
            })?;
        Ok(FileRegion {
            name: name.into(),
            path: path.into(),
            file,
            geometry,
        })
    }

    /// The served file's identity (device, inode), whatever its path's spelling.
    pub fn file_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// A region over an already open file (an application's memfd), labelled `path`.
    pub fn from_file(
        name: &str,
        path: &Path,
        file: File,
        chunk_size: u32,
    ) -> Result<FileRegion, RegionError> {
        let size = file
            .metadata()
            .map_err(|source| RegionError::Open {
                path: path.into(),
                source,
            })?
            .len();
        let geometry =
            Geometry::new(size, chunk_size as u64).map_err(|source| RegionError::Geometry {
                path: path.into(),
                source,
            })?;
        Ok(FileRegion {
            name: name.into(),
            path: path.into(),
            file,
            geometry,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The open file (for readers that need more than whole chunks).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RegionError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| RegionError::Io {
                op: "reading",
                chunk: self.geometry.chunk_of(offset),
                path: self.path.clone(),
                source,
            })
    }

    /// xxh3-64 of every chunk ([`chunk_hash`]); holes are hashed without being read.
    ///
    /// Reads `HASH_BLOCK` at a time (one `pread` and one hole probe per block, not per
    /// chunk: with 4 KiB chunks the syscalls were most of the cost, ~0.8 s per GiB) and
    /// splits the region over up to `HASH_THREADS` threads. A migration rehashes a file
    /// region after freezing its writer, so this is on the downtime's path.
    pub fn chunk_hashes(&self) -> Result<Vec<u64>, RegionError> {
        let g = self.geometry;
        let n = g.chunks() as usize;
        if n == 0 {
            return Ok(Vec::new());
        }
        let zero = vec![0u8; g.chunk_size as usize];
        let mut out = vec![chunk_hash(&zero); n];
        out[n - 1] = chunk_hash(&zero[..g.chunk_len(n as u64 - 1) as usize]);
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(HASH_THREADS);
        // At least a block per thread, so small regions stay on this thread.
        let chunks_per_block = (HASH_BLOCK / g.chunk_size as u64).max(1) as usize;
        let per = n.div_ceil(threads).max(chunks_per_block);
        if per >= n {
            self.hash_chunks(0, &mut out)?;
            return Ok(out);
        }
        std::thread::scope(|s| {
            let parts: Vec<_> = out
                .chunks_mut(per)
                .enumerate()
                .map(|(i, part)| s.spawn(move || self.hash_chunks((i * per) as u64, part)))
                .collect();
            parts.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(RegionError::Io {
                        op: "hashing",
                        chunk: 0,
                        path: self.path.clone(),
                        source: std::io::Error::other("a hashing thread panicked"),
                    })
                })
            })
        })?;
        Ok(out)
    }

    /// Hashes chunks `first..first + out.len()` into `out`, skipping holes (their entry
    /// must already hold the zero chunk's hash).
    fn hash_chunks(&self, first: u64, out: &mut [u64]) -> Result<(), RegionError> {
        let g = self.geometry;
        let end = first + out.len() as u64;
        let chunk_size = g.chunk_size as u64;
        let per_block = (HASH_BLOCK / chunk_size).max(1);
        let mut buf = vec![0u8; (per_block * chunk_size) as usize];
        let mut c = first;
        while c < end {
            let holes = self.hole_run(c).min(end - c);
            if holes > 0 {
                c += holes;
                continue;
            }
            let k = per_block.min(end - c);
            let bytes =
                (g.offset(c + k - 1) + g.chunk_len(c + k - 1) as u64 - g.offset(c)) as usize;
            self.read_at(g.offset(c), &mut buf[..bytes])?;
            for (i, piece) in buf[..bytes].chunks(g.chunk_size as usize).enumerate() {
                out[(c - first) as usize + i] = chunk_hash(piece);
            }
            c += k;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The file's size now (0 if it cannot be read).
    fn current_len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// How many chunks from `chunk` on lie wholly inside a hole of the file (0 when
    /// `chunk` holds data, or the filesystem cannot tell).
    pub fn hole_run(&self, chunk: u64) -> u64 {
        let g = self.geometry;
        let off = g.offset(chunk);
        if off >= g.size {
            return 0;
        }
        // SAFETY: lseek on a file descriptor we own; SEEK_DATA only reads the file's
        // extent map and moves this fd's offset, which nothing else here relies on (all
        // reads are pread).
        let data = unsafe { libc::lseek(self.file.as_raw_fd(), off as i64, libc::SEEK_DATA) };
        let data_at = if data < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // No data at or after `off`: the rest of the file is a hole, unless the
                // file was truncated under us (then reading the chunk says so, rather
                // than the region being served as zeros).
                Some(libc::ENXIO) if self.current_len() < g.size => return 0,
                Some(libc::ENXIO) => g.size,
                // Filesystem without SEEK_DATA support: assume data.
                _ => return 0,
            }
        } else {
            data as u64
        };
        if data_at <= off {
            return 0;
        }
        let end_chunk = if data_at >= g.size {
            g.chunks()
        } else {
            g.chunk_of(data_at)
        };
        end_chunk.saturating_sub(chunk)
    }

    /// Reads chunk `chunk` into `buf` (which must hold a whole chunk).
    pub fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> Result<ChunkRead, RegionError> {
        let len = self.geometry.chunk_len(chunk) as usize;
        let buf = &mut buf[..len];
        self.file
            .read_exact_at(buf, self.geometry.offset(chunk))
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::UnexpectedEof => RegionError::Shrunk {
                    path: self.path.clone(),
                    size: self.geometry.size,
                    now: self.current_len(),
                },
                _ => RegionError::Io {
                    op: "reading",
                    chunk,
                    path: self.path.clone(),
                    source,
                },
            })?;
        Ok(if is_zero(buf) {
            ChunkRead::Zero
        } else {
            ChunkRead::Data(len as u32)
        })
    }
}

/// The file a pull writes into: created (or emptied) at the region's size, so zero chunks
/// need no write and stay holes.
#[derive(Debug)]
pub struct DestFile {
    path: PathBuf,
    file: File,
}

impl DestFile {
    /// Creates `path` (truncating what was there) as a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<DestFile, RegionError> {
        let open = || -> std::io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?;
            f.set_len(size)?;
            Ok(f)
        };
        let file = open().map_err(|source| RegionError::Open {
            path: path.into(),
            source,
        })?;
        Ok(DestFile {
            path: path.into(),
            file,
        })
    }

    /// Writes chunk data at its offset.
    pub fn write_chunk(&self, g: &Geometry, chunk: u64, data: &[u8]) -> Result<(), RegionError> {
        self.file
            .write_all_at(data, g.offset(chunk))
            .map_err(|source| RegionError::Io {
                op: "writing",
                chunk,
                path: self.path.clone(),
                source,
            })
    }

    /// Reads a chunk back (for urgent fetches of chunks already here).
    pub fn read_chunk(&self, g: &Geometry, chunk: u64) -> Result<Vec<u8>, RegionError> {
        let mut buf = vec![0; g.chunk_len(chunk) as usize];
        self.file
            .read_exact_at(&mut buf, g.offset(chunk))
            .map_err(|source| RegionError::Io {
                op: "reading",
                chunk,
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }

    /// Flushes data to stable storage.
    pub fn sync(&self) -> Result<(), RegionError> {
        self.file.sync_data().map_err(|source| RegionError::Io {
            op: "syncing",
            chunk: 0,
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        let f = File::create(&p).unwrap();
        f.set_len(64 * 4096).unwrap();
        f.write_all_at(&[1; 10], 10 * 4096 + 5).unwrap();
        drop(f);
        let r = FileRegion::open("r", &p, 4096).unwrap();
        let mut buf = vec![0; 4096];
        // Filesystems without SEEK_DATA report 0 holes; where supported, the run ends at
        // chunk 10.
        let run = r.hole_run(0);
        assert!(run == 0 || run == 10, "{run}");
        assert_eq!(r.hole_run(10), 0);
        assert_eq!(r.read_chunk(10, &mut buf).unwrap(), ChunkRead::Data(4096));
        assert_eq!(buf[5], 1);
        assert_eq!(r.read_chunk(11, &mut buf).unwrap(), ChunkRead::Zero);
        let tail = r.hole_run(11);
        assert!(tail == 0 || tail == 53, "{tail}");
        assert_eq!(r.hole_run(64), 0);
    }

    /// A served file truncated under the agent is an error naming it, not a region of
    /// zeros (the hole probe past the new end finds no data).
    #[test]
    fn a_file_truncated_while_served_is_an_error_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        std::fs::write(&p, vec![7u8; 16 * 4096]).unwrap();
        let r = FileRegion::open("r", &p, 4096).unwrap();
        let mut buf = vec![0; 4096];
        assert_eq!(r.read_chunk(15, &mut buf).unwrap(), ChunkRead::Data(4096));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(2 * 4096)
            .unwrap();
        assert_eq!(r.hole_run(4), 0, "not a hole: truncated");
        let e = r.read_chunk(4, &mut buf).unwrap_err();
        assert!(
            matches!(
                e,
                RegionError::Shrunk {
                    size: 65536,
                    now: 8192,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("truncated while served"), "{e}");
        assert_eq!(r.read_chunk(1, &mut buf).unwrap(), ChunkRead::Data(4096));
        // A directory is no region.
        let e = FileRegion::open("d", dir.path(), 4096).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    /// Block-wise, threaded hashing gives what hashing each chunk on its own gives: holes,
    /// data at block and thread boundaries, a short last chunk.
    #[test]
    fn chunk_hashes_match_per_chunk_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        let f = File::create(&p).unwrap();
        // 3 MiB of 4 KiB chunks + a 100-byte tail: 769 chunks over several blocks.
        let size = 3 * HASH_BLOCK + 100;
        f.set_len(size).unwrap();
        for (i, off) in [
            0,
            4095,
            600 * 4096,
            HASH_BLOCK - 1,
            2 * HASH_BLOCK + 7,
            size - 1,
        ]
        .into_iter()
        .enumerate()
        {
            f.write_all_at(&[i as u8 + 1], off).unwrap();
        }
        drop(f);
        let bytes = std::fs::read(&p).unwrap();
        for chunk_size in [4096u32, 65536, 1 << 21] {
            let r = FileRegion::open("r", &p, chunk_size).unwrap();
            let want: Vec<u64> = bytes.chunks(chunk_size as usize).map(chunk_hash).collect();
            assert_eq!(r.chunk_hashes().unwrap(), want, "chunk size {chunk_size}");
        }
        let empty = dir.path().join("e");
        File::create(&empty).unwrap();
        let r = FileRegion::open("e", &empty, 4096).unwrap();
        assert!(r.chunk_hashes().unwrap().is_empty());
    }
}
