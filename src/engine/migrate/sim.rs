//! Both engines over a simulated link with a virtual clock: a bulk lane and an urgent
//! lane from A to B and one lane back, each with a rate and a one-way delay; link cuts
//! at chosen moments (optionally killing B); a writer on A (and, after resume, on B)
//! dirtying chunks at a given rate with a hot set. Every step checks the invariants:
//! never two owners, never both apps running, and a released A means B has every chunk
//! as A froze it. Chunk contents are modelled as versions.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::region::{Bitmap, Geometry};

pub(super) const CHUNK: u32 = 65536;
pub(super) const MIB: u64 = 1 << 20;
/// 1 Gbit/s.
pub(super) const RATE: f64 = 125e6;
pub(super) const STEP: Duration = Duration::from_micros(100);
pub(super) const FREEZE_LATENCY: Duration = Duration::from_millis(1);

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) enum Ab {
    Chunk(u64, u64),
    Msg(Message),
}

pub(super) enum Ba {
    Ack(Vec<u64>),
    Msg(Message),
}

/// A FIFO lane: serialised at the link rate, then delayed.
pub(super) struct Lane<T> {
    pub(super) busy: Duration,
    pub(super) q: VecDeque<(Duration, T)>,
}

impl<T> Lane<T> {
    pub(super) fn new() -> Self {
        Lane {
            busy: Duration::ZERO,
            q: VecDeque::new(),
        }
    }

    pub(super) fn push(&mut self, now: Duration, bytes: u64, rate: f64, delay: Duration, t: T) {
        let start = self.busy.max(now);
        self.busy = start + Duration::from_secs_f64(bytes as f64 / rate);
        self.q.push_back((self.busy + delay, t));
    }

    pub(super) fn pop(&mut self, now: Duration) -> Option<T> {
        if self.q.front().is_some_and(|(at, _)| *at <= now) {
            self.q.pop_front().map(|x| x.1)
        } else {
            None
        }
    }

    pub(super) fn clear(&mut self, now: Duration) {
        self.q.clear();
        self.busy = now;
    }
}

/// Writes `rate` chunks per second: a fraction `hot_frac` into `hot`, the rest uniform.
#[derive(Clone)]
pub(super) struct Writer {
    pub(super) rate: f64,
    pub(super) hot: Vec<u64>,
    pub(super) hot_frac: f64,
    pub(super) acc: f64,
}

impl Writer {
    pub(super) fn idle() -> Writer {
        Writer::uniform(0.0)
    }

    pub(super) fn uniform(rate: f64) -> Writer {
        Writer {
            rate,
            hot: Vec::new(),
            hot_frac: 0.0,
            acc: 0.0,
        }
    }

    pub(super) fn hot(rate: f64, hot: std::ops::Range<u64>, hot_frac: f64) -> Writer {
        Writer {
            rate,
            hot: hot.collect(),
            hot_frac,
            acc: 0.0,
        }
    }

    pub(super) fn pick(&self, rng: &mut StdRng, n: u64) -> u64 {
        if !self.hot.is_empty() && rng.gen::<f64>() < self.hot_frac {
            self.hot[rng.gen_range(0..self.hot.len())]
        } else {
            rng.gen_range(0..n)
        }
    }

    /// How many writes fall in this step.
    pub(super) fn due(&mut self, dt: Duration) -> u64 {
        self.acc += self.rate * dt.as_secs_f64();
        let n = self.acc.floor();
        self.acc -= n;
        n as u64
    }
}

pub(super) type When = Box<dyn Fn(&Sim) -> bool>;

pub(super) struct Cut {
    pub(super) when: When,
    pub(super) length: Duration,
    pub(super) kill_b: bool,
}

