//! Live migration between agents (first slice): a **file region** served by this agent
//! (`--region NAME=PATH`) moves to a peer that serves a file of the same name and size.
//! The sans-IO engines in [`crate::engine::migrate`] decide everything; this module is
//! their driver: one bidirectional QUIC stream per migration on the peers' connection
//! ([`crate::proto::Request::Migrate`]) carries the control messages and the chunk data
//! in order, as the engine requires.
//!
//! * Dirty detection on the source: xxh3 chunk hashes. A collection reports the chunks
//!   whose hash changed since the previous collection, plus the chunks sent since then
//!   whose content no longer matches what was sent; the final collection (after the
//!   freeze) compares every chunk with the hash of what the destination was sent, so
//!   what the destination ends with is exactly the source's content at the freeze.
//! * Freeze: `Freeze::Pid` sends SIGSTOP to the writer and waits until it is stopped
//!   (SIGCONT on abort; after a successful migration it stays stopped: it must not write
//!   the old copy); `Freeze::Hook` calls the caller; `Freeze::Snapshot` freezes nothing,
//!   and writes made after the final snapshot are not migrated.
//! * The final sync sends everything (`Config::postcopy = false`): after the handover
//!   nothing depends on the source, and there are no post-copy faults.
//! * Ownership: the source's region is marked not owned once handed over (status
//!   `owner: false`), the destination's owned once it accepted. The source agent goes on
//!   serving its file's bytes to pulls; nothing stops a process from writing it — that
//!   is what the freeze is for.

pub(crate) mod dest;
pub(crate) mod receive;
pub(crate) mod receive_file;
pub(crate) mod source;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::agent::Inner;
use crate::control::MigrationStatus;
use crate::engine::migrate::{DestPhase, MigrateDest, MigrateSource, SourcePhase};

pub use source::{Freeze, MigrateOptions, MigrateRunError};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Aborts a task when dropped (the frame readers of both sides).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Most chunks acknowledged in one frame.
pub(crate) const ACK_BATCH: usize = 1024;

/// A duration in whole µs, as migration frames carry it.
pub(crate) fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Cap on a migration frame for a region of `chunks` chunks: a bitmap plus headers, or an
/// acknowledgement batch.
pub(crate) fn frame_cap(chunks: u64) -> usize {
    4096 + chunks.div_ceil(8) as usize + ACK_BATCH * 10
}

/// A region's migration on this agent.
#[derive(Clone)]
pub(crate) enum Slot {
    Source {
        peer: String,
        engine: Arc<Mutex<MigrateSource>>,
        /// Set while a driver task runs (a reconnect while the handover is in doubt).
        in_doubt: Arc<std::sync::atomic::AtomicBool>,
    },
    Dest {
        peer: String,
        engine: Arc<Mutex<MigrateDest>>,
    },
}

/// The migrations of an agent, by region.
#[derive(Default)]
pub(crate) struct Migrations {
    pub(crate) map: Mutex<BTreeMap<String, Slot>>,
    /// Applications waiting for (or running on) a region migrated here, by region.
    pub(crate) receiving: Mutex<BTreeMap<String, Arc<receive::ReceivingApp>>>,
    /// The running destination sessions' inboxes, by region: where the urgent lane
    /// (post-copy chunks sent ahead of the background ones) delivers.
    pub(crate) inboxes: Mutex<BTreeMap<String, (String, dest::Inbox)>>,
    /// Regions received into a file (`pagewire receive`), by region: the one peer a
    /// migration into it is accepted from.
    pub(crate) expected: Mutex<BTreeMap<String, String>>,
    /// Regions this agent handed over before it restarted, by region: their new owner,
    /// which said so when it connected ([`crate::proto::Request::Owns`]). Only for
    /// regions with no migration slot here (this agent's own state comes first).
    pub(crate) learned: Mutex<BTreeMap<String, String>>,
}

