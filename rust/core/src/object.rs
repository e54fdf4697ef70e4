//! What the core keeps of a Durable Object so that it can hibernate: its hibernatable sockets
//! with their tags, attachments and auto-response stamps, and its auto-response pairs. None of
//! it is Python; a hibernated object's sockets are served from here (pings, auto-responses,
//! broadcast, counts) without waking anything.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::bridge::Payload;
use crate::error::CoreError;
use crate::frame;
use crate::socket::SocketShared;

pub const MAX_TAGS: usize = 10;
pub const MAX_TAG_CHARS: usize = 256;
pub const MAX_ATTACHMENT_BYTES: usize = 16 * 1024;

/// Per-socket state that survives hibernation.
#[derive(Debug, Default)]
pub struct SocketMeta {
    pub tags: Vec<String>,
    pub attachment: Option<Bytes>,
    /// When the core last answered an auto-response on this socket (seconds since the epoch).
    pub auto_response_at: Option<f64>,
    pub url: String,
    pub protocol: String,
    pub object: Option<Arc<ObjectShared>>,
}

pub struct ObjectShared {
    key: u64,
    max_sockets: usize,
    sockets: Mutex<Vec<Arc<SocketShared>>>,
    /// (request, encoded response frame) pairs answered by the core.
    auto_responses: RwLock<Vec<(Payload, Bytes)>>,
    has_auto_responses: AtomicBool,
}

impl std::fmt::Debug for ObjectShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectShared").field("key", &self.key).finish_non_exhaustive()
    }
}

static NEXT_OBJECT_KEY: AtomicU64 = AtomicU64::new(1);

fn now_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn check_tags(tags: &[String]) -> Result<(), CoreError> {
    if tags.len() > MAX_TAGS {
        return Err(CoreError::InvalidArgument(format!("at most {MAX_TAGS} tags per WebSocket")));
    }
    if let Some(tag) = tags.iter().find(|t| t.chars().count() > MAX_TAG_CHARS || t.is_empty()) {
        return Err(CoreError::InvalidArgument(format!(
            "a tag has 1 to {MAX_TAG_CHARS} characters (got {})",
            tag.chars().count()
        )));
    }
    Ok(())
}

impl ObjectShared {
    #[must_use]
    pub fn new(max_sockets: usize) -> Self {
        Self {
            key: NEXT_OBJECT_KEY.fetch_add(1, Ordering::Relaxed),
            max_sockets,
            sockets: Mutex::new(Vec::new()),
            auto_responses: RwLock::new(Vec::new()),
            has_auto_responses: AtomicBool::new(false),
        }
    }

    /// Identifies the object in events about its sockets.
    #[must_use]
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Checks that `more` sockets could still be accepted, and the tags.
    ///
    /// # Errors
    /// `InvalidArgument` for bad tags, `LimitExceeded` when the object is full.
    pub fn check_accept(&self, more: usize, tags: &[String]) -> Result<(), CoreError> {
        check_tags(tags)?;
        if self.sockets.lock().len() + more > self.max_sockets {
            return Err(CoreError::LimitExceeded(format!(
                "an object holds at most {} hibernatable WebSockets",
                self.max_sockets
            )));
        }
        Ok(())
    }

    /// Makes `socket` a hibernatable socket of this object.
    ///
    /// # Errors
    /// As [`Self::check_accept`].
    pub fn adopt(self: &Arc<Self>, socket: &Arc<SocketShared>, tags: Vec<String>) -> Result<(), CoreError> {
        self.check_accept(1, &tags)?;
        {
            let mut meta = socket.meta();
            meta.tags = tags;
            meta.object = Some(self.clone());
        }
        self.sockets.lock().push(socket.clone());
        Ok(())
    }

    pub(crate) fn forget(&self, socket_id: u64) {
        self.sockets.lock().retain(|s| s.id() != socket_id);
    }

    /// Open sockets of this object, with `tag` if given, in the order they were accepted.
    #[must_use]
    pub fn sockets(&self, tag: Option<&str>) -> Vec<Arc<SocketShared>> {
        self.sockets.lock().iter().filter(|s| s.is_open() && s.has_tag(tag)).cloned().collect()
    }

    #[must_use]
    pub fn count(&self, tag: Option<&str>) -> usize {
        self.sockets.lock().iter().filter(|s| s.is_open() && s.has_tag(tag)).count()
    }

    /// Encodes the message once and queues it on every matching socket; returns how many.
    /// With permessage-deflate, compressed once too, for the sockets that compress.
    pub fn broadcast(&self, text: bool, data: &[u8], tag: Option<&str>, exclude: Option<u64>) -> usize {
        let frame = frame::encode_message(text, data);
        let mut compressed: Option<Bytes> = None;
        let sockets = self.sockets.lock();
        let mut sent = 0;
        for socket in sockets.iter() {
            if Some(socket.id()) == exclude || !socket.has_tag(tag) {
                continue;
            }
            let encoded = if socket.deflate().is_some_and(|d| d.compresses(data.len())) {
                compressed.get_or_insert_with(|| frame::encode_compressed(text, data)).clone()
            } else {
                frame.clone()
            };
            if socket.send_frame(encoded).is_queued() {
                sent += 1;
            }
        }
        sent
    }

