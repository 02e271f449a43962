//! `suppressions add` and `suppressions remove` as operations of the
//! engine.
//!
//! Add: a row is an `email` and a `reason` (`Manual`, the default, or
//! `Unsubscribe`, which also unsubscribes the user with that email). The
//! email is the suppression's natural key: the API refuses a second one
//! with error 2702, which is `unchanged`. After an unknown outcome, or for a
//! row in flight at a kill, the suppressions of that email are listed: one
//! there is the add that took effect.
//!
//! Remove: a row is a `suppression_id`, or an `email` whose suppression is
//! listed first. A delete changes state only: one whose outcome is unknown
//! is sent again, and that second delete is the probe (404: the first took
//! effect), as for `testers delete`.

use std::collections::HashSet;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::tester_ref;
use crate::api::{ApiError, Client, Op};
use crate::checkpoint::Checkpoint;
use crate::engine::{Cost, Decision, Doubt, Effect, Intent, Operation, Parsed, Prepare, Sent};
use crate::exit::usage;
use crate::import::mapping::{email_key, email_problem};
use crate::input::{Columns, CsvInput};

/// The error code of a suppression create whose email is suppressed
/// already ("Email already exists.").
const ALREADY_SUPPRESSED: i64 = 2702;

/// The suppressions of one email (the list's `email` filter, exact).
async fn suppressions_of(client: &Client, beta: &str, email: &str) -> Result<Vec<Value>, ApiError> {
    let r = client
        .call(
            Op::SuppressionsList,
            Some(beta),
            &format!("betas/{beta}/suppressions.json"),
            &[("email".to_string(), email.to_string())],
            None,
        )
        .await?;
    let list: Vec<Value> = r.json(Op::SuppressionsList)?;
    // Compared here too: a server may match either way.
    Ok(list
        .into_iter()
        .filter(|s| {
            s.get("email")
                .and_then(Value::as_str)
                .is_some_and(|e| e.eq_ignore_ascii_case(email))
        })
        .collect())
}

fn id_of(v: &Value) -> u64 {
    v.get("id").and_then(Value::as_u64).unwrap_or(0)
}

fn email_cell(cols: &Columns, cells: &csv::StringRecord) -> Result<String, String> {
    let e = cols.cell(cells, "email").ok_or("the email is empty")?;
    match email_problem(e) {
        Some(problem) => Err(format!("email {e:?} is not valid: {problem}")),
        None => Ok(e.to_string()),
    }
}

/// Whether the suppression of `email` that a call in doubt was to create is
/// there: one suppressed before the run began (`run_started`; its times
/// count whole seconds) was there already, and is not the row's doing.
pub(crate) async fn suppression_effect(
    client: &Client,
    beta: &str,
    email: &str,
    run_started: Option<std::time::SystemTime>,
) -> Result<Effect, ApiError> {
    Ok(match suppressions_of(client, beta, email).await?.first() {
        Some(s)
            if s.get("suppressed_at")
                .and_then(Value::as_str)
                .and_then(crate::time::parse_iso8601)
                .zip(run_started)
                .is_some_and(|(at, started)| at < started) =>
        {
            Effect::Done {
                action: "unchanged",
                target: id_of(s),
            }
        }
        Some(s) => Effect::Done {
            action: added_action(s),
            target: id_of(s),
        },
        None => Effect::NotDone,
    })
}

/// Creates the suppression of `email`; one there already (error 2702) is
/// `unchanged`, with its id.
pub(crate) async fn create_suppression(
    client: &Client,
    beta: &str,
    email: &str,
    reason: Reason,
) -> Result<Sent, ApiError> {
    // Unwrapped, as the reference documents this create.
    let body = json!({"email": email, "reason": reason.as_str()});
    match client
        .call(
            Op::SuppressionCreate,
            Some(beta),
            &format!("betas/{beta}/suppressions.json"),
            &[],
            Some(&body),
        )
        .await
    {
        Ok(r) => {
            let s: Value = r.json(Op::SuppressionCreate)?;
            Ok(Sent::Done {
                action: added_action(&s),
                target: id_of(&s),
            })
        }
        Err(ApiError::Rejected { messages, .. })
            if messages
                .0
                .iter()
                .any(|m| m.code == Some(ALREADY_SUPPRESSED))
                || messages.mentions("already exists") =>
        {
            // Already suppressed: the existing suppression's id, for the
            // results.
            let existing = suppressions_of(client, beta, email).await?;
            Ok(Sent::Done {
                action: "unchanged",
                target: existing.first().map_or(0, id_of),
            })
        }
        Err(e) => Err(e),
    }
}

