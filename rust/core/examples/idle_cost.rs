//! Measures what an idle WebSocket costs the core alone (no Python): opens N connections to an
//! in-process server whose "application" accepts every upgrade, then reports the RSS growth per
//! connection and the tasks alive. `cargo run --release -p sockworker-core --example idle_cost -- 5000`
//! (client and server ends share one process: N is bounded by half the open-file limit).
//! jemalloc is the global allocator here as in the bindings, so the live allocations it counts per
//! size class tell what each connection holds (the clients' halves are plain std sockets).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sockworker_core::{Event, Limits, Server, ServerConfig};

/// jemalloc as the global allocator, as `tikv-jemallocator` makes it in the bindings.
struct Jemalloc;

// SAFETY: jemalloc's functions, with the alignment passed as MALLOCX_ALIGN (log2 of it) when it
// is larger than what plain malloc guarantees.
unsafe impl std::alloc::GlobalAlloc for Jemalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let flags = if layout.align() > 16 { layout.align().trailing_zeros() as i32 } else { 0 };
        // SAFETY: a non-zero size (GlobalAlloc's contract).
        unsafe { tikv_jemalloc_sys::mallocx(layout.size(), flags).cast() }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        let flags = if layout.align() > 16 { layout.align().trailing_zeros() as i32 } else { 0 };
        // SAFETY: allocated by `alloc` with the same layout.
        unsafe { tikv_jemalloc_sys::sdallocx(ptr.cast(), layout.size(), flags) }
    }
}

#[global_allocator]
static ALLOCATOR: Jemalloc = Jemalloc;

fn classes() -> std::collections::BTreeMap<u64, i64> {
    sockworker_core::memory::size_classes().into_iter().map(|c| (c.size, c.count as i64)).collect()
}

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
        reuse_port: false,
        link_addr: None,
        metrics: None,
        access_log: false,
        stream_request_bodies: false,
    })
    .unwrap();
    let addr = server.local_addr();
    let mut clients = Vec::with_capacity(n);
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let before = rss_kib();
    let classes_before = classes();
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
    let allocated = classes()
        .into_iter()
        .map(|(size, count)| (size, count - classes_before.get(&size).copied().unwrap_or(0)))
        .filter(|&(_, delta)| delta.unsigned_abs() * 20 >= n as u64)
        .map(|(size, delta)| format!("{:.2} x {size}", delta as f64 / n as f64))
        .collect::<Vec<_>>();
    println!("live allocations per connection (jemalloc size classes): {}", allocated.join(", "));
    println!(
        "{n} idle connections, core only: RSS {before} KiB -> {after} KiB, {} bytes per connection, {} tasks",
        (after - before) * 1024 / n as u64,
        server.alive_tasks()
    );
}
