//! Continuous replication between agents: epochs, flush, catch-up by hash after a replica
//! restart, and a slow replica that does not hold back a fast one.

mod common;

use common::*;
use pagewire::agent::ReplicateOptions;
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

/// Writes `n` random 4 KiB pieces at random offsets of `path` with write(2); returns
/// the set of chunks touched.
fn scribble(path: &Path, size: u64, n: usize, seed: u64) -> std::collections::BTreeSet<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chunks = std::collections::BTreeSet::new();
    for _ in 0..n {
        let off = rng.gen_range(0..size - 4096);
        let mut b = vec![0u8; 4096];
        rng.fill(&mut b[..]);
        f.write_all_at(&b, off).unwrap();
        chunks.insert(off / CHUNK);
        chunks.insert((off + 4095) / CHUNK);
    }
    chunks
}

fn replicate(agent: &pagewire::agent::Agent, _path: &Path, o: &ReplicateOptions) {
    agent.replicate_file("r", "hash-scan", None, o).unwrap();
}

/// Owner b's file `src` (random) and replica a's file `dst` (a hole) of one size, each in
/// a directory of its own, and certificates for a and b.
struct Files {
    mesh: Mesh,
    pa: u16,
    pb: u16,
    da: tempfile::TempDir,
    db: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
}

fn files(size: u64, seed: u64) -> Files {
    let (da, db) = (region_dir(), region_dir());
    let (src, dst) = (db.path().join("r"), da.path().join("r"));
    random_file(&src, size, seed);
    sparse_file(&dst, size, &[]);
    Files {
        mesh: Mesh::new(&["a", "b"]),
        pa: free_port(),
        pb: free_port(),
        da,
        db,
        src,
        dst,
    }
}

