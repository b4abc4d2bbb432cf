//! The pull state machines: what the receiver has and wants ([`PullState`]) and what the
//! sender may send next ([`BulkSender`]). Pure: no sockets, no clock, no files.
//!
//! Receiver and sender agree through [`BulkStart`] and [`BulkControl`] frames:
//!
//! * the receiver wants every chunk it has not verified; on reconnect it sends a new
//!   `BulkStart` with exactly the still-missing chunks, so nothing verified is sent again;
//! * the sender writes a data chunk only while it holds credit; the receiver grants credit
//!   back as data arrives, so at most `window` (+ one chunk) bulk bytes are ever queued;
//! * an urgent fetch of chunk `c` ends with `Have(c)` (skip it) and `Seek(c + 1)` (carry
//!   on next to where the application is reading).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use crate::proto::{BulkControl, BulkStart, ChunkHeader};
use crate::region::{Bitmap, BitmapError, Geometry};

/// A peer sent something that does not fit the transfer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    /// A chunk index past the end of the region.
    #[error("chunk {chunk} is out of range (region has {chunks} chunks)")]
    OutOfRange { chunk: u64, chunks: u64 },
    /// A chunk of the wrong length.
    #[error("chunk {chunk} has {got} bytes, expected {want}")]
    BadLength { chunk: u64, got: u32, want: u32 },
    /// The want bitmap does not fit the region.
    #[error("bad want bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    /// The request is for another geometry than the region's.
    #[error("request for a region of {want_size} bytes in {want_chunk} byte chunks, region has {size} bytes in {chunk} byte chunks")]
    Mismatch {
        want_size: u64,
        want_chunk: u32,
        size: u64,
        chunk: u32,
    },
}

/// Most credit a receiver may hold out at once (caps a hostile `Credit(u64::MAX)`).
pub const MAX_CREDIT: u64 = 1 << 40;

/// Counters of a pull.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Data bytes verified and written.
    pub data_bytes: u64,
    /// Chunks verified and written.
    pub data_chunks: u64,
    /// Chunks that were zero (nothing sent but a marker).
    pub zero_chunks: u64,
    /// Verified chunks that arrived when already present (urgent/bulk race).
    pub duplicate_chunks: u64,
    /// Urgent fetches made through this pull.
    pub urgent_fetches: u64,
    /// Times the bulk stream was (re)started.
    pub bulk_starts: u64,
}

/// What an urgent fetch must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrgentStart {
    /// The chunk is already here.
    Present,
    /// Another fetch of it is in flight: wait for it.
    InFlight,
    /// Fetch it now.
    Fetch,
    /// The bulk stream is about to deliver it (it lies within the credit the sender
    /// holds, right after the bulk cursor): wait for it briefly rather than asking twice;
    /// ask again with `wait_for_bulk = false` if it does not come.
    Bulk,
}

/// Whether a verified chunk was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    New,
    Duplicate,
}

/// How much bulk data the receiver lets the sender have in flight (credit window).
///
/// Measured on loopback (README, `cargo bench --bench pull`): every byte of bulk data
/// queued beyond the bandwidth-delay product sits FIFO in socket buffers ahead of any
/// urgent reply, so an 8 MiB window made urgent fetches wait ~11 ms (p50) while a 256 KiB
/// one kept them under 0.5 ms — and moved bulk data faster. On a rate-limited path the
/// same holds for the bottleneck's queue: what the window allows beyond one BDP waits
/// there ahead of an urgent reply. So the window tracks the path (see [`Window::Auto`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Always this many bytes.
    Fixed(u64),
    /// `gain × bandwidth × min RTT`, clamped to `[min, max]` (`min` is also at least four
    /// chunks), `gain = gain_pct / 100`. The bandwidth is the largest of the last
    /// [`RATE_FILTER`] delivered-rate samples (each over ≥ 4 min RTTs and ≥ 10 ms), so one
    /// slow sample does not shrink the window; a lasting drop is followed after that many.
    /// Until the bandwidth stops growing (by 25 % over 3 samples) the gain is at least
    /// [`STARTUP_GAIN_PCT`] (fast growth from the floor); after that, one sample in
    /// [`PROBE_EVERY`] uses at least [`PROBE_GAIN_PCT`] so that a window that limits the
    /// rate still finds a faster path.
    Auto { min: u64, max: u64, gain_pct: u16 },
}

