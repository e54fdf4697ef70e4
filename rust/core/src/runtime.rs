//! The tokio runtime of the core and the one function through which every task is spawned,
//! so that no task escapes accounting (clippy.toml bans `tokio::spawn` elsewhere).

use std::future::Future;

use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinHandle;

/// Builds the I/O runtime with `io_threads` workers.
///
/// # Errors
/// When the operating system refuses the threads.
pub fn build(io_threads: usize) -> std::io::Result<Runtime> {
    Builder::new_multi_thread()
        .worker_threads(io_threads.max(1))
        .thread_name("sockworker-io")
        .enable_all()
        .build()
}

/// Spawns a task on the current runtime.
#[allow(clippy::disallowed_methods)]
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(future)
}
