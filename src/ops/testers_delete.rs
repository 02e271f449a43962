//! `testers delete` as an operation of the engine: each row names a user
//! (by `id` or `email`) to delete.
//!
//! Before the first delete, `prepare` resolves every row still to do to its
//! user (by listing the project, or by a lookup a row, whichever costs
//! fewer calls), keeps those records in the checkpoint, says how many users
//! would be deleted, refuses without `--yes` (or past `--max-delete`), and
//! writes every resolved record to a backup CSV (0600, whole or not at
//! all), in the export's columns so it can be imported back. The records
//! stay in the checkpoint, so the backup a resumed run writes still holds
//! the users its first run deleted.
//!
//! Exactly once: a delete changes state only, so sending it twice is
//! harmless; what matters is the label. A delete whose outcome is unknown
//! (or in flight at a kill) is sent again, and that second delete is the
//! probe: 404 then means the first one took effect (`deleted`), while a
//! 404 for a row never in doubt means somebody else deleted the user
//! (`unchanged`). One call a row either way, instead of a lookup and then
//! the delete.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;

use serde_json::Value;

use super::tester_ref::{self, TesterRef};
use crate::api::{ApiError, Client, Op};
use crate::checkpoint::Checkpoint;
use crate::engine::{Cost, Decision, Doubt, Effect, Intent, Operation, Parsed, Prepare, Sent};
use crate::exit::usage;
use crate::export::Resource;
use crate::export::sink::{CsvOptions, write_csv};
use crate::input::{Columns, CsvInput};

/// The delete of users.
pub struct TestersDelete {
    pub client: Client,
    pub beta: String,
    pub map: Option<PathBuf>,
    /// `--yes`: delete without a bound.
    pub yes: bool,
    /// `--max-delete N`: delete only if at most N users would be.
    pub max_delete: Option<u64>,
    /// Where the backup goes; by default beside the checkpoint.
    pub backup: Option<PathBuf>,
    pub checkpoint: PathBuf,
    cols: Option<Columns>,
    /// What `prepare` found, for the summary.
    would_delete: u64,
    backup_written: Option<PathBuf>,
}

impl TestersDelete {
    pub fn new(client: Client, beta: String, checkpoint: PathBuf) -> TestersDelete {
        TestersDelete {
            client,
            beta,
            map: None,
            yes: false,
            max_delete: None,
            backup: None,
            checkpoint,
            cols: None,
            would_delete: 0,
            backup_written: None,
        }
    }

    /// The backup's place: `--backup`, or beside the checkpoint, named
    /// after the run (a resumed run rewrites its own).
    fn backup_path(&self, run: i64) -> PathBuf {
        self.backup.clone().unwrap_or_else(|| {
            let stem = self
                .checkpoint
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "prefsync".into());
            self.checkpoint
                .with_file_name(format!("{stem}.run{run}.deleted-testers.csv"))
        })
    }

    /// Resolves the open rows no earlier run of this file resolved.
    async fn resolve(&self, p: &Prepare<'_>, todo: &HashSet<String>) -> anyhow::Result<()> {
        let emails = todo.iter().filter(|k| k.contains('@')).count() as u64;
        // Ids are shown one by one (no documented limit); emails cost a
        // testers-list call each, unless listing the project costs fewer.
        let list =
            emails > 0 && tester_ref::listing_pages(&self.client, &self.beta).await? < emails;
        if list {
            tracing::info!("listing the project to find the {emails} users named by email");
            tester_ref::list_into_known(
                &self.client,
                p.checkpoint,
                p.run,
                &self.beta,
                Some(todo),
                p.stop,
                p.progress,
            )
            .await?;
        }
        for key in todo {
            if list && key.contains('@') {
                continue;
            }
            if p.stop.is_set() {
                return Err(anyhow::Error::new(crate::exit::StoppedError(
                    "stopped while looking the users up".into(),
                )));
            }
            let who = match key.parse::<u64>() {
                Ok(id) => TesterRef::Id(id),
                Err(_) => TesterRef::Email(key.clone()),
            };
            if let Some(t) = tester_ref::find(&self.client, &self.beta, &who).await? {
                p.checkpoint
                    .store_known(p.run, key, tester_ref::id_of(&t), &t.to_string())?;
            }
        }
        Ok(())
    }

    /// Every user this run resolved, whole, in the export's CSV columns.
    fn write_backup(&self, ck: &Checkpoint, run: i64) -> anyhow::Result<PathBuf> {
        let path = self.backup_path(run);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)?;
        // The records go through a private spool beside the backup, which
        // the export's writer turns into the CSV and renames into place.
        let mut spool = tempfile::NamedTempFile::new_in(&dir)?;
        let mut seen = HashSet::new();
        for (_, id, record) in ck.known_records(run)? {
            if seen.insert(id) {
                spool.write_all(record.as_bytes())?;
                spool.write_all(b"\n")?;
            }
        }
        spool.flush()?;
        write_csv(
            spool.path(),
            &path,
            Resource::Testers,
            CsvOptions {
                excel_safe: false,
                bom: false,
            },
        )?;
        Ok(path)
    }
}

/// One row: the user it names, and what was learnt of it.
#[derive(Debug)]
pub struct DeleteRow {
    who: TesterRef,
    key: String,
    /// The user's id, as resolved before the first delete.
    target: Option<u64>,
    /// A delete of this row may have gone through already.
    in_doubt: bool,
}

