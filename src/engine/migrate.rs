//! Live migration of one region from host A ([`MigrateSource`]) to host B
//! ([`MigrateDest`]), as two state machines with no sockets, no threads and no clock:
//! every call takes `now` (time since any fixed start) and one event, and returns the
//! actions the driver performs, in order. The tests drive both over a simulated link
//! with a virtual clock.
//!
//! # Protocol
//!
//! ```text
//!  A (source, owner)                                   B (destination)
//!  Start ───────── Begin{gen, size, chunk} ──────────▶ Receiving
//!  (start, each round's start, the freeze decision: the pipe is empty)
//!              ─── Ping{A's clock} ──────────────────▶
//!              ◀── Pong{A's stamp, B's clock} ──────── (a sample of B's clock)
//!  Precopy{0}  ─── chunks (window-limited) ──────────▶ Install + Ack
//!              ◀── Ack{chunks} ─────────────────────── (bandwidth = acked bytes / time)
//!  round end: pipe drained, CollectDirty → Dirty(list)
//!  Precopy{r}  ─── dirty chunks that are not hot ────▶
//!  predicted downtime ≤ budget, or round/time limit:
//!  Freeze → Frozen → CollectDirty → Dirty(final list)
//!  FinalSync   ─── final chunks (hot first, as many as fit the budget) ──▶
//!  after a collection or a mid-round peek, chunks B holds stale that this round
//!  will not send again (post-copy only):
//!              ─── Stale{chunks} ───────────────────▶ Drop them now (punched out of
//!              ◀── Dropped ──────────────────────────  the receiving app's memfd)
//!  HandingOver ─── Handover{gen, stale, sent} ───────▶ waits until `sent` chunks of this
//!                                                      connection arrived, then Drop
//!                                                      (stale, not dropped yet), Resume
//!              ◀── Accept{gen, held, resumed} ─────── Owner (app runs on B; `resumed`
//!                                                      on B's clock)
//!  Postcopy    ◀── Fetch{chunks} (app faulted) ─────── stale chunk touched
//!              ─── urgent chunks ─────────────────────▶ Install (wakes the faulting thread)
//!              ─── background chunks ────────────────▶
//!  all chunks confirmed: Release + Report              all present: Complete
//! ```
//!
//! # Decisions
//!
//! * **Chunks.** The region is cut into `ceil(size / chunk_size)` chunks
//!   ([`Geometry`]). A keeps, per chunk, whether B's copy is
//!   stale (`dirty`), how many sends of it are unacknowledged, and how many consecutive
//!   dirty collections reported it (its *streak*).
//! * **Rounds end on an empty pipe.** A round sends its chunks within a window of
//!   unacknowledged bytes ([`Window`], as in pull), and ends when all of them are
//!   acknowledged; only then does A collect the dirty list. This costs one idle RTT per
//!   round but means that at freeze time nothing queued on the link delays the final
//!   sync, so the predicted downtime is honest.
//! * **Bandwidth from acks.** Delivery-rate samples (acked bytes over at least one min
//!   RTT) feed a windowed maximum of the last [`BW_SAMPLES`] samples, so app-limited
//!   samples (round ends) do not drag it down; bytes merely queued count for nothing.
//!   The min RTT is the shortest send→ack time of any chunk.
//! * **Final sync size.** The final sync sends what fits half of what is left of the
//!   budget after the RTT and the freeze and final collection, at the lower of the
//!   bandwidth estimate and the last round's delivered rate: the estimate is a windowed
//!   maximum and ran 1.4-2x the link in the 1 GiB bench, and B still has to drop the
//!   rest and resume after the data arrives.
//! * **Convergence.** After each round's collection, the predicted downtime is
//!   `bytes of (dirty and not hot) / bandwidth + RTT`. A switches over when it fits the
//!   budget, or after `max_rounds` rounds, or once `max_time` has passed (then the
//!   current round stops sending, drains and switches over).
//! * **Hot chunks.** A chunk dirty in [`HOT_STREAK`] consecutive collections is hot: it
//!   is not re-sent in pre-copy rounds (it would be stale again at once). It cools off
//!   only once no collection has reported it for as long as the longest round took
//!   (a short round proves little about a chunk written every few hundred ms; without
//!   this, a short round would release the hot set and the next round would re-send
//!   it: measured in the fast-writer test, round bytes went 5 MB → 38 MB). At the final
//!   sync, hot chunks go first (the app is most likely to touch them on B right away),
//!   then the other dirty chunks, as many as fit `(budget − RTT) × bandwidth` bytes; the
//!   rest become the *stale set* and go to post-copy. With [`Config::postcopy`] false,
//!   everything is sent before handover (downtime may exceed the budget, but nothing
//!   depends on A after B accepts).
//! * **Dropping stale copies early.** B's app must fault on every stale chunk, so B has
//!   to drop its out-of-date copies (punch them out of the app's memfd) before the app
//!   runs, and freeing memory is not free (~190 ms for 1 GiB here). So A says which of
//!   B's copies went stale (`Stale`) as soon as it knows and B drops them then, off the
//!   downtime: hot chunks after each collection; chunks behind the round's cursor after
//!   each mid-round *peek* ([`Config::peek`]: a collection that does not end the round,
//!   whose chunks count for the round's collection); every dirty chunk when A decides
//!   to freeze. B answers each notice with `Dropped` once done, and a round ends only
//!   when its notices are answered (a drop of 32k scattered chunks took 105 ms and
//!   delayed the handover behind it). At the handover B drops only what is stale and
//!   not dropped yet, about what was written since the last peek. `Stale` travels on the bulk stream in order
//!   with chunk data, so a chunk that cools off and is re-sent later is re-filled after
//!   its drop, never dropped after its re-send.
//! * **Downtime** (freeze request on A to B's app running) spans two clocks. B's
//!   `Accept` says when it let its app run on its own clock; A places that on its clock
//!   with the `Ping`/`Pong` sample that bounds it best ([`crate::engine::clock`]: the
//!   midpoint of A's send and receive stamps, off by at most half the sample's round
//!   trip), sent when A's pipe is empty so it does not wait behind chunk data, and kept
//!   between the `Handover`'s send and the `Accept`'s arrival. Without a sample it
//!   falls back to an estimate from A's stamps ([`Report::downtime_ms`]).
//! * **Post-copy window.** Faulted chunks go on the urgent lane but wait at the
//!   bottleneck behind the background data already queued there, about the window's
//!   excess over one BDP; once pre-copy has measured the rate, post-copy's automatic
//!   window uses gain 1.1 instead of the configured one.
//! * **Ownership** is a token with a generation. Exactly one side may run the app: A
//!   until it sends `Handover`, B from the moment it accepts one. Between the two the
//!   token is *in doubt*: A stays frozen and waits (forever if need be: never two
//!   owners). If the link drops while in doubt, A asks B on reconnect (`Query`); B's
//!   answer decides: owner → A goes on with post-copy; not owner → B fences that
//!   generation (a late `Handover` of it is refused) and A resumes its app (the
//!   migration aborts). B drops a handover whose chunks it has not all received when its
//!   link drops, so an answer can never be outdated.
//! * **Chunk order.** `Handover.sent` counts the chunk sends of this connection before
//!   it; B accepts only once it has received that many, so every chunk not in the stale
//!   set is current on B. Pre-handover chunk data must reach B in send order (one bulk
//!   stream); post-copy sends all carry frozen content, so their lanes may reorder.
//!   Messages travel in order on one control stream (B's `Fetch` never overtakes its
//!   `Accept`); `Begin` reaches B before the first chunk. In
//!   post-copy B installs a chunk only if it is still missing (a duplicate must not
//!   overwrite what B's app wrote since).
//! * **Post-copy.** B fetches faulted stale chunks (urgent lane, before background
//!   data); A sends the rest in the background within the window, and keeps every chunk
//!   until B has acknowledged it. On a link cut A forgets unacknowledged sends; on
//!   reconnect B's `Status` carries its missing set, which replaces A's view; B re-sends
//!   the fetches its faulting threads wait for, and sends none before that `Status`
//!   (A may still be in doubt, and takes a `Fetch` only in post-copy). A releases the region when every chunk
//!   is confirmed.
//!
//! # Failures
//!
//! * Link cut (or B dies) before `Handover` is sent: A aborts; if it had asked for a
//!   freeze it resumes the app ([`SourceAction::Resume`] also cancels a freeze still in
//!   progress). B discards its partial copy. A's region is never touched by the engine.
//! * Link cut while the handover is in doubt: see ownership above.
//! * Link cut in post-copy: B's faulting threads wait; both sides resume on reconnect.
//! * Losing a host after handover can lose data: B's writes if B is lost (A then resumes
//!   its frozen copy when a restarted B says it owns nothing), the stale chunks if A is
//!   lost. `Config::postcopy = false` avoids the second by finishing the copy first.
//! * A second `Start` while a migration runs is refused ([`MigrateError::Busy`]), and
//!   after the region was handed over ([`MigrateError::NotOwner`]).
//!
//! Not modelled here: cancelling by the user, B answering `Begin` with a refusal (the
//! driver closes the connection, which A sees as a link cut), the wire encoding.

