//! Cluster mode (SPEC §7): nodes that share one PostgreSQL database. It holds who owns each
//! resident object (a lease row with an epoch), the objects' KV pairs and alarms, and the nodes'
//! addresses; nothing here is consensus of our own.
//!
//! - **Leases**: a node takes an object that is unowned (or whose lease expired, or that it owned
//!   before a restart) by raising its epoch in one statement. While the object is resident (or
//!   holds sockets here) the node renews all its leases in one statement per round, with its
//!   own heartbeat. A lease not renewed (the round found another epoch) is lost: the node stops
//!   serving the object.
//! - **Fencing**: a commit of an object's writes runs in one PostgreSQL transaction that first
//!   locks the object's lease row and checks it still names this node and this epoch; if not,
//!   nothing is written and the commit fails (the gate drops the object's held output).
//! - **Alarms**: each round also reads the alarms due soon of objects that nobody else holds,
//!   and arms them here; firing one takes the object's lease first.
//!
//! The PostgreSQL client is the `postgres` crate, on threads of its own: one serves the
//! application thread (taking leases, loading an object, committing), one the background rounds.
//! Neither runs inside the core's tokio runtime, which the application thread may be driving.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postgres::{Client, NoTls};

use crate::error::CoreError;
use crate::keys::{Alarm, ObjectName};

/// The schema, one step per version; a node applies the steps past the database's version at
/// start-up (under an advisory lock, so that nodes starting together do not race).
const MIGRATIONS: &[&str] = &[
    // 1: nodes, leases, KV pairs, alarms.
    "CREATE TABLE sw_nodes (
         node text PRIMARY KEY,
         advertise text NOT NULL,
         heartbeat_at timestamptz NOT NULL
     );
     CREATE TABLE sw_leases (
         namespace text NOT NULL,
         object_id text NOT NULL,
         node text NOT NULL,
         epoch bigint NOT NULL,
         expires_at timestamptz NOT NULL,
         PRIMARY KEY (namespace, object_id)
     );
     CREATE INDEX sw_leases_node ON sw_leases (node);
     CREATE TABLE sw_kv (
         namespace text NOT NULL,
         object_id text NOT NULL,
         key bytea NOT NULL,
         value bytea NOT NULL,
         PRIMARY KEY (namespace, object_id, key)
     );
     CREATE TABLE sw_alarms (
         namespace text NOT NULL,
         object_id text NOT NULL,
         at double precision NOT NULL,
         account text NOT NULL,
         id_name text,
         PRIMARY KEY (namespace, object_id)
     );
     CREATE INDEX sw_alarms_at ON sw_alarms (at);",
    // 2: a lease is valid while its node's heartbeat is (one row renewed per round, not one
    // per object); a lease row's own expiry now only marks a lease given up.
    "ALTER TABLE sw_nodes ADD COLUMN expires_at timestamptz NOT NULL DEFAULT '-infinity';
     CREATE VIEW sw_lease_status AS
         SELECT l.namespace, l.object_id, l.node, l.epoch,
                l.expires_at > clock_timestamp()
                    AND coalesce(n.expires_at > clock_timestamp(), false) AS live
         FROM sw_leases l LEFT JOIN sw_nodes n ON n.node = l.node;",
];

/// A key for `pg_advisory_xact_lock` while migrating ("sockwrkr" in ASCII).
const MIGRATION_LOCK: i64 = 0x736f_636b_7772_6b72;

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `postgresql://...` (libpq's URL or key=value form; TLS to PostgreSQL is not supported yet).
    pub dsn: String,
    /// This node's name, unique in the cluster.
    pub node_id: String,
    /// Where other nodes reach this one (`host:port` of its listening socket).
    pub advertise: String,
    /// How long a lease lasts without renewal: a dead owner's objects move after this.
    pub lease: Duration,
    /// How often the leases are renewed (and alarms read); well under `lease`.
    pub renew: Duration,
}

/// Arms an alarm found in PostgreSQL: (object, when, the name its id was made from).
pub type Arm = Arc<dyn Fn(&Arc<ObjectName>, f64, Option<&str>) + Send + Sync>;

/// Who serves an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node holds the lease, with this epoch.
    Here { epoch: i64 },
    /// Another node holds a live lease; `advertise` is where it listens (if it registered).
    There { node: String, advertise: Option<String> },
}