    pub fn set_auto_responses(&self, pairs: Vec<(Payload, Payload)>) {
        let encoded: Vec<(Payload, Bytes)> = pairs
            .into_iter()
            .map(|(request, response)| {
                let frame = match &response {
                    Payload::Text(b) => frame::encode_message(true, b),
                    Payload::Binary(b) => frame::encode_message(false, b),
                };
                (request, frame)
            })
            .collect();
        self.has_auto_responses.store(!encoded.is_empty(), Ordering::Release);
        *self.auto_responses.write() = encoded;
    }

    /// The encoded answer when `message` is an auto-response request.
    pub(crate) fn auto_response(&self, message: &Payload) -> Option<Bytes> {
        if !self.has_auto_responses.load(Ordering::Acquire) {
            return None;
        }
        self.auto_responses
            .read()
            .iter()
            .find(|(request, _)| request == message)
            .map(|(_, frame)| frame.clone())
    }
}

impl SocketShared {
    /// Answers `message` from its object's auto-response pairs, stamping the socket.
    pub(crate) fn auto_response(&self, message: &Payload) -> Option<Bytes> {
        let mut meta = self.meta_if_any()?;
        let frame = meta.object.as_ref()?.auto_response(message)?;
        meta.auto_response_at = Some(now_seconds());
        Some(frame)
    }

    fn has_tag(&self, tag: Option<&str>) -> bool {
        tag.is_none_or(|tag| self.meta_if_any().is_some_and(|m| m.tags.iter().any(|t| t == tag)))
    }

    /// Stores the serialized attachment (at most 16 KiB).
    ///
    /// # Errors
    /// `InvalidArgument` past 16 KiB.
    pub fn set_attachment(&self, attachment: Option<Bytes>) -> Result<(), CoreError> {
        if attachment.as_ref().is_some_and(|a| a.len() > MAX_ATTACHMENT_BYTES) {
            return Err(CoreError::InvalidArgument(format!(
                "a serialized attachment is at most {MAX_ATTACHMENT_BYTES} bytes"
            )));
        }
        self.meta().attachment = attachment;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use std::collections::VecDeque;

    fn socket(id: u64) -> Arc<SocketShared> {
        Arc::new(SocketShared::new(id, Arc::new(Limits::default())))
    }

    fn queued(socket: &SocketShared) -> usize {
        let mut out = VecDeque::new();
        let _ = socket.take_queued(&mut out, &mut false);
        out.len()
    }

    #[test]
    fn broadcast_honours_tag_and_exclude_and_encodes_once() {
        let object = Arc::new(ObjectShared::new(10));
        let sockets: Vec<_> = (1..=4).map(socket).collect();
        for (i, s) in sockets.iter().enumerate() {
            let tags = if i % 2 == 0 { vec!["even".to_owned()] } else { vec![] };
            object.adopt(s, tags).unwrap();
        }
        assert_eq!(object.broadcast(true, b"hi", None, Some(2)), 3);
        assert_eq!(sockets.iter().map(|s| queued(s)).collect::<Vec<_>>(), [1, 0, 1, 1]);
        assert_eq!(object.broadcast(true, b"hi", Some("even"), Some(1)), 1);
        assert_eq!(sockets.iter().map(|s| queued(s)).collect::<Vec<_>>(), [0, 0, 1, 0]);
        assert_eq!(object.count(Some("even")), 2);
        sockets[2].close(1000, "");
        assert_eq!(object.count(Some("even")), 1, "closing sockets are not counted");
    }

    #[test]
    fn limits_on_tags_sockets_and_attachments() {
        let object = Arc::new(ObjectShared::new(1));
        let many: Vec<String> = (0..11).map(|i| i.to_string()).collect();
        assert!(matches!(object.adopt(&socket(1), many), Err(CoreError::InvalidArgument(_))));
        assert!(matches!(
            object.adopt(&socket(1), vec!["x".repeat(257)]),
            Err(CoreError::InvalidArgument(_))
        ));
        object.adopt(&socket(1), vec!["é".repeat(256)]).unwrap();
        assert!(matches!(object.adopt(&socket(2), vec![]), Err(CoreError::LimitExceeded(_))));
        let s = socket(3);
        assert!(s.set_attachment(Some(Bytes::from(vec![0; 16 * 1024]))).is_ok());
        assert!(s.set_attachment(Some(Bytes::from(vec![0; 16 * 1024 + 1]))).is_err());
    }

    #[test]
    fn auto_response_matches_kind_and_stamps() {
        let object = Arc::new(ObjectShared::new(10));
        let s = socket(1);
        object.adopt(&s, vec![]).unwrap();
        object.set_auto_responses(vec![(
            Payload::Text(Bytes::from_static(b"ping")),
            Payload::Text(Bytes::from_static(b"pong")),
        )]);
        assert!(s.auto_response(&Payload::Binary(Bytes::from_static(b"ping"))).is_none());
        assert_eq!(s.meta().auto_response_at, None);
        let frame = s.auto_response(&Payload::Text(Bytes::from_static(b"ping"))).unwrap();
        assert_eq!(&frame[..], &[0x81, 4, b'p', b'o', b'n', b'g']);
        assert!(s.meta().auto_response_at.is_some());
    }
}
