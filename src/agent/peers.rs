//! Peer connections: one QUIC connection per pair of agents.
//!
//! Both sides dial a listed peer whenever they have no live connection to it (the
//! lexicographically larger name waits a moment first, so usually only one dial happens),
//! re-dialing with exponential backoff. When two live connections to the same peer exist,
//! both sides keep the same one by one rule ([`PeerTable::register`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{reason, resolve, Inner, PeerSpec};
use crate::proto::codec::{read_frame, write_frame};
use crate::proto::{Hello, Reply, Request, WireCode, PROTOCOL_VERSION};
use crate::transport;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_CAP: usize = 4096;

#[derive(Clone)]
struct Link {
    conn: quinn::Connection,
    dialer: String,
    peer_boot: u64,
    /// UDP datagrams received on `conn` when last sampled, and when that count last grew
    /// ([`PeerTable::sample_heard`]).
    heard: (u64, Instant),
}

/// How often a connection's received datagrams are sampled, to tell how long the peer
/// has been silent (a peer that vanished shows as connected until the idle timeout).
const HEARD_SAMPLE: Duration = Duration::from_millis(250);

struct SlotState {
    link: Option<Link>,
    since: Option<Instant>,
    last_error: Option<String>,
    /// Boot ids whose live connection a connection from another boot id replaced (the
    /// peer restarted, as far as we knew). One of them connecting again means two
    /// running agents use the peer's name: it is refused, not let take the slot back.
    replaced: Vec<u64>,
}

/// How many replaced boot ids a slot remembers.
const REPLACED_KEPT: usize = 8;

struct Slot {
    state: Mutex<SlotState>,
    tx: watch::Sender<Option<quinn::Connection>>,
}

/// What `status` shows of a peer.
pub(crate) struct Snapshot {
    pub conn: Option<quinn::Connection>,
    pub since: Option<Instant>,
    pub last_error: Option<String>,
    /// How long nothing was received on the live connection.
    pub silent: Option<Duration>,
}

/// Every expected peer and its current connection.
pub(crate) struct PeerTable {
    slots: HashMap<String, Slot>,
}

fn alive(c: &quinn::Connection) -> bool {
    c.close_reason().is_none()
}

