//! One owner→replica link of a replication, as a state machine with no sockets and no
//! clock: epochs are queued as the owner produces them, sent in order, acknowledged in
//! order. A replica that falls more than `window` bytes behind is cut loose (its queue is
//! dropped) and caught up later by hash comparison, so a slow replica never holds back
//! the owner or the other replicas, and never costs more memory than the window.

use std::collections::VecDeque;
use std::time::Duration;

/// An epoch on its way to one replica.
#[derive(Debug, Clone)]
pub struct Queued<T> {
    pub epoch: u64,
    /// Payload bytes (what the window counts).
    pub bytes: u64,
    /// When the owner collected it (for lag).
    pub at: Duration,
    pub payload: T,
}

/// A replica's acknowledgement did not fit what was sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AckError {
    /// Acknowledged an epoch that was never sent on this session.
    #[error("replica acknowledged epoch {got}, but the oldest epoch in flight is {expected:?}")]
    Unexpected { got: u64, expected: Option<u64> },
}

/// The link's state.
#[derive(Debug)]
pub struct Link<T> {
    window: u64,
    queue: VecDeque<Queued<T>>,
    inflight: VecDeque<Queued<T>>,
    acked: u64,
    /// Dropped epochs: the replica must be caught up by hash before anything else.
    behind: bool,
    /// The session's catch-up epoch: queued epochs up to it are covered by it.
    base: u64,
    sent_bytes: u64,
}

impl<T> Link<T> {
    /// A link that lets at most `window` bytes wait for a replica.
    pub fn new(window: u64) -> Link<T> {
        Link {
            window,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            acked: 0,
            behind: true, // nothing sent yet: the first session starts with a catch-up
            base: 0,
            sent_bytes: 0,
        }
    }

    /// Queues a produced epoch. Returns false when the replica fell more than the window
    /// behind: everything queued is dropped and the link needs a catch-up.
    pub fn enqueue(&mut self, q: Queued<T>) -> bool {
        if self.behind || q.epoch <= self.base {
            return !self.behind;
        }
        // The session's catch-up (epoch `base`) is not counted: it is being delivered,
        // and cutting it loose would only start it over.
        let tracked = || {
            self.queue
                .iter()
                .chain(&self.inflight)
                .filter(|x| x.epoch > self.base)
        };
        let waiting: u64 = tracked().map(|q| q.bytes).sum();
        if waiting + q.bytes > self.window && tracked().next().is_some() {
            self.queue.clear();
            self.behind = true;
            return false;
        }
        self.queue.push_back(q);
        true
    }

    /// A new session starts with a catch-up that covers every epoch up to `base`.
    /// In-flight epochs of the old session are forgotten; queued epochs after `base`
    /// stay queued.
    pub fn start_session(&mut self, base: u64) {
        self.inflight.clear();
        self.queue.retain(|q| q.epoch > base);
        self.behind = false;
        self.base = base;
    }

    /// True when the link dropped epochs and the current session cannot go on.
    pub fn is_behind(&self) -> bool {
        self.behind
    }

    /// The next epoch to send, moved to in-flight.
    pub fn next_to_send(&mut self) -> Option<&Queued<T>> {
        if self.behind {
            return None;
        }
        let q = self.queue.pop_front()?;
        self.sent_bytes += q.bytes;
        self.inflight.push_back(q);
        self.inflight.back()
    }

    /// Records that the catch-up epoch was sent (it is acknowledged like any other).
    pub fn sent_catch_up(&mut self, epoch: u64, bytes: u64, at: Duration, payload: T) {
        self.sent_bytes += bytes;
        self.inflight.push_front(Queued {
            epoch,
            bytes,
            at,
            payload,
        });
    }

