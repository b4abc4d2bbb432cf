//! Pulls between real agents over QUIC on loopback.

mod common;

use common::*;
use pagewire::agent::{FetchError, PullError};
use pagewire::proto::ErrorKind;
use std::os::unix::fs::MetadataExt;

const CHUNK: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_pull_a_table_of_sizes() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let src = region_dir();
    let dst = region_dir();
    let sizes: Vec<u64> = vec![
        0,
        1,
        4095,
        4096,
        4097,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        1 << 20,
        64 << 20,
    ];
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    for (i, size) in sizes.iter().enumerate() {
        let p = src.path().join(format!("r{i}"));
        random_file(&p, *size, i as u64);
        cb.regions.push((format!("r{i}"), p));
    }
    // A 16 GiB sparse region with a few chunks written, one straddling a chunk boundary.
    let sparse = src.path().join("sparse");
    let big = 16u64 << 30;
    sparse_file(
        &sparse,
        big,
        &[
            (0, vec![1; 10]),
            (5 * CHUNK - 3, vec![2; 7]),
            (7 << 30, vec![3; 100_000]),
            (big - 1, vec![4]),
        ],
    );
    cb.regions.push(("sparse".into(), sparse.clone()));
    // 64 GiB, the largest region the issue names: 2^20 chunks, two of them written.
    let huge = src.path().join("huge");
    sparse_file(&huge, 64 << 30, &[(33 << 30, vec![5; 70_000])]);
    cb.regions.push(("huge".into(), huge.clone()));
    let b = start(cb).await;
    let a = start(mesh.config("a", pa, &[("b", pb)])).await;
    connected(&a, "b").await;

    // All pulls run at once on the one connection, each on its own streams.
    let mut handles = Vec::new();
    for i in 0..sizes.len() {
        let to = dst.path().join(format!("r{i}"));
        handles.push((i, a.pull("b", &format!("r{i}"), &to).await.unwrap()));
    }
    let sparse_to = dst.path().join("sparse");
    let sparse_pull = a.pull("b", "sparse", &sparse_to).await.unwrap();
    for (i, h) in handles {
        let s = h.wait().await.unwrap();
        assert_eq!(s.size, sizes[i]);
        assert_eq!(s.duplicate_chunks, 0);
        // Nothing cut the connection: a pull that resumed here took the server's end
        // of the credit direction for a lost link.
        assert_eq!(s.reconnects, 0, "r{i}: {s:?}");
        assert_same(
            &src.path().join(format!("r{i}")),
            &dst.path().join(format!("r{i}")),
        );
    }
    let huge_to = dst.path().join("huge");
    let huge_pull = a.pull("b", "huge", &huge_to).await.unwrap();
    let s = sparse_pull.wait().await.unwrap();
    assert_eq!(s.size, big);
    // Only the chunks holding data crossed the wire: 0, 4, 5, the 2-chunk run at 7 GiB
    // and the last one.
    assert_eq!(s.data_chunks, 6, "{s:?}");
    assert_eq!(s.zero_chunks, s.chunks - 6);
    assert!(s.wire_bytes <= 6 * CHUNK);
    assert_same_sparse(&sparse, &sparse_to);
    // The copy stays sparse: zero chunks were not written.
    assert!(std::fs::metadata(&sparse_to).unwrap().blocks() * 512 < 64 << 20);

    let s = huge_pull.wait().await.unwrap();
    assert_eq!((s.size, s.chunks, s.data_chunks), (64 << 30, 1 << 20, 2));
    assert_same_sparse(&huge, &huge_to);

    let st = a.status();
    assert_eq!(st.transfers.len(), sizes.len() + 2);
    assert!(st
        .transfers
        .iter()
        .all(|t| t.state == "done" && t.bytes_done == t.bytes_total));
    assert!(st.peers[0].connected && st.peers[0].rtt_us.is_some());
    // The connection's own counters: it carried every pull's requests and credit.
    let peer = &st.peers[0];
    assert!(peer.sent_packets.is_some_and(|n| n > 100), "{peer:?}");
    assert!(peer
        .lost_packets
        .is_some_and(|n| n <= peer.sent_packets.unwrap()));
    assert!(peer.cwnd.is_some_and(|w| w > 0) && peer.congestion_events.is_some());
    assert_eq!(b.status().regions.len(), sizes.len() + 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_pull_from_each_other_at_once() {
    logs();
    let mesh = Mesh::new(&["a", "b", "c"]);
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let src = region_dir();
    let dst = region_dir();
    let mut cfgs = vec![
        mesh.config("a", pa, &[("b", pb), ("c", pc)]),
        mesh.config("b", pb, &[("a", pa), ("c", pc)]),
        mesh.config("c", pc, &[("a", pa), ("b", pb)]),
    ];
    for (i, c) in cfgs.iter_mut().enumerate() {
        let p = src.path().join(format!("r-{}", c.name));
        random_file(&p, (8 << 20) + i as u64 * 3, 100 + i as u64);
        c.regions.push((format!("r-{}", c.name), p));
    }
    let mut agents = Vec::new();
    for c in cfgs {
        agents.push(start(c).await);
    }
    for x in &agents {
        for y in ["a", "b", "c"] {
            if x.name() != y {
                connected(x, y).await;
            }
        }
    }
    let mut jobs = Vec::new();
    for x in &agents {
        for y in ["a", "b", "c"] {
            if x.name() != y {
                let to = dst.path().join(format!("{}-from-{y}", x.name()));
                let h = x.pull(y, &format!("r-{y}"), &to).await.unwrap();
                jobs.push((h, y, to));
            }
        }
    }
    for (h, y, to) in jobs {
        h.wait().await.unwrap();
        assert_same(&src.path().join(format!("r-{y}")), &to);
    }
    for x in agents {
        x.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_fetch_during_a_bulk_pull_is_served_and_correct() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let src = region_dir();
    let dst = region_dir();
    let size = 256u64 << 20;
    let p = src.path().join("big");
    random_file(&p, size, 9);
    let original = std::fs::read(&p).unwrap();
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("big".into(), p.clone()));
    let b = start(cb).await;
    let a = start(mesh.config("a", pa, &[("b", pb)])).await;
    connected(&a, "b").await;

    let to = dst.path().join("big");
    let h = a.pull("b", "big", &to).await.unwrap();
    let chunks = h.geometry().chunks();
    assert_eq!(chunks, size / CHUNK);
    for c in [chunks - 100, 17, chunks - 1, chunks - 100] {
        let got = h.fetch(c).await.unwrap();
        let off = (c * CHUNK) as usize;
        assert!(got == original[off..off + CHUNK as usize], "chunk {c}");
    }
    // Outside a pull, on the same urgent lane.
    let got = a
        .fetch("b", "big", 5)
        .await
        .unwrap()
        .into_bytes(CHUNK as usize);
    assert!(got == original[5 * CHUNK as usize..6 * CHUNK as usize]);
    // Bad requests get error replies, not hangs.
    match a.fetch("b", "big", u64::MAX).await {
        Err(FetchError::Remote(e)) => assert_eq!(e.kind, ErrorKind::OutOfRange),
        other => panic!("{other:?}"),
    }
    match a.fetch("b", "nope", 0).await {
        Err(FetchError::Remote(e)) => assert_eq!(e.kind, ErrorKind::UnknownRegion),
        other => panic!("{other:?}"),
    }
    assert!(matches!(h.fetch(chunks).await, Err(FetchError::Range(_))));

    let s = h.wait().await.unwrap();
    assert!(s.urgent_fetches >= 1, "{s:?}");
    assert_eq!(s.data_chunks + s.zero_chunks, chunks);
    assert_same(&p, &to);

    // Errors a user can make.
    assert!(matches!(
        a.pull("zz", "big", &dst.path().join("x")).await,
        Err(PullError::UnknownPeer(_))
    ));
    match a.pull("b", "nope", &dst.path().join("x")).await {
        Err(PullError::Remote { reply, .. }) => assert_eq!(reply.kind, ErrorKind::UnknownRegion),
        other => panic!("{:?}", other.map(|h| h.id())),
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_never_overwrites_a_served_region_or_a_running_pull() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let src = region_dir();
    let dst = region_dir();
    let theirs = src.path().join("theirs");
    random_file(&theirs, 256 << 20, 1);
    let mine = dst.path().join("mine");
    random_file(&mine, 1 << 20, 2);
    let before = std::fs::read(&mine).unwrap();
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("theirs".into(), theirs.clone()));
    // Keep b's copy slow enough that the first pull is still running below.
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.bulk_window = pagewire::engine::pull::Window::Fixed(64 << 10);
    ca.regions.push(("mine".into(), mine.clone()));
    let b = start(cb).await;
    let a = start(ca).await;
    connected(&a, "b").await;

    match a.pull("b", "theirs", &mine).await {
        Err(PullError::DestInUse(..)) => {}
        other => panic!("{:?}", other.map(|h| h.id())),
    }
    assert_eq!(
        std::fs::read(&mine).unwrap(),
        before,
        "served region was touched"
    );
    // Nor is one file served under two names, whatever the path (a hard link here).
    let alias = dst.path().join("alias");
    std::fs::hard_link(&mine, &alias).unwrap();
    let e = a.add_region("other", &alias).unwrap_err().to_string();
    assert!(e.contains("already served as region \"mine\""), "{e}");
    a.add_region("mine", &mine).unwrap(); // the same name may be opened again
    std::fs::remove_file(&alias).unwrap();

    let to = dst.path().join("copy");
    let first = a.pull("b", "theirs", &to).await.unwrap();
    let second = a.pull("b", "theirs", &to).await;
    match second {
        Err(PullError::DestInUse(..)) => {}
        // Allowed only if the first pull had already finished; then wait for this one.
        Ok(h) => {
            assert_eq!(first.status().state, "done");
            h.wait().await.unwrap();
        }
        Err(e) => panic!("{e}"),
    }
    first.wait().await.unwrap();
    assert_same(&theirs, &to);
    // A cancelled pull (the CLI's Ctrl-C) removes its incomplete file: full-size, it
    // would pass for a complete copy.
    let partial = dst.path().join("partial");
    let h = a.pull("b", "theirs", &partial).await.unwrap();
    assert!(partial.exists());
    h.cancel();
    assert!(matches!(h.wait().await, Err(PullError::Cancelled)));
    assert!(!partial.exists(), "the incomplete file was removed");
    let t = a
        .status()
        .transfers
        .into_iter()
        .find(|t| t.to == partial)
        .unwrap();
    assert_eq!(t.state, "failed");
    assert!(
        t.error.as_deref().is_some_and(|e| e.contains("cancel")),
        "{t:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}
