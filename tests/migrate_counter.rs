//! The `migrate_counter` demo end to end, in both modes: a counter app whose whole state
//! lives in a region runs on agent a, is live-migrated to agent b through the WAN relay
//! at 50 ms RTT while it keeps incrementing, and continues on b. `memory`: the app's
//! published memory, post-copy into an app on b blocked in `client::receive`'s
//! `wait_owner`; `file`: a file region, pre-copy. Correctness only (no timing
//! assertions): every increment is in b's log exactly once, in order, a's then b's.
//!
//! The demo's code is the example itself, compiled in as a module.

mod common;
#[allow(dead_code)]
#[path = "../examples/migrate_counter.rs"]
mod demo;

use std::time::Duration;

use clap::Parser;
use demo::{check_log, AppRun, Counter, HOST_A, HOST_B};

/// Runs the demo at 50 ms RTT (4 MiB region, 1 s on each side) with `extra` arguments and
/// checks the log invariants.
async fn run_demo(extra: &[&str]) -> demo::Summary {
    let mut argv = vec![
        "migrate_counter",
        "--rtt",
        "50ms",
        "--size",
        "4MiB",
        "--rate",
        "2000",
        "--run-a",
        "1s",
        "--run-b",
        "1s",
        "--json",
    ];
    argv.extend_from_slice(extra);
    let args = demo::Args::try_parse_from(argv).unwrap();
    // A safety net, not a timing assertion: a hung demo fails instead of hanging.
    let s = tokio::time::timeout(Duration::from_secs(180), demo::run(&args))
        .await
        .expect("the demo did not end within 180 s")
        .expect("the demo could not run");
    eprintln!(
        "{}: migration {:.0} ms, downtime {:.1} ms, {} rounds, deferred {} chunks, {} faults, tracking {}; app pause {:.1} ms; a {} increments, b {}",
        s.mode,
        s.migration.total_ms,
        s.migration.downtime_ms,
        s.migration.rounds,
        s.migration.deferred_chunks,
        s.migration.postcopy_faults,
        s.migration.dirty_tracking,
        s.app_pause_ms,
        s.app_a.increments,
        s.app_b.increments
    );
    assert!(s.log.failures.is_empty(), "{:#?}", s.log.failures);
    assert!(s.ok);
    assert_eq!(s.migration.outcome, "migrated");
    assert_eq!(s.migration.freeze, "hook");
    // The app ran on both hosts, and b continued from a's last value.
    assert!(s.app_a.increments > 0 && s.app_b.increments > 0, "{s:?}");
    assert_eq!(s.app_a.first, 1);
    assert_eq!(s.app_b.first, s.app_a.last + 1);
    // b's log: every increment of both runs, once.
    assert_eq!(s.log.entries, s.app_a.increments + s.app_b.increments);
    assert_eq!(s.log.counter, s.log.entries);
    assert_eq!(s.log.entries_a, s.app_a.increments);
    assert_eq!(s.log.entries_b, s.app_b.increments);
    assert_eq!(s.app_b.last, s.log.entries);
    s
}

