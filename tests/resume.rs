//! A pull survives the serving agent going away and coming back.

mod common;

use common::*;
use pagewire::engine::pull::Window;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_resumes_after_the_serving_agent_restarts() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let src = region_dir();
    let dst = region_dir();
    let size = 256u64 << 20;
    let p = src.path().join("big");
    random_file(&p, size, 77);
    // A few zero chunks too, so both kinds resume.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&vec![0u8; 4 << 20], 100 << 20).unwrap();
    }
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("big".into(), p.clone()));
    // A small window keeps the copy slow enough to interrupt it in the middle.
    cb.bulk_window = Window::Fixed(256 << 10);
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.bulk_window = Window::Fixed(256 << 10);
    let b = start(cb.clone()).await;
    let a = start(ca).await;
    connected(&a, "b").await;

    let to = dst.path().join("big");
    let h = a.pull("b", "big", &to).await.unwrap();
    // Wait for some progress, then take the server away mid-copy.
    let t0 = std::time::Instant::now();
    while h.status().bytes_done < size / 10 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.shutdown().await;
    let before = h.status();
    assert!(
        before.bytes_done < size,
        "the pull finished before the restart: {before:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a.is_connected("b"));
    assert_eq!(h.status().state, "waiting for peer");

    let b = start(cb).await;
    let s = tokio::time::timeout(Duration::from_secs(120), h.wait())
        .await
        .expect("pull did not finish after the peer came back")
        .unwrap();
    assert_same(&p, &to);
    assert!(s.reconnects >= 1, "{s:?}");
    // Nothing verified was sent again: every chunk arrived exactly once.
    assert_eq!(s.duplicate_chunks, 0, "{s:?}");
    assert_eq!(s.data_chunks + s.zero_chunks, s.chunks);
    assert_eq!(s.zero_chunks, (4 << 20) / (64 << 10));
    assert_eq!(s.wire_bytes, size - (4 << 20));
    a.shutdown().await;
    b.shutdown().await;
}
