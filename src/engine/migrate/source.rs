//! Host A's side of a migration: pre-copy rounds, convergence, freeze, handover and
//! post-copy serving.

use std::collections::VecDeque;
use std::time::Duration;

use super::{
    check_bitmap, check_chunks, ms, Config, Message, MigrateError, Outcome, Report, Window,
    BW_SAMPLES, HOT_STREAK,
};
use crate::engine::clock::{ClockSync, Sample};
use crate::region::{Bitmap, Geometry};

/// The automatic window's gain in post-copy, % of rate × min RTT (the pull's gain).
const POSTCOPY_GAIN_PCT: u16 = 110;

/// In post-copy, one sample interval (about an RTT) in this many drains the copy's own
/// queue at the bottleneck, with the window at [`DRAIN_GAIN_PCT`] of the estimate.
const DRAIN_EVERY: u64 = 8;
const DRAIN_GAIN_PCT: u16 = 75;

/// Sample intervals whose least RTT sizes the post-copy window: two drain cycles, so at
/// least one drain is always among them.
const RTT_WINDOW: usize = 2 * DRAIN_EVERY as usize;

/// Clock samples (`Ping`s) unanswered at most.
const PINGS: usize = 16;

/// Where host A is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// No migration yet; A owns the region.
    Idle,
    /// Copying while the app runs; `round` 0 is the full copy.
    Precopy { round: u32 },
    /// Asked the app to pause; waiting for [`SourceEvent::Frozen`].
    Freezing,
    /// Frozen; waiting for the final dirty list.
    FinalSync,
    /// Sent `Handover`; ownership is in doubt until B answers.
    HandingOver,
    /// B owns the region; A serves what B has not confirmed.
    Postcopy,
    /// Every chunk confirmed; A let go of the region.
    Released,
    /// The migration ended early; A owns the region and its app runs.
    Aborted(Outcome),
}

impl SourcePhase {
    fn name(&self) -> &'static str {
        match self {
            SourcePhase::Idle => "idle",
            SourcePhase::Precopy { .. } => "precopy",
            SourcePhase::Freezing => "freezing",
            SourcePhase::FinalSync => "final-sync",
            SourcePhase::HandingOver => "handing-over",
            SourcePhase::Postcopy => "postcopy",
            SourcePhase::Released => "released",
            SourcePhase::Aborted(_) => "aborted",
        }
    }
}

/// What happens to host A.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// Migrate the region (the driver has armed dirty tracking already).
    Start(Config),
    /// The chunks written since the previous collection (answer to `CollectDirty`).
    Dirty(Vec<u64>),
    /// B confirmed these chunks; `bytes` is what the driver counts as delivered.
    Acked {
        bytes: u64,
        chunks: Vec<u64>,
    },
    LinkDown,
    LinkUp,
    /// A's own side failed (collecting what changed, or pausing the app) and the driver
    /// dropped the migration stream: before the handover, give up as a cut would but
    /// with [`Outcome::SourceFailed`]; after it, handled as a cut.
    Failed,
    /// B answered with an error (it is busy with another migration, or refused a
    /// message) and the driver dropped the stream: like `Failed`, with
    /// [`Outcome::Refused`] before the handover.
    Refused,
    /// Give up if the handover has not begun ([`Outcome::Cancelled`]; the driver then
    /// drops the migration stream, which B sees as a cut); ignored after it, when only
    /// finishing the post-copy leaves one complete owner. See [`MigrateSource::cancellable`].
    Cancel,
    /// The app is paused (answer to `Freeze`); `began`: when the driver started pausing
    /// it (called the hook, sent SIGSTOP, began write-protecting), on the engine's clock.
    /// The downtime counts from there.
    Frozen {
        began: Duration,
    },
    Message(Message),
    /// Time passes.
    Tick,
}

/// What host A's driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceAction {
    Send(Message),
    /// Read these chunks and send them (`urgent`: on the urgent lane, for B's faults).
    SendChunks {
        chunks: Vec<u64>,
        urgent: bool,
    },
    /// Collect the dirty chunks and answer with [`SourceEvent::Dirty`].
    CollectDirty,
    /// Pause the app and answer with [`SourceEvent::Frozen`].
    Freeze,
    /// Let the app run again (also cancels a freeze in progress).
    Resume,
    /// The region belongs to B now: drop it.
    Release,
    /// The migration is over.
    Report(Report),
}

/// For a progress display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub phase: SourcePhase,
    /// Pre-copy rounds completed.
    pub rounds: u32,
    /// Bytes dirtied per second in the last round.
    pub dirty_rate: f64,
    /// Delivered bytes per second.
    pub bandwidth: f64,
    /// Downtime if A switched over now (None before bandwidth is known): the final
    /// sync of `remaining` at `bandwidth`, plus the RTT. With post-copy the final sync
    /// sends only what fits half the budget left after the RTT (the rest stays stale on
    /// B and is fetched after the handover), so this stays within the budget.
    pub expected_downtime: Option<Duration>,
    /// Bytes B does not have current.
    pub remaining: u64,
    pub bytes_sent: u64,
}

/// Host A's migration engine.
#[derive(Debug)]
pub struct MigrateSource {
    phase: SourcePhase,
    generation: u64,
    run: Option<Run>,
}

