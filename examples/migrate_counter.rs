//! Live migration of a running application: a counter whose whole state (the counter and
//! a log of every increment) lives in a region. It runs on agent `a`, is migrated to
//! agent `b` through a WAN relay while it keeps incrementing, and continues on `b` from
//! the value it finds in the region. The log then proves that no increment was lost or
//! duplicated, and the migration report gives the downtime.
//!
//! One machine, one command (two agents on loopback; `b` is reachable only through two
//! user-space relays that each add RTT/2 of one-way delay):
//! ```text
//! cargo run --release --example migrate_counter [-- --mode memory|file --rtt 50ms --size 16MiB --rate 2000 --json]
//! ```
//! Exit status: 0 when every invariant holds, 1 when one does not (listed), 2 when the
//! demo could not run.
//!
//! Two hosts, each running its own agent (`pagewire agent`, peers of each other), memory
//! mode: start the destination side first, then the source side names the destination
//! peer and migrates itself after `--run-a` (freeze by write-protection, post-copy):
//! ```text
//! host beta:  cargo run --release --example migrate_counter -- --role dest   --control /run/pagewire.sock
//! host alpha: cargo run --release --example migrate_counter -- --role source --control /run/pagewire.sock --to beta
//! ```
//! Each side prints what it saw; the source's `a's copy at the freeze: 1..=N` must match
//! the destination's `a's entries 1..=N` (the destination checks the rest of the log).
//!
//! Region layout (little-endian):
//! * header, one 4 KiB page: magic, counter, log length, tag of the host that wrote last;
//! * then the log, one 24-byte entry per increment: value, wall-clock time in ns, host tag.
//!
//! An increment appends the entry, then bumps the log length, then the counter. The app
//! is a thread standing in for a process: it keeps no state outside the region and
//! writes it through raw pointers only. Two modes:
//! * `memory` (default): the region is the app's memory. On `a` the app publishes it
//!   with [`client::publish`](pagewire::client::publish) (a memfd; no replicas; the
//!   kernel dirty tracker tells the agent what the app wrote). On `b` a second app calls
//!   [`client::receive`](pagewire::client::receive) before the migration starts and
//!   blocks in `wait_owner`. `a` migrates with post-copy (`MigrateOptions::postcopy`):
//!   `b`'s app runs as soon as the handover is accepted, and chunks still stale then are
//!   fetched from `a` when first touched (the rest streams in behind).
//! * `file`: the region is a file each agent serves; the app maps it `MAP_SHARED`, the
//!   migration finds changes by hashing and copies everything before the handover; the
//!   app is restarted on `b` as soon as `b`'s agent reports that it owns the region (a
//!   supervisor on `b` would do the same).
//!
//! In both, the migration freezes the app with a safe-point hook ([`Freeze::Hook`]): it
//! finishes the increment in progress, acknowledges, and blocks; it never writes `a`'s
//! copy again (after a successful migration it stays paused until the demo ends it).
//! `--freeze snapshot` freezes nothing (the app on `a` runs until the migration returns):
//! its late increments are missing on `b`, and the log check says so.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use memmap2::MmapRaw;
use pagewire::agent::config::{parse_duration, parse_size};
use pagewire::agent::{Agent, Freeze, MigrateOptions};
use pagewire::client::publish::{publish, PublishOptions};
use pagewire::client::receive::{receive, ReceiveOptions};
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
    /// `memory`: the app's published memory, migrated with post-copy into a receiving
    /// app on `b`; `file`: a file region served by both agents, pre-copy only.
    #[arg(long, default_value = "memory", value_parser = ["memory", "file"])]
    pub mode: String,
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
    /// round/time limit). With post-copy, the final sync also sends only what fits it;
    /// the rest is left stale for `b` to fault in.
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
    /// `both`: the whole demo on this machine (two agents, WAN relays). `source` / `dest`:
    /// one side on each of two hosts, each against its own running agent (`--control`),
    /// memory mode: start `dest` on the destination host first (it waits), then `source
    /// --to PEER` on the source host. The source migrates itself after `--run-a` with
    /// post-copy and the freeze by write-protection (`pagewire migrate --freeze-writes
    /// --postcopy`); `--rtt`, `--mode` and `--freeze` do not apply.
    #[arg(long, default_value = "both", value_parser = ["both", "source", "dest"])]
    pub role: String,
    /// `source`/`dest`: the local agent's control socket (default: `pagewire`'s default,
    /// $PAGEWIRE_CONTROL or $XDG_RUNTIME_DIR/pagewire.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// `source`: the destination peer (the agent the `dest` side runs against).
    #[arg(long)]
    pub to: Option<String>,
    /// `dest`: give up if no migration arrived within this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub wait: Duration,
}

// ---------------------------------------------------------------------------------------
// The app: a counter in a shared mapping.

/// The counter region, mapped shared (a file mapped here, or memory the client library
/// mapped). Only raw pointers touch the mapping: the agent (and, on `b`, the migration)
/// writes the same pages.
pub struct Counter {
    base: *mut u8,
    len: usize,
    capacity: u64,
    /// The file mapping, when this counter mapped it (else the mapping's owner keeps it).
    _map: Option<MmapRaw>,
}

// SAFETY: a pointer into a shared mapping; every access is a volatile read or write of an
// aligned u64 (or a raw copy), and the mapping outlives the Counter (see `from_raw`).
unsafe impl Send for Counter {}
// SAFETY: as above.
unsafe impl Sync for Counter {}

