//! Migration benchmark (issue 5): downtime and total time of `Agent::migrate` of a
//! region under a writer dirtying random 4 KiB pages at 0, 10k and 100k pages/s, at 0 ms
//! RTT (loopback, direct) and 50 ms RTT (two WAN relays, 25 ms each way, rate-limited),
//! with bytes sent / region size and pre-copy rounds. Baselines measured in the same run,
//! just before each migration: the path RTT (the agents' smoothed RTT) and the link rate
//! (a `pull` of the same bytes A -> B by a pair of agents on an identical path).
//!
//! Two modes:
//! - `memory` (the product path): A's region is an application's published memory
//!   (`client::publish`, memfd + the kernel's dirty tracker, uffd-wp-async where
//!   available; no replicas), filled with the baseline's bytes, and the writer stores
//!   through `Published::as_ptr()`. On B a receiving application (`client::receive`, in
//!   a blocking thread) waits in `wait_owner`, then at once reads the 256 pages the
//!   writer wrote last (most recent first) and `PAGEWIRE_BENCH_TOUCH` random pages, like
//!   a resumed app (stale ones fault and are fetched from A), then `wait_received`. The
//!   migration uses post-copy. After each case B's memory (`Receiving::read_at`) is
//!   compared page by page with A's at the freeze (`Published::read_at`; A's writer stays
//!   paused from the freeze on). Reported besides the engine's figures: `app dt` = from
//!   the freeze hook's call to the app's release from `wait_owner` (the downtime the app
//!   sees), the app's time to read its pages and its slowest page.
//! - `file`: region "r" is a file on /dev/shm written with `pwrite`; the driver finds
//!   changes by rehashing chunks; no post-copy (everything still dirty at the freeze is
//!   sent during the downtime), so heavy writers are expected to miss the downtime
//!   target. B's file is checked equal to A's after each case.
//!
//! Targets (issue 5): downtime <= 1 RTT + 20 ms; total time <= 1.3 x size / link rate when
//! the writer is idle.
//!
//! `cargo bench --bench migrate` (both modes, ~9-12 min at 1 GiB on the 2-vCPU machine).
//! Environment:
//! - PAGEWIRE_BENCH_MODE: `memory`, `file` or `both` (default `both`, memory first);
//! - PAGEWIRE_BENCH_SIZE: region size (default 1GiB);
//! - PAGEWIRE_BENCH_CASES: comma-separated `RTT_MS:PAGES_PER_S` (default
//!   `0:0,0:10000,0:100000,50:0,50:10000,50:100000`);
//! - PAGEWIRE_BENCH_RATE: rate limit of the 50 ms relays (default 400mbit: the relay
//!   carries ~570-750 Mbit/s at most on the 2-vCPU machine, see `benches/wan.rs`);
//! - PAGEWIRE_BENCH_CHUNK: the agents' chunk size, the granule of dirty tracking and
//!   transfer (default 4KiB, one page: with 64 KiB chunks a random 4 KiB write dirties
//!   16x its size and even 10k pages/s never converges);
//! - PAGEWIRE_BENCH_BASE_CHUNK: chunk size of the baseline pull (default 64KiB, the
//!   agents' default and their fastest pull here);
//! - PAGEWIRE_BENCH_MAX_TIME: pre-copy time limit (default 30s), PAGEWIRE_BENCH_MAX_ROUNDS
//!   (default 30); the downtime budget given to the engine is the target (RTT + 20 ms);
//! - PAGEWIRE_BENCH_TRACKER: memory mode's tracker (default `auto`);
//! - PAGEWIRE_BENCH_TOUCH: random pages the receiving app reads after the handover
//!   (default 256);
//! - PAGEWIRE_BENCH_NO_MMAP_WRITERS=1: file mode migrates with `no_mmap_writers` (the
//!   writer uses pwrite, so the promise holds): the file is re-read only after inotify
//!   events;
//! - PAGEWIRE_BENCH_VERIFY=0 skips the check that B's copy equals A's after the freeze;
//! - RUST_LOG (e.g. `pagewire=info`): the agents' logs on stderr.
//!
//! Layout: agent A (source, with the writer thread) on the main 1-worker runtime, agent B
//! on its own 1-worker runtime, relays on a third; the writer and the receiving app are
//! plain threads. All share 2 vCPUs, so the writer at 100k pages/s competes with the
//! agents for CPU. Prints a table per mode and one `BENCH_JSON {...}` line.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagewire::agent::{Agent, AgentConfig, Freeze, MigrateOptions, PeerSpec};
use pagewire::client::publish::{publish, PublishOptions, Published, TrackerKind};
use pagewire::client::receive::{receive, ReceiveOptions, Receiving};
use pagewire::control::MigrationProgress;
use pagewire::transport::Link;
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::{Rng, RngCore, SeedableRng};

