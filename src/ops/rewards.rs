//! `rewards issue`, `rewards deliver` and `rewards revoke` as operations of
//! the engine.
//!
//! Issue creates a reward, by descriptor, for a user, by email: a record
//! with no natural key (a user may hold a reward twice), and the API takes
//! no idempotency key. So before the create, the user's rewards with that
//! descriptor are listed, and their ids made durable with the intent (the
//! row's `detail` in the checkpoint); in doubt (an answer lost after the
//! write, a kill -9 with the call in flight) they are listed again, and a
//! reward with that descriptor that was not there before is this row's.
//! Two rows of a file with the same email and descriptor would confuse
//! that comparison, so the second is rejected as a duplicate. A reward
//! with that descriptor that someone else gives the user in between is
//! taken for this row's: at worst one missing, never one twice.
//!
//! The same listing makes issuing safe to repeat: a user who already holds
//! the reward (earned or delivered) is `unchanged`, unless `--again`.
//!
//! Deliver and revoke only change a reward's status: the reward is read
//! first (by id, or found by email and descriptor), one already in that
//! status is `unchanged`, and in doubt it is read again.
//!
//! Costs, in API calls per row: issue, one rewards-list call (60 a minute)
//! and one create; plus a rewards-list call for each row in doubt. Deliver
//! and revoke, one read (a rewards-list call when found by email and
//! descriptor, a show by id otherwise) and one update; plus a read for
//! each row in doubt.

use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::api::{ApiError, Client, Op, RateClass};
use crate::engine::{Cost, Decision, Doubt, Effect, Intent, Operation, Parsed, Prepare, Sent};
use crate::exit::usage;
use crate::input::{Columns, CsvInput};

/// The user's rewards with this descriptor, every page.
async fn holdings(
    client: &Client,
    beta: &str,
    email: &str,
    descriptor: &str,
) -> Result<Vec<Value>, ApiError> {
    let mut pages = std::pin::pin!(client.pages::<Value>(
        Op::RewardsList,
        Some(beta.to_string()),
        format!("betas/{beta}/rewards.json"),
        vec![("email".into(), email.to_string())],
        1,
    ));
    let mut found = vec![];
    while let Some(page) = pages.next().await {
        found.extend(
            page?
                .items
                .into_iter()
                .filter(|r| r.get("descriptor").and_then(Value::as_str) == Some(descriptor)),
        );
    }
    Ok(found)
}

fn id_of(r: &Value) -> u64 {
    r.get("id").and_then(Value::as_u64).unwrap_or(0)
}

fn status_of(r: &Value) -> &str {
    r.get("status").and_then(Value::as_str).unwrap_or("")
}

/// The settings every rewards operation stores: the map, by content.
fn map_setting(map: Option<&std::path::Path>) -> Value {
    Value::String(match map {
        Some(p) => {
            let digest = std::fs::read(p)
                .map(|b| sha1_smol::Sha1::from(&b).digest().to_string())
                .unwrap_or_default();
            format!("{} (sha1 {})", p.display(), &digest[..digest.len().min(12)])
        }
        None => "none".into(),
    })
}

/// Refuses a file that lacks a column the operation needs.
fn require(
    columns: &Columns,
    input: &CsvInput,
    any_of: &[&[&str]],
    what: &str,
) -> anyhow::Result<()> {
    let ok = any_of
        .iter()
        .any(|set| set.iter().all(|c| columns.get(c).is_some()));
    if ok {
        return Ok(());
    }
    Err(usage(format!(
        "{}: needs {what} (its columns: {}); rename columns with --map",
        input.source.display(),
        input.headers.join(", ")
    )))
}

/// An email and a descriptor from a row, both required.
fn holder(columns: &Columns, cells: &csv::StringRecord) -> Result<(String, String), String> {
    let email = columns.cell(cells, "email").ok_or("email is empty")?;
    if !email.contains('@') {
        return Err(format!("email {email:?} is not an email address"));
    }
    let descriptor = columns
        .cell(cells, "descriptor")
        .ok_or("descriptor is empty")?;
    Ok((email.to_string(), descriptor.to_string()))
}

// ---- issue -----------------------------------------------------------------

const ISSUE: Intent = "issue";
const ISSUED: &str = "issued";
const UNCHANGED: &str = "unchanged";

