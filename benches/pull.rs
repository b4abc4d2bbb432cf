//! Step-1 benchmarks, each next to a baseline measured in the same run:
//!
//! 1. raw quinn single-stream throughput (same TLS and transport settings) vs a pagewire
//!    pull of a random region;
//! 2. a pull of a region that is 90% zero chunks (sparse, and written zeros) vs the random one;
//! 3. urgent-fetch latency (p50/p99) on an idle connection vs during a saturating bulk
//!    pull, with the bounded bulk window (default) and with an effectively unbounded one;
//! 4. a chunk-size sweep (throughput and idle fetch latency) behind the 64 KiB default.
//!
//! `cargo bench --bench pull` (PAGEWIRE_BENCH_MB sets the region size, default 1024;
//! PAGEWIRE_BENCH_ONLY=throughput or urgent runs one part, =pull or =raw only pulls or raw streams (for profiling); PAGEWIRE_BENCH_GAIN=PERCENT sets
//! the gain of the automatic window in benchmark 3's default-window row).
//! Prints a table and one JSON line (`BENCH_JSON {...}`) for scripts.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pagewire::agent::{Agent, AgentConfig, PeerSpec};
use pagewire::engine::pull::Window;
use pagewire::transport::{endpoint, Identity, Tuning};
use rand::{Rng, RngCore, SeedableRng};

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

    fn id(&self, n: &str) -> Identity {
        let d = self.certs.path();
        Identity::load(
            n,
            &d.join("ca.pem"),
            &d.join(format!("{n}.pem")),
            &d.join(format!("{n}.key")),
        )
        .unwrap()
    }

    fn config(&self, n: &str, port: u16, peer: &str, peer_port: u16) -> AgentConfig {
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
            addr: format!("127.0.0.1:{peer_port}"),
        }];
        c
    }
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

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a region: every chunk random, or only every 10th (`zero` = the others are holes
/// or written zeros).
#[derive(Clone, Copy)]
enum Fill {
    Random,
    SparseTenth,
    ZeroTenth,
}

fn make_region(path: &Path, size: u64, chunk: u64, fill: Fill) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut buf = vec![0u8; chunk as usize];
    let zero = vec![0u8; chunk as usize];
    for c in 0..size / chunk {
        let data = match fill {
            Fill::Random => true,
            Fill::SparseTenth | Fill::ZeroTenth => c % 10 == 0,
        };
        if data {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, c * chunk).unwrap();
        } else if let Fill::ZeroTenth = fill {
            f.write_all_at(&zero, c * chunk).unwrap();
        }
    }
}

/// Raw quinn: one connection, one stream, `bytes` sent in 64 KiB writes.
/// The serving side (raw quinn server, agent b) runs on its own 2-thread runtime, as it
/// would in its own process; the receiving side on the main one.
fn server_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers())
            .thread_name("serving-side")
            .enable_all()
            .build()
            .unwrap()
    })
}

async fn raw_quinn(env: &Env, bytes: u64) -> f64 {
    let tuning = Tuning::default();
    let (sid, st) = (env.id("b"), tuning.clone());
    let server = server_rt()
        .spawn(async move { endpoint("127.0.0.1:0".parse().unwrap(), &sid, &st).unwrap() })
        .await
        .unwrap();
    let client = endpoint("127.0.0.1:0".parse().unwrap(), &env.id("a"), &tuning).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let srv = server_rt().spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        // Agents allow no uni streams; a bi stream becomes visible to the peer with its
        // first byte.
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let mut buf = vec![0u8; 64 << 10];
        rand::thread_rng().fill_bytes(&mut buf);
        let mut sent = 0;
        while sent < bytes {
            send.write_all(&buf).await.unwrap();
            sent += buf.len() as u64;
        }
        send.finish().unwrap();
        conn.closed().await;
    });
    // The client loop runs on a worker of the receiving runtime, like the agents' tasks
    // (not on the thread that blocks on main, which would give the baseline a third thread).
    let rate = tokio::spawn(async move {
        let conn = client.connect(addr, "b").unwrap().await.unwrap();
        let (_s, mut recv) = conn.accept_bi().await.unwrap();
        let t0 = Instant::now();
        let mut got = 0u64;
        while let Some(c) = recv.read_chunk(1 << 20, true).await.unwrap() {
            got += c.bytes.len() as u64;
        }
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(got, bytes);
        conn.close(0u32.into(), b"");
        got as f64 / secs
    })
    .await
    .unwrap();
    let _ = srv.await;
    rate
}

