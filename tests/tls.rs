//! Mutual TLS: only certificates from our CA, for names we expect, get in.

mod common;

use common::*;
use pagewire::agent::AgentConfig;
use std::time::Duration;

async fn never_connects(a: &pagewire::agent::Agent, peer: &str) {
    assert!(
        !a.wait_connected(peer, Duration::from_secs(2)).await,
        "{} connected to {peer} but should have been refused",
        a.name()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let other = Mesh::new(&["b"]);
    let (pa, pb) = (free_port(), free_port());
    let a = start(mesh.config("a", pa, &[("b", pb)])).await;
    // b trusts our CA (so it would accept a), but presents a certificate from another CA.
    let mut cb = AgentConfig::new(
        "b",
        &format!("127.0.0.1:{pb}"),
        &mesh.path().join("ca.pem"),
        &other.path().join("b.pem"),
        &other.path().join("b.key"),
    );
    cb.peers = mesh.config("b", pb, &[("a", pa)]).peers;
    let b = start(cb).await;
    never_connects(&a, "b").await;
    never_connects(&b, "a").await;
    let why = a.status().peers[0].last_error.clone().unwrap_or_default();
    assert!(why.to_lowercase().contains("certificate"), "a says: {why}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_peer_is_refused() {
    logs();
    let mesh = Mesh::new(&["a", "c"]);
    let (pa, pc) = (free_port(), free_port());
    // a expects only "b"; c has a valid certificate and dials a.
    let a = start(mesh.config("a", pa, &[("b", free_port())])).await;
    let c = start(mesh.config("c", pc, &[("a", pa)])).await;
    never_connects(&c, "a").await;
    let why = c.status().peers[0].last_error.clone().unwrap_or_default();
    assert!(why.contains("UNKNOWN_PEER"), "c says: {why}");
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_certificate_name_is_refused_at_startup() {
    let mesh = Mesh::new(&["a", "b"]);
    let mut c = mesh.config("a", free_port(), &[]);
    c.cert = mesh.path().join("b.pem");
    c.key = mesh.path().join("b.key");
    let e = pagewire::agent::Agent::start(c)
        .await
        .err()
        .expect("must fail");
    assert!(e.to_string().contains("is for node \"b\""), "{e}");
    // Its own certificate with another node's key: both files named.
    let mut c = mesh.config("a", free_port(), &[]);
    c.key = mesh.path().join("b.key");
    let e = pagewire::agent::Agent::start(c)
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.contains("b.key does not belong to certificate") && e.contains("a.pem"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_reconnect_and_the_connection_is_shared_by_both_directions() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa, pb) = (free_port(), free_port());
    let cb = mesh.config("b", pb, &[("a", pa)]);
    let a = start(mesh.config("a", pa, &[("b", pb)])).await;
    let b = start(cb.clone()).await;
    connected(&a, "b").await;
    connected(&b, "a").await;
    b.shutdown().await;
    // a notices, and reconnects when b is back (b restarts with a new boot id).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!a.is_connected("b"));
    let b = start(cb).await;
    connected(&a, "b").await;
    connected(&b, "a").await;
    // Exactly one connection: after settling, both see the same one for a while.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(a.is_connected("b") && b.is_connected("a"));
    a.shutdown().await;
    b.shutdown().await;
}

/// Two running agents under one name would take the connection from each other in turn;
/// once one replaced the other, the replaced one is refused, and both ends say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_running_agent_with_the_same_name_is_refused_with_a_reason() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let (pa1, pa2, pb) = (free_port(), free_port(), free_port());
    let b = start(mesh.config("b", pb, &[("a", pa1)])).await;
    let a1 = start(mesh.config("a", pa1, &[("b", pb)])).await;
    connected(&a1, "b").await;
    connected(&b, "a").await;
    let a2 = start(mesh.config("a", pa2, &[("b", pb)])).await;
    connected(&a2, "b").await;
    // a1 dials again within its backoff (at most 500 ms here) and is refused each time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peer = |x: &pagewire::agent::Agent| x.status().peers.into_iter().next().unwrap();
    let at_b = peer(&b);
    let why = at_b.last_error.clone().unwrap_or_default();
    assert!(
        why.contains("two running agents use the name a"),
        "b says: {why}"
    );
    let why = peer(&a1).last_error.unwrap_or_default();
    assert!(
        why.contains("two running agents use the name a"),
        "a1 says: {why}"
    );
    // a2 kept its connection all along.
    let kept = peer(&a2);
    assert!(kept.connected, "{kept:?}");
    assert!(kept.connected_for_s.unwrap_or(0.0) >= 2.5, "{kept:?}");
    a1.shutdown().await;
    a2.shutdown().await;
    b.shutdown().await;
}

/// `--control` naming a file that is not a socket is refused at start and the file is
/// left alone (it used to be replaced by the socket, and removed at shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_path_that_is_not_a_socket_is_refused_and_kept() {
    let mesh = Mesh::new(&["a"]);
    let precious = mesh.path().join("precious.txt");
    std::fs::write(&precious, b"important data").unwrap();
    let mut c = mesh.config("a", free_port(), &[]);
    c.control = Some(precious.clone());
    let e = match pagewire::agent::Agent::start(c).await {
        Ok(a) => {
            a.shutdown().await;
            panic!("started on a regular file as its control socket");
        }
        Err(e) => e.to_string(),
    };
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"important data");
}

