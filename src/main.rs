//! The `pagewire` command line: certificates, the agent, and commands that drive a local
//! agent through its control socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use pagewire::agent::config::{parse_duration, parse_pair, parse_size};
use pagewire::agent::{Agent, AgentConfig, Overrides};
use pagewire::control::{default_socket, ControlClient, PullArgs, StatusReport};
use pagewire::progress::TransferBar;
use pagewire::wan::parse_rate;

#[derive(Parser)]
#[command(
    name = "pagewire",
    version,
    about = "Replicate and live-migrate Linux memory regions between hosts over QUIC",
    long_about = "Replicate and live-migrate Linux memory regions between hosts over QUIC.\n\n\
Run one agent per host (`pagewire agent`), each started with its peers' names and addresses \
and certificates from a shared CA (`pagewire certs`). Other commands talk to the local agent \
over its Unix control socket (--control, default $PAGEWIRE_CONTROL, else \
$XDG_RUNTIME_DIR/pagewire.sock, else /tmp/pagewire-UID.sock).\n\n\
Logs go to stderr (RUST_LOG=debug for more); --json output goes to stdout: one JSON object, \
also on failure ({\"error\": ...}, exit code 1)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a development CA and node certificates (mutual TLS between agents).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Run an agent until SIGINT/SIGTERM.
    Agent(AgentArgs),
    /// Copy a whole region from a peer into a local file, through the local agent.
    Pull(PullCmd),
    /// Show the local agent's peers, regions, transfers and mounts.
    Status(StatusCmd),
    /// Attach a peer's region lazily into a local file and fill it completely: the file
    /// is mapped at once (pages fetched when touched, userfaultfd on tmpfs, mprotect
    /// elsewhere) while the rest streams in behind.
    Mount(MountCmd),
    /// Replicate a region this agent serves to peers, continuously: changes are found by a
    /// tracker and pushed in numbered epochs; returns once every replica has caught up
    /// (the agent keeps replicating until it stops, or until `--stop`). Each replica must
    /// serve a region of the same name and size (--region NAME=PATH on its agent).
    Replicate(ReplicateCmd),
    /// On the owner: push everything written so far and wait until every replica has
    /// applied it; prints the epoch.
    Flush(FlushCmd),
    /// On a replica: print the last epoch of a region applied in full (--wait N: wait for
    /// epoch N first); fails while nothing was applied. On the owner: its current epoch.
    Epoch(EpochCmd),
    /// Live-migrate a region this agent serves (a file, or memory an application
    /// published with the client library) to a peer that serves a region of the same name
    /// and size, waits for it in `pagewire receive`, or has an application receiving it
    /// (client::receive): pre-copy rounds
    /// while the writer runs, freeze, final sync, handover (the peer owns the region; this
    /// agent no longer does), post-copy with --postcopy. Progress on stderr; --json prints
    /// the report on stdout.
    Migrate(MigrateCmd),
    /// On the destination host: receive a region a peer migrates here into a file (the
    /// other side of `migrate`, for command-line users).
    ///
    /// The region may be a file region or memory an application published on the peer.
    /// The local agent asks the peer for the region's size, creates PATH (or takes
    /// an empty file, or one of exactly that size: it is overwritten), serves it as the
    /// migration's target (accepted from --from only), and this command waits until the
    /// agent owns the region with every chunk; then the agent serves it from PATH (add
    /// --region NAME=PATH to its config to keep doing so after a restart). Run `pagewire
    /// migrate` on the source once this waits. Pre-copy only: --postcopy needs an
    /// application receiving the region (client::receive). Interrupting it before the
    /// migration starts withdraws the target. Progress on stderr; --json prints the report.
    Receive(ReceiveCmd),
}

/// `--control`, for every command that talks to the local agent.
#[derive(Args)]
struct ControlArg {
    /// The local agent's control socket (default: $PAGEWIRE_CONTROL, else
    /// $XDG_RUNTIME_DIR/pagewire.sock, else /tmp/pagewire-UID.sock).
    #[arg(long)]
    control: Option<PathBuf>,
}

impl ControlArg {
    fn socket(self) -> PathBuf {
        self.control.unwrap_or_else(default_socket)
    }
}

