//! The resource store: every revision of the whole policy set, the audit log, join tokens
//! and pending (approval-waiting) changes. SQLite by default, behind the [`Store`] trait so
//! an etcd backend can follow. Every change is one transaction: a revision and its audit
//! entry land together or not at all (WAL journal, `synchronous=FULL`), so a crash mid-write
//! leaves the old or the new revision and an intact audit chain.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Entry, GENESIS};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store failed: {0}")]
    Db(rusqlite::Error),
    /// The data directory has no space left (`SQLITE_FULL`): nothing was written.
    #[error("the control plane's data directory is full ({0}): nothing was written")]
    Full(String),
    /// A grouped write failed (the message of the error).
    #[error("the store failed: {0}")]
    Failed(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("revision {0} does not exist")]
    NoRevision(u64),
    #[error("the store is not available")]
    Poisoned,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
            _ => StoreError::Db(e),
        }
    }
}

impl StoreError {
    /// The data directory has no space left.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full(_))
    }
}

/// The files of a policy set: `(file name, YAML text)`.
pub type Files = Vec<(String, String)>;

/// One revision of the whole policy set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub rev: u64,
    pub created_ms: i64,
    pub author: String,
    pub reason: String,
    /// What changed, for `history`: `+AuthorizationPolicy orders/orders-api, ~Mesh default/shop`.
    pub summary: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub files: Files,
}

/// A change waiting for a second operator's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: u64,
    pub created_ms: i64,
    pub author: String,
    pub reason: String,
    pub summary: String,
    /// The revision it was made against.
    pub base: u64,
    pub files: Files,
}

/// A join token record (the token itself is never stored, only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub identity: String,
    pub expires_ms: i64,
    pub used_ms: Option<i64>,
    pub created_by: String,
}

/// An audit entry to append (sequence and hashes are the store's).
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: serde_json::Value,
}

impl NewEntry {
    pub fn new(actor: &str, action: &str, subject: &str, detail: serde_json::Value) -> Self {
        NewEntry {
            actor: actor.into(),
            action: action.into(),
            subject: subject.into(),
            detail,
        }
    }
}

/// Filters for listing the audit log.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action_prefix: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: Option<usize>,
}

/// What the control plane needs from a store.
pub trait Store: Send + Sync {
    /// The newest revision, if any.
    fn head(&self) -> Result<Option<Revision>, StoreError>;
    fn revision(&self, rev: u64) -> Result<Revision, StoreError>;
    /// Every revision, newest first, without files.
    fn history(&self) -> Result<Vec<Revision>, StoreError>;
    /// Adds a revision and its audit entry in one transaction.
    fn commit(
        &self,
        author: &str,
        reason: &str,
        summary: &str,
        files: &Files,
        entry: NewEntry,
        now: SystemTime,
    ) -> Result<Revision, StoreError>;
    fn append_audit(&self, entry: NewEntry, now: SystemTime) -> Result<Entry, StoreError>;
    fn audit(&self, filter: &AuditFilter) -> Result<Vec<Entry>, StoreError>;
    fn add_token(
        &self,
        hash: &str,
        rec: &TokenRecord,
        entry: NewEntry,
        now: SystemTime,
    ) -> Result<(), StoreError>;
    /// Marks a token used if it exists, is unexpired and unused; returns its record as it
    /// was. One transaction: a token can be used once.
    fn use_token(&self, hash: &str, now: SystemTime) -> Result<Option<TokenRecord>, StoreError>;
    fn propose(&self, p: &Proposal, entry: NewEntry, now: SystemTime) -> Result<u64, StoreError>;
    fn proposal(&self, id: u64) -> Result<Option<Proposal>, StoreError>;
    fn proposals(&self) -> Result<Vec<Proposal>, StoreError>;
    fn drop_proposal(&self, id: u64) -> Result<(), StoreError>;
    /// Named state kept beside the revisions (the progressive rollout: `rollout`).
    fn state(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Writes named state and its audit entry, if any, in one transaction.
    fn set_state(
        &self,
        key: &str,
        value: &str,
        entry: Option<NewEntry>,
        now: SystemTime,
    ) -> Result<(), StoreError>;
}

pub(crate) fn ms(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX)
}

/// The embedded SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    group: Group,
}

/// Group commit for audit appends: concurrent callers queue their entries; one of them
/// (the leader) writes the whole queue in one durable transaction while the others wait,
/// so many appends share one fsync and each caller still returns only once its entry is
/// on disk.
#[derive(Debug, Default)]
struct Group {
    state: Mutex<GroupState>,
    cv: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    next_ticket: u64,
    queue: Vec<(u64, NewEntry, SystemTime)>,
    leader: bool,
    /// Each ticket's entry, or its error (`true`: the disk is full) and message.
    done: std::collections::HashMap<u64, Result<Entry, (bool, String)>>,
}

