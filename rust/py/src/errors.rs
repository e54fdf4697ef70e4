//! The one mapping from core errors to Python exceptions. The exception classes live in
//! `sockworker.errors`, where the hierarchy is documented.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use sockworker_core::CoreError;

fn exception_class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
) -> PyResult<Bound<'py, PyType>> {
    cell.get_or_try_init(py, || {
        let class = py.import("sockworker.errors")?.getattr(name)?;
        Ok::<_, PyErr>(class.cast_into::<PyType>()?.unbind())
    })
    .map(|class| class.bind(py).clone())
}

macro_rules! raise {
    ($py:expr, $name:literal, $msg:expr) => {{
        static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
        match exception_class($py, &CLASS, $name) {
            Ok(class) => PyErr::from_type(class, $msg),
            Err(err) => err,
        }
    }};
}

/// Turns a core error into the matching `sockworker.errors` exception.
pub fn to_pyerr(py: Python<'_>, error: CoreError) -> PyErr {
    let message = error.to_string();
    match error {
        CoreError::Io(e) => match e.raw_os_error() {
            Some(errno) => raise!(py, "ServerStartError", (errno, message)),
            None => raise!(py, "ServerStartError", message),
        },
        CoreError::InvalidArgument(_) => raise!(py, "InvalidArgument", message),
        CoreError::AlreadyAnswered | CoreError::NotAnUpgrade => raise!(py, "ResponseError", message),
        CoreError::SocketClosed => raise!(py, "ConnectionClosed", message),
        CoreError::LimitExceeded(_) => raise!(py, "LimitExceeded", message),
        CoreError::Storage(_) => raise!(py, "StorageError", message),
    }
}

/// `sockworker.errors.CpuLimitExceeded`, for the watchdog.
pub fn cpu_limit_exceeded(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    exception_class(py, &CLASS, "CpuLimitExceeded")
}

/// `sockworker.errors.WallLimitExceeded`, for the watchdog.
pub fn wall_limit_exceeded(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    exception_class(py, &CLASS, "WallLimitExceeded")
}
