//! Outgoing HTTP requests (SPEC §2.3, `sw.fetch` without an upgrade): one HTTP/1.1 exchange
//! per connection with hyper's client, over TCP or TLS (rustls, the system's roots or a CA
//! file), redirects followed up to a limit. The whole response is read into memory, at most
//! `max_response_size` bytes of body; the outcome is reported as an [`Event::Fetched`].

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::client::{parse_target, tls_config, Target};
use crate::event::{Event, Events, FetchError, FetchErrorKind, FetchResponse};

/// What to request.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// For `https://`: trust only the CA certificates in this PEM file (default: the system's).
    pub ca_file: Option<String>,
    /// For the whole exchange, redirects included.
    pub timeout: Duration,
    /// For each TCP connect and TLS handshake (within `timeout`).
    pub connect_timeout: Duration,
    /// A response body longer than this fails the fetch.
    pub max_response_size: usize,
    /// Redirects followed at most; `None`: none, a 3xx is the response ("manual").
    pub max_redirects: Option<u32>,
    /// Handed back in the [`Event::Fetched`] that reports the outcome.
    pub token: u64,
}

fn failed(kind: FetchErrorKind, message: String) -> FetchError {
    FetchError { kind, message }
}

/// An error and its sources, as one line.
fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// Headers the exchange writes itself; given ones are left out.
const OWN_HEADERS: [&str; 6] =
    ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "te"];
/// Hop-by-hop headers of the upstream's connection, left out of the response: its body is read
/// whole (de-chunked), so a handler can return the response as its own.
const HOP_HEADERS: [&str; 7] =
    ["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"];
/// Headers describing a request body, dropped when a redirect turns the request into a GET.
const BODY_HEADERS: [&str; 4] = ["content-type", "content-encoding", "content-language", "content-location"];

/// Runs the exchange and reports it. Runs on the I/O runtime.
pub(crate) async fn fetch(queue: Arc<Events>, request: FetchRequest) {
    let token = request.token;
    let timeout = request.timeout;
    let result = match tokio::time::timeout(timeout, follow(request.clone())).await {
        Ok(result) => result,
        Err(_) => Err(failed(
            FetchErrorKind::Timeout,
            format!("{} {} timed out after {timeout:?}", request.method, request.url),
        )),
    };
    queue.push(Event::Fetched { token, result });
}

/// The exchange, and those of the redirects it is answered with.
async fn follow(mut request: FetchRequest) -> Result<FetchResponse, FetchError> {
    let mut redirects = 0u32;
    loop {
        let mut response = exchange(&request).await?;
        response.redirected = redirects > 0;
        let Some(limit) = request.max_redirects else { return Ok(response) };
        let location = match response.status {
            301 | 302 | 303 | 307 | 308 => response
                .headers
                .iter()
                .find(|(name, _)| name == "location")
                .and_then(|(_, value)| std::str::from_utf8(value).ok())
                .map(str::trim),
            _ => None,
        };
        let Some(location) = location else { return Ok(response) };
        if redirects >= limit {
            return Err(failed(
                FetchErrorKind::TooManyRedirects,
                format!("{} {}: more than {limit} redirects", request.method, response.url),
            ));
        }
        redirects += 1;
        let next = join(&request.url, location);
        parse_target(&next, "http", "https").map_err(|e| {
            failed(FetchErrorKind::Invalid, format!("{} redirected to {location:?}: {e}", request.url))
        })?;
        let method = request.method.to_ascii_uppercase();
        if response.status == 303 && method != "HEAD"
            || matches!(response.status, 301 | 302) && method == "POST"
        {
            request.method = "GET".to_owned();
            request.body = Bytes::new();
            request.headers.retain(|(name, _)| !BODY_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h)));
        }
        if origin(&next) != origin(&request.url) {
            request.headers.retain(|(name, _)| !name.eq_ignore_ascii_case("authorization"));
        }
        request.url = next;
    }
}

/// `scheme://authority` of an absolute URL, lowercase.
fn origin(url: &str) -> String {
    let start = url.find("://").map_or(0, |at| at + 3);
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |at| start + at);
    url[..end].to_ascii_lowercase()
}