pub(super) struct Sim {
    pub(super) now: Duration,
    pub(super) rate: f64,
    pub(super) delay: Duration,
    pub(super) up: bool,
    pub(super) up_at: Option<Duration>,
    pub(super) bulk: Lane<Ab>,
    pub(super) urgent: Lane<Ab>,
    pub(super) back: Lane<Ba>,
    pub(super) a: MigrateSource,
    pub(super) b: MigrateDest,
    pub(super) geo: Geometry,
    pub(super) rng: StdRng,
    // A's app.
    pub(super) a_data: Vec<u64>,
    pub(super) a_running: bool,
    pub(super) a_writer: Writer,
    pub(super) tracker: Bitmap,
    pub(super) freeze_at: Option<Duration>,
    pub(super) frozen_at: Option<Duration>,
    pub(super) a_frozen: Vec<u64>,
    pub(super) ever_frozen: bool,
    pub(super) collect: bool,
    // B's app: (A's version installed, B's writes since).
    pub(super) b_data: Vec<Option<(u64, u64)>>,
    pub(super) b_writes: Vec<u64>,
    pub(super) b_running: bool,
    pub(super) b_resumed_at: Option<Duration>,
    pub(super) b_writer: Writer,
    pub(super) b_blocked: Option<u64>,
    /// When B's faulting thread started waiting, and how long each wait took.
    pub(super) b_fault_since: Duration,
    pub(super) b_fault_waits: Vec<Duration>,
    /// Urgent chunks queue behind bulk data in one FIFO (a bottleneck queue on the path,
    /// as in a router or the WAN relay), instead of a lane of their own.
    pub(super) shared_bottleneck: bool,
    /// Pre-copy sends per chunk, bytes sent per pre-copy round.
    pub(super) precopy_sends: Vec<u32>,
    pub(super) round_bytes: Vec<u64>,
    pub(super) reports: Vec<Report>,
    /// Chunks B dropped before the handover (on `Stale`) and at it.
    pub(super) b_drops_precopy: u64,
    pub(super) b_drops_at_handover: u64,
    /// Chunks in `Stale` notices A sent once it had decided to freeze: B's drops of
    /// them delay the handover behind them as much as drops at the handover itself.
    pub(super) stale_notified_at_freeze: u64,
    /// While set, B's `Dropped` answers are kept here instead of sent.
    pub(super) hold_back_dropped: bool,
    pub(super) held_dropped: Vec<Message>,
    /// B's `Accept` leaves this much after B resumed (queued behind B's own work).
    pub(super) accept_late: Duration,
    /// B's `Pong`s are lost (A has no clock sample).
    pub(super) drop_pongs: bool,
    /// A's driver carries out `Start`'s actions this much after the engine took it (it
    /// opens the migration stream first: a round trip to B).
    pub(super) start_late: Duration,
    /// Every frame from B takes this much longer than one from A (asymmetric paths).
    pub(super) back_extra: Duration,
    /// Each engine's clock reads the simulated time plus its offset (unrelated origins).
    pub(super) a_clock: Duration,
    pub(super) b_clock: Duration,
    pub(super) released: bool,
    pub(super) cut: Option<Cut>,
}

impl Sim {
    pub(super) fn new(
        size: u64,
        rtt: Duration,
        a_writer: Writer,
        b_writer: Writer,
        seed: u64,
    ) -> Sim {
        let geo = Geometry::new(size, CHUNK as u64).unwrap();
        let n = geo.chunks() as usize;
        Sim {
            now: Duration::ZERO,
            rate: RATE,
            delay: rtt / 2,
            up: true,
            up_at: None,
            bulk: Lane::new(),
            urgent: Lane::new(),
            back: Lane::new(),
            a: MigrateSource::new(),
            b: MigrateDest::new(),
            geo,
            rng: StdRng::seed_from_u64(seed),
            a_data: vec![0; n],
            a_running: true,
            a_writer,
            tracker: Bitmap::new(n as u64),
            freeze_at: None,
            frozen_at: None,
            a_frozen: Vec::new(),
            ever_frozen: false,
            collect: false,
            b_data: vec![None; n],
            b_writes: vec![0; n],
            b_running: false,
            b_resumed_at: None,
            b_writer,
            b_blocked: None,
            b_fault_since: Duration::ZERO,
            b_fault_waits: Vec::new(),
            shared_bottleneck: false,
            precopy_sends: vec![0; n],
            round_bytes: Vec::new(),
            reports: Vec::new(),
            b_drops_precopy: 0,
            b_drops_at_handover: 0,
            stale_notified_at_freeze: 0,
            hold_back_dropped: false,
            held_dropped: Vec::new(),
            accept_late: Duration::ZERO,
            drop_pongs: false,
            start_late: Duration::ZERO,
            back_extra: Duration::ZERO,
            a_clock: Duration::ZERO,
            b_clock: Duration::ZERO,
            released: false,
            cut: None,
        }
    }

