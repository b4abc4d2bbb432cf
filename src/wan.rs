//! User-space WAN emulator: a UDP relay that adds delay, jitter, loss and a
//! rate limit between a client and an upstream server (a stand-in for
//! `tc netem`, which these machines do not have).
//!
//! The relay listens on one UDP socket. Every distinct client source address
//! gets its own upstream-facing socket, so several QUIC clients can share one
//! relay and the upstream sees them as different peers. Each direction
//! (client → upstream, upstream → client) is an independent emulated link with
//! its own [`LinkParams`]; all clients share the same two links, like they
//! would share a real bottleneck.
//!
//! Per direction, a packet is
//! 1. dropped with probability `loss`;
//! 2. dropped (drop-tail) if the bytes already queued on the link plus this
//!    packet would exceed `queue_bytes`;
//! 3. otherwise scheduled at `max(now, link_free_at) + len*8/rate` (the link
//!    is busy serialising earlier packets, so the rate is a real bottleneck),
//!    plus `delay` plus a uniform jitter in `[0, jitter]`. Jitter may reorder
//!    packets, as netem does.
//!
//! Like netem's `limit`, the queue counts every packet not yet released,
//! including those only waiting out the propagation delay, so `queue_bytes`
//! should be at least `rate × delay` plus the buffer you want to model.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pagewire::wan::RelayError> {
//! use pagewire::wan::{LinkParams, Relay, RelayConfig};
//! use std::time::Duration;
//! let params = LinkParams { delay: Duration::from_millis(25), ..LinkParams::default() };
//! let cfg = RelayConfig::symmetric("127.0.0.1:0".parse().unwrap(), "127.0.0.1:4433".parse().unwrap(), params);
//! let relay = Relay::start(cfg).await?; // clients now talk to relay.local_addr()
//! relay.shutdown().await;
//! # Ok(()) }
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest datagram the relay will carry.
pub const MAX_DATAGRAM: usize = 65535;
/// Client sessions idle for longer than this are reaped.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default drop-tail queue limit per direction (4 MiB).
pub const DEFAULT_QUEUE_BYTES: usize = 4 << 20;
const REAP_INTERVAL: Duration = Duration::from_secs(5);

/// Impairments applied to one direction of the emulated link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay (RTT = delay of both directions).
    pub delay: Duration,
    /// Extra uniform random delay in `[0, jitter]` per packet (may reorder).
    pub jitter: Duration,
    /// Drop probability, `0.0..=1.0` (1.0 cuts the link).
    pub loss: f64,
    /// Bottleneck rate in bits per second; `None` means unlimited.
    pub rate_bps: Option<u64>,
    /// Drop-tail limit on bytes queued (not yet released) in this direction.
    pub queue_bytes: usize,
}

impl Default for LinkParams {
    /// A perfect link: no delay, no loss, unlimited rate, 4 MiB queue.
    fn default() -> Self {
        LinkParams {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }
}

impl LinkParams {
    /// Checks that `loss` is within `0.0..=1.0` and `rate_bps` is not zero.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(format!("loss must be within 0.0..=1.0, got {}", self.loss));
        }
        if self.rate_bps == Some(0) {
            return Err("rate must be greater than zero (use None for unlimited)".into());
        }
        Ok(())
    }

    /// Clamps out-of-range values instead of rejecting them (used by `set_params`).
    fn sanitized(mut self) -> Self {
        if let Err(e) = self.validate() {
            tracing::warn!(error = %e, "sanitising invalid link parameters");
        }
        self.loss = if self.loss.is_nan() {
            0.0
        } else {
            self.loss.clamp(0.0, 1.0)
        };
        if self.rate_bps == Some(0) {
            self.rate_bps = None;
        }
        self
    }

    /// True when packets can be forwarded at once without touching a timer.
    fn is_passthrough(&self) -> bool {
        self.delay.is_zero() && self.jitter.is_zero() && self.rate_bps.is_none()
    }
}

