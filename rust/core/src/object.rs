//! What the core keeps of a Durable Object so that it can hibernate: its hibernatable sockets
//! with their tags, attachments and auto-response stamps, and its auto-response pairs. None of
//! it is Python; a hibernated object's sockets are served from here (pings, auto-responses,
//! broadcast, counts) without waking anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::error::CoreError;
use crate::frame::{self, Payload};
use crate::socket::SocketShared;
use crate::storage::ObjectName;

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
    /// The object whose hibernatable socket this is.
    pub object: Option<Arc<ObjectShared>>,
    /// The key of the object that accepted or opened this socket (hibernatable or not).
    pub owner: Option<u64>,
}

/// The core state of the objects that have any (sockets, or a live host in the application),
/// by name, so that an object's host made anew after hibernation finds its sockets.
#[derive(Default)]
pub struct ObjectRegistry {
    objects: Mutex<HashMap<Arc<ObjectName>, Weak<ObjectShared>>>,
    /// Objects forgotten so far (the memory they held is free to return to the system).
    forgotten: AtomicU64,
}

impl ObjectRegistry {
    /// The state of `name`, made if it has none alive.
    pub fn get_or_make(self: &Arc<Self>, name: ObjectName, max_sockets: usize) -> Arc<ObjectShared> {
        let mut objects = self.objects.lock();
        if let Some(object) = objects.get(&name).and_then(Weak::upgrade) {
            return object;
        }
        let name = Arc::new(name);
        let object = Arc::new(ObjectShared::new(max_sockets, Some((name.clone(), Arc::downgrade(self)))));
        objects.insert(name, Arc::downgrade(&object));
        object
    }

    /// Objects with core state alive now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.objects.lock().len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn forget(&self, name: &ObjectName) {
        let mut objects = self.objects.lock();
        if objects.get(name).is_some_and(|object| object.strong_count() == 0) {
            objects.remove(name);
            self.forgotten.fetch_add(1, Ordering::Relaxed);
            crate::memory::shrink_sparse(&mut objects, 64);
        }
    }

    /// Every object with core state alive now.
    #[must_use]
    pub fn all(&self) -> Vec<Arc<ObjectShared>> {
        self.objects.lock().values().filter_map(Weak::upgrade).collect()
    }

    /// Objects forgotten since the registry was made.
    #[must_use]
    pub fn forgotten(&self) -> u64 {
        self.forgotten.load(Ordering::Relaxed)
    }
}

pub struct ObjectShared {
    key: u64,
    /// Its name, and the registry that forgets it when it goes (`None` for a bare object).
    name: Option<(Arc<ObjectName>, Weak<ObjectRegistry>)>,
    max_sockets: usize,
    sockets: Mutex<Vec<Arc<SocketShared>>>,
    /// (request, response, encoded response frame) answered by the core.
    auto_responses: RwLock<Vec<(Payload, Payload, Bytes)>>,
    has_auto_responses: AtomicBool,
    /// `set_hibernatable_websocket_event_timeout`, in ms (0: none).
    event_timeout_ms: AtomicU64,
    /// The name the id was made from (`id_from_name`), if known: it survives hibernation.
    id_name: std::sync::OnceLock<Box<str>>,
    /// The application has a host (an instance) for it now; else it is hibernated (for the
    /// metrics).
    resident: AtomicBool,
}

impl Drop for ObjectShared {
    fn drop(&mut self) {
        if let Some((name, registry)) = &self.name {
            if let Some(registry) = registry.upgrade() {
                registry.forget(name);
            }
        }
    }
}

impl std::fmt::Debug for ObjectShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectShared").field("key", &self.key).finish_non_exhaustive()
    }
}

static NEXT_OBJECT_KEY: AtomicU64 = AtomicU64::new(1);

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
    fn new(max_sockets: usize, name: Option<(Arc<ObjectName>, Weak<ObjectRegistry>)>) -> Self {
        Self {
            key: NEXT_OBJECT_KEY.fetch_add(1, Ordering::Relaxed),
            name,
            max_sockets,
            sockets: Mutex::new(Vec::new()),
            auto_responses: RwLock::new(Vec::new()),
            has_auto_responses: AtomicBool::new(false),
            event_timeout_ms: AtomicU64::new(0),
            id_name: std::sync::OnceLock::new(),
            resident: AtomicBool::new(false),
        }
    }

    /// The application made (true) or dropped (false) its host for the object.
    pub fn set_resident(&self, resident: bool) {
        self.resident.store(resident, Ordering::Relaxed);
    }

    #[must_use]
    pub fn is_resident(&self) -> bool {
        self.resident.load(Ordering::Relaxed)
    }

    /// Records the name the id was made from (the first one given is kept).
    pub fn set_id_name(&self, name: &str) {
        let _ = self.id_name.set(name.into());
    }

    #[must_use]
    pub fn id_name(&self) -> Option<&str> {
        self.id_name.get().map(|name| &**name)
    }

    /// An object known by no registry (the tests of the core).
    #[must_use]
    pub fn bare(max_sockets: usize) -> Self {
        Self::new(max_sockets, None)
    }

    /// (namespace, object id), for an object of a registry.
    #[must_use]
    pub fn name(&self) -> Option<&ObjectName> {
        self.name.as_ref().map(|(name, _)| &**name)
    }

    pub fn set_event_timeout_ms(&self, ms: Option<u64>) {
        self.event_timeout_ms.store(ms.unwrap_or(0), Ordering::Relaxed);
    }

    #[must_use]
    pub fn event_timeout_ms(&self) -> Option<u64> {
        Some(self.event_timeout_ms.load(Ordering::Relaxed)).filter(|&ms| ms != 0)
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
            meta.owner = Some(self.key);
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

    /// The open sockets a broadcast with `tag` and `exclude` goes to.
    #[must_use]
    pub fn matching(&self, tag: Option<&str>, exclude: Option<u64>) -> Vec<Arc<SocketShared>> {
        let sockets = self.sockets.lock();
        sockets.iter().filter(|s| Some(s.id()) != exclude && s.is_open() && s.has_tag(tag)).cloned().collect()
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
        let encoded: Vec<(Payload, Payload, Bytes)> = pairs
            .into_iter()
            .map(|(request, response)| {
                let frame = match &response {
                    Payload::Text(b) => frame::encode_message(true, b),
                    Payload::Binary(b) => frame::encode_message(false, b),
                };
                (request, response, frame)
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
            .find(|(request, _, _)| request == message)
            .map(|(_, _, frame)| frame.clone())
    }

    /// The auto-response pairs, as they were set.
    #[must_use]
    pub fn auto_responses(&self) -> Vec<(Payload, Payload)> {
        self.auto_responses
            .read()
            .iter()
            .map(|(request, response, _)| (request.clone(), response.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::socket::WriteQueue;

    fn socket(id: u64) -> Arc<SocketShared> {
        Arc::new(SocketShared::new(id, Arc::new(Limits::default())))
    }

    fn queued(socket: &SocketShared) -> usize {
        let mut out = WriteQueue::default();
        let _ = socket.take_queued(&mut out);
        out.frames.len()
    }

    #[test]
    fn broadcast_honours_tag_and_exclude_and_encodes_once() {
        let object = Arc::new(ObjectShared::bare(10));
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
        let object = Arc::new(ObjectShared::bare(1));
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
        let object = Arc::new(ObjectShared::bare(10));
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