/// The issue of rewards by descriptor.
pub struct RewardsIssue {
    pub client: Client,
    pub beta: String,
    pub map: Option<std::path::PathBuf>,
    /// Issue even to a user who already holds the reward.
    pub again: bool,
    columns: Columns,
    already_held: AtomicU64,
}

impl RewardsIssue {
    pub fn new(client: Client, beta: String) -> RewardsIssue {
        RewardsIssue {
            client,
            beta,
            map: None,
            again: false,
            columns: Columns::default(),
            already_held: AtomicU64::new(0),
        }
    }
}

#[derive(Debug)]
pub struct IssueRow {
    key: String,
    email: String,
    descriptor: String,
    /// The ids of the user's rewards with this descriptor before the
    /// create (`None`: not read yet).
    before: Option<Vec<u64>>,
}

impl Operation for RewardsIssue {
    fn done_note(&self, row: &IssueRow, action: &str) -> Option<String> {
        (action == UNCHANGED).then(|| {
            format!(
                "already holds a {:?} reward (earned or delivered); --again issues another",
                row.descriptor
            )
        })
    }

    type Row = IssueRow;

    fn kind(&self) -> &'static str {
        "rewards.issue"
    }

    fn actions(&self) -> &'static [&'static str] {
        &[ISSUED, UNCHANGED]
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        (name == ISSUE).then_some((ISSUE, ISSUED))
    }

    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        self.columns = Columns::new(&input.headers, self.map.as_deref())?;
        require(
            &self.columns,
            input,
            &[&["email", "descriptor"]],
            "email and descriptor columns",
        )
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<IssueRow>, String> {
        let (email, descriptor) = holder(&self.columns, cells)?;
        Ok(Parsed::Row(IssueRow {
            key: format!("{} {descriptor}", email.to_lowercase()),
            email,
            descriptor,
            before: None,
        }))
    }

    /// Email and descriptor: one issue of a reward to a user per file, as
    /// the before-and-after comparison needs.
    fn key<'r>(&self, row: &'r IssueRow) -> &'r str {
        &row.key
    }

    fn key_name(&self) -> &'static str {
        "reward"
    }

    async fn prepare(&mut self, _p: Prepare<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    fn cost(&self) -> Cost {
        Cost {
            class: Some(RateClass::RewardsList),
            calls_per_row: 1.0,
        }
    }

    fn place(&self, row: &mut IssueRow, _line: u64, stopped_detail: Option<String>) {
        row.before = stopped_detail.and_then(|d| serde_json::from_str(&d).ok());
    }

    fn detail(&self, row: &IssueRow, _intent: Intent) -> Option<String> {
        row.before
            .as_ref()
            .map(|ids| serde_json::to_string(ids).unwrap())
    }

    async fn find_effect(&self, row: &mut IssueRow, doubt: Doubt) -> Result<Effect, ApiError> {
        if !matches!(
            doubt,
            Doubt::InFlightAtStop(Some(ISSUE)) | Doubt::OutcomeUnknown(ISSUE)
        ) {
            return Ok(Effect::NotDone);
        }
        let now = holdings(&self.client, &self.beta, &row.email, &row.descriptor).await?;
        // Without the ids from before (a checkpoint that lost them), any
        // reward with this descriptor counts as this row's: never twice.
        let before = row.before.clone().unwrap_or_default();
        let new = now
            .iter()
            .map(id_of)
            .filter(|id| !before.contains(id))
            .max();
        Ok(match new {
            Some(id) => Effect::Done {
                action: ISSUED,
                target: id,
            },
            None => Effect::NotDone,
        })
    }

    async fn decide(&self, row: &mut IssueRow) -> Result<Decision, ApiError> {
        let held = holdings(&self.client, &self.beta, &row.email, &row.descriptor).await?;
        row.before = Some(held.iter().map(id_of).collect());
        if !self.again
            && let Some(r) = held.iter().find(|r| status_of(r) != "revoked")
        {
            self.already_held.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                email = %row.email,
                "unchanged: already holds {} (reward {}, {})",
                row.descriptor,
                id_of(r),
                status_of(r)
            );
            return Ok(Decision::Done {
                action: UNCHANGED,
                target: id_of(r),
            });
        }
        Ok(Decision::Send(ISSUE))
    }

    async fn send(&self, row: &mut IssueRow, _intent: Intent) -> Result<Sent, ApiError> {
        // The body's shape is not documented [U]: sent unwrapped, as points
        // and suppressions are (a Rails API wraps unwrapped JSON itself).
        let body = json!({"email": row.email, "descriptor": row.descriptor});
        let reply = self
            .client
            .call(
                Op::RewardCreate,
                Some(&self.beta),
                &format!("betas/{}/rewards.json", self.beta),
                &[],
                Some(&body),
            )
            .await;
        match reply {
            Ok(r) => Ok(Sent::Done {
                action: ISSUED,
                target: id_of(&r.json::<Value>(Op::RewardCreate)?),
            }),
            Err(ApiError::Rejected {
                status, messages, ..
            }) => Ok(Sent::Rejected {
                status: Some(status),
                message: format!("the API refused the reward: {messages}"),
            }),
            Err(e) => Err(e),
        }
    }

    fn settings(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("--map".into(), map_setting(self.map.as_deref()));
        m.insert("--again".into(), Value::Bool(self.again));
        m
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "unchanged_already_held".into(),
            Value::from(self.already_held.load(Ordering::Relaxed)),
        );
        m
    }
}

