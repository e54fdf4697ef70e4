//! `Store`: one Durable Object's database, seen from Python (SPEC §6). Each write that begins a
//! new commit tells the output gate, which commits it at the next commit point.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString};
use sockworker_core::gate::OutputGate;
use sockworker_core::storage::{Alarm, ListOptions, SqlValue};
use sockworker_core::{CoreError, Store as CoreStore};

use crate::errors::Result;

#[pyclass(frozen, module = "sockworker._native")]
pub struct Store {
    store: Arc<CoreStore>,
    gate: Arc<OutputGate>,
}

impl Store {
    pub fn new(store: Arc<CoreStore>, gate: Arc<OutputGate>) -> Self {
        Self { store, gate }
    }

    /// Tells the gate when a write began a new commit.
    fn wrote<T>(&self, outcome: Result<(T, bool), CoreError>) -> Result<T> {
        let (value, began) = outcome?;
        if began {
            self.gate.mark_dirty(&self.store);
        }
        Ok(value)
    }
}

fn sql_value(value: &Bound<'_, PyAny>) -> PyResult<SqlValue> {
    if value.is_none() {
        return Ok(SqlValue::Null);
    }
    if value.is_instance_of::<PyBool>() {
        return Ok(SqlValue::Integer(i64::from(value.extract::<bool>()?)));
    }
    if value.is_instance_of::<PyInt>() {
        return value.extract::<i64>().map(SqlValue::Integer).map_err(|_| {
            pyo3::exceptions::PyOverflowError::new_err("an SQL integer binding must fit in 64 bits")
        });
    }
    if value.is_instance_of::<PyFloat>() {
        return Ok(SqlValue::Real(value.extract()?));
    }
    if let Ok(text) = value.cast::<PyString>() {
        return Ok(SqlValue::Text(text.to_str()?.to_owned()));
    }
    if let Ok(bytes) = value.extract::<Vec<u8>>() {
        return Ok(SqlValue::Blob(bytes));
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "an SQL binding is None, int, float, str or bytes, not {}",
        value.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
    )))
}

fn python_value(py: Python<'_>, value: SqlValue) -> PyResult<Py<PyAny>> {
    Ok(match value {
        SqlValue::Null => py.None(),
        SqlValue::Integer(i) => i.into_pyobject(py)?.into_any().unbind(),
        SqlValue::Real(f) => f.into_pyobject(py)?.into_any().unbind(),
        SqlValue::Text(t) => t.into_pyobject(py)?.into_any().unbind(),
        SqlValue::Blob(b) => PyBytes::new(py, &b).into_any().unbind(),
    })
}

type SqlOutcome = (Vec<String>, Vec<Vec<Py<PyAny>>>, u64, u64);

#[pymethods]
impl Store {
    /// The values of `keys` (None where absent), as stored (pickled bytes).
    fn get<'py>(&self, py: Python<'py>, keys: Vec<String>) -> Result<Vec<Option<Bound<'py, PyBytes>>>> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let values = self.store.get(&keys)?;
        Ok(values.into_iter().map(|value| value.map(|v| PyBytes::new(py, &v))).collect())
    }

    fn put(&self, pairs: Vec<(String, Vec<u8>)>) -> Result<()> {
        let pairs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        self.wrote(self.store.put(&pairs).map(|began| ((), began)))
    }

    /// Deletes `keys`; returns how many existed.
    fn delete(&self, keys: Vec<String>) -> Result<u64> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.wrote(self.store.delete(&keys))
    }

    fn delete_all(&self) -> Result<u64> {
        self.wrote(self.store.delete_all())
    }

    #[pyo3(signature = (prefix=None, start=None, start_after=None, end=None, limit=None, reverse=false))]
    #[allow(clippy::too_many_arguments)]
    fn list_range<'py>(
        &self,
        py: Python<'py>,
        prefix: Option<String>,
        start: Option<String>,
        start_after: Option<String>,
        end: Option<String>,
        limit: Option<usize>,
        reverse: bool,
    ) -> Result<Vec<(String, Bound<'py, PyBytes>)>> {
        let options = ListOptions { prefix, start, start_after, end, limit, reverse };
        let pairs = self.store.list(&options)?;
        Ok(pairs.into_iter().map(|(key, value)| (key, PyBytes::new(py, &value))).collect())
    }

    /// Runs SQL: (column names, rows as lists, rows read, rows written).
    fn exec(&self, py: Python<'_>, query: &str, bindings: Vec<Bound<'_, PyAny>>) -> Result<SqlOutcome> {
        let bindings = bindings.iter().map(sql_value).collect::<PyResult<Vec<_>>>()?;
        let result = self.wrote(self.store.exec(query, bindings))?;
        let rows = result
            .rows
            .into_iter()
            .map(|row| row.into_iter().map(|value| python_value(py, value)).collect::<PyResult<Vec<_>>>())
            .collect::<PyResult<Vec<_>>>()?;
        Ok((result.columns, rows, result.rows_read, result.rows_written))
    }

    #[getter]
    fn database_size(&self) -> Result<u64> {
        Ok(self.store.database_size()?)
    }

    /// Begins a `transaction()` block.
    fn begin_block(&self) -> Result<()> {
        self.wrote(self.store.savepoint().map(|began| ((), began)))
    }

    /// Ends the innermost block; `rollback` undoes its writes.
    fn end_block(&self, rollback: bool) -> Result<()> {
        Ok(self.store.end_savepoint(rollback)?)
    }

    /// (seconds since the epoch, account that set it), or None.
    fn get_alarm(&self) -> Result<Option<(f64, String)>> {
        let alarm = self.store.alarm()?;
        Ok(alarm.map(|alarm| (alarm.at, alarm.account)))
    }

    /// Sets the alarm for `at` on behalf of `account` (`id_name`: the name of the object's id,
    /// if it has one), or (None) deletes it.
    #[pyo3(signature = (at, account="default", id_name=None))]
    fn set_alarm(&self, at: Option<f64>, account: &str, id_name: Option<String>) -> Result<()> {
        let alarm = at.map(|at| Alarm { at, account: account.to_owned(), id_name });
        self.wrote(self.store.set_alarm(alarm.as_ref()).map(|began| ((), began)))
    }

    /// Closes the database once what it wrote is committed (the object hibernated).
    fn close(&self) {
        self.gate.close_store(&self.store);
    }

    #[getter]
    fn path(&self) -> String {
        self.store.path().display().to_string()
    }
}
