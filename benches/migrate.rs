//! Migration benchmark (issue 5): downtime and total time of `Agent::migrate` of a file
//! region under a writer dirtying random 4 KiB pages at 0, 10k and 100k pages/s, at 0 ms
//! RTT (loopback, direct) and 50 ms RTT (two WAN relays, 25 ms each way, rate-limited),
//! with bytes sent / region size and pre-copy rounds. Baselines measured in the same run,
//! just before each migration: the path RTT (the agents' smoothed RTT) and the link rate
//! (a `pull` of the same region A -> B by a pair of agents on an identical path).
//!
//! Targets (issue 5): downtime <= 1 RTT + 20 ms; total time <= 1.3 x size / link rate when
//! the writer is idle. The driver measured here sends everything still dirty after the
//! freeze (no post-copy), so heavy writers are expected to miss the downtime target.
//!
//! `cargo bench --bench migrate`. Environment:
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
//! - PAGEWIRE_BENCH_VERIFY=0 skips the check that B's file equals A's after the freeze.
//!
//! Layout: agent A (source, with the writer thread) on the main 1-worker runtime, agent B
//! on its own 1-worker runtime, relays on a third; the writer is a plain thread. All share
//! 2 vCPUs, so the writer at 100k pages/s competes with the agents for CPU.
//! Prints a table and one `BENCH_JSON {...}` line.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagewire::agent::{Agent, AgentConfig, Freeze, MigrateOptions, PeerSpec};
use pagewire::transport::Link;
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::{Rng, RngCore, SeedableRng};

const PAGE: u64 = 4096;

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

