//! Attach a region that lives on another host and read all of it at once: every page not
//! here yet is fetched the moment it is touched, while the rest streams in behind.
//!
//! ```text
//! cargo run --release --example lazy_reader -- --control /tmp/a.sock --from b --region demo \
//!     [--order random|seq] [--threads N] [--mechanism auto|userfaultfd|mprotect] [--json]
//! ```
//!
//! Prints the region's sha256 on a line of its own, then fault statistics; with `--json`
//! one JSON object with `sha256`, `first_touch_us`, `faults`, `fault_p50_us`,
//! `fault_p99_us`, `mbytes_per_s`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use pagewire::client::{attach, mount_status, AttachOptions};
use pagewire::fault::Mechanism;
use rand::seq::SliceRandom;

#[derive(Parser)]
#[command(about = "Attach a peer's region lazily and read it all (post-copy demo)")]
struct Args {
    /// The local agent's control socket.
    #[arg(long, default_value_os_t = pagewire::control::default_socket())]
    control: PathBuf,
    /// The peer that has the region.
    #[arg(long)]
    from: String,
    /// The region's name on that peer.
    #[arg(long)]
    region: String,
    /// Order in which pages are first touched.
    #[arg(long, default_value = "seq", value_parser = ["seq", "random"])]
    order: String,
    /// Threads touching pages at once (pages are dealt out round-robin).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// auto, userfaultfd or mprotect.
    #[arg(long, default_value = "auto", value_parser = Mechanism::parse)]
    mechanism: Mechanism,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let mut opts = AttachOptions::new(&args.control, &args.from, &args.region);
    opts.mechanism = args.mechanism;
    let t0 = Instant::now();
    let m = attach(&opts).context("attaching")?;
    let attach_us = t0.elapsed().as_micros() as u64;
    let len = m.len();
    let page = 4096usize;
    let pages = len.div_ceil(page);
    let mut order: Vec<usize> = (0..pages).collect();
    if args.order == "random" {
        order.shuffle(&mut rand::thread_rng());
    }
    // First touch: one byte of the first page in the order.
    let t1 = Instant::now();
    let mut first_touch_us = 0;
    if let Some(&p) = order.first() {
        let mut b = [0u8; 1];
        m.read_at(p * page, &mut b);
        first_touch_us = t1.elapsed().as_micros() as u64;
    }
    std::thread::scope(|s| {
        for t in 0..args.threads {
            let (order, m) = (&order, &m);
            s.spawn(move || {
                let mut buf = vec![0u8; page];
                for &p in order.iter().skip(t).step_by(args.threads) {
                    let off = p * page;
                    let n = page.min(len - off);
                    m.read_at(off, &mut buf[..n]);
                }
            });
        }
    });
    let read_s = t1.elapsed().as_secs_f64();
    // Every page has been touched, so all of it is here: hash it in order.
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = buf.len().min(len - off);
        m.read_at(off, &mut buf[..n]);
        ctx.update(&buf[..n]);
        off += n;
    }
    let sha: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The agent's fault statistics for this mount (give its counters a moment to settle).
    let _ = m.wait_complete(Some(Duration::from_millis(50)));
    let st = mount_status(&args.control, m.id())?;
    let mechanism = m.mechanism();
    let complete = m.is_complete();
    m.detach();
    let mbps = len as f64 / read_s / 1e6;
    let (faults, p50, p99) = st
        .as_ref()
        .map(|s| (s.faults, s.fault_p50_us, s.fault_p99_us))
        .unwrap_or((0, None, None));
    if args.json {
        let v = serde_json::json!({
            "sha256": sha,
            "bytes": len,
            "mechanism": mechanism.name(),
            "order": args.order,
            "threads": args.threads,
            "attach_us": attach_us,
            "first_touch_us": first_touch_us,
            "faults": faults,
            "fault_p50_us": p50,
            "fault_p99_us": p99,
            "mbytes_per_s": mbps,
            "complete_when_read": complete,
        });
        println!("{v}");
    } else {
        println!("{sha}");
        println!(
            "{} bytes read in {} order by {} thread(s) with {} in {:.3}s ({:.1} MB/s); attach {} us, first touch {} us; {} faults served by the agent (p50 {} us, p99 {} us)",
            len,
            args.order,
            args.threads,
            mechanism.name(),
            read_s,
            mbps,
            attach_us,
            first_touch_us,
            faults,
            p50.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            p99.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}
