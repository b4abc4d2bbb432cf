//! `pagewire-wan`: user-space WAN emulator (UDP relay adding delay, jitter,
//! loss and a rate limit). See `pagewire-wan --help` and `pagewire::wan`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use pagewire::wan::{
    parse_bytes, parse_duration, parse_rate, LinkParams, Relay, RelayConfig, RelayStats,
};

const AFTER_HELP: &str = "\
All impairments apply to EACH direction independently: --delay is the one-way
delay, so the round-trip time added by the relay is 2 x delay (e.g. --delay 25ms
gives a 50 ms RTT). --rate is a bottleneck per direction with a drop-tail queue
of --queue bytes; like netem's limit, the queue also holds packets waiting out
the delay, so keep it above rate x delay.

Example: emulate a 50 ms RTT, 100 Mbit/s, 0.1% loss path between two agents.
Agent A listens on 10.0.0.1:7000. Start the relay next to agent B:

  pagewire-wan --listen 127.0.0.1:7100 --upstream 10.0.0.1:7000 \\
      --delay 25ms --jitter 2ms --loss 0.001 --rate 100mbit

and give agent B `--peer a=127.0.0.1:7100` (the relay address) instead of
agent A's own address. Agent A sees agent B's traffic coming from the relay.
Only connections initiated by B towards A go through the relay.

Runs until SIGINT/SIGTERM, then prints the counters (JSON with --json).
Log level: RUST_LOG (default info), logs go to stderr.";

/// User-space WAN emulator: a UDP relay that adds delay, jitter, loss and a rate limit.
#[derive(Debug, Parser)]
#[command(name = "pagewire-wan", version, after_help = AFTER_HELP)]
struct Args {
    /// Address to listen on for clients (HOST:PORT, port 0 = ephemeral).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Address of the real server to forward to (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    upstream: String,
    /// One-way delay per direction (RTT = 2 x delay), e.g. 25ms, 1s, 500us.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    delay: Duration,
    /// Extra uniform random delay in [0, jitter] per packet (may reorder).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    jitter: Duration,
    /// Packet loss probability per direction, 0.0..=1.0 (0.01 = 1%).
    #[arg(long, default_value_t = 0.0, value_parser = parse_loss)]
    loss: f64,
    /// Bottleneck rate per direction: 100mbit, 1gbit, 10kbit, 1000000 (bit/s), 50MBps (bytes/s).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Drop-tail queue limit per direction: bytes or 64KiB, 4MiB, 1MB.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    queue: usize,
    /// Seed for the loss/jitter random generator (reproducible runs).
    #[arg(long)]
    seed: Option<u64>,
    /// Print the listen address and final stats as JSON lines on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_loss(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("invalid loss {s:?}: {e}"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("loss must be within 0.0..=1.0, got {v}"));
    }
    Ok(v)
}

async fn resolve(what: &str, s: &str) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(s)
        .await
        .with_context(|| format!("cannot resolve --{what} {s:?}"))?;
    match addrs.next() {
        Some(a) => Ok(a),
        None => bail!("--{what} {s:?} resolved to no address"),
    }
}

/// Future resolving on SIGINT or SIGTERM. The handlers are installed when
/// this is called (not when first polled), so no signal is missed after the
/// listen address has been announced.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Future resolving on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn stats_line(s: &RelayStats) -> String {
    format!(
        "to upstream: {} pkts / {} B; to client: {} pkts / {} B; dropped: {} loss, {} queue; send errors: {}; sessions: {}",
        s.packets_to_upstream,
        s.bytes_to_upstream,
        s.packets_to_client,
        s.bytes_to_client,
        s.dropped_loss,
        s.dropped_queue,
        s.send_errors,
        s.sessions
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let listen = resolve("listen", &args.listen).await?;
    let upstream = resolve("upstream", &args.upstream).await?;
    let params = LinkParams {
        delay: args.delay,
        jitter: args.jitter,
        loss: args.loss,
        rate_bps: args.rate,
        queue_bytes: args.queue,
    };
    let mut cfg = RelayConfig::symmetric(listen, upstream, params);
    cfg.seed = args.seed;
    let signal = shutdown_signal()?;
    let relay = Relay::start(cfg).await.context("starting relay")?;
    let bound = relay.local_addr();
    tracing::info!(listen = %bound, %upstream, "pagewire-wan listening");
    if args.json {
        println!("{}", serde_json::json!({ "listen": bound.to_string() }));
    }

    signal.await;
    tracing::info!("signal received, shutting down");
    let stats = relay.stats();
    relay.shutdown().await;
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        println!("pagewire-wan: {}", stats_line(&stats));
    }
    Ok(())
}
