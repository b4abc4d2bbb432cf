//! Test helpers: certificates in a temp dir, agents on loopback, region files.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pagewire::agent::{Agent, AgentConfig, PeerSpec};
use pagewire::wan::{LinkParams, Relay, RelayConfig};
use rand::{RngCore, SeedableRng};

/// Polls `f` every 10 ms until it holds; Err after `limit` (a hang guard, not a timing
/// check).
pub async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Result<(), ()> {
    let end = tokio::time::Instant::now() + limit;
    while !f() {
        if tokio::time::Instant::now() > end {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A WAN relay in front of the agent listening on 127.0.0.1:`port` (both directions
/// `link`); `set_params` cuts and heals it.
pub async fn relay_to(port: u16, link: LinkParams) -> Relay {
    Relay::start(RelayConfig::symmetric(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap(),
        link,
    ))
    .await
    .unwrap()
}

/// Link parameters that drop everything (a cut path).
pub fn cut() -> LinkParams {
    LinkParams {
        loss: 1.0,
        ..Default::default()
    }
}

pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A CA and node certificates in a temp dir.
pub struct Mesh {
    pub dir: tempfile::TempDir,
}

impl Mesh {
    pub fn new(names: &[&str]) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        pagewire::certs::init_ca(dir.path(), 2, false).unwrap();
        for n in names {
            pagewire::certs::issue(dir.path(), n, &["127.0.0.1".into()], 2, false).unwrap();
        }
        Mesh { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A config for `name` listening on `port`, expecting `peers` (name, port).
    pub fn config(&self, name: &str, port: u16, peers: &[(&str, u16)]) -> AgentConfig {
        let d = self.path();
        let mut c = AgentConfig::new(
            name,
            &format!("127.0.0.1:{port}"),
            &d.join("ca.pem"),
            &d.join(format!("{name}.pem")),
            &d.join(format!("{name}.key")),
        );
        c.peers = peers
            .iter()
            .map(|(n, p)| PeerSpec {
                name: n.to_string(),
                addr: format!("127.0.0.1:{p}"),
            })
            .collect();
        c.reconnect_max = Duration::from_millis(500);
        c.tuning.idle_timeout = Duration::from_secs(5);
        c.tuning.keep_alive = Duration::from_millis(500);
        c
    }
}

/// A UDP port that was free a moment ago.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts an agent, retrying while its port is still held by a previous incarnation.
pub async fn start(cfg: AgentConfig) -> Agent {
    let mut last = None;
    for _ in 0..50 {
        match Agent::start(cfg.clone()).await {
            Ok(a) => return a,
            Err(e) => {
                last = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("agent {} did not start: {last:?}", cfg.name);
}

pub async fn connected(a: &Agent, peer: &str) {
    assert!(
        a.wait_connected(peer, Duration::from_secs(20)).await,
        "{} did not connect to {peer}",
        a.name()
    );
}

/// Writes `size` pseudo-random bytes (seeded) to `path`.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

/// A sparse file of `size` bytes with `pieces` (offset, bytes) written into it.
pub fn sparse_file(path: &Path, size: u64, pieces: &[(u64, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in pieces {
        f.write_all_at(data, *off).unwrap();
    }
}

/// Asserts two files are byte-identical (streamed, so big files are fine).
pub fn assert_same(a: &Path, b: &Path) {
    use std::io::Read;
    let (ma, mb) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    assert_eq!(
        ma.len(),
        mb.len(),
        "sizes of {} and {}",
        a.display(),
        b.display()
    );
    let mut fa = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a).unwrap());
    let mut fb = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

/// A directory for region files: /dev/shm when there, else a temp dir.
pub fn region_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// The data segments of a file (SEEK_DATA/SEEK_HOLE), as (start, end).
pub fn data_segments(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0i64;
    while off < size {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole };
        out.push((data as u64, hole as u64));
        off = hole;
    }
    out
}

/// Asserts two (possibly huge, sparse) files are byte-identical by comparing every data
/// segment of either file; outside them both files read as zeros.
pub fn assert_same_sparse(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len()
    );
    let fa = std::fs::File::open(a).unwrap();
    let fb = std::fs::File::open(b).unwrap();
    let mut segs = data_segments(a);
    segs.extend(data_segments(b));
    for (s, e) in segs {
        let mut off = s;
        while off < e {
            let n = ((e - off) as usize).min(1 << 20);
            let mut x = vec![0u8; n];
            let mut y = vec![0u8; n];
            fa.read_exact_at(&mut x, off).unwrap();
            fb.read_exact_at(&mut y, off).unwrap();
            assert!(
                x == y,
                "{} and {} differ in [{off}, {})",
                a.display(),
                b.display(),
                off + n as u64
            );
            off += n as u64;
        }
    }
}
