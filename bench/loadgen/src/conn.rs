//! Opening client WebSockets to a server on the loopback range only.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// Where the load goes: a ws:// URL whose host is in 127.0.0.0/8.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddrV4,
    pub url: String,
}

impl Target {
    /// Parse `ws://HOST:PORT/PATH`; refuse anything outside 127.0.0.0/8.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest =
            url.strip_prefix("ws://").ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) =
            hostport.rsplit_once(':').ok_or_else(|| format!("{url}: the URL needs an explicit port"))?;
        let ip: Ipv4Addr = if host == "localhost" {
            Ipv4Addr::LOCALHOST
        } else {
            host.parse().map_err(|_| format!("{url}: host must be an IPv4 loopback address"))?
        };
        if !ip.is_loopback() {
            return Err(format!("{url}: refusing a target outside 127.0.0.0/8"));
        }
        let port: u16 = port.parse().map_err(|_| format!("{url}: bad port"))?;
        Ok(Self { addr: SocketAddrV4::new(ip, port), url: format!("ws://{ip}:{port}{path}") })
    }
}

/// The source address for connection number `index`.
///
/// With `spread`, connections are spread over 127.0.1.1 … 127.0.1.200 so that many thousands of
/// them (or a fast stream of short-lived ones) do not run out of one address's ephemeral ports.
pub fn source_addr(index: usize, spread: bool) -> Option<Ipv4Addr> {
    spread.then(|| Ipv4Addr::new(127, 0, 1, 1 + (index % 200) as u8))
}

/// Let the kernel choose the source port at connect time (by the 4-tuple) instead of at bind time.
fn bind_address_no_port(sock: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by `sock`; the option value points to a c_int of the
    // size passed. A failure only means the port is chosen at bind time, which still works.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Open a TCP connection and do the WebSocket handshake, all within `timeout`.
pub async fn connect(
    target: &Target,
    source: Option<Ipv4Addr>,
    config: WebSocketConfig,
    timeout: Duration,
) -> Result<Ws, String> {
    let fut = async {
        let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        if let Some(ip) = source {
            bind_address_no_port(&sock);
            sock.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0))).map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let stream = sock
            .connect(SocketAddr::V4(target.addr))
            .await
            .map_err(|e| format!("connect {}: {e}", target.addr))?;
        stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let (ws, _resp) =
            tokio_tungstenite::client_async_with_config(target.url.as_str(), stream, Some(config))
                .await
                .map_err(|e| format!("handshake {}: {e}", target.url))?;
        Ok(ws)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("connect {}: timed out after {timeout:?}", target.url)),
    }
}

/// Client configuration: messages up to 64 MiB, and a read buffer of `read_buffer` bytes.
///
/// tungstenite zeroes the whole spare read buffer before every read (128 KiB by default), which
/// would make the client, not the server, the bottleneck with many small messages; so the buffer
/// is sized to what one read is expected to bring.
pub fn client_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
        .read_buffer_size(read_buffer.clamp(4 << 10, 64 << 10))
}

/// The read buffer for messages of `size` bytes, `window` of them in flight.
pub fn read_buffer_for(size: usize, window: usize) -> usize {
    (size + 14).saturating_mul(window.max(1)).clamp(4 << 10, 64 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_only() {
        let t = Target::parse("ws://127.0.0.1:8787/room").unwrap();
        assert_eq!(t.url, "ws://127.0.0.1:8787/room");
        assert_eq!(Target::parse("ws://localhost:1").unwrap().url, "ws://127.0.0.1:1/");
        assert!(Target::parse("ws://127.9.8.7:80/").is_ok());
        assert!(Target::parse("ws://10.0.0.1:80/").is_err());
        assert!(Target::parse("ws://example.com:80/").is_err());
        assert!(Target::parse("wss://127.0.0.1:80/").is_err());
        assert!(Target::parse("ws://127.0.0.1/").is_err());
    }

    #[test]
    fn spreads_sources_over_loopback() {
        assert_eq!(source_addr(0, false), None);
        assert_eq!(source_addr(0, true), Some(Ipv4Addr::new(127, 0, 1, 1)));
        assert_eq!(source_addr(199, true), Some(Ipv4Addr::new(127, 0, 1, 200)));
        assert_eq!(source_addr(200, true), Some(Ipv4Addr::new(127, 0, 1, 1)));
    }
}