/// Delivered-rate samples the automatic window's bandwidth filter keeps.
pub const RATE_FILTER: usize = 10;
/// Least gain (percent) of the automatic window until the bandwidth stops growing.
pub const STARTUP_GAIN_PCT: u16 = 200;
/// One sample in this many, after startup, is a probe.
pub const PROBE_EVERY: u32 = 8;
/// Least gain (percent) of a probe sample.
pub const PROBE_GAIN_PCT: u16 = 150;

/// How far a smoothed RTT may stand above the path's minimum before it counts as a
/// standing queue: min RTT / 8, within [4 ms, 16 ms] (HyStart's delay-increase
/// threshold, RFC 9406). The migration's pure post-copy uses it to leave its ramp-up.
/// (The pull's window does not: a queue signal there was measured and not kept, see
/// README, "Post-copy benchmarks".)
pub fn queue_threshold(min_rtt: Duration) -> Duration {
    (min_rtt / 8).clamp(Duration::from_millis(4), Duration::from_millis(16))
}

/// The default: adaptive between 256 KiB and 16 MiB (the per-stream receive window),
/// gain 1.1: about one BDP, so next to nothing stands in the bottleneck's queue ahead of
/// an urgent reply. Measured (README, "WAN tuning"; `cargo bench --bench wan`, 200 Mbit/s,
/// 50 ms RTT through the relay): urgent 64 KiB fetch during a pull p50 ~1.35× RTT with
/// gain 1.1 vs ~1.5× with the former gain 2 (last sample only), bulk rate unchanged; gain
/// 1.25 gained little, gain 2 with the max filter lost. On loopback the 256 KiB floor
/// decides.
pub const AUTO_WINDOW: Window = Window::Auto {
    min: 256 << 10,
    max: 16 << 20,
    gain_pct: 110,
};

/// The receiving side of a pull.
#[derive(Debug)]
pub struct PullState {
    geometry: Geometry,
    present: Bitmap,
    urgent: HashSet<u64>,
    cursor: u64,
    window_mode: Window,
    window: u64,
    /// Credit granted / data bytes received on the current bulk stream.
    granted: u64,
    received: u64,
    /// A bulk stream is running (chunks after `cursor` are on their way).
    bulk_active: bool,
    /// (time, data bytes) at the start of the current rate sample.
    sample: Option<(Duration, u64)>,
    /// Bandwidth filter of the automatic window: the last [`RATE_FILTER`] delivered rates
    /// (bytes/s), oldest first.
    rates: VecDeque<f64>,
    /// Startup: the bandwidth last seen growing by 25 %, and samples since then.
    full_rate: f64,
    flat_samples: u32,
    /// Samples since startup ended (`None`: still in startup).
    cruise: Option<u32>,
    stats: PullStats,
}

impl PullState {
    /// A pull of a region of this geometry.
    pub fn new(geometry: Geometry, window: Window) -> PullState {
        let chunk = geometry.chunk_size as u64;
        let initial = match window {
            Window::Fixed(w) => w.max(chunk),
            Window::Auto { min, .. } => min.max(4 * chunk),
        };
        PullState {
            geometry,
            present: Bitmap::new(geometry.chunks()),
            urgent: HashSet::new(),
            cursor: 0,
            window_mode: window,
            window: initial,
            granted: 0,
            received: 0,
            bulk_active: false,
            sample: None,
            rates: VecDeque::with_capacity(RATE_FILTER + 1),
            full_rate: 0.0,
            flat_samples: 0,
            cruise: None,
            stats: PullStats::default(),
        }
    }