impl SqliteStore {
    /// Opens (creating) `DIR/meshward.db`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS revisions (rev INTEGER PRIMARY KEY, created_ms INTEGER NOT NULL, author TEXT NOT NULL,
                 reason TEXT NOT NULL, summary TEXT NOT NULL, files TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, actor TEXT NOT NULL,
                 action TEXT NOT NULL, subject TEXT NOT NULL, detail TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, identity TEXT NOT NULL, expires_ms INTEGER NOT NULL,
                 used_ms INTEGER, created_by TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS proposals (id INTEGER PRIMARY KEY, created_ms INTEGER NOT NULL, author TEXT NOT NULL,
                 reason TEXT NOT NULL, summary TEXT NOT NULL, base INTEGER NOT NULL, files TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        Ok(SqliteStore {
            group: Group::default(),
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut g = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut g)
    }
}

fn append(tx: &Transaction<'_>, e: NewEntry, now: SystemTime) -> Result<Entry, StoreError> {
    let last: Option<(u64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, GENESIS.to_owned()),
    };
    let ts_ms = ms(now);
    let detail = e.detail.to_string();
    let hash = audit::entry_hash(seq, ts_ms, &e.actor, &e.action, &e.subject, &detail, &prev);
    tx.execute(
        "INSERT INTO audit (seq, ts_ms, actor, action, subject, detail, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![seq, ts_ms, e.actor, e.action, e.subject, detail, prev, hash],
    )?;
    Ok(Entry {
        seq,
        ts_ms,
        actor: e.actor,
        action: e.action,
        subject: e.subject,
        detail,
        prev,
        hash,
    })
}

fn files_json(files: &Files) -> String {
    serde_json::to_string(files).unwrap_or_else(|_| "[]".into())
}

fn parse_files(s: &str) -> Result<Files, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("revision files: {e}")))
}

impl Store for SqliteStore {
    fn head(&self) -> Result<Option<Revision>, StoreError> {
        let rev: Option<u64> =
            self.with(|c| Ok(c.query_row("SELECT MAX(rev) FROM revisions", [], |r| r.get(0))?))?;
        rev.map(|r| self.revision(r)).transpose()
    }

    fn revision(&self, rev: u64) -> Result<Revision, StoreError> {
        self.with(|c| {
            let row = c
                .query_row("SELECT rev, created_ms, author, reason, summary, files FROM revisions WHERE rev = ?1", [rev], |r| {
                    Ok((r.get::<_, u64>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get::<_, String>(5)?))
                })
                .optional()?;
            let (rev, created_ms, author, reason, summary, files) = row.ok_or(StoreError::NoRevision(rev))?;
            Ok(Revision { rev, created_ms, author, reason, summary, files: parse_files(&files)? })
        })
    }