mod dest;
#[cfg(test)]
mod sim;
mod source;
#[cfg(test)]
mod tests;

pub use dest::{DestAction, DestEvent, DestPhase, DestStats, MigrateDest};
pub use source::{MigrateSource, Progress, SourceAction, SourceEvent, SourcePhase};

use std::time::Duration;

pub use super::pull::Window;
use crate::region::{Bitmap, Geometry, GeometryError};

/// Consecutive dirty collections after which a chunk is hot (not re-sent in pre-copy).
pub const HOT_STREAK: u8 = 2;

/// Delivery-rate samples the bandwidth estimate takes its maximum over.
pub const BW_SAMPLES: usize = 16;

/// What the two engines tell each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A → B: a migration begins; B will own generation `generation` if it accepts.
    Begin {
        generation: u64,
        size: u64,
        chunk_size: u32,
    },
    /// A → B: ownership passes to B. `stale`: chunks B must fetch before use; `sent`:
    /// chunks A sent on this connection before this message.
    Handover {
        generation: u64,
        stale: Bitmap,
        sent: u64,
    },
    /// B → A: B owns `generation` and its app runs. `held`: how long B took from reading
    /// the `Handover` to letting its app run (waiting for chunks still on the way,
    /// dropping stale copies); `resumed`: when its app was let run, on B's clock (A
    /// places it on its own with the `Ping`/`Pong` samples).
    Accept {
        generation: u64,
        held: Duration,
        resumed: Duration,
    },
    /// A → B, on reconnect while the handover is in doubt or in post-copy.
    Query { generation: u64 },
    /// A → B during pre-copy, in order with the chunk data: B's copies of these chunks
    /// are out of date (hot: A will not re-send them before the handover unless they
    /// cool off), so B may drop them now rather than in the downtime. Only with
    /// [`Config::postcopy`].
    Stale { chunks: Bitmap },
    /// B → A: B has dropped the copies of every `Stale` before this (one per `Stale`).
    /// A round ends only once its notices are answered, so B is not still dropping
    /// when the freeze comes.
    Dropped,
    /// B → A, the answer to `Query`: `Some(missing chunks)` if B owns `generation`.
    Status {
        generation: u64,
        missing: Option<Bitmap>,
    },
    /// B → A: B's app waits for these chunks.
    Fetch { chunks: Vec<u64> },
    /// A → B: a clock sample; `at` is A's clock when sent. A sends one at the start and
    /// whenever its pipe has drained (each round's start, the freeze decision), so it
    /// does not wait behind chunk data.
    Ping { at: Duration },
    /// B → A, the answer to `Ping`: its `at`, and B's clock when B read it.
    Pong { at: Duration, peer: Duration },
}