fn opts(to: &[&str]) -> ReplicateOptions {
    ReplicateOptions {
        to: to.iter().map(|s| s.to_string()).collect(),
        interval: Duration::from_millis(20),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replicate_in_epochs_and_flush_waits_for_them() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let (da, db) = (region_dir(), region_dir());
    let size = 32 * MIB + 777;
    let (src, dst) = (db.path().join("r"), da.path().join("r"));
    random_file(&src, size, 1);
    sparse_file(&dst, size, &[]);
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("r".into(), src.clone()));
    // A region only b has: a refuses to be its replica.
    let only_b = db.path().join("s");
    random_file(&only_b, MIB, 2);
    cb.regions.push(("s".into(), only_b));
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.regions.push(("r".into(), dst.clone()));
    let (sa, sb) = (da.path().join("a.sock"), db.path().join("b.sock"));
    ca.control = Some(sa.clone());
    cb.control = Some(sb.clone());
    let b = start(cb).await;
    let a = start(ca).await;
    connected(&b, "a").await;
    replicate(&b, &src, &opts(&["a"]));
    // The initial catch-up makes the replica equal.
    let e0 = b.flush("r", Duration::from_secs(60)).await.unwrap();
    assert_same(&src, &dst);
    assert!(a.replica_epoch("r") >= e0);
    let mut last = e0;
    for round in 0..5u64 {
        scribble(&src, size, 50, 10 + round);
        let e = b.flush("r", Duration::from_secs(60)).await.unwrap();
        assert!(e > last, "epochs move forward: {e} after {last}");
        last = e;
        assert_same(&src, &dst);
        assert!(a.replica_epoch("r") >= e);
    }
    let st = b.status();
    let r = &st.replications[0];
    assert_eq!(r.replicas[0].acked_epoch, last);
    assert_eq!(r.replicas[0].catch_ups, 1);
    // `pagewire epoch` (the control request): the replica's applied epoch; the owner's
    // own epoch (no phantom replica entry on it); an unknown region is an error.
    let epoch = |sock: PathBuf, region: &'static str| async move {
        let c = pagewire::control::ControlClient::connect(&sock)
            .await
            .unwrap();
        c.epoch(region, None, Duration::ZERO).await
    };
    assert!(epoch(sa.clone(), "r").await.unwrap() >= last);
    assert_eq!(epoch(sb.clone(), "r").await.unwrap(), last);
    assert!(b.status().replicas.is_empty(), "{:?}", b.status().replicas);
    let e = epoch(sa.clone(), "nosuch").await.unwrap_err().to_string();
    assert!(e.contains("no region \"nosuch\""), "{e}");
    assert!(a.status().replicas.iter().all(|x| x.region == "r"));
    // `pagewire replicate` (the control request): a replica that refuses ends the
    // command with its reason instead of a wait forever; a running replication's
    // replicas or settings cannot be changed by asking again.
    let replicate_cli = |region: &'static str, interval_ms: u64| {
        let sb = sb.clone();
        async move {
            let c = pagewire::control::ControlClient::connect(&sb)
                .await
                .unwrap();
            let args = pagewire::control::ReplicateArgs {
                region: region.into(),
                to: vec!["a".into()],
                tracker: Some("hash-scan".into()),
                interval_ms: Some(interval_ms),
                scan_interval_ms: None,
                window: None,
            };
            tokio::time::timeout(Duration::from_secs(30), c.replicate(args, |_| {}))
                .await
                .expect("the command ends")
                .map_err(|e| e.to_string())
        }
    };
    let e = replicate_cli("s", 20).await.unwrap_err();
    assert!(e.contains("replica refused") && e.contains("\"s\""), "{e}");
    let same = replicate_cli("r", 20).await;
    assert!(same.is_ok(), "the same request reports: {same:?}");
    let e = replicate_cli("r", 500).await.unwrap_err();
    assert!(e.contains("cannot change"), "{e}");
    // A second replicate of the same region to the same peers is a no-op; to others it
    // is refused.
    replicate(&b, &src, &opts(&["a"]));
    let e = b
        .replicate_file("r", "hash-scan", None, &opts(&["a", "a"]))
        .unwrap_err();
    assert!(e.to_string().contains("replica a is given twice"), "{e}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_catches_up_by_hash_without_a_full_resend() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let (da, db) = (region_dir(), region_dir());
    let size = 64 * MIB;
    let (src, dst) = (db.path().join("r"), da.path().join("r"));
    random_file(&src, size, 2);
    sparse_file(&dst, size, &[]);
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("r".into(), src.clone()));
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.regions.push(("r".into(), dst.clone()));
    let b = start(cb).await;
    let a = start(ca.clone()).await;
    connected(&b, "a").await;
    replicate(&b, &src, &opts(&["a"]));
    b.flush("r", Duration::from_secs(60)).await.unwrap();
    assert_same(&src, &dst);
    let first = b.status().replications[0].replicas[0].clone();
    assert!(first.catch_up_bytes >= size * 9 / 10, "{first:?}");

    // The replica goes away; the owner keeps changing ~1% of the chunks.
    a.shutdown().await;
    let changed = scribble(&src, size, 10, 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = start(ca).await;
    connected(&b, "a").await;
    b.flush("r", Duration::from_secs(60)).await.unwrap();
    assert_same(&src, &dst);
    let after = b.status().replications[0].replicas[0].clone();
    let resent = after.catch_up_bytes - first.catch_up_bytes;
    assert!(after.catch_ups >= 2, "{after:?}");
    assert!(
        resent <= changed.len() as u64 * CHUNK,
        "catch-up resent {resent} bytes for {} changed chunks",
        changed.len()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_does_not_hold_back_a_fast_one() {
    logs();
    let mesh = Mesh::new(&["a", "b", "c"]);
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let (da, db, dc) = (region_dir(), region_dir(), region_dir());
    let size = 4 * MIB;
    let src = db.path().join("r");
    let (fast, slow) = (da.path().join("r"), dc.path().join("r"));
    random_file(&src, size, 4);
    sparse_file(&fast, size, &[]);
    sparse_file(&slow, size, &[]);
    // b and c reach each other only through relays: 40 ms RTT, 50 Mbit/s.
    let slow_link = LinkParams {
        delay: Duration::from_millis(20),
        rate_bps: Some(50_000_000),
        ..Default::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    let to_c = Relay::start(RelayConfig::symmetric(
        any,
        format!("127.0.0.1:{pc}").parse().unwrap(),
        slow_link.clone(),
    ))
    .await
    .unwrap();
    let to_b = Relay::start(RelayConfig::symmetric(
        any,
        format!("127.0.0.1:{pb}").parse().unwrap(),
        slow_link.clone(),
    ))
    .await
    .unwrap();
    let mut cb = mesh.config("b", pb, &[("a", pa), ("c", to_c.local_addr().port())]);
    cb.regions.push(("r".into(), src.clone()));
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.regions.push(("r".into(), fast.clone()));
    let mut cc = mesh.config("c", pc, &[("b", to_b.local_addr().port())]);
    cc.regions.push(("r".into(), slow.clone()));
    let b = start(cb).await;
    let a = start(ca).await;
    let c = start(cc).await;
    connected(&b, "a").await;
    connected(&b, "c").await;
    let mut o = opts(&["a", "c"]);
    o.window = 2 * MIB;
    replicate(&b, &src, &o);
    // Both replicas are in step before the slow one stalls.
    b.flush("r", Duration::from_secs(120)).await.unwrap();
    // The slow replica stalls completely: every packet to and from it is lost. The link
    // stays up (QUIC's idle timeout is far longer than this), so b keeps queueing for c.
    let cut = LinkParams {
        loss: 1.0,
        ..slow_link.clone()
    };
    to_c.set_params(cut.clone(), cut.clone());
    to_b.set_params(cut.clone(), cut);
    // Keep writing ~0.5 MiB per round, more than c's window in all. The fast replica
    // must acknowledge every newest epoch while c acknowledges nothing: if a stalled
    // replica could hold back another, this would wait forever.
    let acked = |peer: &str| {
        let st = b.status();
        let r = st.replications[0].clone();
        let x = r.replicas.iter().find(|x| x.peer == peer).unwrap().clone();
        (r.epoch, x)
    };
    // Packets already inside the relays when it was cut may still arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, c_before) = acked("c");
    for round in 0..8u64 {
        scribble(&src, size, 128, 100 + round);
        let want = std::fs::read(&src).unwrap();
        wait_for(Duration::from_secs(60), || {
            std::fs::read(&fast).unwrap() == want
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "round {round}: the fast replica never got the writes: {:?}",
                acked("a")
            )
        });
    }
    let (newest, sc) = acked("c");
    assert_eq!(
        sc.acked_epoch, c_before.acked_epoch,
        "the cut-off replica acknowledged something: {sc:?}"
    );
    assert!(sc.acked_epoch < newest, "{sc:?} newest {newest}");
    // The slow one comes back, is cut loose past its window and caught up by hash.
    to_c.set_params(slow_link.clone(), slow_link.clone());
    to_b.set_params(slow_link.clone(), slow_link);
    b.flush("r", Duration::from_secs(120)).await.unwrap();
    let (_, sc) = acked("c");
    assert!(
        sc.catch_ups >= 2,
        "the stalled replica was not caught up by hash after falling past its window: {sc:?}"
    );
    assert_same(&src, &fast);
    assert_same(&src, &slow);
    for x in [a, b, c] {
        x.shutdown().await;
    }
    to_c.shutdown().await;
    to_b.shutdown().await;
}

/// Agents `a` (replica of region r at `dst`) and `b` (its owner, at `src`, control
/// socket `b.sock` in `db`), connected only through `relay` (in front of a): a's
/// address for b leads nowhere. Returns a, b and b's control socket.
async fn through_relay(
    mesh: &Mesh,
    pa: u16,
    pb: u16,
    db: &tempfile::TempDir,
    src: &Path,
    dst: &Path,
    relay: &Relay,
) -> (pagewire::agent::Agent, pagewire::agent::Agent, PathBuf) {
    let sb = db.path().join("b.sock");
    let mut cb = mesh.config("b", pb, &[("a", relay.local_addr().port())]);
    cb.regions.push(("r".into(), src.into()));
    cb.control = Some(sb.clone());
    let mut ca = mesh.config("a", pa, &[("b", free_port())]);
    ca.regions.push(("r".into(), dst.into()));
    let b = start(cb).await;
    let a = start(ca).await;
    connected(&b, "a").await;
    (a, b, sb)
}

/// Agents `b` (owner of region r at `src`, control socket `b.sock` in its directory)
/// and `a` (replica at `dst`), connected.
async fn pair(
    size: u64,
    seed: u64,
) -> (
    Mesh,
    pagewire::agent::Agent,
    pagewire::agent::Agent,
    (tempfile::TempDir, tempfile::TempDir),
    std::path::PathBuf,
    std::path::PathBuf,
) {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let (da, db) = (region_dir(), region_dir());
    let (src, dst) = (db.path().join("r"), da.path().join("r"));
    random_file(&src, size, seed);
    sparse_file(&dst, size, &[]);
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("r".into(), src.clone()));
    cb.control = Some(db.path().join("b.sock"));
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.regions.push(("r".into(), dst.clone()));
    let b = start(cb).await;
    let a = start(ca).await;
    connected(&b, "a").await;
    (mesh, a, b, (da, db), src, dst)
}

/// A file changed by an unrelated process with write(2) replicates without a flush
/// (inotify); one changed through an mmap replicates after the periodic hash scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inotify_and_the_periodic_scan_see_other_processes_writes() {
    let size = 8 * MIB;
    let (_m, a, b, _dirs, src, dst) = pair(size, 5).await;
    b.replicate_file(
        "r",
        "inotify",
        Some(Duration::from_millis(300)),
        &opts(&["a"]),
    )
    .unwrap();
    b.flush("r", Duration::from_secs(30)).await.unwrap();
    assert_same(&src, &dst);
    // dd, another process, writes 3 blocks in place.
    for seek in [3u64, 700, 1999] {
        let st = std::process::Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=4096",
                "count=1",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("seek={seek}"))
            .arg(format!("of={}", src.display()))
            .status()
            .unwrap();
        assert!(st.success());
    }
    // No flush: the tracker's own cadence must carry it.
    let t0 = std::time::Instant::now();
    while std::fs::read(&src).unwrap() != std::fs::read(&dst).unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "write(2) changes did not replicate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An mmap write: no inotify event, the periodic scan (300 ms) finds it.
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&src)
            .unwrap();
        // SAFETY: a test file nobody truncates.
        let mut m = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        m[(5 * MIB) as usize..(5 * MIB) as usize + 16].copy_from_slice(b"written via mmap");
    }
    let t0 = std::time::Instant::now();
    while std::fs::read(&src).unwrap() != std::fs::read(&dst).unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "mmap write did not replicate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = b.status();
    assert_eq!(st.replications[0].tracker, "inotify");
    let rs = a.status();
    assert_eq!(rs.replicas[0].owner, "b");
    assert!(rs.replicas[0].epoch >= 1);
    a.shutdown().await;
    b.shutdown().await;
}