/// The absolute URL a `Location` names, relative to `base`.
fn join(base: &str, location: &str) -> String {
    let has_scheme = location.find(':').is_some_and(|at| {
        at > 0 && location[..at].bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    if has_scheme {
        return location.to_owned();
    }
    let base = base.split_once('#').map_or(base, |(before, _)| before);
    if location.starts_with("//") {
        let scheme = base.split_once(':').map_or("http", |(scheme, _)| scheme);
        return format!("{scheme}:{location}");
    }
    let origin_end = origin(base).len();
    let (origin, resource) = base.split_at(origin_end);
    if location.starts_with('/') {
        return format!("{origin}{location}");
    }
    let path = resource.split_once('?').map_or(resource, |(path, _)| path);
    if location.starts_with('?') || location.is_empty() {
        let path = if path.is_empty() { "/" } else { path };
        return format!("{origin}{path}{location}");
    }
    let directory = path.rfind('/').map_or("/", |at| &path[..=at]);
    format!("{origin}{directory}{location}")
}

/// One request on a new connection.
async fn exchange(request: &FetchRequest) -> Result<FetchResponse, FetchError> {
    let url = &request.url;
    let target = parse_target(url, "http", "https").map_err(|e| failed(FetchErrorKind::Invalid, e))?;
    let head = build(request, &target)?;
    let connect_timeout = request.connect_timeout;
    let timed_out = || {
        failed(FetchErrorKind::Timeout, format!("connecting to {url} timed out after {connect_timeout:?}"))
    };
    let stream =
        tokio::time::timeout(connect_timeout, TcpStream::connect((target.host.as_str(), target.port)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| failed(FetchErrorKind::Connect, format!("cannot connect to {url}: {e}")))?;
    let _ = stream.set_nodelay(true);
    if !target.tls {
        return send(stream, head, request).await;
    }
    let config = tls_config(request.ca_file.as_deref()).map_err(|e| failed(FetchErrorKind::Invalid, e))?;
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| failed(FetchErrorKind::Invalid, format!("{url}: bad TLS server name: {e}")))?;
    let session =
        tokio::time::timeout(connect_timeout, tokio_rustls::TlsConnector::from(config).connect(name, stream))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| failed(FetchErrorKind::Connect, format!("TLS error connecting to {url}: {e}")))?;
    send(session, head, request).await
}

/// The request hyper sends, checked before anything is connected.
fn build(request: &FetchRequest, target: &Target) -> Result<Request<Full<Bytes>>, FetchError> {
    let url = &request.url;
    let invalid = |what: String| failed(FetchErrorKind::Invalid, format!("{url}: {what}"));
    let method = Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| invalid(format!("{:?} is not an HTTP method", request.method)))?;
    let uri: hyper::Uri = target.resource.parse().map_err(|e| invalid(format!("bad path or query: {e}")))?;
    let has_body = !request.body.is_empty() || matches!(method, Method::POST | Method::PUT | Method::PATCH);
    let mut head = Request::builder().method(method).uri(uri);
    let headers = head.headers_mut().ok_or_else(|| invalid("bad request".to_owned()))?;
    let host = HeaderValue::from_str(&target.authority).map_err(|_| invalid("bad host".to_owned()))?;
    headers.insert(hyper::header::HOST, host);
    for (name, value) in &request.headers {
        if OWN_HEADERS.iter().any(|own| name.eq_ignore_ascii_case(own)) {
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("{name:?} is not a valid header name")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid(format!("the value of header {name:?} is not valid")))?;
        headers.append(name, value);
    }
    if has_body {
        headers.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(request.body.len()));
    }
    head.body(Full::new(request.body.clone())).map_err(|e| invalid(e.to_string()))
}

/// Sends `head` on `stream` and reads the whole response.
async fn send<S>(
    stream: S,
    head: Request<Full<Bytes>>,
    request: &FetchRequest,
) -> Result<FetchResponse, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let url = &request.url;
    let broken = |e: hyper::Error| failed(FetchErrorKind::Connect, format!("{url}: {}", describe(&e)));
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(broken)?;
    let limit = request.max_response_size;
    // The Content-Length of a HEAD's answer is that of the body a GET would get.
    let head_only = request.method.eq_ignore_ascii_case("HEAD");
    let work = async move {
        let response = sender.send_request(head).await.map_err(broken)?;
        let (parts, mut body) = response.into_parts();
        let too_large =
            || failed(FetchErrorKind::TooLarge, format!("{url}: the response body is over {limit} bytes"));
        let declared = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bodyless = head_only || matches!(parts.status.as_u16(), 100..=199 | 204 | 304);
        if !bodyless && declared.is_some_and(|length| length > limit as u64) {
            return Err(too_large());
        }
        let mut data = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(broken)?;
            if let Ok(chunk) = frame.into_data() {
                if data.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                data.extend_from_slice(&chunk);
            }
        }
        let headers = parts
            .headers
            .iter()
            .filter(|(name, _)| !HOP_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.as_str().to_owned(), Bytes::copy_from_slice(value.as_bytes())))
            .collect();
        Ok(FetchResponse {
            status: parts.status.as_u16(),
            headers,
            body: data.freeze(),
            url: url.clone(),
            redirected: false,
        })
    };
    let mut work = std::pin::pin!(work);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = &mut work => result,
        ended = &mut connection => match ended {
            // Closed once the response was delivered: what is left of it is in the body's channel.
            Ok(()) => work.await,
            Err(e) => Err(broken(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_locations() {
        assert_eq!(join("http://h/a/b?q", "https://x/y"), "https://x/y");
        assert_eq!(join("https://h/a/b", "//x/y"), "https://x/y");
        assert_eq!(join("http://h:8/a/b?q", "/c"), "http://h:8/c");
        assert_eq!(join("http://h/a/b?q", "c?d"), "http://h/a/c?d");
        assert_eq!(join("http://h/a/b?q", "?z"), "http://h/a/b?z");
        assert_eq!(join("http://h", "c"), "http://h/c");
        assert_eq!(join("http://h#f", "/c"), "http://h/c");
        assert_eq!(origin("HTTP://H:8/x"), "http://h:8");
    }

    #[test]
    fn parses_http_urls() {
        let t = parse_target("https://h:8443/a?b#frag", "http", "https").unwrap();
        assert!(t.tls && t.port == 8443 && t.resource == "/a?b");
        let t = parse_target("HTTP://h", "http", "https").unwrap();
        assert!(!t.tls && t.port == 80 && t.resource == "/");
        assert!(parse_target("ws://h/", "http", "https").is_err());
        assert!(parse_target("ftp://h/", "http", "https").is_err());
    }
}
