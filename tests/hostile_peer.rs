//! A peer with a valid certificate that sends garbage: the agent answers with named error
//! codes or error replies, never crashes or stalls, and keeps serving everyone else.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use pagewire::proto::codec::{encode, read_exact, read_frame, write_frame};
use pagewire::proto::*;
use pagewire::transport::{endpoint, Identity, Tuning};
use rand::RngCore;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

fn hostile_endpoint(mesh: &Mesh) -> quinn::Endpoint {
    let d = mesh.path();
    let id = Identity::load("h", &d.join("ca.pem"), &d.join("h.pem"), &d.join("h.key")).unwrap();
    endpoint("127.0.0.1:0".parse().unwrap(), &id, &Tuning::default()).unwrap()
}

fn hello(version: u32) -> Request {
    Request::Hello(Hello {
        version,
        name: "h".into(),
        software: "hostile".into(),
        boot: 1,
    })
}

/// Connects as "h" and says hello properly.
async fn connect(ep: &quinn::Endpoint, b: SocketAddr) -> quinn::Connection {
    let conn = ep.connect(b, "b").unwrap().await.unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    write_frame(&mut s, &hello(PROTOCOL_VERSION)).await.unwrap();
    s.finish().unwrap();
    let reply: Option<Reply> = read_frame(&mut r, 4096).await.unwrap();
    assert!(matches!(reply, Some(Reply::Hello(_))), "{reply:?}");
    conn
}

