//! A full data directory must not take the mesh down (docs/operations.md, "The control
//! plane's disk fills up").
//!
//! The control plane keeps a **reserve**: a file of `--disk-reserve` bytes (32 MiB by
//! default) in its data directory, written at start. The first write the disk refuses
//! (`SQLITE_FULL`) puts the control plane in the **disk-full** state: the reserve is
//! deleted, which frees its space for what keeps the mesh alive — certificate renewals and
//! joins, and their audit entries — while changes (apply, approve, rollback, tokens,
//! overrides) are refused with an error that says why, and shipped decision records are
//! dropped (counted). The state is loud: a log line, `meshward_control_disk_full 1`,
//! `/ready`'s body and `meshward status`.
//!
//! Should the reserve run out too, audit entries are held in memory, in order (at most
//! [`BACKLOG`]), and written when space returns, followed by an `audit.deferred` entry
//! that counts them: renewals go on for as long as the process runs. A restart before
//! that loses the held entries (the log says how many were held).
//!
//! Every [`CHECK_EVERY`] while full, the control plane tries to write the reserve again;
//! once it fits (the operator freed space), the held entries are written and the state
//! ends.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::audit::Entry;
use crate::store::{
    AuditFilter, Files, NewEntry, Proposal, Revision, Store, StoreError, TokenRecord, ms,
};

/// The default reserve.
pub const DEFAULT_RESERVE: u64 = 32 << 20;
/// Audit entries held in memory at most once the reserve is spent.
pub const BACKLOG: usize = 100_000;
/// How often a full disk is checked for space again.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The data directory's space: the reserve and whether the disk is full.
#[derive(Debug)]
pub struct Disk {
    dir: PathBuf,
    reserve: u64,
    full: AtomicBool,
    /// When the disk filled (ms since the epoch; 0: not full).
    since_ms: AtomicI64,
    /// Decision records dropped because the disk is full.
    pub decisions_dropped: AtomicU64,
    backlog: Mutex<VecDeque<(NewEntry, SystemTime)>>,
    /// Entries that did not fit in the backlog either (lost).
    lost: AtomicU64,
}

fn log(msg: &str) {
    tracing::warn!("{msg}");
}

impl Disk {
    /// The file that holds the reserve.
    pub fn reserve_file(dir: &Path) -> PathBuf {
        dir.join("reserve")
    }

    /// Writes the reserve of `reserve` bytes in `dir` (0: none). A disk too full for it
    /// starts in the disk-full state.
    pub fn open(dir: &Path, reserve: u64) -> Arc<Self> {
        let d = Arc::new(Disk {
            dir: dir.to_owned(),
            reserve,
            full: AtomicBool::new(false),
            since_ms: AtomicI64::new(0),
            decisions_dropped: AtomicU64::new(0),
            backlog: Mutex::new(VecDeque::new()),
            lost: AtomicU64::new(0),
        });
        if let Err(e) = d.write_reserve() {
            d.filled(&format!("the {reserve}-byte reserve does not fit: {e}"));
        }
        d
    }

    fn write_reserve(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        if self.reserve == 0 {
            return Ok(());
        }
        let path = Self::reserve_file(&self.dir);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= self.reserve) {
            return Ok(());
        }
        let tmp = path.with_extension("tmp");
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            let chunk = vec![0u8; 1 << 20];
            let mut left = self.reserve;
            while left > 0 {
                let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Audit entries held in memory now.
    pub fn held(&self) -> usize {
        self.backlog.lock().map_or(0, |b| b.len())
    }

    /// Whether the disk is full now.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// The condition, for `/ready`, `status` and errors; `None` when the disk has room.
    pub fn condition(&self) -> Option<String> {
        if !self.is_full() {
            return None;
        }
        let held = self.backlog.lock().map_or(0, |b| b.len());
        let since = humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH
                + Duration::from_millis(
                    u64::try_from(self.since_ms.load(Ordering::Relaxed)).unwrap_or(0),
                ),
        );
        let mut s = format!(
            "the data directory `{}` is full (since {since}): changes are refused; certificate renewals go on{}",
            self.dir.display(),
            if self.reserve > 0 {
                " on the released reserve"
            } else {
                ""
            }
        );
        if held > 0 {
            s.push_str(&format!(
                "; {held} audit entries are held in memory until space is freed"
            ));
        }
        let lost = self.lost.load(Ordering::Relaxed);
        if lost > 0 {
            s.push_str(&format!("; {lost} audit entries were lost"));
        }
        Some(s)
    }

