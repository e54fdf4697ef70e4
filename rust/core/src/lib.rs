//! The sockworker core: owns every socket, the HTTP/1.1 upgrade, WebSocket framing and the limits.
//! It speaks Rust types only (events out, commands in); the bindings crate turns them into Python.

pub mod alarms;
pub mod bridge;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod deflate;
pub mod error;
pub mod event;
pub mod fetch;
pub mod frame;
pub mod gate;
pub mod handshake;
pub mod keys;
pub mod logs;
pub mod memory;
pub mod meter;
pub mod metrics;
pub mod object;
pub mod protocol;
pub mod reactor;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod socket;
pub mod stats;
pub mod storage;
pub mod tls;
pub mod watchdog;

pub use bridge::EventQueue;
pub use client::ConnectRequest;
pub use config::{Limits, ServerConfig};
pub use error::CoreError;
pub use event::{
    Answer, Answering, BodyWriter, Event, Events, FetchError, FetchErrorKind, FetchResponse, PendingRequest,
    Reply, RequestBody, Written,
};
pub use fetch::FetchRequest;
pub use frame::Payload;
pub use meter::{Label, Meter, Slot, Unit};
pub use object::{ObjectRegistry, ObjectShared, SocketMeta};
pub use server::Server;
pub use socket::{SendOutcome, SocketShared};
pub use storage::{Durability, StorageConfig, Store};