impl Counter {
    /// Writes an empty header (counter 0, empty log) into `path`, sized `size`.
    pub fn format(path: &Path, size: u64) -> Result<()> {
        check_size(size)?;
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
        let (base, len) = (map.as_mut_ptr(), map.len());
        // SAFETY: the mapping is `len` bytes, writable, and the Counter keeps it.
        let mut c = unsafe { Counter::from_raw(base, len) }
            .with_context(|| format!("{}", path.display()))?;
        c._map = Some(map);
        Ok(c)
    }

    /// The counter in the zero-filled mapping at `base` (`len` bytes): writes the header.
    ///
    /// # Safety
    /// `base..base + len` must be a writable shared mapping, page-aligned, that outlives
    /// the returned Counter.
    pub unsafe fn format_raw(base: *mut u8, len: usize) -> Result<Counter> {
        check_size(len as u64)?;
        let c = Counter {
            base,
            len,
            capacity: (len as u64 - HEADER) / ENTRY,
            _map: None,
        };
        c.set(H_MAGIC, MAGIC);
        Ok(c)
    }

    /// The counter already in the mapping at `base` (`len` bytes).
    ///
    /// # Safety
    /// As for [`Counter::format_raw`].
    pub unsafe fn from_raw(base: *mut u8, len: usize) -> Result<Counter> {
        if (len as u64) < HEADER + ENTRY {
            bail!("{len} bytes is too small for a counter region");
        }
        let c = Counter {
            base,
            len,
            capacity: (len as u64 - HEADER) / ENTRY,
            _map: None,
        };
        let magic = c.get(H_MAGIC);
        if magic != MAGIC {
            bail!("no counter here (magic {magic:#018x}, expected {MAGIC:#018x})");
        }
        Ok(c)
    }

    fn get(&self, off: u64) -> u64 {
        debug_assert!(off % 8 == 0 && off + 8 <= self.len as u64);
        // SAFETY: `off` is 8-aligned (the mapping is page-aligned) and inside the mapping,
        // which outlives `self`. Volatile: other writers share these pages.
        u64::from_le(unsafe { std::ptr::read_volatile(self.base.add(off as usize) as *const u64) })
    }

    fn set(&self, off: u64, v: u64) {
        debug_assert!(off % 8 == 0 && off + 8 <= self.len as u64);
        // SAFETY: as in `get`; the mapping is writable.
        unsafe { std::ptr::write_volatile(self.base.add(off as usize) as *mut u64, v.to_le()) }
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

    /// Completes an increment that a freeze by write-protection interrupted (it holds the
    /// writer at any store): the log entry is written before the log length, so an entry
    /// within the log length is whole; a counter one behind it is brought level. Returns
    /// whether anything was repaired.
    pub fn recover(&self) -> Result<bool> {
        let n = self.get(H_LOG_LEN);
        let counter = self.get(H_COUNTER);
        if counter == n {
            return Ok(false);
        }
        if n == 0 || counter + 1 != n || self.get(HEADER + (n - 1) * ENTRY) != n {
            bail!("corrupt region: counter {counter} but log length {n}");
        }
        self.set(H_COUNTER, n);
        Ok(true)
    }

    /// A copy of the header and the log (read while nobody writes: the app is stopped).
    pub fn image(&self) -> Result<LogImage> {
        if self.get(H_MAGIC) != MAGIC {
            bail!("the region holds no counter (bad magic)");
        }
        let counter = self.get(H_COUNTER);
        let len = self.get(H_LOG_LEN);
        if HEADER + len.saturating_mul(ENTRY) > self.len as u64 {
            bail!("log length {len} runs past the end of the region");
        }
        let mut log = vec![0u8; (len * ENTRY) as usize];
        // SAFETY: inside the mapping (checked above); a raw copy, no reference to the
        // shared bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add(HEADER as usize),
                log.as_mut_ptr(),
                log.len(),
            )
        };
        Ok(LogImage { counter, len, log })
    }
}

/// The log must hold what the app writes in `--run-a` plus `--run-b` (the migration's
/// own time comes on top): found out now rather than when the app stops with a full log.
fn check_room(args: &Args) -> Result<()> {
    check_size(args.size)?;
    let room = (args.size - HEADER) / ENTRY;
    let need = (f64::from(args.rate) * (args.run_a + args.run_b).as_secs_f64()).ceil() as u64;
    if need > room {
        let size = HEADER + need.saturating_mul(2) * ENTRY;
        bail!(
            "--size {} holds {room} increments, but {} increments/s for --run-a {:?} and --run-b {:?} write {need}: use --size {}KiB or more, or a lower --rate",
            args.size,
            args.rate,
            args.run_a,
            args.run_b,
            size.div_ceil(1024)
        );
    }
    Ok(())
}

