//! The upgrade validator on arbitrary request heads: it must never panic, and what it accepts
//! must have a key of 16 bytes in base64 and version 13.
#![no_main]

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sockworker_core::handshake::{classify, Upgrade};

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let Some(method) = request.method.and_then(|m| hyper::Method::from_bytes(m.as_bytes()).ok()) else {
        return;
    };
    let mut map = HeaderMap::new();
    for header in request.headers.iter() {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(header.name.as_bytes()), HeaderValue::from_bytes(header.value))
        {
            map.append(name, value);
        }
    }
    if let Upgrade::WebSocket { accept } = classify(&method, &map) {
        assert_eq!(method, hyper::Method::GET);
        assert_eq!(map.get("sec-websocket-version").map(HeaderValue::as_bytes), Some(&b"13"[..]));
        assert_eq!(map.get("sec-websocket-key").map(|k| k.len()), Some(24));
        assert_eq!(accept.len(), 28);
    }
});