#[derive(Args)]
struct ReceiveCmd {
    /// The peer the region is migrated from (its current owner).
    #[arg(long)]
    from: String,
    /// The region's name (on that peer, and here once received).
    #[arg(long)]
    region: String,
    /// The file to receive it into (created with mode 0600 if absent).
    #[arg(long)]
    to: PathBuf,
    /// Give up if no migration completed within this long (default: wait until one does).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Print the report as one JSON object on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

#[derive(Args)]
struct MigrateCmd {
    /// The region (served by the local agent).
    #[arg(long)]
    region: String,
    /// The destination peer (serving a region of the same name and size).
    #[arg(long)]
    to: String,
    /// Switch over once the predicted downtime (freeze to resume) fits this.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    downtime_budget: Duration,
    /// Pre-copy rounds at most (round 0 is the full copy).
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Stop pre-copy and switch over after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    max_time: Duration,
    /// Freeze the writer with SIGSTOP of this process before the final sync (SIGCONT if
    /// the migration aborts; after a successful migration it STAYS STOPPED, since it must
    /// not write the old copy: kill it or restart it against the new owner). Without it,
    /// the final snapshot is the freeze and writes made after it are not migrated.
    #[arg(long, conflicts_with = "freeze_writes")]
    freeze_pid: Option<i32>,
    /// Freeze by write-protecting the region: every thread of the application that
    /// stores to it stops at its next store (reads go on). For memory an application
    /// published with the client library (any tracker). Released if the migration aborts; after
    /// a successful migration the writers STAY HELD until the application ends its
    /// publication or exits. Cost, in the downtime: with the default tracker
    /// (uffd-wp-async) the whole region is made read-only (~30 ms per populated GiB on a
    /// small VM); with uffd-wp-sync only the pages written since the last collect.
    #[arg(long)]
    freeze_writes: bool,
    /// Cap the rate of chunk data sent to the peer (e.g. 200mbit, 50MBps), in every phase
    /// including the final sync (a low cap lengthens the downtime). Default: no cap.
    #[arg(long, value_parser = parse_max_bandwidth)]
    max_bandwidth: Option<u64>,
    /// Post-copy: switch over once the predicted downtime fits the budget even with
    /// chunks still stale; an application receiving the region on the peer
    /// (client::receive) runs at once and faults them in from here, and this agent keeps
    /// serving them until the peer has every chunk. Without it, everything is copied
    /// before the handover (longer downtime under heavy writers, but nothing depends on
    /// this host afterwards).
    #[arg(long)]
    postcopy: bool,
    /// File regions: promise that nothing writes the file through a shared mapping while
    /// it migrates (writers use write(2), which inotify reports). Then the file is
    /// re-read to find changes only after an inotify event, and an idle file's downtime
    /// no longer includes a pass over the whole file (~0.1 s per GiB here). A broken
    /// promise LOSES the mmap writes made since the last pass. Default: every collection
    /// re-reads the whole file.
    #[arg(long)]
    no_mmap_writers: bool,
    /// Print the report as one JSON object on stdout (progress stays on stderr):
    /// outcome, total_ms, downtime_ms, downtime_error_ms (its bound; null when
    /// estimated), bytes_sent, rounds, postcopy_faults, deferred_chunks and more.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

#[derive(Args)]
struct ReplicateCmd {
    /// The region (served by the local agent).
    #[arg(long)]
    region: String,
    /// Replica peers; repeatable.
    #[arg(long = "to", required_unless_present = "stop")]
    to: Vec<String>,
    /// Stop replicating the region instead (to change its replicas or settings, stop it,
    /// then start it anew). Every replica is told and keeps what it applied; its
    /// `pagewire status` says the replication ended, and `pagewire epoch --wait` there
    /// fails at once rather than waiting.
    #[arg(long, conflicts_with = "to")]
    stop: bool,
    /// How changes are found: inotify (write(2) by any process, plus a periodic hash scan
    /// for writes through mmaps) or hash-scan (hash every chunk at every collection).
    #[arg(long, default_value = "inotify", value_parser = ["inotify", "hash-scan"])]
    tracker: String,
    /// How often changes are collected and pushed.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    interval: Duration,
    /// With inotify: hash-scan the whole file this often too (0 = never).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    scan_interval: Duration,
    /// Most bytes queued for one replica before it is cut loose and caught up by hash.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    window: u64,
    /// Print the result as JSON on stdout (for scripts) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

#[derive(Args)]
struct FlushCmd {
    /// The replicated region (owned by this agent).
    #[arg(long)]
    region: String,
    /// Give up after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the result as JSON on stdout (for scripts) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

#[derive(Args)]
struct EpochCmd {
    /// The region this agent holds a replica of (on its owner: the epoch it replicates).
    #[arg(long)]
    region: String,
    /// Wait until this epoch is applied.
    #[arg(long)]
    wait: Option<u64>,
    /// With --wait: give up after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the result as JSON on stdout (for scripts) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create DIR/ca.pem and DIR/ca.key (keep ca.key private; it only signs).
    Init {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create DIR/NAME.pem and DIR/NAME.key for node NAME, signed by DIR/ca.*.
    Issue {
        /// The node's name: its identity in the mesh (letters, digits, '-', '.').
        name: String,
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Extra subject-alt-names (host names or IPs); repeatable. They do not change
        /// the identity.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days (1 to 36500).
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// TOML config file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's name (must match its certificate).
    #[arg(long)]
    name: Option<String>,
    /// UDP address to listen on, HOST:PORT.
    #[arg(long)]
    listen: Option<String>,
    /// Directory with ca.pem, NAME.pem, NAME.key.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// CA certificate (default CERTS/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Node certificate (default CERTS/NAME.pem).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Node private key (default CERTS/NAME.key).
    #[arg(long)]
    key: Option<PathBuf>,
    /// A peer, NAME=HOST:PORT; repeatable. Only listed peers may connect, and each peer
    /// must list this agent too.
    #[arg(long = "peer", value_parser = parse_pair)]
    peers: Vec<(String, String)>,
    /// Serve the file at PATH as region NAME, NAME=PATH; repeatable.
    #[arg(long = "region", value_parser = parse_pair)]
    regions: Vec<(String, String)>,
    /// Control socket path.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Chunk size for served regions (power of two, 4KiB..16MiB; default 64KiB).
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Bulk bytes a pull lets a peer have in flight: `auto` (default: about 1.1 times
    /// the bandwidth-delay product, at least 256KiB) or a fixed size. Smaller keeps urgent
    /// fetches fast; it must cover bandwidth x RTT to fill a long link.
    #[arg(long, value_parser = parse_window)]
    bulk_window: Option<u64>,
    /// A peer silent for this long is considered gone (default 10s).
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Lazy mounts: auto (default: the application decides, userfaultfd where it works),
    /// userfaultfd, or mprotect (PROT_NONE + SIGSEGV; for testing or where uffd is refused).
    #[arg(long, value_parser = pagewire::fault::Mechanism::parse)]
    fault_mechanism: Option<pagewire::fault::Mechanism>,
    /// Lazy mounts: how long a fault waits for an unreachable peer before the mount fails
    /// and faulting threads get SIGBUS (default 60s).
    #[arg(long, value_parser = parse_duration)]
    fault_timeout: Option<Duration>,
    /// QUIC congestion controller: cubic (default; chosen by measurement at 50 ms RTT,
    /// see README "WAN tuning"), newreno, or bbr (experimental in quinn).
    #[arg(long, value_parser = pagewire::transport::Congestion::parse)]
    congestion: Option<pagewire::transport::Congestion>,
    /// Bottleneck rate of the link to the peers, e.g. 1gbit, 200mbit, 50MBps. With
    /// --link-rtt, QUIC's stream, connection and send windows become at least 2 x
    /// bandwidth x RTT (never below the defaults, at most 512MiB per stream, 1GiB per
    /// connection). Needed for links beyond about 1gbit x 50ms.
    #[arg(long, value_parser = pagewire::agent::config::parse_rate)]
    link_bandwidth: Option<u64>,
    /// Round-trip time of the link to the peers, e.g. 50ms (with --link-bandwidth); also
    /// QUIC's initial RTT estimate.
    #[arg(long, value_parser = parse_duration)]
    link_rtt: Option<Duration>,
}

#[derive(Args)]
struct MountCmd {
    /// The peer that serves the region.
    #[arg(long)]
    from: String,
    /// The region's name on that peer.
    #[arg(long)]
    region: String,
    /// Local file to fill (created or truncated). On tmpfs (/dev/shm) userfaultfd is used.
    #[arg(long)]
    to: PathBuf,
    /// auto, userfaultfd or mprotect.
    #[arg(long, default_value = "auto", value_parser = pagewire::fault::Mechanism::parse)]
    mechanism: pagewire::fault::Mechanism,
    /// Print one JSON object (the mount's final status) on stdout instead of a bar.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

#[derive(Args)]
struct PullCmd {
    /// The peer that serves the region.
    #[arg(long)]
    from: String,
    /// The region's name on that peer.
    #[arg(long)]
    region: String,
    /// Local file to write (created or truncated; sparse where the region is zero).
    #[arg(long)]
    to: PathBuf,
    /// Print one JSON summary on stdout instead of a progress bar.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

#[derive(Args)]
struct StatusCmd {
    /// Print the result as JSON on stdout (for scripts) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ctl: ControlArg,
}

fn parse_max_bandwidth(s: &str) -> Result<u64, String> {
    let bps = parse_rate(s)?;
    if bps < pagewire::control::MIN_MAX_BANDWIDTH_BPS {
        return Err(format!(
            "{s:?} is below the least a migration accepts, 1mbit (a 64 KiB chunk every 0.5 s)"
        ));
    }
    Ok(bps)
}

fn parse_window(s: &str) -> Result<u64, String> {
    if s == "auto" {
        Ok(0)
    } else {
        parse_size(s)
    }
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

impl Command {
    /// Whether a failure must print `{"error": ...}` on stdout: `--json` was given and the
    /// command prints no JSON report of its own on failure (`migrate` does).
    fn json_error(&self) -> bool {
        match self {
            Command::Pull(c) => c.json,
            Command::Status(c) => c.json,
            Command::Mount(c) => c.json,
            Command::Replicate(c) => c.json,
            Command::Flush(c) => c.json,
            Command::Epoch(c) => c.json,
            Command::Receive(c) => c.json,
            Command::Migrate(_) | Command::Certs(_) | Command::Agent(_) => false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_error = cli.cmd.json_error();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = one_line(&e);
            eprintln!("error: {line}");
            if json_error {
                // Scripts get one JSON object on stdout whatever happened.
                println!("{}", serde_json::json!({ "error": line }));
            }
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, leaving out a cause whose text the line already
/// holds (most of our errors quote their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !line.contains(&c) {
            line.push_str(": ");
            line.push_str(&c);
        }
    }
    line
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Certs(c) => {
            init_logs("warn");
            certs(c)
        }
        Command::Agent(a) => {
            init_logs("info");
            agent(a).await
        }
        Command::Pull(p) => {
            init_logs("warn");
            pull(p).await
        }
        Command::Status(s) => {
            init_logs("warn");
            status(s).await
        }
        Command::Mount(m) => {
            init_logs("warn");
            tokio::task::spawn_blocking(move || mount(m)).await?
        }
        Command::Replicate(r) => {
            init_logs("warn");
            replicate(r).await
        }
        Command::Flush(f) => {
            init_logs("warn");
            let socket = f.ctl.socket();
            let epoch = ControlClient::connect(&socket)
                .await?
                .flush(&f.region, f.timeout)
                .await?;
            if f.json {
                println!(
                    "{}",
                    serde_json::json!({ "region": f.region, "epoch": epoch })
                );
            } else {
                println!(
                    "region {} flushed: epoch {epoch} applied by every replica",
                    f.region
                );
            }
            Ok(())
        }
        Command::Migrate(m) => {
            init_logs("warn");
            let (json, region, to) = (m.json, m.region.clone(), m.to.clone());
            let r = migrate(m).await;
            if let (true, Err(e)) = (json, &r) {
                // Scripts get one JSON object on stdout whatever happened.
                let outcome = match e.downcast_ref::<pagewire::control::ControlError>() {
                    Some(pagewire::control::ControlError::Migration { outcome, .. }) => {
                        outcome.as_str()
                    }
                    _ if e.is::<Interrupted>() => "interrupted",
                    _ => "failed",
                };
                let failed = serde_json::json!({
                    "region": region,
                    "to": to,
                    "outcome": outcome,
                    "error": one_line(e),
                });
                println!("{failed}");
            }
            r
        }
        Command::Receive(r) => {
            init_logs("warn");
            receive(r).await
        }
        Command::Epoch(e) => {
            init_logs("warn");
            let socket = e.ctl.socket();
            let epoch = ControlClient::connect(&socket)
                .await?
                .epoch(&e.region, e.wait, e.timeout)
                .await?;
            if e.json {
                println!(
                    "{}",
                    serde_json::json!({ "region": e.region, "epoch": epoch })
                );
            } else {
                println!("{epoch}");
            }
            Ok(())
        }
    }
}

/// Set by SIGINT while `pagewire mount` waits (a blocking loop, not the runtime's).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Detaches an unfinished mount and removes its file (by its size it would pass for a
/// copy); the error says so.
fn abandon(map: pagewire::client::Mapping, to: &std::path::Path, why: &str) -> anyhow::Error {
    map.detach();
    match std::fs::remove_file(to) {
        Ok(()) => anyhow::anyhow!("{why}; the incomplete {} was removed", to.display()),
        Err(_) => anyhow::anyhow!("{why}"),
    }
}

fn mount(m: MountCmd) -> Result<()> {
    use pagewire::client::{attach, AttachOptions};
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
    let mut opts = AttachOptions::new(m.ctl.socket(), &m.from, &m.region);
    opts.mechanism = m.mechanism;
    opts.backing = Some(std::path::absolute(&m.to).context("resolving --to")?);
    let started = std::time::Instant::now();
    // Attaching waits for the agent, which may wait for its peer: stay interruptible.
    let (tx, rx) = std::sync::mpsc::channel();
    let o = opts.clone();
    std::thread::spawn(move || {
        let _ = tx.send(attach(&o));
    });
    let map = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => break r?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("attaching ended without an answer")
            }
        }
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            // Nothing was created yet; leaving closes our control connection, which
            // ends the attach on the agent's side.
            anyhow::bail!("interrupted before the region was attached (the agent was still waiting for peer {})", m.from);
        }
    };
    let bar = (!m.json).then(|| TransferBar::new(&format!("{}:{}", m.from, m.region)));
    let done = loop {
        if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(b) = &bar {
                b.clear();
            }
            return Err(abandon(map, &m.to, "interrupted: the mount was detached"));
        }
        let r = map.wait_complete(Some(Duration::from_millis(200)));
        if let (Some(b), Some(s)) = (&bar, map.status()) {
            b.update_mount(&s);
        }
        match r {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
    };
    if let Some(b) = &bar {
        if done.is_ok() {
            b.finish()
        } else {
            b.clear()
        }
    }
    if let Err(e) = done {
        return Err(abandon(map, &m.to, &e.to_string()));
    }
    let st = map.status();
    let mechanism = map.mechanism();
    map.detach();
    let Some(st) = st else {
        anyhow::bail!("the agent sent no final status");
    };
    if m.json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        println!(
            "mounted {} from {} into {} with {}: {} bytes in {:.2}s ({:.1} MiB/s background), {} faults served (p50 {} us, p99 {} us)",
            st.region,
            st.peer,
            m.to.display(),
            mechanism.name(),
            st.bytes_total,
            started.elapsed().as_secs_f64(),
            st.background_rate_bps / (1 << 20) as f64,
            st.faults,
            st.fault_p50_us.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            st.fault_p99_us.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}

fn certs(c: CertsCmd) -> Result<()> {
    match c {
        CertsCmd::Init { dir, days, force } => {
            let (cert, key) = pagewire::certs::init_ca(&dir, days, force)?;
            println!("CA certificate: {}", cert.display());
            println!("CA key:         {} (keep private)", key.display());
        }
        CertsCmd::Issue {
            name,
            dir,
            sans,
            days,
            force,
        } => {
            let (cert, key) = pagewire::certs::issue(&dir, &name, &sans, days, force)?;
            println!("{name} certificate: {}", cert.display());
            println!("{name} key:         {} (keep private)", key.display());
        }
    }
    Ok(())
}

async fn agent(a: AgentArgs) -> Result<()> {
    let o = Overrides {
        name: a.name,
        listen: a.listen,
        certs: a.certs,
        ca: a.ca,
        cert: a.cert,
        key: a.key,
        control: a.control,
        chunk_size: a.chunk_size,
        bulk_window: a.bulk_window,
        idle_timeout: a.idle_timeout,
        fault_mechanism: a.fault_mechanism,
        fault_timeout: a.fault_timeout,
        congestion: a.congestion,
        link_bandwidth: a.link_bandwidth,
        link_rtt: a.link_rtt,
        peers: a.peers,
        regions: a.regions.into_iter().map(|(k, v)| (k, v.into())).collect(),
    };
    let mut cfg = AgentConfig::load(a.config.as_deref(), &o)?;
    if cfg.control.is_none() {
        cfg.control = Some(default_socket());
    }
    let control = cfg.control.clone();
    let agent = Agent::start(cfg).await.context("starting the agent")?;
    eprintln!(
        "pagewire agent {} listening on {} (control socket {})",
        agent.name(),
        agent.local_addr(),
        control
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    agent.shutdown().await;
    Ok(())
}

async fn pull(p: PullCmd) -> Result<()> {
    let socket = p.ctl.socket();
    let client = ControlClient::connect(&socket).await?;
    // The agent opens the destination itself, so it needs an absolute path.
    let to = std::path::absolute(&p.to).context("resolving --to")?;
    let args = PullArgs {
        from: p.from.clone(),
        region: p.region.clone(),
        to,
    };
    let bar = (!p.json).then(|| TransferBar::new(&format!("{}:{}", p.from, p.region)));
    let run = client.pull(args, |s| {
        if let Some(b) = &bar {
            b.update(s)
        }
    });
    let summary = tokio::select! {
        s = run => s,
        _ = tokio::signal::ctrl_c() => {
            if let Some(b) = &bar {
                b.clear();
            }
            anyhow::bail!(
                "interrupted: the agent cancels the pull and removes the incomplete {}",
                p.to.display()
            );
        }
    };
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            if let Some(b) = &bar {
                b.clear();
            }
            return Err(e.into());
        }
    };
    if let Some(b) = &bar {
        b.finish();
    }
    if p.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "pulled {} ({} bytes, {} chunks: {} data, {} zero) from {} to {} in {:.2}s ({:.1} MiB/s, {} bytes on the wire, {} reconnects)",
            summary.region,
            summary.size,
            summary.chunks,
            summary.data_chunks,
            summary.zero_chunks,
            summary.peer,
            summary.to.display(),
            summary.elapsed_s,
            summary.rate_bps / (1 << 20) as f64,
            summary.wire_bytes,
            summary.reconnects,
        );
    }
    Ok(())
}

async fn replicate(r: ReplicateCmd) -> Result<()> {
    let socket = r.ctl.socket();
    if r.stop {
        let st = ControlClient::connect(&socket)
            .await?
            .stop_replication(&r.region)
            .await?;
        if r.json {
            println!("{}", serde_json::to_string(&st)?);
        } else {
            println!(
                "stopped replicating {} at epoch {}; replicas keep what they applied",
                st.region, st.epoch
            );
            for x in &st.replicas {
                if x.told_end {
                    println!("  {}: told (acked epoch {})", x.peer, x.acked_epoch);
                } else {
                    println!(
                        "  {}: not told yet ({}); until then its status does not say the replication ended",
                        x.peer,
                        x.last_error.as_deref().unwrap_or("not connected")
                    );
                }
            }
        }
        return Ok(());
    }
    let args = pagewire::control::ReplicateArgs {
        region: r.region.clone(),
        to: r.to.clone(),
        tracker: Some(r.tracker.clone()),
        interval_ms: Some(r.interval.as_millis() as u64),
        scan_interval_ms: Some(r.scan_interval.as_millis() as u64),
        window: Some(r.window),
    };
    let json = r.json;
    let st = ControlClient::connect(&socket)
        .await?
        .replicate(args, |p| {
            if !json {
                let waiting: Vec<&str> = p
                    .replicas
                    .iter()
                    .filter(|x| !x.connected)
                    .map(|x| x.peer.as_str())
                    .collect();
                eprint!("\rcatching up {}...", waiting.join(", "));
            }
        })
        .await?;
    if json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        eprintln!();
        println!(
            "replicating {} with {} every {} ms to {} (epoch {}); the agent keeps it going, `pagewire status` shows lag",
            st.region,
            st.tracker,
            st.interval_ms,
            st.replicas.iter().map(|x| x.peer.as_str()).collect::<Vec<_>>().join(", "),
            st.epoch
        );
    }
    Ok(())
}

/// `pagewire migrate` was interrupted (Ctrl-C): its `--json` outcome says so.
#[derive(Debug)]
struct Interrupted(&'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Interrupted {}

async fn migrate(m: MigrateCmd) -> Result<()> {
    let socket = m.ctl.socket();
    let args = pagewire::control::MigrateArgs {
        region: m.region.clone(),
        to: m.to.clone(),
        downtime_budget_ms: m.downtime_budget.as_millis() as u64,
        max_rounds: m.max_rounds,
        max_time_ms: m.max_time.as_millis() as u64,
        freeze_pid: m.freeze_pid,
        freeze_writes: m.freeze_writes,
        max_bandwidth_bps: m.max_bandwidth,
        postcopy: m.postcopy,
        no_mmap_writers: m.no_mmap_writers,
    };
    const MIB: f64 = (1 << 20) as f64;
    let mut last = String::new();
    let client = ControlClient::connect(&socket).await?;
    let run = client.migrate(args, |p| {
            let line = format!(
                "{:<13} round {:>3}  dirty {:>8.1} MiB/s  bandwidth {:>8.1} MiB/s  expected downtime {}  remaining {:.1} MiB  sent {:.1} MiB",
                p.phase,
                p.round,
                p.dirty_rate_bps / MIB,
                p.bandwidth_bps / MIB,
                p.expected_downtime_ms
                    .map(|d| format!("{d:.1} ms"))
                    .unwrap_or_else(|| "?".into()),
                p.remaining_bytes as f64 / MIB,
                p.bytes_sent as f64 / MIB,
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
        });
    let r = tokio::select! {
        r = run => r?,
        _ = tokio::signal::ctrl_c() => return Err(Interrupted(
            "interrupted: the agent cancels the migration if it has not handed over yet (the region then stays here and its application runs on); after the handover it finishes on its own: `pagewire status` shows which"
        ).into()),
    };
    if m.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "migrated {} ({} bytes) to {} in {:.0} ms: downtime {}, {} rounds, {:.1} MiB sent ({:.2}x the region), {} post-copy faults, freeze: {}",
            r.region,
            r.size,
            r.to,
            r.total_ms,
            r.downtime_text(),
            r.rounds,
            r.bytes_sent as f64 / MIB,
            r.bytes_sent as f64 / r.size.max(1) as f64,
            r.postcopy_faults,
            r.freeze,
        );
        if r.restarts > 0 {
            println!(
                "the copy started over {} time(s): the connection to {} was replaced during pre-copy",
                r.restarts, r.to
            );
        }
        if m.freeze_pid.is_some() {
            println!(
                "process {} stays stopped (SIGSTOP): it must not write the old copy",
                m.freeze_pid.unwrap_or(0)
            );
        }
        if m.freeze_writes {
            println!(
                "the application's writers on this host stay held: it must not write the old copy (end its publication or stop it)"
            );
        }
    }
    Ok(())
}

async fn receive(r: ReceiveCmd) -> Result<()> {
    let socket = r.ctl.socket();
    // The agent opens the file itself, so it needs an absolute path.
    let to = std::path::absolute(&r.to).context("resolving --to")?;
    let args = pagewire::control::ReceiveFileArgs {
        from: r.from.clone(),
        region: r.region.clone(),
        to,
        timeout_ms: r.timeout.map(|t| t.as_millis() as u64),
    };
    // This agent's name, for the hint on what to run on the source.
    let me = match ControlClient::connect(&socket).await?.status().await {
        Ok(st) => st.name,
        Err(_) => "<this agent>".into(),
    };
    let mut last: Option<(String, u64, u32)> = None;
    let client = ControlClient::connect(&socket).await?;
    let run = client.receive_file(args, |p| {
            // A line when the phase changes, and every tenth of the region.
            let tenth = p.chunks_present * 10 / p.chunks.max(1);
            let key = (p.phase.clone(), tenth, p.aborted_attempts);
            if last.as_ref() == Some(&key) {
                return;
            }
            if last.as_ref().is_some_and(|l| l.2 < p.aborted_attempts) {
                eprintln!("the migration attempt from {} aborted (its partial copy is not valid); waiting for the next", p.from);
            }
            match p.phase.as_str() {
                "waiting" => eprintln!(
                    "waiting for a migration of region {} ({} bytes) from {}: run `pagewire migrate --region {} --to {me}` there",
                    p.region, p.size, p.from, p.region
                ),
                phase => eprintln!(
                    "{phase:<10} {}/{} chunks here ({:.1}%; {} chunk frames received, re-sent ones included), {:.1} s",
                    p.chunks_present,
                    p.chunks,
                    p.chunks_present as f64 * 100.0 / p.chunks.max(1) as f64,
                    p.chunks_received,
                    p.elapsed_s
                ),
            }
            last = Some(key);
        });
    let report = tokio::select! {
        r = run => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!(
            "interrupted: the agent stops waiting and removes {} if it made it; a migration already running into it goes on (`pagewire status`)",
            r.to.display()
        ),
    };
    if r.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "received region {} ({} bytes) from {} into {}: this agent owns it and serves it from there ({} chunks received, {} duplicate, {} aborted attempts, {:.0} ms since the start)",
            report.region,
            report.size,
            report.from,
            report.path.display(),
            report.chunks_received,
            report.duplicate_chunks,
            report.aborted_attempts,
            report.elapsed_ms
        );
    }
    Ok(())
}