#[derive(Debug)]
struct Run {
    cfg: Config,
    geo: Geometry,
    started: Duration,
    /// B's copy is not current (needs sending).
    dirty: Bitmap,
    hot: Bitmap,
    /// B was told (`Stale`) that its copy is out of date, and nothing was sent since.
    notified: Bitmap,
    streak: Vec<u8>,
    /// When a collection last reported the chunk dirty.
    last_dirty: Vec<Duration>,
    longest_round: Duration,
    /// Unacknowledged sends per chunk, and when the latest was sent.
    outstanding: Vec<u16>,
    sent_at: Vec<Duration>,
    inflight: u64,
    cursor: u64,
    /// The current round still has chunks to send.
    sending: bool,
    collecting: bool,
    /// A mid-round collection ([`Config::peek`]) is under way; when the last one began.
    peeking: bool,
    last_peek: Duration,
    /// Chunks this round's peeks reported (they count for the round's collection).
    peeked: Bitmap,
    /// When the freeze was asked for.
    freeze_asked: Option<Duration>,
    /// When the driver started pausing the app (from `Frozen`).
    freeze_began: Option<Duration>,
    /// `Stale` notices B has not answered (`Dropped`) yet.
    stale_unanswered: u32,
    /// `acked_total` when the round began, and the last full round's delivered rate.
    round_acked: u64,
    round_rate: f64,
    /// The time limit passed: switch over at the end of this round.
    forced: bool,
    link_up: bool,
    /// After a reconnect, until B's `Status` arrives.
    awaiting_status: bool,
    sent_on_conn: u64,
    round_started: Duration,
    dirty_rate: f64,
    acked_total: u64,
    /// When `acked_total` last grew (or the pipe restarted from idle).
    delivered_at: Duration,
    /// Per chunk, `acked_total` and `delivered_at` when it was last sent: its ack then
    /// gives a delivery-rate sample over a span that covers its own round trip, so acks
    /// processed in a burst cannot inflate it (the BBR delivery-rate method).
    sent_delivered: Vec<(u64, Duration)>,
    /// The best rate sample since the last one kept.
    pending_rate: f64,
    sample: Option<(Duration, u64)>,
    samples: VecDeque<f64>,
    min_rtt: Option<Duration>,
    /// Post-copy: the least send-to-ack time in the current sample interval, and those of
    /// the last [`RTT_WINDOW`] intervals (see `window_rtt`).
    interval_min_rtt: Option<Duration>,
    recent_min_rtts: VecDeque<Duration>,
    /// Chunks' send-to-ack times, smoothed (RFC 6298's 1/8).
    srtt: Option<Duration>,
    /// Bandwidth samples taken so far, and how many had been when post-copy first saw a
    /// standing queue (`srtt` more than `pull::queue_threshold` above `min_rtt`).
    /// Three samples later (so the filter holds rates measured with the pipe full) its
    /// window keeps the post-copy gain.
    samples_taken: u64,
    queue_seen_at: Option<u64>,
    rounds: u32,
    bytes_sent: u64,
    faulted: Bitmap,
    faults: u64,
    deferred: u64,
    frozen_at: Option<Duration>,
    /// When the `Handover` was sent.
    handover_at: Option<Duration>,
    /// Chunks sent before the `Handover` and not acknowledged yet, and how many: B reads
    /// the `Handover` right after the last of them.
    drain: Option<(Bitmap, u64)>,
    /// When the last chunk sent before the `Handover` was acknowledged.
    drained_at: Option<Duration>,
    /// B's time from reading the `Handover` to its app running (from its `Accept`).
    held: Option<Duration>,
    /// When B's app was let run (its `Accept`'s stamp placed on this clock with the
    /// samples of the same connection), and the most that can be off by.
    resumed: Option<(Duration, Duration)>,
    accepted_at: Option<Duration>,
    /// `Ping`s on this connection not answered yet (their `at`), and B's clock samples.
    pings: VecDeque<Duration>,
    clock: ClockSync,
}

impl Default for MigrateSource {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrateSource {
    /// The engine of a region this host owns.
    pub fn new() -> MigrateSource {
        MigrateSource {
            phase: SourcePhase::Idle,
            generation: 0,
            run: None,
        }
    }

    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// `Stale` notices B has not answered yet.
    pub fn stale_unanswered(&self) -> u32 {
        self.run.as_ref().map_or(0, |r| r.stale_unanswered)
    }

    /// The ownership generation of the latest migration.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True while this host holds the ownership token (its app may run, or is paused
    /// before handover).
    pub fn owns(&self) -> bool {
        !matches!(
            self.phase,
            SourcePhase::HandingOver | SourcePhase::Postcopy | SourcePhase::Released
        )
    }

    /// Figures for a progress display, while a migration exists.
    pub fn progress(&self) -> Option<Progress> {
        let run = self.run.as_ref()?;
        let remaining = run.bytes_of(&run.dirty, false);
        let bw = run.bandwidth();
        Some(Progress {
            phase: self.phase,
            rounds: run.rounds,
            dirty_rate: run.dirty_rate,
            bandwidth: bw,
            expected_downtime: (bw > 0.0).then(|| {
                let sync = Duration::from_secs_f64(remaining as f64 / bw);
                let sync = match run.cfg.postcopy {
                    true => sync.min(run.cfg.budget.saturating_sub(run.rtt()) / 2),
                    false => sync,
                };
                sync + run.rtt()
            }),
            remaining,
            bytes_sent: run.bytes_sent,
        })
    }