/// Dirties random 4 KiB pages of a file with `pwrite` at `rate` pages/s (paced against
/// the clock, in bursts of at most 1 ms worth). The freeze hook pauses it at a safe point
/// (between two writes).
struct Writer {
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(path: &Path, size: u64, rate: u64, seed: u64) -> Writer {
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let quit = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let (p, pd, q, w) = (pause.clone(), paused.clone(), quit.clone(), writes.clone());
        let pages = size / PAGE;
        let thread = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut b = vec![0u8; PAGE as usize];
            let t0 = Instant::now();
            let mut done = 0u64;
            while !q.load(Ordering::SeqCst) {
                if p.load(Ordering::SeqCst) {
                    pd.store(true, Ordering::SeqCst);
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
                    f.write_all_at(&b, off).unwrap();
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
            thread: Some(thread),
        }
    }

    fn hook(&self) -> Freeze {
        let (p, pd) = (self.pause.clone(), self.paused.clone());
        Freeze::Hook(Arc::new(move |freeze: bool| {
            if freeze {
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

async fn pair(
    env: &Env,
    a_file: &Path,
    b_file: &Path,
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
    ca.regions.push(("r".into(), a_file.to_path_buf()));
    ca.chunk_size = chunk;
    let mut cb = env.config("b", pb, "a", to_a);
    cb.regions.push(("r".into(), b_file.to_path_buf()));
    cb.chunk_size = chunk;
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
    runtime("source").block_on(run());
}

async fn run() {
    let size = pagewire::agent::config::parse_size(&env_str("PAGEWIRE_BENCH_SIZE", "1GiB"))
        .expect("PAGEWIRE_BENCH_SIZE");
    let size = size / PAGE * PAGE;
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
    let env = Env::new();
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
    println!(
        "pagewire migration bench: {} MiB file region on /dev/shm, chunk {} KiB, writer of random \
         4 KiB pages (pwrite), freeze = hook pausing the writer; 50 ms = two relays 25 ms each \
         way at {} Mbit/s; pre-copy limits {} rounds / {:?}",
        size >> 20,
        chunk >> 10,
        rate / 1_000_000,
        max_rounds,
        max_time
    );
    let a_file: PathBuf = env.data.path().join("a");
    let b_file: PathBuf = env.data.path().join("b");
    let scratch: PathBuf = env.data.path().join("pulled");
    make_random(&a_file, size);
    let mut rows = Vec::new();
    println!(
        "\n{:>6} {:>8} | {:>7} {:>9} {:>9} | {:>10} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>10} {:>6} {:>7}",
        "RTT", "pages/s", "rtt ms", "link MB/s", "ideal ms", "downtime", "target", "met",
        "total ms", "x ideal", "met", "bytes/size", "rounds", "writes"
    );
    for c in &cases {
        // B's copy starts empty (a sparse file of the region's size) in every case.
        let _ = std::fs::remove_file(&b_file);
        std::fs::File::create(&b_file)
            .unwrap()
            .set_len(size)
            .unwrap();
        let link = (c.rtt_ms > 0).then(|| {
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
        });
        // Baseline on an identical path (fresh relays with the same parameters): a pull
        // of the same region A -> B by agents with the default 64 KiB chunks (a pull at
        // 4 KiB chunks is CPU-bound here, ~40 MB/s, and would flatter the migration).
        let base = pair(&env, &a_file, &b_file, base_chunk, link.clone()).await;
        let t0 = Instant::now();
        let h = base.b.pull("a", "r", &scratch).await.unwrap();
        h.wait().await.unwrap();
        let pull_s = t0.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&scratch);
        let link_bps = size as f64 / pull_s;
        base.stop().await;
        let p = pair(&env, &a_file, &b_file, chunk, link).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rtt_ms = p.rtt_ms();
        let target_ms = c.rtt_ms as f64 + 20.0;
        let w = Writer::start(&a_file, size, c.pages_per_s, 7 + c.pages_per_s);
        if c.pages_per_s > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let opts = MigrateOptions {
            budget: Duration::from_millis(target_ms as u64),
            max_rounds,
            max_time,
            freeze: w.hook(),
            ..MigrateOptions::new("b")
        };
        let report = p.a.migrate("r", opts, |_| {}).await;
        let writes = w.stop();
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                println!(
                    "{:>4}ms {:>8} | migration failed: {e}",
                    c.rtt_ms, c.pages_per_s
                );
                rows.push(serde_json::json!({"rtt_ms": c.rtt_ms, "pages_per_s": c.pages_per_s, "error": e.to_string()}));
                p.stop().await;
                continue;
            }
        };
        let same = !verify || file_hash(&a_file) == file_hash(&b_file);
        p.stop().await;
        let ideal_ms = size as f64 / link_bps * 1e3;
        let ratio = report.total_ms / ideal_ms;
        let dt_met = report.downtime_ms <= target_ms;
        let total_met = if c.pages_per_s == 0 {
            if ratio <= 1.3 {
                "yes"
            } else {
                "NO"
            }
        } else {
            "-"
        };
        println!(
            "{:>4}ms {:>8} | {:>7.2} {:>9.1} {:>9.0} | {:>10.1} {:>9.0} {:>6} | {:>9.0} {:>9.2} {:>6} | {:>10.3} {:>6} {:>7}{}",
            c.rtt_ms,
            c.pages_per_s,
            rtt_ms,
            link_bps / 1e6,
            ideal_ms,
            report.downtime_ms,
            target_ms,
            if dt_met { "yes" } else { "NO" },
            report.total_ms,
            ratio,
            total_met,
            report.bytes_sent as f64 / size as f64,
            report.rounds,
            writes,
            if same { "" } else { "  B != A: COPY WRONG" }
        );
        rows.push(serde_json::json!({
            "rtt_ms": c.rtt_ms, "pages_per_s": c.pages_per_s, "path_rtt_ms": rtt_ms,
            "link_bps": link_bps, "ideal_ms": ideal_ms, "downtime_ms": report.downtime_ms,
            "downtime_target_ms": target_ms, "total_ms": report.total_ms,
            "precopy_ms": report.precopy_ms, "total_x_ideal": ratio,
            "bytes_per_size": report.bytes_sent as f64 / size as f64,
            "rounds": report.rounds, "writes": writes, "outcome": report.outcome,
            "engine_bandwidth_bps": report.bandwidth_bps, "engine_rtt_ms": report.rtt_ms,
            "copy_ok": same,
        }));
    }
    println!(
        "\nideal = size / link rate measured by a pull of the same region on the same path just \
         before; target downtime = RTT + 20 ms; total target (writer idle) <= 1.3x ideal"
    );
    println!(
        "\nBENCH_JSON {}",
        serde_json::json!({"size": size, "chunk": chunk, "rate_bps_50ms": rate, "cases": rows})
    );
}