    /// The replica applied `epoch` (and so everything before it). Returns when each
    /// acknowledged epoch was collected (for lag statistics).
    pub fn ack(&mut self, epoch: u64) -> Result<Vec<Duration>, AckError> {
        if !self.inflight.iter().any(|q| q.epoch == epoch) {
            return Err(AckError::Unexpected {
                got: epoch,
                expected: self.inflight.front().map(|q| q.epoch),
            });
        }
        let mut at = Vec::new();
        while self.inflight.front().is_some_and(|q| q.epoch <= epoch) {
            if let Some(q) = self.inflight.pop_front() {
                at.push(q.at);
            }
        }
        self.acked = self.acked.max(epoch);
        Ok(at)
    }

    /// The newest epoch the replica acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Payload bytes sent on this link so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    /// Bytes produced but not acknowledged, and the age of the oldest of them at `now`.
    pub fn lag(&self, now: Duration) -> (u64, Duration) {
        let bytes = self
            .queue
            .iter()
            .chain(&self.inflight)
            .map(|q| q.bytes)
            .sum();
        let oldest = self
            .inflight
            .front()
            .or(self.queue.front())
            .map(|q| now.saturating_sub(q.at))
            .unwrap_or_default();
        (bytes, oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(epoch: u64, bytes: u64) -> Queued<()> {
        Queued {
            epoch,
            bytes,
            at: Duration::from_millis(epoch * 10),
            payload: (),
        }
    }

    #[test]
    fn epochs_flow_in_order_and_are_acked_in_order() {
        let mut l = Link::new(1000);
        assert!(
            !l.enqueue(q(1, 10)),
            "before the first catch-up nothing is queued"
        );
        l.start_session(1);
        l.sent_catch_up(1, 50, Duration::ZERO, ());
        assert!(l.enqueue(q(2, 100)));
        assert!(l.enqueue(q(3, 100)));
        assert_eq!(l.next_to_send().unwrap().epoch, 2);
        assert_eq!(l.next_to_send().unwrap().epoch, 3);
        assert!(l.next_to_send().is_none());
        assert_eq!(
            l.lag(Duration::from_millis(40)),
            (250, Duration::from_millis(40))
        );
        l.ack(1).unwrap();
        l.ack(3).unwrap();
        assert_eq!(l.acked(), 3);
        assert_eq!(l.lag(Duration::from_millis(40)).0, 0);
        assert!(l.ack(9).is_err());
        assert_eq!(l.sent_bytes(), 250);
    }

    #[test]
    fn a_replica_past_the_window_is_cut_loose_and_caught_up() {
        let mut l = Link::new(250);
        l.start_session(0);
        assert!(l.enqueue(q(1, 100)));
        assert!(l.enqueue(q(2, 100)));
        assert!(!l.enqueue(q(3, 100)), "over the window");
        assert!(l.is_behind());
        assert!(l.next_to_send().is_none());
        assert!(!l.enqueue(q(4, 1)));
        // The next session's catch-up covers everything up to 4.
        l.start_session(4);
        assert!(!l.is_behind());
        assert!(l.enqueue(q(5, 10)));
        assert_eq!(l.next_to_send().unwrap().epoch, 5);
    }

    #[test]
    fn the_catch_up_does_not_count_against_the_window() {
        let mut l = Link::new(100);
        l.start_session(3);
        l.sent_catch_up(3, 1_000_000, Duration::ZERO, ());
        assert!(l.enqueue(q(4, 60)));
        assert!(!l.enqueue(q(5, 60)));
    }

    #[test]
    fn one_epoch_larger_than_the_window_still_goes() {
        let mut l = Link::new(10);
        l.start_session(0);
        assert!(l.enqueue(q(1, 100)));
        assert_eq!(l.next_to_send().unwrap().epoch, 1);
    }

    #[test]
    fn a_new_session_keeps_what_the_catch_up_does_not_cover() {
        let mut l = Link::new(1000);
        l.start_session(0);
        l.enqueue(q(1, 10));
        l.enqueue(q(2, 10));
        l.next_to_send();
        l.start_session(1);
        assert_eq!(l.next_to_send().unwrap().epoch, 2);
    }
}
