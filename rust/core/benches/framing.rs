//! Micro-benchmarks of the core's per-message work: decoding client frames, encoding server
//! frames, and queueing one broadcast frame on N sockets. `make bench-micro` runs them.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sockworker_core::frame::{encode_message, unmask, MessageDecoder};
use sockworker_core::{Limits, ObjectShared, SocketShared};

/// `count` masked client text frames of `size` bytes, back to back.
fn client_frames(size: usize, count: usize) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(0x81);
        match size {
            0..=125 => out.push(0x80 | u8::try_from(size).unwrap()),
            126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&u16::try_from(size).unwrap().to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(size as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut payload = vec![b'a'; size];
        unmask(&mut payload, mask);
        out.extend_from_slice(&payload);
    }
    out
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in [64usize, 1024, 16 * 1024] {
        let data = client_frames(size, 64);
        group.throughput(Throughput::Elements(64));
        group.bench_function(format!("64 frames of {size} B"), |b| {
            let mut decoder = MessageDecoder::new(1 << 20);
            b.iter(|| {
                let mut n = 0;
                decoder.feed(black_box(&data), &mut |_| n += 1).unwrap();
                n
            });
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [64usize, 1024, 16 * 1024] {
        let payload = vec![b'a'; size];
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{size} B"), |b| b.iter(|| encode_message(true, black_box(&payload))));
    }
    group.finish();
}

fn broadcast(c: &mut Criterion) {
    let mut group = c.benchmark_group("broadcast");
    for n in [16usize, 100, 1000] {
        let object = Arc::new(ObjectShared::bare(n));
        let sockets: Vec<_> = (0..n as u64)
            .map(|id| {
                let socket = Arc::new(SocketShared::new(id, Arc::new(Limits::default())));
                object.adopt(&socket, Vec::new()).unwrap();
                socket
            })
            .collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("64 B to {n} sockets"), |b| {
            b.iter_batched(
                || (),
                |()| {
                    let sent = object.broadcast(true, black_box(&[b'a'; 64]), None, None);
                    // Empty the outboxes so every iteration queues on an empty one.
                    let mut out = VecDeque::new();
                    for socket in &sockets {
                        let _ = socket.take_queued_for_bench(&mut out);
                        out.clear();
                    }
                    sent
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode, broadcast);
criterion_main!(benches);