/// Memory mode, with a downtime budget under the RTT so that the final sync sends nothing
/// and the chunks still dirty at the freeze (at least the header's) are left for b's app
/// to fault in: its first increments go through post-copy faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_memory_migrates_postcopy_at_50ms_rtt_with_no_increment_lost_or_duplicated() {
    let s = run_demo(&["--mode", "memory", "--downtime-budget", "40ms"]).await;
    assert!(s.postcopy);
    assert_ne!(s.migration.dirty_tracking, "xxh3 chunk hashes", "{s:?}");
    // b's app saw the handover, and post-copy finished (wait_received returned).
    assert!(s.freeze_to_b_owner_ms.is_some(), "{s:?}");
    assert!(s.b_owner_to_received_ms.is_some(), "{s:?}");
    // Faults only on chunks left stale at the handover (how many: the engine's and the
    // app's timing, not asserted).
    assert!(
        s.migration.postcopy_faults == 0 || s.migration.deferred_chunks > 0,
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_region_counter_migrates_at_50ms_rtt_with_no_increment_lost_or_duplicated() {
    let s = run_demo(&["--mode", "file"]).await;
    assert!(!s.postcopy);
    assert_eq!(s.migration.dirty_tracking, "xxh3 chunk hashes");
    assert_eq!(s.migration.postcopy_faults, 0);
    assert_eq!(s.migration.deferred_chunks, 0);
}

fn ran(first: u64, last: u64) -> AppRun {
    AppRun {
        increments: last + 1 - first,
        first,
        last,
        ..Default::default()
    }
}

/// The log check is not vacuous: increments made on a after the copy b continued from
/// are reported lost, and a clean history passes.
#[test]
fn the_log_check_reports_increments_lost_in_a_migration() {
    let d = tempfile::tempdir().unwrap();
    let (fa, fb) = (d.path().join("a"), d.path().join("b"));
    Counter::format(&fa, 1 << 20).unwrap();
    let a = Counter::open(&fa).unwrap();
    for _ in 0..10 {
        a.increment(HOST_A).unwrap();
    }
    // b gets a's region as it is now (a frozen snapshot)...
    std::fs::copy(&fa, &fb).unwrap();
    let b = Counter::open(&fb).unwrap();
    for _ in 0..5 {
        b.increment(HOST_B).unwrap();
    }
    let good = check_log(&fa, &fb, &ran(1, 10), &ran(11, 15)).unwrap();
    assert!(good.failures.is_empty(), "{:#?}", good.failures);
    assert_eq!((good.entries, good.entries_a, good.entries_b), (15, 10, 5));

    // ...but a's app went on after the snapshot (no freeze): 2 increments b never saw.
    a.increment(HOST_A).unwrap();
    a.increment(HOST_A).unwrap();
    let bad = check_log(&fa, &fb, &ran(1, 12), &ran(11, 15)).unwrap();
    let all = bad.failures.join("\n");
    assert!(all.contains("2 lost in the migration"), "{all}");
    assert!(
        all.contains("b continued at 11 but a's last value was 12"),
        "{all}"
    );
}

/// The demo's two-host roles, each against its own agent (here two agents in this
/// process, on loopback, as they would run on two hosts): `dest` receives the region and
/// waits; `source` publishes, runs, and migrates itself with the freeze by
/// write-protection and post-copy. b's log holds exactly a's copy at the freeze and then
/// b's increments (a freeze inside an increment is completed on b); a's writer stays
/// held until a's agent ends the publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_host_roles_migrate_the_counter_between_two_agents() {
    use common::*;
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let (da, db) = (region_dir(), region_dir());
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.control = Some(da.path().join("a.sock"));
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.control = Some(db.path().join("b.sock"));
    let (a, b) = (start(ca).await, start(cb).await);
    // A connection that lasted a second (both dial at start-up; one replaces the other).
    let steady = |ag: &pagewire::agent::Agent, peer: &str| {
        ag.status()
            .peers
            .iter()
            .any(|p| p.name == peer && p.connected_for_s.is_some_and(|s| s >= 1.0))
    };
    while !(steady(&a, "b") && steady(&b, "a")) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let argv = |role: &str, sock: &std::path::Path| {
        let sock = sock.to_str().unwrap().to_string();
        demo::Args::try_parse_from([
            "migrate_counter",
            "--role",
            role,
            "--control",
            &sock,
            "--to",
            "b",
            "--size",
            "4MiB",
            "--rate",
            "2000",
            "--run-a",
            "1s",
            "--run-b",
            "1s",
            "--wait",
            "60s",
            "--json",
        ])
        .unwrap()
    };
    let args_b = argv("dest", &db.path().join("b.sock"));
    let dest = tokio::task::spawn_blocking(move || demo::two_hosts::dest(&args_b));
    while !b.status().regions.iter().any(|r| r.name == "counter") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let args_a = argv("source", &da.path().join("a.sock"));
    let (src, held) =
        tokio::time::timeout(Duration::from_secs(120), demo::two_hosts::source(&args_a))
            .await
            .expect("the source side did not end within 120 s")
            .expect("the source side could not run");
    assert!(src.ok, "{src:?}");
    let report = src.migration.clone().unwrap();
    assert_eq!(report.outcome, "migrated");
    assert_eq!(report.freeze, "write-protect");
    let d = tokio::time::timeout(Duration::from_secs(120), dest)
        .await
        .expect("the dest side did not end within 120 s")
        .unwrap()
        .expect("the dest side could not run");
    eprintln!(
        "two hosts: a's copy 1..={}, b received {} of a's entries (recovered increment: {}), made {}; downtime {:.1} ms, deferred {}, faults {}",
        src.a_copy_len,
        d.a_entries,
        d.recovered_increment,
        d.app.increments,
        report.downtime_ms,
        report.deferred_chunks,
        report.postcopy_faults
    );
    assert!(d.log.failures.is_empty(), "{:#?}", d.log.failures);
    assert!(d.ok);
    // Nothing lost or duplicated across the two sides.
    assert!(src.a_copy_len > 0);
    assert_eq!(d.a_entries, src.a_copy_len);
    assert!(d.app.increments > 0);
    assert_eq!(d.app.first, src.a_copy_len + 1);
    assert_eq!(d.log.entries, src.a_copy_len + d.app.increments);
    // a's writer is held until the publication ends (its agent goes away here).
    let held = held.expect("a held app after a successful migration");
    assert!(!held.thread.is_finished());
    a.shutdown().await;
    let t0 = std::time::Instant::now();
    while !held.thread.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a's writer stayed held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held.thread.join().unwrap().unwrap();
    drop(held.published);
    b.shutdown().await;
}

