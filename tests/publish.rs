//! An application publishes a region it writes in memory; under each dirty tracker, after
//! `flush()` the replica is byte-exact and epochs move forward in order. The writes are
//! plain stores through the mapping: nothing tells the agent what was written.

mod common;

use common::*;
use pagewire::client::publish::{publish, PublishOptions, Published, TrackerKind};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::time::Duration;

const SIZE: u64 = (8 << 20) + 1000;

struct Setup {
    rt: tokio::runtime::Runtime,
    a: Option<pagewire::agent::Agent>,
    b: Option<pagewire::agent::Agent>,
    _mesh: Mesh,
    _dir: tempfile::TempDir,
    dst: std::path::PathBuf,
    sock: std::path::PathBuf,
    /// With [`setup_relayed`]: the relay in front of b, the only path between them.
    relay: Option<pagewire::wan::Relay>,
}

/// Agent `a` (the writer's host) and `b` (serving the replica file), connected.
fn setup() -> Setup {
    setup_with(false)
}

/// As [`setup`], but a reaches b only through a relay (`Setup::relay`, which a test can
/// cut and heal); b's address for a leads nowhere.
fn setup_relayed() -> Setup {
    setup_with(true)
}

fn setup_with(relayed: bool) -> Setup {
    logs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mesh = Mesh::new(&["a", "b"]);
    let dir = region_dir();
    let dst = dir.path().join("p");
    sparse_file(&dst, SIZE, &[]);
    let (pa, pb) = (free_port(), free_port());
    let sock = mesh.path().join("a.sock");
    let relay = relayed.then(|| rt.block_on(relay_to(pb, Default::default())));
    let (a_to_b, b_to_a) = match &relay {
        Some(r) => (r.local_addr().port(), free_port()),
        None => (pb, pa),
    };
    let mut ca = mesh.config("a", pa, &[("b", a_to_b)]);
    ca.control = Some(sock.clone());
    let mut cb = mesh.config("b", pb, &[("a", b_to_a)]);
    cb.regions.push(("p".into(), dst.clone()));
    let (a, b) = rt.block_on(async {
        let b = start(cb).await;
        let a = start(ca).await;
        connected(&a, "b").await;
        (a, b)
    });
    Setup {
        rt,
        a: Some(a),
        b: Some(b),
        _mesh: mesh,
        _dir: dir,
        dst,
        sock,
        relay,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let (a, b, relay) = (self.a.take(), self.b.take(), self.relay.take());
        self.rt.block_on(async {
            if let Some(a) = a {
                a.shutdown().await;
            }
            if let Some(b) = b {
                b.shutdown().await;
            }
            if let Some(r) = relay {
                r.shutdown().await;
            }
        });
    }
}

fn contents(p: &Published) -> Vec<u8> {
    let mut v = vec![0u8; p.len()];
    p.read_at(0, &mut v);
    v
}

