//! The core's log records (and those of the crates under it), queued for the application thread,
//! which hands them to its own logging. Logging never waits on that thread: a record is formatted,
//! pushed under a short lock and, when the queue was empty, the eventfd is written.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;

use crate::bridge::Wakeup;

/// Records kept while the application thread does not take them; past this they are counted
/// and dropped, so a stalled application thread costs bounded memory, not a blocked I/O thread.
pub const CAPACITY: usize = 4096;

/// One log record, owned, for the application thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub level: Level,
    /// The module that logged it (`sockworker_core::server`, `rustls::...`).
    pub target: String,
    pub message: String,
    pub file: Option<&'static str>,
    pub line: Option<u32>,
}

pub struct LogQueue {
    records: Mutex<Vec<LogRecord>>,
    dropped: AtomicU64,
    wakeup: Wakeup,
}

impl LogQueue {
    /// # Errors
    /// When the eventfd cannot be created.
    pub fn new() -> io::Result<Self> {
        Ok(Self { records: Mutex::new(Vec::new()), dropped: AtomicU64::new(0), wakeup: Wakeup::new()? })
    }

    /// The descriptor that becomes readable when records are waiting.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.wakeup.fd()
    }

    fn push(&self, record: LogRecord) {
        let was_empty = {
            let mut records = self.records.lock();
            if records.len() >= CAPACITY {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            records.push(record);
            records.len() == 1
        };
        if was_empty {
            self.wakeup.wake();
        }
    }

    /// Every waiting record in the order logged, and how many were dropped since the last take.
    pub fn take(&self) -> (Vec<LogRecord>, u64) {
        self.wakeup.consume();
        let records = std::mem::take(&mut *self.records.lock());
        (records, self.dropped.swap(0, Ordering::Relaxed))
    }
}

impl Log for LogQueue {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        self.push(LogRecord {
            level: record.level(),
            target: record.target().to_owned(),
            message: record.args().to_string(),
            file: record.file_static(),
            line: record.line(),
        });
    }

    fn flush(&self) {}
}

/// The process-wide queue, or why it could not be installed (the `log` crate has one logger).
static QUEUE: OnceLock<Result<&'static LogQueue, String>> = OnceLock::new();

/// Makes the process-wide queue the `log` crate's logger (once), and lets records up to
/// `level` through. A record above `level` costs its call site one atomic load and nothing else:
/// the `log` macros compare with the maximum level before building it.
///
/// # Errors
/// When the eventfd cannot be created, or another logger was installed first.
pub fn install(level: LevelFilter) -> io::Result<&'static LogQueue> {
    let queue = QUEUE.get_or_init(|| {
        let queue: &'static LogQueue = Box::leak(Box::new(LogQueue::new().map_err(|e| e.to_string())?));
        log::set_logger(queue).map_err(|_| "another Rust logger is installed in this process".to_owned())?;
        Ok(queue)
    });
    let queue = (*queue).clone().map_err(io::Error::other)?;
    log::set_max_level(level);
    Ok(queue)
}

/// The queue, once `install` succeeded.
pub fn installed() -> Option<&'static LogQueue> {
    QUEUE.get()?.as_ref().ok().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::tests::readable;

    fn record(queue: &LogQueue, level: Level, message: &str) {
        queue.log(
            &Record::builder()
                .level(level)
                .target("sockworker_core::test")
                .args(format_args!("{message}"))
                .build(),
        );
    }

    // One test: the maximum level is global to the test binary, so tests of it cannot run in
    // parallel.
    #[test]
    fn records_arrive_in_order_with_one_wakeup_are_bounded_and_filtered_by_level() {
        log::set_max_level(LevelFilter::Info);
        let queue = LogQueue::new().unwrap();
        assert!(!readable(queue.fd()));
        record(&queue, Level::Error, "one");
        record(&queue, Level::Debug, "filtered out");
        record(&queue, Level::Info, "two");
        assert!(readable(queue.fd()));
        let (records, dropped) = queue.take();
        assert_eq!(dropped, 0);
        let messages: Vec<_> = records.iter().map(|r| (r.level, r.message.as_str())).collect();
        assert_eq!(messages, [(Level::Error, "one"), (Level::Info, "two")]);
        assert_eq!(records[0].target, "sockworker_core::test");
        assert!(!readable(queue.fd()));

        for i in 0..CAPACITY + 5 {
            record(&queue, Level::Warn, &i.to_string());
        }
        let (records, dropped) = queue.take();
        assert_eq!((records.len(), dropped), (CAPACITY, 5));
        assert_eq!(records.last().unwrap().message, (CAPACITY - 1).to_string());
        assert_eq!(queue.take(), (Vec::new(), 0));

        // Installed, it is the logger of the `log` macros (of the tests running alongside too:
        // only this module's records count here).
        let queue = install(LevelFilter::Warn).unwrap();
        let mine = || -> Vec<LogRecord> {
            queue.take().0.into_iter().filter(|record| record.target == module_path!()).collect()
        };
        mine();
        log::debug!("below the level: not even formatted");
        log::warn!("at the level");
        let records = mine();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].level, records[0].message.as_str()), (Level::Warn, "at the level"));
        assert!(records[0].file.is_some_and(|file| file.ends_with("logs.rs")));
        assert!(std::ptr::eq(installed().unwrap(), queue));
        assert!(std::ptr::eq(install(LevelFilter::Debug).unwrap(), queue), "installed once");
        log::debug!("now at the level");
        assert_eq!(mine().len(), 1);
    }
}