    /// Handles one event at `now`; returns what to do, in order. On error nothing changed.
    pub fn handle(
        &mut self,
        now: Duration,
        ev: SourceEvent,
    ) -> Result<Vec<SourceAction>, MigrateError> {
        let mut out = Vec::new();
        match ev {
            SourceEvent::Start(cfg) => self.start(now, cfg, &mut out)?,
            SourceEvent::Dirty(chunks) => self.dirty(now, chunks, &mut out)?,
            SourceEvent::Acked { bytes, chunks } => {
                if let Some(run) = self.run.as_mut() {
                    check_chunks(&run.geo, &chunks)?;
                    run.acked(now, bytes, &chunks);
                    self.pump(now, &mut out);
                }
            }
            SourceEvent::LinkDown => self.link_down(now, &mut out),
            SourceEvent::Cancel => {
                if self.cancellable() {
                    self.abort(now, Outcome::Cancelled, &mut out)
                }
            }
            ev @ (SourceEvent::Failed | SourceEvent::Refused) => {
                if self.cancellable() {
                    let o = match ev {
                        SourceEvent::Refused => Outcome::Refused,
                        _ => Outcome::SourceFailed,
                    };
                    self.abort(now, o, &mut out)
                } else {
                    // The driver dropped the stream with it: what a cut does.
                    self.link_down(now, &mut out)
                }
            }
            SourceEvent::LinkUp => {
                if let Some(run) = self.run.as_mut() {
                    run.link_up = true;
                    run.sent_on_conn = 0;
                    if matches!(self.phase, SourcePhase::HandingOver | SourcePhase::Postcopy) {
                        run.awaiting_status = true;
                        out.push(SourceAction::Send(Message::Query {
                            generation: self.generation,
                        }));
                    }
                }
            }
            SourceEvent::Frozen { began } => match (self.phase, self.run.as_mut()) {
                (SourcePhase::Freezing, Some(run)) => {
                    run.frozen_at = Some(now);
                    let asked = run.freeze_asked.unwrap_or(now);
                    run.freeze_began = Some(began.clamp(asked, now.max(asked)));
                    self.phase = SourcePhase::FinalSync;
                    out.push(SourceAction::CollectDirty);
                }
                // A freeze that completed after the abort's Resume: nothing to do.
                (SourcePhase::Aborted(_), _) => {}
                _ => return Err(self.unexpected("Frozen")),
            },
            SourceEvent::Message(m) => self.message(now, m, &mut out)?,
            SourceEvent::Tick => {
                if let (SourcePhase::Precopy { .. }, Some(run)) = (self.phase, self.run.as_mut()) {
                    if !run.forced && now.saturating_sub(run.started) >= run.cfg.max_time {
                        run.forced = true;
                        run.sending = false;
                        // Nothing dirty is sent again before the freeze: B may drop its
                        // copies while the round drains.
                        let stale = run.newly_stale(true);
                        run.notify(stale, &mut out);
                    }
                }
                self.pump(now, &mut out);
            }
        }
        Ok(out)
    }

    /// Before the handover: giving up leaves A the owner with its app running.
    pub fn cancellable(&self) -> bool {
        matches!(
            self.phase,
            SourcePhase::Precopy { .. } | SourcePhase::Freezing | SourcePhase::FinalSync
        )
    }

    fn unexpected(&self, what: &'static str) -> MigrateError {
        MigrateError::Unexpected {
            what,
            phase: self.phase.name(),
        }
    }

    fn start(
        &mut self,
        now: Duration,
        cfg: Config,
        out: &mut Vec<SourceAction>,
    ) -> Result<(), MigrateError> {
        match self.phase {
            SourcePhase::Idle | SourcePhase::Aborted(_) => {}
            SourcePhase::Released => return Err(MigrateError::NotOwner),
            p => return Err(MigrateError::Busy(p.name())),
        }
        let geo = Geometry::new(cfg.size, cfg.chunk_size as u64)?;
        let n = geo.chunks();
        self.generation += 1;
        self.run = Some(Run {
            cfg,
            geo,
            started: now,
            dirty: Bitmap::full(n),
            hot: Bitmap::new(n),
            notified: Bitmap::new(n),
            streak: vec![0; n as usize],
            last_dirty: vec![now; n as usize],
            longest_round: Duration::ZERO,
            outstanding: vec![0; n as usize],
            sent_at: vec![Duration::ZERO; n as usize],
            inflight: 0,
            cursor: 0,
            sending: true,
            collecting: false,
            peeking: false,
            last_peek: now,
            peeked: Bitmap::new(n),
            freeze_asked: None,
            freeze_began: None,
            stale_unanswered: 0,
            round_acked: 0,
            round_rate: 0.0,
            forced: false,
            link_up: true,
            awaiting_status: false,
            sent_on_conn: 0,
            round_started: now,
            dirty_rate: 0.0,
            acked_total: 0,
            delivered_at: now,
            sent_delivered: vec![(0, Duration::ZERO); n as usize],
            pending_rate: 0.0,
            sample: None,
            samples: VecDeque::new(),
            min_rtt: None,
            srtt: None,
            samples_taken: 0,
            interval_min_rtt: None,
            recent_min_rtts: VecDeque::new(),
            queue_seen_at: None,
            rounds: 0,
            bytes_sent: 0,
            faulted: Bitmap::new(n),
            faults: 0,
            deferred: 0,
            frozen_at: None,
            handover_at: None,
            drain: None,
            drained_at: None,
            held: None,
            resumed: None,
            accepted_at: None,
            pings: VecDeque::new(),
            clock: ClockSync::new(),
        });
        out.push(SourceAction::Send(Message::Begin {
            generation: self.generation,
            size: geo.size,
            chunk_size: geo.chunk_size,
        }));
        if let Some(run) = self.run.as_mut() {
            run.ping(now, out);
        }
        if cfg.max_rounds == 0 {
            // Pure post-copy: freeze at once.
            self.phase = SourcePhase::Freezing;
            if let Some(run) = self.run.as_mut() {
                run.freeze_asked = Some(now);
            }
            out.push(SourceAction::Freeze);
        } else {
            self.phase = SourcePhase::Precopy { round: 0 };
            self.pump(now, out);
        }
        Ok(())
    }