    pub(super) fn cut_when(&mut self, when: impl Fn(&Sim) -> bool + 'static, length: Duration) {
        self.cut = Some(Cut {
            when: Box::new(when),
            length,
            kill_b: false,
        });
    }

    pub(super) fn start(&mut self, cfg: Config) -> Result<(), MigrateError> {
        let acts = self
            .a
            .handle(self.now + self.a_clock, SourceEvent::Start(cfg))?;
        // Nothing is in flight yet: time can jump.
        self.now += self.start_late;
        self.apply_a(acts);
        Ok(())
    }

    pub(super) fn a_event(&mut self, ev: SourceEvent) {
        let acts = self.a.handle(self.now + self.a_clock, ev).unwrap();
        self.apply_a(acts);
    }

    pub(super) fn b_event(&mut self, ev: DestEvent, version: u64) {
        let acts = self.b.handle(self.now + self.b_clock, ev).unwrap();
        self.apply_b(acts, version);
    }

    pub(super) fn msg_bytes(m: &Message) -> u64 {
        match m {
            Message::Handover { stale, .. } | Message::Stale { chunks: stale } => {
                32 + stale.len() / 8
            }
            Message::Status {
                missing: Some(m), ..
            } => 32 + m.len() / 8,
            Message::Fetch { chunks } => 16 + 8 * chunks.len() as u64,
            _ => 32,
        }
    }

    pub(super) fn apply_a(&mut self, acts: Vec<SourceAction>) {
        for act in acts {
            match act {
                SourceAction::Send(m) => {
                    if let (Message::Stale { chunks }, SourcePhase::Freezing) = (&m, self.a.phase())
                    {
                        self.stale_notified_at_freeze += chunks.count_ones();
                    }
                    if self.up {
                        let bytes = Self::msg_bytes(&m);
                        self.bulk
                            .push(self.now, bytes, self.rate, self.delay, Ab::Msg(m));
                    }
                }
                SourceAction::SendChunks { chunks, urgent } => {
                    let round = match self.a.phase() {
                        SourcePhase::Precopy { round } => Some(round as usize),
                        _ => None,
                    };
                    for c in chunks {
                        let len = self.geo.chunk_len(c) as u64;
                        if let Some(r) = round {
                            self.precopy_sends[c as usize] += 1;
                            if self.round_bytes.len() <= r {
                                self.round_bytes.resize(r + 1, 0);
                            }
                            self.round_bytes[r] += len;
                        }
                        if !self.up {
                            continue;
                        }
                        let p = Ab::Chunk(c, self.a_data[c as usize]);
                        let lane = if urgent && !self.shared_bottleneck {
                            &mut self.urgent
                        } else {
                            &mut self.bulk
                        };
                        lane.push(self.now, len, self.rate, self.delay, p);
                    }
                }
                SourceAction::CollectDirty => self.collect = true,
                SourceAction::Freeze => self.freeze_at = Some(self.now + FREEZE_LATENCY),
                SourceAction::Resume => {
                    self.freeze_at = None;
                    self.a_running = true;
                }
                SourceAction::Release => self.released = true,
                SourceAction::Report(r) => self.reports.push(r),
            }
        }
    }