struct Pair {
    a: Agent,
    b: Agent,
}

async fn pair(env: &Env, regions: &[(&str, &Path)], chunk: u32, window: Window) -> Pair {
    let (pa, pb) = (free_port(), free_port());
    let mut cb = env.config("b", pb, "a", pa);
    cb.chunk_size = chunk;
    for (n, p) in regions {
        cb.regions.push((n.to_string(), p.to_path_buf()));
    }
    let mut ca = env.config("a", pa, "b", pb);
    ca.bulk_window = window;
    let b = server_rt().spawn(Agent::start(cb)).await.unwrap().unwrap();
    let a = Agent::start(ca).await.unwrap();
    assert!(a.wait_connected("b", Duration::from_secs(10)).await);
    Pair { a, b }
}

impl Pair {
    async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

async fn pull_secs(p: &Pair, region: &str, to: &Path) -> f64 {
    let t0 = Instant::now();
    let h = p.a.pull("b", region, to).await.unwrap();
    let s = h.wait().await.unwrap();
    assert_eq!(s.duplicate_chunks, 0);
    t0.elapsed().as_secs_f64()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Latencies (µs) of standalone urgent fetches of random chunks of `region`, one every
/// `gap`, until `stop` says so or `n` are done.
async fn fetch_latencies(
    a: &Agent,
    region: &str,
    chunks: u64,
    n: usize,
    gap: Duration,
    stop: impl Fn() -> bool,
) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut out = Vec::new();
    while out.len() < n && !stop() {
        let c = rng.gen_range(0..chunks);
        let t0 = Instant::now();
        a.fetch("b", region, c).await.unwrap();
        out.push(t0.elapsed().as_secs_f64() * 1e6);
        tokio::time::sleep(gap).await;
    }
    out
}

/// Benchmark 3a: urgent fetches of random chunks of "random" on the idle connection; the
/// pair is stopped after.
async fn idle_latencies(p: Pair, chunks: u64) -> Vec<f64> {
    let idle = fetch_latencies(
        &p.a,
        "random",
        chunks,
        300,
        Duration::from_millis(1),
        || false,
    )
    .await;
    p.stop().await;
    idle
}

/// Benchmark 3b's first row: urgent fetches during a saturating pull, default window.
/// The agents' default window; PAGEWIRE_BENCH_GAIN=PERCENT sets an automatic window's gain,
/// PAGEWIRE_BENCH_FLOOR=SIZE its floor.
async fn default_window_latency(env: &Env, random: &Path, size: u64) -> (Vec<f64>, f64) {
    let mut window = pagewire::agent::config::DEFAULT_BULK_WINDOW;
    if let Window::Auto { min, max, gain_pct } = window {
        let gain_pct =
            std::env::var("PAGEWIRE_BENCH_GAIN").map_or(gain_pct, |g| g.parse().unwrap());
        let min = std::env::var("PAGEWIRE_BENCH_FLOOR")
            .map_or(min, |f| pagewire::wan::parse_bytes(&f).unwrap() as u64);
        window = Window::Auto { min, max, gain_pct };
    }
    println!("default window: {window:?}");
    loaded_latency(env, random, size, window).await
}

async fn loaded_latency(env: &Env, random: &Path, size: u64, window: Window) -> (Vec<f64>, f64) {
    let p = pair(env, &[("random", random)], 64 << 10, window).await;
    let to = env.data.path().join("loaded.out");
    let h = p.a.pull("b", "random", &to).await.unwrap();
    // Let the bulk stream fill its window first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let done = || h.status().bytes_done >= size;
    let lat = fetch_latencies(
        &p.a,
        "random",
        size / (64 << 10),
        100_000,
        Duration::from_millis(2),
        done,
    )
    .await;
    let secs = h.status().elapsed_s;
    h.wait().await.unwrap();
    let _ = std::fs::remove_file(&to);
    p.stop().await;
    (lat, size as f64 / secs)
}

/// Runs `f` and returns its result with the process CPU seconds it took.
async fn with_cpu<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let c0 = pagewire::demo::process_cpu_secs();
    let v = f.await;
    (v, pagewire::demo::process_cpu_secs() - c0)
}

