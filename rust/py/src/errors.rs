//! The one mapping from core errors to Python exceptions. The exception classes live in
//! `sockworker.errors`, where the hierarchy is documented; each is named once here, and
//! `check` (run when the module is imported) makes a missing class fail every import rather
//! than the first error of its kind.
//!
//! A binding that can fail returns [`Result`]: `?` takes a `CoreError` or a `PyErr`, and pyo3
//! raises the matching exception.

use pyo3::prelude::*;
use pyo3::PyTypeInfo;
use sockworker_core::CoreError;

/// Declares each class (imported from `sockworker.errors` on first use) and `check`, which
/// imports them all.
macro_rules! exceptions {
    ($($name:ident),* $(,)?) => {
        $(pyo3::import_exception!(sockworker.errors, $name);)*

        /// Imports every class (a missing one fails the import of `_native`).
        pub fn check(py: Python<'_>) {
            $(let _ = $name::type_object(py);)*
        }
    };
}

exceptions!(
    ServerStartError,
    InvalidArgument,
    ResponseError,
    ConnectionClosed,
    LimitExceeded,
    StorageError,
    CpuLimitExceeded,
    WallLimitExceeded,
);

/// A failure on its way to Python.
pub enum Error {
    Core(CoreError),
    Python(PyErr),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<CoreError> for Error {
    fn from(error: CoreError) -> Self {
        Error::Core(error)
    }
}

impl From<PyErr> for Error {
    fn from(error: PyErr) -> Self {
        Error::Python(error)
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        Error::Core(error.into())
    }
}

impl From<Error> for PyErr {
    fn from(error: Error) -> Self {
        match error {
            Error::Core(error) => core_error(error),
            Error::Python(error) => error,
        }
    }
}

/// The `sockworker.errors` exception of a core error.
fn core_error(error: CoreError) -> PyErr {
    let message = error.to_string();
    match error {
        CoreError::Io(e) => match e.raw_os_error() {
            Some(errno) => ServerStartError::new_err((errno, message)),
            None => ServerStartError::new_err(message),
        },
        CoreError::InvalidArgument(_) => InvalidArgument::new_err(message),
        CoreError::AlreadyAnswered | CoreError::NotAnUpgrade => ResponseError::new_err(message),
        CoreError::SocketClosed => ConnectionClosed::new_err(message),
        CoreError::LimitExceeded(_) => LimitExceeded::new_err(message),
        CoreError::Storage(_) => StorageError::new_err(message),
    }
}

/// `sockworker.errors.CpuLimitExceeded`, for the watchdog.
pub fn cpu_limit_exceeded(py: Python<'_>) -> Bound<'_, pyo3::types::PyType> {
    CpuLimitExceeded::type_object(py)
}

/// `sockworker.errors.WallLimitExceeded`, for the watchdog.
pub fn wall_limit_exceeded(py: Python<'_>) -> Bound<'_, pyo3::types::PyType> {
    WallLimitExceeded::type_object(py)
}
