//! Mutual TLS: both ends present a certificate signed by the mesh CA; the subject common
//! name is the node's identity. rustls gets the ring provider explicitly, so a second
//! provider pulled in by another crate cannot make it panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::proto::ALPN;

/// Loading or using our identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    /// The certificate file holds no certificate.
    #[error("{0} holds no certificate")]
    NoCert(PathBuf),
    /// The certificate is for another node.
    #[error("certificate {path} is for node {}, not {name:?}", found.as_deref().map_or("(no node name)".to_string(), |f| format!("{f:?}")))]
    WrongName {
        path: PathBuf,
        found: Option<String>,
        name: String,
    },
    /// The key is not the certificate's.
    #[error("key {key} does not belong to certificate {cert} ({why})")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Our node's name, certificate chain and key, and the CA we trust.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn read_err(path: &Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> IdentityError + '_ {
    move |e| IdentityError::Read {
        path: path.into(),
        message: e.to_string(),
    }
}

impl Identity {
    /// Loads PEM files and checks that the certificate is `name`'s.
    pub fn load(name: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Identity, IdentityError> {
        let ca_der = CertificateDer::pem_file_iter(ca)
            .map_err(read_err(ca))?
            .next()
            .ok_or_else(|| IdentityError::NoCert(ca.into()))?
            .map_err(read_err(ca))?;
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(read_err(cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(cert))?;
        let first = chain
            .first()
            .ok_or_else(|| IdentityError::NoCert(cert.into()))?;
        let found = crate::certs::identity_of(first);
        if found.as_deref() != Some(name) {
            return Err(IdentityError::WrongName {
                path: cert.into(),
                found,
                name: name.into(),
            });
        }
        let key_path = key;
        let key = PrivateKeyDer::from_pem_file(key).map_err(read_err(key))?;
        // Checked here, where the files are known (rustls would only say "KeyMismatch").
        let mismatch = |why: String| IdentityError::KeyMismatch {
            cert: cert.into(),
            key: key_path.into(),
            why,
        };
        let signing = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| mismatch(e.to_string()))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|e| mismatch(e.to_string()))?;
        Ok(Identity {
            name: name.into(),
            ca: ca_der,
            chain,
            key,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, IdentityError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| IdentityError::Tls(format!("CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Tls(e.to_string())
}

/// The server side: requires a client certificate signed by our CA.
pub fn server_config(id: &Identity) -> Result<QuicServerConfig, IdentityError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots()?, provider())
        .build()
        .map_err(tls)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(cfg).map_err(tls)
}

/// The client side: verifies the server's certificate against our CA and the peer's name,
/// and presents ours.
pub fn client_config(id: &Identity) -> Result<QuicClientConfig, IdentityError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(cfg).map_err(tls)
}

/// The verified identity (certificate common name) of the peer on `conn`.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    crate::certs::identity_of(chain.first()?)
}