/// A tracked file that cannot be followed (resized, renamed over) stops epochs: every
/// flush fails with the reason and `status` shows it until the file is right again (with
/// inotify, the first failure used to be the only one: flushes after it "succeeded").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_tracked_fails_flush_and_shows_in_status() {
    let size = 4 * MIB;
    let (_mesh, a, b, (_da, db), src, dst) = pair(size, 1).await;
    b.replicate_file("r", "inotify", None, &opts(&["a"]))
        .unwrap();
    b.flush("r", Duration::from_secs(60)).await.unwrap();
    assert_same(&src, &dst);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.set_len(size / 2).unwrap();
    for _ in 0..2 {
        let e = b.flush("r", Duration::from_secs(10)).await.unwrap_err();
        assert!(e.to_string().contains("changed size"), "{e}");
    }
    let err = b.status().replications[0].error.clone().unwrap_or_default();
    assert!(err.contains("changed size"), "{err}");
    f.set_len(size).unwrap();
    random_file(&src, size, 3);
    b.flush("r", Duration::from_secs(60)).await.unwrap();
    assert_same(&src, &dst);
    assert_eq!(b.status().replications[0].error, None);
    // Renamed over (how editors save): the agent still serves the old file; flush says so.
    let new = db.path().join("r.new");
    random_file(&new, size, 4);
    std::fs::rename(&new, &src).unwrap();
    let e = b.flush("r", Duration::from_secs(10)).await.unwrap_err();
    assert!(e.to_string().contains("replaced"), "{e}");
    a.shutdown().await;
    b.shutdown().await;
}

