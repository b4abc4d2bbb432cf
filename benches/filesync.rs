//! Issue 4, benchmark 3: file delta sync, pagewire next to an rsync daemon, in one run.
//!
//! A random file (PAGEWIRE_BENCH_MB, default 1024 MiB) has a "previous sync": rsync's
//! destination and pagewire's replica start as identical copies of it. Then 1% of its
//! 64 KiB blocks (random, aligned) get fresh random bytes with pwrite(2), and each tool
//! brings its copy up to date:
//!
//! - **rsync**, push over loopback to a daemon (`rsync --daemon --no-detach` with a
//!   module in the data dir, `use chroot = no`): the local rsync is the sender (reads the
//!   changed source), the daemon is the generator/receiver (reads its copy, sends block
//!   checksums, applies the delta `--inplace`). Timed as the wall time of the client
//!   process `rsync -a --inplace --no-whole-file --stats SRC rsync://127.0.0.1:P/pw/file`;
//!   bytes on the wire are its `Total bytes sent` + `Total bytes received` (what rsync
//!   wrote to/read from its TCP socket). Run with rsync's default block size (sqrt of the
//!   file size: 32 KiB for 1 GiB) and with `--block-size=65536` (pagewire's chunk).
//! - **pagewire**, two in-process agents on loopback, `a` owning the file (inotify
//!   tracker, default options), `b` holding the replica. Replication starts before the
//!   change and one `flush` brings the replica up to date by hash (the "initial
//!   catch-up", reported separately). Then the change, and the wall time from the end of
//!   the last pwrite until `flush` returns: inotify event, rehash of the whole file, read
//!   of the changed chunks, transfer, verify and write on the replica, acknowledgement.
//!   Run twice per round: agents connected directly (the headline time), and through the
//!   in-process UDP relay `pagewire::wan::Relay` (passthrough link) whose counters give
//!   the bytes on the wire: UDP payload = QUIC packets with their headers, TLS/AEAD tags,
//!   ACKs and keep-alives, both directions. The agent's own payload count
//!   (`bytes_sent`, raw chunk bytes) is printed too.
//!
//! Neither figure includes IP/UDP or IP/TCP headers. The same change is applied to both
//! pagewire runs and both rsync runs of a round (the copies are reset to the old blocks
//! in between); rounds alternate which run goes first. Context printed too: read and
//! xxh3 speed over the whole file, and pagewire's per-chunk rehash (what the tracker does
//! per collection), plus no-op runs (nothing changed) of both tools.
//!
//! `cargo bench --bench filesync` (`scripts/bench-deps.sh` installs rsync). Environment:
//! PAGEWIRE_BENCH_MB (default 1024), PAGEWIRE_BENCH_ROUNDS (default 3),
//! PAGEWIRE_BENCH_WORKERS (worker threads per agent, default 1). Files live in /dev/shm
//! (about 3x the file size; the bench refuses to start without room) and are removed at
//! the end, on panic and on Ctrl-C/SIGTERM; the rsync daemon is killed likewise. Prints a
//! table and one `BENCH_JSON {...}` line.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pagewire::agent::{Agent, ReplicateOptions};
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::{RngCore, SeedableRng};

const BLOCK: u64 = 64 << 10;
const FLUSH_TIMEOUT: Duration = Duration::from_secs(600);

/// The rsync daemon and the running rsync client, for the signal handler.
static DAEMON_PID: AtomicU32 = AtomicU32::new(0);
static CLIENT_PID: AtomicU32 = AtomicU32::new(0);