const PAGE: u64 = 4096;

/// `PAGEWIRE_BENCH_MODE` when unset.
const DEFAULT_MODE: &str = "both";

struct Env {
    certs: tempfile::TempDir,
    data: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let certs = tempfile::tempdir().unwrap();
        pagewire::certs::init_ca(certs.path(), 1, false).unwrap();
        for n in ["a", "b"] {
            pagewire::certs::issue(certs.path(), n, &[], 1, false).unwrap();
        }
        let data = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        Env { certs, data }
    }

    fn config(&self, n: &str, port: u16, peer: &str, peer_addr: SocketAddr) -> AgentConfig {
        let d = self.certs.path();
        let mut c = AgentConfig::new(
            n,
            &format!("127.0.0.1:{port}"),
            &d.join("ca.pem"),
            &d.join(format!("{n}.pem")),
            &d.join(format!("{n}.key")),
        );
        c.peers = vec![PeerSpec {
            name: peer.into(),
            addr: peer_addr.to_string(),
        }];
        c
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn dest_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| runtime("destination"))
}

fn relay_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| runtime("wan-relay"))
}

fn env_str(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

/// Bytes free for unprivileged use on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return u64::MAX;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

/// Where the writer's pages go: `pwrite` into the file region (file mode) or stores
/// through the published mapping's raw pointer (memory mode).
type Sink = Box<dyn FnMut(u64, &[u8]) + Send>;

/// How many of the writer's last page offsets are kept (the receiving app of memory
/// mode touches them first after the handover, like a resumed app).
const LAST_PAGES: usize = 256;

/// Dirties random 4 KiB pages at `rate` pages/s (paced against the clock, in bursts of
/// at most 1 ms worth). The freeze hook pauses it at a safe point (between two writes)
/// and records the freeze instant.
struct Writer {
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    /// The offsets of the last pages written (published when the writer pauses).
    last: Arc<Mutex<Vec<u64>>>,
    frozen_at: Arc<Mutex<Option<Instant>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(mut sink: Sink, size: u64, rate: u64, seed: u64) -> Writer {
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let quit = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(Vec::new()));
        let (p, pd, q, w, l) = (
            pause.clone(),
            paused.clone(),
            quit.clone(),
            writes.clone(),
            last.clone(),
        );
        let pages = size / PAGE;
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut b = vec![0u8; PAGE as usize];
            let mut ring = std::collections::VecDeque::with_capacity(LAST_PAGES);
            let t0 = Instant::now();
            let mut done = 0u64;
            while !q.load(Ordering::SeqCst) {
                if p.load(Ordering::SeqCst) {
                    if !pd.load(Ordering::SeqCst) {
                        *l.lock().unwrap() = ring.iter().copied().collect();
                        pd.store(true, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                pd.store(false, Ordering::SeqCst);
                let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
                if done >= due {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                // Never more than 1 ms worth at once (after a stall, the backlog is dropped,
                // not written in one burst).
                let n = (due - done).min((rate / 1000).max(1));
                for _ in 0..n {
                    let off = rng.gen_range(0..pages) * PAGE;
                    rng.fill_bytes(&mut b[..64]);
                    sink(off, &b);
                    if ring.len() == LAST_PAGES {
                        ring.pop_front();
                    }
                    ring.push_back(off);
                }
                done = due.max(done + n);
                w.fetch_add(n, Ordering::Relaxed);
            }
        });
        Writer {
            pause,
            paused,
            quit,
            writes,
            last,
            frozen_at: Arc::new(Mutex::new(None)),
            thread: Some(thread),
        }
    }

    fn file(path: &Path, size: u64, rate: u64, seed: u64) -> Writer {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        Writer::start(
            Box::new(move |off, b| f.write_all_at(b, off).unwrap()),
            size,
            rate,
            seed,
        )
    }

    /// Stores through `Published::as_ptr()` (raw pointer copies, no `&[u8]` of the
    /// shared mapping): only the kernel's dirty tracker sees these writes.
    fn memory(m: Arc<Published>, size: u64, rate: u64, seed: u64) -> Writer {
        assert!(m.len() as u64 >= size);
        Writer::start(
            Box::new(move |off, b| {
                // SAFETY: `off + b.len() <= size <= m.len()`: inside the live mapping,
                // which `m` keeps alive; a raw copy.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), m.as_ptr().add(off as usize), b.len())
                }
            }),
            size,
            rate,
            seed,
        )
    }

    fn hook(&self) -> Freeze {
        let (p, pd, fa) = (
            self.pause.clone(),
            self.paused.clone(),
            self.frozen_at.clone(),
        );
        Freeze::Hook(Arc::new(move |freeze: bool| {
            if freeze {
                *fa.lock().unwrap() = Some(Instant::now());
                p.store(true, Ordering::SeqCst);
                while !pd.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_micros(50));
                }
            } else {
                p.store(false, Ordering::SeqCst);
            }
            Ok(())
        }))
    }

    fn stop(mut self) -> u64 {
        self.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.writes.load(Ordering::Relaxed)
    }
}