    /// The current credit window.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Re-sizes an automatic window from the rate delivered since the last sample.
    /// `now` is any monotonic time; `min_rtt` the path's minimum round trip.
    pub fn tune(&mut self, now: Duration, min_rtt: Duration) {
        let Window::Auto { min, max, gain_pct } = self.window_mode else {
            return;
        };
        let bytes = self.stats.data_bytes;
        let Some((t0, b0)) = self.sample else {
            self.sample = Some((now, bytes));
            return;
        };
        let dt = now.saturating_sub(t0);
        if dt < (min_rtt * 4).max(Duration::from_millis(10)) {
            return;
        }
        self.sample = Some((now, bytes));
        let rate = (bytes - b0) as f64 / dt.as_secs_f64();
        if self.rates.len() == RATE_FILTER {
            self.rates.pop_front();
        }
        self.rates.push_back(rate);
        let bw = self.rates.iter().copied().fold(0.0, f64::max);
        let gain = match &mut self.cruise {
            None => {
                if bw >= 1.25 * self.full_rate {
                    self.full_rate = bw;
                    self.flat_samples = 0;
                } else {
                    self.flat_samples += 1;
                    if self.flat_samples >= 3 {
                        self.cruise = Some(0);
                    }
                }
                gain_pct.max(STARTUP_GAIN_PCT)
            }
            Some(n) => {
                *n += 1;
                if *n % PROBE_EVERY == 0 {
                    gain_pct.max(PROBE_GAIN_PCT)
                } else {
                    gain_pct
                }
            }
        };
        let floor = min.max(4 * self.geometry.chunk_size as u64);
        let target = (gain as f64 / 100.0 * bw * min_rtt.as_secs_f64()) as u64;
        self.window = target.clamp(floor, max.max(floor));
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn stats(&self) -> PullStats {
        self.stats
    }

    /// Chunks present (verified).
    pub fn present_chunks(&self) -> u64 {
        self.present.count_ones()
    }

    /// Bytes of the region present (data and zero chunks).
    pub fn present_bytes(&self) -> u64 {
        let n = self.present.count_ones();
        let g = self.geometry;
        // Every present chunk is full-size except possibly the last one.
        let last = g.chunks().saturating_sub(1);
        if n > 0 && self.present.get(last) {
            (n - 1) * g.chunk_size as u64 + g.chunk_len(last) as u64
        } else {
            n * g.chunk_size as u64
        }
    }

    pub fn is_present(&self, chunk: u64) -> bool {
        self.present.get(chunk)
    }

    /// Every chunk is here.
    pub fn is_complete(&self) -> bool {
        self.present.all()
    }

    /// The opening frame for a (new) bulk stream: exactly the missing chunks.
    pub fn bulk_start(&mut self, region: &str) -> BulkStart {
        self.granted = self.window;
        self.received = 0;
        self.bulk_active = true;
        self.stats.bulk_starts += 1;
        BulkStart {
            region: region.into(),
            chunk_size: self.geometry.chunk_size,
            size: self.geometry.size,
            want: self.present.inverted().to_bytes(),
            start: self.cursor,
            credit: self.window,
        }
    }

    /// Checks a chunk header from the peer before its bytes are read.
    pub fn check_header(&self, h: &ChunkHeader) -> Result<(), TransferError> {
        check_chunk(&self.geometry, h.chunk)?;
        let want = self.geometry.chunk_len(h.chunk);
        if h.len != want {
            return Err(TransferError::BadLength {
                chunk: h.chunk,
                got: h.len,
                want,
            });
        }
        Ok(())
    }

    /// A chunk's bytes were verified (and written, if new).
    pub fn accept(&mut self, chunk: u64, len: u32) -> Accepted {
        if self.present.set(chunk) {
            self.stats.data_bytes += len as u64;
            self.stats.data_chunks += 1;
            self.cursor = chunk + 1;
            Accepted::New
        } else {
            self.stats.duplicate_chunks += 1;
            Accepted::Duplicate
        }
    }

    /// Chunks `first .. first+count` are zero.
    pub fn accept_zero(&mut self, first: u64, count: u64) -> Result<u64, TransferError> {
        let chunks = self.geometry.chunks();
        let end = first.checked_add(count).filter(|e| *e <= chunks);
        let Some(end) = end else {
            return Err(TransferError::OutOfRange {
                chunk: first.saturating_add(count),
                chunks,
            });
        };
        let mut new = 0;
        for c in first..end {
            new += self.present.set(c) as u64;
        }
        self.stats.zero_chunks += new;
        if count > 0 {
            self.cursor = end;
        }
        Ok(new)
    }

    /// Bulk data bytes received: returns credit to grant back, once a quarter window (at
    /// least one chunk) is free, so that at most `window` bytes are outstanding.
    pub fn grant(&mut self, received: u64) -> Option<u64> {
        self.received += received;
        let outstanding = self.granted.saturating_sub(self.received);
        let free = self.window.saturating_sub(outstanding);
        let step = (self.window / 4).max(self.geometry.chunk_size as u64);
        (free >= step).then(|| {
            self.granted += free;
            free
        })
    }

    /// Urgent fetches in flight.
    pub fn urgent_in_flight(&self) -> usize {
        self.urgent.len()
    }

    /// The bulk stream ended (done, or the connection went away).
    pub fn bulk_stopped(&mut self) {
        self.bulk_active = false;
    }

    /// An urgent fetch of `chunk` is asked for. With `wait_for_bulk`, a chunk the bulk
    /// stream is about to deliver gives [`UrgentStart::Bulk`].
    pub fn urgent_begin(
        &mut self,
        chunk: u64,
        wait_for_bulk: bool,
    ) -> Result<UrgentStart, TransferError> {
        check_chunk(&self.geometry, chunk)?;
        if self.present.get(chunk) {
            return Ok(UrgentStart::Present);
        }
        if self.urgent.contains(&chunk) {
            return Ok(UrgentStart::InFlight);
        }
        if wait_for_bulk && self.bulk_active {
            let outstanding = self.granted.saturating_sub(self.received);
            let ahead = (outstanding / self.geometry.chunk_size as u64).max(1);
            if chunk >= self.cursor && chunk < self.cursor.saturating_add(ahead) {
                return Ok(UrgentStart::Bulk);
            }
        }
        self.urgent.insert(chunk);
        self.stats.urgent_fetches += 1;
        Ok(UrgentStart::Fetch)
    }

    /// Right after [`UrgentStart::Fetch`]: move the bulk stream to just after `chunk`, so
    /// what follows streams in while the urgent fetch runs (locality).
    pub fn urgent_seek(&mut self, chunk: u64) -> Vec<BulkControl> {
        let next = (chunk + 1).min(self.geometry.chunks());
        self.cursor = next;
        vec![BulkControl::Seek(next)]
    }

    /// The urgent fetch of `chunk` ended (`got`: its bytes were verified and written).
    /// Returns what to tell the bulk sender.
    pub fn urgent_end(&mut self, chunk: u64, got: Option<u32>) -> Vec<BulkControl> {
        self.urgent.remove(&chunk);
        let Some(len) = got else {
            return Vec::new();
        };
        // Accepting must not pull the bulk cursor back to this chunk.
        let cursor = self.cursor;
        if len == 0 {
            self.accept_zero(chunk, 1).ok();
        } else {
            self.accept(chunk, len);
        }
        self.cursor = cursor;
        vec![BulkControl::Have(chunk)]
    }
}

fn check_chunk(g: &Geometry, chunk: u64) -> Result<(), TransferError> {
    if chunk >= g.chunks() {
        Err(TransferError::OutOfRange {
            chunk,
            chunks: g.chunks(),
        })
    } else {
        Ok(())
    }
}

/// What the bulk sender does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send this chunk (check for holes / zero first).
    Chunk(u64),
    /// Wait for credit.
    WaitCredit,
    /// Every wanted chunk has been sent.
    Done,
}

