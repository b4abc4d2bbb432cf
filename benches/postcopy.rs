//! Step-2 (post-copy) benchmarks of issue 3, each next to a baseline measured in the same
//! run (read the ratios; absolute times vary by ±30% on the 2-vCPU project VM):
//!
//! 1. first-touch latency of one page (p50/p99) of a lazily attached region while its
//!    background copy runs, on loopback and through the WAN relay (25 ms RTT), next to a
//!    raw quinn 64 KiB request/response and an urgent `Agent::fetch` on the idle path;
//! 2. sequential read throughput by the application of a lazily attached region, next to a
//!    raw quinn single-stream transfer of the same bytes over the same path;
//! 3. per-fault handling cost with the data already local (userfaultfd vs mprotect), next
//!    to the kernel's own first-touch cost and a raw userfaultfd handler thread.
//!
//! `cargo bench --bench postcopy`. Environment: PAGEWIRE_BENCH_MB (region size, default
//! 1024), PAGEWIRE_BENCH_WAN_MB (region for WAN first-touch sampling, default 256),
//! PAGEWIRE_BENCH_REPS (throughput runs, raw and lazy alternating, default 3),
//! PAGEWIRE_BENCH_WORKERS (worker threads per side, default 1), PAGEWIRE_BENCH_ONLY=touch
//! (benchmark 1 only) or =seq (benchmark 2 on loopback only), PAGEWIRE_BENCH_PAUSE (the
//! agents' `urgent_pause`, e.g. `0s` to measure without it). Regions live in /dev/shm
//! and are removed at the end (and on Ctrl-C/SIGTERM). Prints a table and one
//! `BENCH_JSON {...}` line.
//!
//! Layout: agent `b` (serving) and the raw quinn server run on one runtime, agent `a`
//! (where the application attaches, control socket) and the raw client on another, the WAN
//! relays on a third; the "application" is a plain thread of this process that touches
//! the mapping (never a runtime worker: a fault blocks the thread until the agent answers).

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagewire::agent::{Agent, AgentConfig, PeerSpec};
use pagewire::client::{attach, mount_status, AttachOptions};
use pagewire::fault::{self, uffd, Mechanism};
use pagewire::transport::{endpoint, Identity, Tuning};
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;
const CHUNK: u64 = 64 << 10;
/// One-way delay of the emulated WAN (RTT 25 ms).
const WAN_DELAY: Duration = Duration::from_micros(12_500);

// ---------------------------------------------------------------------------------------
// Environment: certificates, data dir, control sockets, runtimes.

struct Env {
    certs: tempfile::TempDir,
    data: tempfile::TempDir,
    ctl: tempfile::TempDir,
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
        Env {
            certs,
            data,
            ctl: tempfile::tempdir().unwrap(),
        }
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
        c.urgent_pause = urgent_pause();
        c
    }
}

/// The agents' `urgent_pause`: PAGEWIRE_BENCH_PAUSE, else the default.
fn urgent_pause() -> Duration {
    match std::env::var("PAGEWIRE_BENCH_PAUSE") {
        Ok(p) => pagewire::agent::config::parse_duration(&p)
            .unwrap_or_else(|e| panic!("PAGEWIRE_BENCH_PAUSE={p}: {e}")),
        Err(_) => pagewire::agent::config::DEFAULT_URGENT_PAUSE,
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

/// MemAvailable from /proc/meminfo (memfd mappings and /dev/shm both live in RAM).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib << 10)
        .unwrap_or(u64::MAX)
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Worker threads per side (PAGEWIRE_BENCH_WORKERS, default 1: one core each).
fn workers() -> usize {
    env_u64("PAGEWIRE_BENCH_WORKERS", 1).max(1) as usize
}

fn runtime(name: &str, threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// The serving side: agent `b` and the raw quinn server.
fn server_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| runtime("serving-side", workers()))
}

/// The emulated network: WAN relays.
fn relay_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| runtime("wan-relay", 1))
}

// ---------------------------------------------------------------------------------------
// Statistics and formatting.

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[derive(Clone, Copy)]
struct Lat {
    p50: f64,
    p99: f64,
    mean: f64,
    n: usize,
}

impl Lat {
    fn of(v: &[f64]) -> Lat {
        Lat {
            p50: pct(v, 0.5),
            p99: pct(v, 0.99),
            mean: mean(v),
            n: v.len(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"p50_us": self.p50, "p99_us": self.p99, "mean_us": self.mean, "n": self.n})
    }
}

fn mbps(bps: f64) -> String {
    format!("{:7.1} MB/s", bps / 1e6)
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}

// ---------------------------------------------------------------------------------------
// Region files.

/// A random region; returns its blake3.
fn make_random(path: &Path, size: u64, seed: u64) -> blake3::Hash {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
    h.finalize()
}

/// A region that is one hole except its last `tail` bytes (random data).
fn make_zero_head(path: &Path, size: u64, tail: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; tail as usize];
    rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut buf);
    f.write_all_at(&buf, size - tail).unwrap();
}

// ---------------------------------------------------------------------------------------
// WAN relays and agent pairs.