    /// The disk refused a write: enter the disk-full state (once) and release the
    /// reserve. Returns whether the reserve was released now (a retry may fit).
    fn filled(&self, why: &str) -> bool {
        if self.full.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.since_ms
            .store(ms(SystemTime::now()), Ordering::Relaxed);
        let released = std::fs::remove_file(Self::reserve_file(&self.dir)).is_ok();
        log(&format!(
            "DISK FULL: {why}. The data directory `{}` has no space left: changes (apply, rollback, tokens, overrides) are refused and shipped decisions are dropped until space is freed; certificate renewals go on{}. Free space in it; the control plane notices within {CHECK_EVERY:?}.",
            self.dir.display(),
            if released {
                format!(" (the {}-byte reserve was released for them)", self.reserve)
            } else {
                String::new()
            }
        ));
        released
    }

    /// While full: if the reserve fits again, write what was held and end the state.
    /// Returns whether the state ended now.
    pub fn check(&self, store: &dyn Store) -> bool {
        if !self.is_full() {
            return false;
        }
        if self.write_reserve().is_err() {
            return false; // still full
        }
        let held: Vec<(NewEntry, SystemTime)> = match self.backlog.lock() {
            Ok(mut b) => b.drain(..).collect(),
            Err(_) => vec![],
        };
        let n = held.len();
        for (i, (e, at)) in held.into_iter().enumerate() {
            if let Err(err) = store.append_audit(e.clone(), at) {
                // Space ran out again: keep the rest for the next check.
                if let Ok(mut b) = self.backlog.lock() {
                    b.push_front((e, at));
                }
                log(&format!(
                    "writing the held audit entries: {err}; {} left",
                    n - i
                ));
                let _ = std::fs::remove_file(Self::reserve_file(&self.dir));
                return false;
            }
        }
        let lost = self.lost.swap(0, Ordering::Relaxed);
        let dropped = self.decisions_dropped.load(Ordering::Relaxed);
        let since = self.since_ms.swap(0, Ordering::Relaxed);
        let _ = store.append_audit(
            NewEntry::new(
                "controller",
                "audit.deferred",
                "disk",
                serde_json::json!({
                    "full_since_ms": since,
                    "held_and_written": n,
                    "lost": lost,
                    "decisions_dropped": dropped,
                }),
            ),
            SystemTime::now(),
        );
        self.full.store(false, Ordering::SeqCst);
        log(&format!(
            "the data directory `{}` has space again: changes are accepted ({n} held audit entries written, {lost} lost)",
            self.dir.display()
        ));
        true
    }

