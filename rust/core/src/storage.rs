//! Durable Object storage (SPEC §6): one SQLite database per object, in WAL mode, under the data
//! directory. A [`Store`] is one object's open database: the KV and SQL calls of the application
//! thread, its open write transaction, and the commit the output gate runs at a commit point.
//! [`Storage`] is the data directory and the registry of open stores (so a store closing in the
//! background is taken back, not opened twice).
//!
//! Durability: the commit itself runs with `synchronous=NORMAL` (it reaches the page cache, which
//! survives a crash of the process); for `Durability::Full` the gate's committer thread then
//! `fdatasync`s the write-ahead log before the held output is released, so the application
//! thread never waits for the disk.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, StatementStatus};

use crate::cluster::{Changes, Cluster};
use crate::error::CoreError;
pub use crate::keys::{Alarm, ObjectName};

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 2048;
/// Largest value, in bytes once serialized.
pub const MAX_VALUE_BYTES: usize = 128 * 1024;
/// Most keys in one multi-key call.
pub const MAX_KEYS_PER_CALL: usize = 128;
/// Pages of write-ahead log after which the committer checkpoints the database.
const CHECKPOINT_PAGES: i32 = 1000;
/// SQLite's page cache per open database, in KiB: objects are many, keep each one small.
const CACHE_KIB: i64 = 512;

/// When a commit counts as done (SPEC §6, `App(durability=...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk: the log is fsynced before held output is released.
    Full,
    /// In the operating system's cache: survives a crash of the server, not of the machine.
    Normal,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Cluster mode (SPEC §7): objects' KV pairs and alarms live in PostgreSQL.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// A value of SQL, as SQLite types it.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<ValueRef<'_>> for SqlValue {
    fn from(value: ValueRef<'_>) -> Self {
        match value {
            ValueRef::Null => Self::Null,
            ValueRef::Integer(i) => Self::Integer(i),
            ValueRef::Real(f) => Self::Real(f),
            ValueRef::Text(t) => Self::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Self::Blob(b.to_vec()),
        }
    }
}

impl From<SqlValue> for Value {
    fn from(value: SqlValue) -> Self {
        match value {
            SqlValue::Null => Self::Null,
            SqlValue::Integer(i) => Self::Integer(i),
            SqlValue::Real(f) => Self::Real(f),
            SqlValue::Text(t) => Self::Text(t),
            SqlValue::Blob(b) => Self::Blob(b),
        }
    }
}

/// What `exec` returns: the columns and rows of the last statement that has columns, and what
/// every statement read and wrote.
#[derive(Debug, Default)]
pub struct SqlResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
    pub rows_read: u64,
    pub rows_written: u64,
}

/// The arguments of `list`, as SPEC §6 (and Cloudflare) name them.
#[derive(Debug, Default, Clone)]
pub struct ListOptions {
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub start_after: Option<String>,
    pub end: Option<String>,
    pub limit: Option<usize>,
    pub reverse: bool,
}

/// What a commit hands to the output gate.
#[derive(Debug, Default)]
pub struct Committed {
    /// The write-ahead log to fsync before the commit counts as durable.
    pub log: Option<Arc<File>>,
    /// Folders and files made with the database (its first commit syncs them).
    pub new_entries: Vec<PathBuf>,
    /// The object's alarm after this commit, when the commit changed it.
    pub alarm: Option<Option<Alarm>>,
    /// The log is long enough to be checkpointed (by the committer, off the application thread).
    pub wants_checkpoint: bool,
}

/// Where the data directory keeps an object's database: `NAMESPACE/abc/ID.sqlite`, sharded by the
/// first three hex digits of the id so that a million objects spread over 4,096 folders.
///
/// # Errors
/// `InvalidArgument` for a namespace or id that is not a plain name (it would escape the folder).
pub fn object_path(root: &Path, namespace: &str, object_id: &str) -> Result<PathBuf, CoreError> {
    let plain_namespace = !namespace.is_empty()
        && namespace.len() <= 128
        && !namespace.starts_with('.')
        && namespace.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !plain_namespace {
        return Err(CoreError::InvalidArgument(format!(
            "a namespace with storage is named with letters, digits, '_', '-' and '.', not {namespace:?}"
        )));
    }
    if object_id.len() != 64 || !object_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CoreError::InvalidArgument(format!("not an object id: {object_id:?}")));
    }
    let id = object_id.to_ascii_lowercase();
    Ok(root.join(namespace).join(&id[..3]).join(format!("{id}.sqlite")))
}

fn storage_error(error: &rusqlite::Error) -> CoreError {
    CoreError::Storage(error.to_string())
}

impl From<rusqlite::Error> for CoreError {
    fn from(error: rusqlite::Error) -> Self {
        storage_error(&error)
    }
}

/// SQLite's memory comes from jemalloc (as the Rust side's does: the bindings make it the global
/// allocator) rather than the C library's malloc: every object opens a connection and closes it
/// when it hibernates, and glibc kept the freed memory fragmented (3.6 KB per hibernated object
/// even after `malloc_trim`, 1.8 KB with jemalloc; measured with 2,000 objects). Called once,
/// before SQLite is first used.
fn configure_sqlite() {
    use std::ffi::{c_int, c_void};
    unsafe extern "C" fn malloc(size: c_int) -> *mut c_void {
        // SAFETY: jemalloc's malloc, for a size SQLite asks for (never negative).
        unsafe { tikv_jemalloc_sys::malloc(usize::try_from(size).unwrap_or(0)) }
    }
    unsafe extern "C" fn free(pointer: *mut c_void) {
        // SAFETY: SQLite frees only what `malloc`/`realloc` above gave it.
        unsafe { tikv_jemalloc_sys::free(pointer) }
    }
    unsafe extern "C" fn realloc(pointer: *mut c_void, size: c_int) -> *mut c_void {
        // SAFETY: as `malloc` and `free`.
        unsafe { tikv_jemalloc_sys::realloc(pointer, usize::try_from(size).unwrap_or(0)) }
    }
    unsafe extern "C" fn size(pointer: *mut c_void) -> c_int {
        // SAFETY: a live allocation of `malloc` or `realloc`.
        c_int::try_from(unsafe { tikv_jemalloc_sys::malloc_usable_size(pointer) }).unwrap_or(c_int::MAX)
    }
    unsafe extern "C" fn roundup(size: c_int) -> c_int {
        // (8-byte granules: what SQLite assumes at least.)
        (size + 7) & !7
    }
    unsafe extern "C" fn init(_: *mut c_void) -> c_int {
        rusqlite::ffi::SQLITE_OK
    }
    unsafe extern "C" fn shutdown(_: *mut c_void) {}
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let methods = rusqlite::ffi::sqlite3_mem_methods {
            xMalloc: Some(malloc),
            xFree: Some(free),
            xRealloc: Some(realloc),
            xSize: Some(size),
            xRoundup: Some(roundup),
            xInit: Some(init),
            xShutdown: Some(shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: before SQLite's first use in this process (Storage::open runs it first); SQLite
        // copies the methods. If something initialized SQLite before, it refuses (SQLITE_MISUSE)
        // and keeps its own allocator, which is fine.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MALLOC, std::ptr::from_ref(&methods))
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            log::debug!("SQLite keeps its own allocator (sqlite3_config returned {rc})");
        }
        // No bulk allocation of 20 pages for each connection's page cache (86 KB per resident
        // object): pages are allocated as they are used.
        // SAFETY: as above; a null buffer and zero sizes are SQLite's way to ask for this.
        unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_PAGECACHE,
                std::ptr::null_mut::<std::ffi::c_void>(),
                0 as std::ffi::c_int,
                0 as std::ffi::c_int,
            );
        }
    });
}

