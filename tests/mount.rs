//! Lazy mounts (post-copy): an application attaches a region that lives on another agent
//! and reads it at once; both fault mechanisms pass the same tests.

mod common;

use common::*;
use pagewire::agent::Agent;
use pagewire::client::{attach, AttachOptions, Mapping};
use pagewire::engine::pull::Window;
use pagewire::fault::Mechanism;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

struct Setup {
    _mesh: Mesh,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    a: Agent,
    b: Option<Agent>,
    cb: pagewire::agent::AgentConfig,
    control: PathBuf,
    src: PathBuf,
    bytes: Arc<Vec<u8>>,
}

/// Agent `b` serves a random region of `size` bytes; agent `a` (with a control socket)
/// is where the application attaches. A small bulk window keeps the background copy slow
/// enough that the application's reads really fault.
async fn setup(size: u64, seed: u64, window: Window) -> Setup {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let src_dir = region_dir();
    let ctl_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("r");
    random_file(&src, size, seed);
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("r".into(), src.clone()));
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.bulk_window = window;
    let control = ctl_dir.path().join("a.sock");
    ca.control = Some(control.clone());
    let b = start(cb.clone()).await;
    let a = start(ca).await;
    connected(&a, "b").await;
    let bytes = Arc::new(std::fs::read(&src).unwrap());
    Setup {
        _mesh: mesh,
        _dirs: (src_dir, ctl_dir),
        a,
        b: Some(b),
        cb,
        control,
        src,
        bytes,
    }
}

fn opts(control: &Path, mech: Mechanism) -> AttachOptions {
    let mut o = AttachOptions::new(control, "b", "r");
    o.mechanism = mech;
    o
}

/// Reads every page of the mapping in a random order (seeded), split over `threads`
/// threads, and checks each page against the source bytes.
fn read_random(m: &Mapping, bytes: &[u8], threads: usize, seed: u64) {
    let pages = m.len().div_ceil(PAGE);
    let mut order: Vec<usize> = (0..pages).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    std::thread::scope(|s| {
        for t in 0..threads {
            let order = &order;
            s.spawn(move || {
                let mut buf = vec![0u8; PAGE];
                for &p in order.iter().skip(t).step_by(threads) {
                    let off = p * PAGE;
                    let n = PAGE.min(m.len() - off);
                    m.read_at(off, &mut buf[..n]);
                    if buf[..n] != bytes[off..off + n] {
                        panic!("page {p} differs from the peer's bytes");
                    }
                }
            });
        }
    });
}

