//! permessage-deflate (RFC 7692): negotiation, and compressing and inflating whole messages.
//!
//! The server always answers with `server_no_context_takeover` and `client_no_context_takeover`:
//! every message is compressed and inflated on its own, so a socket keeps no zlib state between
//! messages (an idle or hibernated compressed socket costs what a plain one does). The zlib
//! state lives once per thread instead and is reset for each message: one compressor on the
//! application thread (and any thread that broadcasts), one inflater per I/O thread. The
//! compressed fragments of a message are kept until it is whole and then inflated at once, with
//! the output bounded by `max_message_size`: a small frame that inflates past it fails with 1009
//! having cost at most that much.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What the handshake settled for one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// Messages we send may be compressed: the client accepts our 32 KiB window. A client that
    /// asked for a smaller one (`server_max_window_bits` < 15) gets every message uncompressed,
    /// which RFC 7692 allows, rather than a compressor this build does not have.
    pub compress: bool,
    /// The `server_max_window_bits` we answered with (15 when the offer had none).
    window_bits: u8,
    /// The offer named `server_max_window_bits`: the answer repeats it.
    echo_window: bool,
}

/// Messages shorter than this are sent uncompressed: zlib's framing costs more than it saves.
const MIN_COMPRESSED: usize = 64;

impl Deflate {
    /// The `Sec-WebSocket-Extensions` value of the 101 response.
    #[must_use]
    pub fn response(&self) -> String {
        let mut value =
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover".to_owned();
        if self.echo_window {
            value += &format!("; server_max_window_bits={}", self.window_bits);
        }
        value
    }

    /// Whether a message of `len` bytes is worth compressing on this socket.
    #[must_use]
    pub fn compresses(&self, len: usize) -> bool {
        self.compress && len >= MIN_COMPRESSED
    }
}

/// Picks the first permessage-deflate offer of a `Sec-WebSocket-Extensions` header (several
/// headers joined with ", ") that can be accepted; `None` declines compression.
#[must_use]
pub fn negotiate(offers: &str) -> Option<Deflate> {
    offers.split(',').find_map(accept_offer)
}

fn accept_offer(offer: &str) -> Option<Deflate> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut deflate = Deflate { compress: true, window_bits: 15, echo_window: false };
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim().to_ascii_lowercase(), Some(value.trim().trim_matches('"'))),
            None => (parameter.to_ascii_lowercase(), None),
        };
        if seen.contains(&name) {
            return None; // RFC 7692 §7: a parameter given twice makes the offer invalid.
        }
        seen.push(name.clone());
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            // The client may be told a window; we inflate any window, so we need not.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(bits)) => {
                window(bits)?;
            }
            ("server_max_window_bits", Some(bits)) => {
                let bits = window(bits)?;
                deflate.window_bits = bits;
                deflate.echo_window = true;
                deflate.compress = bits == 15;
            }
            _ => return None,
        }
    }
    Some(deflate)
}

/// A window size parameter: 8 to 15, decimal digits only.
fn window(value: &str) -> Option<u8> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) || value.len() > 2 {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// The four bytes a sync flush ends with, removed from a compressed message (RFC 7692 §7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Compresses one whole message, without context from earlier ones.
#[must_use]
pub fn compress(data: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|compressor| {
        let mut compressor = compressor.borrow_mut();
        // One call with room for the worst case (stored blocks: 5 bytes per 16 KiB, and the
        // flush); if that was not enough, again from the start with twice the room. A sync
        // flush split over calls that run out of room has been seen to lose input with the
        // miniz_oxide backend, so it is never split.
        let mut room = data.len() + data.len() / 1024 * 8 + 128;
        loop {
            compressor.reset();
            let mut out = Vec::with_capacity(room);
            compressor.compress_vec(data, &mut out, FlushCompress::Sync).expect("compressing to memory");
            if compressor.total_in() == data.len() as u64 && out.len() < out.capacity() {
                if out.ends_with(&TAIL) {
                    out.truncate(out.len() - TAIL.len());
                }
                return out;
            }
            room *= 2;
        }
    })
}

