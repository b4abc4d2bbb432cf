//! Live migration of a running application: a counter whose whole state (the counter and
//! a log of every increment) lives in a file region. It runs on agent `a`, is migrated to
//! agent `b` through a WAN relay while it keeps incrementing, and continues on `b` from
//! the value it finds in the region. The log then proves that no increment was lost or
//! duplicated, and the migration report gives the downtime.
//!
//! One machine, one command (two agents on loopback; `b` is reachable only through two
//! user-space relays that each add RTT/2 of one-way delay):
//! ```text
//! cargo run --release --example migrate_counter [-- --rtt 50ms --size 16MiB --rate 2000 --json]
//! ```
//! Exit status: 0 when every invariant holds, 1 when one does not (listed), 2 when the
//! demo could not run. Single machine only (no two-host roles).
//!
//! Region layout (little-endian):
//! * header, one 4 KiB page: magic, counter, log length, tag of the host that wrote last;
//! * then the log, one 24-byte entry per increment: value, wall-clock time in ns, host tag.
//!
//! An increment appends the entry, then bumps the log length, then the counter. The app
//! (a thread standing in for a process: it keeps no state outside the region) maps the
//! file `MAP_SHARED` and writes it through raw pointers. The migration freezes it with a
//! safe-point hook ([`Freeze::Hook`]): the app finishes the increment in progress,
//! acknowledges, and blocks; it never writes `a`'s copy again. The app is restarted on
//! `b` as soon as `b`'s agent reports that it owns the region (a supervisor on `b` would
//! do the same). `--freeze snapshot` freezes nothing (the app on `a` runs until the
//! migration returns): its late increments are missing on `b`, and the log check says so.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use memmap2::MmapRaw;
use pagewire::agent::config::{parse_duration, parse_size};
use pagewire::agent::{Agent, Freeze, MigrateOptions};
use pagewire::control::MigrationReport;
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use serde::Serialize;

/// "pwcount1"
const MAGIC: u64 = u64::from_le_bytes(*b"pwcount1");
const HEADER: u64 = 4096;
const ENTRY: u64 = 24;
const H_MAGIC: u64 = 0;
const H_COUNTER: u64 = 8;
const H_LOG_LEN: u64 = 16;
const H_HOST: u64 = 24;
pub const HOST_A: u64 = b'a' as u64;
pub const HOST_B: u64 = b'b' as u64;
const REGION: &str = "counter";

#[derive(Parser, Clone, Debug)]
#[command(about = "Live-migrate a running counter app between two agents across a WAN relay")]
pub struct Args {
    /// Round-trip time the relays add between the agents (each direction gets half).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub rtt: Duration,
    /// Region size (header page plus the log; 24 bytes per increment).
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub size: u64,
    /// Increments per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// How long the app runs on `a` before the migration starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub run_a: Duration,
    /// How long the app runs on `b` after the migration.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub run_b: Duration,
    /// Downtime budget: pre-copy goes on until the predicted downtime fits it (or the
    /// round/time limit).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub downtime_budget: Duration,
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub max_time: Duration,
    /// `hook` (pause the app at a safe point) or `snapshot` (freeze nothing: shows what
    /// the log check catches when the writer is not frozen).
    #[arg(long, default_value = "hook", value_parser = ["hook", "snapshot"])]
    pub freeze: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

// ---------------------------------------------------------------------------------------
// The app: a counter in a mapped file.

/// The region file, mapped shared. Only raw pointers touch the mapping: the agent (and,
/// on `b`, the migration) writes the same pages through the page cache.
pub struct Counter {
    map: MmapRaw,
    capacity: u64,
}

impl Counter {
    /// Writes an empty header (counter 0, empty log) into `path`, sized `size`.
    pub fn format(path: &Path, size: u64) -> Result<()> {
        if size < HEADER + ENTRY {
            bail!(
                "--size {size} is too small: at least {} bytes",
                HEADER + ENTRY
            );
        }
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        f.set_len(size)?;
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&MAGIC.to_le_bytes());
        f.write_all_at(&h, 0)?;
        Ok(())
    }