/// Configuration of a [`Relay`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Address clients send to (port 0 picks an ephemeral port).
    pub listen: SocketAddr,
    /// The real server the relay forwards to.
    pub upstream: SocketAddr,
    /// Impairments for client → upstream packets.
    pub to_upstream: LinkParams,
    /// Impairments for upstream → client packets.
    pub to_client: LinkParams,
    /// Seed for the loss/jitter RNG; `None` seeds from OS entropy.
    pub seed: Option<u64>,
}

impl RelayConfig {
    /// Same parameters in both directions. `params.delay` is one-way, so the
    /// round-trip time added by the relay is `2 * delay`.
    pub fn symmetric(listen: SocketAddr, upstream: SocketAddr, params: LinkParams) -> Self {
        RelayConfig {
            listen,
            upstream,
            to_upstream: params.clone(),
            to_client: params,
            seed: None,
        }
    }
}

/// Errors returned by [`Relay::start`].
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A [`LinkParams`] value is out of range.
    #[error("invalid link parameters: {0}")]
    InvalidParams(String),
    /// The listen socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address that failed to bind.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Other socket error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Snapshot of the relay counters ("forwarded" means `send_to` succeeded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RelayStats {
    /// Datagrams forwarded to upstream.
    pub packets_to_upstream: u64,
    /// Payload bytes forwarded to upstream.
    pub bytes_to_upstream: u64,
    /// Datagrams forwarded back to clients.
    pub packets_to_client: u64,
    /// Payload bytes forwarded back to clients.
    pub bytes_to_client: u64,
    /// Datagrams dropped by the random-loss model (both directions).
    pub dropped_loss: u64,
    /// Datagrams dropped because the queue was full (both directions).
    pub dropped_queue: u64,
    /// Datagrams whose `send_to` failed (both directions).
    pub send_errors: u64,
    /// Client sessions currently alive.
    pub sessions: u64,
}

/// Live counters; indices into the array below.
const PKTS_UP: usize = 0;
const BYTES_UP: usize = 1;
const PKTS_DOWN: usize = 2;
const BYTES_DOWN: usize = 3;
const DROP_LOSS: usize = 4;
const DROP_QUEUE: usize = 5;
const SEND_ERR: usize = 6;
type Counters = [AtomicU64; 7];