/// Why a message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It would inflate to more than the limit (found having made no more than that).
    TooBig,
    /// It is not valid deflate data.
    Invalid,
}

/// Inflates one whole message, to at most `max` bytes.
///
/// # Errors
/// As [`InflateError`] says.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|inflater| {
        let mut inflater = inflater.borrow_mut();
        inflater.reset(false);
        let mut out = Vec::with_capacity((compressed.len() * 4).clamp(256, max.max(256)));
        for part in [compressed, &TAIL[..]] {
            let mut input = part;
            loop {
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                if out.capacity() == out.len() {
                    // Grow, but never past what the limit allows (+1 to see it passed).
                    let room = out.capacity().max(1024).min(max + 1 - out.len());
                    out.reserve_exact(room);
                }
                let (before, made) = (inflater.total_in(), out.len());
                let status = inflater
                    .decompress_vec(input, &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Invalid)?;
                #[allow(clippy::cast_possible_truncation)]
                let used = (inflater.total_in() - before) as usize;
                input = &input[used..];
                if status == Status::StreamEnd {
                    // A final block: what follows must be nothing but our tail.
                    break;
                }
                if input.is_empty() && out.capacity() > out.len() {
                    break;
                }
                if used == 0 && out.len() == made && out.capacity() > out.len() {
                    return Err(InflateError::Invalid); // no progress with room to make it
                }
            }
        }
        if out.len() > max {
            return Err(InflateError::TooBig);
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_as_rfc_7692_says() {
        let plain = negotiate("permessage-deflate").unwrap();
        assert!(plain.compress);
        assert_eq!(
            plain.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let small =
            negotiate("permessage-deflate; server_max_window_bits=9; client_max_window_bits").unwrap();
        assert!(!small.compress, "a window we cannot make: every message goes uncompressed");
        assert!(small.response().ends_with("server_max_window_bits=9"));
        // The first acceptable offer wins; bad ones are skipped.
        let second = negotiate("permessage-deflate; server_max_window_bits=7, permessage-deflate").unwrap();
        assert!(second.compress);
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(negotiate(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips_and_bounds_what_it_inflates() {
        let text = "Hello, hello, hello! ".repeat(500);
        let compressed = compress(text.as_bytes());
        assert!(compressed.len() < text.len() / 10);
        assert_eq!(inflate(&compressed, text.len()).unwrap(), text.as_bytes());
        assert_eq!(inflate(&compressed, text.len() - 1), Err(InflateError::TooBig), "one byte past");
        assert_eq!(inflate(&compress(b""), 10).unwrap(), b"");
        // A bomb: 16 MiB of zeros in a small frame, refused having made at most the limit.
        let bomb = compress(&vec![0u8; 16 << 20]);
        assert!(bomb.len() < 1 << 20);
        assert_eq!(inflate(&bomb, 1 << 20), Err(InflateError::TooBig));
        assert_eq!(inflate(&[0xff, 0xff, 0xff], 100), Err(InflateError::Invalid), "not deflate");
    }

    #[test]
    fn large_messages_of_every_kind_round_trip() {
        // Image-like data (a product gradient with a little noise): the kind whose 64 KiB
        // slices lost input when a sync flush was split over calls (Autobahn 12.2.9).
        let mut x: u32 = 7;
        let mut noise = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for size in [65_536, 131_072, 300_000] {
            let data: Vec<u8> = (0..size)
                .map(|i: usize| {
                    let (px, py) = ((i % 512) as u32, (i / 512) as u32);
                    ((px * py / 64) as u8).wrapping_add((noise() % 4) as u8)
                })
                .collect();
            assert_eq!(inflate(&compress(&data), size).unwrap(), data, "size {size}");
        }
    }
}
