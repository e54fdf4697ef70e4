//! TLS with rustls (ring), both ways: `wss://` for outgoing sockets (system roots, or a CA file)
//! and `https://`/`wss://` for the server (a certificate chain and key in PEM files).
//!
//! Once a TLS WebSocket is upgraded, its connection task drives the rustls session itself
//! ([`TlsStream`]): ciphertext is read into a per-thread buffer and decrypted into the task's
//! read buffer, frames are encrypted as they are written, and the socket keeps one descriptor.
//! tokio-rustls is used only up to the upgrade (the TLS handshake and the HTTP exchange).

use std::cell::RefCell;
use std::io::{self, BufRead, IoSlice, Read, Write};
use std::ops::DerefMut;
use std::os::fd::RawFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ConnectionCommon, RootCertStore, ServerConfig};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::connection::{read_draining, Stream};

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

/// Ciphertext read per system call, at most (the caller's buffer bounds it too).
const CIPHERTEXT_SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    /// Where ciphertext lands before rustls takes it (this thread's TLS sockets share it, so
    /// an idle socket holds no read buffer of its own; rustls keeps its own 4 KiB one).
    static CIPHERTEXT: RefCell<Box<[u8]>> = RefCell::new(vec![0; CIPHERTEXT_SCRATCH_SIZE].into_boxed_slice());
}

/// A TLS session driven by the socket's connection task: the TCP socket and the rustls
/// connection (`rustls::ServerConnection` or `rustls::ClientConnection`) taken from
/// tokio-rustls after the handshake. Frames are never written to the descriptor by the
/// application thread ([`Stream::direct_fd`] is `None`): they are encrypted by the task.
pub(crate) struct TlsStream<C> {
    tcp: TcpStream,
    /// Boxed: a socket's task then grows by a pointer, not by a session (~1 KB), and the plain
    /// task, of which the TLS one is a variant, not at all. Only the task locks it (the lock
    /// makes the stream `Sync`, as the task's future borrows it across its awaits).
    session: Box<Mutex<C>>,
}

impl<C> TlsStream<C> {
    pub(crate) fn new(tcp: TcpStream, session: C) -> Self {
        Self { tcp, session: Box::new(Mutex::new(session)) }
    }
}

/// The TCP socket as rustls's writer of records: non-blocking vectored writes.
struct CiphertextTo<'a>(&'a TcpStream);

impl Write for CiphertextTo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// rustls's error as the connection task's (it ends the socket like any I/O error).
fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl<C, D> TlsStream<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
    /// Writes the session's records until none is left; `WouldBlock` when the kernel takes no
    /// more.
    fn write_records(tcp: &TcpStream, session: &mut C) -> io::Result<()> {
        while session.wants_write() {
            if session.write_tls(&mut CiphertextTo(tcp))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Moves decrypted plaintext into `buf`: how much, or `Ok(0)` at the end of the stream
    /// (the peer's close_notify, or a TCP EOF without one), `WouldBlock` when there is none.
    fn take_plaintext(session: &mut C, buf: &mut [u8]) -> io::Result<usize> {
        match session.reader().read(buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            read => read,
        }
    }
}

impl<C, D> Stream for TlsStream<C>
where
    C: DerefMut<Target = ConnectionCommon<D>> + Send + 'static,
{
    /// Ready at once while rustls holds plaintext (or knows the stream ended) that the last
    /// read had no room for: the TCP socket may have nothing more to say.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.session.lock().reader().fill_buf() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tcp.poll_read_ready(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp.poll_write_ready(cx)
    }

    /// Plaintext into `buf`: first what rustls already holds, then what the ciphertext waiting
    /// in the kernel decrypts to. `WouldBlock` only once the TCP socket said so (see
    /// [`read_draining`]), so the task may wait for readiness: records that decrypt to nothing
    /// (a partial record, a KeyUpdate, a session ticket) do not end the read.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut session = self.session.lock();
        let session = &mut *session;
        let mut filled = match Self::take_plaintext(session, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Ok(0) => return Ok(0),
            taken => taken?,
        };
        CIPHERTEXT.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            while filled < buf.len() {
                // No more ciphertext than the room left: it decrypts to less, so what rustls
                // keeps past `buf` (the rest of a record begun in an earlier read) stays under
                // its limit on unread plaintext.
                let room = (buf.len() - filled).min(scratch.len());
                let n = match read_draining(&self.tcp, &mut scratch[..room]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && filled > 0 => return Ok(filled),
                    Err(e) => return Err(e),
                };
                let mut ciphertext: &[u8] = &scratch[..n];
                loop {
                    // rustls takes up to its buffer's free room (4 KiB or more) per call.
                    let fed = session.read_tls(&mut ciphertext)?;
                    session.process_new_packets().map_err(tls_error)?;
                    match Self::take_plaintext(session, &mut buf[filled..]) {
                        Ok(0) if filled < buf.len() => return Ok(filled),
                        Ok(taken) => filled += taken,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if fed == 0 || ciphertext.is_empty() {
                        break;
                    }
                }
                if n == 0 {
                    // TCP EOF, told to rustls above: the end, after the plaintext taken.
                    return Ok(filled);
                }
                if n < room {
                    // The kernel had no more (its readiness is forgotten).
                    return if filled > 0 { Ok(filled) } else { Err(io::ErrorKind::WouldBlock.into()) };
                }
            }
            Ok(filled)
        })
    }

    /// Encrypts and writes plaintext, taking it only once the session's earlier records are
    /// out, and then no more than rustls's limit on its output (64 KiB of records): what the
    /// session holds of a socket's output stays bounded, and `WouldBlock` means the kernel
    /// said so.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut session = self.session.lock();
        let session = &mut *session;
        Self::write_records(&self.tcp, session)?;
        let taken = session.writer().write_vectored(bufs)?;
        match Self::write_records(&self.tcp, session) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(taken),
            written => written.map(|()| taken),
        }
    }

    fn direct_fd(&self) -> Option<RawFd> {
        None
    }

    fn has_pending_output(&self) -> bool {
        self.session.lock().wants_write()
    }

    fn flush(&self) -> io::Result<bool> {
        let mut session = self.session.lock();
        match Self::write_records(&self.tcp, &mut session) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            written => written.map(|()| false),
        }
    }

    /// Sends a close_notify (once: rustls sends no second) and the records before it, then
    /// the TCP FIN.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let session = self.session.get_mut();
        session.send_close_notify();
        loop {
            match Self::write_records(&self.tcp, session) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = std::task::ready!(self.tcp.poll_write_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        AsyncWrite::poll_shutdown(Pin::new(&mut self.tcp), cx)
    }
}