/// The writes of one commit of one object.
#[derive(Debug, Default)]
pub struct Changes {
    /// `delete_all` ran: every pair goes first.
    pub wipe: bool,
    pub upserts: Vec<(Vec<u8>, Vec<u8>)>,
    pub deletes: Vec<Vec<u8>>,
    /// The alarm after the commit, when it changed.
    pub alarm: Option<Option<Alarm>>,
}

/// What a newly taken object holds.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    pub alarm: Option<Alarm>,
}

/// Counters for metrics and the benchmark.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub statements: AtomicU64,
    pub acquired: AtomicU64,
    pub renew_rounds: AtomicU64,
    pub lost: AtomicU64,
    pub fenced: AtomicU64,
    pub commits: AtomicU64,
}

type Job = Box<dyn FnOnce(&mut Option<Conn>, &str) + Send>;

/// A connection and the statements prepared on it: a statement given as text is parsed once per
/// connection, not at each call (which costs PostgreSQL a second round trip each time).
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, postgres::Statement>,
}

impl Conn {
    fn statement(&mut self, sql: &'static str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }

    fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<postgres::Row, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_one(&statement, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Option<postgres::Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_opt(&statement, params)
    }
}

/// One PostgreSQL connection on a thread of its own; `call` runs a closure on it and waits.
/// A failed connection is dropped and made again by the next call.
struct Pg {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Connections found broken (each one dropped, to be made again).
    broken: Arc<AtomicU64>,
}

impl Pg {
    fn start(name: &str, dsn: &str) -> Result<Self, CoreError> {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let dsn = dsn.to_owned();
        std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut client = None;
            for job in receiver {
                job(&mut client, &dsn);
                if client.as_ref().is_some_and(|conn: &Conn| conn.client.is_closed()) {
                    client = None;
                }
            }
        })?;
        Ok(Self { jobs: Mutex::new(jobs), broken: Arc::default() })
    }

    /// [`Self::call`], made once more on a new connection when it failed because the connection
    /// had broken (while idle, one is found broken only when used: PostgreSQL restarted, or the
    /// network cut it). For statements that may run twice.
    fn call_again_if_broken<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Conn) -> Result<T, postgres::Error> + Clone + Send + 'static,
    ) -> Result<T, CoreError> {
        let broken = self.broken.load(Ordering::Acquire);
        match self.call(f.clone()) {
            Err(_) if self.broken.load(Ordering::Acquire) != broken => self.call(f),
            outcome => outcome,
        }
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, CoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let broken = self.broken.clone();
        let job: Job = Box::new(move |slot, dsn| {
            let outcome = match connected(slot, dsn) {
                Err(error) => Err(error),
                Ok(client) => match f(client) {
                    Ok(value) => Ok(value),
                    Err(error) => {
                        if error.is_closed() || error.as_db_error().is_none() {
                            // A broken connection: the next call makes a new one.
                            *slot = None;
                            broken.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(CoreError::Storage(format!("the cluster database: {}", pg_error(&error))))
                    }
                },
            };
            let _ = reply.send(outcome);
        });
        let stopped = || CoreError::Storage("the cluster database thread stopped".into());
        self.jobs.lock().send(job).map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }
}

fn connected<'a>(slot: &'a mut Option<Conn>, dsn: &str) -> Result<&'a mut Conn, CoreError> {
    if slot.is_none() {
        let mut config = postgres::Config::from_str(dsn)
            .map_err(|e| CoreError::InvalidArgument(format!("the cluster DSN is not valid: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(10));
        if config.get_application_name().is_none() {
            config.application_name("sockworker");
        }
        if config.get_options().is_none() {
            // (The migration's CREATE ... IF NOT EXISTS would log a NOTICE at every start.)
            config.options("-c client_min_messages=warning");
        }
        let client = config.connect(NoTls).map_err(|e| {
            CoreError::Storage(format!("the cluster database is unreachable: {}", pg_error(&e)))
        })?;
        *slot = Some(Conn { client, prepared: HashMap::new() });
    }
    Ok(slot.as_mut().expect("connected above"))
}

/// PostgreSQL's own message where there is one (the `Display` of the error says only "db error").
fn pg_error(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            use std::error::Error as _;
            match error.source() {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            }
        }
    }
}