fn kill_children() {
    for p in [&CLIENT_PID, &DAEMON_PID] {
        let pid = p.swap(0, Ordering::SeqCst);
        if pid != 0 {
            // SAFETY: kill(2) on a pid of a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
}

/// Bytes free for unprivileged use on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return u64::MAX;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

fn median_u(v: &[u64]) -> u64 {
    median(&v.iter().map(|&x| x as f64).collect::<Vec<_>>()).round() as u64
}

fn make_random(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

/// xxh3-64 of a whole file, streamed.
fn xxh3_file(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.digest();
        }
        h.update(&buf[..n]);
    }
}

/// One round's change: which blocks, their old and new contents.
struct Change {
    blocks: Vec<u64>,
    old: Vec<Vec<u8>>,
    new: Vec<Vec<u8>>,
}

impl Change {
    fn plan(src: &Path, size: u64, n: usize, rng: &mut rand::rngs::StdRng) -> Change {
        let total = (size / BLOCK) as usize;
        let mut blocks: Vec<u64> = rand::seq::index::sample(rng, total, n)
            .into_iter()
            .map(|b| b as u64)
            .collect();
        blocks.sort_unstable();
        let f = std::fs::File::open(src).unwrap();
        let old = blocks
            .iter()
            .map(|&b| {
                let mut v = vec![0u8; BLOCK as usize];
                f.read_exact_at(&mut v, b * BLOCK).unwrap();
                v
            })
            .collect();
        let new = blocks
            .iter()
            .map(|_| {
                let mut v = vec![0u8; BLOCK as usize];
                rng.fill_bytes(&mut v);
                v
            })
            .collect();
        Change { blocks, old, new }
    }

    /// pwrite(2)s `data` (old or new) at the changed blocks of `path`.
    fn write(&self, path: &Path, data: &[Vec<u8>]) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        for (b, d) in self.blocks.iter().zip(data) {
            f.write_all_at(d, b * BLOCK).unwrap();
        }
    }

    /// True when `path` holds the new contents at every changed block.
    fn is_new(&self, path: &Path) -> bool {
        let f = std::fs::File::open(path).unwrap();
        let mut v = vec![0u8; BLOCK as usize];
        self.blocks.iter().zip(&self.new).all(|(b, d)| {
            f.read_exact_at(&mut v, b * BLOCK).unwrap();
            &v == d
        })
    }
}

// ---------------------------------------------------------------------------------------
// pagewire

