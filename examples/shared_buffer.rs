//! A shared buffer synced between hosts: a writer changes a table of counters in memory
//! it published; a reader on another agent sees the same bytes shortly after and checks
//! a checksum per epoch. The writer never says what it wrote: the agent's dirty tracker
//! finds it.
//!
//! One machine, one command (two agents on loopback, writer and reader threads):
//! ```text
//! cargo run --release --example shared_buffer [-- --rounds 20 --size 1MiB --tracker auto]
//! ```
//! Two hosts, the same binary (agents started with `pagewire agent`; the reader's agent
//! serves a file of the same size as region NAME, e.g. `truncate -s 1M /dev/shm/canvas`
//! and `--region canvas=/dev/shm/canvas`):
//! ```text
//! host B: shared_buffer --role reader --control /run/pagewire.sock --region canvas
//! host A: shared_buffer --role writer --control /run/pagewire.sock --region canvas --to B
//! ```
//!
//! Layout: `size - 64` bytes of u64 counters, then a trailer (magic, generation, xxh3 of
//! the counters). The agent applies an epoch's pieces in offset order, so the trailer
//! lands last: a reader that sees the same trailer before and after reading the counters,
//! and a matching checksum, has a consistent view of that generation.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use pagewire::agent::Agent;
use pagewire::client::publish::{publish, PublishOptions, TrackerKind};
use pagewire::client::replica::open_replica;
use rand::{Rng, SeedableRng};

const MAGIC: u64 = 0x7061_6765_7769_7265; // "pagewire"
const TRAILER: usize = 64;

#[derive(Parser, Clone)]
#[command(about = "Sync a shared in-memory buffer between two agents (replication demo)")]
struct Args {
    /// `demo` (both sides here, two agents on loopback), `writer` or `reader`.
    #[arg(long, default_value = "demo", value_parser = ["demo", "writer", "reader"])]
    role: String,
    /// The local agent's control socket (writer/reader roles).
    #[arg(long)]
    control: Option<PathBuf>,
    /// The region's name (served by every agent, published by the writer).
    #[arg(long, default_value = "canvas")]
    region: String,
    /// Replica peers (writer role).
    #[arg(long)]
    to: Vec<String>,
    /// Buffer size: a multiple of 4KiB, at least 8KiB.
    #[arg(long, default_value = "1MiB", value_parser = buffer_size)]
    size: u64,
    /// Generations the writer makes (and the reader checks).
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Counters changed per generation.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// auto, uffd-wp-async, uffd-wp-sync or mprotect.
    #[arg(long, default_value = "auto", value_parser = TrackerKind::parse)]
    tracker: TrackerKind,
}

fn trailer(buf: &[u8]) -> (u64, u64, u64) {
    let t = &buf[buf.len() - TRAILER..];
    let u = |i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    (u(0), u(1), u(2))
}

