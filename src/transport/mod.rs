//! QUIC transport: mutual TLS with a private CA, identities, tuning, the endpoint.

mod tls;

pub use tls::{client_config, peer_name, server_config, Identity, IdentityError};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Transport knobs. Defaults suit loopback, LAN and links up to about 1 Gbit/s × 50 ms;
/// for longer fat links call [`Tuning::size_for_link`] (agents: `--link-bandwidth` and
/// `--link-rtt`), which raises the windows to twice the bandwidth-delay product.
///
/// Pacing needs no knob: quinn always paces its sends over the RTT (about 1.25 × cwnd per
/// RTT), so a burst of bulk data never enters the path at once; what keeps urgent fetches
/// ahead of bulk data is the pull's bounded credit window (`bulk_window`), which limits
/// how much bulk data can sit in queues at all.
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
    /// The congestion controller (sender side). See [`DEFAULT_CONGESTION`] for why the
    /// default is what it is.
    pub congestion: Congestion,
    /// RTT assumed before the first sample (quinn's default is 333 ms);
    /// [`Tuning::size_for_link`] sets it to the configured link RTT.
    pub initial_rtt: Option<Duration>,
    /// Initial congestion window, bytes (`None`: quinn's, about 14.7 KB). A control
    /// exchange on an otherwise idle connection never grows the window (its sends are
    /// application-limited), so on a long link every burst after a quiet spell (a
    /// migration's final sync and handover) takes ceil(burst / window) round trips:
    /// measured at 200 ms RTT, 128 KiB + the handover took 2.5 RTT to arrive instead of
    /// 0.5. Defaults to [`DEFAULT_INITIAL_WINDOW`]; [`Tuning::size_for_link`] raises it
    /// to half a BDP.
    pub initial_window: Option<u64>,
}

/// Congestion controller choice (quinn's `congestion::*ConfigFactory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    Cubic,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// BBR (v1; quinn marks it experimental).
    Bbr,
}

/// The default congestion controller: CUBIC.
///
/// Chosen by measurement (`cargo bench --bench wan`, README "WAN tuning"; one run on
/// 2026-11-25, raw quinn streams through the WAN relay at 50 ms RTT, goodput × link rate):
///
/// | link, loss          | cubic | newreno | bbr  |
/// |---------------------|-------|---------|------|
/// | 200 Mbit/s, 0       | 0.94  | 0.93    | 0.95 (172k relay queue drops) |
/// | 200 Mbit/s, 0.1%    | 0.09  | 0.06    | 0.92 |
/// | 400 Mbit/s, 0       | 0.89  | 0.87    | 0.84 (77k queue drops) |
/// | 400 Mbit/s, 1%      | 0.01  | 0.01    | 0.73 |
///
/// Urgent 64 KiB fetch during a pull (200 Mbit/s, 50 ms): p99 104 ms with cubic, 79 ms
/// with newreno, 198 ms with bbr. Without random loss the three fill the link alike; cubic
/// does 1.4x newreno under random loss; bbr (v1, experimental in quinn) alone survives
/// random loss but ignores loss, overflows the bottleneck queue (as many drops as
/// deliveries) and delays urgent fetches behind it, so it is opt-in
/// (`--congestion bbr`, for dedicated lossy links).
pub const DEFAULT_CONGESTION: Congestion = Congestion::Cubic;

impl Congestion {
    /// Every controller, in the order benches report them.
    pub const ALL: [Congestion; 3] = [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr];

    /// `cubic`, `newreno` (or `new_reno`, `new-reno`, `reno`) or `bbr`, any case.
    pub fn parse(s: &str) -> Result<Congestion, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new_reno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!(
                "unknown congestion controller {s:?} (cubic, newreno or bbr)"
            )),
        }
    }

    /// The name [`Congestion::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
        }
    }

    fn factory(
        self,
        initial_window: Option<u64>,
    ) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match (self, initial_window) {
            (Congestion::Cubic, None) => Arc::new(CubicConfig::default()),
            (Congestion::Cubic, Some(w)) => {
                Arc::new(CubicConfig::default().initial_window(w).clone())
            }
            (Congestion::NewReno, None) => Arc::new(NewRenoConfig::default()),
            (Congestion::NewReno, Some(w)) => {
                Arc::new(NewRenoConfig::default().initial_window(w).clone())
            }
            (Congestion::Bbr, None) => Arc::new(BbrConfig::default()),
            (Congestion::Bbr, Some(w)) => Arc::new(BbrConfig::default().initial_window(w).clone()),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A link to size the windows for: its bottleneck rate and round-trip time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Bits per second.
    pub bandwidth_bps: u64,
    pub rtt: Duration,
}

/// Limits accepted for [`Link`] (anything outside is a configuration mistake).
pub const LINK_BANDWIDTH_RANGE: std::ops::RangeInclusive<u64> = 1_000..=1_000_000_000_000;
pub const LINK_RTT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_micros(10)..=Duration::from_secs(10);

