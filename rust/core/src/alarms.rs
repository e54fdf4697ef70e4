//! Alarms (SPEC §6): one scheduler for the alarms of every object, awake or hibernated (a heap
//! and one task, not a task or a Python object per alarm), and the alarm index: a small database
//! in the data directory naming the objects that have an alarm, read at start-up so that alarms
//! due while the server was down fire then.
//!
//! The object's own database is the truth; the index only says where to look. It is written
//! before the object's commit when an alarm is set and after it when one is deleted, so it always
//! names every object with an alarm (and perhaps a few without, which firing finds out).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::error::CoreError;
use crate::event::{Event, Events};
use crate::storage::{Alarm, ObjectName};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the epoch to milliseconds, rounded up: an alarm never fires before its time.
fn to_ms(at: f64) -> u64 {
    if at <= 0.0 {
        return 0;
    }
    // (Saturating: a time past u64 milliseconds never comes.)
    (at * 1000.0).ceil() as u64
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at_ms: u64,
    /// Which setting of the object's alarm this is: a later one makes it stale.
    generation: u64,
    name: Arc<ObjectName>,
    retry: u32,
    /// The name the object's id was made from, if known.
    id_name: Option<Arc<str>>,
}

#[derive(Default)]
struct Schedule {
    heap: BinaryHeap<Reverse<Due>>,
    /// The live generation of each object's alarm.
    armed: HashMap<Arc<ObjectName>, u64>,
    next_generation: u64,
}

/// Every armed alarm; fires `Event::Alarm` on the event queue when one is due.
pub struct AlarmScheduler {
    schedule: Mutex<Schedule>,
    changed: Notify,
    events: Arc<Events>,
}

impl AlarmScheduler {
    #[must_use]
    pub fn new(events: Arc<Events>) -> Self {
        Self { schedule: Mutex::new(Schedule::default()), changed: Notify::new(), events }
    }

    /// Arms (or re-arms) the alarm of `name` for `at` (seconds since the epoch); `retry` is how
    /// many times it has failed so far; `id_name` the name the id was made from, if known.
    pub fn set(&self, name: &Arc<ObjectName>, at: f64, retry: u32, id_name: Option<&str>) {
        let at_ms = to_ms(at);
        let earliest = {
            let mut schedule = self.schedule.lock();
            schedule.next_generation += 1;
            let generation = schedule.next_generation;
            schedule.armed.insert(name.clone(), generation);
            let earliest = schedule.heap.peek().is_none_or(|Reverse(top)| at_ms < top.at_ms);
            let id_name = id_name.map(Arc::from);
            schedule.heap.push(Reverse(Due { at_ms, generation, name: name.clone(), retry, id_name }));
            earliest
        };
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Disarms the alarm of `name`, if armed.
    pub fn cancel(&self, name: &ObjectName) {
        let mut schedule = self.schedule.lock();
        schedule.armed.remove(name);
        // Stale entries leave the heap when they come up; drop them early if they pile up.
        if schedule.heap.len() > 64 && schedule.heap.len() > 2 * schedule.armed.len() {
            let armed = std::mem::take(&mut schedule.armed);
            schedule.heap.retain(|Reverse(due)| armed.get(&due.name) == Some(&due.generation));
            schedule.armed = armed;
        }
    }

    /// Alarms armed now.
    #[must_use]
    pub fn armed(&self) -> usize {
        self.schedule.lock().armed.len()
    }

    /// Fires what is due and says when to look again.
    fn fire_due(&self) -> Option<u64> {
        let now = now_ms();
        let mut due = Vec::new();
        let next = {
            let mut schedule = self.schedule.lock();
            loop {
                let Some(Reverse(top)) = schedule.heap.peek() else { break None };
                if schedule.armed.get(&top.name) != Some(&top.generation) {
                    schedule.heap.pop();
                    continue;
                }
                if top.at_ms > now {
                    break Some(top.at_ms);
                }
                let Some(Reverse(top)) = schedule.heap.pop() else { break None };
                schedule.armed.remove(&top.name);
                due.push(Event::Alarm {
                    namespace: top.name.namespace.to_string(),
                    object_id: top.name.object_id.to_string(),
                    id_name: top.id_name.as_deref().map(str::to_owned),
                    retry: top.retry,
                });
            }
        };
        self.events.push_all(&mut due);
        next
    }

    /// The scheduler's task: sleeps until the earliest alarm or a change.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = self.fire_due();
            let wake =
                next.map(|at_ms| Instant::now() + Duration::from_millis(at_ms.saturating_sub(now_ms())));
            tokio::select! {
                () = async { sleep_until(wake.unwrap_or_else(Instant::now)).await }, if wake.is_some() => {}
                () = self.changed.notified() => {}
            }
        }
    }
}

/// The index of objects with an alarm: `alarms.sqlite` in the data directory.
pub struct AlarmIndex {
    conn: Mutex<Connection>,
    log: Mutex<Option<Arc<File>>>,
    path: PathBuf,
}