/// Seconds per GiB of the per-byte work a pull does that the raw stream does not, each
/// on one thread over `bytes` of 64 KiB chunks: blake3 (the sender hashes, the receiver
/// verifies), `pread` from a tmpfs file (the sender) and `pwrite` into new pages of a
/// fresh tmpfs file (the receiver).
fn extra_work(src: &Path, dir: &Path, bytes: u64) -> (f64, f64, f64) {
    let chunk = 64usize << 10;
    let n = (bytes / chunk as u64).max(1);
    let per_gib =
        |t: Instant| t.elapsed().as_secs_f64() * (1u64 << 30) as f64 / (n * chunk as u64) as f64;
    let f = std::fs::File::open(src).unwrap();
    let mut buf = vec![0u8; chunk];
    let t = Instant::now();
    for i in 0..n {
        f.read_exact_at(&mut buf, i * chunk as u64).unwrap();
    }
    let pread = per_gib(t);
    let t = Instant::now();
    let mut x = 0u8;
    for _ in 0..n {
        x ^= blake3::hash(&buf).as_bytes()[0];
    }
    std::hint::black_box(x);
    let hash = per_gib(t);
    let out = dir.join("extra-work");
    let w = std::fs::File::create(&out).unwrap();
    let t = Instant::now();
    for i in 0..n {
        w.write_all_at(&buf, i * chunk as u64).unwrap();
    }
    let pwrite = per_gib(t);
    drop(w);
    let _ = std::fs::remove_file(&out);
    (hash, pread, pwrite)
}

fn mbps(bps: f64) -> String {
    format!("{:8.1} MB/s", bps / 1e6)
}

