//! `apply`: does exactly a reviewed plan, and nothing else. Its input is
//! the plan's actions, one row a user (written from the plan by
//! [`crate::sync::apply`]): create, update or delete, with the record's
//! `updated_at` as the plan saw it.
//!
//! Before each update or delete the user is read by id (a show, not the
//! 60-a-minute list): one changed since the plan is not touched and is
//! reported as `drift`, with what changed. A create whose email was taken
//! since the plan is drift too. Exactly once: an update's effect is its
//! fields found set; a delete's, the user gone; a create's, the email
//! found (a lookup).

use serde_json::Value;

use crate::api::{ApiError, Client, Op, TesterInput};
use crate::engine::{Cost, Decision, Doubt, Effect, Intent, Operation, Parsed, Prepare, Sent};
use crate::exit::usage;
use crate::input::{Columns, CsvInput};
use crate::ops::tester_ref::show;
use crate::ops::testers_import::{MirrorUse, cell_of, input_of};

pub struct TestersApply {
    pub client: Client,
    pub beta: String,
    /// `--on-drift stop`: a drift stops the run, the rest stays to do.
    pub stop_on_drift: bool,
    pub mirror: Option<MirrorUse>,
    columns: Columns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Create,
    Update,
    Delete,
}

#[derive(Debug)]
pub struct ApplyRow {
    email: String,
    act: Act,
    target: Option<u64>,
    base: String,
    input: TesterInput,
    /// Each field's value as the plan saw it.
    olds: serde_json::Map<String, Value>,
}

impl TestersApply {
    pub fn new(client: Client, beta: String) -> TestersApply {
        TestersApply {
            client,
            beta,
            stop_on_drift: false,
            mirror: None,
            columns: Columns::default(),
        }
    }

    fn mirror_write(&self, t: &Value) {
        if let Some(m) = &self.mirror
            && let Err(e) = m.mirror.write_tester(m.beta_id, t)
        {
            tracing::warn!("failed to write back to the mirror: {e:#}");
        }
    }

    /// What differs between the plan's fields and the user now.
    fn drift_of(&self, row: &ApplyRow, now: &Value) -> String {
        let changed: Vec<String> = crate::ops::testers_import::field_changes(Some(now), &row.input)
            .into_iter()
            .map(|(f, now_v, planned)| {
                let was = row
                    .olds
                    .get(&f)
                    .map(|o| cell_of(Some(o)))
                    .unwrap_or_default();
                format!("{f}: was {was:?} in the plan, now {now_v:?}, planned {planned:?}")
            })
            .collect();
        format!(
            "{} changed since the plan (updated_at {:?}, the plan saw {:?}); not touched. {}",
            row.email,
            cell_of(now.get("updated_at")),
            row.base,
            changed.join("; ")
        )
    }
}

impl Operation for TestersApply {
    fn done_note(&self, row: &ApplyRow, action: &str) -> Option<String> {
        (action == "unchanged" && row.act == Act::Delete)
            .then(|| "no such user: deleted already".to_string())
    }

    type Row = ApplyRow;