    pub fn open(path: &Path) -> Result<Counter> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let map = MmapRaw::map_raw(&f).with_context(|| format!("mapping {}", path.display()))?;
        let len = map.len() as u64;
        if len < HEADER + ENTRY {
            bail!(
                "{} is too small ({len} bytes) for a counter region",
                path.display()
            );
        }
        let c = Counter {
            map,
            capacity: (len - HEADER) / ENTRY,
        };
        let magic = c.get(H_MAGIC);
        if magic != MAGIC {
            bail!(
                "{} holds no counter (magic {magic:#018x}, expected {MAGIC:#018x})",
                path.display()
            );
        }
        Ok(c)
    }

    fn get(&self, off: u64) -> u64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.map.len() as u64);
        // SAFETY: `off` is 8-aligned (the mapping is page-aligned) and inside the mapping,
        // which lives as long as `self`. Volatile: other writers share these pages.
        u64::from_le(unsafe {
            std::ptr::read_volatile(self.map.as_ptr().add(off as usize) as *const u64)
        })
    }

    fn set(&self, off: u64, v: u64) {
        debug_assert!(off % 8 == 0 && off + 8 <= self.map.len() as u64);
        // SAFETY: as in `get`; the mapping is writable (opened read-write, MAP_SHARED).
        unsafe {
            std::ptr::write_volatile(
                self.map.as_mut_ptr().add(off as usize) as *mut u64,
                v.to_le(),
            )
        }
    }

    /// One increment: the log entry, then the log length, then the counter. Returns the
    /// new value.
    pub fn increment(&self, host: u64) -> Result<u64> {
        let n = self.get(H_LOG_LEN);
        let counter = self.get(H_COUNTER);
        if counter != n {
            bail!("corrupt region: counter {counter} but log length {n}");
        }
        if n >= self.capacity {
            bail!("the log is full ({n} entries): use a larger --size or a lower --rate");
        }
        let e = HEADER + n * ENTRY;
        self.set(e, n + 1);
        self.set(e + 8, now_ns());
        self.set(e + 16, host);
        self.set(H_LOG_LEN, n + 1);
        self.set(H_COUNTER, n + 1);
        self.set(H_HOST, host);
        Ok(n + 1)
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Cmd {
    Run,
    Pause,
    Stop,
}

struct CtlState {
    cmd: Cmd,
    /// The app is blocked at a safe point (no increment in progress).
    parked: bool,
    /// The app thread has returned.
    exited: bool,
}

/// How the demo (and the freeze hook) steers the app.
struct Ctl {
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl Ctl {
    fn new() -> Arc<Ctl> {
        Arc::new(Ctl {
            state: Mutex::new(CtlState {
                cmd: Cmd::Run,
                parked: false,
                exited: false,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, cmd: Cmd) {
        self.lock().cmd = cmd;
        self.cv.notify_all();
    }

    /// Asks the app to pause and waits until it is parked at a safe point.
    fn pause(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        g.cmd = Cmd::Pause;
        self.cv.notify_all();
        while !g.parked {
            if g.exited {
                return Err("the app is not running".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the app did not pause within {timeout:?}"));
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

/// What one run of the app did (kept outside the region, to check the region against).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AppRun {
    pub increments: u64,
    /// First and last value this run wrote (0 if none).
    pub first: u64,
    pub last: u64,
    pub last_ns: u64,
    pub first_ns: u64,
}

/// The app: increments the counter in `path` at `rate` per second until told to stop.
/// It keeps no state of its own: it starts from whatever the region holds.
fn app(path: PathBuf, host: u64, rate: u32, ctl: Arc<Ctl>) -> Result<AppRun> {
    let r = (|| {
        let c = Counter::open(&path)?;
        let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let mut run = AppRun::default();
        let mut next = Instant::now();
        let mut g = ctl.lock();
        loop {
            match g.cmd {
                Cmd::Stop => break,
                Cmd::Pause => {
                    g.parked = true;
                    ctl.cv.notify_all();
                    while g.cmd == Cmd::Pause {
                        g = ctl.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.parked = false;
                    // Resumed: no burst to catch up the paused time.
                    next = Instant::now();
                    continue;
                }
                Cmd::Run => {}
            }
            let now = Instant::now();
            if now < next {
                g = ctl
                    .cv
                    .wait_timeout(g, next - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            // The increment runs under the lock: a pause never lands in the middle of it.
            let v = c.increment(host)?;
            let ts = c.get(HEADER + (v - 1) * ENTRY + 8);
            if run.increments == 0 {
                run.first = v;
                run.first_ns = ts;
            }
            run.increments += 1;
            run.last = v;
            run.last_ns = ts;
            next += period;
            // Far behind (descheduled): do not burst.
            if now > next + Duration::from_millis(50) {
                next = now;
            }
        }
        Ok(run)
    })();
    let mut g = ctl.lock();
    g.exited = true;
    ctl.cv.notify_all();
    r
}

fn start_app(
    path: &Path,
    host: u64,
    rate: u32,
) -> (Arc<Ctl>, std::thread::JoinHandle<Result<AppRun>>) {
    let ctl = Ctl::new();
    let (p, c) = (path.to_path_buf(), ctl.clone());
    let h = std::thread::spawn(move || app(p, host, rate, c));
    (ctl, h)
}

fn stop_app(ctl: &Ctl, h: std::thread::JoinHandle<Result<AppRun>>) -> Result<AppRun> {
    ctl.send(Cmd::Stop);
    h.join()
        .map_err(|_| anyhow::anyhow!("the app thread panicked"))?
}

// ---------------------------------------------------------------------------------------
// The log check.

/// What the log check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogCheck {
    pub entries: u64,
    pub counter: u64,
    pub entries_a: u64,
    pub entries_b: u64,
    /// Every invariant that does not hold (empty: all good).
    pub failures: Vec<String>,
}

fn read_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

fn read_log(path: &Path) -> Result<(u64, u64, Vec<u8>)> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut h = [0u8; 32];
    f.read_exact_at(&mut h, 0)?;
    if read_u64(&h, H_MAGIC as usize) != MAGIC {
        bail!("{} holds no counter (bad magic)", path.display());
    }
    let counter = read_u64(&h, H_COUNTER as usize);
    let len = read_u64(&h, H_LOG_LEN as usize);
    if HEADER + len.saturating_mul(ENTRY) > size {
        bail!(
            "{}: log length {len} runs past the end of the file",
            path.display()
        );
    }
    let mut log = vec![0u8; (len * ENTRY) as usize];
    f.read_exact_at(&mut log, HEADER)?;
    Ok((counter, len, log))
}

/// Checks `b`'s region (the whole history) against what the two app runs did and against
/// `a`'s frozen copy.
pub fn check_log(a_file: &Path, b_file: &Path, ra: &AppRun, rb: &AppRun) -> Result<LogCheck> {
    let (counter, len, log) = read_log(b_file)?;
    let mut c = LogCheck {
        entries: len,
        counter,
        ..Default::default()
    };
    let mut fail = |s: String| c.failures.push(s);
    if counter != len {
        fail(format!("counter {counter} != log length {len}"));
    }
    let (mut na, mut nb) = (0u64, 0u64);
    let mut bad_values = 0u64;
    let mut prev_ns = 0u64;
    for i in 0..len {
        let e = (i * ENTRY) as usize;
        let (v, ts, host) = (
            read_u64(&log, e),
            read_u64(&log, e + 8),
            read_u64(&log, e + 16),
        );
        if v != i + 1 {
            if bad_values == 0 {
                fail(format!(
                    "entry {i} holds value {v}, expected {} (gap or duplicate)",
                    i + 1
                ));
            }
            bad_values += 1;
        }
        match host {
            HOST_A => {
                if nb > 0 {
                    fail(format!(
                        "entry {i} (value {v}) was written on a after b had taken over"
                    ));
                }
                na += 1;
            }
            HOST_B => nb += 1,
            _ => fail(format!("entry {i} has an unknown host tag {host}")),
        }
        if ts < prev_ns {
            fail(format!("entry {i}: time goes backwards"));
        }
        prev_ns = ts;
    }
    if bad_values > 1 {
        fail(format!("{bad_values} entries in all hold a wrong value"));
    }
    c.entries_a = na;
    c.entries_b = nb;
    if na != ra.increments {
        fail(format!(
            "the app made {} increments on a but b's log holds {na} of them: {} lost in the migration",
            ra.increments,
            ra.increments as i64 - na as i64
        ));
    }
    if nb != rb.increments {
        fail(format!(
            "the app made {} increments on b but the log holds {nb}",
            rb.increments
        ));
    }
    if rb.increments > 0 && rb.first != ra.last + 1 {
        fail(format!(
            "b continued at {} but a's last value was {}",
            rb.first, ra.last
        ));
    }
    // a's frozen copy is exactly the prefix b started from.
    let (ca, la, loga) = read_log(a_file)?;
    if ca != la || la != ra.increments {
        fail(format!(
            "a's copy: counter {ca}, log length {la}, but the app made {} increments there",
            ra.increments
        ));
    }
    let n = loga.len().min(log.len());
    if loga[..n] != log[..n] {
        fail("a's log and the start of b's log differ".into());
    }
    Ok(c)
}

// ---------------------------------------------------------------------------------------
// The demo.

/// The demo's result.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ok: bool,
    pub rtt_ms: f64,
    pub size: u64,
    pub rate: u32,
    pub freeze: String,
    pub migration: MigrationReport,
    pub app_a: AppRun,
    pub app_b: AppRun,
    /// Increments the app made on `a` while the migration ran (pre-copy).
    pub increments_during_migration: u64,
    /// Last increment on `a` to first increment on `b`, from the log's timestamps.
    pub app_pause_ms: f64,
    pub log: LogCheck,
}

/// Both agents connected on a connection that has lasted a second (both dial at start-up;
/// one connection replaces the other a moment later, which would abort a migration).
async fn settled(a: &Agent, b: &Agent) -> Result<()> {
    let steady = |ag: &Agent, peer: &str| {
        ag.status()
            .peers
            .iter()
            .any(|p| p.name == peer && p.connected_for_s.is_some_and(|s| s >= 1.0))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(steady(a, "b") && steady(b, "a")) {
        if Instant::now() > deadline {
            bail!("agents a and b did not connect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs the whole demo; `Err` only when it could not run, invariant failures are in
/// [`Summary::log`] (and `ok` is false).
pub async fn run(args: &Args) -> Result<Summary> {
    if args.rate == 0 {
        bail!("--rate must be at least 1");
    }
    let say = |s: String| {
        if !args.json {
            println!("{s}");
        }
    };
    let tmp = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .context("making a temp dir")?;
    let dir = tmp.path();
    pagewire::demo::certs(dir, &["a", "b"]).context("making certificates")?;
    let (fa, fb) = (dir.join("counter.a"), dir.join("counter.b"));
    Counter::format(&fa, args.size)?;
    // b serves a file of the same size; its content does not matter (it is overwritten).
    std::fs::File::create(&fb)
        .and_then(|f| f.set_len(args.size))
        .with_context(|| format!("creating {}", fb.display()))?;

    // a and b reach each other only through the relays: to_b in front of b, to_a in
    // front of a; whoever dials, the path crosses one relay, RTT/2 each way.
    let (pa, pb) = (pagewire::demo::free_port()?, pagewire::demo::free_port()?);
    let link = LinkParams {
        delay: args.rtt / 2,
        ..Default::default()
    };
    let any = "127.0.0.1:0".parse()?;
    let relay = |port: u16| {
        RelayConfig::symmetric(
            any,
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            link.clone(),
        )
    };
    let to_b = Relay::start(relay(pb))
        .await
        .context("starting the relay to b")?;
    let to_a = Relay::start(relay(pa))
        .await
        .context("starting the relay to a")?;
    let mut ca = pagewire::demo::config(dir, "a", pa, &[("b", to_b.local_addr().port())]);
    ca.regions.push((REGION.into(), fa.clone()));
    let mut cb = pagewire::demo::config(dir, "b", pb, &[("a", to_a.local_addr().port())]);
    cb.regions.push((REGION.into(), fb.clone()));
    let a = Agent::start(ca).await.context("starting agent a")?;
    let b = Agent::start(cb).await.context("starting agent b")?;
    let r = demo(args, &a, &b, &fa, &fb, &say).await;
    a.shutdown().await;
    b.shutdown().await;
    to_a.shutdown().await;
    to_b.shutdown().await;
    r
}

async fn demo(
    args: &Args,
    a: &Agent,
    b: &Agent,
    fa: &Path,
    fb: &Path,
    say: &dyn Fn(String),
) -> Result<Summary> {
    settled(a, b).await?;
    say(format!(
        "agents a and b up on loopback; b reachable only through the WAN relay (RTT {:.0} ms)",
        args.rtt.as_secs_f64() * 1e3
    ));
    say(format!(
        "app on a: {} increments/s into region {REGION:?} ({} MiB, room for {} increments)",
        args.rate,
        args.size >> 20,
        (args.size - HEADER) / ENTRY
    ));

    let (ctl_a, app_a) = start_app(fa, HOST_A, args.rate);
    tokio::time::sleep(args.run_a).await;

    let freeze = match args.freeze.as_str() {
        "snapshot" => Freeze::Snapshot,
        _ => {
            let ctl = ctl_a.clone();
            Freeze::Hook(Arc::new(move |freeze: bool| {
                if freeze {
                    ctl.pause(Duration::from_secs(10))
                } else {
                    // The migration aborted: the app goes on on a.
                    ctl.send(Cmd::Run);
                    Ok(())
                }
            }))
        }
    };
    let opts = MigrateOptions {
        budget: args.downtime_budget,
        max_rounds: args.max_rounds,
        max_time: args.max_time,
        freeze,
        ..MigrateOptions::new("b")
    };
    let owner = |ag: &Agent| {
        ag.status()
            .migrations
            .iter()
            .find(|m| m.region == REGION)
            .map(|m| m.owner)
    };
    let migrate_start_ns = now_ns();
    let mut last = String::new();
    let json = args.json;
    let migration = a.migrate(REGION, opts, |p| {
        if json {
            return;
        }
        let line = format!(
            "  {:<13} round {:>2}  dirty {:>7.1} KiB/s  bandwidth {:>7.1} MiB/s  expected downtime {}  sent {:.1} MiB",
            p.phase,
            p.round,
            p.dirty_rate_bps / 1024.0,
            p.bandwidth_bps / (1 << 20) as f64,
            p.expected_downtime_ms
                .map(|d| format!("{d:.1} ms"))
                .unwrap_or_else(|| "?".into()),
            p.bytes_sent as f64 / (1 << 20) as f64,
        );
        if line != last {
            eprintln!("{line}");
            last = line;
        }
    });
    tokio::pin!(migration);
    // Like a supervisor on b: the app restarts on b, from the state it finds in b's
    // region, as soon as b's agent says it owns the region (polled every 2 ms); not when
    // a's migrate call returns, which is at least half an RTT later.
    let mut on_b = None;
    let migrated = loop {
        tokio::select! {
            r = &mut migration => break r,
            _ = tokio::time::sleep(Duration::from_millis(2)), if on_b.is_none() => {
                if owner(b) == Some(true) {
                    on_b = Some(start_app(fb, HOST_B, args.rate));
                }
            }
        }
    };
    let b_started = Instant::now();
    // Migrated or not, the app on a ends here: a paused app stays parked until Stop.
    let ra = stop_app(&ctl_a, app_a).context("the app on a")?;
    let report = match migrated {
        Ok(r) => r,
        Err(e) => {
            if let Some((ctl, h)) = on_b {
                let _ = stop_app(&ctl, h);
            }
            return Err(e).context("migrating the counter to b");
        }
    };
    say(format!(
        "migrated {REGION} to b in {:.0} ms: downtime {:.1} ms (budget {:.0} ms), {} pre-copy rounds, {:.2} MiB sent, freeze: {}",
        report.total_ms,
        report.downtime_ms,
        args.downtime_budget.as_secs_f64() * 1e3,
        report.rounds,
        report.bytes_sent as f64 / (1 << 20) as f64,
        report.freeze
    ));
    let (own_a, own_b) = (owner(a), owner(b));
    let (ctl_b, app_b) = match on_b {
        Some(x) => x,
        // b's ownership showed between two polls and the call's return.
        None => start_app(fb, HOST_B, args.rate),
    };
    tokio::time::sleep(args.run_b.saturating_sub(b_started.elapsed())).await;
    let rb = stop_app(&ctl_b, app_b).context("the app on b")?;

    let mut log = check_log(fa, fb, &ra, &rb)?;
    if own_a != Some(false) || own_b != Some(true) {
        log.failures.push(format!(
            "ownership after the migration: a owner {own_a:?}, b owner {own_b:?} (expected false, true)"
        ));
    }
    if ra.increments == 0 || rb.increments == 0 {
        log.failures
            .push("the app made no increment on one of the hosts".into());
    }
    let during = {
        let (_, len, l) = read_log(fa)?;
        (0..len)
            .filter(|i| read_u64(&l, (i * ENTRY + 8) as usize) >= migrate_start_ns)
            .count() as u64
    };
    let pause_ms = if rb.first_ns >= ra.last_ns {
        (rb.first_ns - ra.last_ns) as f64 / 1e6
    } else {
        -((ra.last_ns - rb.first_ns) as f64 / 1e6)
    };
    say(format!(
        "app: a made {} increments ({}..={}), {during} of them while the migration ran; b continued at {} and made {} ({}..={})",
        ra.increments, ra.first, ra.last, rb.first, rb.increments, rb.first, rb.last
    ));
    say(format!(
        "app-visible pause (last increment on a -> first on b): {pause_ms:.1} ms{}",
        if pause_ms < 0.0 {
            " (negative: the app on a was still running when b's started; nothing froze it)"
        } else {
            ""
        }
    ));
    Ok(Summary {
        ok: log.failures.is_empty(),
        rtt_ms: args.rtt.as_secs_f64() * 1e3,
        size: args.size,
        rate: args.rate,
        freeze: args.freeze.clone(),
        migration: report,
        app_a: ra,
        app_b: rb,
        increments_during_migration: during,
        app_pause_ms: pause_ms,
        log,
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pagewire::demo::logs();
    let args = Args::parse();
    let s = match run(&args).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("migrate_counter: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.json {
        match serde_json::to_string(&s) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("migrate_counter: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    } else if s.ok {
        println!(
            "log check: {} entries, values 1..={} with no gap and no duplicate, {} written on a then {} on b, counter == log length: OK",
            s.log.entries, s.log.entries, s.log.entries_a, s.log.entries_b
        );
    } else {
        println!("log check FAILED:");
        for f in &s.log.failures {
            println!("  - {f}");
        }
    }
    if s.ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
