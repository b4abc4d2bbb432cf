//! Helpers for the examples and benchmarks: agents on loopback with certificates in a temp
//! dir, logs, CPU accounting.

use std::path::Path;

use crate::agent::{AgentConfig, PeerSpec};

/// Makes a CA and a certificate for each of `names` in `dir` (valid one day).
pub fn certs(dir: &Path, names: &[&str]) -> Result<(), crate::certs::CertError> {
    crate::certs::init_ca(dir, 1, false)?;
    for n in names {
        crate::certs::issue(dir, n, &[], 1, false)?;
    }
    Ok(())
}

/// A config for agent `name` on 127.0.0.1:`port` with certificates from `dir`, a control
/// socket `dir/NAME.sock`, and `peers` (name, port) on loopback.
pub fn config(dir: &Path, name: &str, port: u16, peers: &[(&str, u16)]) -> AgentConfig {
    let mut c = AgentConfig::new(
        name,
        &format!("127.0.0.1:{port}"),
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    );
    c.peers = peers
        .iter()
        .map(|(n, p)| PeerSpec {
            name: n.to_string(),
            addr: format!("127.0.0.1:{p}"),
        })
        .collect();
    c.control = Some(dir.join(format!("{name}.sock")));
    c
}

/// A UDP port on loopback that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Logs to stderr at `warn` unless `RUST_LOG` says otherwise.
pub fn logs() {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// CPU seconds (user + system) this whole process has used so far (all threads), for the
/// benchmarks' CPU-per-byte figures; NaN if `getrusage` fails.
pub fn process_cpu_secs() -> f64 {
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `u`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
