//! The audit log: append-only and hash-chained. Each entry's hash is SHA-256 over its
//! sequence number, time, actor, action, subject, detail and the previous entry's hash, so
//! editing, deleting or reordering any stored entry breaks the chain at that entry, and
//! `verify` names it.

use serde::Serialize;

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub seq: u64,
    /// Unix time, milliseconds.
    pub ts_ms: i64,
    /// Who: an operator (`operator:alice`), a workload SPIFFE ID, `controller` or
    /// `detector` (anomaly detection).
    pub actor: String,
    /// What, e.g. `apply`, `apply.rejected`, `rollback`, `token.issue`, `token.use`,
    /// `token.refused`, `svid.issue`, `svid.refused`, `override.create`, `override.expire`,
    /// `ratelimit.expire`, `fault.expire`, `anomaly.detected`, `anomaly.throttle`, `anomaly.quarantine`,
    /// `quarantine.release`.
    pub action: String,
    /// What it was done to (a revision, an identity, an override).
    pub subject: String,
    /// JSON with the particulars.
    pub detail: String,
    pub prev: String,
    pub hash: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The chained hash of an entry's content.
pub fn entry_hash(
    seq: u64,
    ts_ms: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
    prev: &str,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // Length-prefixed fields: no two different entries serialize alike.
    for f in [
        seq.to_string().as_str(),
        ts_ms.to_string().as_str(),
        actor,
        action,
        subject,
        detail,
        prev,
    ] {
        ctx.update(&(f.len() as u64).to_be_bytes());
        ctx.update(f.as_bytes());
    }
    hex(ctx.finish().as_ref())
}

/// What `verify` found wrong, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Broken {
    #[error("entry {seq} was edited: its content does not match its hash")]
    Edited { seq: u64 },
    #[error("entries are missing before entry {seq} (expected entry {expected}): deleted")]
    Missing { seq: u64, expected: u64 },
    #[error(
        "entry {seq} does not follow entry {after}: the log was reordered or an entry replaced"
    )]
    Unlinked { seq: u64, after: u64 },
}

/// Checks a whole log, in stored order. Returns the head hash when intact.
pub fn verify(entries: &[Entry]) -> Result<String, Broken> {
    let mut prev = GENESIS.to_owned();
    let mut after = 0u64;
    for (expected, e) in (1u64..).zip(entries) {
        if e.seq != expected {
            return Err(if e.seq > expected {
                Broken::Missing {
                    seq: e.seq,
                    expected,
                }
            } else {
                Broken::Unlinked { seq: e.seq, after }
            });
        }
        if e.prev != prev {
            return Err(Broken::Unlinked { seq: e.seq, after });
        }
        if entry_hash(
            e.seq, e.ts_ms, &e.actor, &e.action, &e.subject, &e.detail, &e.prev,
        ) != e.hash
        {
            return Err(Broken::Edited { seq: e.seq });
        }
        prev = e.hash.clone();
        after = e.seq;
    }
    Ok(prev)
}