/// The kernel's count of UDP datagrams dropped for a full receive buffer (all sockets).
fn udp_rcvbuf_errors() -> u64 {
    let s = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = s.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(h), Some(v)) = (udp.next(), udp.next()) else {
        return 0;
    };
    h.split_whitespace()
        .zip(v.split_whitespace())
        .find(|(k, _)| *k == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Datagrams the relays dropped (queue full or loss model), and the kernel's UDP
/// receive-buffer drops, since `since`.
#[derive(Clone, Copy, Default)]
struct Drops {
    relay: u64,
    rcvbuf: u64,
}

impl Drops {
    fn now(relays: &[&Relay]) -> Drops {
        Drops {
            relay: relays
                .iter()
                .map(|r| {
                    let s = r.stats();
                    s.dropped_queue + s.dropped_loss
                })
                .sum(),
            rcvbuf: udp_rcvbuf_errors(),
        }
    }

    fn since(self, relays: &[&Relay]) -> Drops {
        let n = Drops::now(relays);
        Drops {
            relay: n.relay - self.relay,
            rcvbuf: n.rcvbuf - self.rcvbuf,
        }
    }

    fn add(&mut self, o: Drops) {
        self.relay += o.relay;
        self.rcvbuf += o.rcvbuf;
    }

    fn text(&self) -> String {
        format!(
            "{} relay drops, {} UDP rcvbuf drops",
            self.relay, self.rcvbuf
        )
    }
}

/// Both agents' counts of packets sent and declared lost, and congestion events, on
/// their connection to each other.
#[derive(Clone, Copy, Default)]
struct PathCounts {
    sent: u64,
    lost: u64,
    congestion: u64,
}

impl PathCounts {
    fn of(p: &Pair) -> PathCounts {
        let mut n = PathCounts::default();
        for s in [p.a.status(), p.b.status()] {
            for peer in s.peers {
                n.sent += peer.sent_packets.unwrap_or(0);
                n.lost += peer.lost_packets.unwrap_or(0);
                n.congestion += peer.congestion_events.unwrap_or(0);
            }
        }
        n
    }

    /// Counts since `o` (a reconnect restarts the counters: then the later ones).
    fn since(self, o: PathCounts) -> PathCounts {
        PathCounts {
            sent: self.sent.checked_sub(o.sent).unwrap_or(self.sent),
            lost: self.lost.checked_sub(o.lost).unwrap_or(self.lost),
            congestion: self
                .congestion
                .checked_sub(o.congestion)
                .unwrap_or(self.congestion),
        }
    }

    fn text(&self) -> String {
        format!(
            "{} of {} packets declared lost, {} congestion events",
            self.lost, self.sent, self.congestion
        )
    }
}

async fn start_relay(upstream: SocketAddr, params: LinkParams) -> Relay {
    let mut cfg = RelayConfig::symmetric("127.0.0.1:0".parse().unwrap(), upstream, params);
    cfg.seed = Some(1);
    relay_rt().spawn(Relay::start(cfg)).await.unwrap().unwrap()
}

async fn stop_relays(relays: Vec<Relay>) {
    for r in relays {
        relay_rt().spawn(r.shutdown()).await.unwrap();
    }
}

fn wan_params() -> LinkParams {
    LinkParams {
        delay: WAN_DELAY,
        ..LinkParams::default()
    }
}

/// Agent `b` serves `regions`; agent `a` has a control socket (where the application
/// attaches). With `link`, each agent reaches the other only through a relay with those
/// parameters (both may dial, so there is one relay per direction of dialing).
struct Pair {
    a: Agent,
    b: Agent,
    relays: Vec<Relay>,
    control: PathBuf,
}

async fn pair(env: &Env, regions: &[(&str, &Path)], link: Option<&LinkParams>) -> Pair {
    static N: AtomicUsize = AtomicUsize::new(0);
    let (pa, pb) = (free_port(), free_port());
    let direct = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (to_b, to_a, relays) = match link {
        None => (direct(pb), direct(pa), Vec::new()),
        Some(l) => {
            let rb = start_relay(direct(pb), l.clone()).await;
            let ra = start_relay(direct(pa), l.clone()).await;
            (rb.local_addr(), ra.local_addr(), vec![rb, ra])
        }
    };
    let mut cb = env.config("b", pb, "a", to_a);
    for (n, p) in regions {
        cb.regions.push((n.to_string(), p.to_path_buf()));
    }
    let mut ca = env.config("a", pa, "b", to_b);
    let control = env
        .ctl
        .path()
        .join(format!("a{}.sock", N.fetch_add(1, Ordering::Relaxed)));
    ca.control = Some(control.clone());
    let b = server_rt().spawn(Agent::start(cb)).await.unwrap().unwrap();
    let a = Agent::start(ca).await.unwrap();
    assert!(a.wait_connected("b", Duration::from_secs(20)).await);
    Pair {
        a,
        b,
        relays,
        control,
    }
}

impl Pair {
    async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
        stop_relays(self.relays).await;
    }

    fn opts(&self, region: &str, mech: Mechanism) -> AttachOptions {
        let mut o = AttachOptions::new(&self.control, "b", region);
        o.mechanism = mech;
        o
    }
}

