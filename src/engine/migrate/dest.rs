//! Host B's side of a migration: receive pre-copy data, take ownership, fetch stale
//! chunks on demand, answer queries after a reconnect.

use std::time::Duration;

use super::{check_bitmap, check_chunks, Message, MigrateError};
use crate::region::{Bitmap, Geometry};

/// Where host B is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestPhase {
    /// No migration.
    Idle,
    /// Receiving pre-copy data; A owns the region.
    Receiving,
    /// B owns the region and its app runs; stale chunks are fetched on demand.
    Owner,
    /// B owns the region and has every chunk.
    Complete,
    /// The migration was given up; the partial copy was discarded.
    Aborted,
}

impl DestPhase {
    /// The phase as `status` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            DestPhase::Idle => "idle",
            DestPhase::Receiving => "receiving",
            DestPhase::Owner => "owner",
            DestPhase::Complete => "complete",
            DestPhase::Aborted => "aborted",
        }
    }
}

/// What happens to host B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestEvent {
    Message(Message),
    /// These chunks' bytes arrived (verified, not yet written).
    Arrived(Vec<u64>),
    /// B's app touched a chunk that is not here (its thread waits).
    Fault(u64),
    /// The driver could not install these chunks after an `Install` (post-copy): they
    /// are missing again (and reported so in the next `Status`), never acknowledged.
    InstallFailed(Vec<u64>),
    LinkDown,
    LinkUp,
}

/// What host B's driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAction {
    Send(Message),
    /// Write these of the arrived chunks (and wake threads waiting on them); drop the
    /// others (B's copy is current and may have been written since).
    Install(Vec<u64>),
    /// Tell A these chunks arrived (A sees [`SourceEvent::Acked`](super::SourceEvent)).
    Ack(Vec<u64>),
    /// B's copies of these chunks are out of date: drop them (punch them out of a
    /// receiving app's memfd, so that touching them faults). Pre-copy data arriving
    /// later for one of them is installed after the drop (the driver performs actions
    /// in order).
    Drop(Bitmap),
    /// B owns the region: let its app run.
    Resume,
    /// The migration was given up: drop the partial copy.
    Discard,
    /// Every chunk is here.
    Complete,
}

/// Counters of host B.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestStats {
    /// Distinct chunks the app faulted on.
    pub faults: u64,
    pub chunks_received: u64,
    /// Arrived chunks dropped because B's copy was already current.
    pub duplicates: u64,
    /// Chunks B holds a copy of in the current attempt: distinct chunks arrived (less
    /// those dropped as stale) while receiving; chunks no longer stale once B owns the
    /// region; 0 when no attempt runs. Unlike `chunks_received`, never above the
    /// region's chunk count (re-sent chunks and earlier attempts do not count).
    pub chunks_present: u64,
    /// When B resumed the app.
    pub resumed_at: Option<Duration>,
}

/// Host B's migration engine.
#[derive(Debug)]
pub struct MigrateDest {
    phase: DestPhase,
    geo: Option<Geometry>,
    generation: u64,
    /// Generations at or below this one were refused and never accepted.
    fence: u64,
    /// Chunks arrived on this connection.
    received: u64,
    /// A handover waiting for `sent` chunks of this connection to arrive.
    pending: Option<(Bitmap, u64, Duration)>,
    missing: Bitmap,
    /// Chunks B dropped on A's `Stale` and has not received since (pre-copy).
    dropped: Bitmap,
    requested: Bitmap,
    /// Chunks arrived in this attempt while receiving (and not dropped since).
    copied: Bitmap,
    link_up: bool,
    /// Reconnected while owner: fetches wait until B has answered A's `Query` (A takes
    /// a `Fetch` only once it knows B owns the region).
    resync: bool,
    stats: DestStats,
}

impl Default for MigrateDest {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrateDest {
    pub fn new() -> MigrateDest {
        MigrateDest {
            phase: DestPhase::Idle,
            geo: None,
            generation: 0,
            fence: 0,
            received: 0,
            pending: None,
            missing: Bitmap::new(0),
            dropped: Bitmap::new(0),
            requested: Bitmap::new(0),
            copied: Bitmap::new(0),
            link_up: true,
            resync: false,
            stats: DestStats::default(),
        }
    }

    /// The generation of the current (or last) migration into this host.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn phase(&self) -> DestPhase {
        self.phase
    }

    pub fn stats(&self) -> DestStats {
        let chunks = self.geo.map_or(0, |g| g.chunks());
        DestStats {
            chunks_present: match self.phase {
                DestPhase::Receiving => self.copied.count_ones(),
                DestPhase::Owner | DestPhase::Complete => {
                    chunks.saturating_sub(self.missing.count_ones())
                }
                DestPhase::Idle | DestPhase::Aborted => 0,
            },
            ..self.stats
        }
    }

