//! A small certificate authority for a pagewire mesh (rcgen).
//!
//! * `ca.pem` / `ca.key`: the CA. Every agent trusts `ca.pem`; `ca.key` only signs.
//! * `NAME.pem` / `NAME.key`: node NAME's certificate, signed by the CA. Its subject common
//!   name *is* the node's identity, and `NAME` is also its first DNS subject-alt-name so the
//!   dialing side can verify it as a TLS server name. Extra `--san` names or IPs are added
//!   for other tools; they never change the identity.
//!
//! Private keys are written with mode 0600.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Making or reading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file would be overwritten.
    #[error("{0} exists already (pass --force to replace it)")]
    Exists(PathBuf),
    /// rcgen refused the parameters or the PEM.
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    /// The node name cannot be a certificate identity.
    #[error("invalid node name {0:?}: use letters, digits, '-', '.' (a DNS name)")]
    BadName(String),
    /// The directory has no CA to sign with.
    #[error("no CA in {0}: run `pagewire certs init --dir {0}` first")]
    NoCa(String),
    /// A `--san` value is neither an IP address nor a DNS name.
    #[error("invalid subject alt name {0:?}")]
    BadSan(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.into(),
        source,
    }
}

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Rcgen { what, source }
}

/// Paths of the CA files in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Paths of node `name`'s files in `dir`.
pub fn node_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

fn write_file(path: &Path, data: &str, private: bool, force: bool) -> Result<(), CertError> {
    if path.exists() && !force {
        return Err(CertError::Exists(path.into()));
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time_now();
    params.not_before = now - std::time::Duration::from_secs(3600);
    // At most 100 years: a date past 9999 would overflow (and panic) in `time`.
    let days = days.min(36500) as u64;
    params.not_after = now + std::time::Duration::from_secs(days * 86400);
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Creates `dir/ca.pem` and `dir/ca.key`. Returns the two paths.
pub fn init_ca(dir: &Path, days: u32, force: bool) -> Result<(PathBuf, PathBuf), CertError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let (cert_path, key_path) = ca_paths(dir);
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA params"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "pagewire CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(rc("signing the CA"))?;
    write_file(&key_path, &key.serialize_pem(), true, force)?;
    write_file(&cert_path, &cert.pem(), false, force)?;
    Ok((cert_path, key_path))
}

/// Issues `dir/NAME.pem` and `dir/NAME.key` signed by the CA in `dir`.
pub fn issue(
    dir: &Path,
    name: &str,
    sans: &[String],
    days: u32,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    if !crate::proto::valid_name(name) || name.contains('_') {
        return Err(CertError::BadName(name.into()));
    }
    let (ca_cert_path, ca_key_path) = ca_paths(dir);
    if !ca_cert_path.exists() && !ca_key_path.exists() {
        return Err(CertError::NoCa(dir.display().to_string()));
    }
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(rc(format!("reading {}", ca_key_path.display())))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(rc(format!("reading {}", ca_cert_path.display())))?;
    // Re-signing the CA's own parameters with its key yields an issuer with the same
    // subject and key, which is all that signing a leaf needs.
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(rc("loading the CA"))?;

    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("node params"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    let mut san = vec![SanType::DnsName(
        name.to_string()
            .try_into()
            .map_err(|_| CertError::BadName(name.into()))?,
    )];
    for s in sans {
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            san.push(SanType::IpAddress(ip));
        } else {
            // A host name: labels of letters, digits and '-' (a leading '*.' allowed),
            // separated by dots. rcgen takes any IA5 string.
            let host = s.strip_prefix("*.").unwrap_or(s);
            let ok = !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !ok {
                return Err(CertError::BadSan(s.clone()));
            }
            let dns = s
                .clone()
                .try_into()
                .map_err(|_| CertError::BadSan(s.clone()))?;
            san.push(SanType::DnsName(dns));
        }
    }
    params.subject_alt_names = san;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(rc("generating the node key"))?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(rc("signing the node certificate"))?;
    let (cert_path, key_path) = node_paths(dir, name);
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CertError::Exists(p.clone()));
            }
        }
    }
    write_file(&key_path, &key.serialize_pem(), true, force)?;
    write_file(&cert_path, &cert.pem(), false, force)?;
    Ok((cert_path, key_path))
}

/// The node identity (subject common name) of a DER certificate.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), 30, false).unwrap();
        assert!(matches!(
            init_ca(dir.path(), 30, false),
            Err(CertError::Exists(_))
        ));
        let (cert, key) = issue(
            dir.path(),
            "node-a",
            &["127.0.0.1".into(), "a.example".into()],
            30,
            false,
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pem = fs::read(&cert).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(identity_of(&der).as_deref(), Some("node-a"));
        assert!(matches!(
            issue(dir.path(), "bad name", &[], 30, false),
            Err(CertError::BadName(_))
        ));
        assert!(matches!(
            issue(dir.path(), "node-a", &[], 30, false),
            Err(CertError::Exists(_))
        ));
        for bad in ["", "not a host!", "a..b", "-a.b"] {
            assert!(
                matches!(
                    issue(dir.path(), "node-b", &[bad.into()], 30, true),
                    Err(CertError::BadSan(_))
                ),
                "{bad:?}"
            );
        }
        issue(
            dir.path(),
            "node-b",
            &["*.example.org".into(), "::1".into()],
            30,
            true,
        )
        .unwrap();
    }
}
