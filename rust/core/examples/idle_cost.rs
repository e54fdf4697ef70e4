//! Measures what an idle WebSocket costs the core alone (no Python): opens N connections to an
//! in-process server whose "application" accepts every upgrade, then reports the RSS growth per
//! connection and the tasks alive. `cargo run --release -p sockworker-core --example idle_cost -- 5000`
//! (client and server ends share one process: N is bounded by half the open-file limit)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sockworker_core::{Event, Limits, Server, ServerConfig};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    let n: usize = std::env::args().nth(1).map_or(5_000, |a| a.parse().unwrap());
    let server = Server::start(ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        io_threads: 1,
        limits: Limits::default(),
        tls: None,
        storage: None,
        allowed_origins: None,
        compression: false,
    })
    .unwrap();
    let addr = server.local_addr();
    let mut clients = Vec::with_capacity(n);
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let before = rss_kib();
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        // Answer the request event as an application would (polling: this is a measurement
        // tool, not a test).
        loop {
            let mut answered = false;
            for event in server.events().drain() {
                if let Event::Request(pending) = event {
                    pending.reply.accept_websocket(Vec::new(), None).unwrap();
                    answered = true;
                }
            }
            if answered {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        clients.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib();
    println!(
        "{n} idle connections, core only: RSS {before} KiB -> {after} KiB, {} bytes per connection, {} tasks",
        (after - before) * 1024 / n as u64,
        server.alive_tasks()
    );
}