impl PeerTable {
    pub fn new(specs: &[PeerSpec]) -> PeerTable {
        PeerTable {
            slots: specs
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        Slot {
                            state: Mutex::new(SlotState {
                                link: None,
                                since: None,
                                last_error: None,
                                replaced: Vec::new(),
                            }),
                            tx: watch::channel(None).0,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn is_expected(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    fn lock(&self, name: &str) -> Option<std::sync::MutexGuard<'_, SlotState>> {
        // A poisoned lock only means a panic elsewhere; the state is still consistent
        // (every update is a single assignment), so keep using it.
        self.slots
            .get(name)
            .map(|s| s.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The live connection to `name`, if any.
    pub fn current(&self, name: &str) -> Option<quinn::Connection> {
        let st = self.lock(name)?;
        st.link.as_ref().map(|l| l.conn.clone()).filter(alive)
    }

    /// The boot id of `name`'s live connection (it changes when that agent restarts).
    pub fn boot(&self, name: &str) -> Option<u64> {
        let st = self.lock(name)?;
        st.link
            .as_ref()
            .filter(|l| alive(&l.conn))
            .map(|l| l.peer_boot)
    }

    /// Waits for a live connection to `name`; `None` on shutdown or for an unknown peer.
    pub async fn wait(
        &self,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Option<quinn::Connection> {
        let mut rx = self.slots.get(name)?.tx.subscribe();
        loop {
            if let Some(c) = rx.borrow_and_update().clone().filter(alive) {
                return Some(c);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = rx.changed() => r.ok()?,
                // A connection can die without the slot changing yet; re-check now and then.
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Offers a new connection to `name`, dialed by `dialer`. Returns whether it was kept.
    ///
    /// The rule, applied identically on both sides:
    /// 1. no live connection: keep the new one;
    /// 2. the peer restarted (new boot id): the old connection is dead, keep the new one;
    /// 3. both dialed by the same side: keep the new one (the dialer gave up on the old);
    /// 4. a simultaneous dial from both sides: keep the one dialed by the smaller name.
    ///
    /// A connection from a boot id that rule 2 replaced is refused: that agent did not
    /// restart, so a second agent runs under the same name (they would otherwise take
    /// the connection from each other in turn).
    pub fn register(
        &self,
        me: &str,
        name: &str,
        conn: quinn::Connection,
        dialer: &str,
        peer_boot: u64,
    ) -> bool {
        let Some(slot) = self.slots.get(name) else {
            return false;
        };
        let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let new = Link {
            conn,
            dialer: dialer.into(),
            peer_boot,
            heard: (0, Instant::now()),
        };
        if st.replaced.contains(&peer_boot) {
            let why = format!(
                "two running agents use the name {name}: this one (from {}) lost its connection to another that connected since; give each agent its own name and certificate",
                new.conn.remote_address()
            );
            if st.last_error.as_deref() == Some(why.as_str()) {
                tracing::debug!(peer = %name, "{why}");
            } else {
                tracing::warn!(peer = %name, "refused: {why}");
            }
            new.conn.close(WireCode::Duplicate.varint(), why.as_bytes());
            st.last_error = Some(why);
            return false;
        }
        let live = st.link.as_ref().filter(|l| alive(&l.conn));
        let keep_new = match live {
            None => true,
            Some(old) if old.peer_boot != peer_boot => true,
            Some(old) if old.dialer == new.dialer => true,
            Some(_) => new.dialer == me.min(name),
        };
        if keep_new {
            if let Some(old) = st.link.take() {
                if alive(&old.conn) && old.conn.stable_id() != new.conn.stable_id() {
                    let why: &[u8] = if old.peer_boot != peer_boot {
                        if st.replaced.len() == REPLACED_KEPT {
                            st.replaced.remove(0);
                        }
                        st.replaced.push(old.peer_boot);
                        b"replaced by a connection from a newer start of this agent (if this one is still running, two agents use its name)"
                    } else {
                        b"replaced by a newer connection"
                    };
                    old.conn.close(WireCode::Duplicate.varint(), why);
                }
            }
            slot.tx.send_replace(Some(new.conn.clone()));
            st.link = Some(new);
            st.since = Some(Instant::now());
            st.last_error = None;
        } else {
            new.conn
                .close(WireCode::Duplicate.varint(), b"a connection already exists");
        }
        keep_new
    }

    /// The connection with `stable_id` to `name` ended.
    pub fn disconnected(&self, name: &str, stable_id: usize, why: String) {
        let Some(slot) = self.slots.get(name) else {
            return;
        };
        let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.link.as_ref().map(|l| l.conn.stable_id()) == Some(stable_id) {
            st.link = None;
            st.since = None;
            st.last_error = Some(why);
            slot.tx.send_replace(None);
        }
    }

    pub fn set_error(&self, name: &str, why: String) {
        if let Some(mut st) = self.lock(name) {
            st.last_error = Some(why);
        }
    }

    pub fn snapshot(&self, name: &str) -> Snapshot {
        match self.lock(name) {
            None => Snapshot {
                conn: None,
                since: None,
                last_error: None,
                silent: None,
            },
            Some(st) => {
                let live = st.link.as_ref().filter(|l| alive(&l.conn));
                Snapshot {
                    conn: live.map(|l| l.conn.clone()),
                    since: st.since,
                    last_error: st.last_error.clone(),
                    silent: live.map(|l| l.heard.1.elapsed()),
                }
            }
        }
    }

    /// Notes whether `conn`, if it is `name`'s current connection, received anything
    /// since the last sample.
    fn sample_heard(&self, name: &str, conn: &quinn::Connection) {
        let Some(mut st) = self.lock(name) else {
            return;
        };
        if let Some(l) = st
            .link
            .as_mut()
            .filter(|l| l.conn.stable_id() == conn.stable_id())
        {
            let n = conn.stats().udp_rx.datagrams;
            if n != l.heard.0 {
                l.heard = (n, Instant::now());
            }
        }
    }
}

fn our_hello(inner: &Inner) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        name: inner.name.clone(),
        software: crate::VERSION.into(),
        boot: inner.boot,
    }
}

/// Why setting up a connection failed.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{0}")]
    Connection(String),
    #[error("peer said hello as {got:?}, expected {want:?}")]
    WrongName { got: String, want: String },
    #[error("peer speaks protocol version {got}, this agent speaks {want}")]
    Version { got: u32, want: u32 },
    #[error("peer did not say hello in time")]
    Timeout,
    #[error("bad hello: {0}")]
    Protocol(String),
}

impl From<quinn::ConnectionError> for LinkError {
    fn from(e: quinn::ConnectionError) -> Self {
        LinkError::Connection(reason(&e))
    }
}

/// Dials `spec` until shutdown, keeping one live connection.
pub(crate) async fn dial_loop(inner: Arc<Inner>, spec: PeerSpec) {
    let (min, max) = (inner.config.reconnect_min, inner.config.reconnect_max);
    if inner.name > spec.name {
        // Let the smaller-named side dial first; we dial only if it does not.
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
    let mut backoff = min;
    let mut last_logged: Option<String> = None;
    // Set when the peer closed our connection saying it was shutting down: it is expected
    // to be unreachable for a while, so that is not worth a warning.
    let mut peer_left = false;
    loop {
        if let Some(conn) = inner.peers.current(&spec.name) {
            let why = tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                e = conn.closed() => e,
            };
            peer_left = matches!(&why, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == WireCode::Shutdown.varint());
            backoff = min;
            continue;
        }
        if inner.shutdown.is_cancelled() {
            return;
        }
        match dial(&inner, &spec).await {
            Ok((conn, boot)) => {
                last_logged = None;
                peer_left = false;
                backoff = min;
                if inner
                    .peers
                    .register(&inner.name, &spec.name, conn.clone(), &inner.name, boot)
                {
                    tracing::info!(peer = %spec.name, addr = %conn.remote_address(), "connected to peer");
                    inner
                        .tasks
                        .spawn(serve_connection(inner.clone(), spec.name.clone(), conn));
                }
            }
            Err(_) if inner.shutdown.is_cancelled() => return,
            Err(e) => {
                let msg = e.to_string();
                if last_logged.as_deref() != Some(&msg) {
                    if peer_left {
                        tracing::info!(peer = %spec.name, addr = %spec.addr, "peer shut down; will reconnect when it is back ({msg})");
                    } else {
                        tracing::warn!(peer = %spec.name, addr = %spec.addr, "cannot connect: {msg} (retrying with backoff)");
                    }
                    last_logged = Some(msg.clone());
                } else {
                    tracing::debug!(peer = %spec.name, "still cannot connect: {msg}");
                }
                if !peer_left {
                    inner.peers.set_error(&spec.name, msg);
                }
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

async fn dial(inner: &Inner, spec: &PeerSpec) -> Result<(quinn::Connection, u64), LinkError> {
    let addr: SocketAddr = resolve(&spec.addr)
        .await
        .map_err(|e| LinkError::Resolve(format!("{}: {e}", spec.addr)))?;
    let connecting = inner.endpoint.connect(addr, &spec.name)?;
    let conn = tokio::time::timeout(HELLO_TIMEOUT, connecting)
        .await
        .map_err(|_| LinkError::Timeout)??;
    match tokio::time::timeout(HELLO_TIMEOUT, dial_hello(inner, &conn, &spec.name)).await {
        Ok(Ok(boot)) => Ok((conn, boot)),
        Ok(Err(e)) => {
            let code = match e {
                LinkError::Version { .. } => WireCode::VersionMismatch,
                _ => WireCode::ProtocolViolation,
            };
            conn.close(code.varint(), e.to_string().as_bytes());
            Err(e)
        }
        Err(_) => {
            conn.close(WireCode::Timeout.varint(), b"no hello");
            Err(LinkError::Timeout)
        }
    }
}

async fn dial_hello(inner: &Inner, conn: &quinn::Connection, peer: &str) -> Result<u64, LinkError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Request::Hello(our_hello(inner)))
        .await
        .map_err(|e| LinkError::Connection(e.to_string()))?;
    let _ = send.finish();
    let reply: Option<Reply> = read_frame(&mut recv, HELLO_CAP).await.map_err(|e| {
        // The acceptor closes the connection when it refuses us; prefer its reason.
        match conn.close_reason() {
            Some(r) => LinkError::Connection(reason(&r)),
            None => LinkError::Protocol(e.to_string()),
        }
    })?;
    let Some(Reply::Hello(h)) = reply else {
        return Err(LinkError::Protocol(format!(
            "expected hello, got {reply:?}"
        )));
    };
    check_hello(&h, peer)?;
    Ok(h.boot)
}

fn check_hello(h: &Hello, cert_name: &str) -> Result<(), LinkError> {
    if h.version != PROTOCOL_VERSION {
        return Err(LinkError::Version {
            got: h.version,
            want: PROTOCOL_VERSION,
        });
    }
    if h.name != cert_name {
        return Err(LinkError::WrongName {
            got: h.name.clone(),
            want: cert_name.into(),
        });
    }
    Ok(())
}

/// Accepts connections until shutdown.
pub(crate) async fn accept_loop(inner: Arc<Inner>) {
    loop {
        let incoming = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            i = inner.endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        inner.tasks.spawn(accept_one(inner.clone(), incoming));
    }
}

async fn accept_one(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let why = reason(&e);
            let hint = if why.contains("certificate") {
                " (is the peer's certificate signed by this agent's CA?)"
            } else {
                ""
            };
            tracing::warn!(%remote, "refused connection: {why}{hint}");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, "refused connection: handshake timed out");
            return;
        }
    };
    let Some(name) = transport::peer_name(&conn) else {
        tracing::warn!(%remote, "refused connection: certificate has no node name");
        conn.close(
            WireCode::UnknownPeer.varint(),
            b"certificate has no node name",
        );
        return;
    };
    if !inner.peers.is_expected(&name) {
        tracing::warn!(%remote, peer = %name, "refused peer {name:?}: not an expected peer (start this agent with --peer {name}=HOST:PORT to allow it)");
        conn.close(WireCode::UnknownPeer.varint(), b"not an expected peer");
        return;
    }
    let hello = tokio::time::timeout(HELLO_TIMEOUT, accept_hello(&inner, &conn, &name)).await;
    let boot = match hello {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let code = match e {
                LinkError::Version { .. } => WireCode::VersionMismatch,
                _ => WireCode::ProtocolViolation,
            };
            tracing::warn!(%remote, peer = %name, "refused peer: {e} ({})", code.name());
            conn.close(code.varint(), e.to_string().as_bytes());
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, peer = %name, "refused peer: no hello within {HELLO_TIMEOUT:?}");
            conn.close(WireCode::Timeout.varint(), b"no hello");
            return;
        }
    };
    if inner
        .peers
        .register(&inner.name, &name, conn.clone(), &name, boot)
    {
        tracing::info!(peer = %name, %remote, "peer connected");
        inner
            .tasks
            .spawn(serve_connection(inner.clone(), name, conn));
    }
}

async fn accept_hello(
    inner: &Inner,
    conn: &quinn::Connection,
    name: &str,
) -> Result<u64, LinkError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let req: Option<Request> = read_frame(&mut recv, HELLO_CAP)
        .await
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    let Some(Request::Hello(h)) = req else {
        return Err(LinkError::Protocol("first stream is not a hello".into()));
    };
    check_hello(&h, name)?;
    write_frame(&mut send, &Reply::Hello(our_hello(inner)))
        .await
        .map_err(|e| LinkError::Connection(e.to_string()))?;
    let _ = send.finish();
    Ok(h.boot)
}

/// Sends `req` on a new stream of `conn` and reads the one reply, within `limit`.
pub(crate) async fn ask(
    conn: &quinn::Connection,
    req: &Request,
    limit: Duration,
) -> Result<Reply, String> {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, req)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        match read_frame::<_, Reply>(&mut recv, ASK_REPLY_CAP).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err("the stream ended without an answer".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(limit, ask)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

/// Cap on the reply to [`ask`] (an error reply at most).
const ASK_REPLY_CAP: usize = 4096;

/// Serves a peer's requests on `conn` until it closes.
async fn serve_connection(inner: Arc<Inner>, peer: String, conn: quinn::Connection) {
    inner.tasks.spawn(super::migrate::announce_owned(
        inner.clone(),
        peer.clone(),
        conn.clone(),
    ));
    inner.tasks.spawn(super::replicate::tell_untold(
        inner.clone(),
        peer.clone(),
        conn.clone(),
    ));
    inner.tasks.spawn({
        let (inner, peer, conn) = (inner.clone(), peer.clone(), conn.clone());
        async move {
            loop {
                tokio::select! {
                    _ = conn.closed() => return,
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(HEARD_SAMPLE) => inner.peers.sample_heard(&peer, &conn),
                }
            }
        }
    });
    let why = loop {
        let stream = tokio::select! {
            _ = inner.shutdown.cancelled() => break "agent shutting down".to_string(),
            s = conn.accept_bi() => s,
        };
        match stream {
            Ok((send, recv)) => {
                inner.tasks.spawn(super::serve::handle_stream(
                    inner.clone(),
                    peer.clone(),
                    send,
                    recv,
                ));
            }
            Err(e) => break reason(&e),
        }
    };
    tracing::info!(peer = %peer, "peer connection ended: {why}");
    inner.peers.disconnected(&peer, conn.stable_id(), why);
}
