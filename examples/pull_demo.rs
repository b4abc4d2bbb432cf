//! Demo: two agents on loopback, one serving a region, the other pulling it with a
//! progress bar — the same control-socket path `pagewire pull` uses.
//!
//! `cargo run --release --example pull_demo [-- --size 1GiB]`
//!
//! Everything (certificates, the region file, control sockets) lives in a temp dir that
//! is removed at the end.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pagewire::agent::config::parse_size;
use pagewire::agent::Agent;
use pagewire::control::{ControlClient, PullArgs};
use pagewire::demo::{config, free_port};
use pagewire::progress::TransferBar;
use rand::{RngCore, SeedableRng};

fn usage(code: i32) -> ! {
    eprintln!(
        "usage: pull_demo [--size SIZE]   (default 1GiB; e.g. 64MiB, 4GiB)\n\n\
         Starts agents a and b on loopback with certificates made in a temp dir; b serves a\n\
         region of SIZE (random pages, a zero stretch in the middle), a pulls it into a file\n\
         through its control socket with a progress bar, then the copy's blake3 is checked."
    );
    std::process::exit(code)
}

/// A region that looks like memory: mostly random pages, with a zero stretch in the middle
/// (zero chunks are sent as markers, not data).
fn make_region(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        // Leave [40%, 60%) of the region zero.
        if !(size * 2 / 5..size * 3 / 5).contains(&off) {
            rng.fill_bytes(&mut buf[..n]);
            f.write_all_at(&buf[..n], off)?;
        }
        off += n as u64;
    }
    Ok(())
}

fn blake3_file(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut size = 1u64 << 30;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => {
                let v = args.next().unwrap_or_else(|| usage(2));
                size = parse_size(&v).map_err(anyhow::Error::msg)?;
                if size == 0 {
                    anyhow::bail!("--size must be more than 0");
                }
            }
            "-h" | "--help" => usage(0),
            _ => usage(2),
        }
    }
    pagewire::demo::logs();

    let tmp = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let dir = tmp.path();
    println!("working in {}", dir.display());
    pagewire::demo::certs(dir, &["a", "b"])?;
    println!("made a CA and certificates for agents a and b");

    let region = dir.join("region.bin");
    make_region(&region, size)?;
    println!(
        "agent b serves a {} MiB region (20% of it zero)",
        size >> 20
    );

    let (pa, pb) = (free_port()?, free_port()?);
    let mut cb = config(dir, "b", pb, &[("a", pa)]);
    cb.regions.push(("demo".into(), region.clone()));
    let b = Agent::start(cb).await.context("starting agent b")?;
    let a = Agent::start(config(dir, "a", pa, &[("b", pb)]))
        .await
        .context("starting agent a")?;
    if !a.wait_connected("b", Duration::from_secs(10)).await {
        bail!("agents did not connect");
    }
    println!(
        "agents up: a on {}, b on {}, connected over QUIC with mutual TLS",
        a.local_addr(),
        b.local_addr()
    );

    let to = dir.join("pulled.bin");
    println!("a pulls region demo from b (through a's control socket, like `pagewire pull`):");
    let bar = TransferBar::new("b:demo");
    let client = ControlClient::connect(&dir.join("a.sock")).await?;
    let summary = client
        .pull(
            PullArgs {
                from: "b".into(),
                region: "demo".into(),
                to: to.clone(),
            },
            |s| bar.update(s),
        )
        .await?;
    bar.finish();
    println!(
        "pulled {} MiB in {:.2} s ({:.0} MiB/s): {} data chunks, {} zero chunks sent as markers, {} MiB on the wire",
        summary.size >> 20,
        summary.elapsed_s,
        summary.rate_bps / (1 << 20) as f64,
        summary.data_chunks,
        summary.zero_chunks,
        summary.wire_bytes >> 20
    );
    let (h1, h2) = (blake3_file(&region)?, blake3_file(&to)?);
    println!("blake3 source {h1}\nblake3 copy   {h2}");
    let st = ControlClient::connect(&dir.join("a.sock"))
        .await?
        .status()
        .await?;
    let p = &st.peers[0];
    println!(
        "status of a: peer {} connected={} rtt={} µs, {} transfer(s) recorded",
        p.name,
        p.connected,
        p.rtt_us.unwrap_or(0),
        st.transfers.len()
    );
    a.shutdown().await;
    b.shutdown().await;
    if h1 != h2 {
        bail!("the copy differs from the source");
    }
    println!("copy is byte-exact");
    Ok(())
}