impl AlarmIndex {
    /// # Errors
    /// `Storage` when the index cannot be opened or set up.
    pub fn open(root: &Path) -> Result<Self, CoreError> {
        let path = root.join("alarms.sqlite");
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let setup = || -> rusqlite::Result<Connection> {
            let conn = Connection::open_with_flags(&path, flags)?;
            // EXCLUSIVE: the index is also the lock that keeps a second server off this data
            // directory (its objects' databases are locked one by one, only while open).
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            let _: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS alarms (
                     namespace TEXT NOT NULL, object_id TEXT NOT NULL, at REAL NOT NULL, id_name TEXT,
                     PRIMARY KEY (namespace, object_id)) WITHOUT ROWID",
            )?;
            // An index made by an older build has no id_name column: added (NULL for the rows
            // there, which fire with the id alone, as they would have then).
            let has_id_name = conn
                .prepare("SELECT 1 FROM pragma_table_info('alarms') WHERE name = 'id_name'")?
                .exists([])?;
            if !has_id_name {
                conn.execute_batch("ALTER TABLE alarms ADD COLUMN id_name TEXT")?;
            }
            Ok(conn)
        };
        let conn = setup().map_err(|e| {
            let busy = e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy);
            CoreError::Io(std::io::Error::other(if busy {
                format!("the data directory {} is in use by another sockworker server", root.display())
            } else {
                format!("the alarm index {}: {e}", path.display())
            }))
        })?;
        Ok(Self { conn: Mutex::new(conn), log: Mutex::new(None), path })
    }

    /// Every object the index names, with its alarm time and the name of its id.
    ///
    /// # Errors
    /// `Storage` for SQLite's errors.
    pub fn all(&self) -> Result<Vec<(ObjectName, f64, Option<String>)>, CoreError> {
        let conn = self.conn.lock();
        let mut statement = conn.prepare("SELECT namespace, object_id, at, id_name FROM alarms")?;
        let rows = statement.query_map([], |row| {
            let namespace: String = row.get(0)?;
            let object_id: String = row.get(1)?;
            Ok((ObjectName::new(&namespace, &object_id), row.get(2)?, row.get(3)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes upserts and deletions in one transaction; returns the log to fsync.
    ///
    /// # Errors
    /// `Storage` for SQLite's errors (nothing is written then).
    pub fn write(
        &self,
        upserts: &[(Arc<ObjectName>, Alarm)],
        deletes: &[Arc<ObjectName>],
    ) -> Result<Option<Arc<File>>, CoreError> {
        let mut conn = self.conn.lock();
        let transaction = conn.transaction()?;
        {
            let mut upsert = transaction.prepare_cached(
                "INSERT INTO alarms (namespace, object_id, at, id_name) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (namespace, object_id) DO UPDATE SET at = excluded.at, id_name = excluded.id_name",
            )?;
            for (name, alarm) in upserts {
                upsert.execute(params![&*name.namespace, &*name.object_id, alarm.at, alarm.id_name])?;
            }
            let mut delete =
                transaction.prepare_cached("DELETE FROM alarms WHERE namespace = ?1 AND object_id = ?2")?;
            for name in deletes {
                delete.execute(params![&*name.namespace, &*name.object_id])?;
            }
        }
        transaction.commit()?;
        let mut log = self.log.lock();
        if log.is_none() {
            *log = File::open(format!("{}-wal", self.path.display())).ok().map(Arc::new);
        }
        Ok(log.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_time_order_and_forgets_replaced_alarms() {
        let events = Arc::new(Events::new().unwrap());
        let scheduler = AlarmScheduler::new(events.clone());
        let a = Arc::new(ObjectName::new("NS", "a"));
        let b = Arc::new(ObjectName::new("NS", "b"));
        let past = now_ms() as f64 / 1000.0 - 10.0;
        scheduler.set(&a, past + 2.0, 0, None);
        scheduler.set(&b, past + 1.0, 3, Some("bee"));
        scheduler.set(&a, past + 5.0, 0, None); // replaces the first
        let c = Arc::new(ObjectName::new("NS", "c"));
        scheduler.set(&c, past + 0.5, 0, None);
        scheduler.cancel(&c);
        let later = scheduler.fire_due();
        assert_eq!(later, None);
        let fired: Vec<(String, u32, Option<String>)> = events
            .drain()
            .into_iter()
            .map(|event| match event {
                Event::Alarm { object_id, retry, id_name, .. } => (object_id, retry, id_name),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(fired, [("b".to_owned(), 3, Some("bee".to_owned())), ("a".to_owned(), 0, None)]);
        assert_eq!(scheduler.armed(), 0);
        let future = Arc::new(ObjectName::new("NS", "f"));
        scheduler.set(&future, now_ms() as f64 / 1000.0 + 60.0, 0, None);
        assert!(scheduler.fire_due().is_some());
        assert_eq!(scheduler.armed(), 1);
    }

    #[test]
    fn the_index_round_trips() {
        let dir = std::env::temp_dir().join(format!("sw-alarm-index-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let index = AlarmIndex::open(&dir).unwrap();
        let a = Arc::new(ObjectName::new("NS", "a"));
        let b = Arc::new(ObjectName::new("NS", "b"));
        let alarm = |at: f64| Alarm { at, account: "default".into(), id_name: Some("ay".into()) };
        assert!(index.write(&[(a.clone(), alarm(1.0)), (b.clone(), alarm(2.0))], &[]).unwrap().is_some());
        index.write(&[(a.clone(), alarm(3.0))], &[b]).unwrap();
        drop(index);
        let again = AlarmIndex::open(&dir).unwrap();
        let all = again.all().unwrap();
        assert_eq!(all, vec![(ObjectName::new("NS", "a"), 3.0, Some("ay".to_owned()))]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_index_of_an_older_build_is_upgraded() {
        let dir = std::env::temp_dir().join(format!("sw-alarm-index-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let old = Connection::open(dir.join("alarms.sqlite")).unwrap();
            old.execute_batch(
                "CREATE TABLE alarms (namespace TEXT NOT NULL, object_id TEXT NOT NULL, at REAL NOT NULL,
                     PRIMARY KEY (namespace, object_id)) WITHOUT ROWID;
                 INSERT INTO alarms VALUES ('NS', 'a', 5.0);",
            )
            .unwrap();
        }
        let index = AlarmIndex::open(&dir).unwrap();
        assert_eq!(index.all().unwrap(), vec![(ObjectName::new("NS", "a"), 5.0, None)]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