fn writer(args: &Args, control: PathBuf) -> Result<()> {
    let to: Vec<&str> = args.to.iter().map(|s| s.as_str()).collect();
    if to.is_empty() {
        bail!("--to PEER is required for the writer");
    }
    let mut o = PublishOptions::new(control, &args.region, args.size, &to);
    o.tracker = args.tracker;
    let p = publish(&o).context("publishing")?;
    println!(
        "writer: published {} ({} bytes) to {} with the {} tracker",
        args.region,
        args.size,
        to.join(", "),
        p.tracker().name()
    );
    let n = (p.len() - TRAILER) / 8;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut counters = vec![0u64; n];
    for gen in 1..=args.rounds {
        for _ in 0..args.changes {
            let i = rng.gen_range(0..n);
            counters[i] += 1;
            p.write_at(i * 8, &counters[i].to_le_bytes());
        }
        let mut data = vec![0u8; n * 8];
        p.read_at(0, &mut data);
        let sum = xxhash_rust::xxh3::xxh3_64(&data);
        let mut t = [0u8; TRAILER];
        t[..8].copy_from_slice(&MAGIC.to_le_bytes());
        t[8..16].copy_from_slice(&gen.to_le_bytes());
        t[16..24].copy_from_slice(&sum.to_le_bytes());
        p.write_at(p.len() - TRAILER, &t);
        let t0 = Instant::now();
        let epoch = p.flush(Duration::from_secs(30)).context("flush")?;
        println!(
            "writer: generation {gen:>3}: {} counters changed, checksum {sum:016x}, epoch {epoch} applied by every replica in {:.1} ms",
            args.changes,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}

fn reader(args: &Args, control: PathBuf) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let r = loop {
        match open_replica(&control, &args.region) {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut buf = vec![0u8; r.len()];
    let mut seen = 0u64;
    let mut torn = 0u64;
    let mut checked = 0u64;
    // The owner's first catch-up, before anything can be checked.
    r.wait_epoch(0, Duration::from_secs(60))
        .context("waiting for the first catch-up")?;
    loop {
        let e = r.epoch()?;
        // Trailer, counters, trailer again: equal trailers and a matching checksum mean
        // a consistent generation.
        loop {
            let mut t1 = [0u8; TRAILER];
            r.read_at(r.len() - TRAILER, &mut t1);
            r.read_at(0, &mut buf);
            let (m, gen, sum) = trailer(&buf);
            if m != MAGIC {
                break; // nothing written yet
            }
            let same = buf[buf.len() - TRAILER..] == t1;
            let actual = xxhash_rust::xxh3::xxh3_64(&buf[..buf.len() - TRAILER]);
            if same && actual == sum {
                if gen > seen {
                    println!("reader: epoch {e:>3}: generation {gen:>3}, checksum {sum:016x} ok");
                    seen = gen;
                    checked += 1;
                }
                break;
            }
            torn += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        if seen >= args.rounds {
            break;
        }
        r.wait_epoch(e + 1, Duration::from_secs(30))
            .context("waiting for the next epoch")?;
    }
    println!("reader: {checked} generations checked, {torn} reads retried mid-epoch");
    Ok(checked)
}

/// Sizes the layout (u64 counters, then the trailer) and the page-granular tracking fit.
fn buffer_size(s: &str) -> Result<u64, String> {
    let n = pagewire::agent::config::parse_size(s)?;
    if n < 8192 || n % 4096 != 0 {
        return Err(format!(
            "{s}: the buffer must be a multiple of 4KiB, at least 8KiB"
        ));
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> Result<()> {
    pagewire::demo::logs();
    let args = Args::parse();
    match args.role.as_str() {
        "writer" => {
            let c = args
                .control
                .clone()
                .unwrap_or_else(pagewire::control::default_socket);
            return tokio::task::spawn_blocking(move || writer(&args, c)).await?;
        }
        "reader" => {
            let c = args
                .control
                .clone()
                .unwrap_or_else(pagewire::control::default_socket);
            return tokio::task::spawn_blocking(move || reader(&args, c).map(|_| ())).await?;
        }
        _ => {}
    }
    // Demo: agents a (writer's host) and b (reader's host) on loopback.
    let tmp = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let dir = tmp.path();
    pagewire::demo::certs(dir, &["a", "b"])?;
    let (pa, pb) = (pagewire::demo::free_port()?, pagewire::demo::free_port()?);
    let copy = dir.join("canvas.replica");
    std::fs::File::create(&copy)?.set_len(args.size)?;
    let mut cb = pagewire::demo::config(dir, "b", pb, &[("a", pa)]);
    cb.regions.push((args.region.clone(), copy));
    let b = Agent::start(cb).await.context("starting agent b")?;
    let a = Agent::start(pagewire::demo::config(dir, "a", pa, &[("b", pb)]))
        .await
        .context("starting agent a")?;
    if !a.wait_connected("b", Duration::from_secs(10)).await {
        bail!("agents did not connect");
    }
    println!("agents a and b up on loopback; a's app writes, b's app reads");
    let mut wa = args.clone();
    wa.to = vec!["b".into()];
    let (ca, cb) = (dir.join("a.sock"), dir.join("b.sock"));
    let ra = args.clone();
    let rd = tokio::task::spawn_blocking(move || reader(&ra, cb));
    let wr = tokio::task::spawn_blocking(move || writer(&wa, ca));
    wr.await??;
    let checked = rd.await??;
    a.shutdown().await;
    b.shutdown().await;
    if checked == 0 {
        bail!("the reader never saw a consistent generation");
    }
    println!("done: the reader saw the writer's generations with matching checksums");
    Ok(())
}