/// `pagewire replicate` (the control request) returns once the replica has *applied* its
/// catch-up, not once the catch-up was sent: over a slow link the replica equals the
/// owner the moment the command returns, and `status` says it caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_returns_once_the_replica_applied_the_catch_up() {
    logs();
    let size = 8 * MIB;
    let Files {
        mesh,
        pa,
        pb,
        da: _da,
        db,
        src,
        dst,
    } = files(size, 5);
    // b reaches a only through a relay at 40 Mbit/s: the catch-up takes ~1.7 s.
    let to_a = relay_to(
        pa,
        LinkParams {
            delay: Duration::from_millis(2),
            rate_bps: Some(40_000_000),
            ..Default::default()
        },
    )
    .await;
    let (a, b, sb) = through_relay(&mesh, pa, pb, &db, &src, &dst, &to_a).await;
    let c = pagewire::control::ControlClient::connect(&sb)
        .await
        .unwrap();
    let args = pagewire::control::ReplicateArgs {
        region: "r".into(),
        to: vec!["a".into()],
        tracker: Some("inotify".into()),
        interval_ms: Some(20),
        scan_interval_ms: None,
        window: None,
    };
    let st = tokio::time::timeout(Duration::from_secs(60), c.replicate(args, |_| {}))
        .await
        .expect("the command ends")
        .unwrap();
    assert_same(&src, &dst);
    assert!(st.replicas[0].caught_up, "{st:?}");
    a.shutdown().await;
    b.shutdown().await;
    to_a.shutdown().await;
}