/// Sends raw bytes on a new stream, finishes it, and returns how the agent answered.
async fn raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<Option<Reply>, String> {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.finish();
    match timeout(T, read_frame::<_, Reply>(&mut r, 1 << 20)).await {
        Err(_) => panic!("agent did not answer within {T:?}"),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// The stream was reset by the agent with `code`.
fn reset_with(r: Result<Option<Reply>, String>, code: WireCode) {
    let e = r.expect_err("expected the agent to reset the stream");
    assert!(
        e.contains(&format!("code {}", code as u32))
            || e.contains(&format!("reset by peer: error {}", code as u32)),
        "expected reset with {code}: {e}"
    );
}

async fn request(conn: &quinn::Connection, req: &Request) -> Reply {
    raw(conn, &encode(req)).await.unwrap().expect("a reply")
}

fn error_kind(r: Reply) -> ErrorKind {
    match r {
        Reply::Error(e) => e.kind,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

struct Setup {
    _mesh: Mesh,
    _src: tempfile::TempDir,
    dst: tempfile::TempDir,
    region: std::path::PathBuf,
    a: pagewire::agent::Agent,
    b: pagewire::agent::Agent,
}

async fn setup() -> (Setup, quinn::Endpoint) {
    logs();
    let mesh = Mesh::new(&["a", "b", "h"]);
    let (pa, pb) = (free_port(), free_port());
    let src = region_dir();
    let region = src.path().join("r");
    random_file(&region, 64 << 20, 3);
    let mut cb = mesh.config("b", pb, &[("a", pa), ("h", free_port())]);
    cb.regions.push(("r".into(), region.clone()));
    let b = start(cb).await;
    let a = start(mesh.config("a", pa, &[("b", pb)])).await;
    connected(&a, "b").await;
    let ep = hostile_endpoint(&mesh);
    (
        Setup {
            _mesh: mesh,
            _src: src,
            dst: region_dir(),
            region,
            a,
            b,
        },
        ep,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peer_does_not_crash_or_stall_the_agent() {
    let (s, ep) = setup().await;
    let baddr = s.b.local_addr();
    // A legitimate pull runs the whole time.
    let to = s.dst.path().join("r");
    let pull = s.a.pull("b", "r", &to).await.unwrap();
    let conn = connect(&ep, baddr).await;

    // Random bytes: their first four bytes are a length prefix, so the agent refuses the
    // frame as too large or as malformed — either way a reset, never a reply.
    let mut junk = vec![0u8; 1024];
    rand::thread_rng().fill_bytes(&mut junk);
    junk[3] = 0x7f; // make the prefix huge
    reset_with(raw(&conn, &junk).await, WireCode::FrameTooLarge);
    junk[..4].copy_from_slice(&100u32.to_le_bytes());
    let r = raw(&conn, &junk[..104]).await;
    assert!(
        r.is_err() || matches!(r, Ok(Some(Reply::Error(_)))),
        "{r:?}"
    );

    // A truncated frame: prefix 100, then 10 bytes, then the end of the stream.
    let mut t = 100u32.to_le_bytes().to_vec();
    t.extend_from_slice(&[1; 10]);
    reset_with(raw(&conn, &t).await, WireCode::ProtocolViolation);

    // A 4 GiB length prefix is refused from the prefix alone.
    reset_with(
        raw(&conn, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await,
        WireCode::FrameTooLarge,
    );

    // 1 MiB is under the protocol's absolute cap but more than a request for any region
    // of this agent can need (64 MiB region: a 128-byte bitmap): refused before reading.
    reset_with(
        raw(&conn, &(1u32 << 20).to_le_bytes()).await,
        WireCode::FrameTooLarge,
    );

    // Well-formed but wrong requests get error replies.
    let fetch = |region: &str, chunk| Request::Fetch {
        region: region.into(),
        chunk,
    };
    assert_eq!(
        error_kind(request(&conn, &fetch("r", u64::MAX)).await),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        error_kind(request(&conn, &fetch("nope", 0)).await),
        ErrorKind::UnknownRegion
    );
    assert_eq!(
        error_kind(
            request(
                &conn,
                &Request::RegionInfo {
                    region: "../etc/passwd".into()
                }
            )
            .await
        ),
        ErrorKind::BadRequest
    );
    let bulk = |want: Vec<u8>| {
        Request::Bulk(BulkStart {
            region: "r".into(),
            chunk_size: 65536,
            size: 64 << 20,
            want,
            start: 0,
            credit: 1 << 20,
        })
    };
    assert_eq!(
        error_kind(request(&conn, &bulk(vec![0xff; 3])).await),
        ErrorKind::Mismatch
    );

    // A valid bulk stream followed by a seek past the end: the agent closes that stream.
    let (mut bs, mut br) = conn.open_bi().await.unwrap();
    write_frame(&mut bs, &bulk(vec![0xff; 128])).await.unwrap();
    write_frame(&mut bs, &BulkControl::Seek(u64::MAX))
        .await
        .unwrap();
    let drained = timeout(T, async {
        let mut buf = vec![0u8; 65536];
        loop {
            match read_frame::<_, Reply>(&mut br, 4096).await {
                Ok(Some(Reply::Chunk(h))) => {
                    if read_exact(&mut br, &mut buf[..h.len as usize])
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(Some(Reply::Zero { .. })) => {}
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the bulk stream was not closed");

    // A second hello on an established connection.
    reset_with(
        raw(&conn, &encode(&hello(PROTOCOL_VERSION))).await,
        WireCode::UnexpectedFrame,
    );

    // After all that, the hostile peer is still served correctly.
    match request(&conn, &fetch("r", 3)).await {
        Reply::Chunk(h) => {
            assert_eq!((h.chunk, h.len), (3, 65536));
        }
        other => panic!("{other:?}"),
    }
    let (mut s3, mut r3) = conn.open_bi().await.unwrap();
    write_frame(&mut s3, &fetch("r", 3)).await.unwrap();
    s3.finish().unwrap();
    let Some(Reply::Chunk(h)) = read_frame::<_, Reply>(&mut r3, 4096).await.unwrap() else {
        panic!("no chunk")
    };
    let mut data = vec![0u8; h.len as usize];
    read_exact(&mut r3, &mut data).await.unwrap();
    let original = std::fs::read(&s.region).unwrap();
    assert!(data == original[3 * 65536..4 * 65536]);
    assert_eq!(blake3::hash(&data).as_bytes(), &h.hash);

    // And the legitimate pull completed byte-exact, on a connection that stayed up.
    timeout(Duration::from_secs(120), pull.wait())
        .await
        .unwrap()
        .unwrap();
    assert_same(&s.region, &to);
    assert!(s.b.is_connected("a"));
    conn.close(0u32.into(), b"");
    s.a.shutdown().await;
    s.b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_refused() {
    let (s, ep) = setup().await;
    let baddr = s.b.local_addr();

    // Garbage instead of a hello: the connection is closed with PROTOCOL_VIOLATION.
    let conn = ep.connect(baddr, "b").unwrap().await.unwrap();
    let (mut st, _r) = conn.open_bi().await.unwrap();
    st.write_all(&[9, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .await
        .unwrap();
    st.finish().unwrap();
    match timeout(T, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                WireCode::ProtocolViolation as u64
            )
        }
        other => panic!("{other:?}"),
    }

    // A hello with another version: VERSION_MISMATCH.
    let conn = ep.connect(baddr, "b").unwrap().await.unwrap();
    let (mut st, _r) = conn.open_bi().await.unwrap();
    write_frame(&mut st, &hello(99)).await.unwrap();
    st.finish().unwrap();
    match timeout(T, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code.into_inner(), WireCode::VersionMismatch as u64)
        }
        other => panic!("{other:?}"),
    }

    // A client offering another protocol version in ALPN fails the TLS handshake.
    let d = s._mesh.path();
    use rustls_pki_types::pem::PemObject;
    let ca = rustls_pki_types::CertificateDer::from_pem_file(d.join("ca.pem")).unwrap();
    let chain = vec![rustls_pki_types::CertificateDer::from_pem_file(d.join("h.pem")).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(d.join("h.key")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![b"pagewire/1".to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let cc = quinn::ClientConfig::new(std::sync::Arc::new(qc));
    let r = timeout(T, ep.connect_with(cc, baddr, "b").unwrap())
        .await
        .unwrap();
    let e = r.expect_err("a pagewire/1 client must be refused");
    assert!(
        e.to_string().contains("120")
            || e.to_string()
                .to_lowercase()
                .contains("application protocol"),
        "{e}"
    );

    // Random datagrams at the UDP port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = rand::thread_rng();
    for _ in 0..100 {
        let mut d = vec![0u8; 1 + (rng.next_u32() % 1400) as usize];
        rng.fill_bytes(&mut d);
        let _ = udp.send_to(&d, baddr);
    }

    // The agent still serves its real peer.
    let to = s.dst.path().join("r");
    let h = s.a.pull("b", "r", &to).await.unwrap();
    timeout(Duration::from_secs(120), h.wait())
        .await
        .unwrap()
        .unwrap();
    assert_same(&s.region, &to);
    s.a.shutdown().await;
    s.b.shutdown().await;
}