/// The sending side of one bulk stream.
#[derive(Debug)]
pub struct BulkSender {
    geometry: Geometry,
    want: Bitmap,
    cursor: u64,
    credit: u64,
}

impl BulkSender {
    /// Validates a peer's [`BulkStart`] against our region's geometry.
    pub fn new(geometry: Geometry, start: &BulkStart) -> Result<BulkSender, TransferError> {
        if start.size != geometry.size || start.chunk_size != geometry.chunk_size {
            return Err(TransferError::Mismatch {
                want_size: start.size,
                want_chunk: start.chunk_size,
                size: geometry.size,
                chunk: geometry.chunk_size,
            });
        }
        let want = Bitmap::from_bytes(&start.want, geometry.chunks())?;
        Ok(BulkSender {
            geometry,
            want,
            cursor: start.start.min(geometry.chunks()),
            credit: start.credit.min(MAX_CREDIT),
        })
    }

    /// Applies a control frame from the receiver.
    pub fn on_control(&mut self, c: BulkControl) -> Result<(), TransferError> {
        match c {
            BulkControl::Credit(n) => self.credit = self.credit.saturating_add(n).min(MAX_CREDIT),
            BulkControl::Seek(chunk) => {
                // Seeking to one past the end is allowed (after fetching the last chunk).
                if chunk > self.geometry.chunks() {
                    check_chunk(&self.geometry, chunk)?;
                }
                self.cursor = chunk;
            }
            BulkControl::Have(chunk) => {
                check_chunk(&self.geometry, chunk)?;
                self.want.clear(chunk);
            }
        }
        Ok(())
    }

