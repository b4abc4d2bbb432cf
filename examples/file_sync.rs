//! Replicate a file that other programs keep modifying with write(2): two agents on
//! loopback, the owner watches the file with inotify and finds the changed chunks by
//! xxh3 hash; the replica converges. The writers are separate processes (`dd
//! conv=notrunc` and this binary in `--scribble` mode), so nothing in the writing
//! programs knows about pagewire.
//!
//! ```text
//! cargo run --release --example file_sync [-- --size 64MiB --seconds 5 --tracker inotify]
//! ```
//!
//! On two hosts, the same with the CLI: `pagewire agent --region log=/data/log ...` on
//! both (the replica's file of the same size), then on the owner
//! `pagewire replicate --region log --to B --tracker inotify`.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use pagewire::agent::{Agent, ReplicateOptions};
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(about = "Replicate a file other processes modify with write(2) (replication demo)")]
struct Args {
    /// File size (at least 64KiB: the dd writer writes 64KiB blocks).
    #[arg(long, default_value = "64MiB", value_parser = file_size)]
    size: u64,
    /// How long the writers run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// inotify (write(2) by any process) or hash-scan (every chunk at every collection).
    #[arg(long, default_value = "inotify", value_parser = ["inotify", "hash-scan"])]
    tracker: String,
    /// Internal: be a writer process that scribbles on FILE for --seconds.
    #[arg(long, hide = true)]
    scribble: Option<PathBuf>,
}

fn sha256(path: &Path) -> Result<String> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let d = ring::digest::digest(&ring::digest::SHA256, &data);
    Ok(d.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writer process: random 4 KiB pieces with pwrite(2) at ~1000 writes/s.
fn scribble(path: &Path, seconds: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let size = f.metadata()?.len();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut buf = vec![0u8; 4096];
    while Instant::now() < end {
        let off = rng.gen_range(0..size.saturating_sub(4096).max(1));
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, off)?;
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn file_size(s: &str) -> Result<u64, String> {
    let n = pagewire::agent::config::parse_size(s)?;
    if n < 65536 {
        return Err(format!(
            "{s}: at least 64KiB (the dd writer writes 64KiB blocks)"
        ));
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(p) = &args.scribble {
        return scribble(p, args.seconds);
    }
    pagewire::demo::logs();
    let tmp = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let dir = tmp.path();
    pagewire::demo::certs(dir, &["a", "b"])?;
    let (src, dst) = (dir.join("log.owner"), dir.join("log.replica"));
    std::fs::File::create(&src)?.set_len(args.size)?;
    std::fs::File::create(&dst)?.set_len(args.size)?;
    let (pa, pb) = (pagewire::demo::free_port()?, pagewire::demo::free_port()?);
    let mut ca = pagewire::demo::config(dir, "a", pa, &[("b", pb)]);
    ca.regions.push(("log".into(), src.clone()));
    let mut cb = pagewire::demo::config(dir, "b", pb, &[("a", pa)]);
    cb.regions.push(("log".into(), dst.clone()));
    let b = Agent::start(cb).await.context("starting agent b")?;
    let a = Agent::start(ca).await.context("starting agent a")?;
    if !a.wait_connected("b", Duration::from_secs(10)).await {
        bail!("agents did not connect");
    }
    let opts = ReplicateOptions {
        to: vec!["b".into()],
        ..Default::default()
    };
    a.replicate_file("log", &args.tracker, None, &opts)?;
    println!(
        "replicating {} ({} bytes) from a to b with the {} tracker; writers: dd conv=notrunc and a pwrite(2) loop, for {} s",
        src.display(),
        args.size,
        args.tracker,
        args.seconds
    );
    let me = std::env::current_exe()?;
    let mut writer = Command::new(me)
        .arg("--scribble")
        .arg(&src)
        .args(["--seconds", &args.seconds.to_string()])
        .spawn()
        .context("starting the pwrite(2) writer")?;
    let t0 = Instant::now();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut dd_runs = 0;
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        // dd writes one 64 KiB block at a random block offset, not truncating.
        let blocks = (args.size / 65536).max(1);
        let seek = rng.gen_range(0..blocks);
        let st = Command::new("dd")
            .args([
                "if=/dev/urandom",
                "bs=64K",
                "count=1",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("of={}", src.display()))
            .arg(format!("seek={seek}"))
            .stdin(Stdio::null())
            .status();
        match st {
            Ok(s) if s.success() => dd_runs += 1,
            Ok(s) => bail!("dd failed: {s}"),
            Err(e) => {
                eprintln!("dd not available ({e}); only the pwrite(2) writer runs");
                break;
            }
        }
        let st = a.status();
        if let Some(r) = st.replications.first() {
            if let Some(l) = r.replicas.first() {
                let tty = std::io::stdout().is_terminal();
                if !tty && dd_runs % 10 != 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                print!(
                    "{}{:>5.1} s  epoch {:>4}  acked {:>4}  lag {:>9} bytes  sent {:>12} bytes{}",
                    if tty { "\r" } else { "" },
                    t0.elapsed().as_secs_f64(),
                    r.epoch,
                    l.acked_epoch,
                    l.lag_bytes,
                    l.bytes_sent,
                    if tty { "" } else { "\n" }
                );
                std::io::stdout().flush().ok();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!();
    let st = writer.wait()?;
    if !st.success() {
        bail!("the pwrite(2) writer failed: {st}");
    }
    let epoch = a.flush("log", Duration::from_secs(60)).await?;
    let (hs, hd) = (sha256(&src)?, sha256(&dst)?);
    println!("writers done ({dd_runs} dd runs); flushed at epoch {epoch}");
    println!("owner   sha256 {hs}");
    println!("replica sha256 {hd}");
    let r = a.status().replications.first().cloned();
    if let Some(l) = r.as_ref().and_then(|r| r.replicas.first()) {
        println!(
            "bytes sent {} ({:.1}% of the file), collect-to-applied p50 {:.1} ms p99 {:.1} ms",
            l.bytes_sent,
            l.bytes_sent as f64 * 100.0 / args.size as f64,
            l.apply_p50_ms.unwrap_or(f64::NAN),
            l.apply_p99_ms.unwrap_or(f64::NAN)
        );
    }
    a.shutdown().await;
    b.shutdown().await;
    if hs != hd {
        bail!("the replica did not converge");
    }
    println!("the replica converged");
    Ok(())
}