// ---- deliver and revoke ----------------------------------------------------

/// The status a deliver or a revoke sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Deliver,
    Revoke,
}

impl Change {
    fn intent(self) -> Intent {
        match self {
            Change::Deliver => "deliver",
            Change::Revoke => "revoke",
        }
    }

    /// The reward's status once done, and the row's action.
    fn status(self) -> &'static str {
        match self {
            Change::Deliver => "delivered",
            Change::Revoke => "revoked",
        }
    }
}

/// Which reward a row names.
#[derive(Debug, Clone)]
enum Target {
    Id(u64),
    Holder { email: String, descriptor: String },
}

#[derive(Debug)]
pub struct ChangeRow {
    key: String,
    target: Target,
    /// The reward the decision found.
    id: Option<u64>,
}

/// The deliver or revoke of rewards.
pub struct RewardsChange {
    pub client: Client,
    pub beta: String,
    pub map: Option<std::path::PathBuf>,
    pub change: Change,
    columns: Columns,
    /// Rows found in the status already.
    already: AtomicU64,
    /// Rows found by email and descriptor, which cost a rewards-list call.
    by_holder: AtomicU64,
}

impl RewardsChange {
    pub fn new(client: Client, beta: String, change: Change) -> RewardsChange {
        RewardsChange {
            client,
            beta,
            map: None,
            change,
            columns: Columns::default(),
            already: AtomicU64::new(0),
            by_holder: AtomicU64::new(0),
        }
    }

    /// The reward the row names, or why there is none to act on.
    async fn resolve(&self, target: &Target) -> Result<Result<Value, String>, ApiError> {
        match target {
            Target::Id(id) => {
                let r = self
                    .client
                    .call(
                        Op::RewardShow,
                        Some(&self.beta),
                        &format!("betas/{}/rewards/{id}.json", self.beta),
                        &[],
                        None,
                    )
                    .await;
                match r {
                    Ok(r) => Ok(Ok(r.json(Op::RewardShow)?)),
                    Err(ApiError::NotFound { .. }) => {
                        Ok(Err(format!("no reward with id {id} in the project")))
                    }
                    Err(e) => Err(e),
                }
            }
            Target::Holder { email, descriptor } => {
                self.by_holder.fetch_add(1, Ordering::Relaxed);
                let found = holdings(&self.client, &self.beta, email, descriptor).await?;
                Ok(match found.as_slice() {
                    [] => Err(format!("{email} holds no reward {descriptor:?}")),
                    [one] => Ok(one.clone()),
                    many => Err(format!(
                        "{email} holds {} rewards {descriptor:?} (ids {}): say which with a reward_id column",
                        many.len(),
                        many.iter()
                            .map(|r| id_of(r).to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                })
            }
        }
    }
}

impl Operation for RewardsChange {
    fn done_note(&self, _row: &ChangeRow, action: &str) -> Option<String> {
        (action == UNCHANGED).then(|| format!("the reward was {} already", self.change.status()))
    }

    type Row = ChangeRow;

    fn kind(&self) -> &'static str {
        match self.change {
            Change::Deliver => "rewards.deliver",
            Change::Revoke => "rewards.revoke",
        }
    }

    fn actions(&self) -> &'static [&'static str] {
        match self.change {
            Change::Deliver => &["delivered", UNCHANGED],
            Change::Revoke => &["revoked", UNCHANGED],
        }
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        let i = self.change.intent();
        (name == i).then_some((i, self.change.status()))
    }

    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        self.columns = Columns::new(&input.headers, self.map.as_deref())?;
        require(
            &self.columns,
            input,
            &[&["reward_id"], &["email", "descriptor"]],
            "a reward_id column, or email and descriptor columns",
        )
    }

