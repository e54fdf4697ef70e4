//! The open sockets of a server, by id: the one map every socket is registered in from its
//! upgrade (or connect) to its close, and the server's shutting-down flag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::Limits;
use crate::deflate::Deflate;
use crate::socket::SocketShared;

pub struct Registry {
    sockets: Mutex<HashMap<u64, Arc<SocketShared>>>,
    next_socket: AtomicU64,
    shutting_down: AtomicBool,
    /// Sockets registered from now on count their own traffic (the access log).
    traffic: AtomicBool,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            sockets: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            traffic: AtomicBool::new(false),
        }
    }
}

impl Registry {
    /// Sockets registered from now on count their messages and bytes ([`crate::stats::Traffic`]).
    pub fn count_traffic(&self) {
        self.traffic.store(true, Ordering::Relaxed);
    }

    #[must_use]
    pub fn open_sockets(&self) -> usize {
        self.sockets.lock().len()
    }

    #[must_use]
    pub fn socket(&self, id: u64) -> Option<Arc<SocketShared>> {
        self.sockets.lock().get(&id).cloned()
    }

    /// Every open socket.
    #[must_use]
    pub fn all(&self) -> Vec<Arc<SocketShared>> {
        self.sockets.lock().values().cloned().collect()
    }

    /// Registers a new socket held to `limits` (`client`: an outgoing one, whose frames are
    /// masked; `deflate`: permessage-deflate as negotiated).
    pub fn register(&self, limits: Arc<Limits>, deflate: Option<Deflate>, client: bool) -> Arc<SocketShared> {
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        let socket = if client {
            SocketShared::new_client(id, limits)
        } else {
            SocketShared::new(id, limits).with_deflate(deflate)
        };
        // (Accepted sockets only: the access log is of what clients did.)
        let counted = !client && self.traffic.load(Ordering::Relaxed);
        let socket = Arc::new(if counted { socket.with_traffic() } else { socket });
        self.sockets.lock().insert(id, socket.clone());
        socket
    }

    /// Forgets a socket; returns it (if it was registered) and how many remain.
    pub fn remove(&self, id: u64) -> (Option<Arc<SocketShared>>, usize) {
        let mut sockets = self.sockets.lock();
        let socket = sockets.remove(&id);
        crate::memory::shrink_sparse(&mut sockets, 1024);
        (socket, sockets.len())
    }

    /// Sockets registered so far (each one closed since frees what it held).
    #[must_use]
    pub fn registered(&self) -> u64 {
        self.next_socket.load(Ordering::Relaxed) - 1
    }

    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
}