/// Waits (at most 30 s) until `f` holds for `x`'s status of peer `a`; that status.
async fn until(
    x: &pagewire::agent::Agent,
    what: &str,
    f: impl Fn(&pagewire::control::PeerStatus) -> bool,
) -> pagewire::control::PeerStatus {
    let peer = || {
        x.status()
            .peers
            .into_iter()
            .find(|p| p.name == "a")
            .unwrap()
    };
    let mut held = None;
    let r = wait_for(Duration::from_secs(30), || {
        let p = peer();
        let ok = f(&p);
        held = ok.then_some(p);
        ok
    })
    .await;
    assert!(r.is_ok(), "{what}: {:?}", peer());
    held.unwrap()
}

/// A peer whose path drops everything stays `connected` until the idle timeout, and
/// `status` shows how long it has been silent; healthy, keep-alives keep that small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_shows_how_long_it_has_been_silent() {
    logs();
    let mesh = Mesh::new(&["a", "b"]);
    let pa = free_port();
    // b reaches a only through a relay; a's address for b leads nowhere.
    let relay = relay_to(pa, Default::default()).await;
    let b = start(mesh.config("b", free_port(), &[("a", relay.local_addr().port())])).await;
    let a = start(mesh.config("a", pa, &[("b", free_port())])).await;
    connected(&b, "a").await;
    let peer = || {
        b.status()
            .peers
            .into_iter()
            .find(|p| p.name == "a")
            .unwrap()
    };
    // Healthy: keep-alives every 500 ms (the test config) keep it small, long after the
    // connection was made.
    until(&b, "heard lately", |p| {
        p.connected_for_s.is_some_and(|s| s > 2.0) && p.silent_s.is_some_and(|s| s < 1.0)
    })
    .await;
    // Cut: still connected, silent for longer and longer (idle timeout 5 s).
    relay.set_params(cut(), cut());
    let p = until(&b, "silent while connected", |p| {
        p.connected && p.silent_s.is_some_and(|s| s > 2.0)
    })
    .await;
    assert_eq!(
        (p.idle_timeout_s, p.keep_alive_s),
        (Some(5.0), Some(0.5)),
        "{p:?}"
    );
    until(&b, "dropped after the idle timeout", |p| !p.connected).await;
    assert_eq!(peer().silent_s, None);
    a.shutdown().await;
    b.shutdown().await;
    relay.shutdown().await;
}