/// `reason` as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Manual,
    Unsubscribe,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Manual => "Manual",
            Reason::Unsubscribe => "Unsubscribe",
        }
    }
}

/// The action a suppression that exists shows for its row: `unsubscribed`
/// when it unsubscribed a user (its reason, and a user behind it).
fn added_action(s: &Value) -> &'static str {
    let unsubscribes = s.get("reason").and_then(Value::as_str) == Some("Unsubscribe");
    // `user_id` is presumably null when nobody has the email [U].
    let has_user = s.get("user_id").is_some_and(|u| !u.is_null());
    if unsubscribes && has_user {
        "unsubscribed"
    } else {
        "added"
    }
}

/// The adding of suppressions.
pub struct SuppressionsAdd {
    pub client: Client,
    pub beta: String,
    pub map: Option<PathBuf>,
    cols: Option<Columns>,
    /// The emails of `Unsubscribe` rows, read at the start.
    unsubscribing: HashSet<String>,
    /// Of those, the ones with a user in the project (a dry run finds them).
    users: HashSet<String>,
    /// When the run (its first try) started: a suppression found in doubt
    /// that is older was there before the run, and is not this row's.
    run_started: Option<std::time::SystemTime>,
}

impl SuppressionsAdd {
    pub fn new(client: Client, beta: String) -> SuppressionsAdd {
        SuppressionsAdd {
            client,
            beta,
            map: None,
            cols: None,
            unsubscribing: HashSet::new(),
            users: HashSet::new(),
            run_started: None,
        }
    }

    fn cols(&self) -> &Columns {
        self.cols.as_ref().expect("started")
    }
}

#[derive(Debug)]
pub struct AddRow {
    email: String,
    key: String,
    reason: Reason,
}

fn parse_reason(cols: &Columns, cells: &csv::StringRecord) -> Result<Reason, String> {
    match cols.cell(cells, "reason") {
        None => Ok(Reason::Manual),
        Some(r) if r.eq_ignore_ascii_case("manual") => Ok(Reason::Manual),
        Some(r) if r.eq_ignore_ascii_case("unsubscribe") => Ok(Reason::Unsubscribe),
        Some(r) => Err(format!(
            "reason {r:?} cannot be set: Manual or Unsubscribe (HardBounce and SpamComplaint are Prefinery's own)"
        )),
    }
}

impl Operation for SuppressionsAdd {
    fn done_note(&self, _row: &AddRow, action: &str) -> Option<String> {
        (action == "unchanged").then(|| "the email was suppressed already (error 2702)".to_string())
    }

    type Row = AddRow;