/// Caps for the link-derived windows: receive buffers are allocated only as data
/// arrives, but a stuck reader could make a peer buffer this much.
pub const MAX_STREAM_WINDOW: u64 = 512 << 20;
pub const MAX_CONN_WINDOW: u64 = 1 << 30;
/// Bounds of the link-derived initial congestion window (quinn's default is 14720).
pub const MIN_INITIAL_WINDOW: u64 = 14720;
/// The initial congestion window without a configured link. A connection that only
/// carries on-demand fetches is application-limited, so its window never grows past this,
/// and quinn paces each flight at about window / RTT: a 64 KiB reply under quinn's 14.7 KB
/// took slow start's extra round trips, and under 128 KiB was still spread over ~RTT/2.
/// Measured idle 64 KiB fetch through the relay at 27.6 ms path RTT
/// (`PAGEWIRE_BENCH_ONLY=touch cargo bench --bench postcopy`): 48.5-48.8 ms with quinn's
/// default, 41.7-41.8 ms with 128 KiB, 30.7 ms with 512 KiB.
pub const DEFAULT_INITIAL_WINDOW: u64 = 512 << 10;
pub const MAX_INITIAL_WINDOW: u64 = 8 << 20;
/// Cap for the link-derived UDP socket buffers (the kernel clamps to `net.core.[rw]mem_max`
/// anyway).
pub const MAX_SOCKET_BUFFER: usize = 64 << 20;

impl Link {
    /// Checks the ranges ([`LINK_BANDWIDTH_RANGE`], [`LINK_RTT_RANGE`]).
    pub fn validate(&self) -> Result<(), String> {
        if !LINK_BANDWIDTH_RANGE.contains(&self.bandwidth_bps) {
            return Err(format!(
                "link bandwidth {} bit/s is out of range (1kbit..1000gbit)",
                self.bandwidth_bps
            ));
        }
        if !LINK_RTT_RANGE.contains(&self.rtt) {
            return Err(format!(
                "link RTT {:?} is out of range (10us..10s)",
                self.rtt
            ));
        }
        Ok(())
    }

    /// Bandwidth × RTT, in bytes.
    pub fn bdp(&self) -> u64 {
        let bits = (self.bandwidth_bps as u128).saturating_mul(self.rtt.as_nanos());
        (bits / 8 / 1_000_000_000).min(u64::MAX as u128) as u64
    }
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
            congestion: DEFAULT_CONGESTION,
            initial_rtt: None,
            initial_window: Some(DEFAULT_INITIAL_WINDOW),
        }
    }
}