    fn dirty(
        &mut self,
        now: Duration,
        chunks: Vec<u64>,
        out: &mut Vec<SourceAction>,
    ) -> Result<(), MigrateError> {
        let Some(run) = self.run.as_mut() else {
            return Err(self.unexpected("Dirty"));
        };
        check_chunks(&run.geo, &chunks)?;
        match self.phase {
            SourcePhase::Precopy { .. } if run.peeking => {
                run.peeking = false;
                let stale = run.peeked(&chunks);
                run.notify(stale, out);
                self.pump(now, out);
            }
            SourcePhase::Precopy { .. } if run.collecting => {
                run.collecting = false;
                run.collected(now, &chunks);
                self.decide(now, out);
            }
            SourcePhase::FinalSync => {
                // A clock sample ahead of the final sync's data, so that B's resume is
                // placed well even when no round ran (pure post-copy: the only other
                // sample went with `Begin`, which B may answer late).
                run.ping(now, out);
                for &c in &chunks {
                    run.dirty.set(c);
                }
                // Hot chunks first (B's app is likely to touch them at once), then the
                // others in order, as many as the budget lets through.
                let mut order: Vec<u64> = Vec::with_capacity(run.dirty.count_ones() as usize);
                for hot_pass in [true, false] {
                    let mut c = 0;
                    while let Some(d) = run.dirty.next_set(c) {
                        if run.hot.get(d) == hot_pass {
                            order.push(d);
                        }
                        c = d + 1;
                    }
                }
                let cap = if run.cfg.postcopy {
                    let spent = now.saturating_sub(run.freeze_asked.unwrap_or(now));
                    let t = run.cfg.budget.saturating_sub(run.rtt() + spent);
                    let bw = match run.round_rate {
                        r if r > 0.0 => r.min(run.bandwidth()),
                        _ => run.bandwidth(),
                    };
                    (t.as_secs_f64() / 2.0 * bw) as u64
                } else {
                    u64::MAX
                };
                let mut batch = Vec::new();
                let mut bytes = 0u64;
                for c in order {
                    let len = run.geo.chunk_len(c) as u64;
                    if bytes.saturating_add(len) > cap {
                        break;
                    }
                    bytes += len;
                    run.mark_sent(now, c);
                    batch.push(c);
                }
                if !batch.is_empty() {
                    out.push(SourceAction::SendChunks {
                        chunks: batch,
                        urgent: false,
                    });
                }
                run.deferred = run.dirty.count_ones();
                run.handover_at = Some(now);
                let mut drain = Bitmap::new(run.geo.chunks());
                for (c, &o) in run.outstanding.iter().enumerate() {
                    if o > 0 {
                        drain.set(c as u64);
                    }
                }
                let left = drain.count_ones();
                run.drain = (left > 0).then_some((drain, left));
                out.push(SourceAction::Send(Message::Handover {
                    generation: self.generation,
                    stale: run.dirty.clone(),
                    sent: run.sent_on_conn,
                }));
                // Hot stale chunks follow the handover at once, without waiting for the
                // Accept: B's app is likely to touch them first, and they are frozen
                // content, which B installs only where it is still missing (and drops if
                // it refuses the handover). Within one window.
                if run.cfg.postcopy {
                    let mut hot = Vec::new();
                    let mut bytes = 0u64;
                    let room = run.window();
                    let mut c = 0;
                    while let Some(d) = run.dirty.next_set(c) {
                        c = d + 1;
                        if !run.hot.get(d) {
                            continue;
                        }
                        let len = run.geo.chunk_len(d) as u64;
                        if bytes.saturating_add(len) > room {
                            break;
                        }
                        bytes += len;
                        hot.push(d);
                    }
                    for &d in &hot {
                        run.mark_sent(now, d);
                    }
                    if !hot.is_empty() {
                        out.push(SourceAction::SendChunks {
                            chunks: hot,
                            urgent: false,
                        });
                    }
                }
                self.phase = SourcePhase::HandingOver;
            }
            // A collection asked for before an abort.
            SourcePhase::Aborted(_) => {}
            _ => return Err(self.unexpected("Dirty")),
        }
        Ok(())
    }

