//! The sockworker core: owns every socket, the HTTP/1.1 upgrade, WebSocket framing and the limits.
//! It speaks Rust types only (events out, commands in); the bindings crate turns them into Python.

pub mod bridge;
pub mod client;
pub mod config;
pub mod connection;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod meter;
pub mod object;
pub mod runtime;
pub mod server;
pub mod socket;
pub mod tls;
pub mod watchdog;

pub use bridge::{Event, EventQueue, Payload};
pub use client::ConnectRequest;
pub use config::{Limits, ServerConfig};
pub use error::CoreError;
pub use meter::{Label, Meter, Slot, Unit};
pub use object::{ObjectShared, SocketMeta};
pub use server::{Answer, PendingRequest, Reply, Server};
pub use socket::{SendOutcome, SocketShared};
