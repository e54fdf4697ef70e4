//! TLS with rustls (ring), both ways: `wss://` for outgoing sockets (system roots, or a CA file)
//! and `https://`/`wss://` for the server (a certificate chain and key in PEM files).
//!
//! A TLS WebSocket is driven by the same connection task as a plain one: the task reads and
//! writes one end of a Unix socket pair, and a pump task moves the bytes between the other end
//! and the TLS session ([`bridge`]). That costs a pair of descriptors and two 8 KiB buffers per
//! TLS connection, and keeps one code path for framing, limits, hibernation and metering.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use crate::runtime;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// The server's TLS configuration from a PEM certificate chain and a PEM private key.
///
/// # Errors
/// When a file cannot be read or holds no usable certificate or key.
pub fn server_config(certfile: &Path, keyfile: &Path) -> io::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certfile)
        .map_err(|e| invalid(format!("certfile {}: {e}", certfile.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("certfile {}: {e}", certfile.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("certfile {} holds no certificate", certfile.display())));
    }
    let key = PrivateKeyDer::from_pem_file(keyfile)
        .map_err(|e| invalid(format!("keyfile {}: {e}", keyfile.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(format!("certfile/keyfile: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration trusting the system's roots, or only the CA certificates in `ca_file`.
///
/// # Errors
/// When the CA file cannot be read or holds no certificate, or no system root could be loaded.
pub fn client_config(ca_file: Option<&Path>) -> io::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    if let Some(path) = ca_file {
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| invalid(format!("ca_file {}: {e}", path.display())))?
        {
            let cert = cert.map_err(|e| invalid(format!("ca_file {}: {e}", path.display())))?;
            roots.add(cert).map_err(|e| invalid(format!("ca_file {}: {e}", path.display())))?;
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        let from = ca_file.map_or_else(|| "the system".to_owned(), |p| p.display().to_string());
        return Err(invalid(format!("no CA certificate could be loaded from {from}")));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Hands a TLS session to a connection task: returns the end of a socket pair the task uses,
/// and spawns the pump between the other end and `tls`. The pump ends when both sides have
/// closed; closing our end sends the TLS close_notify.
pub(crate) fn bridge<T>(tls: T) -> io::Result<UnixStream>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = UnixStream::pair()?;
    runtime::spawn(async move {
        let (mut tls, mut theirs) = (tls, theirs);
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut theirs).await;
    });
    Ok(ours)
}
