//! WAN tuning of QUIC (issue 5): which congestion controller, and whether link-sized
//! windows help, on a long link emulated by the project's WAN relay (`pagewire::wan`).
//!
//! 1. Relay ceiling: a raw quinn stream through the relay with no delay and no rate limit
//!    (what this machine's user-space relay can carry at all).
//! 2. Bulk throughput: one raw quinn stream (client asks for N bytes, server sends them)
//!    through one relay at 50 ms RTT (25 ms each way), for each rate limit and loss rate,
//!    with: quinn's defaults (`Tuning::default()`, the baseline), and each controller
//!    (cubic, newreno, bbr) with windows sized for the link (`Tuning::size_for_link`).
//!    Printed next to the link rate (ratio) and next to the baseline of the same case.
//!    Each transfer stops at PAGEWIRE_BENCH_MB or PAGEWIRE_BENCH_SECS, whichever first.
//! 3. Urgent-fetch latency during a bulk pull between two agents at 50 ms RTT (first rate,
//!    no loss), per controller: p50/p99 of `Agent::fetch` of one 64 KiB chunk every
//!    50 ms while `pull` runs, next to the idle fetch and the path RTT.
//!
//! `cargo bench --bench wan`. Environment: PAGEWIRE_BENCH_MB (bytes per transfer, default
//! 256), PAGEWIRE_BENCH_SECS (time cap per transfer, default 15), PAGEWIRE_BENCH_RATES
//! (default `200mbit,400mbit`: the relay carries ~570-750 Mbit/s at most on the 2-vCPU machine), PAGEWIRE_BENCH_LOSSES (default `0,0.001,0.01`),
//! PAGEWIRE_BENCH_ONLY (`ceiling`, `bulk` or `fetch` to run one part), PAGEWIRE_BENCH_TUNINGS
//! (comma-separated labels, e.g. `default,cubic+link`: run only these candidates in parts 2
//! and 3), PAGEWIRE_BENCH_GAINS (comma-separated gains of the pull's automatic bulk window
//! in percent, e.g. `200,125,110`: part 3 runs each candidate with each, in turn; default:
//! the agents' default window). Loss applies to both
//! directions (data and ACKs). The relay's queue per direction is rate × (one-way delay +
//! RTT): what is in flight plus one bandwidth-delay product of buffer.
//!
//! Layout: the serving side (raw server, agent b) on one 1-worker runtime, the receiving
//! side (raw client, agent a) on another, the relays on a third; all share 2 vCPUs.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use pagewire::agent::{Agent, AgentConfig, PeerSpec};
use pagewire::engine::pull::Window;
use pagewire::transport::{endpoint, Congestion, Identity, Link, Tuning};
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::{Rng, RngCore, SeedableRng};

const RTT: Duration = Duration::from_millis(50);

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

fn server_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| runtime("serving-side"))
}

fn relay_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| runtime("wan-relay"))
}

