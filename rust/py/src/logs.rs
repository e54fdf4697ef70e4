//! The core's log records as tuples for `sockworker.logs`, which hands them to Python's logging
//! on the application thread. Levels cross as Python's numbers (DEBUG = 10, ...).

use log::{Level, LevelFilter};
use pyo3::prelude::*;
use sockworker_core::logs;

use crate::errors::Result;

/// Python's number for a `log` level; TRACE, which Python lacks, is 5.
fn python_level(level: Level) -> u8 {
    match level {
        Level::Error => 40,
        Level::Warn => 30,
        Level::Info => 20,
        Level::Debug => 10,
        Level::Trace => 5,
    }
}

/// The most verbose `log` level a Python logger at `level` lets through.
fn level_filter(level: i64) -> LevelFilter {
    match level {
        ..=5 => LevelFilter::Trace,
        6..=10 => LevelFilter::Debug,
        11..=20 => LevelFilter::Info,
        21..=30 => LevelFilter::Warn,
        31..=40 => LevelFilter::Error,
        _ => LevelFilter::Off,
    }
}

/// Routes the core's records into the queue, up to the Python level `level`; returns the
/// descriptor that becomes readable when records wait. Call again to change the level.
#[pyfunction]
pub fn install_log_queue(level: i64) -> Result<i32> {
    Ok(logs::install(level_filter(level)).map(logs::LogQueue::fd)?)
}

/// One waiting record, as Python builds its `LogRecord` from it.
type RecordTuple = (u8, String, String, Option<&'static str>, Option<u32>);

/// Every waiting record as (level, target, message, file, line), and how many were dropped
/// because the queue was full.
#[pyfunction]
pub fn take_log_records() -> (Vec<RecordTuple>, u64) {
    let Some(queue) = logs::installed() else {
        return (Vec::new(), 0);
    };
    let (records, dropped) = queue.take();
    let records =
        records.into_iter().map(|r| (python_level(r.level), r.target, r.message, r.file, r.line)).collect();
    (records, dropped)
}
