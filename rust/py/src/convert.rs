//! Core events to Python tuples, a whole batch under one GIL acquisition.
//! Tuple shapes (the first item is the kind):
//!   (REQUEST, reply, method, target, headers: list[(str, bytes)], body, peer, RequestFeed | None)
//!   (MESSAGE, socket_id, str | bytes)
//!   (CLOSE, socket_id, code, reason, was_clean, SocketHandle of an object's socket | None)
//!   (ERROR, socket_id, message)
//!   (DRAINED, socket_id)
//!   (ALL_CLOSED,)
//!   (CONNECTED, token, SocketHandle | None, protocol, error message | None)
//!   (ALARM, namespace, object_id, id name | None, retry)
//!   (RELEASED, token, ok)
//!   (COMMIT_FAILED, owner key, message)
//!   (BODY, stream id, open)
//!   (REQUEST_BODY, feed id, bytes | None at the end, error message | None)
//!   (FETCHED, token, (status, headers: list[(str, bytes)], body, url, redirected) | None,
//!    (error kind, message) | None)

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use sockworker_core::{Event, Slot};

use crate::message::to_python;
use crate::reply::{PendingReply, RequestFeed};
use crate::socket::SocketHandle;

const REQUEST: u8 = 0;
const MESSAGE: u8 = 1;
const CLOSE: u8 = 2;
const ERROR: u8 = 3;
const DRAINED: u8 = 4;
const ALL_CLOSED: u8 = 5;
const CONNECTED: u8 = 6;
const ALARM: u8 = 7;
const RELEASED: u8 = 8;
const COMMIT_FAILED: u8 = 9;
const BODY: u8 = 10;
const REQUEST_BODY: u8 = 11;
const FETCHED: u8 = 12;

pub fn add_event_kinds(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for (name, value) in [
        ("EV_REQUEST", REQUEST),
        ("EV_MESSAGE", MESSAGE),
        ("EV_CLOSE", CLOSE),
        ("EV_ERROR", ERROR),
        ("EV_DRAINED", DRAINED),
        ("EV_ALL_CLOSED", ALL_CLOSED),
        ("EV_CONNECTED", CONNECTED),
        ("EV_ALARM", ALARM),
        ("EV_RELEASED", RELEASED),
        ("EV_COMMIT_FAILED", COMMIT_FAILED),
        ("EV_BODY", BODY),
        ("EV_REQUEST_BODY", REQUEST_BODY),
        ("EV_FETCHED", FETCHED),
        ("EV_STEP", STEP),
    ] {
        m.add(name, value)?;
    }
    Ok(())
}

/// Who an event of a batch is billed to, relative to the event before it.
pub enum EventSlot {
    /// The same slot as the previous event (the common case: no reference count touched).
    Same,
    /// Nobody (a request before its account is known, our own events).
    Unbilled,
    Slot(Arc<Slot>),
}

/// The events as tuples, each with the meter slot it is billed to (as the event carries it).
pub fn events_to_vec(py: Python<'_>, events: Vec<Event>) -> Vec<(Py<PyAny>, EventSlot, u8)> {
    let mut out = Vec::with_capacity(events.len());
    // The previous event's slot, by address (0: none; 1: not known yet).
    let mut previous = 1usize;
    for mut event in events {
        // (The event's tuple does not need its slot: it is moved out, not cloned.)
        let slot = match &mut event {
            Event::Message { slot, .. } | Event::Close { slot, .. } | Event::Error { slot, .. } => {
                slot.take()
            }
            _ => None,
        };
        let key = slot.as_ref().map_or(0, |slot| Arc::as_ptr(slot) as usize);
        let billed = match slot {
            // A run of events of one slot (the common case) hands out no slot after its first.
            // (Never for unbilled events: a request relabels its run once it knows its account.)
            _ if key == previous && key != 0 => EventSlot::Same,
            Some(slot) => EventSlot::Slot(slot),
            None => EventSlot::Unbilled,
        };
        previous = key;
        let kind = kind_of(&event);
        match event_tuple(py, event) {
            Ok(tuple) => out.push((tuple.unbind(), billed, kind)),
            // Only a failed allocation gets here: the event is lost, and said so.
            Err(error) => error.print(py),
        }
    }
    out
}