/// How a migration is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub size: u64,
    pub chunk_size: u32,
    /// Downtime budget (freeze on A to resume on B).
    pub budget: Duration,
    /// Pre-copy rounds at most (the first full copy is round 0; 0 means pure post-copy).
    pub max_rounds: u32,
    /// Time after which pre-copy stops and the migration switches over.
    pub max_time: Duration,
    /// Unacknowledged bytes A lets onto the link.
    pub window: Window,
    /// Whether chunks may be left for post-copy (false: send all before handover).
    pub postcopy: bool,
    /// With `postcopy`: also collect the dirty chunks every this long *during* a round
    /// (a *peek*), so that B drops the copies that went stale behind the round's cursor
    /// before the freeze rather than in the downtime. `None`: collect at round ends only
    /// (right for a scanner whose collection is a pass over the whole region).
    pub peek: Option<Duration>,
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// B owns the region and has every chunk; A released it.
    Migrated,
    /// The link went down before the handover; A's app runs on.
    LinkLost,
    /// A's own side failed before the handover (collecting changes, or the freeze); A's
    /// app runs on.
    SourceFailed,
    /// B refused the migration before the handover (busy with another, or it refused a
    /// message); A's app runs on.
    Refused,
    /// Cancelled on A before the handover (the command that started it went away); A's
    /// app runs on.
    Cancelled,
    /// After a cut during the handover, B said it did not take ownership; A resumed.
    HandoverRefused,
    /// After handover, B said it owns nothing (it lost its state); A resumed its frozen
    /// copy. B's writes since handover are lost.
    DestinationLost,
}

