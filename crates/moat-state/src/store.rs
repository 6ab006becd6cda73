//! The SQLite store: allocations, resource ownership, operation journal.

use crate::time::now;
use crate::{Result, StateError};
use moat_core::model::Allocations;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Migrations, in order; `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE subnets (domain TEXT PRIMARY KEY, subnet TEXT NOT NULL);
     CREATE TABLE addresses (machine TEXT PRIMARY KEY, ip TEXT NOT NULL);
     CREATE TABLE ifnums (machine TEXT PRIMARY KEY, ifnum INTEGER NOT NULL);
     CREATE TABLE resources (
         kind TEXT NOT NULL,
         name TEXT NOT NULL,
         domain TEXT,
         machine TEXT,
         created_at INTEGER NOT NULL,
         pending INTEGER NOT NULL,
         PRIMARY KEY (kind, name)
     );
     CREATE TABLE journal (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         apply_id TEXT NOT NULL,
         action_id TEXT NOT NULL,
         action TEXT NOT NULL,
         status TEXT NOT NULL,
         error TEXT,
         started_at INTEGER NOT NULL,
         finished_at INTEGER
     );
     CREATE INDEX journal_status ON journal (status);",
];

/// Schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// A host resource moat owns (or is about to create).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resource {
    /// `bridge`, `veth`, `tap`, `nft-table`, `machine`, `volume`, `mount`, ...
    pub kind: String,
    /// Its name on the host.
    pub name: String,
    pub domain: Option<String>,
    pub machine: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Recorded before creation and not yet confirmed: it may or may not exist.
    pub pending: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalStatus {
    Started,
    Done,
    Failed,
}

impl JournalStatus {
    fn as_str(self) -> &'static str {
        match self {
            JournalStatus::Started => "started",
            JournalStatus::Done => "done",
            JournalStatus::Failed => "failed",
        }
    }
}

/// One action of one apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JournalEntry {
    pub id: i64,
    pub apply_id: String,
    /// The plan action id, e.g. `create-machine:pro-dev`.
    pub action_id: String,
    /// The action as JSON (`moat_core::plan::Action`).
    pub action: String,
    pub status: JournalStatus,
    pub error: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// The state store of one moat root: `<root>/state.db`.
pub struct StateStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish()
    }
}

impl StateStore {
    /// Open (creating if needed) `<root>/state.db`, migrating it to the current
    /// schema. Creates `root` if it does not exist.
    pub fn open(root: &Path) -> Result<StateStore> {
        std::fs::create_dir_all(root).map_err(|source| StateError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let path = root.join("state.db");
        let conn = Connection::open(&path).map_err(|source| StateError::Open {
            path: path.clone(),
            source,
        })?;
        let mut store = StateStore { conn, path };
        store
            .conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(|e| store.sql("setting the busy timeout", e))?;
        store.enable_wal()?;
        store
            .conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| store.sql("setting synchronous", e))?;
        store.migrate()?;
        Ok(store)
    }

    /// WAL mode (kept in the file). Switching needs the file to itself and
    /// SQLite does not wait for that (the busy timeout does not apply): when
    /// another process is opening the same new root, retry for a while.
    fn enable_wal(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mode: String = self
                .conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .map_err(|e| self.sql("reading the journal mode", e))?;
            if mode.eq_ignore_ascii_case("wal") {
                return Ok(());
            }
            match self.conn.pragma_update(None, "journal_mode", "WAL") {
                Ok(()) => return Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(self.sql("enabling WAL", e)),
            }
        }
    }

    /// No transaction is open on this connection (it can be reused).
    pub fn is_idle(&self) -> bool {
        self.conn.is_autocommit()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, what: &str, source: rusqlite::Error) -> StateError {
        StateError::Sql {
            path: self.path.clone(),
            what: what.to_string(),
            source,
        }
    }

    fn corrupt(&self, what: &str, value: impl Into<String>) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            what: what.to_string(),
            value: value.into(),
        }
    }

    /// Current schema version of the file (0 = empty).
    pub fn schema_version(&self) -> Result<i64> {
        let has_table: bool = self
            .conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql("reading the schema version", e))?;
        if !has_table {
            return Ok(0);
        }
        self.conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(|e| self.sql("reading the schema version", e))
    }

    fn migrate(&mut self) -> Result<()> {
        let found = self.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StateError::TooNew {
                path: self.path.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        let path = self.path.clone();
        let sql_err = |what: &str, source| StateError::Sql {
            path: path.clone(),
            what: what.to_string(),
            source,
        };
        // IMMEDIATE: the write lock first, then the version read again, so
        // two processes opening a new root at once (a daemon and a CLI) do
        // not both run the same migration ("table ... already exists").
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| sql_err("starting the migration", e))?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .map_err(|e| sql_err("creating schema_version", e))?;
        let found: i64 = tx
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(|e| sql_err("reading the schema version", e))?;
        if found >= SCHEMA_VERSION {
            return tx
                .commit()
                .map_err(|e| sql_err("committing the migration", e));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.execute_batch(m)
                .map_err(|e| sql_err(&format!("migration to schema {}", i + 1), e))?;
        }
        tx.execute("DELETE FROM schema_version", [])
            .and_then(|_| {
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )
            })
            .map_err(|e| sql_err("recording the schema version", e))?;
        tx.commit()
            .map_err(|e| sql_err("committing the migration", e))
    }

    // --- allocations ---------------------------------------------------------

    pub fn load_allocations(&self) -> Result<Allocations> {
        let mut a = Allocations::default();
        let rows = |sql: &str| -> Result<Vec<(String, String)>> {
            let mut st = self
                .conn
                .prepare(sql)
                .map_err(|e| self.sql("reading allocations", e))?;
            let it = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| self.sql("reading allocations", e))?;
            it.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.sql("reading allocations", e))
        };
        for (d, s) in rows("SELECT domain, subnet FROM subnets")? {
            let net = s
                .parse()
                .map_err(|_| self.corrupt(&format!("subnet of domain '{d}'"), &s))?;
            a.subnets.insert(d, net);
        }
        for (m, s) in rows("SELECT machine, ip FROM addresses")? {
            let ip = s
                .parse()
                .map_err(|_| self.corrupt(&format!("address of machine '{m}'"), &s))?;
            a.addresses.insert(m, ip);
        }
        for (m, s) in rows("SELECT machine, CAST(ifnum AS TEXT) FROM ifnums")? {
            let n = s
                .parse()
                .map_err(|_| self.corrupt(&format!("ifnum of machine '{m}'"), &s))?;
            a.ifnums.insert(m, n);
        }
        Ok(a)
    }

    /// Replace the stored allocations with `a`, atomically.
    pub fn save_allocations(&mut self, a: &Allocations) -> Result<()> {
        let path = self.path.clone();
        let e = |source| StateError::Sql {
            path: path.clone(),
            what: "saving allocations".into(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        tx.execute_batch("DELETE FROM subnets; DELETE FROM addresses; DELETE FROM ifnums;")
            .map_err(e)?;
        {
            let mut st = tx
                .prepare("INSERT INTO subnets (domain, subnet) VALUES (?1, ?2)")
                .map_err(e)?;
            for (d, n) in &a.subnets {
                st.execute(params![d, n.to_string()]).map_err(e)?;
            }
            let mut st = tx
                .prepare("INSERT INTO addresses (machine, ip) VALUES (?1, ?2)")
                .map_err(e)?;
            for (m, ip) in &a.addresses {
                st.execute(params![m, ip.to_string()]).map_err(e)?;
            }
            let mut st = tx
                .prepare("INSERT INTO ifnums (machine, ifnum) VALUES (?1, ?2)")
                .map_err(e)?;
            for (m, n) in &a.ifnums {
                st.execute(params![m, n]).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    // --- ownership -----------------------------------------------------------

    /// Record that moat is about to create a resource (pending). Call BEFORE
    /// creating it on the host. Re-recording an existing resource keeps its
    /// creation time and marks it pending again.
    pub fn intend(
        &self,
        kind: &str,
        name: &str,
        domain: Option<&str>,
        machine: Option<&str>,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO resources (kind, name, domain, machine, created_at, pending)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT (kind, name) DO UPDATE SET pending = 1,
                     domain = excluded.domain, machine = excluded.machine",
                params![kind, name, domain, machine, now()],
            )
            .map(drop)
            .map_err(|e| self.sql(&format!("recording {kind} '{name}'"), e))
    }

    /// Confirm a resource exists on the host (clears `pending`).
    pub fn mark_done(&self, kind: &str, name: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE resources SET pending = 0 WHERE kind = ?1 AND name = ?2",
                params![kind, name],
            )
            .map(drop)
            .map_err(|e| self.sql(&format!("confirming {kind} '{name}'"), e))
    }

    /// Drop a resource's record (after deleting it from the host).
    pub fn forget(&self, kind: &str, name: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM resources WHERE kind = ?1 AND name = ?2",
                params![kind, name],
            )
            .map(drop)
            .map_err(|e| self.sql(&format!("forgetting {kind} '{name}'"), e))
    }

    /// Every recorded resource, by kind then name.
    pub fn resources(&self) -> Result<Vec<Resource>> {
        self.query_resources("SELECT kind, name, domain, machine, created_at, pending FROM resources ORDER BY kind, name")
    }

    /// Resources recorded as intended but never confirmed (an apply died in between).
    pub fn pending(&self) -> Result<Vec<Resource>> {
        self.query_resources("SELECT kind, name, domain, machine, created_at, pending FROM resources WHERE pending = 1 ORDER BY kind, name")
    }

    fn query_resources(&self, sql: &str) -> Result<Vec<Resource>> {
        let mut st = self
            .conn
            .prepare(sql)
            .map_err(|e| self.sql("listing resources", e))?;
        let it = st
            .query_map([], |r| {
                Ok(Resource {
                    kind: r.get(0)?,
                    name: r.get(1)?,
                    domain: r.get(2)?,
                    machine: r.get(3)?,
                    created_at: r.get(4)?,
                    pending: r.get::<_, i64>(5)? != 0,
                })
            })
            .map_err(|e| self.sql("listing resources", e))?;
        it.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql("listing resources", e))
    }

    // --- journal ---------------------------------------------------------------

    /// A new apply id: Unix time and pid, unique per root in practice.
    pub fn new_apply_id() -> String {
        format!("{}-{}", now(), std::process::id())
    }

    /// Record that an action starts; returns the entry id for `finish`/`fail`.
    pub fn journal_start(&self, apply_id: &str, action_id: &str, action_json: &str) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO journal (apply_id, action_id, action, status, started_at)
                 VALUES (?1, ?2, ?3, 'started', ?4)",
                params![apply_id, action_id, action_json, now()],
            )
            .map_err(|e| self.sql(&format!("journaling the start of {action_id}"), e))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn journal_done(&self, entry: i64) -> Result<()> {
        self.journal_finish(entry, JournalStatus::Done, None)
    }

    pub fn journal_failed(&self, entry: i64, error: &str) -> Result<()> {
        self.journal_finish(entry, JournalStatus::Failed, Some(error))
    }

    fn journal_finish(&self, entry: i64, status: JournalStatus, error: Option<&str>) -> Result<()> {
        let n = self
            .conn
            .execute(
                "UPDATE journal SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
                params![entry, status.as_str(), error, now()],
            )
            .map_err(|e| self.sql("journaling an action's end", e))?;
        if n == 0 {
            return Err(StateError::NoSuchEntry {
                path: self.path.clone(),
                entry,
            });
        }
        Ok(())
    }

    /// Actions started but never finished (their apply was killed), oldest first.
    pub fn incomplete(&self) -> Result<Vec<JournalEntry>> {
        self.query_journal("WHERE status = 'started' ORDER BY id", [])
    }

    /// Every entry of one apply, in order.
    pub fn journal(&self, apply_id: &str) -> Result<Vec<JournalEntry>> {
        self.query_journal("WHERE apply_id = ?1 ORDER BY id", [apply_id])
    }

    /// Mark started entries as failed (after the next apply has dealt with them).
    pub fn close_incomplete(&self, note: &str) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE journal SET status = 'failed', error = ?1, finished_at = ?2 WHERE status = 'started'",
                params![note, now()],
            )
            .map_err(|e| self.sql("closing incomplete journal entries", e))
    }

    fn query_journal<P: rusqlite::Params>(&self, filter: &str, p: P) -> Result<Vec<JournalEntry>> {
        let sql = format!(
            "SELECT id, apply_id, action_id, action, status, error, started_at, finished_at FROM journal {filter}"
        );
        let mut st = self
            .conn
            .prepare(&sql)
            .map_err(|e| self.sql("reading the journal", e))?;
        let rows = st
            .query_map(p, |r| {
                Ok((
                    JournalEntry {
                        id: r.get(0)?,
                        apply_id: r.get(1)?,
                        action_id: r.get(2)?,
                        action: r.get(3)?,
                        status: JournalStatus::Started,
                        error: r.get(5)?,
                        started_at: r.get(6)?,
                        finished_at: r.get(7)?,
                    },
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(|e| self.sql("reading the journal", e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql("reading the journal", e))?;
        rows.into_iter()
            .map(|(mut e, s)| {
                e.status = match s.as_str() {
                    "started" => JournalStatus::Started,
                    "done" => JournalStatus::Done,
                    "failed" => JournalStatus::Failed,
                    _ => return Err(self.corrupt(&format!("status of journal entry {}", e.id), s)),
                };
                Ok(e)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn concurrent_opens_of_a_new_root_migrate_once() {
        // A daemon and a CLI opening a fresh root at the same moment: both
        // must get a usable store (this failed with "table subnets already
        // exists" before the migration took the write lock first).
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let p = dir.path().to_path_buf();
                    let b = barrier.clone();
                    std::thread::spawn(move || {
                        b.wait();
                        StateStore::open(&p).map(|s| s.schema_version().unwrap())
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap().unwrap(), SCHEMA_VERSION);
            }
        }
    }

    #[test]
    fn allocations_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.load_allocations().unwrap(), Allocations::default());
        let mut a = Allocations::default();
        a.subnets
            .insert("pro".into(), "10.110.0.0/24".parse().unwrap());
        a.addresses
            .insert("pro-dev".into(), Ipv4Addr::new(10, 110, 0, 1));
        a.ifnums.insert("pro-dev".into(), 3);
        s.save_allocations(&a).unwrap();
        drop(s);
        let mut s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.load_allocations().unwrap(), a);
        a.addresses.clear();
        s.save_allocations(&a).unwrap();
        assert_eq!(s.load_allocations().unwrap(), a);
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn pending_resources_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        s.intend("bridge", "mtabc-pro", Some("pro"), None).unwrap();
        s.mark_done("bridge", "mtabc-pro").unwrap();
        s.intend("veth", "mvabc-0", Some("pro"), Some("pro-dev"))
            .unwrap();
        drop(s); // the apply dies here
        let s = StateStore::open(dir.path()).unwrap();
        let p = s.pending().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "mvabc-0");
        assert_eq!(p[0].machine.as_deref(), Some("pro-dev"));
        assert_eq!(s.resources().unwrap().len(), 2);
        s.forget("veth", "mvabc-0").unwrap();
        assert!(s.pending().unwrap().is_empty());
    }

    #[test]
    fn journal_lists_incomplete_actions() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        let id = StateStore::new_apply_id();
        let a = s.journal_start(&id, "create-network:pro", "{}").unwrap();
        s.journal_done(a).unwrap();
        let b = s
            .journal_start(&id, "create-machine:pro-dev", "{}")
            .unwrap();
        let c = s
            .journal_start(&id, "create-machine:pro-web", "{}")
            .unwrap();
        s.journal_failed(c, "image missing").unwrap();
        let inc = s.incomplete().unwrap();
        assert_eq!(inc.len(), 1);
        assert_eq!(inc[0].id, b);
        assert_eq!(inc[0].action_id, "create-machine:pro-dev");
        let all = s.journal(&id).unwrap();
        assert_eq!(
            all.iter().map(|e| e.status).collect::<Vec<_>>(),
            [
                JournalStatus::Done,
                JournalStatus::Started,
                JournalStatus::Failed
            ]
        );
        assert_eq!(all[2].error.as_deref(), Some("image missing"));
        assert_eq!(s.close_incomplete("interrupted").unwrap(), 1);
        assert!(s.incomplete().unwrap().is_empty());
        assert!(matches!(
            s.journal_done(9999),
            Err(StateError::NoSuchEntry { .. })
        ));
    }

    #[test]
    fn two_connections_write_concurrently() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let root = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let s = StateStore::open(&root).unwrap();
                    for i in 0..50 {
                        let e = s.journal_start("a", &format!("t{t}-{i}"), "{}").unwrap();
                        s.journal_done(e).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.journal("a").unwrap().len(), 100);
    }

    #[test]
    fn newer_schema_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateStore::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join("state.db")).unwrap();
        c.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(c);
        let e = StateStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.db has schema version 99"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }

    #[test]
    fn corrupt_values_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateStore::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join("state.db")).unwrap();
        c.execute("INSERT INTO subnets VALUES ('pro', 'garbage')", [])
            .unwrap();
        drop(c);
        let e = StateStore::open(dir.path())
            .unwrap()
            .load_allocations()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("subnet of domain 'pro' holds an invalid value 'garbage'"),
            "{e}"
        );
    }
}