    fn hold(&self, e: NewEntry, at: SystemTime) -> Entry {
        let held = match self.backlog.lock() {
            Ok(mut b) if b.len() < BACKLOG => {
                b.push_back((e.clone(), at));
                true
            }
            _ => false,
        };
        if !held {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        // Not in the chain yet: seq 0 and no hash until it is written.
        Entry {
            seq: 0,
            ts_ms: ms(at),
            actor: e.actor,
            action: e.action,
            subject: e.subject,
            detail: e.detail.to_string(),
            prev: String::new(),
            hash: if held { "held".into() } else { "lost".into() },
        }
    }

    fn refuse_change(&self) -> Result<(), StoreError> {
        match self.condition() {
            Some(c) => Err(StoreError::Full(c)),
            None => Ok(()),
        }
    }
}

/// A store whose writes know about the disk ([`Disk`]).
pub struct GuardedStore {
    inner: Arc<dyn Store>,
    disk: Arc<Disk>,
}

impl std::fmt::Debug for GuardedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStore")
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl GuardedStore {
    pub fn new(inner: Arc<dyn Store>, disk: Arc<Disk>) -> Self {
        GuardedStore { inner, disk }
    }

    /// A change (its audit entry `entry`): refused while full, and the refusal audited
    /// (`ACTION.refused`, on the reserve); the write that finds the disk full enters the
    /// state.
    fn change<T>(
        &self,
        entry: &NewEntry,
        now: SystemTime,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let refused = |e: StoreError| {
            let _ = self.append_audit(
                NewEntry::new(
                    &entry.actor,
                    &format!("{}.refused", entry.action),
                    &entry.subject,
                    serde_json::json!({"reason": e.to_string()}),
                ),
                now,
            );
            Err(e)
        };
        if let Err(e) = self.disk.refuse_change() {
            return refused(e);
        }
        match f() {
            Err(e) if e.is_full() => {
                self.disk.filled(&e.to_string());
                refused(self.disk.refuse_change().err().unwrap_or(e))
            }
            r => r,
        }
    }

    /// What keeps the mesh alive (renewals, joins, their audit): retried once on the
    /// released reserve.
    fn vital<T>(&self, f: impl Fn() -> Result<T, StoreError>) -> Result<T, StoreError> {
        match f() {
            Err(e) if e.is_full() => {
                self.disk.filled(&e.to_string());
                f()
            }
            r => r,
        }
    }
}

impl Store for GuardedStore {
    fn head(&self) -> Result<Option<Revision>, StoreError> {
        self.inner.head()
    }
    fn revision(&self, rev: u64) -> Result<Revision, StoreError> {
        self.inner.revision(rev)
    }
    fn history(&self) -> Result<Vec<Revision>, StoreError> {
        self.inner.history()
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
        self.change(&entry.clone(), now, || {
            self.inner
                .commit(author, reason, summary, files, entry, now)
        })
    }
    fn append_audit(&self, entry: NewEntry, now: SystemTime) -> Result<Entry, StoreError> {
        if self.disk.is_full() && self.disk.backlog.lock().is_ok_and(|b| !b.is_empty()) {
            // Keep the order: behind what is already held.
            return Ok(self.disk.hold(entry, now));
        }
        match self.vital(|| self.inner.append_audit(entry.clone(), now)) {
            Err(e) if e.is_full() => Ok(self.disk.hold(entry, now)),
            r => r,
        }
    }
    fn audit(&self, filter: &AuditFilter) -> Result<Vec<Entry>, StoreError> {
        self.inner.audit(filter)
    }
    fn add_token(
        &self,
        hash: &str,
        rec: &TokenRecord,
        entry: NewEntry,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        self.change(&entry.clone(), now, || {
            self.inner.add_token(hash, rec, entry, now)
        })
    }
    fn use_token(&self, hash: &str, now: SystemTime) -> Result<Option<TokenRecord>, StoreError> {
        self.vital(|| self.inner.use_token(hash, now))
    }
    fn propose(&self, p: &Proposal, entry: NewEntry, now: SystemTime) -> Result<u64, StoreError> {
        self.change(&entry.clone(), now, || self.inner.propose(p, entry, now))
    }
    fn proposal(&self, id: u64) -> Result<Option<Proposal>, StoreError> {
        self.inner.proposal(id)
    }
    fn proposals(&self) -> Result<Vec<Proposal>, StoreError> {
        self.inner.proposals()
    }
    fn drop_proposal(&self, id: u64) -> Result<(), StoreError> {
        self.inner.drop_proposal(id)
    }
    fn state(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.state(key)
    }
    fn set_state(
        &self,
        key: &str,
        value: &str,
        entry: Option<NewEntry>,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let about = entry
            .clone()
            .unwrap_or_else(|| NewEntry::new("control-plane", "state", key, serde_json::json!({})));
        self.change(&about, now, || self.inner.set_state(key, value, entry, now))
    }
}