fn bump(c: &Counters, i: usize, n: u64) {
    c[i].fetch_add(n, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A datagram waiting on a link: socket to send it from, destination, payload.
type Packet = (Arc<UdpSocket>, SocketAddr, Vec<u8>);

/// One direction of the emulated link: the scheduling model plus its queue.
struct Link {
    /// Counter indices (packets, bytes) for this direction, for logs too.
    idx: (usize, usize),
    counters: Arc<Counters>,
    state: Mutex<LinkState>,
    wake: Notify,
}

struct LinkState {
    params: LinkParams,
    rng: StdRng,
    /// When the (rate-limited) link finishes serialising what it accepted.
    link_free_at: Instant,
    queued_bytes: usize,
    seq: u64,
    /// Min-heap of (release time, sequence number) into `packets`.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    packets: HashMap<u64, Packet>,
}

/// Time needed to put `len` bytes on a wire of `rate` bits/s.
fn serialization(len: usize, rate: u64) -> Duration {
    let nanos = (len as u128 * 8 * 1_000_000_000) / rate.max(1) as u128;
    Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
}

impl Link {
    /// Creates the client → upstream (`up`) or upstream → client link.
    fn new(up: bool, counters: &Arc<Counters>, params: &LinkParams, seed: Option<u64>) -> Self {
        let salt = if up { 0 } else { 0x9E37_79B9_7F4A_7C15 };
        let rng = seed.map_or_else(StdRng::from_entropy, |s| StdRng::seed_from_u64(s ^ salt));
        let idx = if up {
            (PKTS_UP, BYTES_UP)
        } else {
            (PKTS_DOWN, BYTES_DOWN)
        };
        let state = LinkState {
            params: params.clone(),
            rng,
            link_free_at: Instant::now(),
            queued_bytes: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            packets: HashMap::new(),
        };
        Link {
            idx,
            counters: Arc::clone(counters),
            state: Mutex::new(state),
            wake: Notify::new(),
        }
    }

    /// Sends `data` from `sock` to `to` over this emulated link, now or later.
    async fn forward(&self, data: &[u8], sock: &Arc<UdpSocket>, to: SocketAddr) {
        if self.enqueue(data, sock, to) {
            self.send(sock, data, to).await;
        }
    }

    /// Applies loss, the queue limit and scheduling. Returns true when the
    /// caller should send at once (perfect link with nothing queued).
    fn enqueue(&self, data: &[u8], sock: &Arc<UdpSocket>, to: SocketAddr) -> bool {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let p = &st.params;
        if p.loss > 0.0 && (p.loss >= 1.0 || st.rng.gen_bool(p.loss)) {
            bump(&self.counters, DROP_LOSS, 1);
            return false;
        }
        // Only bypass the heap when it is empty, so packets are not reordered
        // right after the parameters were switched to a perfect link.
        if p.is_passthrough() && st.heap.is_empty() {
            return true;
        }
        let len = data.len();
        if st.queued_bytes.saturating_add(len) > p.queue_bytes {
            bump(&self.counters, DROP_QUEUE, 1);
            return false;
        }
        let now = Instant::now();
        let mut release = now;
        if let Some(rate) = p.rate_bps {
            st.link_free_at = st.link_free_at.max(now) + serialization(len, rate);
            release = st.link_free_at;
        }
        release += p.delay;
        if !p.jitter.is_zero() {
            let max = p.jitter.as_nanos().min(u64::MAX as u128) as u64;
            release += Duration::from_nanos(st.rng.gen_range(0..=max));
        }
        st.seq += 1;
        st.queued_bytes += len;
        st.heap.push(Reverse((release, st.seq)));
        st.packets
            .insert(st.seq, (Arc::clone(sock), to, data.to_vec()));
        drop(guard);
        self.wake.notify_one();
        false
    }

    /// Sends one datagram and counts it; errors are logged, never fatal.
    async fn send(&self, sock: &UdpSocket, data: &[u8], to: SocketAddr) {
        match sock.send_to(data, to).await {
            Ok(_) => {
                bump(&self.counters, self.idx.0, 1);
                bump(&self.counters, self.idx.1, data.len() as u64);
            }
            Err(e) => {
                bump(&self.counters, SEND_ERR, 1);
                let up = self.idx.0 == PKTS_UP;
                tracing::warn!(%to, up, len = data.len(), error = %e, "wan relay: send failed");
            }
        }
    }

    /// Timer-driven sender task: releases queued packets when they are due.
    async fn run_sender(self: Arc<Self>) {
        let mut batch = Vec::new();
        loop {
            let next = {
                let mut st = lock(&self.state);
                let now = Instant::now();
                while let Some(&Reverse((release, seq))) = st.heap.peek() {
                    if release > now {
                        break;
                    }
                    st.heap.pop();
                    if let Some(pkt) = st.packets.remove(&seq) {
                        st.queued_bytes -= pkt.2.len();
                        batch.push(pkt);
                    }
                }
                st.heap.peek().map(|r| r.0 .0)
            };
            if !batch.is_empty() {
                for (sock, to, data) in batch.drain(..) {
                    self.send(&sock, &data, to).await;
                }
                continue; // time has passed while sending: look again
            }
            match next {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = self.wake.notified() => {}
                },
                None => self.wake.notified().await,
            }
        }
    }

    fn clear(&self) {
        let mut st = lock(&self.state);
        st.heap.clear();
        st.packets.clear();
        st.queued_bytes = 0;
    }
}

/// One client: its upstream-facing socket, last activity and reader task.
struct Session {
    sock: Arc<UdpSocket>,
    last_active: Arc<AtomicU64>,
    reader: AbortHandle,
}

/// State shared by all relay tasks.
struct Shared {
    upstream: SocketAddr,
    listen: Arc<UdpSocket>,
    to_upstream: Arc<Link>,
    to_client: Arc<Link>,
    counters: Arc<Counters>,
    sessions: Mutex<HashMap<SocketAddr, Arc<Session>>>,
    readers: Mutex<JoinSet<()>>,
    epoch: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a datagram from `from` is a reply from the upstream server.
    fn is_upstream(&self, from: SocketAddr) -> bool {
        let up = self.upstream;
        from == up || (up.ip().is_unspecified() && from.port() == up.port())
    }

    /// Finds or creates the session of `client`; `None` if no socket could be made.
    fn session_for(self: &Arc<Self>, client: SocketAddr) -> Option<Arc<Session>> {
        if let Some(s) = lock(&self.sessions).get(&client) {
            return Some(Arc::clone(s));
        }
        let bind_ip = match self.upstream.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let sock = std::net::UdpSocket::bind(SocketAddr::new(bind_ip, 0))
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .map(big_buffers)
            .and_then(UdpSocket::from_std);
        let sock = match sock {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(%client, error = %e, "wan relay: no upstream socket; dropping");
                return None;
            }
        };
        let last_active = Arc::new(AtomicU64::new(self.now_ms()));
        let task = run_session_reader(
            Arc::clone(self),
            client,
            Arc::clone(&sock),
            Arc::clone(&last_active),
        );
        let reader = lock(&self.readers).spawn(task);
        tracing::info!(%client, via = ?sock.local_addr().ok(), "wan relay: new client session");
        let session = Arc::new(Session {
            sock,
            last_active,
            reader,
        });
        lock(&self.sessions).insert(client, Arc::clone(&session));
        Some(session)
    }

    /// Drops sessions idle for longer than `idle`.
    fn reap(&self, idle: Duration) {
        let now = self.now_ms();
        lock(&self.sessions).retain(|client, s| {
            let keep = now.saturating_sub(s.last_active.load(Ordering::Relaxed))
                <= idle.as_millis() as u64;
            if !keep {
                s.reader.abort();
                tracing::info!(%client, "wan relay: reaped idle client session");
            }
            keep
        });
        let mut readers = lock(&self.readers);
        while readers.try_join_next().is_some() {}
    }
}