/// The data directory, and the stores open in it.
pub struct Storage {
    root: PathBuf,
    durability: Durability,
    /// Stores open or closing, by path: opening one that is closing takes it back.
    open: Mutex<HashMap<PathBuf, Arc<Store>>>,
    /// The bytes of every database file under the data directory, as last counted, and when.
    size: Arc<Mutex<DirSize>>,
    /// Stores closed so far (each one freed its connection's memory).
    closed: std::sync::atomic::AtomicU64,
    cluster: Option<Arc<Cluster>>,
}

#[derive(Default)]
struct DirSize {
    bytes: u64,
    counted: Option<std::time::Instant>,
    counting: bool,
}

/// How old a count of the data directory's bytes may be before it is made again.
const SIZE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(10);

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_bytes(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

impl Storage {
    /// Creates the data directory if needed and checks that files can be made and synced in it.
    ///
    /// # Errors
    /// `Io` (with the path in the message) when it cannot be created or written.
    pub fn open(config: &StorageConfig) -> Result<Self, CoreError> {
        configure_sqlite();
        let root = config.data_dir.clone();
        let probe = root.join(".sockworker-probe");
        let check = || -> std::io::Result<()> {
            fs::create_dir_all(&root)?;
            let file = File::create(&probe)?;
            file.sync_all()?;
            fs::remove_file(&probe)
        };
        check().map_err(|e| {
            CoreError::Io(std::io::Error::new(
                e.kind(),
                format!("the data directory {} is not usable: {e}", root.display()),
            ))
        })?;
        let storage = Self {
            root,
            durability: config.durability,
            open: Mutex::new(HashMap::new()),
            size: Arc::default(),
            closed: std::sync::atomic::AtomicU64::new(0),
            cluster: config.cluster.clone().map(Cluster::start).transpose()?,
        };
        storage.count_bytes();
        Ok(storage)
    }

    /// The bytes the data directory holds (databases, logs, the alarm index), as counted at
    /// most [`SIZE_MAX_AGE`] ago: counting walks the directory, on a thread of its own.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        let size = self.size.lock();
        let bytes = size.bytes;
        let stale = size.counted.is_none_or(|at| at.elapsed() > SIZE_MAX_AGE);
        drop(size);
        if stale {
            self.count_bytes();
        }
        bytes
    }

    fn count_bytes(&self) {
        {
            let mut size = self.size.lock();
            if size.counting {
                return;
            }
            size.counting = true;
        }
        let (root, size) = (self.root.clone(), self.size.clone());
        let counted = std::thread::Builder::new().name("sockworker-du".into()).spawn(move || {
            let bytes = dir_bytes(&root);
            let mut size = size.lock();
            *size = DirSize { bytes, counted: Some(std::time::Instant::now()), counting: false };
        });
        if counted.is_err() {
            self.size.lock().counting = false;
        }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    #[must_use]
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The cluster, in cluster mode.
    #[must_use]
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The store of one object, opened if it is not open (or taken back if it was closing).
    /// `owner` is the key of the object's core state, which held output is attributed to.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad name, `Storage` when SQLite cannot open or set up the file.
    pub fn store(&self, namespace: &str, object_id: &str, owner: u64) -> Result<Arc<Store>, CoreError> {
        let path = object_path(&self.root, namespace, object_id)?;
        let name = Arc::new(ObjectName::new(namespace, object_id));
        let epoch = match &self.cluster {
            Some(cluster) => Some(cluster.epoch(&name).ok_or_else(|| {
                CoreError::Storage(format!(
                    "this node does not hold the lease of {namespace}/{object_id} (cluster mode)"
                ))
            })?),
            None => None,
        };
        let mut open = self.open.lock();
        if let Some(store) = open.get(&path) {
            if store.epoch() == epoch {
                store.close_requested.store(false, Ordering::Release);
                store.set_owner(owner);
                return Ok(store.clone());
            }
            // Taken again with a new epoch: what the old store holds may be stale.
            let stale = open.remove(&path).expect("found above");
            stale.close();
        }
        let store = match (&self.cluster, epoch) {
            (Some(cluster), Some(epoch)) => {
                Arc::new(Store::open_remote(path.clone(), name, owner, cluster, epoch)?)
            }
            _ => Arc::new(Store::open(path.clone(), name, owner)?),
        };
        open.insert(path, store.clone());
        Ok(store)
    }

    /// Closes `store` unless it was opened again since the close was asked for. Runs on the
    /// committer thread: closing checkpoints the log into the database, which waits for the disk.
    pub fn close(&self, store: &Arc<Store>) {
        let mut open = self.open.lock();
        if !store.close_requested.load(Ordering::Acquire) {
            return;
        }
        if open.get(&store.path).is_some_and(|s| Arc::ptr_eq(s, store)) {
            open.remove(&store.path);
        }
        // Under the lock: opening the object again now waits for the file to be free.
        store.close();
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Stores closed since the start.
    #[must_use]
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    /// How many stores are open (or closing).
    #[must_use]
    pub fn open_count(&self) -> usize {
        self.open.lock().len()
    }
}

/// One object's open database.
pub struct Store {
    path: PathBuf,
    name: Arc<ObjectName>,
    owner: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
    /// Set by the gate while the store is in the open epoch's list of stores to commit.
    pub(crate) in_epoch: AtomicBool,
    /// The object hibernated: close once committed, unless it is opened again first.
    pub(crate) close_requested: AtomicBool,
}

struct Inner {
    /// `None` once closed.
    conn: Option<Connection>,
    /// A `BEGIN` is open: the writes since the last commit.
    write_txn: bool,
    /// Open `transaction()` blocks (savepoints): no commit until they end.
    savepoints: usize,
    alarm_touched: bool,
    log: Option<Arc<File>>,
    /// Folders and files made with the database, synced with its first commit.
    new_entries: Vec<PathBuf>,
    /// Statements of the application run with this set: the authorizer then keeps them away from
    /// the reserved tables and from transaction control.
    user_sql: Arc<AtomicBool>,
    denied: Arc<Mutex<Option<String>>>,
    /// Pages in the log after the last commit that wrote to it (SQLite's WAL hook); -1 when no
    /// commit wrote since it was reset (an empty transaction needs no fsync).
    log_pages: Arc<std::sync::atomic::AtomicI32>,
    /// Cluster mode: the database is in memory, a copy of the object's rows in PostgreSQL, and
    /// each commit is written there.
    remote: Option<Remote>,
}

impl Inner {
    fn new(
        conn: Connection,
        log: Option<Arc<File>>,
        new_entries: Vec<PathBuf>,
        user_sql: Arc<AtomicBool>,
        denied: Arc<Mutex<Option<String>>>,
        log_pages: Arc<std::sync::atomic::AtomicI32>,
        remote: Option<Remote>,
    ) -> Self {
        Self {
            conn: Some(conn),
            write_txn: false,
            savepoints: 0,
            alarm_touched: false,
            log,
            new_entries,
            user_sql,
            denied,
            log_pages,
            remote,
        }
    }
}

/// A store whose truth is the cluster's PostgreSQL (SPEC §7).
struct Remote {
    cluster: Arc<Cluster>,
    /// The epoch of this node's lease when the object was loaded: commits are fenced with it.
    epoch: i64,
    /// Keys written or deleted since the last commit (their values are read at the commit).
    touched: std::collections::BTreeSet<Vec<u8>>,
    /// `delete_all` ran since the last commit.
    wiped: bool,
}

/// The SQL API is not offered in cluster mode yet: the in-memory copy is KV and alarms only.
const NO_SQL_IN_CLUSTER: &str = "the SQL API (ctx.storage.sql) is not available in cluster mode yet: \
     use the KV API (get, put, delete, list), which is stored in the cluster's PostgreSQL";

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Why the application's SQL may not do `action`, if it may not.
fn refuse_user_action(action: &AuthAction<'_>) -> Option<String> {
    let reserved = |name: &str| name.len() >= 4 && name[..4].eq_ignore_ascii_case("_sw_");
    let table = match action {
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            return Some("transactions are made with ctx.storage.transaction(), not in SQL".into())
        }
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => {
            return Some("ATTACH and DETACH are not allowed".into())
        }
        AuthAction::Pragma { pragma_name, .. } => {
            const ALLOWED: &[&str] = &[
                "table_info",
                "table_xinfo",
                "table_list",
                "index_list",
                "index_info",
                "index_xinfo",
                "foreign_key_list",
                "foreign_key_check",
                "quick_check",
                "integrity_check",
                "optimize",
                "defer_foreign_keys",
                "page_count",
                "page_size",
                "freelist_count",
            ];
            if ALLOWED.iter().any(|p| p.eq_ignore_ascii_case(pragma_name)) {
                return None;
            }
            return Some(format!("PRAGMA {pragma_name} is not allowed"));
        }
        AuthAction::CreateTable { table_name }
        | AuthAction::CreateTempTable { table_name }
        | AuthAction::Delete { table_name }
        | AuthAction::DropTable { table_name }
        | AuthAction::DropTempTable { table_name }
        | AuthAction::Insert { table_name }
        | AuthAction::Read { table_name, .. }
        | AuthAction::Update { table_name, .. }
        | AuthAction::AlterTable { table_name, .. }
        | AuthAction::Analyze { table_name }
        | AuthAction::CreateIndex { table_name, .. }
        | AuthAction::CreateTempIndex { table_name, .. }
        | AuthAction::DropIndex { table_name, .. }
        | AuthAction::DropTempIndex { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
        | AuthAction::CreateTempTrigger { table_name, .. }
        | AuthAction::DropTrigger { table_name, .. }
        | AuthAction::DropTempTrigger { table_name, .. }
        | AuthAction::CreateVtable { table_name, .. }
        | AuthAction::DropVtable { table_name, .. } => *table_name,
        AuthAction::CreateView { view_name }
        | AuthAction::CreateTempView { view_name }
        | AuthAction::DropView { view_name }
        | AuthAction::DropTempView { view_name } => *view_name,
        _ => return None,
    };
    reserved(table).then(|| format!("tables named _sw_* are reserved ({table})"))
}

impl Store {
    fn open(path: PathBuf, name: Arc<ObjectName>, owner: u64) -> Result<Self, CoreError> {
        // What the first commit must sync so that a new database survives a power loss: the
        // parent of each folder made now (where its entry is), the database's folder, the file.
        let mut made = Vec::new();
        let mut missing = path.parent();
        while let Some(dir) = missing.filter(|dir| !dir.exists()) {
            made.push(dir.to_path_buf());
            missing = dir.parent();
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut new_entries: Vec<PathBuf> =
            made.iter().filter_map(|dir| dir.parent()).map(Path::to_path_buf).collect();
        if !path.exists() {
            new_entries.extend(path.parent().map(Path::to_path_buf));
            new_entries.push(path.clone());
        }
        new_entries.dedup();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&path, flags)?;
        // Small lookaside: SQLite's default is 1,200 bytes x 100 slots per connection (120 KiB),
        // and objects are many. 128 x 32 = 4 KiB; past it, SQLite uses malloc.
        // SAFETY: a fresh connection that has used no lookaside memory yet; SQLite allocates the
        // buffer itself (null pointer).
        unsafe {
            rusqlite::ffi::sqlite3_db_config(
                conn.handle(),
                rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
                std::ptr::null_mut::<std::ffi::c_void>(),
                128 as std::ffi::c_int,
                32 as std::ffi::c_int,
            );
        }
        // Closing leaves the log for the next open instead of checkpointing it into the database
        // (which would fsync on the committer for every object that hibernates); the committer
        // checkpoints a log once it is long.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        // Set-up without syncs (a new database took 34 ms here with them, 0.7 ms without): what
        // it writes is synced with the first commit, `new_entries` included.
        conn.pragma_update(None, "synchronous", "OFF")?;
        // EXCLUSIVE before WAL: no shared-memory index file, and a second process opening the
        // same object gets SQLITE_BUSY instead of writing beside us.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(CoreError::Storage(format!("{}: could not use WAL mode", path.display())));
        }
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE IF NOT EXISTS _sw_kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS _sw_meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
             COMMIT;",
        )?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let user_sql = Arc::new(AtomicBool::new(false));
        let denied = Arc::new(Mutex::new(None));
        {
            let (user_sql, denied) = (user_sql.clone(), denied.clone());
            conn.authorizer(Some(move |context: AuthContext<'_>| {
                if !user_sql.load(Ordering::Relaxed) {
                    return Authorization::Allow;
                }
                match refuse_user_action(&context.action) {
                    None => Authorization::Allow,
                    Some(why) => {
                        *denied.lock() = Some(why);
                        Authorization::Deny
                    }
                }
            }))?;
        }
        let log_pages = Arc::new(std::sync::atomic::AtomicI32::new(-1));
        {
            // (After wal_autocheckpoint, which would replace it.)
            let log_pages = log_pages.clone();
            conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                log_pages.store(pages, Ordering::Relaxed);
                Ok(())
            }))?;
        }
        let log_path = PathBuf::from(format!("{}-wal", path.display()));
        let log = File::open(&log_path).ok().map(Arc::new);
        let inner = Inner::new(conn, log, new_entries, user_sql, denied, log_pages, None);
        Ok(Self::from_inner(path, name, owner, inner))
    }

    fn from_inner(path: PathBuf, name: Arc<ObjectName>, owner: u64, inner: Inner) -> Self {
        Self {
            path,
            name,
            owner: std::sync::atomic::AtomicU64::new(owner),
            inner: Mutex::new(inner),
            in_epoch: AtomicBool::new(false),
            close_requested: AtomicBool::new(false),
        }
    }

    /// A store in cluster mode: an in-memory database filled with what PostgreSQL holds for the
    /// object, its commits written to PostgreSQL fenced by `epoch`.
    fn open_remote(
        path: PathBuf,
        name: Arc<ObjectName>,
        owner: u64,
        cluster: &Arc<Cluster>,
        epoch: i64,
    ) -> Result<Self, CoreError> {
        let loaded = cluster.load(&name)?;
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(
            "PRAGMA journal_mode = MEMORY;
             CREATE TABLE _sw_kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE _sw_meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;",
        )?;
        {
            let tx = conn.unchecked_transaction()?;
            {
                let mut insert = tx.prepare("INSERT INTO _sw_kv (key, value) VALUES (?1, ?2)")?;
                for (key, value) in &loaded.pairs {
                    insert.execute(params![key, value])?;
                }
            }
            if let Some(alarm) = &loaded.alarm {
                Self::write_alarm(&tx, alarm)?;
            }
            tx.commit()?;
        }
        let remote = Remote {
            cluster: cluster.clone(),
            epoch,
            touched: std::collections::BTreeSet::new(),
            wiped: false,
        };
        let unused = Arc::new(AtomicBool::new(false));
        let no_log = Arc::new(std::sync::atomic::AtomicI32::new(-1));
        let inner = Inner::new(conn, None, Vec::new(), unused, Arc::default(), no_log, Some(remote));
        Ok(Self::from_inner(path, name, owner, inner))
    }

    /// The lease epoch the store was loaded under (cluster mode), else `None`.
    #[must_use]
    pub fn epoch(&self) -> Option<i64> {
        self.inner.lock().remote.as_ref().map(|remote| remote.epoch)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[must_use]
    pub fn name(&self) -> &Arc<ObjectName> {
        &self.name
    }

    /// The key of the object whose output is dropped if a commit of this store fails.
    #[must_use]
    pub fn owner(&self) -> u64 {
        self.owner.load(Ordering::Relaxed)
    }

    fn set_owner(&self, owner: u64) {
        self.owner.store(owner, Ordering::Relaxed);
    }

    /// Runs `f` on the open connection.
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T, CoreError>) -> Result<T, CoreError> {
        let mut inner = self.inner.lock();
        if inner.conn.is_none() {
            return Err(CoreError::Storage("this object's storage is closed".into()));
        }
        f(&mut inner)
    }

    /// Opens the write transaction if none is open. True when this begins the writes of a new
    /// commit (the caller then tells the gate).
    fn begin_write(inner: &mut Inner) -> Result<bool, CoreError> {
        if inner.write_txn {
            return Ok(false);
        }
        conn(inner).execute_batch("BEGIN")?;
        inner.write_txn = true;
        Ok(true)
    }

    /// The values of `keys` (`None` where absent).
    ///
    /// # Errors
    /// `InvalidArgument` past the key limits; `Storage` for SQLite's errors.
    pub fn get(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, CoreError> {
        check_keys(keys)?;
        self.with(|inner| {
            let mut statement = conn(inner).prepare_cached("SELECT value FROM _sw_kv WHERE key = ?1")?;
            keys.iter()
                .map(|key| Ok(statement.query_row([key.as_bytes()], |row| row.get(0)).optional()?))
                .collect()
        })
    }

    /// Writes every pair, or nothing if one is past a limit. True when the writes of a new
    /// commit begin.
    ///
    /// # Errors
    /// `InvalidArgument` past a limit (nothing written); `Storage` for SQLite's errors.
    pub fn put(&self, pairs: &[(&str, &[u8])]) -> Result<bool, CoreError> {
        let keys: Vec<&str> = pairs.iter().map(|(key, _)| *key).collect();
        check_keys(&keys)?;
        if let Some((key, value)) = pairs.iter().find(|(_, value)| value.len() > MAX_VALUE_BYTES) {
            return Err(CoreError::InvalidArgument(format!(
                "a value is at most {MAX_VALUE_BYTES} bytes serialized; the value of {key:?} is {}",
                value.len()
            )));
        }
        self.with(|inner| {
            let began = Self::begin_write(inner)?;
            let mut statement = conn(inner).prepare_cached(
                "INSERT INTO _sw_kv (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?;
            for (key, value) in pairs {
                statement.execute(params![key.as_bytes(), value])?;
            }
            drop(statement);
            if let Some(remote) = &mut inner.remote {
                remote.touched.extend(pairs.iter().map(|(key, _)| key.as_bytes().to_vec()));
            }
            Ok(began)
        })
    }

    /// Deletes `keys`; returns how many existed, and whether the writes of a new commit begin.
    ///
    /// # Errors
    /// `InvalidArgument` past the key limits; `Storage` for SQLite's errors.
    pub fn delete(&self, keys: &[&str]) -> Result<(u64, bool), CoreError> {
        check_keys(keys)?;
        self.with(|inner| {
            let began = Self::begin_write(inner)?;
            let mut statement = conn(inner).prepare_cached("DELETE FROM _sw_kv WHERE key = ?1")?;
            let mut deleted = 0;
            for key in keys {
                deleted += statement.execute([key.as_bytes()])? as u64;
            }
            drop(statement);
            if let Some(remote) = &mut inner.remote {
                remote.touched.extend(keys.iter().map(|key| key.as_bytes().to_vec()));
            }
            Ok((deleted, began))
        })
    }

    /// Deletes everything the object stored: its keys and its own SQL tables, views and
    /// triggers (as Cloudflare's `deleteAll` does for SQLite-backed objects). The alarm stays.
    /// Returns the KV pairs deleted, and whether the writes of a new commit begin.
    ///
    /// # Errors
    /// `Storage` for SQLite's errors.
    pub fn delete_all(&self) -> Result<(u64, bool), CoreError> {
        self.with(|inner| {
            let began = Self::begin_write(inner)?;
            if let Some(remote) = &mut inner.remote {
                remote.wiped = true;
                remote.touched.clear();
            }
            let conn = conn(inner);
            let deleted = conn.execute("DELETE FROM _sw_kv", [])? as u64;
            let schema: Vec<(String, String)> = conn
                .prepare(
                    "SELECT type, name FROM sqlite_schema
                     WHERE type IN ('table', 'view', 'trigger')
                       AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_sw\\_%' ESCAPE '\\'",
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (kind, name) in schema {
                let quoted = name.replace('"', "\"\"");
                conn.execute_batch(&format!("DROP {} IF EXISTS \"{quoted}\"", kind.to_uppercase()))?;
            }
            Ok((deleted, began))
        })
    }

    /// Pairs in key order (reversed with `reverse`), within the options' bounds.
    ///
    /// # Errors
    /// `Storage` for SQLite's errors.
    pub fn list(&self, options: &ListOptions) -> Result<Vec<(String, Vec<u8>)>, CoreError> {
        let mut clauses = Vec::new();
        let mut bounds: Vec<Vec<u8>> = Vec::new();
        let mut bound = |clause: &str, value: Vec<u8>, bounds: &mut Vec<Vec<u8>>| {
            bounds.push(value);
            clauses.push(format!("key {clause} ?{}", bounds.len()));
        };
        if let Some(prefix) = &options.prefix {
            bound(">=", prefix.as_bytes().to_vec(), &mut bounds);
            if let Some(upper) = prefix_upper_bound(prefix.as_bytes()) {
                bound("<", upper, &mut bounds);
            }
        }
        if let Some(start) = &options.start {
            bound(">=", start.as_bytes().to_vec(), &mut bounds);
        }
        if let Some(after) = &options.start_after {
            bound(">", after.as_bytes().to_vec(), &mut bounds);
        }
        if let Some(end) = &options.end {
            bound("<", end.as_bytes().to_vec(), &mut bounds);
        }
        let filter =
            if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        let order = if options.reverse { "DESC" } else { "ASC" };
        let limit = options.limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let sql = format!("SELECT key, value FROM _sw_kv {filter} ORDER BY key {order} LIMIT {limit}");
        self.with(|inner| {
            let mut statement = conn(inner).prepare_cached(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(bounds.iter()), |row| {
                let key: Vec<u8> = row.get(0)?;
                Ok((String::from_utf8_lossy(&key).into_owned(), row.get(1)?))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Runs the application's SQL: one statement or several separated by `;`, the bindings
    /// taken in order by the statements' placeholders. Returns the result and whether the writes
    /// of a new commit begin.
    ///
    /// # Errors
    /// `Storage` with SQLite's message (or the authorizer's reason), `InvalidArgument` when the
    /// bindings do not match the placeholders.
    pub fn exec(&self, sql: &str, bindings: Vec<SqlValue>) -> Result<(SqlResult, bool), CoreError> {
        self.with(|inner| {
            if inner.remote.is_some() {
                return Err(CoreError::Storage(NO_SQL_IN_CLUSTER.into()));
            }
            inner.user_sql.store(true, Ordering::Relaxed);
            *inner.denied.lock() = None;
            let connection = inner.conn.as_ref().expect("checked open by Store::with");
            let outcome = Self::exec_user(connection, &inner.user_sql, &mut inner.write_txn, sql, bindings);
            inner.user_sql.store(false, Ordering::Relaxed);
            outcome.map_err(|error| match (error, inner.denied.lock().take()) {
                (CoreError::Storage(message), Some(why)) => CoreError::Storage(format!("{message}: {why}")),
                (error, _) => error,
            })
        })
    }

    fn exec_user(
        connection: &Connection,
        user_sql: &AtomicBool,
        write_txn: &mut bool,
        sql: &str,
        bindings: Vec<SqlValue>,
    ) -> Result<(SqlResult, bool), CoreError> {
        use rusqlite::fallible_iterator::FallibleIterator;
        let total = bindings.len();
        let mut bindings = bindings.into_iter();
        let mut result = SqlResult::default();
        let mut began = false;
        // SQLite prepares each statement only once the one before has run (it may create the
        // table the next one uses), and finds where each ends (a trigger's body has `;` too).
        let mut batch = rusqlite::Batch::new(connection, sql);
        while let Some(mut statement) = batch.next()? {
            if !statement.readonly() && !*write_txn {
                user_sql.store(false, Ordering::Relaxed);
                let begun = connection.execute_batch("BEGIN");
                user_sql.store(true, Ordering::Relaxed);
                begun?;
                *write_txn = true;
                began = true;
            }
            for index in 1..=statement.parameter_count() {
                let value = bindings.next().ok_or_else(|| {
                    CoreError::InvalidArgument(format!(
                        "the SQL has more placeholders than the {total} bindings given"
                    ))
                })?;
                statement.raw_bind_parameter(index, Value::from(value))?;
            }
            let changes_before = connection.total_changes();
            let columns: Vec<String> = statement.column_names().map(str::to_owned).collect();
            let mut rows = Vec::new();
            {
                let mut cursor = statement.raw_query();
                while let Some(row) = cursor.next()? {
                    let values = (0..columns.len()).map(|i| row.get_ref(i).map(SqlValue::from));
                    rows.push(values.collect::<Result<Vec<_>, _>>()?);
                }
            }
            // A full scan of n rows steps forward n - 1 times (the first row is reached by the
            // rewind): rows read are the rows it went over, or those returned, whichever is more.
            let steps = u64::try_from(statement.get_status(StatementStatus::FullscanStep)).unwrap_or(0);
            let scanned = if steps > 0 { steps + 1 } else { 0 };
            result.rows_read += scanned.max(rows.len() as u64);
            // (The delta of the total: `changes()` keeps the count of the last DML statement, so a
            // CREATE after an INSERT would report the INSERT's rows.)
            result.rows_written += connection.total_changes() - changes_before;
            if !columns.is_empty() {
                result.columns = columns;
                result.rows = rows;
            }
        }
        if bindings.next().is_some() {
            return Err(CoreError::InvalidArgument(format!(
                "{total} bindings given, more than the SQL has placeholders"
            )));
        }
        Ok((result, began))
    }

    /// The size of the database file, in bytes (pages in use times the page size).
    ///
    /// # Errors
    /// `Storage` for SQLite's errors.
    pub fn database_size(&self) -> Result<u64, CoreError> {
        self.with(|inner| {
            if inner.remote.is_some() {
                // (The pairs' bytes: PostgreSQL's pages are shared by every object.)
                let bytes: i64 = conn(inner).query_row(
                    "SELECT coalesce(sum(length(key) + length(value)), 0) FROM _sw_kv",
                    [],
                    |row| row.get(0),
                )?;
                return Ok(u64::try_from(bytes).unwrap_or(0));
            }
            let conn = conn(inner);
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
            let size: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
            Ok(u64::try_from(pages * size).unwrap_or(0))
        })
    }

    /// Begins a `transaction()` block. True when the writes of a new commit begin.
    ///
    /// # Errors
    /// `Storage` for SQLite's errors.
    pub fn savepoint(&self) -> Result<bool, CoreError> {
        self.with(|inner| {
            let began = Self::begin_write(inner)?;
            inner.savepoints += 1;
            conn(inner).execute_batch(&format!("SAVEPOINT sw_block_{}", inner.savepoints))?;
            Ok(began)
        })
    }

    /// Ends the innermost `transaction()` block: its writes join the event's, or (`rollback`)
    /// are undone.
    ///
    /// # Errors
    /// `Storage` for SQLite's errors, `InvalidArgument` when no block is open.
    pub fn end_savepoint(&self, rollback: bool) -> Result<(), CoreError> {
        self.with(|inner| {
            if inner.savepoints == 0 {
                return Err(CoreError::InvalidArgument("no transaction() block is open".into()));
            }
            let name = format!("sw_block_{}", inner.savepoints);
            inner.savepoints -= 1;
            let conn = conn(inner);
            if rollback {
                conn.execute_batch(&format!("ROLLBACK TO {name}; RELEASE {name}"))?;
            } else {
                conn.execute_batch(&format!("RELEASE {name}"))?;
            }
            Ok(())
        })
    }

    /// The alarm, if set.
    ///
    /// # Errors
    /// `Storage` for SQLite's errors.
    pub fn alarm(&self) -> Result<Option<Alarm>, CoreError> {
        self.with(|inner| Self::read_alarm(conn(inner)))
    }

    fn read_alarm(conn: &Connection) -> Result<Option<Alarm>, CoreError> {
        let mut statement = conn.prepare_cached("SELECT value FROM _sw_meta WHERE name = ?1")?;
        let at: Option<f64> = statement.query_row(["alarm"], |row| row.get(0)).optional()?;
        let Some(at) = at else { return Ok(None) };
        let account: Option<String> = statement.query_row(["alarm_account"], |row| row.get(0)).optional()?;
        let id_name: Option<String> = statement.query_row(["alarm_name"], |row| row.get(0)).optional()?;
        Ok(Some(Alarm { at, account: account.unwrap_or_else(|| "default".into()), id_name }))
    }

    /// Sets (`Some`) or deletes (`None`) the alarm. True when the writes of a new commit begin.
    ///
    /// # Errors
    /// `InvalidArgument` for a time that is not finite; `Storage` for SQLite's errors.
    pub fn set_alarm(&self, alarm: Option<&Alarm>) -> Result<bool, CoreError> {
        if alarm.is_some_and(|alarm| !alarm.at.is_finite()) {
            return Err(CoreError::InvalidArgument("an alarm time is a finite number of seconds".into()));
        }
        self.with(|inner| {
            let began = Self::begin_write(inner)?;
            inner.alarm_touched = true;
            let conn = conn(inner);
            conn.execute("DELETE FROM _sw_meta WHERE name IN ('alarm', 'alarm_account', 'alarm_name')", [])?;
            if let Some(alarm) = alarm {
                Self::write_alarm(conn, alarm)?;
            }
            Ok(began)
        })
    }

    /// The alarm's rows in `_sw_meta` (after the old ones were deleted).
    fn write_alarm(conn: &Connection, alarm: &Alarm) -> Result<(), CoreError> {
        let mut insert = conn.prepare_cached("INSERT INTO _sw_meta (name, value) VALUES (?1, ?2)")?;
        insert.execute(params!["alarm", alarm.at])?;
        insert.execute(params!["alarm_account", alarm.account])?;
        if let Some(id_name) = &alarm.id_name {
            insert.execute(params!["alarm_name", id_name])?;
        }
        Ok(())
    }

    /// The alarm the open transaction would commit, when it touched the alarm (read before the
    /// commit: the gate writes the alarm index first, so the index always covers the stores).
    pub(crate) fn pending_alarm(&self) -> Result<Option<Option<Alarm>>, CoreError> {
        self.with(|inner| {
            if !inner.alarm_touched {
                return Ok(None);
            }
            Ok(Some(Self::read_alarm(conn(inner))?))
        })
    }

    /// A `transaction()` block is open: the commit waits for it to end.
    pub(crate) fn in_block(&self) -> bool {
        self.inner.lock().savepoints > 0
    }

    /// Commits the open write transaction. On failure the transaction is rolled back, and the
    /// error says why.
    pub(crate) fn commit(&self) -> Result<Committed, CoreError> {
        let mut inner = self.inner.lock();
        if !inner.write_txn || inner.conn.is_none() {
            return Ok(Committed::default());
        }
        inner.write_txn = false;
        let alarm_touched = std::mem::take(&mut inner.alarm_touched);
        let alarm = if alarm_touched { Self::read_alarm(conn(&inner)).ok() } else { None };
        inner.log_pages.store(-1, Ordering::Relaxed);
        if inner.remote.is_some() {
            return Self::commit_remote(&self.name, &mut inner, alarm);
        }
        if let Err(error) = conn(&inner).execute_batch("COMMIT") {
            let _ = conn(&inner).execute_batch("ROLLBACK");
            return Err(storage_error(&error));
        }
        let pages = inner.log_pages.load(Ordering::Relaxed);
        if pages < 0 {
            // The transaction wrote nothing (a CREATE TABLE IF NOT EXISTS, say): no log to sync.
            return Ok(Committed { alarm, ..Committed::default() });
        }
        if inner.log.is_none() {
            let log_path = PathBuf::from(format!("{}-wal", self.path.display()));
            inner.log = File::open(log_path).ok().map(Arc::new);
        }
        Ok(Committed {
            log: inner.log.clone(),
            new_entries: std::mem::take(&mut inner.new_entries),
            alarm,
            wants_checkpoint: pages > CHECKPOINT_PAGES,
        })
    }

    /// Cluster mode: writes the transaction's changes to PostgreSQL (fenced), then commits the
    /// in-memory copy; on failure both are left as they were before the transaction.
    fn commit_remote(
        name: &ObjectName,
        inner: &mut Inner,
        alarm: Option<Option<Alarm>>,
    ) -> Result<Committed, CoreError> {
        let remote = inner.remote.as_mut().expect("called in cluster mode");
        let touched = std::mem::take(&mut remote.touched);
        let wipe = std::mem::take(&mut remote.wiped);
        let (cluster, epoch) = (remote.cluster.clone(), remote.epoch);
        let conn = inner.conn.as_ref().expect("checked open by commit");
        let changes = (|| -> Result<Changes, CoreError> {
            let mut changes = Changes { wipe, alarm: alarm.clone(), ..Changes::default() };
            if wipe {
                let mut all = conn.prepare("SELECT key, value FROM _sw_kv")?;
                let rows = all.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                changes.upserts = rows.collect::<Result<_, _>>()?;
            } else {
                let mut read = conn.prepare_cached("SELECT value FROM _sw_kv WHERE key = ?1")?;
                for key in touched {
                    match read.query_row([&key], |row| row.get::<_, Vec<u8>>(0)).optional()? {
                        Some(value) => changes.upserts.push((key, value)),
                        None => changes.deletes.push(key),
                    }
                }
            }
            Ok(changes)
        })();
        let written = changes.and_then(|changes| {
            if changes.upserts.is_empty()
                && changes.deletes.is_empty()
                && !changes.wipe
                && changes.alarm.is_none()
            {
                return Ok(());
            }
            cluster.commit(name, epoch, changes)
        });
        if let Err(error) = written {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(error);
        }
        if let Err(error) = conn.execute_batch("COMMIT") {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(storage_error(&error));
        }
        Ok(Committed { alarm, ..Committed::default() })
    }

    /// Undoes the open write transaction (its commit cannot be allowed to happen).
    pub(crate) fn rollback(&self) {
        let mut inner = self.inner.lock();
        if let Some(remote) = &mut inner.remote {
            remote.touched.clear();
            remote.wiped = false;
        }
        if inner.write_txn {
            inner.write_txn = false;
            inner.alarm_touched = false;
            inner.savepoints = 0;
            if let Some(conn) = &inner.conn {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
    }

    /// Copies the log into the database and empties it (on the committer thread).
    pub(crate) fn checkpoint(&self) {
        let inner = self.inner.lock();
        if let Some(conn) = &inner.conn {
            if !inner.write_txn {
                if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                    log::warn!("checkpoint of {}: {e}", self.path.display());
                }
            }
        }
    }

    /// Closes the database (an open write transaction is rolled back: the gate closes a store
    /// only after its last commit).
    fn close(&self) {
        let mut inner = self.inner.lock();
        inner.log = None;
        if let Some(conn) = inner.conn.take() {
            if let Err((_, e)) = conn.close() {
                log::warn!("closing {}: {e}", self.path.display());
            }
        }
    }
}

fn conn(inner: &Inner) -> &Connection {
    inner.conn.as_ref().expect("checked open by Store::with")
}

fn check_keys(keys: &[&str]) -> Result<(), CoreError> {
    if keys.len() > MAX_KEYS_PER_CALL {
        return Err(CoreError::InvalidArgument(format!(
            "at most {MAX_KEYS_PER_CALL} keys per call, not {}",
            keys.len()
        )));
    }
    if let Some(key) = keys.iter().find(|key| key.len() > MAX_KEY_BYTES) {
        return Err(CoreError::InvalidArgument(format!(
            "a key is at most {MAX_KEY_BYTES} bytes of UTF-8, not {}",
            key.len()
        )));
    }
    Ok(())
}

/// The smallest byte string greater than every string starting with `prefix` (none when the
/// prefix is all 0xFF bytes, which cannot happen for UTF-8 but is handled anyway).
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xFF {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_storage(durability: Durability) -> (Storage, PathBuf) {
        let dir = std::env::temp_dir().join(format!("sw-storage-{}-{}", std::process::id(), rand_suffix()));
        let storage =
            Storage::open(&StorageConfig { data_dir: dir.clone(), durability, cluster: None }).unwrap();
        (storage, dir)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::AtomicU64;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    const ID: &str = "00ab000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn paths_are_sharded_and_names_checked() {
        let p = object_path(Path::new("/d"), "ROOMS", ID).unwrap();
        assert_eq!(p, Path::new("/d/ROOMS/00a").join(format!("{ID}.sqlite")));
        assert!(object_path(Path::new("/d"), "../x", ID).is_err());
        assert!(object_path(Path::new("/d"), "ROOMS", "../../etc/passwd").is_err());
    }

    #[test]
    fn kv_round_trip_limits_and_list_order() {
        let (storage, dir) = temp_storage(Durability::Normal);
        let store = storage.store("NS", ID, 1).unwrap();
        assert!(store.put(&[("b", b"2"), ("a", b"1"), ("c", b"3"), ("ab", b"x")]).unwrap());
        assert!(!store.put(&[("d", b"4")]).unwrap(), "the same commit goes on");
        assert_eq!(store.get(&["a", "zz"]).unwrap(), vec![Some(b"1".to_vec()), None]);
        let keys = |options: ListOptions| -> Vec<String> {
            store.list(&options).unwrap().into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(keys(ListOptions::default()), ["a", "ab", "b", "c", "d"]);
        assert_eq!(keys(ListOptions { prefix: Some("a".into()), ..Default::default() }), ["a", "ab"]);
        assert_eq!(
            keys(ListOptions { start: Some("ab".into()), end: Some("c".into()), ..Default::default() }),
            ["ab", "b"]
        );
        assert_eq!(keys(ListOptions { reverse: true, limit: Some(2), ..Default::default() }), ["d", "c"]);
        assert_eq!(keys(ListOptions { start_after: Some("b".into()), ..Default::default() }), ["c", "d"]);
        assert_eq!(store.delete(&["a", "nope"]).unwrap().0, 1);
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(store.put(&[("ok", b""), (&long, b"")]), Err(CoreError::InvalidArgument(_))));
        assert_eq!(store.get(&["ok"]).unwrap(), vec![None], "nothing of a refused call is written");
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(store.put(&[("big", &big)]), Err(CoreError::InvalidArgument(_))));
        let many: Vec<String> = (0..=MAX_KEYS_PER_CALL).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(store.get(&many), Err(CoreError::InvalidArgument(_))));
        store.commit().unwrap();
        drop(store);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn sql_results_counts_and_the_reserved_tables() {
        let (storage, dir) = temp_storage(Durability::Normal);
        let store = storage.store("NS", ID, 1).unwrap();
        let (_, began) = store
            .exec(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO t (name) VALUES (?), (?)",
                vec![SqlValue::Text("ann".into()), SqlValue::Text("bob".into())],
            )
            .unwrap();
        assert!(began);
        let (result, _) =
            store.exec("SELECT id, name FROM t WHERE name = ?", vec![SqlValue::Text("bob".into())]).unwrap();
        assert_eq!(result.columns, ["id", "name"]);
        assert_eq!(result.rows, vec![vec![SqlValue::Integer(2), SqlValue::Text("bob".into())]]);
        assert!(result.rows_read >= 1);
        let (result, _) = store.exec("UPDATE t SET name = 'x'", vec![]).unwrap();
        assert_eq!(result.rows_written, 2);
        // A trigger's body has its own `;`: SQLite, not a naive split, finds where it ends.
        store
            .exec(
                "CREATE TABLE log (n); CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO log VALUES (1); END;
                 INSERT INTO t (name) VALUES ('cy')",
                vec![],
            )
            .unwrap();
        assert_eq!(
            store.exec("SELECT count(*) FROM log", vec![]).unwrap().0.rows[0][0],
            SqlValue::Integer(1)
        );
        for refused in [
            "SELECT * FROM _sw_kv",
            "DROP TABLE _SW_meta",
            "BEGIN",
            "PRAGMA journal_mode = DELETE",
            "SAVEPOINT a",
        ] {
            match store.exec(refused, vec![]) {
                Err(CoreError::Storage(message)) => assert!(
                    ["reserved", "transaction()", "not allowed"].iter().any(|why| message.contains(why)),
                    "{refused}: {message}"
                ),
                other => panic!("{refused}: {other:?}"),
            }
        }
        assert!(matches!(store.exec("SELECT ?", vec![]), Err(CoreError::InvalidArgument(_))));
        assert!(matches!(store.exec("SELECT 1", vec![SqlValue::Null]), Err(CoreError::InvalidArgument(_))));
        assert!(matches!(store.exec("SELEC 1", vec![]), Err(CoreError::Storage(_))));
        // The application's reads of its own tables still work after a refusal.
        assert_eq!(
            store.exec("SELECT count(*) AS n FROM t", vec![]).unwrap().0.rows[0][0],
            SqlValue::Integer(3)
        );
        store.commit().unwrap();
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn savepoints_roll_back_their_block_only() {
        let (storage, dir) = temp_storage(Durability::Normal);
        let store = storage.store("NS", ID, 1).unwrap();
        store.put(&[("kept", b"1")]).unwrap();
        store.savepoint().unwrap();
        store.put(&[("undone", b"1")]).unwrap();
        assert!(store.in_block());
        store.end_savepoint(true).unwrap();
        assert!(!store.in_block());
        store.commit().unwrap();
        assert_eq!(store.get(&["kept", "undone"]).unwrap(), vec![Some(b"1".to_vec()), None]);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn commits_survive_reopening_and_uncommitted_writes_do_not() {
        let (storage, dir) = temp_storage(Durability::Full);
        let store = storage.store("NS", ID, 1).unwrap();
        store.put(&[("a", b"1")]).unwrap();
        let alarm = Alarm { at: 123.5, account: "acct".into(), id_name: Some("room".into()) };
        store.set_alarm(Some(&alarm)).unwrap();
        let committed = store.commit().unwrap();
        assert_eq!(committed.alarm, Some(Some(alarm.clone())));
        assert!(committed.log.is_some());
        store.put(&[("b", b"2")]).unwrap();
        store.close_requested.store(true, Ordering::Release);
        storage.close(&store);
        assert!(store.get(&["a"]).is_err(), "a closed store says so");
        let again = storage.store("NS", ID, 1).unwrap();
        assert_eq!(again.get(&["a", "b"]).unwrap(), vec![Some(b"1".to_vec()), None]);
        assert_eq!(again.alarm().unwrap(), Some(alarm));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_commit_that_wrote_nothing_has_no_log_to_sync() {
        let (storage, dir) = temp_storage(Durability::Full);
        let store = storage.store("NS", ID, 1).unwrap();
        assert!(store.exec("CREATE TABLE IF NOT EXISTS t (x)", vec![]).unwrap().1);
        assert!(store.commit().unwrap().log.is_some());
        assert!(store.exec("CREATE TABLE IF NOT EXISTS t (x)", vec![]).unwrap().1, "a write, to SQLite");
        assert!(store.commit().unwrap().log.is_none(), "but nothing reached the log");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_closing_store_is_taken_back() {
        let (storage, dir) = temp_storage(Durability::Normal);
        let store = storage.store("NS", ID, 1).unwrap();
        store.close_requested.store(true, Ordering::Release);
        let again = storage.store("NS", ID, 2).unwrap();
        assert!(Arc::ptr_eq(&store, &again));
        storage.close(&store);
        assert!(again.get(&["x"]).is_ok(), "the close was called off");
        assert_eq!(again.owner(), 2);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn delete_all_drops_the_applications_tables_and_keeps_the_alarm() {
        let (storage, dir) = temp_storage(Durability::Normal);
        let store = storage.store("NS", ID, 1).unwrap();
        store.exec("CREATE TABLE t (x); CREATE VIEW v AS SELECT x FROM t", vec![]).unwrap();
        store.put(&[("a", b"1"), ("b", b"2")]).unwrap();
        store.set_alarm(Some(&Alarm { at: 5.0, account: "default".into(), id_name: None })).unwrap();
        assert_eq!(store.delete_all().unwrap().0, 2);
        assert!(store.exec("SELECT * FROM t", vec![]).is_err());
        assert!(store.alarm().unwrap().is_some());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_corrupt_database_fails_alone() {
        let (storage, dir) = temp_storage(Durability::Normal);
        let path = object_path(&dir, "NS", ID).unwrap();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"this is not a database, just some bytes of a broken file........").unwrap();
        match storage.store("NS", ID, 1) {
            Err(CoreError::Storage(message)) => assert!(message.contains("not a database"), "{message}"),
            other => panic!("{other:?}"),
        }
        let other = "11ab000000000000000000000000000000000000000000000000000000000001";
        assert!(storage.store("NS", other, 2).is_ok());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn prefix_bounds() {
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(&[b'a', 0xFF]), Some(b"b".to_vec()));
    }
}