fn env_str(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// The emulated link: 25 ms each way, `rate`, `loss` both ways, queue = in flight + 1 BDP.
fn link(rate_bps: Option<u64>, loss: f64, delay: Duration) -> LinkParams {
    let queue = match rate_bps {
        Some(r) => ((r as f64 / 8.0) * (delay + 2 * delay).as_secs_f64()) as usize,
        None => 64 << 20,
    };
    LinkParams {
        delay,
        loss,
        rate_bps,
        queue_bytes: queue.max(256 << 10),
        ..LinkParams::default()
    }
}

async fn start_relay(upstream: SocketAddr, params: LinkParams) -> Relay {
    let mut cfg = RelayConfig::symmetric("127.0.0.1:0".parse().unwrap(), upstream, params);
    cfg.seed = Some(1);
    relay_rt().spawn(Relay::start(cfg)).await.unwrap().unwrap()
}

async fn stop_relay(r: Relay) {
    relay_rt().spawn(r.shutdown()).await.unwrap();
}

/// The tuning for one candidate: `None` is quinn's defaults (the baseline).
fn tuning(c: Option<Congestion>, l: Link) -> Tuning {
    let mut t = Tuning::default();
    if let Some(c) = c {
        t.congestion = c;
        t.size_for_link(l);
    }
    t
}

fn label(c: Option<Congestion>) -> String {
    match c {
        None => "default".into(),
        Some(c) => format!("{c}+link"),
    }
}

struct Bulk {
    bytes: u64,
    secs: f64,
    drops_queue: u64,
    drops_loss: u64,
}

/// One raw quinn transfer through a fresh relay: the client asks for `bytes`, reads until
/// it has them or `cap` passed; returns what arrived and how long it took.
async fn raw_bulk(env: &Env, t: &Tuning, params: LinkParams, bytes: u64, cap: Duration) -> Bulk {
    let (sid, st) = (env.id("b"), t.clone());
    let server = server_rt()
        .spawn(async move { endpoint("127.0.0.1:0".parse().unwrap(), &sid, &st).unwrap() })
        .await
        .unwrap();
    let saddr = server.local_addr().unwrap();
    let srv = server.clone();
    server_rt().spawn(async move {
        let Some(inc) = srv.accept().await else {
            return;
        };
        let Ok(conn) = inc.await else { return };
        let mut buf = vec![0u8; 64 << 10];
        rand::thread_rng().fill_bytes(&mut buf);
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
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
    let relay = start_relay(saddr, params).await;
    let target = relay.local_addr();
    let client = endpoint("127.0.0.1:0".parse().unwrap(), &env.id("a"), t).unwrap();
    let c2 = client.clone();
    let (got, secs) = tokio::spawn(async move {
        let conn = c2.connect(target, "b").unwrap().await.unwrap();
        let t0 = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes.to_le_bytes()).await.unwrap();
        send.finish().unwrap();
        let mut got = 0u64;
        let deadline = tokio::time::Instant::now() + cap;
        loop {
            match tokio::time::timeout_at(deadline, recv.read_chunk(1 << 20, true)).await {
                Ok(Ok(Some(c))) => got += c.bytes.len() as u64,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => panic!("read: {e}"),
                Err(_) => break,
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        conn.close(0u32.into(), b"");
        (got, secs)
    })
    .await
    .unwrap();
    client.wait_idle().await;
    server.close(0u32.into(), b"");
    let s = relay.stats();
    stop_relay(relay).await;
    Bulk {
        bytes: got,
        secs,
        drops_queue: s.dropped_queue,
        drops_loss: s.dropped_loss,
    }
}

fn mbit(bps: f64) -> String {
    format!("{:7.1} Mbit/s", bps * 8.0 / 1e6)
}

fn main() {
    // RUST_LOG (e.g. `pagewire::agent::pull=trace`: the bulk window): logs on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    runtime("receiving-side").block_on(run());
}

async fn run() {
    let mb: u64 = env_str("PAGEWIRE_BENCH_MB", "256").parse().unwrap();
    let cap = Duration::from_secs(env_str("PAGEWIRE_BENCH_SECS", "15").parse().unwrap());
    let rates: Vec<u64> = env_str("PAGEWIRE_BENCH_RATES", "200mbit,400mbit")
        .split(',')
        .map(|r| pagewire::wan::parse_rate(r).unwrap())
        .collect();
    let losses: Vec<f64> = env_str("PAGEWIRE_BENCH_LOSSES", "0,0.001,0.01")
        .split(',')
        .map(|l| l.parse().unwrap())
        .collect();
    let only = std::env::var("PAGEWIRE_BENCH_ONLY").ok();
    let run_part = |p: &str| only.as_deref().is_none_or(|o| o == p);
    let env = Env::new();
    let bytes = mb << 20;
    let delay = RTT / 2;
    let mut json = serde_json::Map::new();
    println!(
        "pagewire WAN tuning bench: raw quinn streams and agents through the WAN relay; \
         up to {mb} MiB or {}s per transfer",
        cap.as_secs()
    );

    if run_part("ceiling") {
        println!("\n1. relay ceiling (one raw quinn stream, default tuning)");
        let mut c = serde_json::Map::new();
        for (name, d) in [("no delay", Duration::ZERO), ("50 ms RTT", delay)] {
            let b = raw_bulk(&env, &Tuning::default(), link(None, 0.0, d), bytes, cap).await;
            let r = b.bytes as f64 / b.secs;
            println!(
                "   {name:10} no rate limit: {}  ({} MiB in {:.2}s, {} queue drops)",
                mbit(r),
                b.bytes >> 20,
                b.secs,
                b.drops_queue
            );
            c.insert(name.into(), serde_json::json!({"bps": r * 8.0}));
        }
        json.insert("ceiling".into(), c.into());
    }

    let tunings = std::env::var("PAGEWIRE_BENCH_TUNINGS").ok();
    let candidates: Vec<Option<Congestion>> = [
        None,
        Some(Congestion::Cubic),
        Some(Congestion::NewReno),
        Some(Congestion::Bbr),
    ]
    .into_iter()
    .filter(|c| {
        tunings
            .as_deref()
            .is_none_or(|t| t.split(',').any(|l| l == label(*c)))
    })
    .collect();
    if run_part("bulk") {
        println!("\n2. bulk throughput at 50 ms RTT (one raw quinn stream)");
        println!(
            "   {:>10} {:>6} {:>13} {:>15} {:>8} {:>11} {:>12}",
            "link", "loss", "tuning", "goodput", "x link", "x default", "drops q/l"
        );
        let mut rows = Vec::new();
        for &rate in &rates {
            let l = Link {
                bandwidth_bps: rate,
                rtt: RTT,
            };
            for &loss in &losses {
                let mut base = f64::NAN;
                for &c in &candidates {
                    let b = raw_bulk(
                        &env,
                        &tuning(c, l),
                        link(Some(rate), loss, delay),
                        bytes,
                        cap,
                    )
                    .await;
                    let bps = b.bytes as f64 / b.secs;
                    if c.is_none() {
                        base = bps;
                    }
                    let ratio_link = bps * 8.0 / rate as f64;
                    println!(
                        "   {:>10} {:>5.1}% {:>13} {} {:>7.2}x {:>10.2}x {:>6}/{:<5}",
                        format!("{}Mbit", rate / 1_000_000),
                        loss * 100.0,
                        label(c),
                        mbit(bps),
                        ratio_link,
                        bps / base,
                        b.drops_queue,
                        b.drops_loss
                    );
                    rows.push(serde_json::json!({
                        "rate_bps": rate, "loss": loss, "tuning": label(c),
                        "goodput_bps": bps * 8.0, "x_link": ratio_link, "x_default": bps / base,
                        "bytes": b.bytes, "secs": b.secs,
                        "drops_queue": b.drops_queue, "drops_loss": b.drops_loss,
                    }));
                }
            }
        }
        json.insert("bulk".into(), rows.into());
    }

    if run_part("fetch") {
        let rate = rates[0];
        println!(
            "\n3. urgent fetch of one 64 KiB chunk during a {mb} MiB pull, 50 ms RTT, {} Mbit/s, no loss (ms)",
            rate / 1_000_000
        );
        let region = env.data.path().join("region");
        {
            let f = std::fs::File::create(&region).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let mut buf = vec![0u8; 1 << 20];
            for i in 0..mb {
                rng.fill_bytes(&mut buf);
                f.write_all_at(&buf, i << 20).unwrap();
            }
        }
        let mut rows = Vec::new();
        let gains: Vec<Option<u16>> = match std::env::var("PAGEWIRE_BENCH_GAINS") {
            Ok(g) => g.split(',').map(|g| Some(g.parse().unwrap())).collect(),
            Err(_) => vec![None],
        };
        for &gain in &gains {
            for &c in &candidates {
                let window = match (gain, pagewire::agent::config::DEFAULT_BULK_WINDOW) {
                    (Some(gain_pct), Window::Auto { min, max, .. }) => {
                        Window::Auto { min, max, gain_pct }
                    }
                    (_, w) => w,
                };
                let r = fetch_during_pull(&env, &region, bytes, c, rate, delay, window).await;
                let gain_label = gain
                    .map(|g| format!(" gain {:.2}", g as f64 / 100.0))
                    .unwrap_or_default();
                println!(
                "   {:>13}{gain_label}: path RTT {:5.1}  idle fetch p50 {:5.1}  during pull p50 {:5.1} p99 {:5.1} (n={}, {} x RTT at p50)  pull {} (while fetching {}, RTT {:5.1})",
                label(c),
                r.rtt_ms,
                r.idle_p50,
                r.p50,
                r.p99,
                r.n,
                format_args!("{:.2}", r.p50 / r.rtt_ms),
                mbit(r.pull_bps),
                mbit(r.steady_bps),
                r.loaded_rtt
            );
                rows.push(serde_json::json!({
                "tuning": label(c), "gain_pct": gain, "window": format!("{window:?}"), "rtt_ms": r.rtt_ms, "idle_p50_ms": r.idle_p50,
                "p50_ms": r.p50, "p99_ms": r.p99, "n": r.n, "pull_bps": r.pull_bps * 8.0,
                "steady_bps": r.steady_bps * 8.0, "loaded_rtt_ms": r.loaded_rtt,
            }));
            }
        }
        let _ = std::fs::remove_file(&region);
        json.insert("fetch".into(), rows.into());
    }
    println!("\nBENCH_JSON {}", serde_json::Value::Object(json));
}

struct FetchResult {
    rtt_ms: f64,
    idle_p50: f64,
    p50: f64,
    p99: f64,
    /// The agents' smoothed RTT during the pull (median over the fetches).
    loaded_rtt: f64,
    n: usize,
    pull_bps: f64,
    /// Bulk rate while the fetches ran (after the first 2 s, up to 90 % done).
    steady_bps: f64,
}

async fn fetch_during_pull(
    env: &Env,
    region: &Path,
    size: u64,
    c: Option<Congestion>,
    rate: u64,
    delay: Duration,
    window: Window,
) -> FetchResult {
    let l = Link {
        bandwidth_bps: rate,
        rtt: RTT,
    };
    let t = tuning(c, l);
    let (pa, pb) = (free_port(), free_port());
    let direct = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    // Both agents may dial: one relay per dialing direction, same link parameters.
    let rb = start_relay(direct(pb), link(Some(rate), 0.0, delay)).await;
    let ra = start_relay(direct(pa), link(Some(rate), 0.0, delay)).await;
    let mut cb = env.config("b", pb, "a", ra.local_addr());
    cb.regions.push(("r".into(), region.to_path_buf()));
    cb.tuning = t.clone();
    let mut ca = env.config("a", pa, "b", rb.local_addr());
    ca.tuning = t;
    ca.bulk_window = window;
    let b = server_rt().spawn(Agent::start(cb)).await.unwrap().unwrap();
    let a = Agent::start(ca).await.unwrap();
    assert!(a.wait_connected("b", Duration::from_secs(20)).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let chunks = size / (64 << 10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut idle = Vec::new();
    for i in 0..25 {
        let t0 = Instant::now();
        a.fetch("b", "r", rng.gen_range(0..chunks)).await.unwrap();
        if i >= 5 {
            idle.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let rtt_ms = a
        .status()
        .peers
        .iter()
        .find(|p| p.name == "b")
        .and_then(|p| p.rtt_us)
        .map(|u| u as f64 / 1e3)
        .unwrap_or(f64::NAN);
    let to = env.data.path().join("pulled");
    let t0 = Instant::now();
    let h = a.pull("b", "r", &to).await.unwrap();
    // Let the bulk copy leave slow start first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut lat = Vec::new();
    let mut rtts = Vec::new();
    let (s0, t_s0) = (h.status().bytes_done, Instant::now());
    while h.status().bytes_done < size * 9 / 10 {
        let t1 = Instant::now();
        a.fetch("b", "r", rng.gen_range(0..chunks)).await.unwrap();
        lat.push(t1.elapsed().as_secs_f64() * 1e3);
        let rtt = a
            .status()
            .peers
            .iter()
            .find(|p| p.name == "b")
            .and_then(|p| p.rtt_us);
        rtts.extend(rtt.map(|u| u as f64 / 1e3));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let steady_bps = (h.status().bytes_done - s0) as f64 / t_s0.elapsed().as_secs_f64();
    h.wait().await.unwrap();
    let pull_bps = size as f64 / t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&to);
    a.shutdown().await;
    b.shutdown().await;
    stop_relay(ra).await;
    stop_relay(rb).await;
    FetchResult {
        rtt_ms,
        idle_p50: pct(&idle, 0.5),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        loaded_rtt: pct(&rtts, 0.5),
        n: lat.len(),
        pull_bps,
        steady_bps,
    }
}
