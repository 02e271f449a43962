//! The event journal: the mirror's `webhook_events` table (schema in
//! [`crate::export::sink`], version 4).
//!
//! A delivery is answered 200 only once its row is committed with
//! `synchronous = FULL` (the WAL is fsync'd at each commit), so an accepted
//! event survives a kill -9 or a power cut. One thread owns the writing
//! connection and commits whatever deliveries are waiting in one
//! transaction (group commit): one fsync serves many deliveries under load.
//! A body already journalled (same SHA-256) is a duplicate: answered 200,
//! not stored twice. When the row cannot be written (the database locked
//! past a short wait, the disk full) the delivery is answered 429, which
//! Prefinery retries.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

/// Deliveries waiting for the writer at most; past it, 429.
pub const QUEUE: usize = 1024;
/// Deliveries committed in one transaction at most.
const GROUP: usize = 256;
/// How long the writer waits for a lock before it gives up (and the
/// delivery is answered 429): well under Prefinery's 15 s timeout.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// One accepted delivery, to be made durable.
pub struct Delivery {
    pub received_at: String,
    pub signed_at: i64,
    pub sha256: String,
    pub body: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journalled {
    New,
    Duplicate,
}

type Job = (Delivery, oneshot::Sender<Result<Journalled, String>>);

/// The handle the HTTP handlers write through.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writing thread on `path` (already migrated). `on_commit`
    /// runs after each commit with the number of new rows.
    pub fn start(
        path: &Path,
        on_commit: impl Fn(usize) + Send + 'static,
    ) -> anyhow::Result<(Writer, std::thread::JoinHandle<()>)> {
        let mut conn = open(path)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(LOCK_WAIT)?;
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || {
                let mut logged_failure = false;
                while let Some(first) = rx.blocking_recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < GROUP {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    match write(&mut conn, &jobs) {
                        Ok(outcomes) => {
                            logged_failure = false;
                            let new = outcomes.iter().filter(|o| **o == Journalled::New).count();
                            on_commit(new);
                            for ((_, reply), o) in jobs.into_iter().zip(outcomes) {
                                let _ = reply.send(Ok(o));
                            }
                        }
                        Err(e) => {
                            let e = format!("{e:#}");
                            if !logged_failure {
                                tracing::error!(
                                    "cannot write the journal (deliveries are answered 429 and will be sent again): {e}"
                                );
                                logged_failure = true;
                            }
                            for (_, reply) in jobs {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            })?;
        Ok((Writer { tx }, thread))
    }

    /// Journals a delivery; `Err` when it cannot be (the caller answers 429).
    pub async fn journal(&self, d: Delivery) -> Result<Journalled, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send((d, reply))
            .map_err(|_| "the journal's queue is full".to_string())?;
        rx.await
            .map_err(|_| "the journal's writer stopped".to_string())?
    }
}

fn write(conn: &mut Connection, jobs: &[Job]) -> anyhow::Result<Vec<Journalled>> {
    // Immediate: the write lock is taken (or waited for) at BEGIN, never
    // refused midway as a read upgraded to a write can be.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut out = Vec::with_capacity(jobs.len());
    {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO webhook_events (received_at, signed_at, sha256, body) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (d, _) in jobs {
            let n = ins.execute(params![d.received_at, d.signed_at, d.sha256, &d.body[..]])?;
            out.push(if n == 1 {
                Journalled::New
            } else {
                Journalled::Duplicate
            });
        }
    }
    tx.commit()?;
    Ok(out)
}

fn open(path: &Path) -> anyhow::Result<Connection> {
    // People's data: private from its first byte, whoever opens it first.
    crate::fsutil::private_sqlite(path)?;
    let conn = Connection::open(path)
        .with_context(|| format!("failed to open the mirror {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    Ok(conn)
}

/// A journalled event waiting to be applied.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: i64,
    pub body: Vec<u8>,
    pub received_at: String,
}

/// How the journal stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub pending: u64,
    pub applied: u64,
    pub unknown: u64,
}

/// What the applier made of an event: its row, the event name and the
/// user (id, email) it found.
pub type Outcome = (i64, Option<String>, Option<u64>, Option<String>);

/// The applier's side: reads what is pending, records what it did.
pub struct Reader {
    // Behind a lock so the applier's concurrent reads of users can share it.
    conn: std::sync::Mutex<Connection>,
}

impl Reader {
    pub fn open(path: &Path) -> anyhow::Result<Reader> {
        let conn = open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        // What the applier records can be lost at a power cut without harm
        // (the events are applied again); the WAL keeps it in order.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Reader {
            conn: std::sync::Mutex::new(conn),
        })
    }

    /// The oldest pending events first.
    pub fn pending(&self, limit: usize) -> anyhow::Result<Vec<Pending>> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn.prepare_cached(
            "SELECT id, body, received_at FROM webhook_events WHERE state = 'pending' ORDER BY id LIMIT ?1",
        )?;
        let rows = st
            .query_map([limit as i64], |r| {
                Ok(Pending {
                    id: r.get(0)?,
                    body: r.get(1)?,
                    received_at: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// When the oldest pending event came, if any is pending.
    pub fn oldest_pending(&self) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn
            .lock()
            .unwrap()
            .query_row(
                "SELECT received_at FROM webhook_events WHERE state = 'pending' ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records the outcome of events: `state` applied or unknown, with the
    /// event name and the user found.
    pub fn mark(&self, rows: &[Outcome], state: &str, note: Option<&str>) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE webhook_events SET state = ?2, event = ?3, user_id = ?4, email = ?5, note = ?6,
                   applied_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), attempts = attempts + 1 WHERE id = ?1",
            )?;
            for (id, event, user, email) in rows {
                st.execute(params![
                    id,
                    state,
                    event,
                    user.map(|u| u as i64),
                    email,
                    note
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Counts an attempt that failed; the events stay pending.
    pub fn failed(&self, ids: &[i64], why: &str) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().unwrap();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for id in ids {
            tx.execute(
                "UPDATE webhook_events SET attempts = attempts + 1, note = ?2 WHERE id = ?1",
                params![id, why],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn counts(&self) -> anyhow::Result<Counts> {
        let mut c = Counts::default();
        let conn = self.conn.lock().unwrap();
        let mut st = conn.prepare("SELECT state, count(*) FROM webhook_events GROUP BY state")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            let n = n as u64;
            c.total += n;
            match state.as_str() {
                "pending" => c.pending = n,
                "applied" => c.applied = n,
                "unknown" => c.unknown = n,
                _ => {}
            }
        }
        Ok(c)
    }
}

/// The hex SHA-256 of a body.
pub fn sha256_hex(body: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