fn make_random(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

fn file_hash(path: &Path) -> blake3::Hash {
    let f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    loop {
        let n = f.read_at(&mut buf, off).unwrap();
        if n == 0 {
            break h.finalize();
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
}

struct Case {
    rtt_ms: u64,
    pages_per_s: u64,
}

struct Pair {
    a: Agent,
    b: Agent,
    relays: Vec<Relay>,
}

/// A pair of agents; `files`: region "r" on A and on B (file mode, baseline);
/// `control`: the agents' control sockets (memory mode: the apps publish / receive).
async fn pair(
    env: &Env,
    files: Option<(&Path, &Path)>,
    control: Option<(PathBuf, PathBuf)>,
    chunk: u32,
    link: Option<(LinkParams, Link)>,
) -> Pair {
    let (pa, pb) = (free_port(), free_port());
    let direct = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (to_b, to_a, relays) = match &link {
        None => (direct(pb), direct(pa), Vec::new()),
        Some((l, _)) => {
            let mk = |up: SocketAddr| {
                let mut cfg = RelayConfig::symmetric("127.0.0.1:0".parse().unwrap(), up, l.clone());
                cfg.seed = Some(1);
                relay_rt().spawn(Relay::start(cfg))
            };
            let rb = mk(direct(pb)).await.unwrap().unwrap();
            let ra = mk(direct(pa)).await.unwrap().unwrap();
            (rb.local_addr(), ra.local_addr(), vec![rb, ra])
        }
    };
    let mut ca = env.config("a", pa, "b", to_b);
    ca.chunk_size = chunk;
    let mut cb = env.config("b", pb, "a", to_a);
    cb.chunk_size = chunk;
    if let Some((a_file, b_file)) = files {
        ca.regions.push(("r".into(), a_file.to_path_buf()));
        cb.regions.push(("r".into(), b_file.to_path_buf()));
    }
    if let Some((sa, sb)) = control {
        ca.control = Some(sa);
        cb.control = Some(sb);
    }
    if let Some((_, l)) = link {
        ca.tuning.size_for_link(l);
        cb.tuning.size_for_link(l);
    }
    let b = dest_rt().spawn(Agent::start(cb)).await.unwrap().unwrap();
    let a = Agent::start(ca).await.unwrap();
    // Both connected, on a connection that has lasted a second (when both dial at once,
    // one connection replaces the other a moment later; a migration on the replaced one
    // would abort).
    let steady = |ag: &Agent, peer: &str| {
        ag.status()
            .peers
            .iter()
            .any(|p| p.name == peer && p.connected_for_s.is_some_and(|s| s >= 1.0))
    };
    let t0 = Instant::now();
    while !(steady(&a, "b") && steady(&b, "a")) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "agents did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Pair { a, b, relays }
}

impl Pair {
    fn rtt_ms(&self) -> f64 {
        self.a
            .status()
            .peers
            .iter()
            .find(|p| p.name == "b")
            .and_then(|p| p.rtt_us)
            .map(|u| u as f64 / 1e3)
            .unwrap_or(f64::NAN)
    }

    async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
        for r in self.relays {
            relay_rt().spawn(r.shutdown()).await.unwrap();
        }
    }
}

fn main() {
    // RUST_LOG=pagewire=info: the agents' logs on stderr (freeze, handover, owner times).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    runtime("source").block_on(run());
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    File,
    Memory,
}

/// The run's parameters (environment).
struct Setup {
    size: u64,
    chunk: u32,
    base_chunk: u32,
    rate: u64,
    max_time: Duration,
    max_rounds: u32,
    verify: bool,
    tracker: TrackerKind,
    touch: usize,
    a_file: PathBuf,
    b_file: PathBuf,
    scratch: PathBuf,
}

/// The emulated path of a case: none at 0 ms; two relays of RTT/2 each way at `rate`.
fn link_for(c: &Case, rate: u64) -> Option<(LinkParams, Link)> {
    (c.rtt_ms > 0).then(|| {
        let delay = Duration::from_millis(c.rtt_ms) / 2;
        let bdp_queue = (rate as f64 / 8.0 * (3 * delay).as_secs_f64()) as usize;
        (
            LinkParams {
                delay,
                rate_bps: Some(rate),
                queue_bytes: bdp_queue.max(1 << 20),
                ..LinkParams::default()
            },
            Link {
                bandwidth_bps: rate,
                rtt: Duration::from_millis(c.rtt_ms),
            },
        )
    })
}

/// Baseline on an identical path (fresh relays with the same parameters): a pull of
/// the same bytes (A's file region) A -> B by agents with the default 64 KiB chunks (a
/// pull at 4 KiB chunks is CPU-bound here, ~40 MB/s, and would flatter the migration).
/// The link rate in bytes/s. Leaves B's file empty (sparse, the region's size).
async fn baseline(env: &Env, s: &Setup, link: Option<(LinkParams, Link)>) -> f64 {
    let _ = std::fs::remove_file(&s.b_file);
    std::fs::File::create(&s.b_file)
        .unwrap()
        .set_len(s.size)
        .unwrap();
    let base = pair(env, Some((&s.a_file, &s.b_file)), None, s.base_chunk, link).await;
    let t0 = Instant::now();
    let h = base.b.pull("a", "r", &s.scratch).await.unwrap();
    h.wait().await.unwrap();
    let pull_s = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&s.scratch);
    base.stop().await;
    s.size as f64 / pull_s
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// The total-time target applies to the idle writer only.
fn total_met(c: &Case, ratio: f64) -> &'static str {
    if c.pages_per_s == 0 {
        yes(ratio <= 1.3)
    } else {
        "-"
    }
}

/// File mode: region "r" is a file on /dev/shm written with `pwrite`; the driver finds
/// changes by rehashing chunks; no post-copy (everything dirty at the freeze is sent
/// during the downtime).
async fn file_case(env: &Env, s: &Setup, c: &Case) -> serde_json::Value {
    let size = s.size;
    let link = link_for(c, s.rate);
    let link_bps = baseline(env, s, link.clone()).await;
    // B's copy starts empty (a sparse file of the region's size): `baseline` left it so.
    let p = pair(env, Some((&s.a_file, &s.b_file)), None, s.chunk, link).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rtt_ms = p.rtt_ms();
    let target_ms = c.rtt_ms as f64 + 20.0;
    let w = Writer::file(&s.a_file, size, c.pages_per_s, 7 + c.pages_per_s);
    if c.pages_per_s > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let opts = MigrateOptions {
        budget: Duration::from_millis(target_ms as u64),
        max_rounds: s.max_rounds,
        max_time: s.max_time,
        freeze: w.hook(),
        no_mmap_writers: std::env::var("PAGEWIRE_BENCH_NO_MMAP_WRITERS").as_deref() == Ok("1"),
        ..MigrateOptions::new("b")
    };
    let mut est = EstLog::default();
    let report = p.a.migrate("r", opts, |pr| est.observe(pr)).await;
    let writes = w.stop();
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            println!(
                "{:>4}ms {:>8} | migration failed: {e}",
                c.rtt_ms, c.pages_per_s
            );
            p.stop().await;
            return serde_json::json!({"mode": "file", "rtt_ms": c.rtt_ms, "pages_per_s": c.pages_per_s, "error": e.to_string()});
        }
    };
    let same = !s.verify || file_hash(&s.a_file) == file_hash(&s.b_file);
    p.stop().await;
    let ideal_ms = size as f64 / link_bps * 1e3;
    let ratio = report.total_ms / ideal_ms;
    println!(
        "{:>4}ms {:>8} | {:>7.2} {:>9.1} {:>9.0} | {:>10.1} {:>9.0} {:>6} | {:>9.0} {:>9.2} {:>6} | {:>10.3} {:>6} {:>9} {:>7}{}",
        c.rtt_ms,
        c.pages_per_s,
        rtt_ms,
        link_bps / 1e6,
        ideal_ms,
        report.downtime_ms,
        target_ms,
        yes(report.downtime_ms <= target_ms),
        report.total_ms,
        ratio,
        total_met(c, ratio),
        report.bytes_sent as f64 / size as f64,
        report.rounds,
        format!("{:.0}/{:.0}", est.median() / 1e6, report.bandwidth_bps / 1e6),
        writes,
        if same { "" } else { "  B != A: COPY WRONG" }
    );
    serde_json::json!({
        "mode": "file",
        "rtt_ms": c.rtt_ms, "pages_per_s": c.pages_per_s, "path_rtt_ms": rtt_ms,
        "link_bps": link_bps, "ideal_ms": ideal_ms, "downtime_ms": report.downtime_ms,
        "downtime_target_ms": target_ms, "total_ms": report.total_ms,
        "precopy_ms": report.precopy_ms, "total_x_ideal": ratio,
        "bytes_per_size": report.bytes_sent as f64 / size as f64,
        "rounds": report.rounds, "writes": writes, "outcome": report.outcome,
        "engine_bandwidth_bps": report.bandwidth_bps, "engine_rtt_ms": report.rtt_ms,
        "precopy_bandwidth_est_median_bps": est.median(),
        "precopy_bandwidth_est_last_bps": est.last(),
        "expected_downtime_ms_at_switch": est.expected_downtime_ms,
        "dirty_tracking": report.dirty_tracking,
        "hash_passes": report.hash_passes,
        "copy_ok": same,
    })
}