/// A freeze by write-protection can land between any two stores of an increment: one
/// whose log entry is in the log but whose counter was not bumped yet is completed by
/// `recover`; a counter that disagrees otherwise is corrupt.
#[test]
fn recover_completes_an_interrupted_increment() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("c");
    Counter::format(&f, 1 << 20).unwrap();
    let c = Counter::open(&f).unwrap();
    for _ in 0..3 {
        c.increment(HOST_A).unwrap();
    }
    assert!(!c.recover().unwrap());
    // The log length is bumped, the counter not yet (header: counter at 8, length at 16).
    let raw = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    use std::os::unix::fs::FileExt;
    // A fourth entry, then the length: the interrupted increment.
    let mut e = [0u8; 24];
    e[..8].copy_from_slice(&4u64.to_le_bytes());
    e[16..].copy_from_slice(&HOST_A.to_le_bytes());
    raw.write_all_at(&e, 4096 + 3 * 24).unwrap();
    raw.write_all_at(&4u64.to_le_bytes(), 16).unwrap();
    assert!(c.increment(HOST_B).is_err());
    assert!(c.recover().unwrap());
    assert_eq!(c.increment(HOST_B).unwrap(), 5);
    // A counter two behind is not an interrupted increment.
    raw.write_all_at(&3u64.to_le_bytes(), 8).unwrap();
    assert!(c.recover().is_err());
}

/// A log too small for what the app writes in `--run-a` + `--run-b` is refused before
/// anything starts (the app used to stop with a full log and the demo then hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_too_small_for_the_run_is_refused_up_front() {
    let argv = [
        "migrate_counter",
        "--size",
        "8KiB",
        "--rate",
        "2000",
        "--run-a",
        "1s",
        "--run-b",
        "1s",
    ];
    let args = demo::Args::try_parse_from(argv).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), demo::run(&args))
        .await
        .expect("the demo hung")
        .expect_err("a full log should be refused")
        .to_string();
    assert!(e.contains("holds 170 increments"), "{e}");
}