struct Ctx {
    certs: tempfile::TempDir,
    rt_b: tokio::runtime::Runtime,
    rt_relay: tokio::runtime::Runtime,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct PwRun {
    relay: bool,
    /// replicate_file (tracker's first hash) + first flush (catch-up by hash).
    init_s: f64,
    init_wire_bytes: u64,
    init_payload: u64,
    /// End of the change until flush returned.
    delta_s: f64,
    delta_wire_bytes: u64,
    delta_wire_packets: u64,
    /// Of the delta's wire bytes/datagrams: owner -> replica (data) and back (ACKs).
    delta_data_dir: (u64, u64),
    delta_reverse_dir: (u64, u64),
    delta_payload: u64,
    /// A flush with nothing changed.
    noop_s: f64,
    noop_wire_bytes: u64,
}

fn wire(relays: &[Relay]) -> (u64, u64) {
    relays.iter().fold((0, 0), |(b, p), r| {
        let s = r.stats();
        (
            b + s.bytes_to_upstream + s.bytes_to_client,
            p + s.packets_to_upstream + s.packets_to_client,
        )
    })
}

/// (bytes, datagrams) owner -> replica and replica -> owner. `relays[0]` carries a's
/// dials to b (a is its client), `relays[1]` b's dials to a (a is its upstream).
fn directions(relays: &[Relay]) -> ((u64, u64), (u64, u64)) {
    if relays.len() != 2 {
        return ((0, 0), (0, 0));
    }
    let (x, y) = (relays[0].stats(), relays[1].stats());
    (
        (
            x.bytes_to_upstream + y.bytes_to_client,
            x.packets_to_upstream + y.packets_to_client,
        ),
        (
            x.bytes_to_client + y.bytes_to_upstream,
            x.packets_to_client + y.packets_to_upstream,
        ),
    )
}

fn payload(a: &Agent) -> u64 {
    a.status()
        .replications
        .iter()
        .flat_map(|r| r.replicas.iter())
        .map(|l| l.bytes_sent)
        .sum()
}

/// Two agents (`a` owns `src`, `b` holds `replica`), replication started and caught up,
/// then `change` applied to `src` and flushed.
async fn pagewire_run(ctx: &Ctx, relay: bool, src: &Path, replica: &Path, ch: &Change) -> PwRun {
    let dir = ctx.certs.path();
    let (pa, pb) = (
        pagewire::demo::free_port().unwrap(),
        pagewire::demo::free_port().unwrap(),
    );
    let mut relays = Vec::new();
    if relay {
        // Both directions of dialing go through a relay, so whichever connection the
        // agents keep is counted.
        for up in [pb, pa] {
            let cfg = RelayConfig::symmetric(
                "127.0.0.1:0".parse().unwrap(),
                format!("127.0.0.1:{up}").parse().unwrap(),
                LinkParams::default(),
            );
            relays.push(
                ctx.rt_relay
                    .spawn(Relay::start(cfg))
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
    }
    let (a_sees_b, b_sees_a) = if relay {
        (relays[0].local_addr().port(), relays[1].local_addr().port())
    } else {
        (pb, pa)
    };
    let mut ca = pagewire::demo::config(dir, "a", pa, &[("b", a_sees_b)]);
    ca.regions.push(("r".into(), src.to_path_buf()));
    let mut cb = pagewire::demo::config(dir, "b", pb, &[("a", b_sees_a)]);
    cb.regions.push(("r".into(), replica.to_path_buf()));
    let b = ctx.rt_b.spawn(Agent::start(cb)).await.unwrap().unwrap();
    let a = Agent::start(ca).await.unwrap();
    assert!(a.wait_connected("b", Duration::from_secs(10)).await);
    let opts = ReplicateOptions {
        to: vec!["b".into()],
        ..Default::default()
    };
    let mut run = PwRun {
        relay,
        ..Default::default()
    };

    let w0 = wire(&relays);
    let t = Instant::now();
    a.replicate_file("r", "inotify", None, &opts).unwrap();
    a.flush("r", FLUSH_TIMEOUT).await.unwrap();
    run.init_s = t.elapsed().as_secs_f64();
    let w1 = wire(&relays);
    let d1 = directions(&relays);
    let p1 = payload(&a);
    run.init_wire_bytes = w1.0 - w0.0;
    run.init_payload = p1;

    ch.write(src, &ch.new);
    let t = Instant::now();
    a.flush("r", FLUSH_TIMEOUT).await.unwrap();
    run.delta_s = t.elapsed().as_secs_f64();
    let w2 = wire(&relays);
    let d2 = directions(&relays);
    let p2 = payload(&a);
    let sub = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
    run.delta_data_dir = sub(d2.0, d1.0);
    run.delta_reverse_dir = sub(d2.1, d1.1);
    run.delta_wire_bytes = w2.0 - w1.0;
    run.delta_wire_packets = w2.1 - w1.1;
    run.delta_payload = p2 - p1;
    assert!(ch.is_new(replica), "the replica did not get the change");

    let t = Instant::now();
    a.flush("r", FLUSH_TIMEOUT).await.unwrap();
    run.noop_s = t.elapsed().as_secs_f64();
    run.noop_wire_bytes = wire(&relays).0 - w2.0;

    a.shutdown().await;
    b.shutdown().await;
    for r in relays {
        ctx.rt_relay.spawn(r.shutdown()).await.unwrap();
    }
    run
}

// ---------------------------------------------------------------------------------------
// rsync

/// The rsync daemon; killed when dropped.
struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    fn start(data: &Path, module: &Path) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = data.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nuid = 0\ngid = 0\nreverse lookup = no\nlog file = {}\n\n[pw]\n    path = {}\n    read only = no\n",
                data.join("rsyncd.log").display(),
                module.display()
            ),
        )
        .unwrap();
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the rsync daemon (is rsync installed? scripts/bench-deps.sh)");
        DAEMON_PID.store(child.id(), Ordering::SeqCst);
        let mut d = Daemon { child, port };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("the rsync daemon exited: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the rsync daemon did not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        DAEMON_PID.store(0, Ordering::SeqCst);
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct RsRun {
    block: Option<u64>,
    wall_s: f64,
    sent: u64,
    received: u64,
    literal: u64,
    matched: u64,
}

impl RsRun {
    fn wire(&self) -> u64 {
        self.sent + self.received
    }
}

/// The number after `label` in rsync's --stats output (digits only: 3.2 prints commas).
fn stat(out: &str, label: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in rsync output:\n{out}"));
    let digits: String = line[line.find(':').unwrap() + 1..]
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(|c| c.is_ascii_digit())
        .collect();
    digits.parse().unwrap()
}

/// Pushes `src` to the daemon's `pw/file`.
fn rsync(d: &Daemon, src: &Path, block: Option<u64>, extra: &[&str]) -> RsRun {
    let mut cmd = Command::new("rsync");
    cmd.args(["-a", "--inplace", "--no-whole-file", "--stats"]);
    if let Some(b) = block {
        cmd.arg(format!("--block-size={b}"));
    }
    cmd.args(extra)
        .arg(src)
        .arg(format!("rsync://127.0.0.1:{}/pw/file", d.port))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let child = cmd.spawn().expect("running rsync");
    CLIENT_PID.store(child.id(), Ordering::SeqCst);
    let out = child.wait_with_output().unwrap();
    let wall_s = t0.elapsed().as_secs_f64();
    CLIENT_PID.store(0, Ordering::SeqCst);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rsync failed ({}):\n{}\n{}",
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    RsRun {
        block,
        wall_s,
        sent: stat(&text, "Total bytes sent"),
        received: stat(&text, "Total bytes received"),
        literal: stat(&text, "Literal data"),
        matched: stat(&text, "Matched data"),
    }
}

/// rsync's default block size for a file of `len` bytes (generator.c, sum_sizes_sqroot,
/// protocol >= 30): about sqrt(len), rounded down to a multiple of 8, 700 ..= 128 KiB.
fn rsync_default_block(len: u64) -> u64 {
    const BLOCK_SIZE: u64 = 700;
    const MAX_BLOCK_SIZE: u64 = 1 << 17;
    if len <= BLOCK_SIZE * BLOCK_SIZE {
        return BLOCK_SIZE;
    }
    let (mut c, mut l) = (1u64, len);
    loop {
        l >>= 2;
        if l == 0 {
            break;
        }
        c <<= 1;
    }
    if c >= MAX_BLOCK_SIZE {
        return MAX_BLOCK_SIZE;
    }
    let mut b = 0u64;
    while c >= 8 {
        b |= c;
        if len < b * b {
            b &= !c;
        }
        c >>= 1;
    }
    b.max(BLOCK_SIZE)
}

// ---------------------------------------------------------------------------------------

fn main() {
    let workers = env_u64("PAGEWIRE_BENCH_WORKERS", 1).max(1) as usize;
    let rt_a = runtime("agent-a", workers);
    let ctx = Ctx {
        certs: tempfile::tempdir().unwrap(),
        rt_b: runtime("agent-b", workers),
        rt_relay: runtime("relay", 1),
    };
    rt_a.block_on(run(&ctx, workers));
    // Agents and relays are shut down; stop the runtimes' idle threads.
    drop(ctx);
    rt_a.shutdown_timeout(Duration::from_secs(5));
}

async fn run(ctx: &Ctx, workers: usize) {
    let mb = env_u64("PAGEWIRE_BENCH_MB", 1024).max(1);
    let rounds = env_u64("PAGEWIRE_BENCH_ROUNDS", 3).max(1) as usize;
    let size = mb << 20;
    pagewire::demo::certs(ctx.certs.path(), &["a", "b"]).unwrap();
    let data = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    // Source, replica and rsync's copy, plus slack (the rsync daemon log, certificates).
    let need = 3 * size + (64 << 20);
    let free = free_bytes(data.path());
    if free < need {
        eprintln!(
            "not enough space in {}: need {} MiB, {} MiB free; lower PAGEWIRE_BENCH_MB",
            data.path().display(),
            need >> 20,
            free >> 20
        );
        drop(data);
        std::process::exit(2);
    }
    // Interrupted runs must not leave gigabytes in tmpfs or a daemon behind.
    let data_dir = data.path().to_path_buf();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let mut int =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).unwrap();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        kill_children();
        let _ = std::fs::remove_dir_all(&data_dir);
        eprintln!("interrupted: removed {}", data_dir.display());
        std::process::exit(130);
    });

    let blocks = size / BLOCK;
    let n_changed = ((blocks as f64 * 0.01).round() as usize).max(1);
    let default_block = rsync_default_block(size);
    let rsync_version = Command::new("rsync")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| {
            kill_children();
            panic!("rsync not runnable ({e}); run scripts/bench-deps.sh")
        });
    println!(
        "file delta sync, issue 4 bench 3: {mb} MiB random file, {n_changed} of {blocks} 64 KiB blocks changed per round (1%, {:.2} MiB), loopback, {rounds} rounds",
        (n_changed as u64 * BLOCK) as f64 / (1 << 20) as f64
    );
    println!(
        "  {rsync_version}; pagewire agents on their own {workers}-worker runtimes, inotify tracker, default replication options"
    );

    let src = data.path().join("src");
    let replica = data.path().join("replica");
    let module = data.path().join("rsync-module");
    std::fs::create_dir(&module).unwrap();
    let dest = module.join("file");
    let t = Instant::now();
    make_random(&src, size, 1);
    std::fs::copy(&src, &replica).unwrap();
    std::fs::copy(&src, &dest).unwrap();
    eprintln!("  (made the files in {:.1} s)", t.elapsed().as_secs_f64());

    // Context: how fast can the whole file be read and hashed here.
    let (read_s, xxh3_s, rehash_s) = {
        let mut buf = vec![0u8; size as usize];
        let mut read_s = f64::MAX;
        for _ in 0..2 {
            let t = Instant::now();
            std::fs::File::open(&src)
                .unwrap()
                .read_exact(&mut buf)
                .unwrap();
            read_s = read_s.min(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let h = xxhash_rust::xxh3::xxh3_64(&buf);
        let xxh3_s = t.elapsed().as_secs_f64();
        std::hint::black_box(h);
        drop(buf);
        let region = pagewire::region::FileRegion::open("ctx", &src, BLOCK as u32).unwrap();
        let t = Instant::now();
        let hashes = region.chunk_hashes().unwrap();
        let rehash_s = t.elapsed().as_secs_f64();
        std::hint::black_box(hashes);
        (read_s, xxh3_s, rehash_s)
    };

    let daemon = Daemon::start(data.path(), &module);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut pw: Vec<PwRun> = Vec::new();
    let mut rs: Vec<RsRun> = Vec::new();
    for round in 0..rounds {
        let ch = Change::plan(&src, size, n_changed, &mut rng);
        // pagewire: the same change twice, agents direct and through the relays; the
        // source and the replica are set back to the old blocks in between.
        let modes = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for (i, relay) in modes.into_iter().enumerate() {
            if i > 0 {
                ch.write(&src, &ch.old);
                ch.write(&replica, &ch.old);
            }
            let r = pagewire_run(ctx, relay, &src, &replica, &ch).await;
            eprintln!("  round {round} pagewire {r:?}");
            pw.push(r);
        }
        // rsync: the same change with both block sizes; rsync's copy is set back to the
        // old blocks in between (its mtime then differs from the source's, so rsync's
        // quick check does not skip it).
        let variants = if round % 2 == 0 {
            [None, Some(BLOCK)]
        } else {
            [Some(BLOCK), None]
        };
        for (i, block) in variants.into_iter().enumerate() {
            if i > 0 {
                ch.write(&dest, &ch.old);
            }
            let r = rsync(&daemon, &src, block, &[]);
            assert!(ch.is_new(&dest), "rsync did not apply the change");
            eprintln!("  round {round} rsync {r:?}");
            rs.push(r);
        }
        let h = xxh3_file(&src);
        assert_eq!(h, xxh3_file(&replica), "pagewire replica differs");
        assert_eq!(h, xxh3_file(&dest), "rsync copy differs");
    }
    // No-op: both sides equal, rsync's copy with the source's mtime (rsync -a set it).
    let rs_noop = rsync(&daemon, &src, None, &[]);
    let rs_noop_i = rsync(&daemon, &src, None, &["--ignore-times"]);
    drop(daemon);

    // Figures.
    let pick_pw = |relay: bool| -> Vec<&PwRun> { pw.iter().filter(|r| r.relay == relay).collect() };
    let (pw_direct, pw_relay) = (pick_pw(false), pick_pw(true));
    let pick_rs = |b: Option<u64>| -> Vec<&RsRun> { rs.iter().filter(|r| r.block == b).collect() };
    let (rs_def, rs_64k) = (pick_rs(None), pick_rs(Some(BLOCK)));
    let ms = |v: &[&PwRun], f: fn(&PwRun) -> f64| {
        median(&v.iter().map(|r| f(r)).collect::<Vec<_>>()) * 1e3
    };
    let rms = |v: &[&RsRun]| median(&v.iter().map(|r| r.wall_s).collect::<Vec<_>>()) * 1e3;
    let rwire = |v: &[&RsRun]| median_u(&v.iter().map(|r| r.wire()).collect::<Vec<_>>());
    let runs_ms = |v: Vec<f64>| {
        v.iter()
            .map(|x| format!("{:.0}", x * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pw_ms = ms(&pw_direct, |r| r.delta_s);
    let pw_relay_ms = ms(&pw_relay, |r| r.delta_s);
    let pw_wire = median_u(
        &pw_relay
            .iter()
            .map(|r| r.delta_wire_bytes)
            .collect::<Vec<_>>(),
    );
    let pw_pkts = median_u(
        &pw_relay
            .iter()
            .map(|r| r.delta_wire_packets)
            .collect::<Vec<_>>(),
    );
    let pw_payload = median_u(
        &pw_direct
            .iter()
            .chain(&pw_relay)
            .map(|r| r.delta_payload)
            .collect::<Vec<_>>(),
    );
    let (def_ms, def_wire) = (rms(&rs_def), rwire(&rs_def));
    let (b64_ms, b64_wire) = (rms(&rs_64k), rwire(&rs_64k));
    let changed = n_changed as u64 * BLOCK;
    let yes = |b: bool| if b { "yes" } else { "NO" };

    println!("\ncontext ({mb} MiB file in /dev/shm)");
    println!(
        "  read(2) into memory             {:8.0} ms  {:6.2} GB/s",
        read_s * 1e3,
        size as f64 / read_s / 1e9
    );
    println!(
        "  xxh3-64 of the file in memory   {:8.0} ms  {:6.2} GB/s",
        xxh3_s * 1e3,
        size as f64 / xxh3_s / 1e9
    );
    println!(
        "  pagewire rehash (pread+xxh3 per 64 KiB chunk, what the tracker does per change) {:.0} ms  {:.2} GB/s",
        rehash_s * 1e3,
        size as f64 / rehash_s / 1e9
    );

    println!(
        "\ndelta sync of {n_changed} changed 64 KiB blocks ({changed} bytes), median of {rounds} rounds"
    );
    println!(
        "  {:<44} {:>9} {:>14} {:>9} {:>9}   runs (ms)",
        "", "wall ms", "wire bytes", "ms/rsync", "B/rsync"
    );
    let row = |name: &str, ms: f64, wire: u64, runs: String| {
        println!(
            "  {:<44} {:>9.0} {:>14} {:>9.3} {:>9.3}   {}",
            name,
            ms,
            wire,
            ms / def_ms,
            wire as f64 / def_wire as f64,
            runs
        );
    };
    row(
        &format!("rsync push, default block ({} KiB)", default_block >> 10),
        def_ms,
        def_wire,
        runs_ms(rs_def.iter().map(|r| r.wall_s).collect()),
    );
    row(
        "rsync push, --block-size=65536",
        b64_ms,
        b64_wire,
        runs_ms(rs_64k.iter().map(|r| r.wall_s).collect()),
    );
    row(
        "pagewire flush, direct (wire = relay run's)",
        pw_ms,
        pw_wire,
        runs_ms(pw_direct.iter().map(|r| r.delta_s).collect()),
    );
    row(
        "pagewire flush, through passthrough relay",
        pw_relay_ms,
        pw_wire,
        runs_ms(pw_relay.iter().map(|r| r.delta_s).collect()),
    );
    println!(
        "  rsync bytes = Total bytes sent + received (default: sent {} + received {}; literal {}, matched {});",
        median_u(&rs_def.iter().map(|r| r.sent).collect::<Vec<_>>()),
        median_u(&rs_def.iter().map(|r| r.received).collect::<Vec<_>>()),
        median_u(&rs_def.iter().map(|r| r.literal).collect::<Vec<_>>()),
        median_u(&rs_def.iter().map(|r| r.matched).collect::<Vec<_>>()),
    );
    println!(
        "  pagewire bytes = UDP payload through the relay, both ways ({pw_pkts} datagrams; +{} B of IPv4/UDP headers not counted); agent payload (bytes_sent) {pw_payload}",
        pw_pkts * 28
    );
    // On a real 1500-byte-MTU path both would also pay IP headers: pagewire 28 B (IPv4 +
    // UDP) per datagram, counted above; rsync about 52 B (IPv4 + TCP with timestamps) per
    // 1448-byte segment plus a 52 B ACK per two segments the other way (an estimate).
    let tcp_est = |b: u64| {
        let segs = b.div_ceil(1448);
        b + segs * 52 + segs.div_ceil(2) * 52
    };
    println!(
        "  estimate with IP headers on a 1500-MTU path: rsync default {}, rsync 64 KiB {}, pagewire {} ({:.3}x / {:.3}x)",
        tcp_est(def_wire),
        tcp_est(b64_wire),
        pw_wire + pw_pkts * 28,
        (pw_wire + pw_pkts * 28) as f64 / tcp_est(def_wire) as f64,
        (pw_wire + pw_pkts * 28) as f64 / tcp_est(b64_wire) as f64,
    );
    {
        // The median relay run by wire bytes.
        let mut v: Vec<&&PwRun> = pw_relay.iter().collect();
        v.sort_by_key(|r| r.delta_wire_bytes);
        let m = v[v.len() / 2];
        let (d, r) = (m.delta_data_dir, m.delta_reverse_dir);
        let per = |x: (u64, u64)| x.0 as f64 / x.1.max(1) as f64;
        println!(
            "  pagewire wire split: owner->replica {} B in {} datagrams ({:.0} B each; {} B over the payload), replica->owner {} B in {} datagrams ({:.0} B each)",
            d.0,
            d.1,
            per(d),
            d.0.saturating_sub(m.delta_payload),
            r.0,
            r.1,
            per(r)
        );
    }
    let bytes_ok = pw_wire <= def_wire;
    let time_ok = pw_ms <= 0.5 * def_ms;
    println!(
        "  target vs rsync default: bytes <= rsync: {} ({:.3}x); time <= 0.5x rsync: {} ({:.3}x)",
        yes(bytes_ok),
        pw_wire as f64 / def_wire as f64,
        yes(time_ok),
        pw_ms / def_ms
    );
    println!(
        "  target vs rsync --block-size=65536: bytes: {} ({:.3}x); time: {} ({:.3}x)",
        yes(pw_wire <= b64_wire),
        pw_wire as f64 / b64_wire as f64,
        yes(pw_ms <= 0.5 * b64_ms),
        pw_ms / b64_ms
    );

    println!("\nother phases");
    println!(
        "  pagewire initial catch-up (replica already equal; replicate_file + first flush): {:.0} ms, {} wire bytes, {} payload bytes",
        ms(&pw_direct, |r| r.init_s),
        median_u(&pw_relay.iter().map(|r| r.init_wire_bytes).collect::<Vec<_>>()),
        median_u(&pw.iter().map(|r| r.init_payload).collect::<Vec<_>>()),
    );
    println!(
        "  pagewire no-op flush (nothing changed): {:.1} ms, {} wire bytes",
        ms(&pw_direct, |r| r.noop_s),
        median_u(
            &pw_relay
                .iter()
                .map(|r| r.noop_wire_bytes)
                .collect::<Vec<_>>()
        ),
    );
    println!(
        "  rsync no-op, default (quick check: size+mtime equal): {:.0} ms, {} bytes",
        rs_noop.wall_s * 1e3,
        rs_noop.wire()
    );
    println!(
        "  rsync no-op, --ignore-times (full delta pass, nothing differs): {:.0} ms, {} bytes",
        rs_noop_i.wall_s * 1e3,
        rs_noop_i.wire()
    );

    let json = serde_json::json!({
        "file_mib": mb,
        "rounds": rounds,
        "changed_blocks": n_changed,
        "changed_bytes": changed,
        "rsync_version": rsync_version,
        "rsync_default_block": default_block,
        "read_gbps": size as f64 / read_s / 1e9,
        "xxh3_gbps": size as f64 / xxh3_s / 1e9,
        "rehash_ms": rehash_s * 1e3,
        "rsync_default_ms": def_ms,
        "rsync_default_wire": def_wire,
        "rsync_64k_ms": b64_ms,
        "rsync_64k_wire": b64_wire,
        "pagewire_ms": pw_ms,
        "pagewire_relay_ms": pw_relay_ms,
        "pagewire_wire": pw_wire,
        "pagewire_wire_packets": pw_pkts,
        "pagewire_payload": pw_payload,
        "time_ratio": pw_ms / def_ms,
        "bytes_ratio": pw_wire as f64 / def_wire as f64,
        "target_bytes_met": bytes_ok,
        "target_time_met": time_ok,
        "rsync_default_wire_est_ip": tcp_est(def_wire),
        "rsync_64k_wire_est_ip": tcp_est(b64_wire),
        "pagewire_wire_ip": pw_wire + pw_pkts * 28,
        "rsync_noop_ms": rs_noop.wall_s * 1e3,
        "rsync_noop_wire": rs_noop.wire(),
        "rsync_noop_ignore_times_ms": rs_noop_i.wall_s * 1e3,
        "rsync_noop_ignore_times_wire": rs_noop_i.wire(),
        "pagewire_runs": pw,
        "rsync_runs": rs,
    });
    println!("\nBENCH_JSON {json}");
    drop(data);
}