fn source_phase(p: SourcePhase) -> String {
    match p {
        SourcePhase::Idle => "idle".into(),
        SourcePhase::Precopy { round } => format!("precopy (round {round})"),
        SourcePhase::Freezing => "freezing".into(),
        SourcePhase::FinalSync => "final-sync".into(),
        SourcePhase::HandingOver => "handing-over".into(),
        SourcePhase::Postcopy => "postcopy".into(),
        SourcePhase::Released => "released".into(),
        SourcePhase::Aborted(o) => format!("aborted ({})", source::outcome_name(o)),
    }
}

impl Migrations {
    pub(crate) fn status(&self) -> Vec<MigrationStatus> {
        // Post-copy failures of receiving applications (taken before the map's lock).
        let failed: BTreeMap<String, String> = lock(&self.receiving)
            .iter()
            .filter_map(|(r, a)| lock(&a.failed).clone().map(|w| (r.clone(), w)))
            .collect();
        let learned = lock(&self.learned).clone();
        let map = lock(&self.map);
        let before_restart: Vec<MigrationStatus> = learned
            .into_iter()
            .filter(|(region, _)| !map.contains_key(region))
            .map(|(region, peer)| MigrationStatus {
                phase: format!("released before this agent restarted ({peer} owns it and said so)"),
                region,
                role: "source".into(),
                peer,
                owner: false,
                generation: 0,
            })
            .collect();
        // Targets of `pagewire receive` that no migration reached yet.
        let waiting: Vec<MigrationStatus> = lock(&self.expected)
            .iter()
            .filter(|(region, _)| !matches!(map.get(*region), Some(Slot::Dest { .. })))
            .map(|(region, from)| MigrationStatus {
                region: region.clone(),
                role: "destination".into(),
                peer: from.clone(),
                phase: "waiting (pagewire receive)".into(),
                owner: false,
                generation: 0,
            })
            .collect();
        map.iter()
            .map(|(region, slot)| match slot {
                Slot::Source {
                    peer,
                    engine,
                    in_doubt,
                } => {
                    let e = lock(engine);
                    let mut phase = source_phase(e.phase());
                    if in_doubt.load(std::sync::atomic::Ordering::Relaxed) {
                        phase = format!("{phase}, in doubt: waiting for {peer}");
                    }
                    MigrationStatus {
                        region: region.clone(),
                        role: "source".into(),
                        peer: peer.clone(),
                        phase,
                        owner: e.owns(),
                        generation: e.generation(),
                    }
                }
                Slot::Dest { peer, engine } => {
                    let e = lock(engine);
                    let phase = match failed.get(region) {
                        Some(why) if e.phase() == DestPhase::Owner => {
                            format!("post-copy failed: {why}")
                        }
                        _ => e.phase().name().into(),
                    };
                    MigrationStatus {
                        region: region.clone(),
                        role: "destination".into(),
                        peer: peer.clone(),
                        phase,
                        owner: e.owns(),
                        generation: 0,
                    }
                }
            })
            .chain(waiting)
            .chain(before_restart)
            .collect()
    }