impl Operation for TestersDelete {
    fn done_note(&self, _row: &DeleteRow, action: &str) -> Option<String> {
        (action == "unchanged").then(|| "no such user: deleted already".to_string())
    }

    type Row = DeleteRow;

    fn kind(&self) -> &'static str {
        "testers.delete"
    }

    fn actions(&self) -> &'static [&'static str] {
        &["deleted", "unchanged"]
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        (name == "delete").then_some(("delete", "deleted"))
    }

    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        self.cols = Some(tester_ref::columns(&input.headers, self.map.as_deref())?);
        Ok(())
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<DeleteRow>, String> {
        let who = tester_ref::parse(self.cols.as_ref().expect("started"), cells)?;
        Ok(Parsed::Row(DeleteRow {
            key: who.key(),
            who,
            target: None,
            in_doubt: false,
        }))
    }

    fn key<'r>(&self, row: &'r DeleteRow) -> &'r str {
        &row.key
    }

    fn key_name(&self) -> &'static str {
        "email_or_id"
    }

    /// Every row is recorded first: `prepare` reads their keys to count and
    /// back up the users before the first delete.
    fn single_pass(&self) -> bool {
        false
    }

    async fn prepare(&mut self, p: Prepare<'_>) -> anyhow::Result<()> {
        let open = p.checkpoint.open_keys(p.run)?;
        // A stopped run's resolved users stay as it found them: some may be
        // deleted by now, and the backup must still hold them.
        let mut todo = HashSet::new();
        for k in &open {
            if p.checkpoint.known(p.run, k)?.is_none() {
                todo.insert(k.clone());
            }
        }
        if !todo.is_empty() {
            self.resolve(&p, &todo).await?;
        }
        let mut ids = HashSet::new();
        for k in &open {
            if let Some(r) = p.checkpoint.known(p.run, k)?
                && let Ok(t) = serde_json::from_str::<Value>(&r)
            {
                ids.insert(tester_ref::id_of(&t));
            }
        }
        self.would_delete = ids.len() as u64;
        let n = self.would_delete;
        tracing::warn!(
            "{n} users would be deleted from project {} ({} rows to do; the rest name nobody in the project)",
            self.beta,
            open.len()
        );
        if p.dry_run || n == 0 {
            return Ok(());
        }
        match self.max_delete {
            Some(max) if n > max => {
                return Err(usage(format!(
                    "{n} users would be deleted from project {}, more than --max-delete {max}: nothing was deleted. \
                     Check the file (--dry-run --results PATH lists them), or raise --max-delete",
                    self.beta
                )));
            }
            None if !self.yes => {
                return Err(usage(format!(
                    "{n} users would be deleted from project {}: nothing was deleted. \
                     Add --yes to delete them, or --max-delete N to delete them only if they are at most N \
                     (--dry-run --results PATH lists them first)",
                    self.beta
                )));
            }
            _ => {}
        }
        let path = self.write_backup(p.checkpoint, p.run)?;
        tracing::warn!(
            "the records of the users to delete are in {} (it can be fed to `prefsync import testers`)",
            path.display()
        );
        self.backup_written = Some(path);
        Ok(())
    }

    fn cost(&self) -> Cost {
        Cost {
            class: None,
            calls_per_row: 1.0,
        }
    }

    /// A row whose user was found is to delete; the rest are decided
    /// `unchanged` without a call.
    fn plan(
        &self,
        ck: &Checkpoint,
        run: i64,
        row: &mut DeleteRow,
    ) -> anyhow::Result<Option<Intent>> {
        row.target = ck
            .known(run, &row.key)?
            .and_then(|r| serde_json::from_str::<Value>(&r).ok())
            .map(|t| tester_ref::id_of(&t));
        Ok(row.target.map(|_| "delete"))
    }

    async fn find_effect(&self, row: &mut DeleteRow, doubt: Doubt) -> Result<Effect, ApiError> {
        // Nothing was sent for a row stopped before its intent was durable.
        // Otherwise the delete sent again is the probe (see the module).
        if !matches!(doubt, Doubt::InFlightAtStop(None)) {
            row.in_doubt = true;
        }
        Ok(Effect::NotDone)
    }

    async fn decide(&self, row: &mut DeleteRow) -> Result<Decision, ApiError> {
        Ok(match row.target {
            Some(_) => Decision::Send("delete"),
            // Nobody in the project has this id or email: already deleted.
            None => Decision::Done {
                action: "unchanged",
                target: match row.who {
                    TesterRef::Id(id) => id,
                    TesterRef::Email(_) => 0,
                },
            },
        })
    }

    async fn send(&self, row: &mut DeleteRow, _intent: Intent) -> Result<Sent, ApiError> {
        let id = row.target.expect("a delete is decided for a resolved user");
        let beta = &self.beta;
        match self
            .client
            .call(
                Op::TesterDelete,
                Some(beta),
                &format!("betas/{beta}/testers/{id}.json"),
                &[],
                None,
            )
            .await
        {
            Ok(_) => Ok(Sent::Done {
                action: "deleted",
                target: id,
            }),
            Err(ApiError::NotFound { .. }) => Ok(Sent::Done {
                action: if row.in_doubt { "deleted" } else { "unchanged" },
                target: id,
            }),
            Err(e) => Err(e),
        }
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("would_delete".into(), Value::from(self.would_delete));
        m.insert(
            "backup".into(),
            self.backup_written
                .as_ref()
                .map_or(Value::Null, |p| Value::String(p.display().to_string())),
        );
        m
    }
}
