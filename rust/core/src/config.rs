//! Server configuration and the per-socket limits of SPEC §3 that the core enforces.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest message (after reassembly of fragments) accepted from a peer; past it: close 1009.
    pub max_message_size: usize,
    /// Bytes queued to send on one socket; past it: close 1008.
    pub max_buffered_bytes: usize,
    /// Time allowed for a client to send the request head of its first request.
    pub handshake_timeout: Duration,
    /// No frame at all from the peer for this long: close 1001. `None` is off.
    pub idle_timeout: Option<Duration>,
    /// Open WebSockets in the whole server; an upgrade past it is answered 503.
    pub max_connections: usize,
    /// Largest HTTP request body read for a handler; past it: 413.
    pub max_body_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 1 << 20,
            max_buffered_bytes: 16 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_connections: 100_000,
            max_body_size: 16 << 20,
        }
    }
}

impl Limits {
    /// `send_async` waits while more than this is queued.
    #[must_use]
    pub fn send_high_water(&self) -> usize {
        (self.max_buffered_bytes / 2).min(1 << 20)
    }

    /// A waiting `send_async` is released when the queue falls to this.
    #[must_use]
    pub fn send_low_water(&self) -> usize {
        self.send_high_water() / 4
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Tokio worker threads doing socket I/O.
    pub io_threads: usize,
    pub limits: Limits,
    /// Serve https:// and wss:// with this configuration (see `tls::server_config`).
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Durable Object storage: where, and how durable a commit is (`None`: no storage).
    pub storage: Option<crate::storage::StorageConfig>,
}