    /// At a round's end: switch over, or run another round.
    fn decide(&mut self, now: Duration, out: &mut Vec<SourceAction>) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        // The pipe has drained: a clock sample now does not wait behind chunk data (and
        // goes ahead of the `Stale` notice, which B answers only after dropping).
        run.ping(now, out);
        let remaining = run.bytes_of(&run.dirty, true);
        let bw = run.bandwidth();
        let fits = remaining == 0
            || (bw > 0.0
                && Duration::from_secs_f64(remaining as f64 / bw) + run.rtt() <= run.cfg.budget);
        let limit = run.rounds >= run.cfg.max_rounds
            || run.forced
            || now.saturating_sub(run.started) >= run.cfg.max_time;
        let freeze = fits || limit;
        // B may drop what is stale now: everything dirty before a freeze (it goes in the
        // final sync or is left for post-copy), else the hot chunks (not re-sent).
        let stale = run.newly_stale(freeze);
        run.notify(stale, out);
        if freeze {
            self.phase = SourcePhase::Freezing;
            run.freeze_asked = Some(now);
            out.push(SourceAction::Freeze);
        } else {
            run.cursor = 0;
            run.sending = true;
            run.round_started = now;
            run.round_acked = run.acked_total;
            self.phase = SourcePhase::Precopy { round: run.rounds };
            self.pump(now, out);
        }
    }

    /// Sends what the window allows; ends rounds; releases when everything is confirmed.
    fn pump(&mut self, now: Duration, out: &mut Vec<SourceAction>) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        match self.phase {
            SourcePhase::Precopy { .. } => {
                if run.sending && run.link_up {
                    let window = run.window();
                    let mut batch = Vec::new();
                    while run.inflight < window {
                        match run.next_precopy() {
                            Some(c) => {
                                run.mark_sent(now, c);
                                batch.push(c);
                            }
                            None => {
                                run.sending = false;
                                break;
                            }
                        }
                    }
                    if !batch.is_empty() {
                        out.push(SourceAction::SendChunks {
                            chunks: batch,
                            urgent: false,
                        });
                    }
                }
                let peek_due = run.cfg.postcopy
                    && run
                        .cfg
                        .peek
                        .is_some_and(|p| now.saturating_sub(run.last_peek) >= p);
                // Also while the round drains: a window's worth of time.
                let draining = !run.sending && run.inflight > 0;
                if (run.sending || draining)
                    && run.link_up
                    && !run.collecting
                    && !run.peeking
                    && peek_due
                {
                    run.peeking = true;
                    run.last_peek = now;
                    out.push(SourceAction::CollectDirty);
                }
                if !run.sending
                    && run.inflight == 0
                    && !run.collecting
                    && !run.peeking
                    && run.stale_unanswered == 0
                {
                    run.collecting = true;
                    out.push(SourceAction::CollectDirty);
                }
            }
            SourcePhase::Postcopy => {
                if run.link_up && !run.awaiting_status {
                    let window = run.window();
                    let mut batch = Vec::new();
                    while run.inflight < window {
                        let Some(c) = run.dirty.next_set_wrapping(run.cursor) else {
                            break;
                        };
                        run.cursor = c + 1;
                        run.mark_sent(now, c);
                        batch.push(c);
                    }
                    if !batch.is_empty() {
                        out.push(SourceAction::SendChunks {
                            chunks: batch,
                            urgent: false,
                        });
                    }
                }
                if run.dirty.count_ones() == 0
                    && run.inflight == 0
                    && run.link_up
                    && !run.awaiting_status
                {
                    self.phase = SourcePhase::Released;
                    out.push(SourceAction::Release);
                    out.push(SourceAction::Report(run.report(now, Outcome::Migrated)));
                }
            }
            _ => {}
        }
    }

    fn abort(&mut self, now: Duration, outcome: Outcome, out: &mut Vec<SourceAction>) {
        let resume = !matches!(self.phase, SourcePhase::Precopy { .. });
        if resume {
            out.push(SourceAction::Resume);
        }
        self.phase = SourcePhase::Aborted(outcome);
        if let Some(run) = self.run.as_ref() {
            out.push(SourceAction::Report(run.report(now, outcome)));
        }
    }

    fn link_down(&mut self, now: Duration, out: &mut Vec<SourceAction>) {
        match self.phase {
            SourcePhase::Precopy { .. } | SourcePhase::Freezing | SourcePhase::FinalSync => {
                self.abort(now, Outcome::LinkLost, out)
            }
            SourcePhase::HandingOver | SourcePhase::Postcopy => {
                if let Some(run) = self.run.as_mut() {
                    // Unacknowledged sends are lost with the connection.
                    run.link_up = false;
                    // The next connection's samples may use another origin on B.
                    run.pings.clear();
                    run.clock = ClockSync::new();
                    for c in 0..run.geo.chunks() {
                        if run.outstanding[c as usize] > 0 {
                            run.outstanding[c as usize] = 0;
                            run.dirty.set(c);
                        }
                    }
                    run.inflight = 0;
                }
            }
            _ => {}
        }
    }

    fn message(
        &mut self,
        now: Duration,
        m: Message,
        out: &mut Vec<SourceAction>,
    ) -> Result<(), MigrateError> {
        let check_gen = |got: u64| {
            if got == self.generation {
                Ok(())
            } else {
                Err(MigrateError::Generation {
                    got,
                    want: self.generation,
                })
            }
        };
        match m {
            Message::Accept {
                generation,
                held,
                resumed,
            } => {
                check_gen(generation)?;
                match (self.phase, self.run.as_mut()) {
                    (SourcePhase::HandingOver, Some(run)) => {
                        run.accepted_at = Some(now);
                        run.held = Some(held);
                        // Within what A saw of it: after the Handover left, before the
                        // Accept arrived.
                        let after = run.handover_at.unwrap_or(now).min(now);
                        run.resumed = run
                            .clock
                            .to_local(resumed)
                            .map(|(t, err)| (t.clamp(after, now), err));
                        run.cursor = 0;
                        self.phase = SourcePhase::Postcopy;
                        self.pump(now, out);
                    }
                    (SourcePhase::Postcopy, _) => {}
                    _ => return Err(self.unexpected("Accept")),
                }
            }
            Message::Status {
                generation,
                missing,
            } => {
                check_gen(generation)?;
                let phase = self.phase;
                let (true, Some(run)) = (
                    matches!(phase, SourcePhase::HandingOver | SourcePhase::Postcopy),
                    self.run.as_mut(),
                ) else {
                    return Err(self.unexpected("Status"));
                };
                match missing {
                    Some(missing) => {
                        check_bitmap(&run.geo, &missing)?;
                        run.dirty = missing;
                        run.outstanding.iter_mut().for_each(|o| *o = 0);
                        run.inflight = 0;
                        run.awaiting_status = false;
                        if phase == SourcePhase::HandingOver {
                            // B resumed during the outage; this is an upper bound.
                            run.accepted_at = Some(now);
                            run.cursor = 0;
                            self.phase = SourcePhase::Postcopy;
                        }
                        self.pump(now, out);
                    }
                    None if phase == SourcePhase::HandingOver => {
                        self.abort(now, Outcome::HandoverRefused, out)
                    }
                    None => self.abort(now, Outcome::DestinationLost, out),
                }
            }
            Message::Fetch { chunks } => {
                let (SourcePhase::Postcopy, Some(run)) = (self.phase, self.run.as_mut()) else {
                    return Err(self.unexpected("Fetch"));
                };
                check_chunks(&run.geo, &chunks)?;
                let mut urgent = Vec::new();
                for c in chunks {
                    if run.dirty.get(c) || run.outstanding[c as usize] > 0 {
                        // Counted once per chunk (B asks again after a reconnect).
                        run.faults += run.faulted.set(c) as u64;
                        run.mark_sent(now, c);
                        urgent.push(c);
                    }
                }
                if !urgent.is_empty() {
                    out.push(SourceAction::SendChunks {
                        chunks: urgent,
                        urgent: true,
                    });
                }
            }
            Message::Begin { .. } => return Err(self.unexpected("Begin")),
            Message::Handover { .. } => return Err(self.unexpected("Handover")),
            Message::Query { .. } => return Err(self.unexpected("Query")),
            Message::Stale { .. } => return Err(self.unexpected("Stale")),
            Message::Ping { .. } => return Err(self.unexpected("Ping")),
            Message::Pong { at, peer } => {
                // Only the answer to a ping still outstanding on this connection.
                let i = self
                    .run
                    .as_ref()
                    .and_then(|r| r.pings.iter().position(|p| *p == at));
                let (Some(i), Some(run)) = (i, self.run.as_mut()) else {
                    return Err(self.unexpected("Pong"));
                };
                run.pings.remove(i);
                run.clock.add(Sample {
                    sent: at,
                    received: now,
                    peer,
                });
            }
            Message::Dropped => match self.run.as_mut() {
                Some(run) if run.stale_unanswered > 0 => {
                    run.stale_unanswered -= 1;
                    self.pump(now, out);
                }
                _ => return Err(self.unexpected("Dropped")),
            },
        }
        Ok(())
    }
}

