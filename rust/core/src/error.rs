//! The one error type of the core. The bindings map each variant to one Python exception.

use std::fmt;

#[derive(Debug)]
pub enum CoreError {
    /// Binding the listening socket or building the runtime failed.
    Io(std::io::Error),
    /// An argument from the application is out of range (close code, reason length, ...).
    InvalidArgument(String),
    /// The request was already answered (or the server dropped it).
    AlreadyAnswered,
    /// A WebSocket was returned for a request that is not a WebSocket upgrade.
    NotAnUpgrade,
    /// The operation needs an open socket.
    SocketClosed,
    /// A configured limit would be passed (hibernatable sockets per object).
    LimitExceeded(String),
    /// Durable Object storage failed: SQLite's message (bad SQL, a full disk, a corrupt file), or
    /// the store is closed.
    Storage(String),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::InvalidArgument(msg) | Self::LimitExceeded(msg) | Self::Storage(msg) => f.write_str(msg),
            Self::AlreadyAnswered => f.write_str("this request has already been answered"),
            Self::NotAnUpgrade => f.write_str(
                "a WebSocket can only be returned with status 101 for a WebSocket upgrade request",
            ),
            Self::SocketClosed => f.write_str("the WebSocket is closed"),
        }
    }
}

impl std::error::Error for CoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for CoreError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}
