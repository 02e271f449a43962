//! The local mirror of a project: the SQLite file that `export --format
//! sqlite` writes (schema in [`crate::export::sink`]), read by sync and
//! kept current by every write of prefsync given `--mirror`.
//!
//! What a sync may trust is the latest listing of the project's users:
//! complete (every page read), unfiltered (so a user absent from it is
//! gone) and recent. A record written back after a create or an update is
//! the API's own answer; its `updated_at` guards it, so a listing read
//! before it never replaces it with an older one.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::export::sink::{Sink, SqliteSink};
use crate::time::{iso8601, parse_iso8601};

/// The latest listing of a project's users in the mirror.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub run: i64,
    pub finished_at: Option<String>,
    pub complete: bool,
    pub consistent: bool,
    pub filtered: bool,
}

impl Listing {
    /// How long ago it finished, if it did and the time reads.
    pub fn age(&self) -> Option<Duration> {
        let t = self.finished_at.as_deref()?;
        let at = parse_iso8601(t)?;
        SystemTime::now().duration_since(at).ok()
    }
}

/// The mirror, open. Shared by workers that write records back: one
/// connection behind a lock (writes are a row each, far apart).
pub struct Mirror {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Mirror {
    /// Opens (and, for an older file, migrates) a mirror; a new file is
    /// created with the export's schema.
    pub fn open(path: &Path) -> anyhow::Result<Mirror> {
        let mut sink = SqliteSink::open(path)?;
        sink.close()?;
        drop(sink);
        let conn = Connection::open(path)
            .with_context(|| format!("failed to open the mirror {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // As the export writes it: a power cut may lose the last writes
        // back, never the file's consistency; the next listing (or, for
        // the listener, the journal) brings them back.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Mirror {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The numeric id of a project named by id or UID, if the mirror knows
    /// it (a UID is learnt from a listing).
    pub fn project_id(&self, beta: &str) -> anyhow::Result<Option<i64>> {
        if let Ok(id) = beta.parse::<i64>() {
            return Ok(Some(id));
        }
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row("SELECT beta_id FROM projects WHERE uid = ?1", [beta], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The latest listing of the project's users that was not abandoned.
    pub fn latest_listing(&self, beta_id: i64) -> anyhow::Result<Option<Listing>> {
        let conn = self.conn.lock().unwrap();
        Ok(conn
            .query_row(
                "SELECT id, finished_at, complete, COALESCE(consistent, 0), filters FROM export_runs
                 WHERE beta_id = ?1 AND resource = 'testers' AND complete >= 0
                 ORDER BY id DESC LIMIT 1",
                [beta_id],
                |r| {
                    Ok(Listing {
                        run: r.get(0)?,
                        finished_at: r.get(1)?,
                        complete: r.get::<_, i64>(2)? == 1,
                        consistent: r.get::<_, i64>(3)? == 1,
                        filtered: !r.get::<_, String>(4)?.is_empty(),
                    })
                },
            )
            .optional()?)
    }

    /// The user with this email (compared as the mirror does, ASCII
    /// lower-cased), if the mirror holds one not deleted.
    pub fn tester(&self, beta_id: i64, email: &str) -> anyhow::Result<Option<Value>> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn.prepare_cached(
            "SELECT record FROM testers WHERE beta_id = ?1 AND email_key = lower(?2) AND deleted_at IS NULL",
        )?;
        let rec: Option<String> = st
            .query_row(params![beta_id, email], |r| r.get(0))
            .optional()?;
        Ok(rec.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// Why this email is suppressed, if the mirror's suppressions say it is.
    pub fn suppression(&self, beta_id: i64, email: &str) -> anyhow::Result<Option<String>> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn.prepare_cached(
            "SELECT COALESCE(reason, 'suppressed') FROM suppressions WHERE beta_id = ?1 AND lower(email) = lower(?2) AND deleted_at IS NULL",
        )?;
        Ok(st
            .query_row(params![beta_id, email], |r| r.get(0))
            .optional()?)
    }

    /// The users the mirror holds for the project (not deleted): id and
    /// email, with the whole record.
    pub fn testers(&self, beta_id: i64) -> anyhow::Result<Vec<(u64, String, Value)>> {
        let conn = self.conn.lock().unwrap();
        let mut st = conn.prepare(
            "SELECT id, email, record FROM testers WHERE beta_id = ?1 AND deleted_at IS NULL ORDER BY id",
        )?;
        let rows = st
            .query_map([beta_id], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .map(|(id, e, r)| (id, e, serde_json::from_str(&r).unwrap_or(Value::Null)))
            .collect())
    }

    /// Writes back a user as the API returned it (after a create or an
    /// update). Its `updated_at` guards the write: an older record never
    /// replaces a newer one. Seen now, outside any listing run, so a
    /// listing that started before it does not mark it deleted.
    pub fn write_tester(&self, beta_id: i64, t: &Value) -> anyhow::Result<()> {
        let Some(id) = t.get("id").and_then(Value::as_i64) else {
            return Ok(());
        };
        let s = |k: &str| t.get(k).and_then(Value::as_str).map(str::to_string);
        let now = iso8601(SystemTime::now());
        let mut conn = self.conn.lock().unwrap();
        // Immediate: the write lock is waited for at BEGIN (a read upgraded
        // to a write midway is refused at once when another connection
        // wrote, as the listener's journal does all the time).
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(email) = s("email") {
            tx.execute(
                "UPDATE testers SET deleted_at = ?4 WHERE beta_id = ?1 AND email_key = lower(?2) AND id != ?3 AND deleted_at IS NULL",
                params![beta_id, email, id, now],
            )?;
        }
        tx.execute(
            "INSERT INTO testers (beta_id, id, record, first_seen_at, last_seen_at, last_seen_run, email, status, referral_code, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4, 0, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (beta_id, id) DO UPDATE SET
               record = CASE WHEN excluded.updated_at IS NULL OR testers.updated_at IS NULL OR excluded.updated_at >= testers.updated_at THEN excluded.record ELSE testers.record END,
               email = CASE WHEN excluded.updated_at IS NULL OR testers.updated_at IS NULL OR excluded.updated_at >= testers.updated_at THEN excluded.email ELSE testers.email END,
               status = CASE WHEN excluded.updated_at IS NULL OR testers.updated_at IS NULL OR excluded.updated_at >= testers.updated_at THEN excluded.status ELSE testers.status END,
               updated_at = MAX(COALESCE(excluded.updated_at, ''), COALESCE(testers.updated_at, '')),
               last_seen_at = excluded.last_seen_at, deleted_at = NULL",
            params![
                beta_id,
                id,
                t.to_string(),
                now,
                s("email"),
                s("status"),
                s("referral_code"),
                s("created_at"),
                s("updated_at"),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The id and email of a user the mirror holds (not deleted), by id or
    /// by email.
    pub fn tester_ref(
        &self,
        beta_id: i64,
        id: Option<u64>,
        email: Option<&str>,
    ) -> anyhow::Result<Option<(u64, Option<String>)>> {
        let conn = self.conn.lock().unwrap();
        let row = match (id, email) {
            (Some(id), _) => conn
                .query_row(
                    "SELECT id, email FROM testers WHERE beta_id = ?1 AND id = ?2",
                    params![beta_id, id as i64],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
                )
                .optional()?,
            (None, Some(e)) => conn
                .query_row(
                    "SELECT id, email FROM testers WHERE beta_id = ?1 AND email_key = lower(?2) AND deleted_at IS NULL",
                    params![beta_id, e],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
                )
                .optional()?,
            (None, None) => None,
        };
        Ok(row)
    }

    /// Replaces what the mirror holds of one user's rewards or points with
    /// `items`, the whole list of them as the API gives it now (a list
    /// filtered by the user's email): each is written, and the user's
    /// records it lacks are marked deleted.
    pub fn replace_user_records(
        &self,
        beta_id: i64,
        resource: crate::export::Resource,
        user_id: u64,
        items: &[Value],
    ) -> anyhow::Result<()> {
        use crate::export::Resource;
        assert!(matches!(resource, Resource::Rewards | Resource::Points));
        let t = resource.name();
        let cols: Vec<&str> = resource.sql_columns().iter().map(|(c, _)| *c).collect();
        let ph: Vec<String> = (0..cols.len()).map(|i| format!("?{}", i + 5)).collect();
        let upd: Vec<String> = cols.iter().map(|c| format!("{c} = excluded.{c}")).collect();
        let now = iso8601(SystemTime::now());
        let mut conn = self.conn.lock().unwrap();
        // Immediate: the write lock is waited for at BEGIN (a read upgraded
        // to a write midway is refused at once when another connection
        // wrote, as the listener's journal does all the time).
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut ids = Vec::new();
        {
            let mut ins = tx.prepare_cached(&format!(
                "INSERT INTO {t} (beta_id, id, record, first_seen_at, last_seen_at, last_seen_run, {cols})
                 VALUES (?1, ?2, ?3, ?4, ?4, 0, {ph})
                 ON CONFLICT (beta_id, id) DO UPDATE SET record = excluded.record,
                   last_seen_at = excluded.last_seen_at, deleted_at = NULL, {upd}",
                cols = cols.join(", "),
                ph = ph.join(", "),
                upd = upd.join(", ")
            ))?;
            for item in items {
                let Some(id) = item.get("id").and_then(Value::as_i64) else {
                    continue;
                };
                ids.push(id);
                let mut values: Vec<rusqlite::types::Value> = vec![
                    beta_id.into(),
                    id.into(),
                    item.to_string().into(),
                    now.clone().into(),
                ];
                for c in &cols {
                    values.push(crate::export::sink::sql_value(item.get(*c)));
                }
                ins.execute(rusqlite::params_from_iter(values))?;
            }
        }
        let keep = serde_json::to_string(&ids)?;
        tx.execute(
            &format!(
                "UPDATE {t} SET deleted_at = ?4 WHERE beta_id = ?1 AND user_id = ?2 AND deleted_at IS NULL
                   AND id NOT IN (SELECT value FROM json_each(?3))"
            ),
            params![beta_id, user_id as i64, keep, now],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Marks deleted the user the mirror holds with this email (a user the
    /// API no longer has).
    pub fn mark_deleted_email(&self, beta_id: i64, email: &str) -> anyhow::Result<()> {
        let conn = self.conn.lock().unwrap();
        conn.execute(
            "UPDATE testers SET deleted_at = ?3 WHERE beta_id = ?1 AND email_key = lower(?2) AND deleted_at IS NULL",
            params![beta_id, email, iso8601(SystemTime::now())],
        )?;
        Ok(())
    }

    /// Marks a user deleted (after prefsync deleted it).
    pub fn mark_deleted(&self, beta_id: i64, id: u64) -> anyhow::Result<()> {
        let conn = self.conn.lock().unwrap();
        conn.execute(
            "UPDATE testers SET deleted_at = ?3 WHERE beta_id = ?1 AND id = ?2 AND deleted_at IS NULL",
            params![beta_id, id as i64, iso8601(SystemTime::now())],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_back_never_replaces_a_newer_record() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::open(&dir.path().join("m.sqlite")).unwrap();
        let rec = |status: &str, at: &str| serde_json::json!({"id": 7, "email": "A@x.io", "status": status, "updated_at": at});
        m.write_tester(1, &rec("applied", "2026-01-02T00:00:00Z"))
            .unwrap();
        m.write_tester(1, &rec("imported", "2026-01-01T00:00:00Z"))
            .unwrap();
        assert_eq!(m.tester(1, "a@X.io").unwrap().unwrap()["status"], "applied");
        m.write_tester(1, &rec("active", "2026-01-03T00:00:00Z"))
            .unwrap();
        assert_eq!(m.tester(1, "a@x.io").unwrap().unwrap()["status"], "active");
        // Another user with the email: the first is gone.
        m.write_tester(
            1,
            &serde_json::json!({"id": 8, "email": "a@x.io", "updated_at": "2026-01-04T00:00:00Z"}),
        )
        .unwrap();
        assert_eq!(m.tester(1, "a@x.io").unwrap().unwrap()["id"], 8);
        m.mark_deleted(1, 8).unwrap();
        assert_eq!(m.tester(1, "a@x.io").unwrap(), None);
    }
}