    /// The next step.
    pub fn next(&self) -> Next {
        match self.want.next_set_wrapping(self.cursor) {
            None => Next::Done,
            Some(_) if self.credit == 0 => Next::WaitCredit,
            Some(c) => Next::Chunk(c),
        }
    }

    /// Takes up to `max` consecutive wanted chunks from `first` on (a zero run); returns
    /// how many were taken (at least 1 when `first` is wanted).
    pub fn take_run(&mut self, first: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max && self.want.clear(first + n) {
            n += 1;
        }
        self.cursor = first + n;
        n
    }

    /// Data bytes sent for a chunk taken with [`take_run`](Self::take_run).
    pub fn spend(&mut self, len: u32) {
        self.credit = self.credit.saturating_sub(len as u64);
    }

    /// Chunks still to send.
    pub fn remaining(&self) -> u64 {
        self.want.count_ones()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(size: u64) -> Geometry {
        Geometry::new(size, 4096).unwrap()
    }

    /// Runs a whole transfer between the two state machines with a fake region in which
    /// chunks divisible by `zero_every` (if any) are zero, delivering at most `in_flight` chunks
    /// before the receiver gets to answer. Returns the receiver and the data chunks sent.
    fn simulate(
        rx: &mut PullState,
        zero_every: Option<u64>,
        max_sends: u64,
        urgent: &[(u64, u64)],
    ) -> Vec<u64> {
        let mut tx = BulkSender::new(rx.geometry(), &rx.bulk_start("r")).unwrap();
        let mut sent = Vec::new();
        let mut steps = 0;
        loop {
            for &(at, chunk) in urgent {
                if at == steps && rx.urgent_begin(chunk, false).unwrap() == UrgentStart::Fetch {
                    let len = rx.geometry().chunk_len(chunk);
                    let seek = rx.urgent_seek(chunk);
                    for c in seek.into_iter().chain(rx.urgent_end(chunk, Some(len))) {
                        tx.on_control(c).unwrap();
                    }
                }
            }
            steps += 1;
            if steps > max_sends {
                break;
            }
            match tx.next() {
                Next::Done => break,
                Next::WaitCredit => panic!("stalled on credit"),
                Next::Chunk(c) => {
                    if zero_every.is_some_and(|z| c % z == 0) {
                        let n = tx.take_run(c, 1);
                        rx.accept_zero(c, n).unwrap();
                    } else {
                        assert_eq!(tx.take_run(c, 1), 1);
                        let len = rx.geometry().chunk_len(c);
                        tx.spend(len);
                        sent.push(c);
                        rx.check_header(&ChunkHeader {
                            chunk: c,
                            len,
                            hash: [0; 32],
                        })
                        .unwrap();
                        assert_eq!(rx.accept(c, len), Accepted::New);
                        if let Some(n) = rx.grant(len as u64) {
                            tx.on_control(BulkControl::Credit(n)).unwrap();
                        }
                    }
                }
            }
        }
        sent
    }

    #[test]
    fn whole_transfer_sends_every_chunk_once() {
        for size in [0u64, 1, 4095, 4096, 4097, 100 * 4096 + 7] {
            let mut rx = PullState::new(g(size), Window::Fixed(16 * 4096));
            let sent = simulate(&mut rx, Some(3), u64::MAX, &[]);
            assert!(rx.is_complete(), "size {size}");
            assert_eq!(rx.present_bytes(), size);
            let mut s = sent.clone();
            s.dedup();
            assert_eq!(s.len(), sent.len());
            assert_eq!(rx.stats().duplicate_chunks, 0);
        }
    }

    #[test]
    fn resume_sends_only_missing_chunks() {
        let mut rx = PullState::new(g(1000 * 4096), Window::Fixed(8 * 4096));
        let first = simulate(&mut rx, None, 400, &[]);
        assert_eq!(first.len(), 400);
        assert!(!rx.is_complete());
        // Connection lost; a new bulk stream resumes.
        let second = simulate(&mut rx, None, u64::MAX, &[]);
        assert!(rx.is_complete());
        assert_eq!(first.len() + second.len(), 1000);
        assert!(second.iter().all(|c| !first.contains(c)));
        assert_eq!(rx.stats().bulk_starts, 2);
    }

    #[test]
    fn urgent_fetch_moves_the_bulk_cursor_and_is_not_resent() {
        let mut rx = PullState::new(g(1000 * 4096), Window::Fixed(8 * 4096));
        let sent = simulate(&mut rx, None, u64::MAX, &[(5, 700)]);
        assert!(rx.is_complete());
        assert!(!sent.contains(&700));
        // After the urgent fetch at step 5, the next chunk sent is 701.
        assert_eq!(sent[5], 701);
        assert_eq!(rx.stats().urgent_fetches, 1);
    }

    #[test]
    fn credit_bounds_what_is_in_flight() {
        let mut rx = PullState::new(g(100 * 4096), Window::Fixed(8 * 4096));
        let mut tx = BulkSender::new(rx.geometry(), &rx.bulk_start("r")).unwrap();
        let mut n = 0;
        while let Next::Chunk(c) = tx.next() {
            tx.take_run(c, 1);
            tx.spend(4096);
            n += 1;
        }
        assert_eq!(tx.next(), Next::WaitCredit);
        assert_eq!(n, 8);
    }

    #[test]
    fn urgent_states() {
        let mut rx = PullState::new(g(10 * 4096), Window::Fixed(4096));
        assert_eq!(rx.urgent_in_flight(), 0);
        assert_eq!(rx.urgent_begin(3, true), Ok(UrgentStart::Fetch));
        assert_eq!(rx.urgent_begin(3, true), Ok(UrgentStart::InFlight));
        assert_eq!(rx.urgent_in_flight(), 1);
        assert!(rx.urgent_end(3, None).is_empty());
        assert_eq!(rx.urgent_in_flight(), 0);
        assert_eq!(rx.urgent_begin(3, true), Ok(UrgentStart::Fetch));
        assert_eq!(rx.urgent_seek(3), vec![BulkControl::Seek(4)]);
        assert_eq!(rx.urgent_end(3, Some(4096)), vec![BulkControl::Have(3)]);
        assert_eq!(rx.urgent_begin(3, true), Ok(UrgentStart::Present));
        assert!(matches!(
            rx.urgent_begin(10, true),
            Err(TransferError::OutOfRange { .. })
        ));
        assert_eq!(rx.accept(3, 4096), Accepted::Duplicate);
    }

    #[test]
    fn a_chunk_the_bulk_stream_is_about_to_deliver_is_waited_for() {
        // 4 chunks of credit: after the seek to 4, chunks 4..8 are on their way.
        let mut rx = PullState::new(g(100 * 4096), Window::Fixed(4 * 4096));
        assert_eq!(
            rx.urgent_begin(5, true),
            Ok(UrgentStart::Fetch),
            "no bulk yet"
        );
        rx.urgent_end(5, None);
        rx.bulk_start("r");
        assert_eq!(rx.urgent_begin(3, true), Ok(UrgentStart::Bulk));
        assert_eq!(rx.urgent_begin(3, false), Ok(UrgentStart::Fetch));
        rx.urgent_seek(3);
        rx.urgent_end(3, Some(4096));
        assert_eq!(rx.urgent_begin(4, true), Ok(UrgentStart::Bulk));
        assert_eq!(rx.urgent_begin(7, true), Ok(UrgentStart::Bulk));
        assert_eq!(
            rx.urgent_begin(8, true),
            Ok(UrgentStart::Fetch),
            "beyond the credit"
        );
        rx.bulk_stopped();
        assert_eq!(
            rx.urgent_begin(4, true),
            Ok(UrgentStart::Fetch),
            "stream gone"
        );
    }

    #[test]
    fn hostile_input_is_rejected() {
        let geo = g(10 * 4096 + 1);
        let mut rx = PullState::new(geo, Window::Fixed(4096));
        let start = rx.bulk_start("r");
        let mut bad = start.clone();
        bad.want.push(0);
        assert!(matches!(
            BulkSender::new(geo, &bad),
            Err(TransferError::Bitmap(_))
        ));
        let mut bad = start.clone();
        bad.size += 1;
        assert!(matches!(
            BulkSender::new(geo, &bad),
            Err(TransferError::Mismatch { .. })
        ));
        let mut tx = BulkSender::new(geo, &start).unwrap();
        assert!(tx.on_control(BulkControl::Have(u64::MAX)).is_err());
        assert!(tx.on_control(BulkControl::Seek(u64::MAX)).is_err());
        assert!(tx.on_control(BulkControl::Seek(11)).is_ok());
        tx.on_control(BulkControl::Credit(u64::MAX)).unwrap();
        tx.on_control(BulkControl::Credit(u64::MAX)).unwrap();
        assert!(rx
            .check_header(&ChunkHeader {
                chunk: 10,
                len: 2,
                hash: [0; 32]
            })
            .is_err());
        assert!(rx
            .check_header(&ChunkHeader {
                chunk: u64::MAX,
                len: 1,
                hash: [0; 32]
            })
            .is_err());
        assert!(rx.accept_zero(u64::MAX, 2).is_err());
        assert!(rx.accept_zero(5, 7).is_err());
        assert_eq!(rx.accept_zero(5, 6), Ok(6));
    }

    #[test]
    fn window_tracks_rate_times_rtt_and_bounds_outstanding_credit() {
        let geo = Geometry::new(1 << 30, 65536).unwrap();
        let mut rx = PullState::new(
            geo,
            Window::Auto {
                min: 256 << 10,
                max: 16 << 20,
                gain_pct: 200,
            },
        );
        assert_eq!(rx.window(), 256 << 10);
        let start = rx.bulk_start("r");
        assert_eq!(start.credit, 256 << 10);
        let rtt = Duration::from_millis(50);
        rx.tune(Duration::ZERO, rtt);
        // 100 MB/s delivered over 200 ms at 50 ms min RTT: window = 2 * 100e6 * 0.05.
        let mut t = Duration::ZERO;
        for i in 0..305u64 {
            rx.accept(i, 65536);
            t += Duration::from_micros(656);
        }
        rx.tune(t, rtt);
        let w = rx.window();
        assert!((9_000_000..=11_000_000).contains(&w), "{w}");
        // Never above max, never below the floor.
        for i in 305..10_000u64 {
            rx.accept(i, 65536);
        }
        rx.tune(t + Duration::from_millis(200), rtt);
        assert_eq!(rx.window(), 16 << 20);
        rx.tune(t + Duration::from_secs(100), Duration::from_micros(30));
        assert_eq!(rx.window(), 256 << 10);
        // Outstanding credit never exceeds the window, even as it shrinks.
        let mut rx = PullState::new(geo, Window::Fixed(1 << 20));
        let s = rx.bulk_start("r");
        let mut outstanding = s.credit as i64;
        for _ in 0..100 {
            outstanding -= 65536;
            if let Some(n) = rx.grant(65536) {
                outstanding += n as i64;
            }
            assert!((0..=1 << 20).contains(&outstanding));
        }
    }

    /// One 200 ms rate sample (4 × 50 ms min RTT) delivering about `rate` bytes/s in
    /// 64 KiB chunks; returns the window after it.
    fn feed(rx: &mut PullState, next: &mut u64, t: &mut Duration, rate: f64) -> u64 {
        for _ in 0..(rate * 0.2 / 65536.0).round() as u64 {
            rx.accept(*next, 65536);
            *next += 1;
        }
        *t += Duration::from_millis(200);
        rx.tune(*t, Duration::from_millis(50));
        rx.window()
    }

    fn auto(gain_pct: u16) -> PullState {
        PullState::new(
            Geometry::new(1 << 34, 65536).unwrap(),
            Window::Auto {
                min: 256 << 10,
                max: 16 << 20,
                gain_pct,
            },
        )
    }

    /// `gain × rate × 50 ms`, ±3 % (a sample holds whole chunks).
    fn near(w: u64, gain: f64, rate: f64) -> bool {
        let want = gain * rate * 0.05;
        (w as f64 - want).abs() <= want * 0.03
    }

    #[test]
    fn queue_threshold_is_an_eighth_of_the_min_rtt_within_4_and_16_ms() {
        let ms = Duration::from_millis;
        assert_eq!(queue_threshold(Duration::from_micros(100)), ms(4));
        assert_eq!(queue_threshold(ms(50)), Duration::from_micros(6250));
        assert_eq!(queue_threshold(ms(1000)), ms(16));
    }

    /// A path whose RTT sits above its minimum for good (jitter, or a queue the pull
    /// does not own): the delivered rate is the window over the RTT it sees, which the
    /// window (sized from the minimum) undershoots; its probes must keep it at the
    /// link's rate rather than let it shrink sample after sample.
    #[test]
    fn a_steadily_high_rtt_does_not_starve_the_window() {
        let link = 80e6;
        for srtt in [50.0e-3, 58e-3, 70e-3] {
            let mut rx = auto(110);
            let (mut next, mut t) = (0, Duration::ZERO);
            rx.tune(t, Duration::from_millis(50));
            let mut rates = Vec::new();
            for _ in 0..200 {
                let rate = (rx.window() as f64 / srtt).min(link);
                feed(&mut rx, &mut next, &mut t, rate);
                rates.push(rate);
            }
            let tail = &rates[100..];
            let mean = tail.iter().sum::<f64>() / tail.len() as f64;
            assert!(mean >= 0.8 * link, "RTT {srtt}: {mean} of {link}");
        }
    }

    #[test]
    fn auto_window_starts_at_gain_two_then_cruises_at_its_gain_with_probes() {
        let mut rx = auto(110);
        let (mut next, mut t) = (0, Duration::ZERO);
        rx.tune(t, Duration::from_millis(50));
        // Startup: the rate grows (the window limits it), the gain is 2.
        for rate in [5e6, 10e6, 20e6, 40e6, 80e6] {
            let w = feed(&mut rx, &mut next, &mut t, rate);
            assert!(near(w, 2.0, rate), "{w} at {rate}");
        }
        // The bandwidth stops growing: still gain 2 for the 3 flat samples...
        for _ in 0..3 {
            let w = feed(&mut rx, &mut next, &mut t, 80e6);
            assert!(near(w, 2.0, 80e6), "{w}");
        }
        // ...then the configured gain, one sample in PROBE_EVERY at PROBE_GAIN_PCT.
        for i in 1..=3 * PROBE_EVERY {
            let w = feed(&mut rx, &mut next, &mut t, 80e6);
            let gain = if i % PROBE_EVERY == 0 { 1.5 } else { 1.1 };
            assert!(near(w, gain, 80e6), "sample {i}: {w}");
        }
    }

    #[test]
    fn auto_window_keeps_the_max_rate_over_the_filter_then_follows_a_drop() {
        for gain_pct in [200u16, 125, 110] {
            let mut rx = auto(gain_pct);
            // The gain of the n-th sample after startup.
            let gain = |n: u32| {
                let g = if n % PROBE_EVERY == 0 {
                    gain_pct.max(PROBE_GAIN_PCT)
                } else {
                    gain_pct
                };
                g as f64 / 100.0
            };
            let (mut next, mut t) = (0, Duration::ZERO);
            rx.tune(t, Duration::from_millis(50));
            // Startup: one sample up, three flat.
            for _ in 0..4 {
                feed(&mut rx, &mut next, &mut t, 100e6);
            }
            let mut n = 0;
            for _ in 0..PROBE_EVERY + 2 {
                n += 1;
                let w = feed(&mut rx, &mut next, &mut t, 100e6);
                assert!(near(w, gain(n), 100e6), "gain {gain_pct}, n {n}: {w}");
            }
            // One slow sample (a stall): the window does not shrink.
            n += 1;
            let w = feed(&mut rx, &mut next, &mut t, 1e6);
            assert!(near(w, gain(n), 100e6), "gain {gain_pct}, n {n}: {w}");
            // A lasting drop to 10 MB/s: the window holds until the 100 MB/s samples have
            // left the filter, then follows.
            for i in 2..=RATE_FILTER + 2 {
                n += 1;
                let w = feed(&mut rx, &mut next, &mut t, 10e6);
                let rate = if i < RATE_FILTER { 100e6 } else { 10e6 };
                assert!(near(w, gain(n), rate), "gain {gain_pct}, n {n}: {w}");
            }
            // A rate increase shows at once.
            n += 1;
            let w = feed(&mut rx, &mut next, &mut t, 50e6);
            assert!(near(w, gain(n), 50e6), "gain {gain_pct}, n {n}: {w}");
        }
    }

    #[test]
    fn auto_window_stays_within_its_bounds() {
        let mut rx = auto(110);
        let (mut next, mut t) = (0, Duration::ZERO);
        rx.tune(t, Duration::from_millis(50));
        assert_eq!(feed(&mut rx, &mut next, &mut t, 1e6), 256 << 10);
        for _ in 0..10 {
            feed(&mut rx, &mut next, &mut t, 2e9);
        }
        assert_eq!(rx.window(), 16 << 20);
        // No data for the whole filter: the floor.
        for _ in 0..RATE_FILTER {
            feed(&mut rx, &mut next, &mut t, 0.0);
        }
        assert_eq!(rx.window(), 256 << 10);
    }
}