impl Run {
    /// Sends a clock sample (at most [`PINGS`] unanswered; stamps in whole µs, as on
    /// the wire).
    fn ping(&mut self, now: Duration, out: &mut Vec<SourceAction>) {
        if self.pings.len() >= PINGS {
            return;
        }
        let at = Duration::from_micros(now.as_micros().min(u64::MAX as u128) as u64);
        self.pings.push_back(at);
        out.push(SourceAction::Send(Message::Ping { at }));
    }

    /// Bytes of the chunks set in `b` (without the hot ones if `skip_hot`).
    fn bytes_of(&self, b: &Bitmap, skip_hot: bool) -> u64 {
        let mut bytes = 0;
        let mut c = 0;
        while let Some(d) = b.next_set(c) {
            if !(skip_hot && self.hot.get(d)) {
                bytes += self.geo.chunk_len(d) as u64;
            }
            c = d + 1;
        }
        bytes
    }

    /// Delivered bytes per second: the largest of the recent samples.
    fn bandwidth(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }

    fn rtt(&self) -> Duration {
        self.min_rtt.unwrap_or_default()
    }

    /// The RTT post-copy's window is sized with: the least of the last [`RTT_WINDOW`]
    /// sample intervals (a drain among them empties this copy's own queue), or the
    /// minimum of the whole run until that many were taken.
    fn window_rtt(&self) -> Duration {
        match self.recent_min_rtts.iter().min() {
            Some(&m) if self.recent_min_rtts.len() == RTT_WINDOW => m.max(self.rtt()),
            _ => self.rtt(),
        }
    }