    /// A reward_id when the row has one; else email and descriptor.
    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<ChangeRow>, String> {
        let (key, target) = match self.columns.cell(cells, "reward_id") {
            Some(id) => {
                let id: u64 = id
                    .parse()
                    .map_err(|_| format!("reward_id {id:?} is not a whole number"))?;
                (format!("reward {id}"), Target::Id(id))
            }
            None => {
                let (email, descriptor) =
                    holder(&self.columns, cells).map_err(|e| format!("no reward_id, and {e}"))?;
                (
                    format!("{} {descriptor}", email.to_lowercase()),
                    Target::Holder { email, descriptor },
                )
            }
        };
        Ok(Parsed::Row(ChangeRow {
            key,
            target,
            id: None,
        }))
    }

    fn key<'r>(&self, row: &'r ChangeRow) -> &'r str {
        &row.key
    }

    fn key_name(&self) -> &'static str {
        "reward"
    }

    async fn prepare(&mut self, _p: Prepare<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    /// A read and an update a row. Rows found by email and descriptor read
    /// through the rewards list (60 a minute), which then bounds the run.
    fn cost(&self) -> Cost {
        let by_holder = self.columns.get("reward_id").is_none();
        Cost {
            class: by_holder.then_some(RateClass::RewardsList),
            calls_per_row: if by_holder { 1.0 } else { 2.0 },
        }
    }

    async fn find_effect(&self, row: &mut ChangeRow, doubt: Doubt) -> Result<Effect, ApiError> {
        let mine = self.change.intent();
        let asked = match doubt {
            Doubt::InFlightAtStop(i) => i,
            Doubt::OutcomeUnknown(i) => Some(i),
        };
        // Not decided yet when the run stopped: deciding tells.
        if asked != Some(mine) {
            return Ok(Effect::NotDone);
        }
        Ok(match self.resolve(&row.target).await? {
            Ok(r) if status_of(&r) == self.change.status() => Effect::Done {
                action: self.change.status(),
                target: id_of(&r),
            },
            _ => Effect::NotDone,
        })
    }

    async fn decide(&self, row: &mut ChangeRow) -> Result<Decision, ApiError> {
        let r = match self.resolve(&row.target).await? {
            Ok(r) => r,
            Err(message) => return Ok(Decision::Reject { message }),
        };
        let (id, status) = (id_of(&r), status_of(&r));
        if status == self.change.status() {
            self.already.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(reward = id, "unchanged: already {status}");
            return Ok(Decision::Done {
                action: UNCHANGED,
                target: id,
            });
        }
        if self.change == Change::Deliver && status == "revoked" {
            return Ok(Decision::Reject {
                message: format!("reward {id} was revoked; a revoked reward is not delivered"),
            });
        }
        row.id = Some(id);
        Ok(Decision::Send(self.change.intent()))
    }

    async fn send(&self, row: &mut ChangeRow, _intent: Intent) -> Result<Sent, ApiError> {
        let id = row.id.expect("decided on a reward");
        // The body's shape is not documented [U]: a status, unwrapped (see
        // the issue's create).
        let body = json!({"status": self.change.status()});
        let reply = self
            .client
            .call(
                Op::RewardUpdate,
                Some(&self.beta),
                &format!("betas/{}/rewards/{id}.json", self.beta),
                &[],
                Some(&body),
            )
            .await;
        match reply {
            Ok(_) => Ok(Sent::Done {
                action: self.change.status(),
                target: id,
            }),
            Err(ApiError::Rejected {
                status, messages, ..
            }) => Ok(Sent::Rejected {
                status: Some(status),
                message: format!("the API refused the change of reward {id}: {messages}"),
            }),
            Err(ApiError::NotFound { .. }) => Ok(Sent::Rejected {
                status: Some(404),
                message: format!("reward {id} is gone from the project"),
            }),
            Err(e) => Err(e),
        }
    }

    fn settings(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("--map".into(), map_setting(self.map.as_deref()));
        m
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            format!("unchanged_already_{}", self.change.status()),
            Value::from(self.already.load(Ordering::Relaxed)),
        );
        m.insert(
            "found_by_email_and_descriptor".into(),
            Value::from(self.by_holder.load(Ordering::Relaxed)),
        );
        m
    }
}