/// The engine's bandwidth estimate during pre-copy, from the progress events (every
/// ~100 ms): the median of the pre-copy samples and the last one before the freeze
/// (the one the switch-over decision used), bytes/s; and the last predicted downtime.
#[derive(Default, Clone)]
struct EstLog {
    precopy: Vec<f64>,
    expected_downtime_ms: Option<f64>,
}

impl EstLog {
    fn observe(&mut self, p: &MigrationProgress) {
        if p.phase == "precopy" && p.bandwidth_bps > 0.0 {
            self.precopy.push(p.bandwidth_bps);
            self.expected_downtime_ms = p.expected_downtime_ms;
        }
    }

    fn median(&self) -> f64 {
        let mut v = self.precopy.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn last(&self) -> f64 {
        self.precopy.last().copied().unwrap_or(f64::NAN)
    }
}

/// What the receiving application on B saw.
struct AppOut {
    r: Receiving,
    owner_at: Instant,
    received_at: Instant,
    touched: usize,
    touch_ms: f64,
    slowest_touch_ms: f64,
}

/// 4 KiB pages that differ between A's memory and B's (both read through raw copies).
fn mem_diff(a: &Published, b: &Receiving, size: u64) -> u64 {
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mut diff = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(ba.len());
        a.read_at(off as usize, &mut ba[..n]);
        b.read_at(off as usize, &mut bb[..n]);
        if ba[..n] != bb[..n] {
            diff += ba[..n]
                .chunks(PAGE as usize)
                .zip(bb[..n].chunks(PAGE as usize))
                .filter(|(x, y)| x != y)
                .count() as u64;
        }
        off += n as u64;
    }
    diff
}

