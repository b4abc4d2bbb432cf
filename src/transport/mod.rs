//! QUIC transport: mutual TLS with a private CA, identities, tuning, the endpoint.

mod tls;

pub use tls::{client_config, peer_name, server_config, Identity, IdentityError};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Transport knobs. Defaults suit loopback and LAN; raise the windows for long fat links
/// (they should be at least bandwidth × RTT).
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Keep-alive ping interval, so idle peer connections stay up through NATs and
    /// dead peers are noticed.
    pub keep_alive: Duration,
    /// A connection with no traffic (not even keep-alives) for this long is dead.
    pub idle_timeout: Duration,
    /// Per-stream receive window.
    pub stream_window: u64,
    /// Per-connection receive window.
    pub conn_window: u64,
    /// Bytes quinn may buffer for sending, all streams together.
    pub send_window: u64,
    /// UDP socket send and receive buffer size.
    pub socket_buffer: usize,
    /// Most concurrent bidirectional streams a peer may open.
    pub max_streams: u32,
    /// Largest UDP payload path-MTU discovery probes for (quinn's default, 1452).
    /// Measured on loopback (MTU 65536): letting it grow to 65507 did not make faults or
    /// pulls faster (fault p50 0.5-0.66 ms either way, pull ~460 MB/s either way) and one
    /// first touch took 128 ms, so the default stays.
    pub mtu_upper_bound: u16,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            stream_window: 16 << 20,
            conn_window: 64 << 20,
            send_window: 64 << 20,
            socket_buffer: 4 << 20,
            max_streams: 1024,
            mtu_upper_bound: 1452,
        }
    }
}

impl Tuning {
    /// The quinn transport configuration for these knobs.
    pub fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        // Idle timeouts above 2^62 ms cannot be expressed; ours are seconds.
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.idle_timeout) {
            t.max_idle_timeout(Some(idle));
        }
        t.stream_receive_window(varint(self.stream_window));
        t.receive_window(varint(self.conn_window));
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(self.max_streams.into());
        // Agents never use unidirectional streams.
        t.max_concurrent_uni_streams(0u32.into());
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.mtu_upper_bound.max(1200));
        t.mtu_discovery_config(Some(mtu));
        t
    }
}

fn varint(v: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(v.min((1 << 62) - 1)).unwrap_or(quinn::VarInt::MAX)
}

/// Binding the endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP socket could not be created or bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// TLS configuration failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A QUIC endpoint bound to `listen` that both accepts (as server) and dials (as client),
/// with mutual TLS for `id`.
pub fn endpoint(
    listen: SocketAddr,
    id: &Identity,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, EndpointError> {
    let bind = |e| EndpointError::Bind {
        addr: listen,
        source: e,
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind)?;
    // Larger buffers mean fewer drops at high rates; the kernel clamps to its limits,
    // which is fine.
    let _ = sock.set_recv_buffer_size(tuning.socket_buffer);
    let _ = sock.set_send_buffer_size(tuning.socket_buffer);
    if listen.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.bind(&listen.into()).map_err(bind)?;
    let transport = Arc::new(tuning.transport_config());
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_config(id)?));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(client_config(id)?));
    client.transport_config(transport);
    let mut ep_config = quinn::EndpointConfig::default();
    // Advertise (and accept) UDP payloads up to what MTU discovery may find.
    let _ = ep_config.max_udp_payload_size(tuning.mtu_upper_bound.max(1200));
    let mut ep = quinn::Endpoint::new(
        ep_config,
        Some(server),
        sock.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)?;
    ep.set_default_client_config(client);
    Ok(ep)
}