    /// True while this host holds the ownership token.
    pub fn owns(&self) -> bool {
        matches!(self.phase, DestPhase::Owner | DestPhase::Complete)
    }

    /// True when B's app must fault on `chunk` (B owns it but the chunk is stale).
    pub fn is_missing(&self, chunk: u64) -> bool {
        self.phase == DestPhase::Owner && self.missing.get(chunk)
    }

    /// How many chunks B's app must fault on (0 unless B owns the region).
    pub fn missing_count(&self) -> u64 {
        if self.phase == DestPhase::Owner {
            self.missing.count_ones()
        } else {
            0
        }
    }

    fn unexpected(&self, what: &'static str) -> MigrateError {
        MigrateError::Unexpected {
            what,
            phase: self.phase.name(),
        }
    }

    /// Handles one event at `now`; returns what to do, in order. On error nothing changed.
    pub fn handle(
        &mut self,
        now: Duration,
        ev: DestEvent,
    ) -> Result<Vec<DestAction>, MigrateError> {
        let mut out = Vec::new();
        match ev {
            DestEvent::Message(m) => self.message(now, m, &mut out)?,
            DestEvent::InstallFailed(chunks) => {
                let Some(geo) = self.geo else {
                    return Err(self.unexpected("install failure"));
                };
                check_chunks(&geo, &chunks)?;
                if matches!(self.phase, DestPhase::Owner | DestPhase::Complete) {
                    for &c in &chunks {
                        self.missing.set(c);
                    }
                    self.phase = DestPhase::Owner;
                }
            }
            DestEvent::Arrived(chunks) => {
                let Some(geo) = self.geo else {
                    return Err(self.unexpected("chunk data"));
                };
                check_chunks(&geo, &chunks)?;
                self.received += chunks.len() as u64;
                self.stats.chunks_received += chunks.len() as u64;
                match self.phase {
                    DestPhase::Receiving => {
                        for &c in &chunks {
                            self.dropped.clear(c);
                            self.copied.set(c);
                        }
                        out.push(DestAction::Install(chunks.clone()));
                        out.push(DestAction::Ack(chunks));
                        self.try_accept(now, &mut out);
                    }
                    DestPhase::Owner | DestPhase::Complete => {
                        let mut install = Vec::new();
                        for &c in &chunks {
                            if self.missing.clear(c) {
                                self.requested.clear(c);
                                install.push(c);
                            } else {
                                self.stats.duplicates += 1;
                            }
                        }
                        if !install.is_empty() {
                            out.push(DestAction::Install(install));
                        }
                        out.push(DestAction::Ack(chunks));
                        self.check_complete(&mut out);
                    }
                    // Data of a migration given up.
                    DestPhase::Idle | DestPhase::Aborted => {}
                }
            }
            DestEvent::Fault(c) => {
                if !self.owns() {
                    return Err(MigrateError::NotOwner);
                }
                let Some(geo) = self.geo else {
                    return Err(MigrateError::NotOwner);
                };
                check_chunks(&geo, &[c])?;
                if self.missing.get(c) && self.requested.set(c) {
                    self.stats.faults += 1;
                    if self.link_up && !self.resync {
                        out.push(DestAction::Send(Message::Fetch { chunks: vec![c] }));
                    }
                }
            }
            DestEvent::LinkDown => {
                self.link_up = false;
                self.pending = None;
                if self.phase == DestPhase::Receiving {
                    self.phase = DestPhase::Aborted;
                    out.push(DestAction::Discard);
                }
            }
            DestEvent::LinkUp => {
                self.link_up = true;
                self.resync = self.owns();
                self.received = 0;
            }
        }
        Ok(out)
    }