impl Tuning {
    /// Sizes the windows for `link`: the stream and connection receive windows and the
    /// send window become at least 2 × bandwidth × RTT (the connection ones 4 ×, so two
    /// streams can both run at full rate), never below the defaults and never above
    /// [`MAX_STREAM_WINDOW`] / [`MAX_CONN_WINDOW`]; UDP socket buffers become one BDP
    /// (4 MiB..[`MAX_SOCKET_BUFFER`]); the initial RTT estimate becomes the link's RTT.
    /// Only ever raises windows, so calling it for a slow link changes little.
    pub fn size_for_link(&mut self, link: Link) {
        let bdp = link.bdp();
        let d = Tuning::default();
        let raise = |cur: u64, want: u64, cap: u64| cur.max(want.min(cap));
        self.stream_window = raise(self.stream_window, bdp.saturating_mul(2), MAX_STREAM_WINDOW);
        self.conn_window =
            raise(self.conn_window, bdp.saturating_mul(4), MAX_CONN_WINDOW).max(self.stream_window);
        self.send_window = raise(self.send_window, bdp.saturating_mul(4), MAX_CONN_WINDOW);
        self.socket_buffer = self
            .socket_buffer
            .max((bdp.min(MAX_SOCKET_BUFFER as u64) as usize).max(d.socket_buffer));
        self.initial_rtt = Some(link.rtt);
        let half_bdp = (bdp / 2).clamp(MIN_INITIAL_WINDOW, MAX_INITIAL_WINDOW);
        self.initial_window = Some(self.initial_window.unwrap_or(0).max(half_bdp));
    }

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
        t.congestion_controller_factory(self.congestion.factory(self.initial_window));
        if let Some(rtt) = self.initial_rtt {
            t.initial_rtt(rtt);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn congestion_names_round_trip() {
        for c in Congestion::ALL {
            assert_eq!(Congestion::parse(c.name()), Ok(c));
            assert_eq!(Congestion::parse(&c.name().to_uppercase()), Ok(c));
        }
        assert_eq!(Congestion::parse("new_reno"), Ok(Congestion::NewReno));
        assert_eq!(Congestion::parse("New-Reno"), Ok(Congestion::NewReno));
        let e = Congestion::parse("vegas").unwrap_err();
        assert!(e.contains("cubic, newreno or bbr"), "{e}");
        assert_eq!(Tuning::default().congestion, DEFAULT_CONGESTION);
    }

    #[test]
    fn bdp() {
        let l = Link {
            bandwidth_bps: 1_000_000_000,
            rtt: Duration::from_millis(50),
        };
        assert_eq!(l.bdp(), 6_250_000);
        let l = Link {
            bandwidth_bps: 200_000_000,
            rtt: Duration::from_millis(50),
        };
        assert_eq!(l.bdp(), 1_250_000);
        let huge = Link {
            bandwidth_bps: u64::MAX,
            rtt: Duration::from_secs(u64::MAX / 4),
        };
        assert_eq!(huge.bdp(), u64::MAX);
    }

    #[test]
    fn windows_follow_the_link() {
        // 10 Gbit/s x 100 ms: BDP 125 MB.
        let mut t = Tuning::default();
        let link = Link {
            bandwidth_bps: 10_000_000_000,
            rtt: Duration::from_millis(100),
        };
        t.size_for_link(link);
        let bdp = link.bdp();
        assert_eq!(t.stream_window, 2 * bdp);
        assert_eq!(t.conn_window, 4 * bdp);
        assert_eq!(t.send_window, 4 * bdp);
        assert!(t.stream_window >= 2 * bdp && t.send_window >= 2 * bdp);
        assert_eq!(t.socket_buffer, MAX_SOCKET_BUFFER);
        assert_eq!(t.initial_rtt, Some(Duration::from_millis(100)));
        let q = t.transport_config();
        let dbg = format!("{q:?}");
        assert!(dbg.contains("initial_rtt: 100ms"), "{dbg}");
    }

    #[test]
    fn small_links_keep_the_defaults_and_huge_ones_are_capped() {
        let d = Tuning::default();
        let mut t = Tuning::default();
        t.size_for_link(Link {
            bandwidth_bps: 10_000_000,
            rtt: Duration::from_millis(20),
        });
        assert_eq!(
            (
                t.stream_window,
                t.conn_window,
                t.send_window,
                t.socket_buffer
            ),
            (
                d.stream_window,
                d.conn_window,
                d.send_window,
                d.socket_buffer
            )
        );
        let mut t = Tuning::default();
        t.size_for_link(Link {
            bandwidth_bps: 1_000_000_000_000,
            rtt: Duration::from_secs(10),
        });
        assert_eq!(t.stream_window, MAX_STREAM_WINDOW);
        assert_eq!(t.conn_window, MAX_CONN_WINDOW);
        assert_eq!(t.send_window, MAX_CONN_WINDOW);
        assert!(t.conn_window >= t.stream_window);
        // 1 Gbit/s x 50 ms: 2 x BDP = 12.5 MB fits in the 16 MiB default stream window.
        let mut t = Tuning::default();
        t.size_for_link(Link {
            bandwidth_bps: 1_000_000_000,
            rtt: Duration::from_millis(50),
        });
        assert_eq!(t.stream_window, 16 * MIB);
    }

    #[test]
    fn link_ranges() {
        let ok = Link {
            bandwidth_bps: 1_000_000,
            rtt: Duration::from_millis(1),
        };
        assert!(ok.validate().is_ok());
        let e = Link {
            bandwidth_bps: 10,
            ..ok
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("bandwidth"), "{e}");
        let e = Link {
            rtt: Duration::ZERO,
            ..ok
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("RTT"), "{e}");
        assert!(Link {
            rtt: Duration::from_secs(11),
            ..ok
        }
        .validate()
        .is_err());
    }

    #[test]
    fn every_controller_builds_a_transport_config() {
        for c in Congestion::ALL {
            for w in [None, Some(1 << 20)] {
                let t = Tuning {
                    congestion: c,
                    initial_window: w,
                    ..Tuning::default()
                };
                let _ = t.transport_config();
            }
        }
    }

    #[test]
    fn a_configured_link_sets_half_a_bdp_as_initial_window_within_bounds() {
        let mut t = Tuning::default();
        assert_eq!(t.initial_window, Some(DEFAULT_INITIAL_WINDOW));
        t.size_for_link(Link {
            bandwidth_bps: 400_000_000,
            rtt: Duration::from_millis(50),
        });
        assert_eq!(t.initial_window, Some(1_250_000));
        let mut t = Tuning::default();
        t.size_for_link(Link {
            bandwidth_bps: 1_000_000,
            rtt: Duration::from_millis(1),
        });
        // A slow link never lowers the default.
        assert_eq!(t.initial_window, Some(DEFAULT_INITIAL_WINDOW));
        t.initial_window = None;
        t.size_for_link(Link {
            bandwidth_bps: 1_000_000,
            rtt: Duration::from_millis(1),
        });
        assert_eq!(t.initial_window, Some(MIN_INITIAL_WINDOW));
        let mut t = Tuning::default();
        t.size_for_link(Link {
            bandwidth_bps: 100_000_000_000,
            rtt: Duration::from_millis(200),
        });
        assert_eq!(t.initial_window, Some(MAX_INITIAL_WINDOW));
    }
}