    /// A new publication of `region` (an application's fresh memory, not the copy that
    /// was migrated away): forgets a finished outgoing migration of that name, so this
    /// agent owns the new region; refused while such a migration still runs (B may still
    /// fault chunks in from here).
    pub(crate) fn forget_handed_over(&self, region: &str) -> Result<(), String> {
        lock(&self.learned).remove(region);
        let mut map = lock(&self.map);
        if let Some(Slot::Source { engine, peer, .. }) = map.get(region) {
            let phase = lock(engine).phase();
            match phase {
                SourcePhase::Released => {
                    map.remove(region);
                }
                SourcePhase::HandingOver | SourcePhase::Postcopy => {
                    return Err(format!(
                        "region {region} is still being handed over to {peer} ({}): publish a region under this name once that migration is done",
                        source_phase(phase)
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Why `region` cannot be a replica here: a migration into this agent runs, or made
    /// it the owner (`None`: neither).
    pub(crate) fn incoming(&self, region: &str) -> Option<String> {
        match lock(&self.map).get(region) {
            Some(Slot::Dest { engine, peer }) => match lock(engine).phase() {
                DestPhase::Idle | DestPhase::Aborted => None,
                DestPhase::Receiving => Some(format!("is being migrated here from {peer}")),
                DestPhase::Owner | DestPhase::Complete => {
                    Some(format!("was migrated here from {peer}: this agent owns it"))
                }
            },
            _ => None,
        }
    }

    /// Why `region` cannot be replicated from here now: a migration of it away from this
    /// agent runs (`None`: none runs).
    pub(crate) fn outgoing(&self, region: &str) -> Option<String> {
        match lock(&self.map).get(region) {
            Some(Slot::Source { engine, peer, .. }) => match lock(engine).phase() {
                SourcePhase::Idle | SourcePhase::Aborted(_) | SourcePhase::Released => None,
                p => Some(format!("is being migrated to {peer} ({})", source_phase(p))),
            },
            _ => None,
        }
    }

    /// The new owner of `region` if it was handed over before this agent restarted (and
    /// nothing migrated it here since).
    pub(crate) fn handed_over_before_restart(&self, region: &str) -> Option<String> {
        if lock(&self.map).contains_key(region) {
            return None;
        }
        lock(&self.learned).get(region).cloned()
    }

    /// Regions `peer` migrated here that this agent owns now.
    fn owned_from(&self, peer: &str) -> Vec<String> {
        lock(&self.map)
            .iter()
            .filter_map(|(region, slot)| match slot {
                Slot::Dest { peer: p, engine } if p == peer && lock(engine).owns() => {
                    Some(region.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// False when this agent handed `region` over (or holds a partial incoming copy).
    pub(crate) fn owns(&self, region: &str) -> bool {
        let slot = lock(&self.map).get(region).cloned();
        match slot {
            None => !lock(&self.learned).contains_key(region),
            Some(Slot::Source { engine, .. }) => lock(&engine).owns(),
            Some(Slot::Dest { engine, .. }) => lock(&engine).owns(),
        }
    }
}

/// On a new connection to `peer`: tells it which regions it migrated here that this
/// agent owns, in case it restarted and forgot ([`learn_owner`] on its side).
pub(crate) async fn announce_owned(inner: Arc<Inner>, peer: String, conn: quinn::Connection) {
    for region in inner.migrations.owned_from(&peer) {
        let owns = crate::proto::Request::Owns {
            region: region.clone(),
        };
        match super::peers::ask(&conn, &owns, CONNECT_TIMEOUT).await {
            Ok(_) => {
                tracing::debug!(peer = %peer, region = %region, "told the peer this agent owns the region")
            }
            Err(e) => {
                tracing::debug!(peer = %peer, region = %region, "telling the peer this agent owns the region: {e}")
            }
        }
    }
}

/// `peer` says it owns `region`, which it got by a migration from this agent: if this
/// agent has no migration state for it (it restarted since), it no longer owns it — it
/// refuses to migrate or replicate it, ends a replication of it, and `status` says so.
/// A region an application published anew after the restart is a new region: kept.
pub(crate) fn learn_owner(inner: &Inner, peer: &str, region: &str) {
    // One lock at a time.
    let has_slot = lock(&inner.migrations.map).contains_key(region);
    let receiving = lock(&inner.migrations.receiving).contains_key(region);
    let by_app = inner
        .publications
        .get(region)
        .is_some_and(|p| p.is_by_app());
    if has_slot || receiving || by_app {
        return;
    }
    let new = lock(&inner.migrations.learned)
        .insert(region.into(), peer.into())
        .as_deref()
        != Some(peer);
    if new {
        tracing::warn!(peer, region, "{peer} owns region {region}: it was migrated there from this agent before this agent restarted; this agent no longer owns it (it will not migrate or replicate it)");
    }
    inner
        .publications
        .handed_over(region, peer, super::replicate::Handover::BeforeRestart);
}

/// How long to wait for the peer's connection before giving up a migration start.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
