//! `echo_ref`: the pure-Rust reference server of the benchmarks (tokio + tokio-tungstenite on a
//! current-thread runtime, since the benchmark pins each server to one core).
//!
//! It echoes every text and binary message on any path. With `--broadcast`, a message is sent
//! instead to every other socket on the same path (the room), in a loop over the room's sockets.
//!
//! ```text
//! echo_ref --port 9001 [--host 127.0.0.1] [--broadcast]
//! ```

// The rule against `tokio::spawn` (clippy.toml) is for the server core's accounting; this is a
// benchmark peer.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(name = "echo_ref", about = "Reference WebSocket echo/broadcast server (tokio-tungstenite)")]
struct Cli {
    #[arg(long, default_value_t = 9001)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Broadcast each message to the other sockets on the same path instead of echoing it.
    #[arg(long)]
    broadcast: bool,
}

type Rooms = Arc<Mutex<HashMap<String, HashMap<u64, mpsc::UnboundedSender<Message>>>>>;

fn config() -> WebSocketConfig {
    // Messages up to 16 MiB. tungstenite zeroes the spare read buffer before every read, so a
    // small one (8 KiB rather than the default 128 KiB) is faster for small messages, and keeps
    // idle sockets small.
    WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
        .read_buffer_size(8 << 10)
}

async fn echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config())).await else {
        return;
    };
    // Echo everything already received, then write it all with one flush.
    'conn: while let Some(first) = ws.next().await {
        let mut next = Some(first);
        let mut batch = 0;
        while let Some(item) = next.take() {
            match item {
                Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                    if ws.feed(msg).await.is_err() {
                        break 'conn;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break 'conn,
                Ok(_) => {}
            }
            batch += 1;
            if batch < 1024 {
                next = ws.next().now_or_never().flatten();
            }
        }
        if ws.flush().await.is_err() {
            break;
        }
    }
    // tungstenite has queued the reply to a Close frame; write it out.
    let _ = ws.flush().await;
}

// The handshake callback's error type is tungstenite's own HTTP response.
#[allow(clippy::result_large_err)]
async fn broadcast(stream: TcpStream, rooms: Rooms, id: u64) {
    let mut path = String::from("/");
    let callback = |req: &Request, resp: Response| {
        path = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config())).await
    else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Ok(mut rooms) = rooms.lock() {
        rooms.entry(path.clone()).or_default().insert(id, tx);
    }
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    if let Ok(rooms) = rooms.lock() {
                        if let Some(room) = rooms.get(&path) {
                            for (other, tx) in room {
                                if *other != id {
                                    let _ = tx.send(msg.clone());
                                }
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            outgoing = rx.recv() => match outgoing {
                Some(msg) => {
                    if sink.feed(msg).await.is_err() {
                        break;
                    }
                    // Everything queued goes out in one write.
                    let mut n = 0;
                    while let Ok(msg) = rx.try_recv() {
                        if sink.feed(msg).await.is_err() || n > 1024 {
                            break;
                        }
                        n += 1;
                    }
                    if sink.flush().await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    if let Ok(mut rooms) = rooms.lock() {
        if let Some(room) = rooms.get_mut(&path) {
            room.remove(&id);
            if room.is_empty() {
                rooms.remove(&path);
            }
        }
    }
    let _ = sink.flush().await;
}

fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(SocketAddr::new(cli.host, cli.port)).await?;
        eprintln!(
            "echo_ref {} listening on http://{}",
            if cli.broadcast { "broadcast" } else { "echo" },
            listener.local_addr()?
        );
        let rooms: Rooms = Arc::default();
        let mut next_id = 0u64;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                // Out of file descriptors and the like: keep serving the connections we have.
                Err(e) => {
                    eprintln!("echo_ref: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            next_id += 1;
            if cli.broadcast {
                tokio::spawn(broadcast(stream, rooms.clone(), next_id));
            } else {
                tokio::spawn(echo(stream));
            }
        }
    })
}