/// Receives one datagram; errors are logged (and briefly backed off), not fatal.
async fn recv(sock: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match sock.recv_from(buf).await {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::debug!(local = ?sock.local_addr().ok(), error = %e, "wan relay: recv failed");
            tokio::time::sleep(Duration::from_millis(1)).await;
            None
        }
    }
}

/// Receives from clients and feeds the client → upstream link.
async fn run_listener(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Some((n, from)) = recv(&shared.listen, &mut buf).await else {
            continue;
        };
        let Some(session) = shared.session_for(from) else {
            continue;
        };
        session
            .last_active
            .store(shared.now_ms(), Ordering::Relaxed);
        shared
            .to_upstream
            .forward(&buf[..n], &session.sock, shared.upstream)
            .await;
    }
}

/// Receives upstream replies for one client and feeds the upstream → client link.
async fn run_session_reader(
    shared: Arc<Shared>,
    client: SocketAddr,
    sock: Arc<UdpSocket>,
    last_active: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Some((n, from)) = recv(&sock, &mut buf).await else {
            continue;
        };
        if !shared.is_upstream(from) {
            tracing::debug!(%from, "wan relay: ignoring datagram not from upstream");
            continue;
        }
        last_active.store(shared.now_ms(), Ordering::Relaxed);
        shared
            .to_client
            .forward(&buf[..n], &shared.listen, client)
            .await;
    }
}

async fn run_reaper(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.reap(SESSION_IDLE_TIMEOUT);
    }
}