/// A replication is stopped (`pagewire replicate --stop`) and started anew with another
/// window; a request to change a running one is refused and says how. The replica is
/// told: its status says the replication ended, and a wait for a later epoch fails at
/// once. A wait for epoch 0 on a replica that never received anything waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_can_be_stopped_and_started_anew_with_other_settings() {
    use pagewire::control::{ControlClient, ReplicateArgs};
    let size = 4 * MIB;
    let (_mesh, a, b, (_da, db), src, dst) = pair(size, 9).await;
    let sb = db.path().join("b.sock");
    // Nothing was received yet: epoch 0 is not "applied".
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.wait_epoch("r", 0))
            .await
            .is_err(),
        "a wait for epoch 0 returned before anything was received"
    );
    let args = |window: u64| ReplicateArgs {
        region: "r".into(),
        to: vec!["a".into()],
        tracker: Some("hash-scan".into()),
        interval_ms: Some(20),
        scan_interval_ms: None,
        window: Some(window),
    };
    let ctl = || async { ControlClient::connect(&sb).await.unwrap() };
    let limit = Duration::from_secs(60);
    let st = tokio::time::timeout(limit, ctl().await.replicate(args(64 * MIB), |_| {}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((st.window, st.ended.as_deref()), (64 * MIB, None));
    assert_same(&src, &dst);
    tokio::time::timeout(limit, a.wait_epoch("r", 0))
        .await
        .unwrap()
        .unwrap();
    let e = ctl()
        .await
        .replicate(args(128 * MIB), |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("pagewire replicate --region r --stop"), "{e}");
    let st = ctl().await.stop_replication("r").await.unwrap();
    assert!(
        st.ended.as_deref().is_some_and(|w| w.contains("--stop")),
        "{st:?}"
    );
    assert!(st.replicas[0].told_end, "{st:?}");
    let told = wait_for(limit, || {
        a.status()
            .replicas
            .iter()
            .any(|x| x.region == "r" && x.ended.as_deref().is_some_and(|w| w.contains("--stop")))
    })
    .await;
    assert!(
        told.is_ok(),
        "the replica was not told: {:?}",
        a.status().replicas
    );
    let e = tokio::time::timeout(limit, a.wait_epoch("r", a.replica_epoch("r") + 1))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.contains("b ended the replication"), "{e}");
    let e = ctl()
        .await
        .stop_replication("r")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not replicate region"), "{e}");
    // The owner's epoch, once it no longer replicates, is no number.
    let e = ctl()
        .await
        .epoch("r", None, limit)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing applied here"), "{e}");
    assert!(b.status().replications.is_empty());
    // Anew, with the other window; a follows b again.
    let st = tokio::time::timeout(limit, ctl().await.replicate(args(128 * MIB), |_| {}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((st.window, st.ended.as_deref()), (128 * MIB, None));
    scribble(&src, size, 20, 3);
    tokio::time::timeout(limit, b.flush("r", limit))
        .await
        .unwrap()
        .unwrap();
    assert_same(&src, &dst);
    let x = a
        .status()
        .replicas
        .into_iter()
        .find(|x| x.region == "r")
        .unwrap();
    assert_eq!((x.connected, x.ended), (true, None));
    // The inotify tracker's periodic scan is a setting too.
    ctl().await.stop_replication("r").await.unwrap();
    let inotify = |scan_ms: u64| ReplicateArgs {
        tracker: Some("inotify".into()),
        scan_interval_ms: Some(scan_ms),
        ..args(128 * MIB)
    };
    let st = tokio::time::timeout(limit, ctl().await.replicate(inotify(0), |_| {}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (st.tracker.as_str(), st.scan_interval_ms),
        ("inotify", None)
    );
    let e = ctl()
        .await
        .replicate(inotify(1000), |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no periodic scan") && e.contains("--stop"),
        "{e}"
    );
    // A replica that is down when the replication is stopped is not told, and the stop
    // says so.
    a.shutdown().await;
    let down = wait_for(limit, || {
        b.status()
            .replications
            .iter()
            .all(|x| x.replicas.iter().all(|l| !l.connected))
    })
    .await;
    assert!(down.is_ok());
    let st = ctl().await.stop_replication("r").await.unwrap();
    let l = &st.replicas[0];
    assert!(!l.told_end, "{st:?}");
    assert!(
        l.last_error
            .as_deref()
            .is_some_and(|e| e.contains("told when it is connected again")),
        "{st:?}"
    );
    b.shutdown().await;
}

/// A replica cut off from its owner when the replication is stopped is not told then,
/// but once the two are connected again: its status says the replication ended, and a
/// wait for a later epoch fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_at_the_stop_is_told_when_it_is_back() {
    logs();
    let size = 4 * MIB;
    let Files {
        mesh,
        pa,
        pb,
        da: _da,
        db,
        src,
        dst,
    } = files(size, 11);
    // b reaches a only through a relay, which the test cuts and heals; a's address for b
    // leads nowhere.
    let to_a = relay_to(pa, LinkParams::default()).await;
    let (a, b, sb) = through_relay(&mesh, pa, pb, &db, &src, &dst, &to_a).await;
    let limit = Duration::from_secs(60);
    b.replicate_file("r", "hash-scan", None, &opts(&["a"]))
        .unwrap();
    tokio::time::timeout(limit, b.flush("r", limit))
        .await
        .unwrap()
        .unwrap();
    assert_same(&src, &dst);
    // Cut the path until both ends see the connection gone (idle timeout).
    to_a.set_params(cut(), cut());
    let gone = wait_for(limit, || {
        let b_sees = b.status().peers.iter().all(|p| !p.connected);
        let a_sees = a.status().replicas.iter().all(|x| !x.connected);
        b_sees && a_sees
    })
    .await;
    assert!(gone.is_ok(), "{:?}", b.status().peers);
    let st = b.stop_replication("r").await.unwrap();
    assert!(!st.replicas[0].told_end, "{st:?}");
    // `pagewire replicate` waiting for the cut-off replica's catch-up ends with the
    // reason when the replication is stopped meanwhile (it waited forever).
    let waiting = tokio::spawn(async move {
        let args = pagewire::control::ReplicateArgs {
            region: "r".into(),
            to: vec!["a".into()],
            tracker: Some("hash-scan".into()),
            interval_ms: Some(20),
            scan_interval_ms: None,
            window: None,
        };
        pagewire::control::ControlClient::connect(&sb)
            .await
            .unwrap()
            .replicate(args, |_| {})
            .await
    });
    let started = wait_for(limit, || {
        b.status().replications.iter().any(|r| r.ended.is_none())
    })
    .await;
    assert!(started.is_ok());
    b.stop_replication("r").await.unwrap();
    let e = tokio::time::timeout(limit, waiting)
        .await
        .expect("replicate returns")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains("ended") && e.contains("--stop"), "{e}");
    let ended = |a: &pagewire::agent::Agent| {
        a.status()
            .replicas
            .into_iter()
            .find(|x| x.region == "r")
            .and_then(|x| x.ended)
    };
    assert_eq!(ended(&a), None);
    // Heal: b connects again and tells a.
    to_a.set_params(LinkParams::default(), LinkParams::default());
    let told = wait_for(limit, || ended(&a).is_some()).await;
    assert!(told.is_ok(), "a was not told: {:?}", a.status().replicas);
    let why = ended(&a).unwrap();
    assert!(
        why.contains("b ended the replication while this replica was not connected")
            && why.contains("--stop"),
        "{why}"
    );
    let e = tokio::time::timeout(limit, a.wait_epoch("r", a.replica_epoch("r") + 1))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.contains("not connected"), "{e}");
    a.shutdown().await;
    b.shutdown().await;
    to_a.shutdown().await;
}
