//! `Meter` and `Slot`: the core's usage counters, seen from Python (SPEC §4).

use std::sync::Arc;

use pyo3::prelude::*;
use sockworker_core::meter::{self, UNITS};
use sockworker_core::{Label, Unit};

/// `UNIT_<NAME>` for each unit (its index in a usage vector) and `UNIT_NAMES`, the names in
/// that order: the core owns the units and their order, Python reads them from here.
pub fn add_units(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for unit in Unit::ALL {
        m.add(format!("UNIT_{}", unit.name().to_uppercase()), unit as usize)?;
    }
    m.add("UNIT_NAMES", pyo3::types::PyTuple::new(m.py(), Unit::ALL.map(Unit::name))?)?;
    m.add("UNITS", UNITS)?;
    Ok(())
}

/// Every slot of one app; counts survive server restarts of the app.
#[pyclass(frozen, module = "sockworker._native")]
#[derive(Default)]
pub struct Meter {
    /// (Shared with the metrics listener of the server serving the app.)
    pub inner: Arc<meter::Meter>,
}

type Record = (String, Option<String>, Option<String>, [u64; UNITS]);

#[pymethods]
impl Meter {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// The slot of (account, namespace, object id); `cpu_limit_ms` bounds the CPU of each of its
    /// events, `wall_limit_ms` (0: none) the wall time each may hold the application thread.
    #[pyo3(signature = (account, namespace, object_id, cpu_limit_ms, wall_limit_ms=0.0))]
    fn slot(
        &self,
        account: String,
        namespace: Option<String>,
        object_id: Option<String>,
        cpu_limit_ms: f64,
        wall_limit_ms: f64,
    ) -> Slot {
        let slot = self.inner.slot(Label { account, namespace, object_id });
        let nanos = |ms: f64| if ms > 0.0 { (ms * 1e6) as u64 } else { u64::MAX };
        slot.set_cpu_limit_ns(nanos(cpu_limit_ms));
        slot.set_wall_limit_ns(nanos(wall_limit_ms));
        Slot { inner: slot }
    }

    /// What was counted since the last drain, per slot: (account, namespace, object_id, units).
    fn drain(&self, py: Python<'_>) -> Vec<Record> {
        py.detach(|| self.inner.drain())
            .into_iter()
            .map(|(label, usage)| (label.account, label.namespace, label.object_id, usage))
            .collect()
    }

    /// Everything counted since the meter was made, drained or not.
    fn totals(&self) -> [u64; UNITS] {
        self.inner.totals()
    }
}

/// One (account, namespace, object id).
#[pyclass(frozen, module = "sockworker._native")]
pub struct Slot {
    pub inner: Arc<sockworker_core::Slot>,
}

#[pymethods]
impl Slot {
    /// Counts `n` of unit number `unit` (one of the module's UNIT_* constants).
    fn add(&self, unit: usize, n: u64) -> PyResult<()> {
        let unit =
            *Unit::ALL.get(unit).ok_or_else(|| pyo3::exceptions::PyValueError::new_err("no such unit"))?;
        self.inner.add(unit, n);
        Ok(())
    }

    #[getter]
    fn account(&self) -> &str {
        &self.inner.label.account
    }

    #[getter]
    fn namespace(&self) -> Option<&str> {
        self.inner.label.namespace.as_deref()
    }

    #[getter]
    fn object_id(&self) -> Option<&str> {
        self.inner.label.object_id.as_deref()
    }

    /// The CPU one event may use, in nanoseconds (None: no limit).
    #[getter]
    fn cpu_limit_ns(&self) -> Option<u64> {
        Some(self.inner.cpu_limit_ns()).filter(|&n| n != u64::MAX)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<Slot>().is_ok_and(|other| Arc::ptr_eq(&self.inner, &other.get().inner))
    }

    fn __hash__(&self) -> u64 {
        Arc::as_ptr(&self.inner) as u64
    }

    fn __repr__(&self) -> String {
        let label = &self.inner.label;
        format!("Slot({:?}, {:?}, {:?})", label.account, label.namespace, label.object_id)
    }
}
