//! `testers checkin` as an operation of the engine: each row checks a user
//! in, by `email` (through the check-ins endpoint) or by `id`.
//!
//! A check-in is not idempotent: the reference says it is meant for every
//! login, to track visits and retention, so a second one counts a second
//! visit. The API has no idempotency key. Exactly once therefore rests on a
//! baseline: before the intent is made durable, the user is read and what
//! a check-in changes on the record is kept as the row's `detail`, in the
//! same commit as the intent. When the outcome is unknown, or the row was
//! in flight at a kill, the user is read again: changed since the baseline
//! means the check-in took effect; unchanged means it did not and it is
//! sent again.
//!
//! What a check-in changes on the user is not documented [U]. The baseline
//! takes, in order of preference, a check-in count, else the last check-in
//! time, else status, `joined_at` and `updated_at` together (whichever the
//! record has). With only the last of these, a check-in of a user already
//! active that leaves the record untouched cannot be seen, and such a row
//! in doubt is sent again (at least once, for that row). The reference also
//! answers a check-in `202 Accepted`, which may mean it is applied later;
//! a check-in not yet visible when it is read back would be sent twice.
//! The sandbox counts each check-in on the user (`checkins_count`) and
//! applies it before answering.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::tester_ref::{self, TesterRef};
use crate::api::{ApiError, Client, Op, RateClass};
use crate::checkpoint::Checkpoint;
use crate::engine::{Cost, Decision, Doubt, Effect, Intent, Operation, Parsed, Prepare, Sent};
use crate::input::{Columns, CsvInput};

/// Fields that count check-ins, then fields that time the last one, as a
/// record might name them [U]; the sandbox uses the first of each.
const COUNT_FIELDS: [&str; 3] = ["checkins_count", "checkin_count", "check_ins_count"];
const TIME_FIELDS: [&str; 3] = ["last_checkin_at", "checked_in_at", "last_checked_in_at"];
/// What changes when a user who is not yet active checks in.
const FALLBACK_FIELDS: [&str; 3] = ["status", "joined_at", "updated_at"];

/// What a check-in changes on `user`, as far as the record shows it.
fn baseline(user: &Value) -> Value {
    let pick = |fields: &[&str]| -> Option<Value> {
        let m: serde_json::Map<String, Value> = fields
            .iter()
            .filter_map(|f| user.get(*f).map(|v| ((*f).to_string(), v.clone())))
            .collect();
        (!m.is_empty()).then_some(Value::Object(m))
    };
    pick(&COUNT_FIELDS[..])
        .or_else(|| pick(&TIME_FIELDS[..]))
        .or_else(|| pick(&FALLBACK_FIELDS[..]))
        .unwrap_or(Value::Null)
}

/// Whether `now` shows a check-in since `before` was taken: a field of the
/// baseline that changed.
fn checked_in_since(before: &Value, now: &Value) -> bool {
    before
        .as_object()
        .is_some_and(|b| b.iter().any(|(k, v)| now.get(k) != Some(v)))
}

/// How email rows find their users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolve {
    /// The project listed once into the checkpoint.
    List,
    /// A testers-list call a row.
    Lookup,
}

/// The check-in of users.
pub struct TestersCheckin {
    pub client: Client,
    pub beta: String,
    pub map: Option<PathBuf>,
    cols: Option<Columns>,
    /// Rows that name their user by email (the others go by id).
    email_rows: u64,
    resolve: Resolve,
}

impl TestersCheckin {
    pub fn new(client: Client, beta: String) -> TestersCheckin {
        TestersCheckin {
            client,
            beta,
            map: None,
            cols: None,
            email_rows: 0,
            resolve: Resolve::Lookup,
        }
    }
}

/// One row, and what was read of its user.
#[derive(Debug)]
pub struct CheckinRow {
    who: TesterRef,
    key: String,
    /// The user's id, once read.
    id: Option<u64>,
    /// The user as the project listing showed it, or as just read back
    /// (`Some(None)`: not there), for the next decision.
    learnt: Option<Option<Value>>,
    /// What the check-in will change, read before its intent was durable.
    baseline: Option<Value>,
}

impl CheckinRow {
    /// The user by id once known (a show: no documented limit), else as
    /// the row names them.
    fn lookup_ref(&self) -> TesterRef {
        match self.id {
            Some(id) => TesterRef::Id(id),
            None => self.who.clone(),
        }
    }
}

impl Operation for TestersCheckin {
    type Row = CheckinRow;

