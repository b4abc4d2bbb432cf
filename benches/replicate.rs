//! Replication lag (issue 4, benchmark 2): an application publishes a region and writes
//! random pages at a steady rate (10k and 100k dirty pages/s); a checker reads the
//! replica's copy and times each sampled write from the store on the writer to the
//! moment its bytes are visible on the replica. On loopback and through the project's
//! WAN relay at 25 ms RTT.
//!
//! Baselines in the same run: the path's round trip (an urgent fetch of one chunk on
//! the idle connection) and the collect interval; a write waits on average half an
//! interval to be collected, then one trip to be applied.
//!
//! `cargo bench --bench replicate` (PAGEWIRE_BENCH_MB region size, default 256;
//! PAGEWIRE_BENCH_SECS per run, default 5). Prints a table and one `BENCH_JSON` line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagewire::agent::Agent;
use pagewire::client::publish::{publish, PublishOptions, TrackerKind};
use pagewire::client::replica::open_replica;
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::{Rng, SeedableRng};

const INTERVAL: Duration = Duration::from_millis(50);

struct Run {
    rtt_ms: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
    samples: usize,
    unseen: usize,
    dirty_pages: u64,
    bytes_sent: u64,
    collect_applied_p50_ms: f64,
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn run(size: u64, rate: u64, delay: Duration, secs: u64) -> anyhow::Result<Run> {
    let tmp = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let dir = tmp.path();
    pagewire::demo::certs(dir, &["a", "b"])?;
    let dst = dir.join("replica");
    std::fs::File::create(&dst)?.set_len(size)?;
    let (pa, pb) = (pagewire::demo::free_port()?, pagewire::demo::free_port()?);
    let link = LinkParams {
        delay,
        ..Default::default()
    };
    let any = "127.0.0.1:0".parse()?;
    let to_b = Relay::start(RelayConfig::symmetric(
        any,
        format!("127.0.0.1:{pb}").parse()?,
        link.clone(),
    ))
    .await?;
    let to_a = Relay::start(RelayConfig::symmetric(
        any,
        format!("127.0.0.1:{pa}").parse()?,
        link,
    ))
    .await?;
    let mut cb = pagewire::demo::config(dir, "b", pb, &[("a", to_a.local_addr().port())]);
    cb.regions.push(("r".into(), dst.clone()));
    let ca = pagewire::demo::config(dir, "a", pa, &[("b", to_b.local_addr().port())]);
    let b = Agent::start(cb).await?;
    let a = std::sync::Arc::new(Agent::start(ca).await?);
    anyhow::ensure!(
        a.wait_connected("b", Duration::from_secs(20)).await,
        "agents did not connect"
    );
    // Baseline: the path's round trip, an urgent fetch of one chunk of b's region.
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        a.fetch("b", "r", 0).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rtts.sort_by(|x, y| x.total_cmp(y));
    let rtt_ms = pct(&rtts, 0.5);

    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let agent = a.clone();
    type Out = (
        Vec<f64>,
        usize,
        u64,
        Option<pagewire::control::ReplicaLinkStatus>,
    );
    let res = tokio::task::spawn_blocking(move || -> anyhow::Result<Out> {
        let mut o = PublishOptions::new(&sock_a, "r", size, &["b"]);
        o.tracker = TrackerKind::Auto;
        o.interval = INTERVAL;
        let p = publish(&o)?;
        p.flush(Duration::from_secs(60))?;
        let r = open_replica(&sock_b, "r")?;
        let page = 4096usize;
        let pages = p.len() / page;
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<(usize, u64, Instant)>();
        let mut lags = Vec::new();
        let mut unseen = 0;
        let mut dirty = 0u64;
        std::thread::scope(|s| {
            // Writer: `rate` pages/s in 1 ms steps; every write stores a rising sequence
            // number at the start of its page; about 2000 writes/s are sampled.
            let w = s.spawn(|| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(1);
                let per_ms = (rate / 1000).max(1);
                let sample_every = (rate / 2000).max(1);
                let start = Instant::now();
                let mut seq = 0u64;
                let mut step = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..per_ms {
                        seq += 1;
                        let pg = rng.gen_range(0..pages);
                        p.write_at(pg * page, &seq.to_le_bytes());
                        if seq % sample_every == 0 {
                            let _ = tx.send((pg, seq, Instant::now()));
                        }
                    }
                    step += 1;
                    let next = start + Duration::from_millis(step);
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                drop(tx);
                seq
            });
            // Checker: polls the replica for each sample until it shows that sequence
            // number or a later one (a later write to the same page covers it).
            let mut pending: Vec<(usize, u64, Instant)> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut closed = false;
            loop {
                loop {
                    match rx.try_recv() {
                        Ok(x) => pending.push(x),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                let now = Instant::now();
                pending.retain(|&(pg, seq, t)| {
                    let mut b = [0u8; 8];
                    r.read_at(pg * page, &mut b);
                    if u64::from_le_bytes(b) >= seq {
                        lags.push(now.duration_since(t).as_secs_f64() * 1e3);
                        false
                    } else {
                        true
                    }
                });
                if Instant::now() > deadline {
                    stop.store(true, Ordering::Relaxed);
                }
                if closed
                    && (pending.is_empty() || Instant::now() > deadline + Duration::from_secs(10))
                {
                    unseen = pending.len();
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            dirty = w.join().unwrap_or(0);
        });
        // The replica's figures, before the publication ends with `p`.
        let l = agent
            .status()
            .replications
            .first()
            .and_then(|r| r.replicas.first())
            .cloned();
        Ok((lags, unseen, dirty, l))
    })
    .await??;
    let (mut lags, unseen, dirty_pages, l) = res;
    lags.sort_by(|x, y| x.total_cmp(y));
    if let Ok(a) = std::sync::Arc::try_unwrap(a) {
        a.shutdown().await;
    }
    b.shutdown().await;
    to_a.shutdown().await;
    to_b.shutdown().await;
    Ok(Run {
        rtt_ms,
        lag_p50_ms: pct(&lags, 0.5),
        lag_p99_ms: pct(&lags, 0.99),
        lag_max_ms: lags.last().copied().unwrap_or(f64::NAN),
        samples: lags.len(),
        unseen,
        dirty_pages,
        bytes_sent: l.as_ref().map(|l| l.bytes_sent).unwrap_or(0),
        collect_applied_p50_ms: l.and_then(|l| l.apply_p50_ms).unwrap_or(f64::NAN),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mb: u64 = std::env::var("PAGEWIRE_BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let secs: u64 = std::env::var("PAGEWIRE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "replication lag, write on the owner -> visible on the replica; {mb} MiB region, \
         collect every {} ms, {secs} s per run, random pages",
        INTERVAL.as_millis()
    );
    println!(
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>12}",
        "path",
        "pages/s",
        "rtt ms",
        "lag p50",
        "lag p99",
        "lag max",
        "c->a p50",
        "samples",
        "sent/written"
    );
    let mut json = Vec::new();
    let only = std::env::var("PAGEWIRE_BENCH_CASE").ok();
    for (name, delay) in [
        ("loopback", Duration::ZERO),
        ("25ms RTT", Duration::from_micros(12_500)),
    ] {
        for rate in [10_000u64, 100_000] {
            if only
                .as_ref()
                .is_some_and(|o| *o != format!("{name}-{rate}"))
            {
                continue;
            }
            let r = run(mb << 20, rate, delay, secs).await?;
            let ratio = r.bytes_sent as f64 / (r.dirty_pages.max(1) * 4096) as f64;
            println!(
                "  {name:<10} {rate:>9} {:>9.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>12.2}{}",
                r.rtt_ms,
                r.lag_p50_ms,
                r.lag_p99_ms,
                r.lag_max_ms,
                r.collect_applied_p50_ms,
                r.samples,
                ratio,
                if r.unseen > 0 {
                    format!("  ({} samples never seen)", r.unseen)
                } else {
                    String::new()
                }
            );
            json.push(serde_json::json!({
                "path": name, "pages_per_s": rate, "rtt_ms": r.rtt_ms,
                "lag_p50_ms": r.lag_p50_ms, "lag_p99_ms": r.lag_p99_ms,
                "lag_max_ms": r.lag_max_ms, "collect_to_applied_p50_ms": r.collect_applied_p50_ms,
                "samples": r.samples, "unseen": r.unseen, "bytes_sent": r.bytes_sent,
                "dirty_pages": r.dirty_pages,
            }));
        }
    }
    println!(
        "  (expected floor: interval/2 + rtt/2 + apply; c->a = collect to applied, from the agent's status)"
    );
    println!("BENCH_JSON {}", serde_json::Value::Array(json));
    Ok(())
}