    fn history(&self) -> Result<Vec<Revision>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT rev, created_ms, author, reason, summary FROM revisions ORDER BY rev DESC",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Revision {
                    rev: r.get(0)?,
                    created_ms: r.get(1)?,
                    author: r.get(2)?,
                    reason: r.get(3)?,
                    summary: r.get(4)?,
                    files: vec![],
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn commit(
        &self,
        author: &str,
        reason: &str,
        summary: &str,
        files: &Files,
        entry: NewEntry,
        now: SystemTime,
    ) -> Result<Revision, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let next: u64 = tx.query_row("SELECT COALESCE(MAX(rev), 0) + 1 FROM revisions", [], |r| r.get(0))?;
            tx.execute(
                "INSERT INTO revisions (rev, created_ms, author, reason, summary, files) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![next, ms(now), author, reason, summary, files_json(files)],
            )?;
            let mut e = entry;
            if let Some(o) = e.detail.as_object_mut() {
                o.insert("revision".into(), serde_json::json!(next));
            }
            append(&tx, e, now)?;
            tx.commit()?;
            Ok(Revision { rev: next, created_ms: ms(now), author: author.into(), reason: reason.into(), summary: summary.into(), files: files.clone() })
        })
    }

    fn append_audit(&self, entry: NewEntry, now: SystemTime) -> Result<Entry, StoreError> {
        let g = &self.group;
        let mut st = g.state.lock().map_err(|_| StoreError::Poisoned)?;
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push((ticket, entry, now));
        loop {
            if let Some(r) = st.done.remove(&ticket) {
                return r.map_err(|(full, m)| match full {
                    true => StoreError::Full(m),
                    false => StoreError::Failed(m),
                });
            }
            if st.leader {
                st = g.cv.wait(st).map_err(|_| StoreError::Poisoned)?;
                continue;
            }
            // Lead: write everything queued so far in one transaction.
            st.leader = true;
            let batch = std::mem::take(&mut st.queue);
            drop(st);
            let written = self.with(|c| {
                let tx = c.transaction()?;
                let mut out = Vec::with_capacity(batch.len());
                for (t, e, at) in batch.iter().cloned() {
                    out.push((t, append(&tx, e, at)?));
                }
                tx.commit()?;
                Ok(out)
            });
            st = g.state.lock().map_err(|_| StoreError::Poisoned)?;
            match written {
                Ok(entries) => {
                    for (t, e) in entries {
                        st.done.insert(t, Ok(e));
                    }
                }
                Err(e) => {
                    let why = match &e {
                        StoreError::Full(m) | StoreError::Failed(m) => m.clone(),
                        other => other.to_string(),
                    };
                    for (t, _, _) in &batch {
                        st.done.insert(*t, Err((e.is_full(), why.clone())));
                    }
                }
            }
            st.leader = false;
            g.cv.notify_all();
        }
    }

    fn audit(&self, f: &AuditFilter) -> Result<Vec<Entry>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT seq, ts_ms, actor, action, subject, detail, prev, hash FROM audit ORDER BY seq")?;
            let rows = st.query_map([], |r| {
                Ok(Entry { seq: r.get(0)?, ts_ms: r.get(1)?, actor: r.get(2)?, action: r.get(3)?, subject: r.get(4)?, detail: r.get(5)?, prev: r.get(6)?, hash: r.get(7)? })
            })?;
            let mut out = vec![];
            for e in rows {
                let e = e?;
                if f.actor.as_ref().is_some_and(|a| *a != e.actor)
                    || f.action_prefix.as_ref().is_some_and(|a| !e.action.starts_with(a.as_str()))
                    || f.since_ms.is_some_and(|s| e.ts_ms < s)
                {
                    continue;
                }
                out.push(e);
            }
            if let Some(n) = f.limit {
                let skip = out.len().saturating_sub(n);
                out.drain(..skip);
            }
            Ok(out)
        })
    }

    fn add_token(
        &self,
        hash: &str,
        rec: &TokenRecord,
        entry: NewEntry,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO tokens (hash, identity, expires_ms, used_ms, created_by) VALUES (?1, ?2, ?3, NULL, ?4)",
                params![hash, rec.identity, rec.expires_ms, rec.created_by],
            )?;
            append(&tx, entry, now)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn use_token(&self, hash: &str, now: SystemTime) -> Result<Option<TokenRecord>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let rec = tx
                .query_row(
                    "SELECT identity, expires_ms, used_ms, created_by FROM tokens WHERE hash = ?1",
                    [hash],
                    |r| {
                        Ok(TokenRecord {
                            identity: r.get(0)?,
                            expires_ms: r.get(1)?,
                            used_ms: r.get(2)?,
                            created_by: r.get(3)?,
                        })
                    },
                )
                .optional()?;
            if let Some(r) = &rec
                && r.used_ms.is_none()
                && r.expires_ms > ms(now)
            {
                tx.execute(
                    "UPDATE tokens SET used_ms = ?1 WHERE hash = ?2",
                    params![ms(now), hash],
                )?;
            }
            tx.commit()?;
            Ok(rec)
        })
    }

    fn propose(&self, p: &Proposal, entry: NewEntry, now: SystemTime) -> Result<u64, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO proposals (created_ms, author, reason, summary, base, files) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![ms(now), p.author, p.reason, p.summary, p.base, files_json(&p.files)],
            )?;
            let id = u64::try_from(tx.last_insert_rowid()).unwrap_or_default();
            let mut e = entry;
            if let Some(o) = e.detail.as_object_mut() {
                o.insert("proposal".into(), serde_json::json!(id));
            }
            append(&tx, e, now)?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn proposal(&self, id: u64) -> Result<Option<Proposal>, StoreError> {
        Ok(self.proposals()?.into_iter().find(|p| p.id == id))
    }

    fn proposals(&self) -> Result<Vec<Proposal>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, created_ms, author, reason, summary, base, files FROM proposals ORDER BY id")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get::<_, String>(6)?)))?;
            let mut out = vec![];
            for row in rows {
                let (id, created_ms, author, reason, summary, base, files) = row?;
                out.push(Proposal { id, created_ms, author, reason, summary, base, files: parse_files(&files)? });
            }
            Ok(out)
        })
    }

    fn drop_proposal(&self, id: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("DELETE FROM proposals WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    fn state(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT value FROM state WHERE key = ?1")?;
            let mut rows = st.query([key])?;
            Ok(match rows.next()? {
                Some(r) => Some(r.get(0)?),
                None => None,
            })
        })
    }

    fn set_state(
        &self,
        key: &str,
        value: &str,
        entry: Option<NewEntry>,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO state (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            if let Some(e) = entry {
                append(&tx, e, now)?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}