/// Memory mode: A's region is an application's published memory (memfd + the kernel's
/// dirty tracker), written through its raw pointer; B's side is a receiving application
/// (`client::receive`) that runs as soon as the handover makes B the owner, touches the
/// pages the writer wrote last and some random ones (post-copy faults), then waits for
/// the rest; migration with post-copy.
async fn memory_case(env: &Env, s: &Setup, c: &Case, n: usize) -> serde_json::Value {
    let size = s.size;
    let link = link_for(c, s.rate);
    let link_bps = baseline(env, s, link.clone()).await;
    let sa = env.data.path().join(format!("a{n}.sock"));
    let sb = env.data.path().join(format!("b{n}.sock"));
    let p = pair(env, None, Some((sa.clone(), sb.clone())), s.chunk, link).await;
    let fail = |what: String| {
        println!("{:>4}ms {:>8} | {what}", c.rtt_ms, c.pages_per_s);
        serde_json::json!({"mode": "memory", "rtt_ms": c.rtt_ms, "pages_per_s": c.pages_per_s, "error": what})
    };
    // A: the application publishes its memory (migration only: no replicas) and fills it
    // with the bytes the baseline pulled.
    let mut o = PublishOptions::new(&sa, "m", size, &[]);
    o.tracker = s.tracker;
    let published = match tokio::task::spawn_blocking(move || publish(&o))
        .await
        .unwrap()
    {
        Ok(m) => Arc::new(m),
        Err(e) => {
            p.stop().await;
            return fail(format!("publish failed: {e}"));
        }
    };
    {
        let (m, af) = (published.clone(), s.a_file.clone());
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(af).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < size {
                let n = ((size - off) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], off).unwrap();
                // SAFETY: inside the mapping (`off + n <= size`); a raw copy.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), m.as_ptr().add(off as usize), n)
                }
                off += n as u64;
            }
        })
        .await
        .unwrap();
    }
    // B: the receiving application.
    let (owner_tx, owner_rx) = tokio::sync::oneshot::channel::<()>();
    let w = Writer::memory(published.clone(), size, c.pages_per_s, 7 + c.pages_per_s);
    let (last, touch) = (w.last.clone(), s.touch);
    let app = tokio::task::spawn_blocking(move || -> Result<AppOut, String> {
        let mut r = receive(&ReceiveOptions::new(&sb, "m", size)).map_err(|e| e.to_string())?;
        let _ = owner_tx.send(());
        if !r
            .wait_owner(Some(Duration::from_secs(900)))
            .map_err(|e| e.to_string())?
        {
            return Err("not the owner after 900 s".into());
        }
        let owner_at = Instant::now();
        // Runs at once, like the resumed app: the pages written last (most recent first,
        // likely stale), then random ones.
        let mut pages: Vec<u64> = last.lock().unwrap().iter().rev().copied().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        pages.extend((0..touch).map(|_| rng.gen_range(0..size / PAGE) * PAGE));
        let mut buf = vec![0u8; PAGE as usize];
        let mut slowest = 0f64;
        for &off in &pages {
            let t = Instant::now();
            r.read_at(off as usize, &mut buf);
            slowest = slowest.max(t.elapsed().as_secs_f64() * 1e3);
        }
        let touch_ms = owner_at.elapsed().as_secs_f64() * 1e3;
        if !r
            .wait_received(Some(Duration::from_secs(900)))
            .map_err(|e| e.to_string())?
        {
            return Err("not received after 900 s".into());
        }
        Ok(AppOut {
            r,
            owner_at,
            received_at: Instant::now(),
            touched: pages.len(),
            touch_ms,
            slowest_touch_ms: slowest,
        })
    });
    if owner_rx.await.is_err() {
        let e = match app.await.unwrap() {
            Err(e) => e,
            Ok(_) => "?".into(),
        };
        w.stop();
        p.stop().await;
        return fail(format!("receive failed: {e}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rtt_ms = p.rtt_ms();
    let target_ms = c.rtt_ms as f64 + 20.0;
    if c.pages_per_s > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let opts = MigrateOptions {
        budget: Duration::from_millis(target_ms as u64),
        max_rounds: s.max_rounds,
        max_time: s.max_time,
        freeze: w.hook(),
        postcopy: true,
        ..MigrateOptions::new("b")
    };
    let t0 = Instant::now();
    let mut est = EstLog::default();
    let report = p.a.migrate("m", opts, |pr| est.observe(pr)).await;
    let frozen_at = *w.frozen_at.lock().unwrap();
    // The writer stays paused from the freeze on: A's memory is the state at the freeze.
    let writes = w.stop();
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            p.stop().await;
            let _ = app.await;
            return fail(format!("migration failed: {e}"));
        }
    };
    let app = match app.await.unwrap() {
        Ok(a) => a,
        Err(e) => {
            p.stop().await;
            return fail(format!("receiving app failed: {e}"));
        }
    };
    let app_downtime_ms = frozen_at.map_or(f64::NAN, |f| (app.owner_at - f).as_secs_f64() * 1e3);
    let app_total_ms = (app.received_at - t0).as_secs_f64() * 1e3;
    let (diff, r) = {
        let (m, verify) = (published.clone(), s.verify);
        tokio::task::spawn_blocking(move || {
            let d = if verify {
                mem_diff(&m, &app.r, size)
            } else {
                0
            };
            (d, app.r)
        })
        .await
        .unwrap()
    };
    tokio::task::spawn_blocking(move || drop(r)).await.unwrap();
    drop(published);
    p.stop().await;
    let ideal_ms = size as f64 / link_bps * 1e3;
    let ratio = report.total_ms / ideal_ms;
    println!(
        "{:>4}ms {:>8} | {:>7.2} {:>9.1} {:>7.0} | {:>8.1} {:>6.0} {:>4} {:>13} | {:>8.0} {:>7.2} {:>4} | {:>7.3} {:>6} {:>8} {:>6} {:>8.1} {:>7.1} | {:>9} {:>7}{}",
        c.rtt_ms,
        c.pages_per_s,
        rtt_ms,
        link_bps / 1e6,
        ideal_ms,
        app_downtime_ms,
        target_ms,
        yes(app_downtime_ms <= target_ms),
        match report.downtime_error_ms {
            Some(e) => format!("{:.1}±{e:.1}", report.downtime_ms),
            None => format!("{:.1} est", report.downtime_ms),
        },
        report.total_ms,
        ratio,
        total_met(c, ratio),
        report.bytes_sent as f64 / size as f64,
        report.rounds,
        report.deferred_chunks,
        report.postcopy_faults,
        app.touch_ms,
        app.slowest_touch_ms,
        format!("{:.0}/{:.0}", est.median() / 1e6, report.bandwidth_bps / 1e6),
        writes,
        if diff == 0 {
            String::new()
        } else {
            format!("  B != A in {diff} pages: COPY WRONG")
        }
    );
    serde_json::json!({
        "mode": "memory",
        "rtt_ms": c.rtt_ms, "pages_per_s": c.pages_per_s, "path_rtt_ms": rtt_ms,
        "link_bps": link_bps, "ideal_ms": ideal_ms, "downtime_ms": report.downtime_ms,
        "downtime_error_ms": report.downtime_error_ms,
        "downtime_target_ms": target_ms, "app_downtime_ms": app_downtime_ms,
        "total_ms": report.total_ms, "app_total_ms": app_total_ms,
        "precopy_ms": report.precopy_ms, "postcopy_ms": report.postcopy_ms,
        "total_x_ideal": ratio,
        "bytes_per_size": report.bytes_sent as f64 / size as f64,
        "rounds": report.rounds, "deferred_chunks": report.deferred_chunks,
        "postcopy_faults": report.postcopy_faults, "app_touched_pages": app.touched,
        "app_touch_ms": app.touch_ms, "app_slowest_touch_ms": app.slowest_touch_ms,
        "writes": writes, "outcome": report.outcome,
        "engine_bandwidth_bps": report.bandwidth_bps, "engine_rtt_ms": report.rtt_ms,
        "precopy_bandwidth_est_median_bps": est.median(),
        "precopy_bandwidth_est_last_bps": est.last(),
        "expected_downtime_ms_at_switch": est.expected_downtime_ms,
        "dirty_tracking": report.dirty_tracking,
        "copy_ok": s.verify.then_some(diff == 0), "differing_pages": diff,
    })
}