/// Worker threads per side (PAGEWIRE_BENCH_WORKERS, default 1: one core each, like two
/// hosts on this 2-core machine).
fn workers() -> usize {
    std::env::var("PAGEWIRE_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers())
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let mb: u64 = std::env::var("PAGEWIRE_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mb << 20;
    let env = Env::new();
    // Peak use of the data dir: three source regions, a destination, the warm-up file
    // (3x) and the sweep region: about 8x the region size. Refuse rather than fill tmpfs
    // (a full /dev/shm leaves the machine without memory).
    let need = 8 * size;
    let free = free_bytes(env.data.path());
    if free < need {
        eprintln!(
            "not enough space in {}: need {} MiB, {} MiB free; lower PAGEWIRE_BENCH_MB",
            env.data.path().display(),
            need >> 20,
            free >> 20
        );
        drop(env);
        std::process::exit(2);
    }
    // Interrupted runs must not leave gigabytes in tmpfs: remove the data dir and exit.
    // The handlers are installed here, before any work, not inside the task.
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
    let chunk = 64u64 << 10;
    println!("pagewire step-1 benchmarks, region {mb} MiB, loopback; serving and receiving sides each on its own {}-worker runtime", workers());
    let random = env.data.path().join("random");
    let sparse = env.data.path().join("sparse");
    let zeros = env.data.path().join("zeros");
    make_region(&random, size, chunk, Fill::Random);
    make_region(&sparse, size, chunk, Fill::SparseTenth);
    make_region(&zeros, size, chunk, Fill::ZeroTenth);
    // Touch (and free) 3x the region size of RAM once. On a freshly booted VM the first
    // touch of a guest page costs ~1.7 µs in the hypervisor (shared/ANCHORS.md); without
    // this, whichever run first writes a destination file pays ~0.45 s/GiB that a
    // long-running host never pays and the raw baseline (one reused buffer) never pays.
    {
        let warm = env.data.path().join("warm");
        let f = std::fs::File::create(&warm).unwrap();
        let block = vec![1u8; 1 << 20];
        for i in 0..((3 * size) >> 20) {
            f.write_all_at(&block, i << 20).unwrap();
        }
        drop(f);
        std::fs::remove_file(&warm).unwrap();
    }

    // 1. throughput: raw and pull alternate three times; medians are compared, because
    // this machine is noisy and the first run of anything is often slow.
    // PAGEWIRE_BENCH_WINDOW=SIZE pulls with a fixed window instead of the default.
    let window = std::env::var("PAGEWIRE_BENCH_WINDOW")
        .ok()
        .and_then(|w| pagewire::agent::config::parse_size(&w).ok())
        .map(Window::Fixed)
        .unwrap_or(match pagewire::engine::pull::AUTO_WINDOW {
            // PAGEWIRE_BENCH_FLOOR=SIZE: the automatic window with another floor.
            Window::Auto { min, max, gain_pct } => Window::Auto {
                min: std::env::var("PAGEWIRE_BENCH_FLOOR")
                    .map_or(min, |f| pagewire::wan::parse_bytes(&f).unwrap() as u64),
                max,
                gain_pct,
            },
            w => w,
        });
    println!("pull window: {window:?}");
    let p = pair(
        &env,
        &[("random", &random), ("sparse", &sparse), ("zeros", &zeros)],
        chunk as u32,
        window,
    )
    .await;
    let out: PathBuf = env.data.path().join("out");
    // PAGEWIRE_BENCH_ONLY=urgent: only benchmark 3's idle and auto-window rows.
    if std::env::var("PAGEWIRE_BENCH_ONLY").as_deref() == Ok("urgent") {
        let mut idle = idle_latencies(p, size / chunk).await;
        let (mut loaded, loaded_bps) = default_window_latency(&env, &random, size).await;
        let (idle_p50, idle_p99) = (pct(&mut idle, 0.5), pct(&mut idle, 0.99));
        let target = 2.0 * idle_p50 + 1000.0;
        println!("\n3. urgent fetch of one 64 KiB chunk (µs) (PAGEWIRE_BENCH_ONLY=urgent)");
        println!(
            "   idle connection          p50 {:8.0}  p99 {:8.0}  (n={})",
            idle_p50,
            idle_p99,
            idle.len()
        );
        let (l50, l99) = (pct(&mut loaded, 0.5), pct(&mut loaded, 0.99));
        println!(
            "   during pull, auto window  p50 {:8.0}  p99 {:8.0}  (n={}, bulk {})  target p99 <= {:.0}: {}",
            l50,
            l99,
            loaded.len(),
            mbps(loaded_bps),
            target,
            if l99 <= target { "met" } else { "NOT met" }
        );
        let json = serde_json::json!({
            "region_mib": mb,
            "idle_fetch_p50_us": idle_p50,
            "idle_fetch_p99_us": idle_p99,
            "loaded_fetch_p50_us": l50,
            "loaded_fetch_p99_us": l99,
            "loaded_bulk_bps": loaded_bps,
        });
        println!("\nBENCH_JSON {json}");
        return;
    }
    // PAGEWIRE_BENCH_ONLY=pull or raw: three pulls or raw streams, nothing else (for
    // profiling one of them).
    let only = std::env::var("PAGEWIRE_BENCH_ONLY");
    if matches!(only.as_deref(), Ok("pull") | Ok("raw")) {
        for _ in 0..3 {
            let (bps, cpu) = if only.as_deref() == Ok("raw") {
                with_cpu(raw_quinn(&env, size)).await
            } else {
                let (secs, cpu) = with_cpu(pull_secs(&p, "random", &out)).await;
                let _ = std::fs::remove_file(&out);
                (size as f64 / secs, cpu)
            };
            println!(
                "{} {}  {:.2} core-s/GiB",
                only.as_deref().unwrap_or(""),
                mbps(bps),
                cpu * (1u64 << 30) as f64 / size as f64
            );
        }
        return;
    }
    let (mut raws, mut pulls) = (Vec::new(), Vec::new());
    // CPU seconds per GiB moved and cores busy (CPU time / wall time), per run.
    let (mut raw_cpu, mut pull_cpu) = (Vec::new(), Vec::new());
    let gib = size as f64 / (1u64 << 30) as f64;
    for _ in 0..3 {
        let (bps, cpu) = with_cpu(raw_quinn(&env, size)).await;
        raws.push(bps);
        raw_cpu.push((cpu / gib, cpu * bps / size as f64));
        let (secs, cpu) = with_cpu(pull_secs(&p, "random", &out)).await;
        pulls.push(size as f64 / secs);
        pull_cpu.push((cpu / gib, cpu / secs));
        let _ = std::fs::remove_file(&out);
    }
    let raw = pct(&mut raws, 0.5);
    let pull_bps = pct(&mut pulls, 0.5);
    let median = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        pct(&mut x, 0.5)
    };
    let (raw_cpu_gib, raw_cores) = (median(&raw_cpu, |c| c.0), median(&raw_cpu, |c| c.1));
    let (pull_cpu_gib, pull_cores) = (median(&pull_cpu, |c| c.0), median(&pull_cpu, |c| c.1));
    let (hash_s, pread_s, pwrite_s) = extra_work(&random, env.data.path(), size.min(256 << 20));
    let t_random = size as f64 / pull_bps;
    let t_sparse = pull_secs(&p, "sparse", &out).await;
    let _ = std::fs::remove_file(&out);
    let t_zeros = pull_secs(&p, "zeros", &out).await;
    let _ = std::fs::remove_file(&out);
    // 3a. idle latency
    let cpu_lines = || {
        println!(
            "   CPU per GiB moved (whole process, median of 3): raw {:.2} core-s ({:.2} cores busy), pull {:.2} core-s ({:.2} cores busy): the pull costs {:.2}x the raw stream's CPU per byte",
            raw_cpu_gib, raw_cores, pull_cpu_gib, pull_cores, pull_cpu_gib / raw_cpu_gib
        );
        println!(
            "   per-byte work the raw stream does not do (one thread, s/GiB): blake3 {:.2} (sender hashes, receiver verifies), pread {:.2} (sender), pwrite into new tmpfs pages {:.2} (receiver)",
            hash_s, pread_s, pwrite_s
        );
        // At best the pull keeps every core busy: rate <= cores / (CPU per byte).
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(f64::NAN);
        println!(
            "   ceiling on this {cores}-CPU machine if the pull kept every core busy: {:.2}x raw (cores / pull CPU per byte, over the raw rate)",
            cores / raw_cores * raw_cpu_gib / pull_cpu_gib
        );
    };
    if std::env::var("PAGEWIRE_BENCH_ONLY").as_deref() == Ok("throughput") {
        println!(
            "raw {} pull {} ratio {:.2}x (PAGEWIRE_BENCH_ONLY=throughput)",
            mbps(raw),
            mbps(pull_bps),
            pull_bps / raw
        );
        cpu_lines();
        return;
    }
    let mut idle = idle_latencies(p, size / chunk).await;
    println!("\n1. throughput (1 stream; median of 3, runs alternate)");
    let runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.0}", x / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "   raw quinn stream        {}   (runs {} MB/s)",
        mbps(raw),
        runs(&raws)
    );
    println!(
        "   pagewire pull (random)  {}   (runs {} MB/s)  ratio {:.2}x  (target >= 0.9x)",
        mbps(pull_bps),
        runs(&pulls),
        pull_bps / raw
    );
    cpu_lines();
    println!("\n2. 90% zero chunks");
    println!("   random     {:7.3} s", t_random);
    println!(
        "   sparse     {:7.3} s   ratio {:.3}x of random (target <= 0.2x)",
        t_sparse,
        t_sparse / t_random
    );
    println!(
        "   zeros      {:7.3} s   ratio {:.3}x of random (zeros written, not holes)",
        t_zeros,
        t_zeros / t_random
    );

    // 3b. latency under a saturating pull, default window vs others (the "measure which
    // works" of issue 2: the credit window bounds what is queued ahead of an urgent reply)
    let (mut loaded, loaded_bps) = default_window_latency(&env, &random, size).await;
    let (mut unbounded, unb_bps) =
        loaded_latency(&env, &random, size, Window::Fixed(1 << 30)).await;
    let mut window_sweep = Vec::new();
    for w in [128u64 << 10, 256 << 10, 1 << 20, 8 << 20] {
        let (mut l, bps) = loaded_latency(&env, &random, size, Window::Fixed(w)).await;
        window_sweep.push((w, pct(&mut l, 0.5), pct(&mut l, 0.99), l.len(), bps));
    }
    let idle_p50 = pct(&mut idle, 0.5);
    let idle_p99 = pct(&mut idle, 0.99);
    let target = 2.0 * idle_p50 + 1000.0;
    println!("\n3. urgent fetch of one 64 KiB chunk (µs)");
    println!(
        "   idle connection          p50 {:8.0}  p99 {:8.0}  (n={})",
        idle_p50,
        idle_p99,
        idle.len()
    );
    println!(
        "   during pull, auto window  p50 {:8.0}  p99 {:8.0}  (n={}, bulk {})  target p99 <= {:.0}",
        pct(&mut loaded, 0.5),
        pct(&mut loaded, 0.99),
        loaded.len(),
        mbps(loaded_bps),
        target
    );
    println!(
        "   during pull, window 1GiB  p50 {:8.0}  p99 {:8.0}  (n={}, bulk {})  (unbounded: for comparison)",
        pct(&mut unbounded, 0.5),
        pct(&mut unbounded, 0.99),
        unbounded.len(),
        mbps(unb_bps)
    );

    for (w, p50, p99, n, bps) in &window_sweep {
        println!(
            "   during pull, window {:>4}KiB p50 {:8.0}  p99 {:8.0}  (n={}, bulk {})",
            w >> 10,
            p50,
            p99,
            n,
            mbps(*bps)
        );
    }

    // 4. chunk size sweep on a quarter of the region
    println!("\n4. chunk size sweep ({} MiB random region)", mb / 4);
    let small = env.data.path().join("small");
    make_region(&small, size / 4, 1 << 20, Fill::Random);
    let mut sweep = Vec::new();
    for cs in [16u32 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let p = pair(
            &env,
            &[("small", &small)],
            cs,
            pagewire::engine::pull::AUTO_WINDOW,
        )
        .await;
        let t = pull_secs(&p, "small", &out).await;
        let _ = std::fs::remove_file(&out);
        let mut l = fetch_latencies(
            &p.a,
            "small",
            (size / 4) / cs as u64,
            200,
            Duration::from_millis(1),
            || false,
        )
        .await;
        p.stop().await;
        let (l50, l99) = (pct(&mut l, 0.5), pct(&mut l, 0.99));
        println!(
            "   chunk {:>5} KiB  pull {}  idle fetch p50 {:6.0} µs  p99 {:6.0} µs",
            cs >> 10,
            mbps((size / 4) as f64 / t),
            l50,
            l99
        );
        sweep.push(serde_json::json!({"chunk": cs, "pull_bps": (size/4) as f64 / t, "fetch_p50_us": l50, "fetch_p99_us": l99}));
    }
    let json = serde_json::json!({
        "region_mib": mb,
        "raw_quinn_bps": raw,
        "pull_bps": pull_bps,
        "pull_vs_raw": pull_bps / raw,
        "raw_cpu_s_per_gib": raw_cpu_gib,
        "raw_cores_busy": raw_cores,
        "pull_cpu_s_per_gib": pull_cpu_gib,
        "pull_cores_busy": pull_cores,
        "blake3_s_per_gib": hash_s,
        "pread_s_per_gib": pread_s,
        "pwrite_new_pages_s_per_gib": pwrite_s,
        "random_s": t_random,
        "sparse_s": t_sparse,
        "zeros_s": t_zeros,
        "sparse_vs_random": t_sparse / t_random,
        "idle_fetch_p50_us": idle_p50,
        "idle_fetch_p99_us": idle_p99,
        "loaded_fetch_p50_us": pct(&mut loaded, 0.5),
        "loaded_fetch_p99_us": pct(&mut loaded, 0.99),
        "unbounded_fetch_p50_us": pct(&mut unbounded, 0.5),
        "unbounded_fetch_p99_us": pct(&mut unbounded, 0.99),
        "sweep": sweep,
        "window_sweep": window_sweep.iter().map(|(w, p50, p99, n, bps)| serde_json::json!({"window": w, "p50_us": p50, "p99_us": p99, "n": n, "bulk_bps": bps})).collect::<Vec<_>>(),
    });
    println!("\nBENCH_JSON {json}");
}