    fn message(
        &mut self,
        now: Duration,
        m: Message,
        out: &mut Vec<DestAction>,
    ) -> Result<(), MigrateError> {
        match m {
            Message::Begin {
                generation,
                size,
                chunk_size,
            } => {
                match self.phase {
                    DestPhase::Idle | DestPhase::Aborted => {}
                    DestPhase::Complete => return Err(MigrateError::Busy("complete")),
                    p => return Err(MigrateError::Busy(p.name())),
                }
                if generation <= self.fence {
                    return Err(MigrateError::Fenced {
                        got: generation,
                        fence: self.fence,
                    });
                }
                let geo = Geometry::new(size, chunk_size as u64)?;
                self.geo = Some(geo);
                self.generation = generation;
                self.missing = Bitmap::full(geo.chunks());
                self.dropped = Bitmap::new(geo.chunks());
                self.requested = Bitmap::new(geo.chunks());
                self.copied = Bitmap::new(geo.chunks());
                self.pending = None;
                self.received = 0;
                self.phase = DestPhase::Receiving;
            }
            Message::Handover {
                generation,
                stale,
                sent,
            } => {
                if generation <= self.fence {
                    return Err(MigrateError::Fenced {
                        got: generation,
                        fence: self.fence,
                    });
                }
                if generation != self.generation {
                    return Err(MigrateError::Generation {
                        got: generation,
                        want: self.generation,
                    });
                }
                let (DestPhase::Receiving, Some(geo)) = (self.phase, self.geo) else {
                    return Err(self.unexpected("Handover"));
                };
                check_bitmap(&geo, &stale)?;
                self.pending = Some((stale, sent, now));
                self.try_accept(now, out);
            }
            Message::Query { generation } => {
                if self.owns() && generation == self.generation {
                    self.resync = false;
                    out.push(DestAction::Send(Message::Status {
                        generation,
                        missing: Some(self.missing.clone()),
                    }));
                    // Threads still waiting: ask again on this connection.
                    let mut again = Vec::new();
                    let mut c = 0;
                    while let Some(r) = self.requested.next_set(c) {
                        again.push(r);
                        c = r + 1;
                    }
                    if !again.is_empty() {
                        out.push(DestAction::Send(Message::Fetch { chunks: again }));
                    }
                } else {
                    // Never accept this generation from now on.
                    self.fence = self.fence.max(generation);
                    self.pending = None;
                    if self.phase == DestPhase::Receiving && generation == self.generation {
                        self.phase = DestPhase::Aborted;
                        out.push(DestAction::Discard);
                    }
                    out.push(DestAction::Send(Message::Status {
                        generation,
                        missing: None,
                    }));
                }
            }
            Message::Stale { chunks } => match (self.phase, self.geo) {
                (DestPhase::Receiving, Some(geo)) => {
                    check_bitmap(&geo, &chunks)?;
                    let mut drop = Bitmap::new(geo.chunks());
                    let mut c = 0;
                    while let Some(d) = chunks.next_set(c) {
                        c = d + 1;
                        if self.dropped.set(d) {
                            drop.set(d);
                        }
                        self.copied.clear(d);
                    }
                    if drop.count_ones() > 0 {
                        out.push(DestAction::Drop(drop));
                    }
                    out.push(DestAction::Send(Message::Dropped));
                }
                // Data of a migration given up.
                (DestPhase::Idle | DestPhase::Aborted, _) => {}
                _ => return Err(self.unexpected("Stale")),
            },
            Message::Ping { at } => out.push(DestAction::Send(Message::Pong { at, peer: now })),
            Message::Pong { .. } => return Err(self.unexpected("Pong")),
            Message::Accept { .. } => return Err(self.unexpected("Accept")),
            Message::Dropped => return Err(self.unexpected("Dropped")),
            Message::Status { .. } => return Err(self.unexpected("Status")),
            Message::Fetch { .. } => return Err(self.unexpected("Fetch")),
        }
        Ok(())
    }

    /// Accepts a pending handover once every chunk sent before it has arrived.
    fn try_accept(&mut self, now: Duration, out: &mut Vec<DestAction>) {
        let ready = matches!(&self.pending, Some((_, sent, _)) if self.received >= *sent);
        if !ready || self.phase != DestPhase::Receiving {
            return;
        }
        let Some((stale, _, handover_at)) = self.pending.take() else {
            return;
        };
        // Drop what is stale and was not dropped already in pre-copy.
        let mut drop = Bitmap::new(stale.len());
        let mut c = 0;
        while let Some(d) = stale.next_set(c) {
            c = d + 1;
            if !self.dropped.get(d) {
                drop.set(d);
            }
        }
        self.dropped = Bitmap::new(0);
        self.copied = Bitmap::new(0);
        self.missing = stale;
        self.phase = DestPhase::Owner;
        self.stats.resumed_at = Some(now);
        if drop.count_ones() > 0 {
            out.push(DestAction::Drop(drop));
        }
        out.push(DestAction::Resume);
        out.push(DestAction::Send(Message::Accept {
            generation: self.generation,
            held: now.saturating_sub(handover_at),
            resumed: now,
        }));
        self.check_complete(out);
    }

    fn check_complete(&mut self, out: &mut Vec<DestAction>) {
        if self.phase == DestPhase::Owner && self.missing.count_ones() == 0 {
            self.phase = DestPhase::Complete;
            out.push(DestAction::Complete);
        }
    }
}
