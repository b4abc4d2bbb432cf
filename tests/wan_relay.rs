//! Integration tests for the user-space WAN relay (`pagewire::wan`).
//!
//! Loopback only. Timing is asserted only as lower bounds (a delay can make
//! things slower on a loaded machine, never faster), everything is bounded by
//! timeouts.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagewire::wan::{
    parse_bytes, parse_duration, parse_rate, LinkParams, Relay, RelayConfig, RelayStats,
};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// UDP echo server that also records the source addresses it saw.
struct Echo {
    addr: SocketAddr,
    sources: Arc<Mutex<HashSet<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let sources = Arc::new(Mutex::new(HashSet::new()));
        let seen = Arc::clone(&sources);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                seen.lock().unwrap().insert(from);
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        Echo {
            addr,
            sources,
            task,
        }
    }

    fn sources(&self) -> HashSet<SocketAddr> {
        self.sources.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn localhost0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn relay_with(upstream: SocketAddr, params: LinkParams) -> Relay {
    let mut cfg = RelayConfig::symmetric(localhost0(), upstream, params);
    cfg.seed = Some(7);
    Relay::start(cfg).await.unwrap()
}

async fn client(relay: &Relay) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(relay.local_addr()).await.unwrap();
    sock
}

/// Receives one datagram or returns `None` after `wait`.
async fn recv_within(sock: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65535];
    match timeout(wait, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Sends `msg` and waits (up to 5 s) for its echo.
async fn echo_once(sock: &UdpSocket, msg: &[u8]) -> Vec<u8> {
    sock.send(msg).await.unwrap();
    recv_within(sock, Duration::from_secs(5))
        .await
        .expect("echo did not come back")
}

/// Polls the relay stats until `pred` holds (counters are bumped right after
/// `send_to`, which may be observed slightly after the datagram arrives).
async fn wait_stats(relay: &Relay, pred: impl Fn(&RelayStats) -> bool) -> RelayStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = relay.stats();
        if pred(&s) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_forwards_everything_and_counts() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let relay = relay_with(echo.addr, LinkParams::default()).await;
        let c = client(&relay).await;
        let mut bytes = 0u64;
        for i in 0..100u32 {
            let msg = format!("packet-{i}").into_bytes();
            bytes += msg.len() as u64;
            assert_eq!(echo_once(&c, &msg).await, msg);
        }
        let s = wait_stats(&relay, |s| s.packets_to_client == 100).await;
        assert_eq!(s.packets_to_upstream, 100);
        assert_eq!(s.packets_to_client, 100);
        assert_eq!(s.bytes_to_upstream, bytes);
        assert_eq!(s.bytes_to_client, bytes);
        assert_eq!((s.dropped_loss, s.dropped_queue, s.send_errors), (0, 0, 0));
        assert_eq!(s.sessions, 1);
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_datagram_passes_intact() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let params = LinkParams {
            delay: Duration::from_millis(1),
            ..LinkParams::default()
        };
        let relay = relay_with(echo.addr, params).await;
        let c = client(&relay).await;
        let msg: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(echo_once(&c, &msg).await, msg);
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_is_one_way_so_rtt_is_twice_delay() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let params = LinkParams {
            delay: Duration::from_millis(50),
            ..LinkParams::default()
        };
        let relay = relay_with(echo.addr, params).await;
        let c = client(&relay).await;
        for i in 0..3u8 {
            let start = Instant::now();
            assert_eq!(echo_once(&c, &[i; 32]).await, vec![i; 32]);
            let rtt = start.elapsed();
            assert!(
                rtt >= Duration::from_millis(100),
                "RTT {rtt:?} shorter than 2 x 50 ms"
            );
        }
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_adds_delay_and_loses_nothing() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let params = LinkParams {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(20),
            ..LinkParams::default()
        };
        let relay = relay_with(echo.addr, params).await;
        let c = client(&relay).await;
        let start = Instant::now();
        for i in 0..50u8 {
            c.send(&[i]).await.unwrap();
        }
        let mut got = HashSet::new();
        while got.len() < 50 {
            let msg = recv_within(&c, Duration::from_secs(5))
                .await
                .expect("missing echo");
            if got.is_empty() {
                let first = start.elapsed();
                assert!(
                    first >= Duration::from_millis(40),
                    "first echo after {first:?}"
                );
            }
            got.insert(msg[0]);
        }
        assert_eq!(got.len(), 50);
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_loss_forwards_nothing() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let params = LinkParams {
            loss: 1.0,
            ..LinkParams::default()
        };
        let relay = relay_with(echo.addr, params).await;
        let c = client(&relay).await;
        for i in 0..50u8 {
            c.send(&[i; 100]).await.unwrap();
        }
        assert!(recv_within(&c, Duration::from_millis(300)).await.is_none());
        let s = wait_stats(&relay, |s| s.dropped_loss == 50).await;
        assert_eq!(s.dropped_loss, 50);
        assert_eq!((s.packets_to_upstream, s.packets_to_client), (0, 0));
        assert!(echo.sources().is_empty());
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_loss_drops_some_but_not_all() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        // Loss towards upstream only, so dropped_loss counts one direction.
        let cfg = RelayConfig {
            listen: localhost0(),
            upstream: echo.addr,
            to_upstream: LinkParams {
                loss: 0.5,
                ..LinkParams::default()
            },
            to_client: LinkParams::default(),
            seed: Some(42),
        };
        let relay = Relay::start(cfg).await.unwrap();
        let c = client(&relay).await;
        for i in 0..200u8 {
            c.send(&[i]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let s = wait_stats(&relay, |s| s.dropped_loss + s.packets_to_upstream == 200).await;
        assert_eq!(s.dropped_loss + s.packets_to_upstream, 200);
        // Binomial(200, 0.5): outside 40..160 has probability ~1e-17.
        assert!((40..=160).contains(&s.packets_to_upstream), "{s:?}");
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_are_kept_apart() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let params = LinkParams {
            delay: Duration::from_millis(5),
            ..LinkParams::default()
        };
        let relay = relay_with(echo.addr, params).await;
        let a = client(&relay).await;
        let b = client(&relay).await;
        for i in 0..20u8 {
            a.send(&[b'a', i]).await.unwrap();
            b.send(&[b'b', i]).await.unwrap();
        }
        for (sock, tag) in [(&a, b'a'), (&b, b'b')] {
            let mut got = HashSet::new();
            while got.len() < 20 {
                let msg = recv_within(sock, Duration::from_secs(5))
                    .await
                    .expect("missing echo");
                assert_eq!(
                    msg[0], tag,
                    "client {} got another client's datagram",
                    tag as char
                );
                got.insert(msg[1]);
            }
            assert!(recv_within(sock, Duration::from_millis(100))
                .await
                .is_none());
        }
        // Upstream saw two distinct sources, neither of them the relay's listen port.
        let sources = echo.sources();
        assert_eq!(sources.len(), 2, "{sources:?}");
        assert!(!sources.contains(&relay.local_addr()));
        assert_eq!(relay.stats().sessions, 2);
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_params_cuts_and_restores_the_link() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let relay = relay_with(echo.addr, LinkParams::default()).await;
        let c = client(&relay).await;
        assert_eq!(echo_once(&c, b"before").await, b"before");

        let cut = LinkParams {
            loss: 1.0,
            ..LinkParams::default()
        };
        relay.set_params(cut.clone(), cut);
        assert_eq!(relay.params().0.loss, 1.0);
        for _ in 0..5 {
            c.send(b"during").await.unwrap();
        }
        assert!(recv_within(&c, Duration::from_millis(300)).await.is_none());
        assert_eq!(
            wait_stats(&relay, |s| s.dropped_loss == 5)
                .await
                .dropped_loss,
            5
        );

        let slow = LinkParams {
            delay: Duration::from_millis(40),
            ..LinkParams::default()
        };
        relay.set_params(slow.clone(), slow);
        let start = Instant::now();
        assert_eq!(echo_once(&c, b"after").await, b"after");
        assert!(start.elapsed() >= Duration::from_millis(80));

        relay.set_params(LinkParams::default(), LinkParams::default());
        assert_eq!(echo_once(&c, b"fast again").await, b"fast again");
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_direction_only_impairment() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let cfg = RelayConfig {
            listen: localhost0(),
            upstream: echo.addr,
            to_upstream: LinkParams::default(),
            to_client: LinkParams {
                loss: 1.0,
                ..LinkParams::default()
            },
            seed: None,
        };
        let relay = Relay::start(cfg).await.unwrap();
        let c = client(&relay).await;
        c.send(b"one way").await.unwrap();
        assert!(recv_within(&c, Duration::from_millis(300)).await.is_none());
        let s = wait_stats(&relay, |s| s.dropped_loss == 1).await;
        assert_eq!(
            (s.packets_to_upstream, s.packets_to_client, s.dropped_loss),
            (1, 0, 1)
        );
        assert_eq!(echo.sources().len(), 1);
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_a_real_bottleneck() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        // 8 Mbit/s towards upstream only: 1 MB needs at least 1 s of link time.
        let cfg = RelayConfig {
            listen: localhost0(),
            upstream: echo.addr,
            to_upstream: LinkParams {
                rate_bps: Some(8_000_000),
                ..LinkParams::default()
            },
            to_client: LinkParams::default(),
            seed: Some(1),
        };
        let relay = Relay::start(cfg).await.unwrap();
        let c = client(&relay).await;
        const N: usize = 1000;
        const WINDOW: usize = 64; // stays far below socket buffer sizes
        let payload = vec![0xabu8; 1000];
        let mut buf = vec![0u8; 2000];
        let (mut sent, mut received) = (0usize, 0usize);
        let start = Instant::now();
        while received < N {
            while sent < N && sent - received < WINDOW {
                c.send(&payload).await.unwrap();
                sent += 1;
            }
            let n = timeout(Duration::from_secs(5), c.recv(&mut buf))
                .await
                .expect("echo stalled")
                .unwrap();
            assert_eq!(n, 1000);
            received += 1;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(900),
            "1 MB at 8 Mbit/s took only {elapsed:?}"
        );
        let s = wait_stats(&relay, |s| s.packets_to_client == N as u64).await;
        assert_eq!(s.bytes_to_upstream, 1_000_000);
        assert_eq!(s.dropped_queue, 0);
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_tail_queue_overflows() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        // 80 kbit/s = 10 kB/s with a 10 kB queue: a burst of 50 x 1 kB mostly drops.
        let cfg = RelayConfig {
            listen: localhost0(),
            upstream: echo.addr,
            to_upstream: LinkParams {
                rate_bps: Some(80_000),
                queue_bytes: 10_000,
                ..LinkParams::default()
            },
            to_client: LinkParams::default(),
            seed: None,
        };
        let relay = Relay::start(cfg).await.unwrap();
        let c = client(&relay).await;
        for _ in 0..50 {
            c.send(&[1u8; 1000]).await.unwrap();
        }
        let s = wait_stats(&relay, |s| s.dropped_queue + s.packets_to_upstream == 50).await;
        assert_eq!(s.dropped_queue + s.packets_to_upstream, 50, "{s:?}");
        assert!(s.dropped_queue >= 30, "{s:?}");
        assert!(s.packets_to_upstream >= 10, "{s:?}");
        relay.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_frees_the_listen_port() {
    timeout(TEST_TIMEOUT, async {
        let echo = Echo::start().await;
        let relay = relay_with(echo.addr, LinkParams::default()).await;
        let addr = relay.local_addr();
        let c = client(&relay).await;
        assert_eq!(echo_once(&c, b"x").await, b"x");
        relay.shutdown().await;
        let rebound = std::net::UdpSocket::bind(addr);
        assert!(
            rebound.is_ok(),
            "port still in use after shutdown: {rebound:?}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_rejects_invalid_params() {
    let echo = Echo::start().await;
    for bad in [
        LinkParams {
            loss: 1.5,
            ..LinkParams::default()
        },
        LinkParams {
            loss: f64::NAN,
            ..LinkParams::default()
        },
        LinkParams {
            rate_bps: Some(0),
            ..LinkParams::default()
        },
    ] {
        assert!(
            Relay::start(RelayConfig::symmetric(localhost0(), echo.addr, bad))
                .await
                .is_err()
        );
    }
}

#[test]
fn symmetric_config_uses_same_params_both_ways() {
    let p = LinkParams {
        delay: Duration::from_millis(25),
        loss: 0.01,
        ..LinkParams::default()
    };
    let cfg = RelayConfig::symmetric(localhost0(), "127.0.0.1:9".parse().unwrap(), p.clone());
    assert_eq!(cfg.to_upstream, p);
    assert_eq!(cfg.to_client, p);
    assert_eq!(cfg.seed, None);
    let d = LinkParams::default();
    assert_eq!(
        (d.delay, d.jitter, d.loss, d.rate_bps, d.queue_bytes),
        (Duration::ZERO, Duration::ZERO, 0.0, None, 4 << 20)
    );
}

#[test]
fn parse_duration_table() {
    let ok = [
        ("0", Duration::ZERO),
        ("25ms", Duration::from_millis(25)),
        ("1s", Duration::from_secs(1)),
        ("500us", Duration::from_micros(500)),
        ("100ns", Duration::from_nanos(100)),
        ("1.5s", Duration::from_millis(1500)),
        ("0ms", Duration::ZERO),
        (" 2ms ", Duration::from_millis(2)),
        ("2min", Duration::from_secs(120)),
    ];
    for (s, want) in ok {
        assert_eq!(parse_duration(s), Ok(want), "{s:?}");
    }
    for s in ["", "ms", "25", "25xs", "-1ms", "1..2s", "abc"] {
        assert!(parse_duration(s).is_err(), "{s:?} should be rejected");
    }
}

#[test]
fn parse_rate_table() {
    let ok = [
        ("1000000", 1_000_000),
        ("10kbit", 10_000),
        ("100mbit", 100_000_000),
        ("1gbit", 1_000_000_000),
        ("100Mbit", 100_000_000),
        ("100Mbps", 100_000_000),
        ("5Mb/s", 5_000_000),
        ("50MBps", 400_000_000),
        ("50MB/s", 400_000_000),
        ("1.5gbit", 1_500_000_000),
        ("1kibit", 1024),
        ("8bit", 8),
    ];
    for (s, want) in ok {
        assert_eq!(parse_rate(s), Ok(want), "{s:?}");
    }
    for s in ["", "0", "0mbit", "fast", "10xbit", "-5mbit", "mbit"] {
        assert!(parse_rate(s).is_err(), "{s:?} should be rejected");
    }
}

#[test]
fn parse_bytes_table() {
    let ok = [
        ("4194304", 4 << 20),
        ("4MiB", 4 << 20),
        ("64KiB", 64 << 10),
        ("1MB", 1_000_000),
        ("512k", 512_000),
        ("100B", 100),
    ];
    for (s, want) in ok {
        assert_eq!(parse_bytes(s), Ok(want), "{s:?}");
    }
    for s in ["", "lots", "4XB", "-1"] {
        assert!(parse_bytes(s).is_err(), "{s:?} should be rejected");
    }
}

/// Runs the real binary: JSON listen line, forwarding, SIGTERM, JSON stats, exit 0.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_relays_and_prints_stats_on_sigterm() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    let echo = Echo::start().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagewire-wan"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &echo.addr.to_string(),
            "--delay",
            "10ms",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        (line, stdout)
    });
    let (line, mut stdout) = match timeout(Duration::from_secs(20), first).await {
        Ok(r) => r.unwrap(),
        Err(_) => {
            let _ = child.kill();
            panic!("binary did not print its listen address");
        }
    };
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let listen: SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();

    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(listen).await.unwrap();
    for i in 0..3u8 {
        let start = Instant::now();
        assert_eq!(echo_once(&c, &[i; 10]).await, vec![i; 10]);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        let status = child.wait().unwrap();
        (rest, status)
    });
    let (rest, status) = timeout(Duration::from_secs(10), rest)
        .await
        .expect("binary did not exit")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let stats: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(stats["packets_to_upstream"], 3);
    assert_eq!(stats["packets_to_client"], 3);
    assert_eq!(stats["bytes_to_upstream"], 30);
    assert_eq!(stats["dropped_loss"], 0);
}
