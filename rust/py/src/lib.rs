//! The private module `sockworker._native`: converts between the core's Rust types and Python.
//! This crate is the one place where the GIL boundary is crossed; it holds no server logic.

mod convert;
mod errors;
mod logs;
mod meter;
mod object;
mod server;
mod socket;
mod storage;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<server::Server>()?;
    m.add_class::<server::PendingReply>()?;
    m.add_class::<server::Batch>()?;
    m.add_class::<meter::Meter>()?;
    m.add_class::<meter::Slot>()?;
    meter::add_units(m)?;
    m.add_class::<socket::SocketHandle>()?;
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
