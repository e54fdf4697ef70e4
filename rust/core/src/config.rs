//! Server configuration and the limits of SPEC §3 that the core enforces. A socket carries the
//! [`Limits`] of whoever accepted it (the app's, or a Durable Object namespace's), so the
//! per-socket fields are read from the socket, the server-wide ones from the server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::meter::Meter;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (after reassembly of fragments) accepted from a peer; past it: close 1009.
    /// Each frame of a fragmented message counts at least [`FRAME_CHARGE`] bytes, so that a
    /// message of a million empty fragments is refused like a large one. Per socket.
    pub max_message_size: usize,
    /// What a socket's send queue may hold (payload and [`QUEUED_FRAME_COST`] per frame) when a
    /// new frame is queued; past it: close 1008. One frame larger than the limit is accepted on
    /// a queue below it: the limit bounds what piles up, not what the application sends. Per
    /// socket.
    pub max_buffered_bytes: usize,
    /// Time allowed for a client to send the request head, and then again for its body.
    /// Server-wide.
    pub handshake_timeout: Duration,
    /// No frame at all from the peer for this long: close 1001. `None` is off. Per socket.
    pub idle_timeout: Option<Duration>,
    /// Open connections of every kind (HTTP, TLS, WebSocket, outgoing) in the whole server; one
    /// past it is answered 503 and closed. Server-wide.
    pub max_connections: usize,
    /// Largest HTTP request body read for a handler; past it: 413. Server-wide.
    pub max_body_size: usize,
    /// With nothing received for this long, the core sends a Ping. `None` is off. Per socket.
    pub ping_interval: Option<Duration>,
    /// Nothing received this long after a keepalive Ping: close 1011, reported as 1006.
    /// Per socket.
    pub ping_timeout: Option<Duration>,
}

/// What one frame of a fragmented message costs at least against `max_message_size`: the work
/// of a frame is not free, so a flood of empty fragments is bounded like a large message.
pub const FRAME_CHARGE: usize = 16;

/// What one queued frame costs in memory besides its bytes: the `Bytes` handle in the queue (32)
/// and the allocator's header and rounding of its buffer (about 32). A queue of small frames is
/// counted at what it really holds.
pub const QUEUED_FRAME_COST: usize = 64;

/// The request headers a client may send besides those of a WebSocket handshake (`Host`,
/// `Upgrade`, `Connection`, `Sec-WebSocket-Key`, `-Version`, `-Protocol`, `-Extensions`,
/// `Origin`); more is answered 431.
pub const MAX_HEADERS: usize = 100;
pub const HANDSHAKE_HEADERS: usize = 8;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 1 << 20,
            max_buffered_bytes: 16 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_connections: 100_000,
            max_body_size: 16 << 20,
            ping_interval: Some(Duration::from_secs(20)),
            ping_timeout: Some(Duration::from_secs(20)),
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

    /// Bytes of one socket's messages (with [`QUEUED_FRAME_COST`] each) that may wait for the
    /// application thread before the core stops reading that socket: at least one whole message.
    #[must_use]
    pub fn incoming_high_water(&self) -> usize {
        self.max_message_size.max(1 << 20)
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
    /// When set, an upgrade whose `Origin` header is not one of these (compared without regard
    /// to case) is answered 403 before any application code runs. Requests without `Origin`
    /// (not from a browser) are let through.
    pub allowed_origins: Option<Vec<String>>,
    /// Accept permessage-deflate (RFC 7692) when a client offers it.
    pub compression: bool,
    /// Bind `addr` with `SO_REUSEPORT`: several processes share the port, the kernel spreads
    /// the connections (`--workers N`).
    pub reuse_port: bool,
    /// A second listening address, plain HTTP, served like the first: where other nodes of a
    /// cluster reach this one when `addr` is shared by several processes. Port 0 picks one.
    pub link_addr: Option<SocketAddr>,
    /// The metrics listener (and the dashboard), on a thread of its own.
    pub metrics: Option<MetricsConfig>,
    /// Every accepted socket counts its own messages and bytes, for the access log.
    pub access_log: bool,
    /// Hand a request with a body to the application at its head, the body read on demand
    /// (`PendingRequest::feed`), instead of once the whole body has arrived.
    pub stream_request_bodies: bool,
}

// -- the metrics listener (served by metrics.rs) ----------------------------------------------

/// Accounts past this many (by billable requests) are summed as `account="_other"`.
pub const DEFAULT_TOP_ACCOUNTS: usize = 20;

/// What the metrics listener serves, and where.
#[derive(Clone)]
pub struct MetricsConfig {
    pub addr: SocketAddr,
    /// Also serve the dashboard (`/_sockworker` and `/_sockworker/stats`).
    pub dashboard: bool,
    /// Accounts with labels of their own; the rest are `_other`.
    pub top_accounts: usize,
    /// `Pricing.messages_per_request`: incoming messages per billable request.
    pub messages_per_request: f64,
    /// The app's meter (it outlives a server: counts survive restarts of the app).
    pub meter: Arc<Meter>,
    /// The client addresses that may use the listener (`loopback()` by default); the others
    /// get 403.
    pub allow: Vec<Cidr>,
}

/// A network of the allow-list: `10.0.0.0/8`, `::1/128`, or an address alone (all its bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDRESS[/PREFIX]`; bits past the prefix are cleared (`10.1.2.3/8` is
    /// `10.0.0.0/8`). An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is its IPv4 one.
    ///
    /// # Errors
    /// When the address or the prefix length is not valid, with what was wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text.trim(), None),
        };
        let addr: IpAddr =
            addr.parse().map_err(|_| format!("{text:?} is not an IP network (e.g. 10.0.0.0/8)"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(digits) => match digits.parse::<u8>() {
                Ok(prefix) if prefix <= bits && digits.bytes().all(|b| b.is_ascii_digit()) => prefix,
                _ => return Err(format!("{text:?}: the prefix length is 0 to {bits}")),
            },
        };
        Ok(Self::new(addr, prefix))
    }

    fn new(addr: IpAddr, prefix: u8) -> Self {
        match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => {
                let v4 = v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED);
                Self::new(IpAddr::V4(v4), prefix - 96)
            }
            IpAddr::V4(v4) => {
                Self { addr: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask32(prefix))), prefix }
            }
            IpAddr::V6(v6) => {
                Self { addr: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask128(prefix))), prefix }
            }
        }
    }

    /// Whether `peer` is in the network; an IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`, a client
    /// of an IPv6 socket bound to `::`) is matched as its IPv4 address.
    #[must_use]
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            IpAddr::V4(_) => peer,
        };
        match (self.addr, peer) {
            (IpAddr::V4(net), IpAddr::V4(peer)) => u32::from(peer) & mask32(self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(peer)) => u128::from(peer) & mask128(self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0)
}

/// The default allow-list: this machine only (`127.0.0.0/8` and `::1`).
#[must_use]
pub fn loopback() -> Vec<Cidr> {
    vec![
        Cidr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
        Cidr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
    ]
}

/// Whether a client at `peer` may use the listener.
#[must_use]
pub fn allowed(allow: &[Cidr], peer: IpAddr) -> bool {
    allow.iter().any(|cidr| cidr.contains(peer))
}

impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("addr", &self.addr)
            .field("dashboard", &self.dashboard)
            .field("top_accounts", &self.top_accounts)
            .field("allow", &self.allow.iter().map(ToString::to_string).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}
