//! Validation of a WebSocket upgrade request (RFC 6455 §4.2.1), before any Python runs.

use hyper::header::{HeaderMap, HeaderValue, CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use hyper::Method;

/// What a request asks for, as far as WebSockets go.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// An ordinary HTTP request.
    None,
    /// A valid WebSocket upgrade; holds the `Sec-WebSocket-Accept` value to answer with.
    WebSocket { accept: String },
    /// An upgrade with a missing or malformed key, or not a GET: answer 400.
    BadRequest(&'static str),
    /// An upgrade for a version other than 13: answer 426 with `Sec-WebSocket-Version: 13`.
    UnsupportedVersion,
}

fn has_token(headers: &HeaderMap, name: &hyper::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|value| value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

#[must_use]
pub fn classify(method: &Method, headers: &HeaderMap) -> Upgrade {
    if !has_token(headers, &UPGRADE, "websocket") {
        return Upgrade::None;
    }
    if method != Method::GET {
        return Upgrade::BadRequest("a WebSocket upgrade must use GET");
    }
    if !has_token(headers, &CONNECTION, "upgrade") {
        return Upgrade::BadRequest("a WebSocket upgrade needs Connection: Upgrade");
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Upgrade::UnsupportedVersion;
    }
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY) else {
        return Upgrade::BadRequest("missing Sec-WebSocket-Key");
    };
    if !is_valid_key(key.as_bytes()) {
        return Upgrade::BadRequest("Sec-WebSocket-Key must be 16 bytes in base64");
    }
    Upgrade::WebSocket { accept: tungstenite::handshake::derive_accept_key(key.as_bytes()) }
}

/// A key is 16 random bytes in base64: 22 characters of the alphabet and "==".
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        // The last character carries 2 bits only, so it must be one of A, Q, g, w.
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn accepts_the_rfc_example() {
        assert_eq!(
            classify(&Method::GET, &headers(&GOOD)),
            Upgrade::WebSocket { accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into() }
        );
    }

    #[test]
    fn plain_requests_are_not_upgrades() {
        assert_eq!(classify(&Method::GET, &headers(&[("host", "x")])), Upgrade::None);
    }

    #[test]
    fn rejects_bad_keys_versions_and_methods() {
        let mut h = headers(&GOOD[..3]);
        assert!(matches!(classify(&Method::GET, &h), Upgrade::BadRequest(_)));
        h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static("short"));
        assert!(matches!(classify(&Method::GET, &h), Upgrade::BadRequest(_)));
        h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ!="));
        assert!(matches!(classify(&Method::GET, &h), Upgrade::BadRequest(_)));
        let mut v = headers(&GOOD);
        v.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        assert_eq!(classify(&Method::GET, &v), Upgrade::UnsupportedVersion);
        assert!(matches!(classify(&Method::POST, &headers(&GOOD)), Upgrade::BadRequest(_)));
    }
}