/// Latencies (µs) of `n` urgent fetches of random chunks on the (idle) connection, after
/// `warm` untimed ones (on a fresh WAN connection the congestion window must grow first).
async fn fetch_latencies(a: &Agent, region: &str, chunks: u64, warm: usize, n: usize) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut out = Vec::new();
    for i in 0..warm + n {
        let c = rng.gen_range(0..chunks);
        let t0 = Instant::now();
        a.fetch("b", region, c).await.unwrap();
        if i >= warm {
            out.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    out
}

// ---------------------------------------------------------------------------------------
// Raw quinn baseline: a server that answers "send me N bytes" (8-byte little-endian
// request on a fresh bi stream) with N bytes, over the same TLS and transport settings as
// the agents, directly or through a relay with the same link parameters.

struct Raw {
    conn: quinn::Connection,
    client: quinn::Endpoint,
    server: quinn::Endpoint,
    relay: Option<Relay>,
}

async fn raw_connect(env: &Env, link: Option<&LinkParams>) -> Raw {
    let tuning = Tuning::default();
    let (sid, st) = (env.id("b"), tuning.clone());
    let server = server_rt()
        .spawn(async move { endpoint("127.0.0.1:0".parse().unwrap(), &sid, &st).unwrap() })
        .await
        .unwrap();
    let saddr = server.local_addr().unwrap();
    let srv = server.clone();
    server_rt().spawn(async move {
        while let Some(inc) = srv.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                let mut buf = vec![0u8; 64 << 10];
                rand::thread_rng().fill_bytes(&mut buf);
                let buf = Arc::new(buf);
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let buf = buf.clone();
                    tokio::spawn(async move {
                        let mut req = [0u8; 8];
                        if recv.read_exact(&mut req).await.is_err() {
                            return;
                        }
                        let mut left = u64::from_le_bytes(req);
                        while left > 0 {
                            let n = left.min(buf.len() as u64) as usize;
                            if send.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            left -= n as u64;
                        }
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    let relay = match link {
        Some(l) => Some(start_relay(saddr, l.clone()).await),
        None => None,
    };
    let target = relay.as_ref().map(|r| r.local_addr()).unwrap_or(saddr);
    let client = endpoint("127.0.0.1:0".parse().unwrap(), &env.id("a"), &tuning).unwrap();
    let c2 = client.clone();
    let conn = tokio::spawn(async move { c2.connect(target, "b").unwrap().await.unwrap() })
        .await
        .unwrap();
    Raw {
        conn,
        client,
        server,
        relay,
    }
}

/// Asks for `bytes` on a new stream and reads them all; returns the seconds from sending
/// the request to the last byte.
async fn raw_request(conn: &quinn::Connection, bytes: u64) -> f64 {
    let t0 = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes.to_le_bytes()).await.unwrap();
    send.finish().unwrap();
    let mut got = 0u64;
    while let Some(c) = recv.read_chunk(1 << 20, true).await.unwrap() {
        got += c.bytes.len() as u64;
    }
    assert_eq!(got, bytes);
    t0.elapsed().as_secs_f64()
}

impl Raw {
    /// Request/response round trips (µs) for `bytes` on the idle connection.
    async fn rtts(&self, bytes: u64, warm: usize, n: usize) -> Vec<f64> {
        let conn = self.conn.clone();
        // On a runtime worker, like the agents' tasks.
        tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..warm + n {
                let s = raw_request(&conn, bytes).await;
                if i >= warm {
                    out.push(s * 1e6);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            out
        })
        .await
        .unwrap()
    }

    /// Single-stream throughput (bytes/s) of a `bytes` transfer.
    async fn throughput(&self, bytes: u64) -> f64 {
        let conn = self.conn.clone();
        tokio::spawn(async move { bytes as f64 / raw_request(&conn, bytes).await })
            .await
            .unwrap()
    }

    async fn close(self) {
        self.conn.close(0u32.into(), b"");
        self.client.wait_idle().await;
        self.server.close(0u32.into(), b"");
        if let Some(r) = self.relay {
            stop_relays(vec![r]).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The application side (blocking threads).

/// True when the page at `p` is in memory (installed by the agent, or touched).
fn resident(p: *const u8) -> bool {
    let mut v = 0u8;
    // SAFETY: `p` is page-aligned inside a live mapping; mincore writes one byte.
    let r = unsafe { libc::mincore(p as *mut libc::c_void, PAGE, &mut v) };
    r == 0 && v & 1 != 0
}

/// Reads one byte at `p` (a first touch when the page is missing); returns µs.
fn touch(p: *const u8) -> f64 {
    let t0 = Instant::now();
    // SAFETY: `p` points into a live mapping owned by the caller; a volatile read of one
    // byte through the raw pointer, no reference to the shared memory.
    let v = unsafe { std::ptr::read_volatile(p) };
    let us = t0.elapsed().as_secs_f64() * 1e6;
    std::hint::black_box(v);
    us
}

/// First-touch samples of one mount: after `warm`, touch one random page that is not
/// here yet every `gap`, until `want` samples are taken or the mount is complete.
struct TouchRun {
    us: Vec<f64>,
    /// Samples that found the page arrived between the check and the touch (< 20 µs).
    raced: usize,
    /// Background bytes installed while sampling, and the sampling time.
    bulk_bytes: u64,
    bulk_secs: f64,
}

fn touch_run(
    opts: &AttachOptions,
    want: usize,
    warm: Duration,
    gap: Duration,
    seed: u64,
) -> TouchRun {
    let m = attach(opts).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pages = m.len() / PAGE;
    std::thread::sleep(warm);
    let st0 = mount_status(&opts.control, m.id()).unwrap().unwrap();
    let t0 = Instant::now();
    let mut us = Vec::new();
    'outer: while us.len() < want && !m.is_complete() {
        let mut p = None;
        for _ in 0..4096 {
            let c = rng.gen_range(0..pages);
            // SAFETY: inside the mapping.
            if !resident(unsafe { m.as_ptr().add(c * PAGE) }) {
                p = Some(c);
                break;
            }
        }
        let Some(p) = p else { break 'outer };
        // SAFETY: inside the mapping.
        us.push(touch(unsafe { m.as_ptr().add(p * PAGE) }));
        std::thread::sleep(gap);
    }
    let secs = t0.elapsed().as_secs_f64();
    let st1 = mount_status(&opts.control, m.id()).unwrap().unwrap();
    let raced = us.iter().filter(|&&u| u < 20.0).count();
    drop(m);
    TouchRun {
        us,
        raced,
        bulk_bytes: st1.bytes_present.saturating_sub(st0.bytes_present),
        bulk_secs: secs,
    }
}

/// First touches over as many mounts as it takes (at most 20) to get `want` samples.
fn first_touches(
    opts: &AttachOptions,
    want: usize,
    warm: Duration,
) -> (Vec<f64>, usize, f64, usize) {
    let (mut us, mut raced, mut bytes, mut secs, mut mounts) = (Vec::new(), 0, 0u64, 0.0, 0);
    while us.len() < want && mounts < 20 {
        let r = touch_run(
            opts,
            want - us.len(),
            warm,
            Duration::from_millis(2),
            mounts as u64 + 11,
        );
        us.extend(r.us);
        raced += r.raced;
        bytes += r.bulk_bytes;
        secs += r.bulk_secs;
        mounts += 1;
    }
    (us, raced, bytes as f64 / secs, mounts)
}

/// Attaches and reads every page in order (one 4 KiB read each, like `lazy_reader
/// --order seq`); returns (seconds from attach to the last page, attach ms, faults, the
/// process's CPU seconds at the last page). Then checks the whole mapping against
/// `expect`.
fn seq_read(opts: &AttachOptions, expect: blake3::Hash) -> (f64, f64, u64, f64) {
    let t0 = Instant::now();
    let m = attach(opts).unwrap();
    let attach_ms = t0.elapsed().as_secs_f64() * 1e3;
    let len = m.len();
    let mut buf = vec![0u8; PAGE];
    let mut off = 0;
    while off < len {
        let n = PAGE.min(len - off);
        m.read_at(off, &mut buf[..n]);
        off += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = pagewire::demo::process_cpu_secs();
    std::hint::black_box(&buf);
    assert!(m.wait_complete(Some(Duration::from_secs(60))).unwrap());
    let faults = mount_status(&opts.control, m.id())
        .unwrap()
        .map(|s| s.faults)
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    let mut big = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = big.len().min(len - off);
        m.read_at(off, &mut big[..n]);
        h.update(&big[..n]);
        off += n;
    }
    assert_eq!(h.finalize(), expect, "the mapping differs from the region");
    (secs, attach_ms, faults, cpu)
}

// ---------------------------------------------------------------------------------------
// 3. Fault handling with the data local: kernel and raw userfaultfd baselines.

/// An anonymous or memfd mapping, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(len: usize, fd: Option<i32>, prot: libc::c_int) -> Map {
        let (flags, fd) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping at an address of the kernel's choosing.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Map { ptr: p.cast(), len }
    }

    fn page(&self, i: usize) -> *mut u8 {
        assert!(i * PAGE < self.len);
        // SAFETY: inside the mapping (checked above).
        unsafe { self.ptr.add(i * PAGE) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no references into it outlive this.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lets the calling thread run on every CPU again.
fn unpin() {
    // SAFETY: as in `pin`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..cpus() {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins (or unpins) the receiving side's worker thread, where agent `a` serves faults
/// (only meaningful with one worker).
async fn pin_worker(cpu: Option<usize>) {
    tokio::spawn(async move {
        match cpu {
            Some(c) => pin(c),
            None => unpin(),
        }
    })
    .await
    .unwrap();
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// First touch (read, or write) of `n` fresh pages of a private anonymous mapping, or of
/// a memfd mapped shared (`memfd`); µs each.
fn kernel_first_touch(n: usize, write: bool, memfd: bool) -> Vec<f64> {
    let f = memfd.then(|| fault::memfd("bench", (n * PAGE) as u64).unwrap());
    let fd = f.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let m = Map::new(n * PAGE, fd, libc::PROT_READ | libc::PROT_WRITE);
    (0..n)
        .map(|i| {
            let p = m.page(i);
            if write {
                let t0 = Instant::now();
                // SAFETY: inside our own mapping.
                unsafe { std::ptr::write_volatile(p, 1) };
                t0.elapsed().as_secs_f64() * 1e6
            } else {
                touch(p)
            }
        })
        .collect()
}

/// A raw userfaultfd MISSING fault on a memfd mapped shared (what `attach` creates),
/// resolved with UFFDIO_ZEROPAGE by a handler thread of this process; µs per fault as seen
/// by the faulting thread. `cpus`: (faulting thread, handler) pinning, or None.
fn raw_uffd(n: usize, cpus: Option<(usize, usize)>) -> Vec<f64> {
    use std::os::fd::AsRawFd;
    let f = fault::memfd("bench-uffd", (n * PAGE) as u64).unwrap();
    let m = Map::new(
        n * PAGE,
        Some(f.as_raw_fd()),
        libc::PROT_READ | libc::PROT_WRITE,
    );
    let u = uffd::create().unwrap();
    uffd::api(u.as_raw_fd()).unwrap();
    uffd::register_missing(u.as_raw_fd(), m.ptr as u64, m.len as u64).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let fd = u.as_raw_fd();
    let (base, len) = (m.ptr as usize, m.len);
    let st = stop.clone();
    let handler = std::thread::spawn(move || {
        if let Some((_, h)) = cpus {
            pin(h);
        }
        while !st.load(Ordering::Acquire) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on our stack.
            unsafe { libc::poll(&mut p, 1, 100) };
            while let Ok(Some(ev)) = uffd::read_event(fd) {
                if let uffd::Event::Fault { addr, .. } = ev {
                    let a = addr & !(PAGE as u64 - 1);
                    if (a as usize) >= base && (a as usize) < base + len {
                        uffd::zero(fd, a, PAGE as u64, PAGE as u64).unwrap();
                    }
                }
            }
        }
    });
    let mp = m.ptr as usize;
    let us = std::thread::spawn(move || {
        if let Some((t, _)) = cpus {
            pin(t);
        }
        // SAFETY: inside the mapping, which outlives this thread (joined below).
        (0..n)
            .map(|i| touch(unsafe { (mp as *const u8).add(i * PAGE) }))
            .collect::<Vec<f64>>()
    })
    .join()
    .unwrap();
    uffd::unregister(fd, m.ptr as u64, m.len as u64).unwrap();
    stop.store(true, Ordering::Release);
    handler.join().unwrap();
    drop(m);
    us
}

/// pagewire's SIGSEGV handler (the mprotect mechanism) on a chunk that is already here:
/// a PROT_NONE memfd mapping whose chunk table says every other chunk is present, so each
/// first touch of a present chunk traps, and the handler opens exactly that chunk (its
/// neighbours are missing) without asking the agent. µs per trap, including the page
/// fault that follows. What happens in a real mprotect mount for a chunk already here.
fn mprotect_handler(n: usize) -> Vec<f64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let chunks = 2 * n;
    let f = fault::memfd("bench-mprotect", chunks as u64 * CHUNK).unwrap();
    let tf = fault::memfd("bench-table", fault::ChunkTable::bytes(chunks as u64)).unwrap();
    let table = fault::ChunkTable::map(&tf, chunks as u64).unwrap();
    for c in (0..chunks).step_by(2) {
        table.set(c as u64, fault::state::PRESENT);
    }
    let m = Map::new(
        chunks * CHUNK as usize,
        Some(f.as_raw_fd()),
        libc::PROT_NONE,
    );
    let mut sv = [0i32; 2];
    // SAFETY: socketpair writes two new descriptors into the array.
    assert_eq!(
        unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        },
        0
    );
    // SAFETY: both descriptors are fresh and ours.
    let (mine, _theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    let reg = fault::sigsegv::register(
        m.ptr as usize,
        m.len,
        CHUNK.trailing_zeros(),
        table.as_ptr(),
        chunks,
        mine.as_raw_fd(),
    )
    .unwrap();
    let us = (0..chunks)
        .step_by(2)
        .map(|c| touch(m.page(c * CHUNK as usize / PAGE)))
        .collect();
    drop(reg);
    drop(m);
    us
}

/// First touches of `n` random pages of the zero head of `opts`' region (zero chunks: the
/// agent knows them from the bulk stream's zero runs and installs no data; uffd: each
/// page faults and the agent answers with UFFDIO_ZEROPAGE; mprotect: the handler opens
/// the chunk and its present neighbours itself). Waits until the zero head is present;
/// the data tail keeps the mount from completing (it crawls through a slow link).
/// Returns (µs per touch, faults the agent served). The touching thread is pinned to
/// `cpu` if given.
fn local_faults(
    opts: &AttachOptions,
    zero_chunks: u64,
    n: usize,
    cpu: Option<usize>,
) -> (Vec<f64>, u64) {
    let opts = opts.clone();
    std::thread::spawn(move || {
        if let Some(c) = cpu {
            pin(c);
        }
        local_faults_here(&opts, zero_chunks, n)
    })
    .join()
    .unwrap()
}

fn local_faults_here(opts: &AttachOptions, zero_chunks: u64, n: usize) -> (Vec<f64>, u64) {
    let m = attach(opts).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = mount_status(&opts.control, m.id()).unwrap().unwrap();
        if st.chunks_present >= zero_chunks {
            assert!(!m.is_complete(), "the mount completed before sampling");
            break;
        }
        assert!(Instant::now() < deadline, "zero head not present: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = mount_status(&opts.control, m.id()).unwrap().unwrap().faults;
    let zero_pages = zero_chunks as usize * CHUNK as usize / PAGE;
    let mut pages: Vec<usize> = (0..zero_pages).collect();
    pages.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    // SAFETY: every page is inside the mapping.
    let us: Vec<f64> = pages[..n.min(zero_pages)]
        .iter()
        .map(|&p| touch(unsafe { m.as_ptr().add(p * PAGE) }))
        .collect();
    assert!(!m.is_complete(), "the mount completed while sampling");
    let after = mount_status(&opts.control, m.id()).unwrap().unwrap().faults;
    drop(m);
    (us, after - before)
}

// ---------------------------------------------------------------------------------------

fn main() {
    runtime("receiving-side", workers()).block_on(run());
}

/// Benchmark 2 on loopback: raw stream and lazy sequential read, alternating, with the
/// process's CPU seconds per GiB of each.
struct LoSeq {
    raws: Vec<f64>,
    seqs: Vec<f64>,
    /// (attach ms, faults) per lazy read.
    info: Vec<(f64, u64)>,
    raw_cpu: Vec<f64>,
    seq_cpu: Vec<f64>,
}

impl LoSeq {
    async fn run(
        raw: &Raw,
        opts: &AttachOptions,
        size: u64,
        hash: blake3::Hash,
        reps: usize,
    ) -> LoSeq {
        let mut r = LoSeq {
            raws: Vec::new(),
            seqs: Vec::new(),
            info: Vec::new(),
            raw_cpu: Vec::new(),
            seq_cpu: Vec::new(),
        };
        let gib = size as f64 / (1u64 << 30) as f64;
        for _ in 0..reps {
            let c0 = pagewire::demo::process_cpu_secs();
            let bps = raw.throughput(size).await;
            r.raw_cpu
                .push((pagewire::demo::process_cpu_secs() - c0) / gib);
            r.raws.push(bps);
            let o = opts.clone();
            let c0 = pagewire::demo::process_cpu_secs();
            let (secs, attach_ms, faults, c1) =
                tokio::task::spawn_blocking(move || seq_read(&o, hash))
                    .await
                    .unwrap();
            r.seq_cpu.push((c1 - c0) / gib);
            r.seqs.push(size as f64 / secs);
            r.info.push((attach_ms, faults));
        }
        r
    }

    /// Prints the loopback rows; returns (raw, lazy) CPU seconds per GiB and the ceiling.
    fn report(&self, reps: usize) -> (f64, f64, f64) {
        let runs = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.0}", x / 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (raw_bps, seq_bps) = (pct(&self.raws, 0.5), pct(&self.seqs, 0.5));
        println!(
            "   loopback  raw quinn stream     {}  (median of {reps}: {} MB/s)",
            mbps(raw_bps),
            runs(&self.raws)
        );
        println!(
            "   loopback  lazy sequential read {}  (median of {reps}: {} MB/s; attach {:.1} ms, {} faults)  ratio {:.2}x  target >= 0.8x: {}",
            mbps(seq_bps),
            runs(&self.seqs),
            self.info[0].0,
            self.info[0].1,
            seq_bps / raw_bps,
            yes(seq_bps / raw_bps >= 0.8)
        );
        let (raw_cpu, seq_cpu) = (pct(&self.raw_cpu, 0.5), pct(&self.seq_cpu, 0.5));
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(f64::NAN);
        // At best the lazy read keeps every core busy: rate <= cores / (CPU per byte).
        let ceiling = cores / seq_cpu * (1u64 << 30) as f64 / raw_bps;
        println!(
            "   loopback  CPU per GiB (whole process, median): raw stream {raw_cpu:.2} core-s, lazy read {seq_cpu:.2} core-s ({:.2}x); ceiling on this {cores}-CPU machine if the lazy read kept every core busy: {ceiling:.2}x raw",
            seq_cpu / raw_cpu
        );
        (raw_cpu, seq_cpu, ceiling)
    }
}

async fn run() {
    let mb = env_u64("PAGEWIRE_BENCH_MB", 1024);
    let wan_mb = env_u64("PAGEWIRE_BENCH_WAN_MB", 256.min(mb));
    let (size, wan_size) = (mb << 20, wan_mb << 20);
    let reps = env_u64("PAGEWIRE_BENCH_REPS", 3).max(1) as usize;
    // PAGEWIRE_BENCH_ONLY=touch: only benchmark 1 (first-touch latency).
    let only_touch = std::env::var("PAGEWIRE_BENCH_ONLY").as_deref() == Ok("touch");
    let seq_reps = if only_touch { 0 } else { reps };
    let env = Env::new();
    // In RAM at once: the region and the WAN region in /dev/shm, one mount's memfd (up to
    // the region size), plus a warm-up file of 2x the region (freed at once).
    let need_shm = 2 * size + wan_size;
    let need_mem = 3 * size + wan_size;
    let (free, avail) = (free_bytes(env.data.path()), mem_available());
    if free < need_shm || avail < need_mem {
        eprintln!(
            "not enough room: need {} MiB free in {} ({} MiB free) and {} MiB of available memory ({} MiB); lower PAGEWIRE_BENCH_MB",
            need_shm >> 20,
            env.data.path().display(),
            free >> 20,
            need_mem >> 20,
            avail >> 20
        );
        drop(env);
        std::process::exit(2);
    }
    // Interrupted runs must not leave gigabytes in tmpfs.
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
        "pagewire step-2 (post-copy) benchmarks: region {mb} MiB (WAN first-touch region {wan_mb} MiB), chunk 64 KiB, mechanism userfaultfd unless said;"
    );
    println!(
        "serving and receiving sides each on its own {}-worker runtime, WAN relay on a third (1 worker); the application is a plain thread; urgent pause {:?}",
        workers(),
        urgent_pause()
    );
    let random = env.data.path().join("random");
    let wan_random = env.data.path().join("wan-random");
    let zeros = env.data.path().join("zeros");
    let hash = make_random(&random, size, 1);
    make_random(&wan_random, wan_size, 2);
    // Touch (and free) 2x the region of RAM once: on a fresh VM the first touch of a guest
    // page costs ~1.7 µs in the hypervisor, which mounts (new memfd pages) would pay and the
    // raw baseline (one reused buffer) would not.
    {
        let warm = env.data.path().join("warm");
        let f = std::fs::File::create(&warm).unwrap();
        let block = vec![1u8; 1 << 20];
        for i in 0..((2 * size) >> 20) {
            f.write_all_at(&block, i << 20).unwrap();
        }
        drop(f);
        std::fs::remove_file(&warm).unwrap();
    }
    let wan = wan_params();

    // ---- 1 & 2 on loopback --------------------------------------------------------------
    let chunks = size / CHUNK;
    let p = pair(&env, &[("random", &random)], None).await;
    let raw = raw_connect(&env, None).await;
    let lo_raw_rtt = raw.rtts(CHUNK, 20, 200).await;
    let lo_fetch = fetch_latencies(&p.a, "random", chunks, 20, 200).await;
    let opts = p.opts("random", Mechanism::Userfaultfd);
    // PAGEWIRE_BENCH_ONLY=seq: only benchmark 2 on loopback.
    if std::env::var("PAGEWIRE_BENCH_ONLY").as_deref() == Ok("seq") {
        let lo = LoSeq::run(&raw, &opts, size, hash, reps).await;
        println!("\n2. sequential read of a lazily attached {mb} MiB region by the application, loopback only (PAGEWIRE_BENCH_ONLY=seq)");
        lo.report(reps);
        raw.close().await;
        p.stop().await;
        return;
    }
    let o = opts.clone();
    let (lo_touch, lo_raced, lo_bulk, lo_mounts) =
        tokio::task::spawn_blocking(move || first_touches(&o, 200, Duration::from_millis(50)))
            .await
            .unwrap();
    let o = p.opts("random", Mechanism::Mprotect);
    let (lo_touch_mp, lo_raced_mp, lo_bulk_mp, lo_mounts_mp) =
        tokio::task::spawn_blocking(move || first_touches(&o, 200, Duration::from_millis(50)))
            .await
            .unwrap();
    // 2: raw and mount alternate `reps` times; medians are compared.
    let lo = LoSeq::run(&raw, &opts, size, hash, seq_reps).await;
    let (lo_raws, lo_seqs) = (lo.raws.clone(), lo.seqs.clone());
    raw.close().await;
    p.stop().await;

    // ---- 1 & 2 through the WAN relay ------------------------------------------------------
    let p = pair(
        &env,
        &[("random", &random), ("wan-random", &wan_random)],
        Some(&wan),
    )
    .await;
    let raw = raw_connect(&env, Some(&wan)).await;
    let wan_ping = raw.rtts(1, 5, 50).await;
    let wan_raw_rtt = raw.rtts(CHUNK, 20, 200).await;
    let wan_fetch = fetch_latencies(&p.a, "wan-random", wan_size / CHUNK, 20, 200).await;
    let o = p.opts("wan-random", Mechanism::Userfaultfd);
    let raw_relays: Vec<&Relay> = raw.relay.iter().collect();
    let pair_relays: Vec<&Relay> = p.relays.iter().collect();
    let (d0, q0) = (Drops::now(&pair_relays), PathCounts::of(&p));
    let (wan_touch, wan_raced, wan_bulk, wan_mounts) =
        tokio::task::spawn_blocking(move || first_touches(&o, 200, Duration::from_millis(500)))
            .await
            .unwrap();
    let wan_touch_drops = d0.since(&pair_relays);
    let wan_touch_path = PathCounts::of(&p).since(q0);
    let (mut wan_raws, mut wan_seqs, mut wan_seq_info) = (Vec::new(), Vec::new(), Vec::new());
    let (mut wan_raw_drops, mut wan_seq_drops) = (Drops::default(), Drops::default());
    for _ in 0..seq_reps {
        let d0 = Drops::now(&raw_relays);
        wan_raws.push(raw.throughput(size).await);
        wan_raw_drops.add(d0.since(&raw_relays));
        let o = p.opts("random", Mechanism::Userfaultfd);
        let d0 = Drops::now(&pair_relays);
        let (secs, attach_ms, faults, _) = tokio::task::spawn_blocking(move || seq_read(&o, hash))
            .await
            .unwrap();
        wan_seq_drops.add(d0.since(&pair_relays));
        wan_seqs.push(size as f64 / secs);
        wan_seq_info.push((attach_ms, faults));
    }
    raw.close().await;
    p.stop().await;

    // ---- report 1 -----------------------------------------------------------------------------
    let lat_line = |what: &str, l: &Lat, extra: &str| {
        println!(
            "   {what:<52} p50 {:8.0}  p99 {:8.0}  (n={}{extra})",
            l.p50, l.p99, l.n
        );
    };
    let (lo_raw_rtt, lo_fetch, lo_touch_l, lo_touch_mp_l) = (
        Lat::of(&lo_raw_rtt),
        Lat::of(&lo_fetch),
        Lat::of(&lo_touch),
        Lat::of(&lo_touch_mp),
    );
    let wan_ping = Lat::of(&wan_ping);
    let (wan_raw_rtt, wan_fetch, wan_touch_l) = (
        Lat::of(&wan_raw_rtt),
        Lat::of(&wan_fetch),
        Lat::of(&wan_touch),
    );
    println!("\n1. first touch of one missing page while the mount's background copy runs (µs)");
    println!("   loopback");
    lat_line(
        "baseline: raw quinn 64 KiB request/response, idle",
        &lo_raw_rtt,
        "",
    );
    lat_line(
        "baseline: Agent::fetch of one 64 KiB chunk, idle",
        &lo_fetch,
        "",
    );
    lat_line(
        "first touch, userfaultfd",
        &lo_touch_l,
        &format!(
            ", {lo_mounts} mount(s), {lo_raced} raced the copy, bulk {}",
            mbps(lo_bulk)
        ),
    );
    lat_line(
        "first touch, mprotect",
        &lo_touch_mp_l,
        &format!(
            ", {lo_mounts_mp} mount(s), {lo_raced_mp} raced the copy, bulk {}",
            mbps(lo_bulk_mp)
        ),
    );
    let lo_ok = lo_touch_l.p50 <= 250.0;
    println!(
        "   target p50 <= 250 µs: {} (p50 {:.0} µs = {:.2}x raw request/response, {:.2}x idle fetch)",
        yes(lo_ok),
        lo_touch_l.p50,
        lo_touch_l.p50 / lo_raw_rtt.p50,
        lo_touch_l.p50 / lo_fetch.p50
    );
    println!("   WAN relay, 12.5 ms each way (RTT 25 ms), no loss, no rate limit, 4 MiB queues");
    lat_line(
        "path RTT: raw quinn 1-byte request/response, idle",
        &wan_ping,
        "",
    );
    lat_line(
        "baseline: raw quinn 64 KiB request/response, idle",
        &wan_raw_rtt,
        "",
    );
    lat_line(
        "baseline: Agent::fetch of one 64 KiB chunk, idle",
        &wan_fetch,
        "",
    );
    lat_line(
        "first touch, userfaultfd",
        &wan_touch_l,
        &format!(
            ", {wan_mounts} mount(s), {wan_raced} raced the copy, bulk {}",
            mbps(wan_bulk)
        ),
    );
    let mut slowest = wan_touch.clone();
    slowest.sort_by(|x, y| y.total_cmp(x));
    println!(
        "   while sampling: {}; {}; slowest touches (ms): {}",
        wan_touch_path.text(),
        wan_touch_drops.text(),
        slowest
            .iter()
            .take(8)
            .map(|u| format!("{:.1}", u / 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // One RTT is the path's as measured (the relay's own forwarding adds to its 25 ms).
    let wan_target = wan_ping.p50 + 2_000.0;
    let wan_ok = wan_touch_l.p99 <= wan_target;
    println!(
        "   target p99 <= 1 RTT + 2 ms = {:.0} µs (measured path RTT p50 + 2 ms): {} (p99 {:.0} µs = measured path RTT p50 + {:.1} ms; {:.2}x the idle 64 KiB request/response p50)",
        wan_target,
        yes(wan_ok),
        wan_touch_l.p99,
        (wan_touch_l.p99 - wan_ping.p50) / 1e3,
        wan_touch_l.p99 / wan_raw_rtt.p50
    );

    if only_touch {
        let json = serde_json::json!({
            "region_mib": mb,
            "wan_region_mib": wan_mb,
            "workers": workers(),
            "first_touch": {
                "loopback": {
                    "raw_rtt_64k": lo_raw_rtt.json(), "idle_fetch": lo_fetch.json(),
                    "uffd": lo_touch_l.json(), "uffd_raced": lo_raced, "uffd_bulk_bps": lo_bulk,
                    "mprotect": lo_touch_mp_l.json(),
                    "target_p50_us": 250.0, "met": lo_ok,
                },
                "wan_25ms": {
                    "path_rtt": wan_ping.json(), "raw_rtt_64k": wan_raw_rtt.json(),
                    "idle_fetch": wan_fetch.json(), "uffd": wan_touch_l.json(),
                    "uffd_raced": wan_raced, "uffd_bulk_bps": wan_bulk,
                    "target_p99_us": wan_target, "met": wan_ok,
                },
            },
        });
        println!("\nBENCH_JSON {json}");
        drop(env);
        return;
    }

    // ---- 3. fault handling with the data local -----------------------------------------------
    const N: usize = 2000;
    let k_anon_r = kernel_first_touch(4 * N, false, false);
    let k_anon_w = kernel_first_touch(4 * N, true, false);
    let k_memfd_r = kernel_first_touch(4 * N, false, true);
    let raw_uffd_free = raw_uffd(4 * N, None);
    let (raw_uffd_same, raw_uffd_cross) = if cpus() >= 2 {
        (
            Some(raw_uffd(4 * N, Some((0, 0)))),
            Some(raw_uffd(4 * N, Some((0, 1)))),
        )
    } else {
        (None, None)
    };
    let mp_handler = mprotect_handler(N);
    // Mounts of a region that is zeros except a 4 MiB data tail, through a relay limited to
    // 8 Mbit/s: the zero runs arrive at once, the tail takes ~4 s, so the mount stays
    // incomplete (uffd registered, mapping protected) while we touch the zero chunks, and
    // the background copy costs next to no CPU.
    let tail = 4u64 << 20;
    let zsize = size.max(64 << 20);
    make_zero_head(&zeros, zsize, tail);
    let zero_chunks = (zsize - tail) / CHUNK;
    let slow = LinkParams {
        rate_bps: Some(8_000_000),
        ..LinkParams::default()
    };
    let p = pair(&env, &[("zeros", &zeros)], Some(&slow)).await;
    let o = p.opts("zeros", Mechanism::Userfaultfd);
    let (pw_uffd, pw_uffd_faults) =
        tokio::task::spawn_blocking(move || local_faults(&o, zero_chunks, N, None))
            .await
            .unwrap();
    // The same with the application thread and the agent's worker on one CPU, and on two
    // (a fault wakes the agent, the agent's ioctl wakes the application).
    let mut pw_uffd_pinned = Vec::new();
    if cpus() >= 2 && workers() == 1 {
        for (app, agent) in [(0, 0), (0, 1)] {
            pin_worker(Some(agent)).await;
            let o = p.opts("zeros", Mechanism::Userfaultfd);
            let (us, _) =
                tokio::task::spawn_blocking(move || local_faults(&o, zero_chunks, N, Some(app)))
                    .await
                    .unwrap();
            pw_uffd_pinned.push((app, agent, us));
        }
        pin_worker(None).await;
    }
    let o = p.opts("zeros", Mechanism::Mprotect);
    let (pw_mp, pw_mp_faults) =
        tokio::task::spawn_blocking(move || local_faults(&o, zero_chunks, N, None))
            .await
            .unwrap();
    p.stop().await;
    let _ = std::fs::remove_file(&zeros);

    // ---- report (2 and 3) -------------------------------------------------------------------
    let lo_raw_bps = pct(&lo_raws, 0.5);
    let lo_seq_bps = pct(&lo_seqs, 0.5);
    let wan_raw_bps = pct(&wan_raws, 0.5);
    let wan_seq_bps = pct(&wan_seqs, 0.5);
    let runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.0}", x / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("\n2. sequential read of a lazily attached {mb} MiB region by the application (attach to last page)");
    let (lo_raw_cpu_gib, lo_seq_cpu_gib, lo_ceiling) = lo.report(reps);
    println!(
        "   WAN 25 ms raw quinn stream     {}  (median of {reps}: {} MB/s; {})",
        mbps(wan_raw_bps),
        runs(&wan_raws),
        wan_raw_drops.text()
    );
    println!(
        "   WAN 25 ms lazy sequential read {}  (median of {reps}: {} MB/s; attach {:.1} ms, {} faults; {})  ratio {:.2}x  target >= 0.8x: {}",
        mbps(wan_seq_bps),
        runs(&wan_seqs),
        wan_seq_info[0].0,
        wan_seq_info[0].1,
        wan_seq_drops.text(),
        wan_seq_bps / wan_raw_bps,
        yes(wan_seq_bps / wan_raw_bps >= 0.8)
    );

    println!("\n3. fault handling with the data already local (µs per fault, as the faulting thread sees it)");
    let row = |what: &str, v: &[f64]| {
        let l = Lat::of(v);
        println!(
            "   {what:<66} p50 {:6.1}  p99 {:6.1}  mean {:6.1}  (n={})",
            l.p50, l.p99, l.mean, l.n
        );
        l
    };
    let l_anon_r = row(
        "baseline: first read of a fresh MAP_PRIVATE|MAP_ANONYMOUS page",
        &k_anon_r,
    );
    let l_anon_w = row(
        "baseline: first write of a fresh MAP_PRIVATE|MAP_ANONYMOUS page",
        &k_anon_w,
    );
    let l_memfd_r = row(
        "baseline: first read of a fresh memfd page (MAP_SHARED)",
        &k_memfd_r,
    );
    let l_raw_uffd = row(
        "baseline: raw uffd MISSING + UFFDIO_ZEROPAGE, handler thread",
        &raw_uffd_free,
    );
    let l_raw_same = raw_uffd_same
        .as_ref()
        .map(|v| row("baseline: raw uffd, both threads pinned to CPU 0", v));
    let l_raw_cross = raw_uffd_cross
        .as_ref()
        .map(|v| row("baseline: raw uffd, faulting CPU 0, handler CPU 1", v));
    let l_pw_uffd = row(
        "pagewire mount, userfaultfd: zero chunk (agent: UFFDIO_ZEROPAGE)",
        &pw_uffd,
    );
    let l_pw_pinned: Vec<(String, Lat)> = pw_uffd_pinned
        .iter()
        .map(|(app, agent, us)| {
            let what = if app == agent {
                format!("pagewire mount, userfaultfd, app and agent pinned to CPU {app}")
            } else {
                format!("pagewire mount, userfaultfd, app CPU {app}, agent CPU {agent}")
            };
            let l = row(&what, us);
            (what, l)
        })
        .collect();
    let l_mp_handler = row(
        "pagewire mprotect handler, chunk present (opens 1 chunk; no agent)",
        &mp_handler,
    );
    let l_pw_mp = row(
        "pagewire mount, mprotect: zero chunk, every first touch",
        &pw_mp,
    );
    let mut slowest = pw_mp.clone();
    slowest.sort_by(|a, b| b.total_cmp(a));
    let slowest: Vec<String> = slowest.iter().take(3).map(|u| format!("{u:.0}")).collect();
    println!(
        "   (uffd mount: the agent served {pw_uffd_faults} faults for {} touches. mprotect mount: the agent served {pw_mp_faults}; the handler opens a present chunk together with its present neighbours (up to 4096 chunks each way), so a few traps (slowest touches {} µs) opened the whole zero head and the other touches were plain page faults)",
        pw_uffd.len(),
        slowest.join(", ")
    );
    let same_cross = |k: usize| l_pw_pinned.get(k).map(|(_, l)| l.p50);
    let raw_same_cross = [l_raw_same.map(|l| l.p50), l_raw_cross.map(|l| l.p50)];
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    println!(
        "   pagewire uffd fault / raw uffd (p50): same CPU {}, across CPUs {}, unpinned {:.2}x (unpinned: wherever the scheduler put the threads, see the pinned rows); mprotect trap (handled in the faulting thread) / raw uffd on the same CPU: {}. Reference: Firecracker's handler ~15 µs, raw uffd ~8 µs",
        ratio(same_cross(0), raw_same_cross[0]),
        ratio(same_cross(1), raw_same_cross[1]),
        l_pw_uffd.p50 / l_raw_uffd.p50,
        ratio(Some(l_mp_handler.p50), raw_same_cross[0])
    );

    let json = serde_json::json!({
        "region_mib": mb,
        "reps": reps,
        "wan_region_mib": wan_mb,
        "workers": workers(),
        "first_touch": {
            "loopback": {
                "raw_rtt_64k": lo_raw_rtt.json(),
                "idle_fetch": lo_fetch.json(),
                "uffd": lo_touch_l.json(), "uffd_raced": lo_raced, "uffd_bulk_bps": lo_bulk, "uffd_mounts": lo_mounts,
                "mprotect": lo_touch_mp_l.json(), "mprotect_raced": lo_raced_mp, "mprotect_bulk_bps": lo_bulk_mp,
                "target_p50_us": 250.0, "met": lo_ok,
            },
            "wan_25ms": {
                "path_rtt": wan_ping.json(),
                "raw_rtt_64k": wan_raw_rtt.json(),
                "idle_fetch": wan_fetch.json(),
                "uffd": wan_touch_l.json(), "uffd_raced": wan_raced, "uffd_bulk_bps": wan_bulk, "uffd_mounts": wan_mounts,
                "target_p99_us": wan_target, "met": wan_ok,
            },
        },
        "seq_read": {
            "loopback": {"raw_bps": lo_raw_bps, "raw_runs": lo_raws, "lazy_bps": lo_seq_bps, "lazy_runs": lo_seqs, "ratio": lo_seq_bps / lo_raw_bps, "met": lo_seq_bps / lo_raw_bps >= 0.8, "raw_cpu_s_per_gib": lo_raw_cpu_gib, "lazy_cpu_s_per_gib": lo_seq_cpu_gib, "ceiling_ratio": lo_ceiling},
            "wan_25ms": {"raw_bps": wan_raw_bps, "raw_runs": wan_raws, "lazy_bps": wan_seq_bps, "lazy_runs": wan_seqs, "ratio": wan_seq_bps / wan_raw_bps, "faults": wan_seq_info[0].1, "met": wan_seq_bps / wan_raw_bps >= 0.8,
                "raw_relay_drops": wan_raw_drops.relay, "raw_rcvbuf_drops": wan_raw_drops.rcvbuf, "lazy_relay_drops": wan_seq_drops.relay, "lazy_rcvbuf_drops": wan_seq_drops.rcvbuf},
        },
        "local_fault": {
            "anon_read": l_anon_r.json(),
            "anon_write": l_anon_w.json(),
            "memfd_read": l_memfd_r.json(),
            "raw_uffd": l_raw_uffd.json(),
            "raw_uffd_same_cpu": l_raw_same.map(|l| l.json()),
            "raw_uffd_cross_cpu": l_raw_cross.map(|l| l.json()),
            "pagewire_uffd": l_pw_uffd.json(),
            "pagewire_uffd_pinned": l_pw_pinned.iter().map(|(w, l)| serde_json::json!({"what": w, "lat": l.json()})).collect::<Vec<_>>(),
            "pagewire_mprotect_handler": l_mp_handler.json(),
            "pagewire_mprotect_mount": l_pw_mp.json(),
        },
    });
    println!("\nBENCH_JSON {json}");
    drop(env);
}