    pub(super) fn apply_b(&mut self, acts: Vec<DestAction>, version: u64) {
        for act in acts {
            match act {
                DestAction::Send(Message::Dropped) if self.hold_back_dropped => {
                    self.held_dropped.push(Message::Dropped);
                }
                DestAction::Send(Message::Pong { .. }) if self.drop_pongs => {}
                DestAction::Send(m) => {
                    if self.up {
                        let bytes = Self::msg_bytes(&m);
                        let delay = match m {
                            Message::Accept { .. } => self.delay + self.accept_late,
                            _ => self.delay,
                        } + self.back_extra;
                        self.back
                            .push(self.now, bytes, self.rate, delay, Ba::Msg(m));
                    }
                }
                DestAction::Install(cs) => {
                    for c in cs {
                        self.b_data[c as usize] = Some((version, 0));
                    }
                }
                DestAction::Ack(cs) => {
                    if self.up {
                        let bytes = 16 * cs.len() as u64;
                        let delay = self.delay + self.back_extra;
                        self.back
                            .push(self.now, bytes, self.rate, delay, Ba::Ack(cs));
                    }
                }
                DestAction::Drop(cs) => {
                    let mut c = 0;
                    while let Some(d) = cs.next_set(c) {
                        c = d + 1;
                        self.b_data[d as usize] = None;
                        if self.b.phase() == DestPhase::Receiving {
                            self.b_drops_precopy += 1;
                        } else {
                            self.b_drops_at_handover += 1;
                        }
                    }
                }
                DestAction::Resume => {
                    self.b_running = true;
                    self.b_resumed_at = Some(self.now);
                }
                DestAction::Discard => self.b_data.iter_mut().for_each(|d| *d = None),
                DestAction::Complete => {}
            }
        }
    }

    pub(super) fn cut_link(&mut self, length: Duration, kill_b: bool) {
        self.up = false;
        self.up_at = Some(self.now + length);
        self.bulk.clear(self.now);
        self.urgent.clear(self.now);
        self.back.clear(self.now);
        self.a_event(SourceEvent::LinkDown);
        if kill_b {
            self.b = MigrateDest::new();
            self.b_data.iter_mut().for_each(|d| *d = None);
            self.b_running = false;
            self.b_blocked = None;
        } else {
            self.b_event(DestEvent::LinkDown, 0);
        }
    }

    pub(super) fn step(&mut self) {
        self.now += STEP;
        if self.up_at.is_some_and(|t| t <= self.now) {
            self.up_at = None;
            self.up = true;
            self.b_event(DestEvent::LinkUp, 0);
            self.a_event(SourceEvent::LinkUp);
        }
        while let Some(p) = self.urgent.pop(self.now) {
            self.deliver_ab(p);
        }
        while let Some(p) = self.bulk.pop(self.now) {
            self.deliver_ab(p);
        }
        while let Some(p) = self.back.pop(self.now) {
            match p {
                Ba::Ack(chunks) => {
                    let bytes = chunks.iter().map(|c| self.geo.chunk_len(*c) as u64).sum();
                    self.a_event(SourceEvent::Acked { bytes, chunks });
                }
                Ba::Msg(m) => self.a_event(SourceEvent::Message(m)),
            }
        }
        if self.freeze_at.is_some_and(|t| t <= self.now) {
            self.freeze_at = None;
            self.a_running = false;
            self.ever_frozen = true;
            self.frozen_at = Some(self.now);
            self.a_frozen = self.a_data.clone();
            let began = self.now + self.a_clock;
            self.a_event(SourceEvent::Frozen { began });
        }
        if self.collect {
            self.collect = false;
            let mut list = Vec::new();
            let mut c = 0;
            while let Some(d) = self.tracker.next_set(c) {
                list.push(d);
                self.tracker.clear(d);
                c = d + 1;
            }
            self.a_event(SourceEvent::Dirty(list));
        }
        self.write_a();
        self.write_b();
        self.a_event(SourceEvent::Tick);
        if let Some(cut) = self.cut.take() {
            if (cut.when)(self) {
                self.cut_link(cut.length, cut.kill_b);
            } else {
                self.cut = Some(cut);
            }
        }
        self.check();
    }