async fn random_read_case(mech: Mechanism, threads: usize) {
    let s = setup(256 * MIB, 11, Window::Fixed(256 << 10)).await;
    let control = s.control.clone();
    let bytes = s.bytes.clone();
    let (faults, m_mech) = tokio::task::spawn_blocking(move || {
        let m = attach(&opts(&control, mech)).unwrap();
        read_random(&m, &bytes, threads, 5);
        m.wait_complete(Some(Duration::from_secs(120))).unwrap();
        let st = m.status().unwrap();
        assert_eq!(st.chunks_present, st.chunks_total);
        // After completion the whole mapping reads at native speed and is still exact.
        let mut all = vec![0u8; m.len()];
        m.read_at(0, &mut all);
        assert!(all == *bytes, "mapping differs after completion");
        let mech = m.mechanism();
        (st.faults, mech)
    })
    .await
    .unwrap();
    assert_eq!(m_mech, mech);
    assert!(faults > 0, "the reads never faulted");
    let st = s.a.status();
    let m = st.mounts.last().unwrap();
    assert_eq!(m.mechanism, mech.name());
    assert_eq!(m.state, "complete");
    s.a.shutdown().await;
    if let Some(b) = s.b {
        b.shutdown().await;
    }
    drop(s.src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uffd_random_read_256m() {
    random_read_case(Mechanism::Userfaultfd, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uffd_random_read_4_threads() {
    random_read_case(Mechanism::Userfaultfd, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mprotect_random_read_256m() {
    random_read_case(Mechanism::Mprotect, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mprotect_random_read_4_threads() {
    random_read_case(Mechanism::Mprotect, 4).await;
}

async fn writes_survive_case(mech: Mechanism) {
    let s = setup(64 * MIB, 12, Window::Fixed(128 << 10)).await;
    let control = s.control.clone();
    let bytes = s.bytes.clone();
    tokio::task::spawn_blocking(move || {
        let m = attach(&opts(&control, mech)).unwrap();
        // Write into pages spread over the region, early, while the copy has barely
        // started: each write faults its chunk in first, then lands.
        let marks: Vec<usize> = (0..64).map(|i| i * (m.len() / 64) + 123).collect();
        for (i, off) in marks.iter().enumerate() {
            m.write_at(*off, format!("app wrote {i:04}").as_bytes());
        }
        m.wait_complete(Some(Duration::from_secs(120))).unwrap();
        let mut all = vec![0u8; m.len()];
        m.read_at(0, &mut all);
        let mut want = bytes.to_vec();
        for (i, off) in marks.iter().enumerate() {
            let w = format!("app wrote {i:04}");
            want[*off..*off + w.len()].copy_from_slice(w.as_bytes());
        }
        assert!(
            all == want,
            "the background copy overwrote the app's writes"
        );
    })
    .await
    .unwrap();
    s.a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uffd_writes_survive_background_copy() {
    writes_survive_case(Mechanism::Userfaultfd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mprotect_writes_survive_background_copy() {
    writes_survive_case(Mechanism::Mprotect).await;
}

async fn server_restart_case(mech: Mechanism) {
    let mut s = setup(128 * MIB, 13, Window::Fixed(128 << 10)).await;
    let control = s.control.clone();
    let bytes = s.bytes.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let reader = tokio::task::spawn_blocking(move || {
        let m = attach(&opts(&control, mech)).unwrap();
        // Read the first tenth, tell the test, then read the rest while the server is
        // away: those faults wait and complete when it is back.
        let tenth = m.len() / 10 / PAGE * PAGE;
        let mut buf = vec![0u8; tenth];
        m.read_at(0, &mut buf);
        assert!(buf == bytes[..tenth]);
        tx.send(()).unwrap();
        read_random(&m, &bytes, 2, 7);
        m.wait_complete(Some(Duration::from_secs(120))).unwrap();
        m.status().unwrap()
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    s.b.take().unwrap().shutdown().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = start(s.cb.clone()).await;
    let st = tokio::time::timeout(Duration::from_secs(180), reader)
        .await
        .expect("reads did not complete after the server came back")
        .unwrap();
    assert_eq!(st.chunks_present, st.chunks_total);
    assert_eq!(st.faults_failed, 0);
    s.a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uffd_serving_agent_restarts_mid_mount() {
    server_restart_case(Mechanism::Userfaultfd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mprotect_serving_agent_restarts_mid_mount() {
    server_restart_case(Mechanism::Mprotect).await;
}

/// The application (a `pagewire mount` process) is killed mid-copy: the agent ends the
/// session, frees it, and goes on serving others.
async fn app_exit_case(mech: Mechanism) {
    let s = setup(128 * MIB, 14, Window::Fixed(64 << 10)).await;
    let out = region_dir();
    let to = out.path().join("mounted");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire"))
        .args(["mount", "--from", "b", "--region", "r", "--json"])
        .args(["--mechanism", mech.name()])
        .arg("--to")
        .arg(&to)
        .arg("--control")
        .arg(&s.control)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the mount is filling, then kill the application.
    let t0 = std::time::Instant::now();
    loop {
        let st = s.a.status();
        if let Some(m) = st.mounts.last() {
            if m.chunks_present > 4 {
                assert_eq!(m.state, "filling", "{m:?}");
                assert_eq!(m.mechanism, mech.name());
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "mount never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let st = s.a.status();
        let m = st.mounts.last().unwrap();
        let t = st.transfers.iter().find(|t| t.id == m.id).unwrap();
        if m.state == "detached" && t.state != "copying" {
            assert!(m.chunks_present < m.chunks_total, "{m:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "session not ended: {m:?} {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The agent still works: a pull of the same region completes byte-exact.
    let pulled = out.path().join("pulled");
    let h = s.a.pull("b", "r", &pulled).await.unwrap();
    h.wait().await.unwrap();
    assert_same(&s.src, &pulled);
    s.a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uffd_app_exit_frees_the_session() {
    app_exit_case(Mechanism::Userfaultfd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mprotect_app_exit_frees_the_session() {
    app_exit_case(Mechanism::Mprotect).await;
}

/// `pagewire mount` fills a file completely (tmpfs: userfaultfd; a disk file: mprotect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_cli_fills_the_file() {
    let s = setup(
        8 * MIB + 123,
        15,
        Window::Auto {
            min: 256 << 10,
            max: 16 << 20,
            gain_pct: 200,
        },
    )
    .await;
    let shm = region_dir();
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (dir, want) in [(shm.path(), "userfaultfd"), (disk.path(), "")] {
        let to = dir.join("m");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire"))
            .args(["mount", "--from", "b", "--region", "r", "--json"])
            .arg("--to")
            .arg(&to)
            .arg("--control")
            .arg(&s.control)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["state"], "complete", "{v}");
        if !want.is_empty() {
            assert_eq!(v["mechanism"], want, "{v}");
        }
        assert_same(&s.src, &to);
    }
    s.a.shutdown().await;
}

/// `pagewire mount --to` a file the local agent serves is refused before anything
/// touches it (the library used to create and truncate it first); so is an attach whose
/// backing is the file a running mount fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_never_overwrites_a_served_region_or_a_running_mount() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let dir = region_dir();
    let (src, mine) = (dir.path().join("r"), dir.path().join("mine"));
    random_file(&src, 4 * MIB, 21);
    random_file(&mine, 2 * MIB, 22);
    let before = std::fs::read(&mine).unwrap();
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("r".into(), src.clone()));
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.regions.push(("mine".into(), mine.clone()));
    let control = dir.path().join("a.sock");
    ca.control = Some(control.clone());
    let b = start(cb).await;
    let a = start(ca).await;
    connected(&a, "b").await;
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_pagewire"))
        .args(["mount", "--from", "b", "--region", "r", "--to"])
        .arg(&mine)
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("it is a region this agent serves"), "{err}");
    assert!(
        std::fs::read(&mine).unwrap() == before,
        "the served file is untouched"
    );
    // A mount in progress (the application holds it, unread): a second one into its
    // file is refused, the first completes byte-exact.
    let to = dir.path().join("m");
    let mut o1 = opts(&control, Mechanism::Auto);
    o1.backing = Some(to.clone());
    let (first, second) = tokio::task::spawn_blocking(move || {
        let first = attach(&o1).unwrap();
        let second = attach(&o1).map(|_| ()).map_err(|e| e.to_string());
        first.wait_complete(Some(Duration::from_secs(60))).unwrap();
        (first, second)
    })
    .await
    .unwrap();
    // Refused whether the first was still filling or had just completed (the
    // application still maps it).
    let e = second.unwrap_err();
    assert!(
        e.contains("another pull or mount is writing it") || e.contains("has it mapped"),
        "{e}"
    );
    first.detach();
    assert_same(&src, &to);
    a.shutdown().await;
    b.shutdown().await;
}

/// The `lazy_reader` example, built by `cargo test` next to this test binary.
fn lazy_reader() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/lazy_reader");
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// The example reads the region in random order with 4 threads and prints its sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_reader_prints_the_regions_sha256() {
    let s = setup(32 * MIB + 5, 16, Window::Fixed(256 << 10)).await;
    let want: String = ring::digest::digest(&ring::digest::SHA256, &s.bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for mech in ["userfaultfd", "mprotect"] {
        let o = tokio::process::Command::new(lazy_reader())
            .args(["--from", "b", "--region", "r", "--order", "random"])
            .args(["--threads", "4", "--json", "--mechanism", mech])
            .arg("--control")
            .arg(&s.control)
            .output()
            .await
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["sha256"], want.as_str(), "{v}");
        assert_eq!(v["mechanism"], mech);
        assert!(v["faults"].as_u64().unwrap() > 0, "{v}");
        for k in [
            "first_touch_us",
            "fault_p50_us",
            "fault_p99_us",
            "mbytes_per_s",
        ] {
            assert!(v[k].is_number(), "{k} missing: {v}");
        }
    }
    s.a.shutdown().await;
}

/// The serving agent goes away for good: after the fault timeout the mount fails and the
/// application gets SIGBUS rather than hanging.
async fn timeout_case(mech: &str) {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let src_dir = region_dir();
    let ctl = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("r");
    random_file(&src, 64 * MIB, 17);
    let mut cb = mesh.config("b", pb, &[("a", pa)]);
    cb.regions.push(("r".into(), src.clone()));
    let mut ca = mesh.config("a", pa, &[("b", pb)]);
    ca.bulk_window = Window::Fixed(64 << 10);
    ca.fault_timeout = Duration::from_secs(1);
    let control = ctl.path().join("a.sock");
    ca.control = Some(control.clone());
    let b = start(cb).await;
    let a = start(ca).await;
    connected(&a, "b").await;
    let mut child = tokio::process::Command::new(lazy_reader())
        .args(["--from", "b", "--region", "r", "--order", "seq", "--json"])
        .args(["--mechanism", mech])
        .arg("--control")
        .arg(&control)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while a.status().mounts.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no mount");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.shutdown().await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the application hung instead of getting SIGBUS")
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    let st = a.status();
    let m = st.mounts.last().unwrap();
    assert_eq!(m.state, "failed", "{m:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uffd_fault_timeout_gives_sigbus() {
    timeout_case("userfaultfd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mprotect_fault_timeout_gives_sigbus() {
    timeout_case("mprotect").await;
}