    fn kind(&self) -> &'static str {
        "testers.apply"
    }

    fn actions(&self) -> &'static [&'static str] {
        &["created", "updated", "deleted", "unchanged"]
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        match name {
            "create" => Some(("create", "created")),
            "update" => Some(("update", "updated")),
            "delete" => Some(("delete", "deleted")),
            _ => None,
        }
    }

    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        self.columns = Columns::new(&input.headers, None)?;
        for c in ["line", "email", "action", "changes"] {
            if self.columns.get(c).is_none() {
                return Err(usage(format!(
                    "{} is not a plan's action file (no column {c}); give apply the plan file itself",
                    input.source.display()
                )));
            }
        }
        Ok(())
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<ApplyRow>, String> {
        let c = |n: &str| self.columns.cell(cells, n).unwrap_or_default().to_string();
        let act = match c("action").as_str() {
            "create" => Act::Create,
            "update" => Act::Update,
            "delete" => Act::Delete,
            other => return Err(format!("unknown action {other:?} in the plan")),
        };
        let changes: serde_json::Map<String, Value> = serde_json::from_str(&c("changes"))
            .map_err(|e| format!("the plan's changes do not read: {e}"))?;
        Ok(Parsed::Row(ApplyRow {
            email: c("email").to_ascii_lowercase(),
            act,
            target: c("target_id").parse().ok(),
            base: c("base_updated_at"),
            input: input_of(&changes),
            olds: serde_json::from_str(&c("olds")).unwrap_or_default(),
        }))
    }

    fn key<'r>(&self, row: &'r ApplyRow) -> &'r str {
        &row.email
    }

    fn key_name(&self) -> &'static str {
        "email"
    }

    async fn prepare(&mut self, _p: Prepare<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    fn stop_on_drift(&self) -> bool {
        self.stop_on_drift
    }

    fn cost(&self) -> Cost {
        // A show before each update or delete, then the write.
        Cost {
            class: None,
            calls_per_row: 2.0,
        }
    }

    async fn find_effect(&self, row: &mut ApplyRow, doubt: Doubt) -> Result<Effect, ApiError> {
        let intent = match doubt {
            Doubt::InFlightAtStop(None) => return Ok(Effect::NotDone),
            Doubt::InFlightAtStop(Some(i)) | Doubt::OutcomeUnknown(i) => i,
        };
        match (intent, row.target) {
            ("create", _) => {
                let found = self.client.find_tester(&self.beta, &row.email).await?;
                Ok(match found {
                    Some(t) => Effect::Done {
                        action: "created",
                        target: t.id,
                    },
                    None => Effect::NotDone,
                })
            }
            ("update", Some(id)) => match show(&self.client, &self.beta, id).await? {
                Some(now) if crate::import::mapping::diff(&now, &row.input).is_none() => {
                    Ok(Effect::Done {
                        action: "updated",
                        target: id,
                    })
                }
                _ => Ok(Effect::NotDone),
            },
            ("delete", Some(id)) => match show(&self.client, &self.beta, id).await? {
                None => Ok(Effect::Done {
                    action: "deleted",
                    target: id,
                }),
                Some(_) => Ok(Effect::NotDone),
            },
            _ => Ok(Effect::NotDone),
        }
    }

    async fn decide(&self, row: &mut ApplyRow) -> Result<Decision, ApiError> {
        let Some(id) = row.target else {
            return Ok(Decision::Send("create"));
        };
        let now = show(&self.client, &self.beta, id).await?;
        Ok(match (row.act, now) {
            (Act::Delete, None) => Decision::Done {
                action: "unchanged",
                target: id,
            },
            (_, None) => Decision::Drift {
                message: format!(
                    "{} was deleted since the plan; not created again",
                    row.email
                ),
            },
            // Changed since the plan: a newer `updated_at`, or (within the
            // second `updated_at` counts in) a field the plan changes no
            // longer holding the value the plan saw.
            (_, Some(now))
                if cell_of(now.get("updated_at")) != row.base
                    || crate::ops::testers_import::field_changes(Some(&now), &row.input)
                        .iter()
                        .any(|(f, now_v, _)| {
                            row.olds
                                .get(f)
                                .is_some_and(|old| cell_of(Some(old)) != *now_v)
                        }) =>
            {
                Decision::Drift {
                    message: self.drift_of(row, &now),
                }
            }
            (Act::Delete, Some(_)) => Decision::Send("delete"),
            (_, Some(_)) => Decision::Send("update"),
        })
    }

    async fn send(&self, row: &mut ApplyRow, intent: Intent) -> Result<Sent, ApiError> {
        let beta = &self.beta;
        match (intent, row.target) {
            ("delete", Some(id)) => {
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
                    Ok(_) | Err(ApiError::NotFound { .. }) => {
                        if let Some(m) = &self.mirror {
                            let _ = m.mirror.mark_deleted(m.beta_id, id);
                        }
                        Ok(Sent::Done {
                            action: "deleted",
                            target: id,
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            ("update", Some(id)) => {
                let t = self.client.update_tester(beta, id, &row.input).await?;
                self.mirror_write(&serde_json::to_value(&t).unwrap_or(Value::Null));
                Ok(Sent::Done {
                    action: "updated",
                    target: id,
                })
            }
            _ => match self.client.create_tester(beta, &row.input).await {
                Ok(t) => {
                    self.mirror_write(&serde_json::to_value(&t).unwrap_or(Value::Null));
                    Ok(Sent::Done {
                        action: "created",
                        target: t.id,
                    })
                }
                Err(ApiError::Rejected {
                    status: 422,
                    messages,
                    ..
                }) if messages.mentions("taken") || messages.mentions("already exists") => {
                    Ok(Sent::Rejected {
                        status: Some(422),
                        message: format!(
                            "drift: {} was created by someone else since the plan; not touched ({messages})",
                            row.email
                        ),
                    })
                }
                Err(e) => Err(e),
            },
        }
    }
}
