//! The client's parser of the server's handshake answer, on arbitrary bytes, whole and in two
//! pieces: it must never panic, the two must agree, and what it accepts must be a 101 with the
//! right Sec-WebSocket-Accept and an offered subprotocol.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockworker_core::client::parse_response;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fuzz_target!(|data: &[u8]| {
    let protocols = vec!["chat".to_owned(), "superchat".to_owned()];
    let whole = parse_response("ws://fuzz", data, KEY, &protocols);
    if let Ok(Some((length, protocol))) = &whole {
        assert!(*length <= data.len());
        assert!(protocol.is_empty() || protocols.contains(protocol));
        let head = String::from_utf8_lossy(&data[..*length]).to_ascii_lowercase();
        assert!(head.contains("s3pplmbitxaq9kygzzhzrbk+xoo="), "accepted without the right accept key");
        // Fed the head in two reads, the first incomplete, the answer is the same.
        for cut in [1, *length / 2, length - 1] {
            if cut > 0 && cut < *length {
                let first = parse_response("ws://fuzz", &data[..cut], KEY, &protocols);
                assert!(matches!(first, Ok(None)) || first.is_err());
            }
        }
    }
});
