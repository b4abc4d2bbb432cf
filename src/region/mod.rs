//! Regions: a name, a size and a backing, cut into fixed-size chunks.

mod bitmap;
mod file;

pub use bitmap::{Bitmap, BitmapError};
pub use file::{chunk_hash, ChunkRead, DestFile, FileRegion, RegionError};

use crate::proto::{MAX_CHUNKS, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Default chunk size: 64 KiB. Measured here (README, `cargo bench --bench pull`, chunk
/// sweep): an idle urgent fetch costs ~0.19 ms at 16 KiB, ~0.3 ms at 64 KiB, ~0.7 ms at
/// 256 KiB and ~2.4 ms at 1 MiB, while bulk throughput at 64 KiB is within the run-to-run
/// noise of larger chunks; 64 KiB is also where batched UFFDIO_COPY gets most of its speed,
/// which post-copy will use.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// How a region is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub chunk_size: u32,
}

/// A geometry a peer or a file gave us does not fit our limits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    /// Chunk size is not a power of two in [4 KiB, 16 MiB].
    #[error("chunk size {0} is not a power of two between 4 KiB and 16 MiB")]
    ChunkSize(u64),
    /// Too many chunks for one region.
    #[error("region of {size} bytes has more than {max} chunks of {chunk_size} bytes")]
    TooLarge {
        size: u64,
        chunk_size: u32,
        max: u64,
    },
}

impl Geometry {
    /// Validates and builds a geometry.
    pub fn new(size: u64, chunk_size: u64) -> Result<Geometry, GeometryError> {
        if !chunk_size.is_power_of_two()
            || chunk_size < MIN_CHUNK_SIZE as u64
            || chunk_size > MAX_CHUNK_SIZE as u64
        {
            return Err(GeometryError::ChunkSize(chunk_size));
        }
        let g = Geometry {
            size,
            chunk_size: chunk_size as u32,
        };
        if g.chunks() > MAX_CHUNKS {
            return Err(GeometryError::TooLarge {
                size,
                chunk_size: g.chunk_size,
                max: MAX_CHUNKS,
            });
        }
        Ok(g)
    }

    /// Number of chunks (the last may be short).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    /// Byte offset of chunk `i`.
    pub fn offset(&self, i: u64) -> u64 {
        i * self.chunk_size as u64
    }

    /// Length of chunk `i` (0 past the end).
    pub fn chunk_len(&self, i: u64) -> u32 {
        let off = self.offset(i.min(self.chunks()));
        (self.size.saturating_sub(off)).min(self.chunk_size as u64) as u32
    }

    /// The chunk holding byte `off`.
    pub fn chunk_of(&self, off: u64) -> u64 {
        off / self.chunk_size as u64
    }
}

/// True when every byte is zero (word at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned
        // middle of the slice and leaves the unaligned ends as bytes.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let g = Geometry::new(65537, 65536).unwrap();
        assert_eq!(g.chunks(), 2);
        assert_eq!(g.chunk_len(0), 65536);
        assert_eq!(g.chunk_len(1), 1);
        assert_eq!(g.chunk_len(2), 0);
        assert_eq!(g.chunk_len(u64::MAX), 0);
        assert_eq!(Geometry::new(0, 4096).unwrap().chunks(), 0);
        assert!(Geometry::new(1, 4097).is_err());
        assert!(Geometry::new(1, 2048).is_err());
        assert!(Geometry::new(1, 32 << 20).is_err());
        assert!(Geometry::new(64 << 30, 4096).is_ok());
        assert!(Geometry::new((64 << 30) + 1, 4096).is_err());
    }

    #[test]
    fn zero_check() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[3..]));
        assert!(is_zero(&[]));
    }
}