    /// Post-copy has seen a standing queue, and the bandwidth filter a rate measured
    /// with the pipe full since (see `queue_seen_at`).
    fn queue_full(&self) -> bool {
        self.queue_seen_at
            .is_some_and(|at| self.samples_taken >= at + 3)
    }

    fn window(&self) -> u64 {
        let chunk = self.geo.chunk_size as u64;
        match self.cfg.window {
            Window::Fixed(w) => w.max(chunk),
            Window::Auto { min, max, gain_pct } => {
                let floor = min.max(4 * chunk);
                // In post-copy B's app waits for faulted chunks, which queue behind the
                // window's excess over one BDP at the bottleneck: keep it small once
                // pre-copy has measured the rate. A pure post-copy ramps up at the
                // configured gain until its chunks' round trips show a standing queue.
                // At the post-copy gain the RTT is the least of the recent intervals',
                // one of which drains (and so sees the path without this copy's queue,
                // which would otherwise compound): on a path whose RTT rose above its
                // earlier minimum for good, a window sized from that minimum limits the
                // rate, and every sample would lower it further. No probe: once the RTT
                // has adapted, the gain's 10 % finds the rate again, and a probe's queue
                // is what faults wait behind (measured: +4 ms a fault at 50 ms RTT).
                let (gain_pct, rtt) = match self.accepted_at {
                    Some(_) if self.rounds > 0 || self.queue_full() => {
                        let g = gain_pct.min(POSTCOPY_GAIN_PCT);
                        let g = match self.samples_taken % DRAIN_EVERY {
                            0 => g.min(DRAIN_GAIN_PCT),
                            _ => g,
                        };
                        (g, self.window_rtt())
                    }
                    _ => (gain_pct, self.rtt()),
                };
                let gain = gain_pct as f64 / 100.0;
                let target = (gain * self.bandwidth() * rtt.as_secs_f64()) as u64;
                target.clamp(floor, max.max(floor))
            }
        }
    }

    /// The next chunk of this pre-copy round (dirty, not hot).
    fn next_precopy(&mut self) -> Option<u64> {
        loop {
            let c = self.dirty.next_set(self.cursor)?;
            self.cursor = c + 1;
            if !self.hot.get(c) {
                return Some(c);
            }
        }
    }

    /// Chunks stale on B that B was not told about yet (post-copy only): the hot ones,
    /// or with `all` every dirty one. B may drop them now, off the downtime. `Stale`
    /// goes on the bulk stream in order with chunk data, so a later re-send re-fills
    /// what B dropped.
    fn newly_stale(&mut self, all: bool) -> Option<Bitmap> {
        if !self.cfg.postcopy {
            return None;
        }
        let mut stale = Bitmap::new(self.geo.chunks());
        let mut c = 0;
        while let Some(d) = self.dirty.next_set(c) {
            c = d + 1;
            if (all || self.hot.get(d)) && self.notified.set(d) {
                stale.set(d);
            }
        }
        (stale.count_ones() > 0).then_some(stale)
    }

    /// Sends a `Stale` notice (if there is anything in it); B answers it.
    fn notify(&mut self, stale: Option<Bitmap>, out: &mut Vec<SourceAction>) {
        if let Some(chunks) = stale {
            self.stale_unanswered += 1;
            out.push(SourceAction::Send(Message::Stale { chunks }));
        }
    }

    /// A mid-round peek's chunks: dirty from now on (those behind the cursor wait for
    /// the next round); B may drop those this round will not send again.
    fn peeked(&mut self, chunks: &[u64]) -> Option<Bitmap> {
        let mut stale = Bitmap::new(self.geo.chunks());
        for &c in chunks {
            self.peeked.set(c);
            self.dirty.set(c);
            let behind = c < self.cursor || self.hot.get(c);
            if self.cfg.postcopy && behind && self.notified.set(c) {
                stale.set(c);
            }
        }
        (stale.count_ones() > 0).then_some(stale)
    }

    fn mark_sent(&mut self, now: Duration, c: u64) {
        let len = self.geo.chunk_len(c) as u64;
        self.dirty.clear(c);
        self.notified.clear(c);
        let o = &mut self.outstanding[c as usize];
        *o = o.saturating_add(1);
        self.sent_at[c as usize] = now;
        if self.inflight == 0 {
            // Starting from an idle pipe: the idle time is not delivery time.
            self.delivered_at = now;
        }
        self.sent_delivered[c as usize] = (self.acked_total, self.delivered_at);
        self.inflight += len;
        self.bytes_sent += len;
        self.sent_on_conn += 1;
    }