    pub(super) fn deliver_ab(&mut self, p: Ab) {
        match p {
            Ab::Chunk(c, v) => self.b_event(DestEvent::Arrived(vec![c]), v),
            Ab::Msg(m) => self.b_event(DestEvent::Message(m), 0),
        }
    }

    pub(super) fn write_a(&mut self) {
        let n = self.geo.chunks();
        let due = self.a_writer.due(STEP);
        if !self.a_running || n == 0 {
            return;
        }
        for _ in 0..due {
            let c = self.a_writer.pick(&mut self.rng, n);
            self.a_data[c as usize] += 1;
            self.tracker.set(c);
        }
    }

    pub(super) fn write_b(&mut self) {
        let n = self.geo.chunks();
        let due = self.b_writer.due(STEP);
        if !self.b_running || n == 0 {
            return;
        }
        if let Some(c) = self.b_blocked {
            if self.b.is_missing(c) {
                return; // the faulting thread still waits
            }
            self.b_blocked = None;
            self.b_fault_waits.push(self.now - self.b_fault_since);
            self.b_write(c);
        }
        for _ in 0..due {
            let c = self.b_writer.pick(&mut self.rng, n);
            if self.b.is_missing(c) {
                self.b_blocked = Some(c);
                self.b_fault_since = self.now;
                self.b_event(DestEvent::Fault(c), 0);
                return;
            }
            self.b_write(c);
        }
    }

    pub(super) fn b_write(&mut self, c: u64) {
        let d = self.b_data[c as usize]
            .as_mut()
            .expect("B's app touched a chunk that was never installed");
        d.1 += 1;
        self.b_writes[c as usize] += 1;
    }

    pub(super) fn check(&self) {
        assert!(
            !(self.a.owns() && self.b.owns()),
            "two owners at {:?}",
            self.now
        );
        assert!(!(self.a_running && self.b_running), "both apps run");
        if self.released {
            self.check_b_has_everything();
        }
    }

    /// B holds every chunk as A froze it, plus B's own writes (none lost, none
    /// overwritten by a late duplicate).
    pub(super) fn check_b_has_everything(&self) {
        for c in 0..self.geo.chunks() as usize {
            assert_eq!(
                self.b_data[c],
                Some((self.a_frozen[c], self.b_writes[c])),
                "chunk {c}"
            );
        }
    }

    pub(super) fn done(&self) -> bool {
        self.cut.is_none()
            && self.up
            && match self.a.phase() {
                SourcePhase::Released => self.b.phase() == DestPhase::Complete,
                SourcePhase::Aborted(_) => !self.b.owns() && self.b.phase() != DestPhase::Receiving,
                _ => false,
            }
    }

    /// Steps until both sides are done; panics after `limit` of virtual time.
    pub(super) fn run(&mut self, limit: Duration) -> Report {
        while !self.done() {
            assert!(
                self.now < limit,
                "not done by {limit:?}: A {:?}, B {:?}",
                self.a.phase(),
                self.b.phase()
            );
            self.step();
        }
        *self.reports.last().unwrap()
    }

    pub(super) fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Freeze on A to resume on B, as it happened.
    pub(super) fn true_downtime(&self) -> Duration {
        self.b_resumed_at.unwrap() - self.frozen_at.unwrap()
    }
}

pub(super) fn cfg(size: u64) -> Config {
    Config {
        size,
        chunk_size: CHUNK,
        budget: ms(70),
        max_rounds: 10,
        max_time: Duration::from_secs(60),
        window: Window::Fixed(12 * MIB),
        postcopy: true,
        peek: Some(ms(50)),
    }
}

pub(super) fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}