fn random_writes_replicate(tracker: TrackerKind) {
    let s = setup();
    let mut o = PublishOptions::new(&s.sock, "p", SIZE, &["b"]);
    o.tracker = tracker;
    o.interval = Duration::from_millis(20);
    let p = publish(&o).unwrap();
    assert_eq!(p.tracker(), tracker);
    let b = s.b.as_ref().unwrap();
    let last = std::cell::Cell::new(p.flush(Duration::from_secs(30)).unwrap());
    assert_eq!(std::fs::read(&s.dst).unwrap(), contents(&p));

    let writes = prop::collection::vec((0..SIZE, 1usize..20_000, any::<u8>()), 1..64);
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&writes, |ws| {
            for (off, len, byte) in ws {
                let len = len.min((SIZE - off) as usize);
                p.write_at(off as usize, &vec![byte; len]);
            }
            let e = p.flush(Duration::from_secs(30)).unwrap();
            prop_assert!(
                e > last.get(),
                "epochs move forward: {} after {}",
                e,
                last.get()
            );
            last.set(e);
            prop_assert!(b.replica_epoch("p") >= e);
            let want = contents(&p);
            let got = std::fs::read(&s.dst).unwrap();
            prop_assert!(got == want, "replica differs after flush (epoch {})", e);
            Ok(())
        })
        .unwrap();

    // The writer goes away: the agent stops replicating and serving the region.
    drop(p);
    let a = s.a.as_ref().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.status().replications.iter().any(|r| r.region == "p") {
        assert!(
            std::time::Instant::now() < deadline,
            "publication not withdrawn"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn uffd_wp_async() {
    if !pagewire::track::uffd_wp::async_supported() {
        eprintln!("skipped: the kernel lacks WP_ASYNC / PAGEMAP_SCAN");
        return;
    }
    random_writes_replicate(TrackerKind::UffdWpAsync);
}

#[test]
fn uffd_wp_sync() {
    if !pagewire::track::uffd_wp::sync_supported() {
        eprintln!("skipped: the kernel lacks userfaultfd write-protect");
        return;
    }
    random_writes_replicate(TrackerKind::UffdWpSync);
}

#[test]
fn mprotect() {
    random_writes_replicate(TrackerKind::Mprotect);
}

/// A writer thread keeps storing while the agent collects; after it stops and flushes,
/// the replica has its last bytes (no write lost across a collect).
#[test]
fn writes_racing_collects_are_not_lost() {
    for tracker in [
        TrackerKind::UffdWpAsync,
        TrackerKind::UffdWpSync,
        TrackerKind::Mprotect,
    ] {
        use pagewire::track::uffd_wp::{async_supported, sync_supported};
        if (tracker == TrackerKind::UffdWpAsync && !async_supported())
            || (tracker == TrackerKind::UffdWpSync && !sync_supported())
        {
            continue;
        }
        let s = setup();
        let mut o = PublishOptions::new(&s.sock, "p", SIZE, &["b"]);
        o.tracker = tracker;
        o.interval = Duration::from_millis(5);
        let p = publish(&o).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut x = 1u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % (SIZE - 8);
                    p.write_at(off as usize, &x.to_le_bytes());
                }
            });
            std::thread::sleep(Duration::from_millis(700));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        p.flush(Duration::from_secs(30)).unwrap();
        assert!(
            std::fs::read(&s.dst).unwrap() == contents(&p),
            "{tracker:?}: replica differs"
        );
    }
}

/// An application's region whose replication is stopped while its replica is cut off:
/// the owner says that replica was not told; once the two are connected again the
/// replica is told, and the owner's status says so (the publication stays, ended).
#[test]
fn a_cut_off_replica_of_a_published_region_is_told_later_and_the_owner_says_so() {
    let s = setup_relayed();
    let (a, b, relay, rt, sock) = (
        s.a.as_ref().unwrap(),
        s.b.as_ref().unwrap(),
        s.relay.as_ref().unwrap(),
        &s.rt,
        &s.sock,
    );
    let p = publish(&PublishOptions::new(sock, "p", SIZE, &["b"])).unwrap();
    p.write_at(0, b"published");
    p.flush(Duration::from_secs(30)).unwrap();
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let r = rt.block_on(wait_for(Duration::from_secs(30), f));
        assert!(r.is_ok(), "{what}: {:?}", a.status());
    };
    relay.set_params(cut(), cut());
    until("b seen gone", &|| {
        a.status().peers.iter().all(|x| !x.connected)
    });
    let st = rt.block_on(a.stop_replication("p")).unwrap();
    assert!(!st.replicas[0].told_end, "{st:?}");
    relay.set_params(Default::default(), Default::default());
    until("b told", &|| {
        b.status()
            .replicas
            .iter()
            .any(|x| x.region == "p" && x.ended.is_some())
    });
    until("the owner says b was told", &|| {
        a.status().replications.iter().any(|r| {
            r.region == "p"
                && r.replicas
                    .iter()
                    .all(|l| l.told_end && l.last_error.is_none())
        })
    });
    drop(p);
}