/// The kind code of an event (the first item of its tuple).
fn kind_of(event: &Event) -> u8 {
    match event {
        Event::Request(_) => REQUEST,
        Event::Message { .. } => MESSAGE,
        Event::Close { .. } => CLOSE,
        Event::Error { .. } => ERROR,
        Event::Drained { .. } => DRAINED,
        Event::AllClosed => ALL_CLOSED,
        Event::Connected { .. } => CONNECTED,
        Event::Alarm { .. } => ALARM,
        Event::Released { .. } => RELEASED,
        Event::CommitFailed { .. } => COMMIT_FAILED,
        Event::Body { .. } => BODY,
        Event::RequestBody { .. } => REQUEST_BODY,
        Event::Fetched { .. } => FETCHED,
    }
}

/// The kind code of an async step (for the watchdog's report of a blocked loop).
pub const STEP: u8 = 255;

fn event_tuple(py: Python<'_>, event: Event) -> PyResult<Bound<'_, PyAny>> {
    Ok({
        match event {
            Event::Message { socket, data, .. } => {
                (MESSAGE, socket, to_python(py, &data)).into_pyobject(py)?.into_any()
            }
            Event::Request(request) => {
                let headers = PyList::empty(py);
                for (name, value) in &request.headers {
                    headers.append((name.as_str(), PyBytes::new(py, value)))?;
                }
                let reply = Bound::new(py, PendingReply::new(request.reply))?;
                let feed = request.feed.map(|body| RequestFeed { body });
                (
                    REQUEST,
                    reply,
                    request.method,
                    request.target,
                    headers,
                    PyBytes::new(py, &request.body),
                    request.peer.to_string(),
                    feed,
                )
                    .into_pyobject(py)?
                    .into_any()
            }
            Event::Close { socket, code, reason, was_clean, object_socket, .. } => {
                let handle = object_socket.map(|socket| SocketHandle { socket });
                (CLOSE, socket, code, reason, was_clean, handle).into_pyobject(py)?.into_any()
            }
            Event::Error { socket, message, .. } => (ERROR, socket, message).into_pyobject(py)?.into_any(),
            Event::Drained { socket } => (DRAINED, socket).into_pyobject(py)?.into_any(),
            Event::AllClosed => (ALL_CLOSED,).into_pyobject(py)?.into_any(),
            Event::Alarm { namespace, object_id, id_name, retry } => {
                (ALARM, namespace, object_id, id_name, retry).into_pyobject(py)?.into_any()
            }
            Event::Released { token, ok } => (RELEASED, token, ok).into_pyobject(py)?.into_any(),
            Event::CommitFailed { owner, message } => {
                (COMMIT_FAILED, owner, message).into_pyobject(py)?.into_any()
            }
            Event::Body { stream, open } => (BODY, stream, open).into_pyobject(py)?.into_any(),
            Event::RequestBody { feed, data } => match data {
                Ok(data) => (REQUEST_BODY, feed, data.map(|data| PyBytes::new(py, &data)), None::<String>)
                    .into_pyobject(py)?
                    .into_any(),
                Err(why) => {
                    (REQUEST_BODY, feed, None::<Bound<'_, PyBytes>>, Some(why)).into_pyobject(py)?.into_any()
                }
            },
            Event::Connected { token, result } => match result {
                Ok((socket, protocol)) => {
                    (CONNECTED, token, Some(SocketHandle { socket }), protocol, None::<String>)
                        .into_pyobject(py)?
                        .into_any()
                }
                Err(error) => {
                    (CONNECTED, token, None::<SocketHandle>, "", Some(error)).into_pyobject(py)?.into_any()
                }
            },
            Event::Fetched { token, result } => match result {
                Ok(response) => {
                    let headers = PyList::empty(py);
                    for (name, value) in &response.headers {
                        headers.append((name.as_str(), PyBytes::new(py, value)))?;
                    }
                    let body = PyBytes::new(py, &response.body);
                    let answer = (response.status, headers, body, response.url, response.redirected);
                    (FETCHED, token, Some(answer), None::<(&str, String)>).into_pyobject(py)?.into_any()
                }
                Err(error) => {
                    let failure = Some((error.kind.name(), error.message));
                    (FETCHED, token, None::<(u16, Vec<u8>, Vec<u8>, String, bool)>, failure)
                        .into_pyobject(py)?
                        .into_any()
                }
            },
        }
    })
}