/// Seconds as PostgreSQL's interval argument.
fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Forgets the owners seen elsewhere whose time to be trusted ended before `now`: without it,
/// every distinct object another node owns and this one forwarded to once stayed in the map.
fn forget_expired(elsewhere: &mut HashMap<ObjectName, (Owner, Instant)>, now: Instant) {
    elsewhere.retain(|_, (_, until)| *until > now);
    crate::memory::shrink_sparse(elsewhere, 64);
}

/// This node's part of the cluster: its leases, the database connections, the background round.
pub struct Cluster {
    config: ClusterConfig,
    /// For the application thread: loading objects, committing.
    fg: Pg,
    /// For taking leases (asked from a worker thread of the application's loop): a take that
    /// waits for PostgreSQL holds up no commit of an object this node has.
    taking: Pg,
    /// For the background round: renewals, releases, alarms.
    bg: Pg,
    /// This node's leases: object -> epoch. All of them are as valid as the node's heartbeat.
    held: Mutex<HashMap<ObjectName, i64>>,
    /// Until when this node may count on its heartbeat (start of the last renewal that
    /// succeeded + the lease length), and with it on every lease it holds.
    alive_until: Mutex<Instant>,
    /// Leases given up (the object left this node), sent with the next round.
    releasing: Mutex<Vec<(ObjectName, i64)>>,
    /// Leases found lost by a round or a commit, until the application thread asks.
    lost: Mutex<Vec<ObjectName>>,
    /// Owners seen elsewhere, kept for a renewal interval (a forward does not query each time);
    /// each round forgets those that expired.
    elsewhere: Mutex<HashMap<ObjectName, (Owner, Instant)>>,
    /// Alarms armed by a round (so that the next does not arm them again).
    armed: Mutex<HashMap<ObjectName, f64>>,
    alarms: Mutex<Option<Arm>>,
    /// The other nodes with a recent heartbeat, and their addresses (as of the last round).
    peers: Mutex<Vec<(String, String)>>,
    stop: AtomicBool,
    wake: parking_lot::Condvar,
    wake_lock: Mutex<()>,
    pub stats: ClusterStats,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.config.node_id).finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects, migrates the schema and registers the node; then starts the background round.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad DSN or lease settings; `Storage` when PostgreSQL cannot be
    /// reached or the schema is newer than this build knows.
    pub fn start(config: ClusterConfig) -> Result<Arc<Self>, CoreError> {
        if config.renew.is_zero() || config.renew >= config.lease {
            return Err(CoreError::InvalidArgument(format!(
                "the lease renewal interval ({:?}) must be shorter than the lease ({:?})",
                config.renew, config.lease
            )));
        }
        if config.node_id.is_empty() || config.node_id.len() > 200 {
            return Err(CoreError::InvalidArgument("a node id is 1 to 200 characters".into()));
        }
        let fg = Pg::start("sockworker-pg", &config.dsn)?;
        let taking = Pg::start("sockworker-pg-take", &config.dsn)?;
        let bg = Pg::start("sockworker-pg-bg", &config.dsn)?;
        let cluster = Arc::new(Self {
            config,
            fg,
            taking,
            bg,
            held: Mutex::default(),
            alive_until: Mutex::new(Instant::now()),
            releasing: Mutex::default(),
            lost: Mutex::default(),
            elsewhere: Mutex::default(),
            armed: Mutex::default(),
            alarms: Mutex::new(None),
            peers: Mutex::default(),
            stop: AtomicBool::new(false),
            wake: parking_lot::Condvar::new(),
            wake_lock: Mutex::new(()),
            stats: ClusterStats::default(),
        });
        cluster.fg.call(migrate)??;
        cluster.beat()?;
        if let Err(error) = cluster.round() {
            log::warn!("cluster: the first round failed: {error}");
        }
        let background = Arc::downgrade(&cluster);
        std::thread::Builder::new().name("sockworker-lease".into()).spawn(move || loop {
            let Some(cluster) = background.upgrade() else { return };
            if cluster.stop.load(Ordering::Acquire) {
                return;
            }
            if let Err(error) = cluster.round() {
                log::warn!("cluster: lease renewal failed: {error}");
            }
            let renew = cluster.config.renew;
            let mut guard = cluster.wake_lock.lock();
            if !cluster.stop.load(Ordering::Acquire) {
                cluster.wake.wait_for(&mut guard, renew);
            }
        })?;
        Ok(cluster)
    }

    #[must_use]
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// What a round calls for each alarm it finds due soon (the gate arms its scheduler).
    pub fn set_alarms(&self, arm: Arm) {
        *self.alarms.lock() = Some(arm);
    }

    /// The node's row at start-up: its address and a heartbeat, valid for one lease.
    fn beat(&self) -> Result<(), CoreError> {
        let started = Instant::now();
        let (node, advertise) = (self.config.node_id.clone(), self.config.advertise.clone());
        let lease = secs(self.config.lease);
        self.stats.statements.fetch_add(1, Ordering::Relaxed);
        self.fg.call(move |conn| {
            conn.execute(
                "INSERT INTO sw_nodes (node, advertise, heartbeat_at, expires_at)
                 VALUES ($1, $2, clock_timestamp(), clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (node) DO UPDATE SET advertise = excluded.advertise,
                     heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at",
                &[&node, &advertise, &lease],
            )
        })?;
        *self.alive_until.lock() = started + self.config.lease;
        Ok(())
    }

    /// Who serves `name` now: this node (taking the lease if it is free, expired or this node's
    /// from before a restart) or another one. Answers from memory while this node's lease is
    /// valid; otherwise asks PostgreSQL (one statement).
    ///
    /// # Errors
    /// `Storage` when PostgreSQL cannot be reached.
    pub fn route(&self, name: &ObjectName) -> Result<Owner, CoreError> {
        match self.known_route(name) {
            Some(owner) => Ok(owner),
            None => self.acquire(name),
        }
    }

    /// [`Self::route`] when memory can answer (this node's lease is valid, or another node's
    /// was seen within a renewal interval); `None` when PostgreSQL must be asked.
    #[must_use]
    pub fn known_route(&self, name: &ObjectName) -> Option<Owner> {
        let now = Instant::now();
        if let Some(epoch) = self.held.lock().get(name) {
            if *self.alive_until.lock() > now {
                return Some(Owner::Here { epoch: *epoch });
            }
        }
        match self.elsewhere.lock().get(name) {
            Some((owner, until)) if *until > now => Some(owner.clone()),
            _ => None,
        }
    }

    /// Forgets where `name` was seen elsewhere (a forward to it failed): the next route asks.
    pub fn forget_owner(&self, name: &ObjectName) {
        self.elsewhere.lock().remove(name);
    }

    fn acquire(&self, name: &ObjectName) -> Result<Owner, CoreError> {
        // A lease row inserted by another node in the same instant is not in this statement's
        // snapshot: neither taken nor seen. Asking again sees it.
        for _ in 0..3 {
            if let Some(owner) = self.try_acquire(name)? {
                return Ok(owner);
            }
        }
        Err(CoreError::Storage(format!(
            "cluster: the owner of {}/{} could not be found",
            name.namespace, name.object_id
        )))
    }

    fn try_acquire(&self, name: &ObjectName) -> Result<Option<Owner>, CoreError> {
        let started = Instant::now();
        let (namespace, object_id) = (name.namespace.to_string(), name.object_id.to_string());
        let node = self.config.node_id.clone();
        self.stats.statements.fetch_add(1, Ordering::Relaxed);
        // The holder's node row is read FOR SHARE, so that a take and that node's renewal are
        // ordered: either the renewal comes first (the holder is alive: nothing is taken), or the
        // take does and the renewal, waiting for it, finds its heartbeat had expired and checks
        // its leases. This node takes nothing while its own heartbeat has expired. (Taken twice,
        // the lease only has one more epoch: nobody was told the first.)
        let row = self.taking.call_again_if_broken(move |conn| {
            conn.query_one(
                "WITH me AS (
                     SELECT expires_at > clock_timestamp() AS alive FROM sw_nodes WHERE node = $3 FOR SHARE),
                 taken AS (
                     INSERT INTO sw_leases AS l (namespace, object_id, node, epoch, expires_at)
                     SELECT $1, $2, $3, 1, 'infinity' WHERE coalesce((SELECT alive FROM me), false)
                     ON CONFLICT (namespace, object_id) DO UPDATE
                         SET node = excluded.node, epoch = l.epoch + 1, expires_at = 'infinity'
                         WHERE l.node = excluded.node OR l.expires_at < clock_timestamp()
                            OR coalesce((SELECT n.expires_at FROM sw_nodes n WHERE n.node = l.node FOR SHARE),
                                        '-infinity') < clock_timestamp()
                     RETURNING epoch)
                 SELECT (SELECT epoch FROM taken),
                        (SELECT node FROM sw_leases WHERE namespace = $1 AND object_id = $2),
                        (SELECT n.advertise FROM sw_leases l JOIN sw_nodes n ON n.node = l.node
                          WHERE l.namespace = $1 AND l.object_id = $2),
                        coalesce((SELECT alive FROM me), false)",
                &[&namespace, &object_id, &node],
            )
        })?;
        let epoch: Option<i64> = row.get(0);
        if !row.get::<_, bool>(3) {
            self.wake.notify_all();
            return Err(CoreError::Storage(
                "cluster: this node's heartbeat in PostgreSQL has expired (it could not renew it): \
                 it takes no object until its next renewal"
                    .into(),
            ));
        }
        if let Some(epoch) = epoch {
            self.stats.acquired.fetch_add(1, Ordering::Relaxed);
            self.elsewhere.lock().remove(name);
            self.held.lock().insert(name.clone(), epoch);
            log::debug!("cluster: took {}/{} (epoch {epoch})", name.namespace, name.object_id);
            return Ok(Some(Owner::Here { epoch }));
        }
        self.held.lock().remove(name);
        let Some(node) = row.get::<_, Option<String>>(1) else { return Ok(None) };
        let owner = Owner::There { node, advertise: row.get(2) };
        self.elsewhere.lock().insert(name.clone(), (owner.clone(), started + self.config.renew));
        Ok(Some(owner))
    }

    /// The epoch of this node's lease of `name`, if it holds one (valid or not yet known lost).
    #[must_use]
    pub fn epoch(&self, name: &ObjectName) -> Option<i64> {
        self.held.lock().get(name).copied()
    }

    /// The object left this node (it retired with no socket here): its lease is given up with
    /// the next round, so that another node can take it at once.
    pub fn release(&self, name: &ObjectName) {
        if let Some(epoch) = self.held.lock().remove(name) {
            self.releasing.lock().push((name.clone(), epoch));
        }
    }

    /// Objects whose lease this node lost since the last call.
    pub fn take_lost(&self) -> Vec<ObjectName> {
        std::mem::take(&mut *self.lost.lock())
    }

    fn lose(&self, name: &ObjectName) {
        if self.held.lock().remove(name).is_some() {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            log::warn!("cluster: lost the lease of {}/{}", name.namespace, name.object_id);
            self.lost.lock().push(name.clone());
        }
    }

    /// The other nodes seen alive by the last round: (node id, address).
    #[must_use]
    pub fn peers(&self) -> Vec<(String, String)> {
        self.peers.lock().clone()
    }

    /// How many leases this node holds.
    #[must_use]
    pub fn held_count(&self) -> usize {
        self.held.lock().len()
    }

    /// What `name` has stored: read when this node takes it.
    ///
    /// # Errors
    /// `Storage` when PostgreSQL cannot be reached.
    pub fn load(&self, name: &ObjectName) -> Result<Loaded, CoreError> {
        let (namespace, object_id) = (name.namespace.to_string(), name.object_id.to_string());
        self.stats.statements.fetch_add(2, Ordering::Relaxed);
        self.fg.call(move |conn| {
            let pairs = conn
                .query(
                    "SELECT key, value FROM sw_kv WHERE namespace = $1 AND object_id = $2",
                    &[&namespace, &object_id],
                )?
                .into_iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            let alarm = conn
                .query_opt(
                    "SELECT at, account, id_name FROM sw_alarms WHERE namespace = $1 AND object_id = $2",
                    &[&namespace, &object_id],
                )?
                .map(|row| Alarm { at: row.get(0), account: row.get(1), id_name: row.get(2) });
            Ok(Loaded { pairs, alarm })
        })
    }

    /// Commits `changes` of `name` in one transaction, fenced: it first locks the object's lease
    /// row and checks that it still names this node with `epoch`.
    ///
    /// # Errors
    /// `Storage`: fenced (another node owns the object now; nothing was written), or PostgreSQL's
    /// error (nothing was written either).
    pub fn commit(&self, name: &ObjectName, epoch: i64, changes: Changes) -> Result<(), CoreError> {
        let (namespace, object_id) = (name.namespace.to_string(), name.object_id.to_string());
        let node = self.config.node_id.clone();
        let statements = 3
            + u64::from(changes.wipe)
            + u64::from(!changes.deletes.is_empty())
            + u64::from(!changes.upserts.is_empty())
            + u64::from(changes.alarm.is_some());
        self.stats.statements.fetch_add(statements, Ordering::Relaxed);
        let outcome = self.fg.call(move |conn| {
            let fence = conn.statement(
                "SELECT node, epoch FROM sw_leases WHERE namespace = $1 AND object_id = $2 FOR UPDATE",
            )?;
            let wipe = conn.statement("DELETE FROM sw_kv WHERE namespace = $1 AND object_id = $2")?;
            let delete = conn
                .statement("DELETE FROM sw_kv WHERE namespace = $1 AND object_id = $2 AND key = ANY($3)")?;
            let upsert = conn.statement(
                "INSERT INTO sw_kv (namespace, object_id, key, value)
                 SELECT $1, $2, k, v FROM unnest($3::bytea[], $4::bytea[]) AS u(k, v)
                 ON CONFLICT (namespace, object_id, key) DO UPDATE SET value = excluded.value",
            )?;
            let set_alarm = conn.statement(
                "INSERT INTO sw_alarms (namespace, object_id, at, account, id_name)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (namespace, object_id) DO UPDATE
                     SET at = excluded.at, account = excluded.account, id_name = excluded.id_name",
            )?;
            let delete_alarm =
                conn.statement("DELETE FROM sw_alarms WHERE namespace = $1 AND object_id = $2")?;
            let mut tx = conn.client.transaction()?;
            let fence = tx.query_opt(&fence, &[&namespace, &object_id])?;
            let current = fence.map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)));
            if current.as_ref() != Some(&(node, epoch)) {
                return Ok(Err(current));
            }
            if changes.wipe {
                tx.execute(&wipe, &[&namespace, &object_id])?;
            }
            if !changes.deletes.is_empty() {
                tx.execute(&delete, &[&namespace, &object_id, &changes.deletes])?;
            }
            if !changes.upserts.is_empty() {
                let (keys, values): (Vec<Vec<u8>>, Vec<Vec<u8>>) = changes.upserts.into_iter().unzip();
                tx.execute(&upsert, &[&namespace, &object_id, &keys, &values])?;
            }
            match &changes.alarm {
                Some(Some(alarm)) => {
                    tx.execute(
                        &set_alarm,
                        &[&namespace, &object_id, &alarm.at, &alarm.account, &alarm.id_name],
                    )?;
                }
                Some(None) => {
                    tx.execute(&delete_alarm, &[&namespace, &object_id])?;
                }
                None => {}
            }
            tx.commit()?;
            Ok(Ok(()))
        })?;
        match outcome {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(current) => {
                self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                self.lose(name);
                let holder = match current {
                    Some((node, epoch)) => format!("node {node:?} holds it with epoch {epoch}"),
                    None => "no node holds it".into(),
                };
                Err(CoreError::Storage(format!(
                    "fenced: this node's lease of the object (epoch {epoch}) is gone ({holder}); \
                     nothing was written"
                )))
            }
        }
    }

    /// One background round: the heartbeat (which renews every lease of this node) in one
    /// statement, the releases in a second, the alarms due soon in a third, the live nodes in a
    /// fourth. Only when the heartbeat had expired before this renewal (PostgreSQL was out of
    /// reach, or the node was paused) does a fifth check which leases another node took meanwhile.
    fn round(&self) -> Result<(), CoreError> {
        let started = Instant::now();
        forget_expired(&mut self.elsewhere.lock(), started);
        let releasing = std::mem::take(&mut *self.releasing.lock());
        let (node, advertise) = (self.config.node_id.clone(), self.config.advertise.clone());
        let lease = secs(self.config.lease);
        let horizon = now_seconds() + 2.0 * secs(self.config.renew);
        self.stats.statements.fetch_add(3 + u64::from(!releasing.is_empty()), Ordering::Relaxed);
        self.stats.renew_rounds.fetch_add(1, Ordering::Relaxed);
        let (alive, due, peers) = self.bg.call(move |conn| {
            // The old row is locked first (FOR UPDATE waits for a take that read it FOR SHARE),
            // so "was it still valid?" is answered after any take that found it expired.
            let alive: Option<bool> = conn
                .query_opt(
                    "UPDATE sw_nodes n SET advertise = $2, heartbeat_at = clock_timestamp(),
                         expires_at = clock_timestamp() + make_interval(secs => $3)
                     FROM (SELECT node, expires_at FROM sw_nodes WHERE node = $1 FOR UPDATE) o
                     WHERE n.node = o.node
                     RETURNING o.expires_at > clock_timestamp()",
                    &[&node, &advertise, &lease],
                )?
                .map(|row| row.get(0));
            let alive = match alive {
                Some(alive) => alive,
                None => {
                    // (The row was deleted by hand: written again, and every lease checked.)
                    conn.execute(
                        "INSERT INTO sw_nodes (node, advertise, heartbeat_at, expires_at)
                         VALUES ($1, $2, clock_timestamp(), clock_timestamp() + make_interval(secs => $3))
                         ON CONFLICT (node) DO NOTHING",
                        &[&node, &advertise, &lease],
                    )?;
                    false
                }
            };
            if !releasing.is_empty() {
                give_up(conn, &node, &releasing)?;
            }
            let due: Vec<(String, String, f64, Option<String>)> = conn
                .query(
                    "SELECT a.namespace, a.object_id, a.at, a.id_name FROM sw_alarms a
                     LEFT JOIN sw_leases l ON l.namespace = a.namespace AND l.object_id = a.object_id
                     LEFT JOIN sw_nodes n ON n.node = l.node
                     WHERE a.at <= $2
                       AND (l.node IS NULL OR l.node = $1 OR l.expires_at < clock_timestamp()
                            OR coalesce(n.expires_at, '-infinity') < clock_timestamp())",
                    &[&node, &horizon],
                )?
                .into_iter()
                .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
                .collect();
            let peers: Vec<(String, String)> = conn
                .query(
                    "SELECT node, advertise FROM sw_nodes
                     WHERE node <> $1 AND expires_at > clock_timestamp() ORDER BY node",
                    &[&node],
                )?
                .into_iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            Ok((alive, due, peers))
        })?;
        *self.peers.lock() = peers;
        if !alive {
            self.check_held()?;
        }
        *self.alive_until.lock() = started + self.config.lease;
        if let Some(alarms) = self.alarms.lock().clone() {
            let mut armed = self.armed.lock();
            for (namespace, object_id, at, id_name) in due {
                let name = ObjectName::new(&namespace, &object_id);
                if armed.get(&name) == Some(&at) {
                    continue;
                }
                armed.insert(name.clone(), at);
                alarms(&Arc::new(name), at, id_name.as_deref());
            }
        }
        Ok(())
    }

    /// After the heartbeat had expired: which leases are still this node's (another node may
    /// have taken any of them meanwhile). The heartbeat is valid again, so none can be taken
    /// after this reading.
    fn check_held(&self) -> Result<(), CoreError> {
        let held: Vec<(ObjectName, i64)> =
            self.held.lock().iter().map(|(name, epoch)| (name.clone(), *epoch)).collect();
        if held.is_empty() {
            return Ok(());
        }
        let namespaces: Vec<String> = held.iter().map(|(name, _)| name.namespace.to_string()).collect();
        let ids: Vec<String> = held.iter().map(|(name, _)| name.object_id.to_string()).collect();
        let epochs: Vec<i64> = held.iter().map(|(_, epoch)| *epoch).collect();
        let node = self.config.node_id.clone();
        self.stats.statements.fetch_add(1, Ordering::Relaxed);
        let kept: std::collections::HashSet<ObjectName> = self
            .bg
            .call(move |conn| {
                conn.query(
                    "SELECT l.namespace, l.object_id FROM sw_leases l
                     JOIN unnest($2::text[], $3::text[], $4::int8[]) AS h(namespace, object_id, epoch)
                       ON l.namespace = h.namespace AND l.object_id = h.object_id AND l.epoch = h.epoch
                     WHERE l.node = $1 AND l.expires_at > clock_timestamp()",
                    &[&node, &namespaces, &ids, &epochs],
                )
            })?
            .iter()
            .map(|row| ObjectName::new(row.get::<_, &str>(0), row.get::<_, &str>(1)))
            .collect();
        let lost: Vec<ObjectName> = {
            let map = self.held.lock();
            held.into_iter()
                // (Taken again meanwhile, with a new epoch: that lease is not this reading's.)
                .filter(|(name, epoch)| map.get(name) == Some(epoch) && !kept.contains(name))
                .map(|(name, _)| name)
                .collect()
        };
        for name in &lost {
            self.lose(name);
        }
        Ok(())
    }

    /// Stops the background round and gives up every lease at once (a clean shutdown: other
    /// nodes may take the objects without waiting for the leases to expire).
    pub fn shutdown(&self) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        self.wake.notify_all();
        let mut held: Vec<(ObjectName, i64)> = self.held.lock().drain().collect();
        held.append(&mut self.releasing.lock());
        let node = self.config.node_id.clone();
        // The heartbeat goes too: other nodes stop counting this one among the live at once.
        let released = self.fg.call(move |conn| {
            if !held.is_empty() {
                give_up(conn, &node, &held)?;
            }
            conn.execute(
                "UPDATE sw_nodes SET expires_at = clock_timestamp() - interval '1 millisecond'
                 WHERE node = $1",
                &[&node],
            )
        });
        if let Err(error) = released {
            log::warn!("cluster: the leases could not be given up at shutdown: {error}");
        }
    }
}

