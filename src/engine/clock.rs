//! Placing a peer's timestamps on this host's clock, NTP's way, with no clock of its own.
//!
//! Two hosts' monotonic clocks have unrelated origins, so an instant the peer reports
//! ("my application resumed at t") means nothing here until the offset between the two
//! clocks is known. A *sample* is one exchange: this side stamps a ping when it sends it
//! (`sent`), the peer stamps it on its own clock when it answers (`peer`), and this side
//! stamps the answer when it arrives (`received`). Causality bounds the peer's stamp to
//! lie between `sent` and `received` on this clock, so the offset is the midpoint with an
//! error of at most half the exchange's round trip, whatever the two directions' delays
//! were. Queueing only widens that bound, never breaks it, so the sample with the
//! shortest round trip (close in time to the instant being placed) is the one to use.
//! Clock rates differ too: [`DRIFT`] widens a sample's bound with its age.

use std::collections::VecDeque;
use std::time::Duration;

/// The largest rate difference assumed between two hosts' monotonic clocks (500 ppm:
/// the most NTP slews a clock by; free-running crystals are within ~100 ppm).
pub const DRIFT: f64 = 500e-6;

/// Samples kept (the newest).
const SAMPLES: usize = 64;

/// One exchange: this side's send and receive stamps and the peer's stamp between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub sent: Duration,
    pub received: Duration,
    pub peer: Duration,
}

impl Sample {
    /// The peer's clock minus this side's, in ns.
    fn offset_ns(&self) -> i128 {
        self.peer.as_nanos() as i128
            - (self.sent.as_nanos() as i128 + self.received.as_nanos() as i128) / 2
    }

    fn mid_ns(&self) -> i128 {
        (self.sent.as_nanos() as i128 + self.received.as_nanos() as i128) / 2
    }

    /// Half the round trip: the most the offset can be off by.
    fn half_rtt(&self) -> Duration {
        self.received.saturating_sub(self.sent) / 2
    }
}

/// Samples of one peer's clock.
#[derive(Debug, Clone, Default)]
pub struct ClockSync {
    samples: VecDeque<Sample>,
}

impl ClockSync {
    pub fn new() -> ClockSync {
        ClockSync::default()
    }

    /// Adds one exchange. A sample received before it was sent is ignored.
    pub fn add(&mut self, s: Sample) {
        if s.received < s.sent {
            return;
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// The peer's instant `peer_t` on this side's clock, and the most it can be off by,
    /// from the sample that bounds it best (half its round trip plus [`DRIFT`] times
    /// its distance in time). `None` without samples. Instants before this clock's
    /// origin come out as zero.
    pub fn to_local(&self, peer_t: Duration) -> Option<(Duration, Duration)> {
        self.samples
            .iter()
            .map(|s| {
                let local = peer_t.as_nanos() as i128 - s.offset_ns();
                let age = (local - s.mid_ns()).unsigned_abs() as f64 * 1e-9;
                let err = s.half_rtt() + Duration::from_secs_f64((age * DRIFT).min(1e9));
                (local, err)
            })
            .min_by_key(|(_, err)| *err)
            .map(|(local, err)| {
                let local = Duration::from_nanos(local.clamp(0, u64::MAX as i128) as u64);
                (local, err)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// The peer's clock runs `offset` ahead (may be negative) of this one; one exchange
    /// sent at `t` with one-way delays `out` and `back`.
    fn exchange(t: u64, out: u64, back: u64, offset: i64) -> Sample {
        Sample {
            sent: us(t),
            peer: us((t as i64 + out as i64 + offset) as u64),
            received: us(t + out + back),
        }
    }

    #[test]
    fn symmetric_delays_give_the_exact_offset() {
        for offset in [-5_000_000i64, 0, 123_456_789] {
            let mut c = ClockSync::new();
            c.add(exchange(10_000_000, 300, 300, offset));
            let peer_t = (20_000_000 + offset) as u64;
            let (local, err) = c.to_local(us(peer_t)).unwrap();
            assert_eq!(local, us(20_000_000), "offset {offset}");
            // 300 µs half round trip + 500 ppm of the 9.9997 s since the sample's middle.
            let want = 300.0 + 9_999_700.0 * DRIFT;
            assert!((err.as_secs_f64() * 1e6 - want).abs() < 0.01, "{err:?}");
        }
    }

    #[test]
    fn asymmetric_delays_stay_within_the_bound() {
        let mut c = ClockSync::new();
        c.add(exchange(1_000_000, 9_000, 1_000, 777_000));
        let (local, err) = c.to_local(us(1_500_000 + 777_000)).unwrap();
        let truth = us(1_500_000);
        let off = local.abs_diff(truth);
        assert_eq!(off, us(4_000));
        assert!(off <= err, "{off:?} > {err:?}");
    }

    #[test]
    fn the_tightest_sample_wins_and_a_recent_one_beats_an_old_one() {
        let mut c = ClockSync::new();
        // Queued behind data: a wide bound, and a wrong midpoint.
        c.add(exchange(1_000_000, 40_000, 500, 1_000));
        // Idle: tight.
        c.add(exchange(2_000_000, 200, 200, 1_000));
        let (local, err) = c.to_local(us(2_100_000 + 1_000)).unwrap();
        assert_eq!(local, us(2_100_000));
        assert!(err < us(300), "{err:?}");
        // An hour later, a fresh sample with a 1 ms round trip beats the old 400 µs one
        // (whose drift allowance has grown to 1.8 s).
        c.add(exchange(3_600_000_000, 500, 500, 1_000));
        let (_, err) = c.to_local(us(3_600_100_000 + 1_000)).unwrap();
        assert!(err < us(1_000), "{err:?}");
    }

    #[test]
    fn nothing_without_samples_and_backwards_samples_are_ignored() {
        let mut c = ClockSync::new();
        assert_eq!(c.to_local(us(5)), None);
        c.add(Sample {
            sent: us(10),
            received: us(5),
            peer: us(7),
        });
        assert_eq!(c.to_local(us(5)), None);
        // A peer instant far before this clock's origin comes out as zero.
        c.add(exchange(0, 10, 10, 1_000_000));
        assert_eq!(c.to_local(us(0)).unwrap().0, Duration::ZERO);
        // Hostile extremes do not overflow.
        c.add(Sample {
            sent: Duration::ZERO,
            received: Duration::MAX,
            peer: Duration::MAX,
        });
        let _ = c.to_local(Duration::MAX);
    }
}
