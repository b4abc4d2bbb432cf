//! Dirty tracking: which parts of a region were written since we last looked. Every
//! tracker answers the same question through [`DirtyTracker`], so replication does not
//! care where the answer comes from:
//!
//! | tracker | sees | how |
//! | --- | --- | --- |
//! | `uffd_wp` async | writes through an attached mapping | userfaultfd WP_ASYNC + `PAGEMAP_SCAN` (`PM_SCAN_WP_MATCHING`): no signal per write; one ioctl reads the written pages and re-protects them |
//! | `uffd_wp` sync | the same, on kernels without WP_ASYNC | WP fault → mark dirty → unprotect |
//! | `mprotect` | the same, anywhere | `PROT_READ` granules, SIGSEGV marks a bitmap and unprotects; coarse granules keep the VMA count under `vm.max_map_count` |
//! | `inotify` | `write(2)`/truncate on a file by any process | inotify says *that* the file changed, xxh3 chunk hashes say *where* |
//! | `hash_scan` | anything, including mmap writes by processes that did not attach | periodic xxh3 hash of every chunk |

pub mod file;
pub mod mprotect;
pub mod uffd_wp;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Byte ranges relative to the start of the region: sorted, non-overlapping, merged, each
/// aligned to the tracker's granule (page, protection granule or chunk) and clipped to the
/// region's size.
pub type Ranges = Vec<Range<u64>>;

/// A tracker could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The kernel refused a setup step (feature missing, permission, bad mapping).
    #[error("{what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    /// Collecting failed.
    #[error("{what}: {source}")]
    Collect {
        what: &'static str,
        source: std::io::Error,
    },
    /// The tracked mapping or file is gone.
    #[error("tracked region is gone: {0}")]
    Gone(String),
    /// The tracker cannot hold writers ([`DirtyTracker::freeze`]).
    #[error("the {0} tracker cannot hold writers: freezing by write-protection needs memory an application published with the client library")]
    CannotFreeze(&'static str),
}

/// Reports what was written.
///
/// Contract: every write that completes before a call to [`collect`](Self::collect)
/// starts is covered by a range returned by that call or an earlier one; a write that
/// lands while `collect` runs is covered by that call or the next. Ranges may
/// over-report (a whole granule for one byte; a page written with the same bytes), never
/// under-report. `collect` re-arms tracking for what it returns.
pub trait DirtyTracker: Send {
    /// Short name for status and logs (`uffd-wp-async`, `uffd-wp-sync`, `mprotect`,
    /// `inotify`, `hash-scan`).
    fn name(&self) -> &'static str;

    /// The ranges written since the previous call (since creation for the first call).
    fn collect(&mut self) -> Result<Ranges, TrackError>;

    /// How often the whole region is rescanned besides the tracker's events (the
    /// inotify file tracker's periodic hash scan), if at all.
    fn scan_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether [`freeze`](Self::freeze) works here.
    fn can_freeze(&self) -> bool {
        false
    }

    /// Holds every writer of the tracked memory until [`thaw`](Self::thaw) (a
    /// migration's freeze): the whole region is write-protected and write faults are
    /// held, not resolved. Returns once no write can land any more; writes completed
    /// before it are reported by the next `collect`, as always. Reads go on.
    fn freeze(&mut self) -> Result<(), TrackError> {
        Err(TrackError::CannotFreeze(self.name()))
    }

    /// Lets the writers held by [`freeze`](Self::freeze) go (an aborted migration).
    fn thaw(&mut self) -> Result<(), TrackError> {
        Ok(())
    }
}

/// Merges sorted-or-not ranges into the canonical form of [`Ranges`] (sorted, merged,
/// empty ranges dropped).
pub fn normalize(mut r: Vec<Range<u64>>) -> Ranges {
    r.retain(|x| x.start < x.end);
    r.sort_by_key(|x| x.start);
    let mut out: Ranges = Vec::with_capacity(r.len());
    for x in r {
        match out.last_mut() {
            Some(last) if x.start <= last.end => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

/// Widens each range to `granule` boundaries, clips to `size`, and normalizes.
pub fn align(r: Vec<Range<u64>>, granule: u64, size: u64) -> Ranges {
    normalize(
        r.into_iter()
            .map(|x| {
                let s = x.start / granule * granule;
                let e = x.end.div_ceil(granule).saturating_mul(granule).min(size);
                s.min(size)..e
            })
            .collect(),
    )
}

/// Clears a bitmap of atomic words (one bit per page or granule) and returns the runs of
/// bits that were set, as `(first, count)`, in order. Words that read zero are skipped
/// without a write.
pub(crate) fn take_runs(words: &[AtomicU64]) -> Vec<(usize, usize)> {
    runs(words, true)
}

/// The runs of set bits, as [`take_runs`] returns them, clearing them only if `take`.
pub(crate) fn runs(words: &[AtomicU64], take: bool) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if w.load(Ordering::Acquire) == 0 {
            continue;
        }
        let mut bits = if take {
            w.swap(0, Ordering::AcqRel)
        } else {
            w.load(Ordering::Acquire)
        };
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let x = i * 64 + b;
            match runs.last_mut() {
                Some((first, n)) if *first + *n == x => *n += 1,
                _ => runs.push((x, 1)),
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_and_align() {
        assert_eq!(
            normalize(vec![5..7, 0..2, 1..3, 7..9, 4..4]),
            vec![0..3, 5..9]
        );
        assert_eq!(align(vec![1..2, 4097..4098], 4096, 6000), vec![0..6000]);
        assert_eq!(
            align(vec![1..2, 8193..8194], 4096, 10000),
            vec![0..4096, 8192..10000]
        );
    }
}