/// Gives up `leases` of `node` (each with the epoch it was taken with): another node may take
/// them at once.
fn give_up(conn: &mut Conn, node: &str, leases: &[(ObjectName, i64)]) -> Result<u64, postgres::Error> {
    let namespaces: Vec<String> = leases.iter().map(|(n, _)| n.namespace.to_string()).collect();
    let ids: Vec<String> = leases.iter().map(|(n, _)| n.object_id.to_string()).collect();
    let epochs: Vec<i64> = leases.iter().map(|(_, e)| *e).collect();
    conn.execute(
        "UPDATE sw_leases l SET expires_at = clock_timestamp() - interval '1 millisecond'
         FROM unnest($2::text[], $3::text[], $4::int8[]) AS h(namespace, object_id, epoch)
         WHERE l.namespace = h.namespace AND l.object_id = h.object_id
           AND l.epoch = h.epoch AND l.node = $1",
        &[&node, &namespaces, &ids, &epochs],
    )
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn migrate(conn: &mut Conn) -> Result<Result<(), CoreError>, postgres::Error> {
    let mut tx = conn.client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sw_schema (version integer NOT NULL)")?;
    let version: i32 = tx.query_opt("SELECT version FROM sw_schema", &[])?.map_or(0, |row| row.get(0));
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if version > known {
        return Ok(Err(CoreError::Storage(format!(
            "the cluster database has schema version {version}, newer than this build's {known}: \
             upgrade sockworker on this node"
        ))));
    }
    for step in MIGRATIONS.iter().skip(usize::try_from(version).unwrap_or(0)) {
        tx.batch_execute(step)?;
    }
    if version == 0 {
        tx.execute("INSERT INTO sw_schema (version) VALUES ($1)", &[&known])?;
    } else if version < known {
        tx.execute("UPDATE sw_schema SET version = $1", &[&known])?;
    }
    tx.commit()?;
    if version < known {
        log::info!("cluster: schema migrated from version {version} to {known}");
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_seen_elsewhere_are_forgotten_once_expired() {
        let now = Instant::now();
        let owner = Owner::There { node: "b".into(), advertise: None };
        let mut elsewhere: HashMap<ObjectName, (Owner, Instant)> = (0..5_000)
            .map(|i| (ObjectName::new("ROOM", &format!("old-{i}")), (owner.clone(), now)))
            .collect();
        let fresh = ObjectName::new("ROOM", "fresh");
        elsewhere.insert(fresh.clone(), (owner.clone(), now + Duration::from_secs(3)));
        forget_expired(&mut elsewhere, now + Duration::from_millis(1));
        assert_eq!(elsewhere.keys().collect::<Vec<_>>(), [&fresh]);
        assert!(elsewhere.capacity() < 1024, "{} buckets kept", elsewhere.capacity());
    }
}
