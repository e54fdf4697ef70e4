//! The private module `sockworker._native`: converts between the core's Rust types and Python.
//! This crate is the one place where the GIL boundary is crossed; it holds no server logic.

mod convert;
mod errors;
mod logs;
mod meter;
mod object;
mod reactor;
mod server;
mod socket;
mod storage;

use pyo3::prelude::*;

/// The Rust side's allocator, which SQLite uses too (`sockworker_core::storage`): jemalloc hands
/// the pages it frees back to the system, where glibc's malloc kept what closed sockets and
/// hibernated objects freed, fragmented (30 KB of RSS per hibernated object with storage, 3.6 KB
/// after `malloc_trim`, 1.8 KB with jemalloc; bench/storage.py, 2,000 objects).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`): a background thread purges free pages after a second,
/// so no request pays for it, and nothing is kept "muzzy".
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &u8 = &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<reactor::Reactor>()?;
    m.add_class::<server::Server>()?;
    m.add_class::<server::PendingReply>()?;
    m.add_class::<server::Batch>()?;
    m.add_class::<meter::Meter>()?;
    m.add_class::<meter::Slot>()?;
    meter::add_units(m)?;
    m.add_class::<socket::SocketHandle>()?;
    m.add_class::<socket::SocketLimits>()?;
    m.add_class::<object::ObjectState>()?;
    m.add_class::<storage::Store>()?;
    for (name, value) in [
        ("STORAGE_MAX_KEY_BYTES", sockworker_core::storage::MAX_KEY_BYTES),
        ("STORAGE_MAX_VALUE_BYTES", sockworker_core::storage::MAX_VALUE_BYTES),
        ("STORAGE_MAX_KEYS_PER_CALL", sockworker_core::storage::MAX_KEYS_PER_CALL),
    ] {
        m.add(name, value)?;
    }
    convert::add_event_kinds(m)?;
    m.add_function(wrap_pyfunction!(logs::install_log_queue, m)?)?;
    m.add_function(wrap_pyfunction!(logs::take_log_records, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