/// Socket buffers of 4 MiB each way (the kernel caps them at `net.core.[rw]mem_max`):
/// the post-copy bench saw 2-5k UDP receive-buffer drops per GiB through the relay with
/// the default ~208 KiB (which socket dropped was not established), which looks like
/// path loss to QUIC.
fn big_buffers(s: std::net::UdpSocket) -> std::net::UdpSocket {
    let sock = socket2::SockRef::from(&s);
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    s
}

/// A running WAN relay. Stop it with [`Relay::shutdown`]; dropping it also
/// aborts its tasks, but without waiting for them.
pub struct Relay {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Binds `cfg.listen`, spawns the relay tasks and returns at once.
    pub async fn start(cfg: RelayConfig) -> Result<Relay, RelayError> {
        for p in [&cfg.to_upstream, &cfg.to_client] {
            p.validate().map_err(RelayError::InvalidParams)?;
        }
        let addr = cfg.listen;
        let listen = std::net::UdpSocket::bind(addr)
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .map(big_buffers)
            .and_then(UdpSocket::from_std)
            .map_err(|source| RelayError::Bind { addr, source })?;
        let local_addr = listen.local_addr()?;
        let counters: Arc<Counters> = Arc::new(Default::default());
        let up = Link::new(true, &counters, &cfg.to_upstream, cfg.seed);
        let down = Link::new(false, &counters, &cfg.to_client, cfg.seed);
        let shared = Arc::new(Shared {
            upstream: cfg.upstream,
            listen: Arc::new(listen),
            to_upstream: Arc::new(up),
            to_client: Arc::new(down),
            counters,
            sessions: Mutex::new(HashMap::new()),
            readers: Mutex::new(JoinSet::new()),
            epoch: Instant::now(),
        });
        let tasks = vec![
            tokio::spawn(run_listener(Arc::clone(&shared))),
            tokio::spawn(Arc::clone(&shared.to_upstream).run_sender()),
            tokio::spawn(Arc::clone(&shared.to_client).run_sender()),
            tokio::spawn(run_reaper(Arc::clone(&shared))),
        ];
        tracing::info!(listen = %local_addr, upstream = %cfg.upstream, to_upstream = ?cfg.to_upstream,
            to_client = ?cfg.to_client, "wan relay started");
        Ok(Relay {
            local_addr,
            shared,
            tasks,
        })
    }

    /// The address clients should send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Current counters.
    pub fn stats(&self) -> RelayStats {
        let c = |i: usize| self.shared.counters[i].load(Ordering::Relaxed);
        RelayStats {
            packets_to_upstream: c(PKTS_UP),
            bytes_to_upstream: c(BYTES_UP),
            packets_to_client: c(PKTS_DOWN),
            bytes_to_client: c(BYTES_DOWN),
            dropped_loss: c(DROP_LOSS),
            dropped_queue: c(DROP_QUEUE),
            send_errors: c(SEND_ERR),
            sessions: lock(&self.shared.sessions).len() as u64,
        }
    }

    /// Current parameters `(to_upstream, to_client)`.
    pub fn params(&self) -> (LinkParams, LinkParams) {
        let get = |l: &Link| lock(&l.state).params.clone();
        (get(&self.shared.to_upstream), get(&self.shared.to_client))
    }

    /// Changes the link parameters live. They apply to packets arriving from
    /// now on; packets already queued keep their release time. Out-of-range
    /// values are clamped (loss into `0..=1`, a zero rate means unlimited).
    pub fn set_params(&self, to_upstream: LinkParams, to_client: LinkParams) {
        tracing::info!(?to_upstream, ?to_client, "wan relay: new link parameters");
        lock(&self.shared.to_upstream.state).params = to_upstream.sanitized();
        lock(&self.shared.to_client.state).params = to_client.sanitized();
    }

