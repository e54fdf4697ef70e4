//! The private module `sockworker._native`: converts between the core's Rust types and Python.
//! This crate is the one place where the GIL boundary is crossed; it holds no server logic.

mod convert;
mod errors;
mod logs;
mod message;
mod meter;
mod object;
mod reactor;
mod reply;
mod server;
mod socket;
mod step;
mod storage;

use pyo3::prelude::*;
use sockworker_core::frame;
use sockworker_core::socket::SendOutcome;

/// Raises `InvalidArgument` for a close code (RFC 6455 §7.4) or reason the core would not send.
#[pyfunction]
fn check_close(code: i64, reason: &str) -> errors::Result<()> {
    frame::check_close(code, reason).map_err(|why| sockworker_core::CoreError::InvalidArgument(why).into())
}

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

/// jemalloc's totals in bytes: allocated, active, resident, metadata, mapped (the metrics page's
/// memory gauges).
#[pyfunction]
fn allocator_stats() -> (u64, u64, u64, u64, u64) {
    let s = sockworker_core::memory::stats();
    (s.allocated, s.active, s.resident, s.metadata, s.mapped)
}

/// jemalloc's live allocations by size class, `(size, count)` (bench/memory.py's breakdown).
#[pyfunction]
fn allocator_size_classes() -> Vec<(u64, u64)> {
    sockworker_core::memory::size_classes().into_iter().map(|c| (c.size, c.count)).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::check(m.py());
    m.add_class::<reactor::Reactor>()?;
    m.add_class::<server::Server>()?;
    m.add_class::<step::Metered>()?;
    m.add_class::<reply::PendingReply>()?;
    m.add_class::<reply::ResponseStream>()?;
    m.add_class::<reply::RequestFeed>()?;
    m.add("STREAM_ROOM", reply::STREAM_ROOM)?;
    m.add("STREAM_FULL", reply::STREAM_FULL)?;
    m.add("STREAM_GONE", reply::STREAM_GONE)?;
    m.add_class::<server::Batch>()?;
    m.add_class::<meter::Meter>()?;
    m.add_class::<meter::Slot>()?;
    meter::add_units(m)?;
    m.add_class::<socket::SocketHandle>()?;
    m.add_class::<socket::SocketLimits>()?;
    m.add_class::<object::ObjectState>()?;
    m.add_class::<storage::Store>()?;
    // The core's facts, read by Python rather than repeated there.
    for (name, value) in [
        ("STORAGE_MAX_KEY_BYTES", sockworker_core::storage::MAX_KEY_BYTES),
        ("STORAGE_MAX_VALUE_BYTES", sockworker_core::storage::MAX_VALUE_BYTES),
        ("STORAGE_MAX_KEYS_PER_CALL", sockworker_core::storage::MAX_KEYS_PER_CALL),
        ("MAX_TAGS", sockworker_core::object::MAX_TAGS),
        ("MAX_TAG_CHARS", sockworker_core::object::MAX_TAG_CHARS),
        ("MAX_ATTACHMENT_BYTES", sockworker_core::object::MAX_ATTACHMENT_BYTES),
        ("MAX_CLOSE_REASON_BYTES", frame::MAX_CLOSE_REASON_BYTES),
    ] {
        m.add(name, value)?;
    }
    for (name, outcome) in [
        ("SEND_QUEUED", SendOutcome::Queued),
        ("SEND_DROPPED", SendOutcome::Dropped),
        ("SEND_OVERFLOW", SendOutcome::Overflow),
    ] {
        m.add(name, outcome as u8)?;
    }
    for (name, code) in [
        ("CLOSE_NORMAL", frame::close_code::NORMAL),
        ("CLOSE_GOING_AWAY", frame::close_code::GOING_AWAY),
        ("CLOSE_PROTOCOL_ERROR", frame::close_code::PROTOCOL_ERROR),
        ("CLOSE_NO_STATUS", frame::close_code::NO_STATUS),
        ("CLOSE_ABNORMAL", frame::close_code::ABNORMAL),
        ("CLOSE_INVALID_PAYLOAD", frame::close_code::INVALID_PAYLOAD),
        ("CLOSE_POLICY_VIOLATION", frame::close_code::POLICY_VIOLATION),
        ("CLOSE_TOO_BIG", frame::close_code::TOO_BIG),
        ("CLOSE_INTERNAL_ERROR", frame::close_code::INTERNAL_ERROR),
    ] {
        m.add(name, code)?;
    }
    m.add_function(wrap_pyfunction!(check_close, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_stats, m)?)?;
    m.add_function(wrap_pyfunction!(allocator_size_classes, m)?)?;
    m.add("LIMIT_DEFAULTS", socket::limit_defaults(m.py())?)?;
    convert::add_event_kinds(m)?;
    m.add_function(wrap_pyfunction!(logs::install_log_queue, m)?)?;
    m.add_function(wrap_pyfunction!(logs::take_log_records, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