    fn kind(&self) -> &'static str {
        "suppressions.add"
    }

    fn actions(&self) -> &'static [&'static str] {
        &["added", "unsubscribed", "unchanged"]
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        match name {
            "suppress" => Some(("suppress", "added")),
            "unsubscribe" => Some(("unsubscribe", "unsubscribed")),
            _ => None,
        }
    }

    /// Needs an email column; notes the `Unsubscribe` rows' emails, for a
    /// dry run to count the users they would unsubscribe.
    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        let cols = Columns::new(&input.headers, self.map.as_deref())?;
        if cols.get("email").is_none() {
            return Err(usage(format!(
                "the file has no email column (its columns: {}); rename one with --map",
                input.headers.join(", ")
            )));
        }
        if cols.get("reason").is_some() {
            while let Some(rec) = input.next_record()? {
                if let Ok(r) = rec
                    && parse_reason(&cols, &r.fields) == Ok(Reason::Unsubscribe)
                    && let Ok(e) = email_cell(&cols, &r.fields)
                {
                    self.unsubscribing.insert(email_key(&e));
                }
            }
        }
        self.cols = Some(cols);
        Ok(())
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<AddRow>, String> {
        let email = email_cell(self.cols(), cells)?;
        let reason = parse_reason(self.cols(), cells)?;
        Ok(Parsed::Row(AddRow {
            key: email_key(&email),
            email,
            reason,
        }))
    }

    fn key<'r>(&self, row: &'r AddRow) -> &'r str {
        &row.key
    }

    fn key_name(&self) -> &'static str {
        "email"
    }

    /// A dry run finds which `Unsubscribe` rows have a user: those are the
    /// real people the run would unsubscribe. A real run learns it from
    /// each answer (its `user_id`) and spends no call on it.
    async fn prepare(&mut self, p: Prepare<'_>) -> anyhow::Result<()> {
        self.run_started = p.checkpoint.run(p.run)?.map(|r| {
            std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(r.started_at).unwrap_or(0))
        });
        if !p.dry_run || self.unsubscribing.is_empty() {
            return Ok(());
        }
        let n = self.unsubscribing.len() as u64;
        if tester_ref::listing_pages(&self.client, &self.beta).await? < n {
            tester_ref::list_into_known(
                &self.client,
                p.checkpoint,
                p.run,
                &self.beta,
                Some(&self.unsubscribing),
                p.stop,
                p.progress,
            )
            .await?;
            for e in &self.unsubscribing {
                if p.checkpoint.known(p.run, e)?.is_some() {
                    self.users.insert(e.clone());
                }
            }
        } else {
            for e in &self.unsubscribing {
                if self.client.find_tester(&self.beta, e).await?.is_some() {
                    self.users.insert(e.clone());
                }
            }
        }
        tracing::warn!(
            "{} rows ask for Unsubscribe; {} of them name a user of project {}, who would be unsubscribed",
            n,
            self.users.len(),
            self.beta
        );
        Ok(())
    }

    fn cost(&self) -> Cost {
        Cost {
            class: None,
            calls_per_row: 1.0,
        }
    }

    /// Known without a call: the intent is durable at dispatch.
    fn plan(&self, _: &Checkpoint, _: i64, row: &mut AddRow) -> anyhow::Result<Option<Intent>> {
        Ok(Some(self.intent_for(row)))
    }

    async fn find_effect(&self, row: &mut AddRow, doubt: Doubt) -> Result<Effect, ApiError> {
        if matches!(doubt, Doubt::InFlightAtStop(None)) {
            return Ok(Effect::NotDone);
        }
        suppression_effect(&self.client, &self.beta, &row.email, self.run_started).await
    }

    async fn decide(&self, row: &mut AddRow) -> Result<Decision, ApiError> {
        Ok(Decision::Send(self.intent_for(row)))
    }

    async fn send(&self, row: &mut AddRow, _intent: Intent) -> Result<Sent, ApiError> {
        create_suppression(&self.client, &self.beta, &row.email, row.reason).await
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "unchanged_means".into(),
            "already suppressed (error 2702)".into(),
        );
        m
    }
}

impl SuppressionsAdd {
    /// `unsubscribe` for a row a dry run found a user for; a real run
    /// learns it from the answer.
    fn intent_for(&self, row: &AddRow) -> Intent {
        if row.reason == Reason::Unsubscribe && self.users.contains(&row.key) {
            "unsubscribe"
        } else {
            "suppress"
        }
    }
}

/// The removal of suppressions.
pub struct SuppressionsRemove {
    pub client: Client,
    pub beta: String,
    pub map: Option<PathBuf>,
    cols: Option<Columns>,
}

impl SuppressionsRemove {
    pub fn new(client: Client, beta: String) -> SuppressionsRemove {
        SuppressionsRemove {
            client,
            beta,
            map: None,
            cols: None,
        }
    }
}

#[derive(Debug)]
pub struct RemoveRow {
    /// The suppression's id, from the row or found by its email.
    id: Option<u64>,
    email: Option<String>,
    key: String,
    /// A delete of this row may have gone through already.
    in_doubt: bool,
}

