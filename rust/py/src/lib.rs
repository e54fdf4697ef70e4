//! The private module `sockworker._native`: converts between the core's Rust types and Python.
//! This crate is the one place where the GIL boundary is crossed; it holds no server logic.

mod convert;
mod errors;
mod meter;
mod object;
mod server;
mod socket;

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
    m.add_class::<socket::SocketLimits>()?;
    m.add_class::<object::ObjectState>()?;
    convert::add_event_kinds(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