/// What a migration cost. Times are in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub outcome: Outcome,
    /// Start to release (or abort).
    pub total_ms: f64,
    /// Start to the freeze (pre-copy): when the driver began pausing the app, 0 if never
    /// frozen.
    pub precopy_ms: f64,
    /// Freeze on A (when the driver began pausing the app: [`SourceEvent::Frozen`]) to
    /// resumed on B, 0 if B never resumed. B's resume (its clock,
    /// in the `Accept`) is placed on A's clock by the `Ping`/`Pong` sample that bounds it
    /// best ([`crate::engine::clock`]), within the `Handover`'s send and the `Accept`'s
    /// arrival. Without a sample (or when A learnt of the handover from a `Status` after
    /// a cut) it is an estimate from A's stamps: B read the `Handover` at its send +
    /// RTT/2 (or the ack of the last chunk sent before it − RTT/2 if later), plus B's
    /// `held`, but never later than the `Accept`'s arrival − RTT/2.
    pub downtime_ms: f64,
    /// The most `downtime_ms` can be off by (half the clock sample's round trip plus
    /// drift), when B's resume was placed with B's clock; `None` for the estimate.
    pub downtime_error_ms: Option<f64>,
    /// Accept to release, 0 without post-copy.
    pub postcopy_ms: f64,
    /// Chunk bytes A sent (every send, re-sends included).
    pub bytes_sent: u64,
    /// Bytes B acknowledged (as the driver counted them).
    pub bytes_acked: u64,
    /// Pre-copy rounds completed.
    pub rounds: u32,
    /// Chunks B fetched on demand.
    pub postcopy_faults: u64,
    /// Chunks left stale at handover.
    pub deferred_chunks: u64,
    /// Delivered bandwidth estimate, bytes per second.
    pub bandwidth: f64,
    /// Minimum RTT seen, ms.
    pub rtt_ms: f64,
}

/// An event or message that does not fit the migration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MigrateError {
    /// A migration of this region is already running.
    #[error("a migration of this region is already running ({0:?})")]
    Busy(&'static str),
    /// This side does not own the region (it was handed over).
    #[error("this host does not own the region")]
    NotOwner,
    /// The geometry is not valid.
    #[error("bad geometry: {0}")]
    Geometry(#[from] GeometryError),
    /// A chunk index past the end of the region.
    #[error("chunk {chunk} is out of range (region has {chunks} chunks)")]
    OutOfRange { chunk: u64, chunks: u64 },
    /// A bitmap of the wrong length.
    #[error("bitmap of {got} bits for a region of {want} chunks")]
    BitmapLength { got: u64, want: u64 },
    /// A message for another generation.
    #[error("message for generation {got}, expected {want}")]
    Generation { got: u64, want: u64 },
    /// A generation B has already refused (fenced).
    #[error("generation {got} was fenced (at or below {fence})")]
    Fenced { got: u64, fence: u64 },
    /// A message or event not valid in this phase.
    #[error("{what} is not expected in phase {phase}")]
    Unexpected {
        what: &'static str,
        phase: &'static str,
    },
}

fn check_chunks(g: &Geometry, chunks: &[u64]) -> Result<(), MigrateError> {
    match chunks.iter().find(|c| **c >= g.chunks()) {
        Some(&chunk) => Err(MigrateError::OutOfRange {
            chunk,
            chunks: g.chunks(),
        }),
        None => Ok(()),
    }
}

fn check_bitmap(g: &Geometry, b: &Bitmap) -> Result<(), MigrateError> {
    if b.len() != g.chunks() {
        return Err(MigrateError::BitmapLength {
            got: b.len(),
            want: g.chunks(),
        });
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