    fn kind(&self) -> &'static str {
        "testers.checkin"
    }

    fn actions(&self) -> &'static [&'static str] {
        &["checked_in"]
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        (name == "checkin").then_some(("checkin", "checked_in"))
    }

    /// Counts the rows that name their user by email: they decide whether
    /// listing the project is cheaper than a lookup each.
    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        let cols = tester_ref::columns(&input.headers, self.map.as_deref())?;
        while let Some(rec) = input.next_record()? {
            if let Ok(r) = rec
                && cols.cell(&r.fields, "id").is_none()
                && cols.cell(&r.fields, "email").is_some()
            {
                self.email_rows += 1;
            }
        }
        self.cols = Some(cols);
        Ok(())
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<CheckinRow>, String> {
        let who = tester_ref::parse(self.cols.as_ref().expect("started"), cells)?;
        Ok(Parsed::Row(CheckinRow {
            key: who.key(),
            id: match who {
                TesterRef::Id(id) => Some(id),
                TesterRef::Email(_) => None,
            },
            who,
            learnt: None,
            baseline: None,
        }))
    }

    fn key<'r>(&self, row: &'r CheckinRow) -> &'r str {
        &row.key
    }

    fn key_name(&self) -> &'static str {
        "email_or_id"
    }

    // Not repeatable: a file sent again would count every visit twice.

    async fn prepare(&mut self, p: Prepare<'_>) -> anyhow::Result<()> {
        let emails = self.email_rows.min(p.open);
        if emails > 0 && tester_ref::listing_pages(&self.client, &self.beta).await? < emails {
            self.resolve = Resolve::List;
            tracing::info!("listing the project to find the {emails} users named by email");
            tester_ref::list_into_known(
                &self.client,
                p.checkpoint,
                p.run,
                &self.beta,
                None,
                p.stop,
                p.progress,
            )
            .await?;
        }
        Ok(())
    }

    fn cost(&self) -> Cost {
        match self.resolve {
            // An email row reads its user from the list (60 a minute).
            Resolve::Lookup if self.email_rows > 0 => Cost {
                class: Some(RateClass::TestersList),
                calls_per_row: 2.0,
            },
            _ => Cost {
                class: None,
                calls_per_row: 2.0,
            },
        }
    }

    /// With the project listed, an email row's baseline is its listing.
    fn plan(
        &self,
        ck: &Checkpoint,
        run: i64,
        row: &mut CheckinRow,
    ) -> anyhow::Result<Option<Intent>> {
        if self.resolve == Resolve::List && matches!(row.who, TesterRef::Email(_)) {
            row.learnt = Some(
                ck.known(run, &row.key)?
                    .and_then(|s| serde_json::from_str(&s).ok()),
            );
        }
        Ok(None)
    }

    fn detail(&self, row: &CheckinRow, _intent: Intent) -> Option<String> {
        Some(json!({"id": row.id, "baseline": row.baseline}).to_string())
    }

    fn place(&self, row: &mut CheckinRow, _line: u64, stopped_detail: Option<String>) {
        if let Some(d) = stopped_detail.and_then(|d| serde_json::from_str::<Value>(&d).ok()) {
            row.id = d.get("id").and_then(Value::as_u64).or(row.id);
            row.baseline = d.get("baseline").cloned().filter(|b| !b.is_null());
        }
    }

    async fn find_effect(&self, row: &mut CheckinRow, doubt: Doubt) -> Result<Effect, ApiError> {
        // Nothing was sent for a row stopped before its intent was durable;
        // and without a baseline nothing can be compared.
        let Some(before) = row.baseline.clone() else {
            return Ok(Effect::NotDone);
        };
        if matches!(doubt, Doubt::InFlightAtStop(None)) {
            return Ok(Effect::NotDone);
        }
        let now = tester_ref::find(&self.client, &self.beta, &row.lookup_ref()).await?;
        let effect = match &now {
            Some(u) if checked_in_since(&before, u) => Effect::Done {
                action: "checked_in",
                target: tester_ref::id_of(u),
            },
            _ => Effect::NotDone,
        };
        // Read just now: the next decision need not read it again.
        row.learnt = Some(now);
        Ok(effect)
    }

    async fn decide(&self, row: &mut CheckinRow) -> Result<Decision, ApiError> {
        let user = match row.learnt.take() {
            Some(known) => known,
            None => tester_ref::find(&self.client, &self.beta, &row.lookup_ref()).await?,
        };
        Ok(match user {
            None => Decision::Reject {
                message: format!(
                    "no user with the {} {} in the project",
                    match row.who {
                        TesterRef::Id(_) => "id",
                        TesterRef::Email(_) => "email",
                    },
                    row.key
                ),
            },
            Some(u) => {
                row.id = Some(tester_ref::id_of(&u));
                row.baseline = Some(baseline(&u));
                Decision::Send("checkin")
            }
        })
    }

    async fn send(&self, row: &mut CheckinRow, _intent: Intent) -> Result<Sent, ApiError> {
        let beta = &self.beta;
        let id = row.id.unwrap_or(0);
        let r = match &row.who {
            TesterRef::Email(e) => {
                self.client
                    .call(
                        Op::CheckinCreate,
                        Some(beta),
                        &format!("betas/{beta}/checkins.json"),
                        &[],
                        Some(&json!({"checkin": {"email": e}})),
                    )
                    .await
            }
            TesterRef::Id(id) => {
                self.client
                    .call(
                        Op::TesterCheckin,
                        Some(beta),
                        &format!("betas/{beta}/testers/{id}/checkin.json"),
                        &[],
                        None,
                    )
                    .await
            }
        };
        match r {
            Ok(_) => Ok(Sent::Done {
                action: "checked_in",
                target: id,
            }),
            Err(ApiError::NotFound { .. }) => Ok(Sent::Rejected {
                status: Some(404),
                message: format!(
                    "no user {} in the project (deleted since it was read?)",
                    row.key
                ),
            }),
            Err(e) => Err(e),
        }
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "resolve".into(),
            Value::String(
                match self.resolve {
                    Resolve::List => "list",
                    Resolve::Lookup => "lookup",
                }
                .into(),
            ),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_wins_over_times_and_a_change_is_seen() {
        let u = json!({"id": 1, "status": "active", "checkins_count": 2, "last_checkin_at": "t1"});
        let b = baseline(&u);
        assert_eq!(b, json!({"checkins_count": 2}));
        assert!(!checked_in_since(&b, &u));
        assert!(checked_in_since(&b, &json!({"checkins_count": 3})));
        // A record with none of the check-in fields falls back.
        let plain = json!({"status": "imported", "joined_at": null, "updated_at": "t0"});
        let b = baseline(&plain);
        assert!(checked_in_since(
            &b,
            &json!({"status": "active", "joined_at": "t1", "updated_at": "t1"})
        ));
        assert!(!checked_in_since(&Value::Null, &plain));
    }
}