fn check_size(size: u64) -> Result<()> {
    if size < HEADER + ENTRY {
        bail!(
            "--size {size} is too small: at least {} bytes",
            HEADER + ENTRY
        );
    }
    Ok(())
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

/// The app: increments the counter in `c` at `rate` per second until told to stop. It
/// keeps no state of its own: it starts from whatever the region holds.
fn app_loop(c: &Counter, host: u64, rate: u32, ctl: &Ctl) -> Result<AppRun> {
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
}

/// Tells whoever waits on `ctl` that the app thread is done.
fn exited(ctl: &Ctl) {
    let mut g = ctl.lock();
    g.exited = true;
    ctl.cv.notify_all();
}

/// File mode: the app maps the region file.
fn app_file(path: PathBuf, host: u64, rate: u32, ctl: Arc<Ctl>) -> Result<AppRun> {
    let r = Counter::open(&path).and_then(|c| app_loop(&c, host, rate, &ctl));
    exited(&ctl);
    r
}

fn start_app(
    path: &Path,
    host: u64,
    rate: u32,
) -> (Arc<Ctl>, std::thread::JoinHandle<Result<AppRun>>) {
    let ctl = Ctl::new();
    let (p, c) = (path.to_path_buf(), ctl.clone());
    let h = std::thread::spawn(move || app_file(p, host, rate, c));
    (ctl, h)
}

fn stop_app<T>(ctl: &Ctl, h: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    ctl.send(Cmd::Stop);
    h.join()
        .map_err(|_| anyhow::anyhow!("the app thread panicked"))?
}

/// Memory mode, on `a`: what the app did, and its region as it left it (the frozen copy).
struct SourceRun {
    run: AppRun,
    image: LogImage,
}

/// Memory mode, on `a`: the app publishes its region (no replicas: the agent tracks its
/// writes, for a migration), says so on `ready` (with the tracker's name), and runs.
/// When stopped it copies its log out and exits, which unpublishes the region.
fn app_publisher(
    control: PathBuf,
    size: u64,
    rate: u32,
    ctl: Arc<Ctl>,
    ready: tokio::sync::oneshot::Sender<Result<String, String>>,
) -> Result<SourceRun> {
    let r = (|| {
        let setup = publish(&PublishOptions::new(&control, REGION, size, &[]))
            .context("publishing the counter region")
            .and_then(|p| {
                // SAFETY: the mapping is `p.len()` bytes, writable and zero-filled, and
                // `p` (which keeps it) outlives the counter: both drop at the end here.
                let c = unsafe { Counter::format_raw(p.as_ptr(), p.len()) }?;
                Ok((p, c))
            });
        let (p, c) = match setup {
            Ok(x) => x,
            Err(e) => {
                let _ = ready.send(Err(format!("{e:#}")));
                return Err(e);
            }
        };
        let _ = ready.send(Ok(p.tracker().name().to_string()));
        let run = app_loop(&c, HOST_A, rate, &ctl)?;
        let image = c.image()?;
        drop(c);
        drop(p);
        Ok(SourceRun { run, image })
    })();
    exited(&ctl);
    r
}

/// Memory mode, on `b`: what the receiving app did.
struct DestRun {
    run: AppRun,
    image: LogImage,
    /// When `wait_owner` returned (ns since the epoch).
    owner_ns: u64,
    /// When `wait_received` returned true (post-copy done), if it did.
    received_ns: Option<u64>,
    received_error: Option<String>,
}

/// Memory mode, on `b`: the app maps a fresh region with `client::receive` (before the
/// migration starts), says so on `ready`, and blocks until `b` owns the region; then it
/// continues the counter it finds there (its first touches of stale pages fault them in
/// from `a`), while a second thread of it waits for the end of post-copy. `None`: told
/// to stop before it ever owned the region (the migration failed).
fn app_receiver(
    control: PathBuf,
    size: u64,
    rate: u32,
    ctl: Arc<Ctl>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    patience: Duration,
) -> Result<Option<DestRun>> {
    let r = (|| {
        let mut r = match receive(&ReceiveOptions::new(&control, REGION, size)) {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return Err(e).context("client::receive on b");
            }
        };
        let _ = ready.send(Ok(()));
        // Blocks in wait_owner; wakes every 20 ms only to see whether the demo gave up.
        loop {
            if r.wait_owner(Some(Duration::from_millis(20)))
                .context("waiting to own the region on b")?
            {
                break;
            }
            if ctl.lock().cmd == Cmd::Stop {
                return Ok(None);
            }
        }
        let owner_ns = now_ns();
        // SAFETY: `r` keeps the mapping (`r.len()` bytes, writable) and outlives `c`.
        let c = unsafe { Counter::from_raw(r.as_ptr(), r.len()) }
            .context("the region on b after the handover")?;
        let (run, received) = std::thread::scope(|s| {
            let app = s.spawn(|| app_loop(&c, HOST_B, rate, &ctl));
            let received = r.wait_received(Some(patience)).map(|ok| ok.then(now_ns));
            (app.join(), received)
        });
        let run = run.map_err(|_| anyhow::anyhow!("the app thread on b panicked"))??;
        let image = c.image()?;
        let (received_ns, received_error) = match received {
            Ok(Some(t)) => (Some(t), None),
            Ok(None) => (None, Some(format!("post-copy not done after {patience:?}"))),
            Err(e) => (None, Some(e.to_string())),
        };
        Ok(Some(DestRun {
            run,
            image,
            owner_ns,
            received_ns,
            received_error,
        }))
    })();
    exited(&ctl);
    r
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

/// A copy of a counter region's header and log.
#[derive(Debug, Clone)]
pub struct LogImage {
    pub counter: u64,
    /// Log length (entries).
    pub len: u64,
    /// `len` entries of `ENTRY` bytes.
    pub log: Vec<u8>,
}

fn read_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

fn read_log(path: &Path) -> Result<LogImage> {
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
    Ok(LogImage { counter, len, log })
}

/// Checks `b`'s region file (the whole history) against what the two app runs did and
/// against `a`'s frozen copy.
pub fn check_log(a_file: &Path, b_file: &Path, ra: &AppRun, rb: &AppRun) -> Result<LogCheck> {
    Ok(check_images(&read_log(a_file)?, &read_log(b_file)?, ra, rb))
}

/// Checks `b`'s region (the whole history) against what the two app runs did and against
/// `a`'s frozen copy.
pub fn check_images(a: &LogImage, b: &LogImage, ra: &AppRun, rb: &AppRun) -> LogCheck {
    let (counter, len, log) = (b.counter, b.len, &b.log);
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
            read_u64(log, e),
            read_u64(log, e + 8),
            read_u64(log, e + 16),
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
    if a.counter != a.len || a.len != ra.increments {
        fail(format!(
            "a's copy: counter {}, log length {}, but the app made {} increments there",
            a.counter, a.len, ra.increments
        ));
    }
    let n = a.log.len().min(log.len());
    if a.log[..n] != log[..n] {
        fail("a's log and the start of b's log differ".into());
    }
    c
}

// ---------------------------------------------------------------------------------------
// The demo.

/// The demo's result.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub ok: bool,
    /// `memory` (published memory, post-copy into a receiving app) or `file`.
    pub mode: String,
    pub rtt_ms: f64,
    pub size: u64,
    pub rate: u32,
    pub freeze: String,
    /// Whether the migration ran with post-copy (memory mode).
    pub postcopy: bool,
    /// The report of `a`'s migrate call: `downtime_ms`, `total_ms`, `postcopy_faults`,
    /// `deferred_chunks`, `dirty_tracking`, ...
    pub migration: MigrationReport,
    pub app_a: AppRun,
    pub app_b: AppRun,
    /// Increments the app made on `a` while the migration ran (pre-copy).
    pub increments_during_migration: u64,
    /// Last increment on `a` to first increment on `b`, from the log's timestamps.
    pub app_pause_ms: f64,
    /// Memory mode: the freeze hook returned (app parked on `a`) → `wait_owner` returned
    /// on `b`.
    pub freeze_to_b_owner_ms: Option<f64>,
    /// Memory mode: `wait_owner` returned → the first increment on `b` was logged (the
    /// first touches of stale pages fault them in from `a`).
    pub b_owner_to_first_increment_ms: Option<f64>,
    /// Memory mode: `wait_owner` returned → `wait_received` returned (post-copy done).
    pub b_owner_to_received_ms: Option<f64>,
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

/// Where each agent keeps the region (file mode) and its control socket (memory mode).
struct Host {
    file: PathBuf,
    control: PathBuf,
}

/// Runs the whole demo; `Err` only when it could not run, invariant failures are in
/// [`Summary::log`] (and `ok` is false).
pub async fn run(args: &Args) -> Result<Summary> {
    if args.rate == 0 {
        bail!("--rate must be at least 1");
    }
    check_room(args)?;
    let say = |s: String| {
        if !args.json {
            println!("{s}");
        }
    };
    let memory = args.mode == "memory";
    let tmp = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .context("making a temp dir")?;
    let dir = tmp.path();
    pagewire::demo::certs(dir, &["a", "b"]).context("making certificates")?;
    let (fa, fb) = (dir.join("counter.a"), dir.join("counter.b"));
    if !memory {
        Counter::format(&fa, args.size)?;
        // b serves a file of the same size; its content does not matter (it is
        // overwritten).
        std::fs::File::create(&fb)
            .and_then(|f| f.set_len(args.size))
            .with_context(|| format!("creating {}", fb.display()))?;
    }

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
    // Both agents have a control socket (the apps publish and receive through it).
    let mut ca = pagewire::demo::config(dir, "a", pa, &[("b", to_b.local_addr().port())]);
    let mut cb = pagewire::demo::config(dir, "b", pb, &[("a", to_a.local_addr().port())]);
    ca.control = Some(dir.join("a.sock"));
    cb.control = Some(dir.join("b.sock"));
    if !memory {
        ca.regions.push((REGION.into(), fa.clone()));
        cb.regions.push((REGION.into(), fb.clone()));
    }
    let ha = Host {
        file: fa,
        control: dir.join("a.sock"),
    };
    let hb = Host {
        file: fb,
        control: dir.join("b.sock"),
    };
    let a = Agent::start(ca).await.context("starting agent a")?;
    let b = Agent::start(cb).await.context("starting agent b")?;
    let r = demo(args, &a, &b, &ha, &hb, &say).await;
    a.shutdown().await;
    b.shutdown().await;
    to_a.shutdown().await;
    to_b.shutdown().await;
    r
}

/// The app on `a`, by mode.
enum AppA {
    File(std::thread::JoinHandle<Result<AppRun>>),
    Memory(std::thread::JoinHandle<Result<SourceRun>>),
}

type Receiver = (Arc<Ctl>, std::thread::JoinHandle<Result<Option<DestRun>>>);

/// Signed milliseconds from `from` to `to` (ns since the epoch).
fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

async fn demo(
    args: &Args,
    a: &Agent,
    b: &Agent,
    ha: &Host,
    hb: &Host,
    say: &dyn Fn(String),
) -> Result<Summary> {
    let memory = args.mode == "memory";
    settled(a, b).await?;
    say(format!(
        "agents a and b up on loopback; b reachable only through the WAN relay (RTT {:.0} ms)",
        args.rtt.as_secs_f64() * 1e3
    ));

    // The app on a.
    let ctl_a = Ctl::new();
    let app_a = if memory {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (c, sock, size, rate) = (ctl_a.clone(), ha.control.clone(), args.size, args.rate);
        let h = std::thread::spawn(move || app_publisher(sock, size, rate, c, tx));
        match rx.await {
            Ok(Ok(tracker)) => say(format!(
                "app on a: published its memory as region {REGION:?} (no replicas; dirty tracker {tracker}); {} increments/s ({} MiB, room for {} increments)",
                args.rate,
                args.size >> 20,
                (args.size - HEADER) / ENTRY
            )),
            Ok(Err(e)) => {
                let _ = stop_app(&ctl_a, h);
                bail!("the app on a could not publish its region: {e}");
            }
            Err(_) => {
                let e = stop_app(&ctl_a, h).err();
                bail!("the app on a ended before publishing: {e:?}");
            }
        }
        AppA::Memory(h)
    } else {
        let (c, path, rate) = (ctl_a.clone(), ha.file.clone(), args.rate);
        say(format!(
            "app on a: {} increments/s into file region {REGION:?} ({} MiB, room for {} increments)",
            args.rate,
            args.size >> 20,
            (args.size - HEADER) / ENTRY
        ));
        AppA::File(std::thread::spawn(move || app_file(path, HOST_A, rate, c)))
    };
    let stop_a = |app: AppA| -> Result<(AppRun, Option<LogImage>)> {
        match app {
            AppA::File(h) => Ok((stop_app(&ctl_a, h)?, None)),
            AppA::Memory(h) => {
                let s = stop_app(&ctl_a, h)?;
                Ok((s.run, Some(s.image)))
            }
        }
    };

    // Memory mode: the receiving app on b, waiting before the migration starts.
    let receiver: Option<Receiver> = if memory {
        let ctl = Ctl::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (c, sock, size, rate) = (ctl.clone(), hb.control.clone(), args.size, args.rate);
        let patience = args.max_time + Duration::from_secs(60);
        let h = std::thread::spawn(move || app_receiver(sock, size, rate, c, tx, patience));
        let ready = rx.await;
        if !matches!(ready, Ok(Ok(()))) {
            let e = match ready {
                Ok(Err(e)) => e,
                _ => format!("{:?}", stop_app(&ctl, h).err()),
            };
            let _ = stop_a(app_a);
            bail!("the app on b could not receive the region: {e}");
        }
        say("app on b: client::receive mapped an empty region and blocks in wait_owner".into());
        Some((ctl, h))
    } else {
        None
    };
    let stop_receiver = |r: Option<Receiver>| r.map(|(ctl, h)| stop_app(&ctl, h));

    tokio::time::sleep(args.run_a).await;

    // When the hook had the app on a parked (ns since the epoch; 0: not yet).
    let frozen_ns = Arc::new(AtomicU64::new(0));
    let freeze = match args.freeze.as_str() {
        "snapshot" => Freeze::Snapshot,
        _ => {
            let (ctl, frozen) = (ctl_a.clone(), frozen_ns.clone());
            Freeze::Hook(Arc::new(move |freeze: bool| {
                if freeze {
                    ctl.pause(Duration::from_secs(10))?;
                    frozen.store(now_ns(), Ordering::SeqCst);
                    Ok(())
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
        postcopy: memory,
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
    // File mode, like a supervisor on b: the app restarts on b, from the state it finds
    // in b's region, as soon as b's agent says it owns the region (polled every 2 ms);
    // not when a's migrate call returns, which is at least half an RTT later. (Memory
    // mode: b's app is already waiting in wait_owner.)
    let mut on_b = None;
    let migrated = loop {
        tokio::select! {
            r = &mut migration => break r,
            _ = tokio::time::sleep(Duration::from_millis(2)), if on_b.is_none() && !memory => {
                if owner(b) == Some(true) {
                    on_b = Some(start_app(&hb.file, HOST_B, args.rate));
                }
            }
        }
    };
    let b_started = Instant::now();
    // Migrated or not, the app on a ends here: a paused app stays parked until Stop.
    let (ra, a_image) = match stop_a(app_a).context("the app on a") {
        Ok(x) => x,
        Err(e) => {
            let _ = stop_receiver(receiver);
            if let Some((ctl, h)) = on_b {
                let _ = stop_app(&ctl, h);
            }
            return Err(e);
        }
    };
    let report = match migrated {
        Ok(r) => r,
        Err(e) => {
            let _ = stop_receiver(receiver);
            if let Some((ctl, h)) = on_b {
                let _ = stop_app(&ctl, h);
            }
            return Err(e).context("migrating the counter to b");
        }
    };
    say(format!(
        "migrated {REGION} to b in {:.0} ms: downtime {} (budget {:.0} ms), {} pre-copy rounds, {:.2} MiB sent, freeze: {}, dirty tracking: {}",
        report.total_ms,
        report.downtime_text(),
        args.downtime_budget.as_secs_f64() * 1e3,
        report.rounds,
        report.bytes_sent as f64 / (1 << 20) as f64,
        report.freeze,
        report.dirty_tracking,
    ));
    if memory {
        say(format!(
            "post-copy: {} chunks left stale at the handover, {} fetched on demand (postcopy_faults), post-copy phase {:.0} ms",
            report.deferred_chunks, report.postcopy_faults, report.postcopy_ms
        ));
    }
    let (own_a, own_b) = (owner(a), owner(b));
    let mut failures = Vec::new();
    let (rb, b_image, dest) = if let Some(recv) = receiver {
        tokio::time::sleep(args.run_b).await;
        match stop_receiver(Some(recv)).expect("a receiver") {
            Ok(Some(d)) => (d.run.clone(), Some(d.image.clone()), Some(d)),
            Ok(None) => {
                failures.push(
                    "the app on b never owned the region (wait_owner never returned true)"
                        .to_string(),
                );
                (AppRun::default(), None, None)
            }
            Err(e) => return Err(e).context("the app on b"),
        }
    } else {
        let (ctl_b, app_b) = match on_b {
            Some(x) => x,
            // b's ownership showed between two polls and the call's return.
            None => start_app(&hb.file, HOST_B, args.rate),
        };
        tokio::time::sleep(args.run_b.saturating_sub(b_started.elapsed())).await;
        let rb = stop_app(&ctl_b, app_b).context("the app on b")?;
        (rb, None, None)
    };
    let a_image = match a_image {
        Some(i) => i,
        None => read_log(&ha.file)?,
    };
    let b_image = match b_image {
        Some(i) => Some(i),
        None if !memory => Some(read_log(&hb.file)?),
        None => None,
    };
    let mut log = match &b_image {
        Some(bi) => check_images(&a_image, bi, &ra, &rb),
        None => LogCheck::default(),
    };
    log.failures.extend(failures);
    if own_a != Some(false) || own_b != Some(true) {
        log.failures.push(format!(
            "ownership after the migration: a owner {own_a:?}, b owner {own_b:?} (expected false, true)"
        ));
    }
    if ra.increments == 0 || rb.increments == 0 {
        log.failures
            .push("the app made no increment on one of the hosts".into());
    }
    if let Some(e) = dest.as_ref().and_then(|d| d.received_error.as_ref()) {
        log.failures
            .push(format!("b's app: wait_received failed: {e}"));
    }
    let during = (0..a_image.len)
        .filter(|i| read_u64(&a_image.log, (i * ENTRY + 8) as usize) >= migrate_start_ns)
        .count() as u64;
    let pause_ms = ms_between(ra.last_ns, rb.first_ns);
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
    let frozen = frozen_ns.load(Ordering::SeqCst);
    let freeze_to_owner = dest
        .as_ref()
        .filter(|_| frozen != 0)
        .map(|d| ms_between(frozen, d.owner_ns));
    let owner_to_first = dest
        .as_ref()
        .filter(|d| d.run.increments > 0)
        .map(|d| ms_between(d.owner_ns, d.run.first_ns));
    let owner_to_received = dest
        .as_ref()
        .and_then(|d| d.received_ns.map(|r| ms_between(d.owner_ns, r)));
    if let Some(d) = &dest {
        say(format!(
            "app on b: wait_owner returned {}; first increment {} later; wait_received (post-copy done, every chunk on b) {} after wait_owner",
            freeze_to_owner.map_or("(nothing froze a's app)".into(), |v| format!(
                "{v:.1} ms after a's app froze"
            )),
            owner_to_first.map_or("?".into(), |v| format!("{v:.1} ms")),
            owner_to_received.map_or_else(
                || d.received_error.clone().unwrap_or_default(),
                |v| format!("{v:.1} ms")
            ),
        ));
    }
    Ok(Summary {
        ok: log.failures.is_empty(),
        mode: args.mode.clone(),
        rtt_ms: args.rtt.as_secs_f64() * 1e3,
        size: args.size,
        rate: args.rate,
        freeze: args.freeze.clone(),
        postcopy: memory,
        migration: report,
        app_a: ra,
        app_b: rb,
        increments_during_migration: during,
        app_pause_ms: pause_ms,
        freeze_to_b_owner_ms: freeze_to_owner,
        b_owner_to_first_increment_ms: owner_to_first,
        b_owner_to_received_ms: owner_to_received,
        log,
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pagewire::demo::logs();
    let args = Args::parse();
    if args.role != "both" {
        return two_hosts::main(&args).await;
    }
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

// ---------------------------------------------------------------------------------------
// Two hosts: one side of the demo per host, each against its own agent.

pub mod two_hosts {
    use super::*;
    use pagewire::client::publish::Published;
    use pagewire::control::{ControlClient, MigrateArgs};

    /// What the source side saw.
    #[derive(Debug, Clone, Serialize)]
    pub struct SourceSummary {
        pub ok: bool,
        pub to: String,
        pub migration: Option<MigrationReport>,
        pub error: Option<String>,
        /// Increments the app completed on `a` before the migration returned (one that
        /// the freeze interrupted is not counted, but may be in the region).
        pub increments: u64,
        /// The log length of `a`'s copy at the freeze: the destination must hold exactly
        /// these entries of `a` and continue at this + 1.
        pub a_copy_len: u64,
    }

    /// What the destination side saw.
    #[derive(Debug, Clone, Serialize)]
    pub struct DestSummary {
        pub ok: bool,
        /// Entries written on `a` that `b` received (its log starts with them).
        pub a_entries: u64,
        /// The counter was one behind the log when `b` took over: the freeze landed
        /// inside an increment (after its log entry), which `b` completed.
        pub recovered_increment: bool,
        pub app: AppRun,
        /// Last entry of `a` to first of `b`, by the two hosts' wall clocks (as far
        /// apart as the clocks are).
        pub app_pause_ms: Option<f64>,
        /// `wait_owner` returned → first increment on `b`.
        pub owner_to_first_increment_ms: Option<f64>,
        /// `wait_owner` returned → every chunk here (`wait_received`).
        pub owner_to_received_ms: Option<f64>,
        pub log: LogCheck,
    }

    /// The app on `a` after a successful migration (or one whose outcome is in doubt):
    /// its writer is held at its next store (told to stop, it ends once released: when
    /// the publication ends). `published` must outlive `thread`.
    pub struct HeldApp {
        pub thread: std::thread::JoinHandle<Result<AppRun>>,
        pub published: Arc<Published>,
    }

    pub(super) async fn main(args: &Args) -> std::process::ExitCode {
        let out = |ok: bool, j: serde_json::Result<String>| {
            if args.json {
                match j {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("migrate_counter: {e}"),
                }
            }
            u8::from(!ok)
        };
        let code = match args.role.as_str() {
            "source" => match source(args).await {
                // The app thread on `a` may stay held by the freeze: the process ends
                // without waiting for it (which ends the publication).
                Ok((s, _held)) => out(s.ok, serde_json::to_string(&s)),
                Err(e) => {
                    eprintln!("migrate_counter: {e:#}");
                    2
                }
            },
            _ => {
                let a = args.clone();
                match tokio::task::spawn_blocking(move || dest(&a)).await {
                    Ok(Ok(s)) => out(s.ok, serde_json::to_string(&s)),
                    Ok(Err(e)) => {
                        eprintln!("migrate_counter: {e:#}");
                        2
                    }
                    Err(e) => {
                        eprintln!("migrate_counter: {e}");
                        2
                    }
                }
            }
        };
        std::process::exit(code.into())
    }

    fn control(args: &Args) -> PathBuf {
        args.control
            .clone()
            .unwrap_or_else(pagewire::control::default_socket)
    }

    fn say(args: &Args, s: String) {
        if !args.json {
            println!("{s}");
        }
    }

    /// The source side: publishes the counter region, runs the app for `--run-a`, then
    /// asks its agent to migrate the region to `--to` (post-copy; the writers held by
    /// write-protection). On success the app stays held ([`HeldApp`]) and `a`'s frozen
    /// copy is read back; on failure the app was released, is stopped, and `ok` is false
    /// (still held after 10 s: returned as a [`HeldApp`] too).
    pub async fn source(args: &Args) -> Result<(SourceSummary, Option<HeldApp>)> {
        let to = args
            .to
            .clone()
            .context("--role source needs --to PEER (the agent of the dest side)")?;
        if args.rate == 0 {
            bail!("--rate must be at least 1");
        }
        check_room(args)?;
        let sock = control(args);
        let opts = PublishOptions::new(&sock, REGION, args.size, &[]);
        let published = Arc::new(
            tokio::task::spawn_blocking(move || publish(&opts))
                .await?
                .with_context(|| {
                    format!("publishing the counter region through {}", sock.display())
                })?,
        );
        // SAFETY: the mapping is `len` bytes, writable and zero-filled; `published` keeps
        // it and outlives every user of the counter (HeldApp's contract).
        let counter =
            Arc::new(unsafe { Counter::format_raw(published.as_ptr(), published.len()) }?);
        say(args, format!(
            "app on a: published its memory as region {REGION:?} through {} (dirty tracker {}); {} increments/s for {:.1} s, then migrating to {to}",
            sock.display(),
            published.tracker().name(),
            args.rate,
            args.run_a.as_secs_f64()
        ));
        let ctl = Ctl::new();
        let (c, k, rate) = (counter.clone(), ctl.clone(), args.rate);
        let thread = std::thread::spawn(move || {
            let r = app_loop(&c, HOST_A, rate, &k);
            exited(&k);
            r
        });
        tokio::time::sleep(args.run_a).await;
        let margs = MigrateArgs {
            region: REGION.into(),
            to: to.clone(),
            downtime_budget_ms: args.downtime_budget.as_millis() as u64,
            max_rounds: args.max_rounds,
            max_time_ms: args.max_time.as_millis() as u64,
            freeze_pid: None,
            freeze_writes: true,
            postcopy: true,
            max_bandwidth_bps: None,
            no_mmap_writers: false,
        };
        const MIB: f64 = (1 << 20) as f64;
        let mut last = String::new();
        let quiet = args.json;
        let result = match ControlClient::connect(&control(args)).await {
            Ok(client) => client
                .migrate(margs, |p| {
                    let line = format!(
                        "  {:<13} round {:>2}  dirty {:>8.1} KiB/s  bandwidth {:>7.1} MiB/s  sent {:.1} MiB",
                        p.phase,
                        p.round,
                        p.dirty_rate_bps / 1024.0,
                        p.bandwidth_bps / MIB,
                        p.bytes_sent as f64 / MIB
                    );
                    if line != last && !quiet {
                        eprintln!("{line}");
                    }
                    last = line;
                })
                .await
                // Known: the agent said how the migration ended. Otherwise (the agent
                // went away mid-way) nobody here knows whether it handed the region over.
                .map_err(|e| {
                    let known = matches!(e, pagewire::control::ControlError::Migration { .. });
                    (known, e.to_string())
                }),
            Err(e) => Err((true, e.to_string())),
        };
        match result {
            Ok(report) => {
                // The writer is held at its next store, inside an increment and so holding
                // the app's lock: tell it to stop from a thread that may wait for that.
                let k = ctl.clone();
                std::thread::spawn(move || k.send(Cmd::Stop));
                let a = counter.image()?;
                say(args, format!(
                    "migrated {REGION} to {to} in {:.0} ms: downtime {}, {} rounds, {:.2} MiB sent, {} chunks left for post-copy, freeze: {}",
                    report.total_ms,
                    report.downtime_text(),
                    report.rounds,
                    report.bytes_sent as f64 / MIB,
                    report.deferred_chunks,
                    report.freeze
                ));
                say(args, format!(
                    "a's copy at the freeze: entries 1..={} (the app is held here until this process ends); {to} must continue at {}",
                    a.len,
                    a.len + 1
                ));
                Ok((
                    SourceSummary {
                        ok: true,
                        to,
                        migration: Some(report),
                        error: None,
                        increments: a.len,
                        a_copy_len: a.len,
                    },
                    Some(HeldApp { thread, published }),
                ))
            }
            Err((known, e)) => {
                // Aborted: the writers were released and the region is still a's. (If
                // the outcome is in doubt the writer may still be held, inside an
                // increment and its lock: stop it from another thread, wait a while.)
                let k = ctl.clone();
                std::thread::spawn(move || k.send(Cmd::Stop));
                let deadline = Instant::now() + Duration::from_secs(10);
                while !thread.is_finished() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let (increments, held) = if thread.is_finished() {
                    let run = thread
                        .join()
                        .map_err(|_| anyhow::anyhow!("the app thread panicked"))??;
                    (run.increments, None)
                } else {
                    say(args, "the app is still held by the freeze (the migration's outcome may be in doubt: see `pagewire status`)".into());
                    // The mapping must outlive the held thread: the caller keeps both.
                    (0, Some(HeldApp { thread, published }))
                };
                let a = counter.image()?;
                if known {
                    say(args, format!(
                        "migration to {to} FAILED: {e}; the app ran on here (its region is intact) and made {increments} increments",
                    ));
                } else {
                    say(args, format!(
                        "migration to {to}: OUTCOME UNKNOWN ({e}): the local agent went away mid-migration, so {to} may own the region now; the app here was stopped after {increments} increments: check `pagewire status` on {to} before running it here again",
                    ));
                }
                Ok((
                    SourceSummary {
                        ok: false,
                        to,
                        migration: None,
                        error: Some(e),
                        increments,
                        a_copy_len: a.len,
                    },
                    held,
                ))
            }
        }
    }

    /// The destination side: receives the region (before the source migrates), waits
    /// until this host owns it, completes an increment the freeze interrupted, runs the
    /// app for `--run-b` (its first touches of stale pages fault them in from `a`),
    /// waits for the end of post-copy and checks the whole log.
    pub fn dest(args: &Args) -> Result<DestSummary> {
        if args.rate == 0 {
            bail!("--rate must be at least 1");
        }
        check_room(args)?;
        let sock = control(args);
        let mut r = receive(&ReceiveOptions::new(&sock, REGION, args.size))
            .with_context(|| format!("client::receive through {}", sock.display()))?;
        say(args, format!(
            "app on b: receiving region {REGION:?} ({} MiB) through {}; waiting up to {:.0} s for the source side to migrate it here",
            args.size >> 20,
            sock.display(),
            args.wait.as_secs_f64()
        ));
        if !r
            .wait_owner(Some(args.wait))
            .context("waiting to own the region")?
        {
            bail!(
                "no migration arrived within {:.0} s",
                args.wait.as_secs_f64()
            );
        }
        let owner_ns = now_ns();
        // SAFETY: `r` keeps the mapping (`r.len()` bytes, writable) and outlives `c`.
        let c = unsafe { Counter::from_raw(r.as_ptr(), r.len()) }
            .context("the region after the handover")?;
        let recovered = c.recover()?;
        let before = c.image()?;
        let a_entries = before.len;
        let ctl = Ctl::new();
        let (run, received) = std::thread::scope(|s| {
            let app = s.spawn(|| {
                let r = app_loop(&c, HOST_B, args.rate, &ctl);
                exited(&ctl);
                r
            });
            let t0 = Instant::now();
            let received = r
                .wait_received(Some(args.max_time + Duration::from_secs(60)))
                .map(|ok| ok.then(now_ns));
            std::thread::sleep(args.run_b.saturating_sub(t0.elapsed()));
            ctl.send(Cmd::Stop);
            (app.join(), received)
        });
        let rb = run.map_err(|_| anyhow::anyhow!("the app thread panicked"))??;
        let image = c.image()?;
        // a's side as b sees it: the entries b started from.
        let a_image = LogImage {
            counter: a_entries,
            len: a_entries,
            log: image.log[..(a_entries * ENTRY) as usize].to_vec(),
        };
        let ra = AppRun {
            increments: a_entries,
            first: u64::from(a_entries > 0),
            last: a_entries,
            last_ns: if a_entries > 0 {
                read_u64(&image.log, ((a_entries - 1) * ENTRY + 8) as usize)
            } else {
                0
            },
            ..Default::default()
        };
        let mut log = check_images(&a_image, &image, &ra, &rb);
        if a_entries == 0 {
            log.failures.push("b received no entry written on a".into());
        }
        let received_ns = match received {
            Ok(Some(t)) => Some(t),
            Ok(None) => {
                log.failures.push("post-copy did not finish".into());
                None
            }
            Err(e) => {
                log.failures.push(format!("wait_received failed: {e}"));
                None
            }
        };
        let pause =
            (a_entries > 0 && rb.increments > 0).then(|| ms_between(ra.last_ns, rb.first_ns));
        let first = (rb.increments > 0).then(|| ms_between(owner_ns, rb.first_ns));
        let done = received_ns.map(|t| ms_between(owner_ns, t));
        say(args, format!(
            "b owns the region: a's entries 1..={a_entries}{}; b continued at {} and made {} increments ({}..={})",
            if recovered { " (the freeze had interrupted an increment; completed here)" } else { "" },
            rb.first,
            rb.increments,
            rb.first,
            rb.last
        ));
        say(args, format!(
            "first increment on b {} after wait_owner returned; post-copy done {} after; app-visible pause (last entry of a -> first of b, two hosts' clocks) {}",
            first.map_or("-".into(), |v| format!("{v:.1} ms")),
            done.map_or("-".into(), |v| format!("{v:.1} ms")),
            pause.map_or("-".into(), |v| format!("{v:.1} ms")),
        ));
        if log.failures.is_empty() {
            say(args, format!(
                "log check: {} entries, values 1..={} with no gap and no duplicate, {} written on a then {} on b, counter == log length: OK (compare a's side: its copy at the freeze must be 1..={a_entries})",
                log.entries, log.entries, log.entries_a, log.entries_b
            ));
        } else {
            say(args, "log check FAILED:".into());
            for f in &log.failures {
                say(args, format!("  - {f}"));
            }
        }
        Ok(DestSummary {
            ok: log.failures.is_empty(),
            a_entries,
            recovered_increment: recovered,
            app: rb,
            app_pause_ms: pause,
            owner_to_first_increment_ms: first,
            owner_to_received_ms: done,
            log,
        })
    }
}