    /// Stops all tasks, discards queued packets and closes every socket.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        tasks.iter().for_each(JoinHandle::abort);
        for t in tasks {
            let _ = t.await;
        }
        let mut readers = std::mem::take(&mut *lock(&self.shared.readers));
        readers.shutdown().await;
        lock(&self.shared.sessions).clear();
        self.shared.to_upstream.clear();
        self.shared.to_client.clear();
        tracing::info!(listen = %self.local_addr, stats = ?self.stats(), "wan relay stopped");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
        // Dropping the JoinSet aborts the per-client readers, which hold
        // references to `shared`; this breaks the reference cycle.
        drop(std::mem::take(&mut *lock(&self.shared.readers)));
        lock(&self.shared.sessions).clear();
        self.shared.to_upstream.clear();
        self.shared.to_client.clear();
    }
}

/// Splits `"12.5ms"` into `(12.5, "ms")`.
fn split_number(s: &str) -> Result<(f64, &str), String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid number in {s:?}"))?;
    if !value.is_finite() {
        return Err(format!("invalid number in {s:?}"));
    }
    Ok((value, unit.trim()))
}

/// Parses a duration such as `"25ms"`, `"1s"`, `"1.5s"`, `"500us"`, `"100ns"`,
/// `"2min"` or `"0"`. A unit is required unless the value is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (value, unit) = split_number(s)?;
    let scale = match unit {
        "" if value == 0.0 => 0.0,
        "" => return Err(format!("duration {s:?} needs a unit (ns, us, ms, s, min)")),
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown duration unit {unit:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a rate into bits per second. Bits: `"1000000"`, `"10kbit"`,
/// `"100mbit"`, `"1gbit"`, `"100Mbps"`, `"5Mb/s"`. Bytes (×8) use a capital
/// `B`: `"50MBps"`, `"50MB/s"`. SI prefixes k/m/g/t are powers of 1000,
/// `Ki/Mi/Gi/Ti` powers of 1024. Unlike tc, lower-case `bps` means bits.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (value, unit) = split_number(s)?;
    let lower = unit.to_ascii_lowercase();
    let (mult, rest) = split_prefix(&lower, unit);
    let per_unit = match rest {
        "" | "bit" | "bits" | "bps" | "b/s" | "bit/s" => 1.0,
        "Bps" | "B/s" | "B" => 8.0,
        _ => {
            return Err(format!(
                "unknown rate unit {unit:?} in {s:?} (try mbit, gbit, MBps)"
            ))
        }
    };
    let bps = (value * mult * per_unit).round();
    if bps < 1.0 || bps >= u64::MAX as f64 {
        return Err(format!("rate {s:?} is out of range"));
    }
    Ok(bps as u64)
}

/// Parses a byte count: `"4194304"`, `"4MiB"`, `"64KiB"`, `"1MB"`, `"512k"`.
/// `k/M/G` (with or without `B`) are powers of 1000, `Ki/Mi/Gi` powers of 1024.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let (value, unit) = split_number(s)?;
    let lower = unit.to_ascii_lowercase();
    let (mult, rest) = split_prefix(&lower, unit);
    if !matches!(
        rest.to_ascii_lowercase().as_str(),
        "" | "b" | "byte" | "bytes"
    ) {
        return Err(format!(
            "unknown size unit {unit:?} in {s:?} (try KiB, MiB)"
        ));
    }
    let n = (value * mult).round();
    if n < 0.0 || n >= usize::MAX as f64 {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(n as usize)
}

/// Strips an SI (`k`, `m`, `g`, `t`) or IEC (`ki`, `mi`, ...) prefix from
/// `unit` (matched case-insensitively via `lower`); returns the multiplier and
/// the rest of the original-case unit.
fn split_prefix<'a>(lower: &str, unit: &'a str) -> (f64, &'a str) {
    for (i, p) in ["k", "m", "g", "t"].iter().enumerate() {
        let exp = i as i32 + 1;
        if lower.starts_with(&format!("{p}i")) {
            return (1024f64.powi(exp), &unit[2..]);
        }
        if lower.starts_with(p) {
            return (1000f64.powi(exp), &unit[1..]);
        }
    }
    (1.0, unit)
}