impl Operation for SuppressionsRemove {
    fn done_note(&self, _row: &RemoveRow, action: &str) -> Option<String> {
        (action == "unchanged").then(|| "no such suppression: removed already".to_string())
    }

    type Row = RemoveRow;

    fn kind(&self) -> &'static str {
        "suppressions.remove"
    }

    fn actions(&self) -> &'static [&'static str] {
        &["removed", "unchanged"]
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        (name == "remove").then_some(("remove", "removed"))
    }

    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        let cols = Columns::new(&input.headers, self.map.as_deref())?;
        if cols.get("suppression_id").is_none() && cols.get("email").is_none() {
            return Err(usage(format!(
                "the file has neither a suppression_id nor an email column (its columns: {}); rename one with --map",
                input.headers.join(", ")
            )));
        }
        self.cols = Some(cols);
        Ok(())
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<RemoveRow>, String> {
        let cols = self.cols.as_ref().expect("started");
        if let Some(id) = cols.cell(cells, "suppression_id") {
            let id = id
                .parse::<u64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| format!("suppression_id {id:?} is not a positive number"))?;
            return Ok(Parsed::Row(RemoveRow {
                id: Some(id),
                email: None,
                key: id.to_string(),
                in_doubt: false,
            }));
        }
        let email = email_cell(cols, cells)
            .map_err(|e| format!("{e} (and the row has no suppression_id)"))?;
        Ok(Parsed::Row(RemoveRow {
            id: None,
            key: email_key(&email),
            email: Some(email),
            in_doubt: false,
        }))
    }

    fn key<'r>(&self, row: &'r RemoveRow) -> &'r str {
        &row.key
    }

    fn key_name(&self) -> &'static str {
        "email_or_suppression_id"
    }

    async fn prepare(&mut self, _p: Prepare<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    fn cost(&self) -> Cost {
        Cost {
            class: None,
            calls_per_row: 1.0,
        }
    }

    /// A row with its id is to remove without a call.
    fn plan(&self, _: &Checkpoint, _: i64, row: &mut RemoveRow) -> anyhow::Result<Option<Intent>> {
        Ok(row.id.map(|_| "remove"))
    }

    async fn find_effect(&self, row: &mut RemoveRow, doubt: Doubt) -> Result<Effect, ApiError> {
        // The delete sent again is the probe (see the module).
        if !matches!(doubt, Doubt::InFlightAtStop(None)) {
            row.in_doubt = true;
        }
        Ok(Effect::NotDone)
    }

    async fn decide(&self, row: &mut RemoveRow) -> Result<Decision, ApiError> {
        if row.id.is_some() {
            return Ok(Decision::Send("remove"));
        }
        let email = row.email.as_deref().expect("a row has an id or an email");
        let found = suppressions_of(&self.client, &self.beta, email).await?;
        Ok(match found.first() {
            Some(s) => {
                row.id = Some(id_of(s));
                Decision::Send("remove")
            }
            // Nothing suppresses this email: already removed, unless a
            // delete of this row was in doubt (then it was this run's).
            None => Decision::Done {
                action: if row.in_doubt { "removed" } else { "unchanged" },
                target: 0,
            },
        })
    }

    async fn send(&self, row: &mut RemoveRow, _intent: Intent) -> Result<Sent, ApiError> {
        let id = row.id.expect("a remove is decided for a known suppression");
        let beta = &self.beta;
        match self
            .client
            .call(
                Op::SuppressionDelete,
                Some(beta),
                &format!("betas/{beta}/suppressions/{id}.json"),
                &[],
                None,
            )
            .await
        {
            Ok(_) => Ok(Sent::Done {
                action: "removed",
                target: id,
            }),
            Err(ApiError::NotFound { .. }) => Ok(Sent::Done {
                action: if row.in_doubt { "removed" } else { "unchanged" },
                target: id,
            }),
            Err(e) => Err(e),
        }
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "unchanged_means".into(),
            "no such suppression (already removed)".into(),
        );
        m
    }
}