    fn acked(&mut self, now: Duration, bytes: u64, chunks: &[u64]) {
        self.acked_total += bytes;
        self.delivered_at = now;
        if let Some((drain, left)) = self.drain.as_mut() {
            for &c in chunks {
                if c < drain.len() && drain.get(c) {
                    drain.clear(c);
                    *left -= 1;
                }
            }
            if *left == 0 {
                self.drain = None;
                self.drained_at = Some(now);
            }
        }
        for &c in chunks {
            let o = &mut self.outstanding[c as usize];
            if *o == 0 {
                continue; // not ours (a send forgotten with a dead connection)
            }
            *o -= 1;
            self.inflight = self.inflight.saturating_sub(self.geo.chunk_len(c) as u64);
            if *o == 0 {
                let rtt = now.saturating_sub(self.sent_at[c as usize]);
                self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
                self.interval_min_rtt = Some(self.interval_min_rtt.map_or(rtt, |m| m.min(rtt)));
                let srtt = self.srtt.map_or(rtt, |s| (s * 7 + rtt) / 8);
                self.srtt = Some(srtt);
                if self.accepted_at.is_some()
                    && self.queue_seen_at.is_none()
                    && srtt > self.rtt() + crate::engine::pull::queue_threshold(self.rtt())
                {
                    self.queue_seen_at = Some(self.samples_taken);
                }
                // Bytes delivered between this chunk's send and its ack, over the time
                // from the ack before its send to this one (never shorter than its RTT).
                let (d0, t0) = self.sent_delivered[c as usize];
                let span = now.saturating_sub(t0).max(rtt);
                if span >= Duration::from_micros(100) {
                    let rate = (self.acked_total - d0) as f64 / span.as_secs_f64();
                    self.pending_rate = self.pending_rate.max(rate);
                }
            }
        }
        // Keep one sample (the best seen) per interval, so the windowed maximum spans
        // BW_SAMPLES intervals.
        let interval = self.rtt().max(Duration::from_millis(10));
        match self.sample {
            None => self.sample = Some((now, self.acked_total)),
            Some((t0, _)) if now.saturating_sub(t0) >= interval => {
                if let (Some(_), Some(r)) = (self.accepted_at, self.interval_min_rtt.take()) {
                    if self.recent_min_rtts.len() == RTT_WINDOW {
                        self.recent_min_rtts.pop_front();
                    }
                    self.recent_min_rtts.push_back(r);
                }
                if self.pending_rate > 0.0 {
                    if self.samples.len() == BW_SAMPLES {
                        self.samples.pop_front();
                    }
                    self.samples.push_back(self.pending_rate);
                    self.samples_taken += 1;
                }
                self.pending_rate = 0.0;
                self.sample = Some((now, self.acked_total));
            }
            Some(_) => {}
        }
    }

    /// A round's dirty list arrived.
    fn collected(&mut self, now: Duration, chunks: &[u64]) {
        // What this round's peeks saw counts as collected now.
        let mut this = std::mem::replace(&mut self.peeked, Bitmap::new(self.geo.chunks()));
        let mut bytes = self.bytes_of(&this, false);
        for &c in chunks {
            if this.set(c) {
                bytes += self.geo.chunk_len(c) as u64;
            }
            self.dirty.set(c);
        }
        let round = now.saturating_sub(self.round_started);
        self.longest_round = self.longest_round.max(round);
        if round > Duration::ZERO && self.acked_total > self.round_acked {
            self.round_rate = (self.acked_total - self.round_acked) as f64 / round.as_secs_f64();
        }
        for (c, s) in self.streak.iter_mut().enumerate() {
            let i = c as u64;
            if this.get(i) {
                *s = s.saturating_add(1);
                self.last_dirty[c] = now;
            } else {
                *s = 0;
            }
            if *s >= HOT_STREAK {
                self.hot.set(i);
            } else if now.saturating_sub(self.last_dirty[c]) >= self.longest_round {
                // Cooled off: clean for as long as the longest round took.
                self.hot.clear(i);
            }
        }
        let dt = round.as_secs_f64();
        self.dirty_rate = if dt > 0.0 { bytes as f64 / dt } else { 0.0 };
        self.rounds += 1;
    }

    fn report(&self, now: Duration, outcome: Outcome) -> Report {
        // The app stops when the driver starts pausing it (the hook, SIGSTOP or
        // write-protection act at once); `Frozen` comes back after the pause and the
        // driver's own scheduling. Before a `Frozen`, the decision's instant.
        let paused = self.freeze_began.or(self.freeze_asked).or(self.frozen_at);
        let downtime = match (paused, self.accepted_at, self.resumed) {
            (Some(f), Some(_), Some((t, _))) => ms(t.saturating_sub(f)),
            (Some(f), Some(a), None) => {
                let half = self.rtt() / 2;
                let upper = a.saturating_sub(half);
                let resumed = match (self.handover_at, self.held) {
                    (Some(h), Some(held)) => {
                        // When B read the Handover: after the chunks ahead of it, whose
                        // acks precede the Accept on B's stream; the last says when B
                        // had them.
                        let read = self
                            .drained_at
                            .map_or(h + half, |d| (h + half).max(d.saturating_sub(half)));
                        (read + held).min(upper)
                    }
                    _ => upper,
                };
                ms(resumed.saturating_sub(f))
            }
            _ => 0.0,
        };
        Report {
            outcome,
            total_ms: ms(now.saturating_sub(self.started)),
            precopy_ms: paused.map_or(0.0, |f| ms(f.saturating_sub(self.started))),
            downtime_ms: downtime,
            downtime_error_ms: self
                .resumed
                .filter(|_| paused.is_some())
                .map(|(_, e)| ms(e)),
            postcopy_ms: self.accepted_at.map_or(0.0, |a| ms(now.saturating_sub(a))),
            bytes_sent: self.bytes_sent,
            bytes_acked: self.acked_total,
            rounds: self.rounds,
            postcopy_faults: self.faults,
            deferred_chunks: self.deferred,
            bandwidth: self.bandwidth(),
            rtt_ms: ms(self.rtt()),
        }
    }
}