async fn run() {
    let size = pagewire::agent::config::parse_size(&env_str("PAGEWIRE_BENCH_SIZE", "1GiB"))
        .expect("PAGEWIRE_BENCH_SIZE");
    let size = size / PAGE * PAGE;
    let modes: Vec<Mode> = match env_str("PAGEWIRE_BENCH_MODE", DEFAULT_MODE).as_str() {
        "memory" => vec![Mode::Memory],
        "file" => vec![Mode::File],
        "both" => vec![Mode::Memory, Mode::File],
        o => panic!("PAGEWIRE_BENCH_MODE: {o:?} (memory, file, both)"),
    };
    let cases: Vec<Case> = env_str(
        "PAGEWIRE_BENCH_CASES",
        "0:0,0:10000,0:100000,50:0,50:10000,50:100000",
    )
    .split(',')
    .map(|c| {
        let (r, w) = c
            .split_once(':')
            .expect("PAGEWIRE_BENCH_CASES: RTT_MS:PAGES_PER_S,...");
        Case {
            rtt_ms: r.trim().parse().expect("RTT_MS"),
            pages_per_s: w.trim().parse().expect("PAGES_PER_S"),
        }
    })
    .collect();
    let rate = pagewire::wan::parse_rate(&env_str("PAGEWIRE_BENCH_RATE", "400mbit")).unwrap();
    let chunk = pagewire::agent::config::parse_size(&env_str("PAGEWIRE_BENCH_CHUNK", "4KiB"))
        .unwrap() as u32;
    let base_chunk = pagewire::agent::config::parse_size(&env_str(
        "PAGEWIRE_BENCH_BASE_CHUNK",
        "64KiB",
    ))
    .unwrap() as u32;
    let max_time =
        pagewire::agent::config::parse_duration(&env_str("PAGEWIRE_BENCH_MAX_TIME", "30s"))
            .unwrap();
    let max_rounds: u32 = env_str("PAGEWIRE_BENCH_MAX_ROUNDS", "30").parse().unwrap();
    let verify = env_str("PAGEWIRE_BENCH_VERIFY", "1") != "0";
    let tracker = TrackerKind::parse(&env_str("PAGEWIRE_BENCH_TRACKER", "auto")).unwrap();
    let touch: usize = env_str("PAGEWIRE_BENCH_TOUCH", "256").parse().unwrap();
    let env = Env::new();
    // File a + B's file + the baseline's pulled copy (memory mode: A's and B's memfds
    // instead of the file mode's B file, in RAM too).
    let need = 3 * size + (64 << 20);
    if free_bytes(env.data.path()) < need {
        eprintln!(
            "not enough space in {}: need {} MiB; lower PAGEWIRE_BENCH_SIZE",
            env.data.path().display(),
            need >> 20
        );
        drop(env);
        std::process::exit(2);
    }
    let data_dir = env.data.path().to_path_buf();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let mut int =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).unwrap();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = std::fs::remove_dir_all(&data_dir);
        eprintln!("interrupted: removed {}", data_dir.display());
        std::process::exit(130);
    });
    let setup = Setup {
        size,
        chunk,
        base_chunk,
        rate,
        max_time,
        max_rounds,
        verify,
        tracker,
        touch,
        a_file: env.data.path().join("a"),
        b_file: env.data.path().join("b"),
        scratch: env.data.path().join("pulled"),
    };
    println!(
        "pagewire migration bench: {} MiB region, chunk {} KiB, writer of random 4 KiB pages, \
         freeze = hook pausing the writer; 50 ms = two relays 25 ms each way at {} Mbit/s; \
         pre-copy limits {} rounds / {:?}; modes {:?}",
        size >> 20,
        chunk >> 10,
        rate / 1_000_000,
        max_rounds,
        max_time,
        modes
    );
    make_random(&setup.a_file, size);
    let mut rows = Vec::new();
    let mut n = 0;
    for mode in modes {
        match mode {
            Mode::Memory => {
                println!(
                    "\nmemory + post-copy: published memfd (tracker {}) written through its \
                     pointer -> receiving app on B (runs at the handover, touches the {} pages \
                     written last + {} random pages)",
                    tracker.name(),
                    LAST_PAGES,
                    touch
                );
                println!(
                    "{:>6} {:>8} | {:>7} {:>9} {:>7} | {:>8} {:>6} {:>4} {:>13} | {:>8} {:>7} {:>4} | {:>7} {:>6} {:>8} {:>6} {:>8} {:>7} | {:>9} {:>7}",
                    "RTT", "pages/s", "rtt ms", "link MB/s", "ideal", "app dt", "target", "met",
                    "engine", "total ms", "x ideal", "met", "sent/sz", "rounds", "deferred",
                    "faults", "touch ms", "slowest", "est MB/s", "writes"
                );
            }
            Mode::File => {
                println!(
                    "\nfile (pwrite into a file region on /dev/shm, chunk rehash, no post-copy)"
                );
                println!(
                    "{:>6} {:>8} | {:>7} {:>9} {:>9} | {:>10} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>10} {:>6} {:>9} {:>7}",
                    "RTT", "pages/s", "rtt ms", "link MB/s", "ideal ms", "downtime", "target", "met",
                    "total ms", "x ideal", "met", "bytes/size", "rounds", "est MB/s", "writes"
                );
            }
        }
        for c in &cases {
            n += 1;
            let row = match mode {
                Mode::File => file_case(&env, &setup, c).await,
                Mode::Memory => memory_case(&env, &setup, c, n).await,
            };
            rows.push(row);
        }
    }
    println!(
        "\nideal = size / link rate measured by a pull of the same bytes on the same path just \
         before; target downtime = RTT + 20 ms; total target (writer idle) <= 1.3x ideal; \
         app dt = freeze hook entered -> receiving app released from wait_owner (the \
         downtime: memory mode's downtime \"met\" is judged on it); engine = the report's \
         downtime_ms: B's resume stamp placed on A's clock, ± the bound of that placement \
         (half a clock sample's RTT), or \"est\" when placed from A's frame stamps; est = the \
         engine's bandwidth estimate in MB/s: median over pre-copy progress events / the \
         report's bandwidth_bps (bytes/s) at the end"
    );
    println!(
        "\nBENCH_JSON {}",
        serde_json::json!({"size": size, "chunk": chunk, "rate_bps_50ms": rate, "cases": rows})
    );
}