async fn status(s: StatusCmd) -> Result<()> {
    let socket = s.ctl.socket();
    let report = ControlClient::connect(&socket).await?.status().await?;
    if s.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(())
}

fn print_status(r: &StatusReport) {
    println!(
        "agent {} (pagewire {}) listening on {}",
        r.name, r.version, r.listen
    );
    println!("peers:");
    if r.peers.is_empty() {
        println!("  (none)");
    }
    for p in &r.peers {
        if p.connected {
            println!(
                "  {:<16} {:<24} connected  rtt {:>8.3} ms  for {:.0}s  cwnd {} KiB  lost {}/{} packets  {} congestion events",
                p.name,
                p.addr,
                p.rtt_us.unwrap_or(0) as f64 / 1000.0,
                p.connected_for_s.unwrap_or(0.0),
                p.cwnd.unwrap_or(0) >> 10,
                p.lost_packets.unwrap_or(0),
                p.sent_packets.unwrap_or(0),
                p.congestion_events.unwrap_or(0)
            );
            if let (Some(silent), Some(idle), Some(keep_alive)) =
                (p.silent_s, p.idle_timeout_s, p.keep_alive_s)
            {
                // A live peer answers our keep-alives: two missed, and more, is news.
                if silent > 2.0 * keep_alive + 0.5 {
                    println!(
                        "  {:<16} SILENT for {silent:.1}s: nothing received (the peer may be gone; the connection is dropped once silent for the smaller of both agents' idle timeouts, at most about {idle:.0}s here)",
                        ""
                    );
                }
            }
        } else {
            println!(
                "  {:<16} {:<24} DOWN       {}",
                p.name,
                p.addr,
                p.last_error.as_deref().unwrap_or("not connected yet")
            );
        }
    }
    println!("regions:");
    if r.regions.is_empty() {
        println!("  (none)");
    }
    for g in &r.regions {
        println!(
            "  {:<16} {:>14} bytes  {} chunks of {}  {}",
            g.name,
            g.size,
            g.chunks,
            g.chunk_size,
            g.path.display()
        );
    }
    println!("transfers:");
    if r.transfers.is_empty() {
        println!("  (none)");
    }
    for t in &r.transfers {
        println!(
            "  #{} {} {}:{} -> {}  {}  {}/{} bytes  {:.1} MiB/s  {} urgent  {} reconnects{}",
            t.id,
            t.kind,
            t.peer,
            t.region,
            t.to.display(),
            t.state,
            t.bytes_done,
            t.bytes_total,
            t.rate_bps / (1 << 20) as f64,
            t.urgent_fetches,
            t.reconnects,
            t.error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    println!("mounts:");
    if r.mounts.is_empty() {
        println!("  (none)");
    }
    for m in &r.mounts {
        println!(
            "  #{} {}:{} -> {} (pid {})  {}  {}  {}/{} chunks  {} faults (p50 {} us, p99 {} us, {} failed)  {:.1} MiB/s background",
            m.id,
            m.peer,
            m.region,
            m.label,
            m.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            m.mechanism,
            m.state,
            m.chunks_present,
            m.chunks_total,
            m.faults,
            m.fault_p50_us.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            m.fault_p99_us.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            m.faults_failed,
            m.background_rate_bps / (1 << 20) as f64,
        );
    }
    println!("replications (owner):");
    if r.replications.is_empty() {
        println!("  (none)");
    }
    for p in &r.replications {
        println!(
            "  {} tracker {} every {} ms, epoch {}{}",
            p.region,
            p.tracker,
            p.interval_ms,
            p.epoch,
            match (&p.ended, &p.error) {
                (Some(why), _) => format!("  ENDED: {why}"),
                (None, Some(e)) => format!("  CHANGES NOT COLLECTED: {e}"),
                (None, None) => String::new(),
            }
        );
        for x in &p.replicas {
            println!(
                "    -> {:<12} {}  acked {}  lag {} bytes / {:.1} ms  apply p50/p99 {}/{} ms  sent {} bytes  {} catch-ups{}",
                x.peer,
                match (x.connected, &p.ended) {
                    (true, _) => "up  ",
                    (false, Some(_)) => "ended",
                    (false, None) => "DOWN",
                },
                x.acked_epoch,
                x.lag_bytes,
                x.lag_ms,
                x.apply_p50_ms.map_or("-".into(), |v| format!("{v:.1}")),
                x.apply_p99_ms.map_or("-".into(), |v| format!("{v:.1}")),
                x.bytes_sent,
                x.catch_ups,
                x.last_error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
    }
    if !r.migrations.is_empty() {
        println!("migrations:");
        for m in &r.migrations {
            println!(
                "  {} {} {} {}  {}  {}",
                m.region,
                m.role,
                if m.role == "source" { "to" } else { "from" },
                m.peer,
                m.phase,
                match (m.owner, m.role.as_str()) {
                    (true, _) => "owner",
                    (false, "source") => "NOT OWNER (handed over)",
                    (false, _) => "not owner (nothing received yet, or an incomplete copy)",
                }
            );
        }
    }
    println!("replicas (held here):");
    if r.replicas.is_empty() {
        println!("  (none)");
    }
    for x in &r.replicas {
        println!(
            "  {} from {}  {}  epoch {}  {} bytes applied{}",
            x.region,
            x.owner,
            match (x.connected, &x.ended) {
                (true, _) => "up",
                (false, Some(_)) => "ended",
                (false, None) => "DOWN",
            },
            x.epoch,
            x.bytes_applied,
            x.ended
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
}
