//! `points add` as an operation of the engine: a CSV row (email, quantity,
//! reason) into a point given to that user.
//!
//! A point has no natural key and the API takes no idempotency key, so a
//! create whose outcome is unknown (an answer lost after the write, a kill
//! -9 with the call in flight) cannot be told from one never made by
//! looking at the user alone: two bonuses of 10 are both legitimate. So
//! each point's reason carries a marker, `[ps:TOKEN:LINE]`: the run's token
//! (stable across its resumes, new for each `--fresh` run) and the row's
//! line. In doubt, the user's points are listed (points-list quota, 60 a
//! minute) and the marker found or not: the point is then added exactly
//! once. With `--no-marker` the reason is sent as it is and a row in
//! doubt is sent again: at least once, and a point may be given twice.
//!
//! Costs, in API calls per row: one create; plus, for each row in doubt,
//! one points-list call per page of that user's points (usually one).

use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::api::{ApiError, Client, Op};
use crate::engine::{Cost, Decision, Doubt, Effect, Intent, Operation, Parsed, Prepare, Sent};
use crate::exit::usage;
use crate::input::{Columns, CsvInput};

/// The action of a row whose point was given.
const ADDED: &str = "added";

/// Points are added by a create: the intent is known without a call.
const ADD: Intent = "add";

/// The add of points.
pub struct PointsAdd {
    pub client: Client,
    pub beta: String,
    /// The `--map` file (column renames).
    pub map: Option<std::path::PathBuf>,
    /// Mark each point's reason so a point in doubt is found (exactly once).
    pub marker: bool,
    columns: Columns,
    /// This run's token in the markers, known once prepared.
    token: String,
}

impl PointsAdd {
    pub fn new(client: Client, beta: String) -> PointsAdd {
        PointsAdd {
            client,
            beta,
            map: None,
            marker: true,
            columns: Columns::default(),
            token: String::new(),
        }
    }

    /// The marker of the row at `line` in this run.
    fn marker_of(&self, line: u64) -> String {
        format!("[ps:{}:{line}]", self.token)
    }

    /// The first of the user's points whose reason holds `marker`.
    async fn find_marked(&self, email: &str, marker: &str) -> Result<Option<u64>, ApiError> {
        let mut pages = std::pin::pin!(self.client.pages::<Value>(
            Op::PointsList,
            Some(self.beta.clone()),
            format!("betas/{}/points.json", self.beta),
            vec![("email".into(), email.to_string())],
            1,
        ));
        while let Some(page) = pages.next().await {
            for p in page?.items {
                let reason = p.get("reason").and_then(Value::as_str).unwrap_or("");
                if reason.contains(marker) {
                    return Ok(p.get("id").and_then(Value::as_u64));
                }
            }
        }
        Ok(None)
    }
}

/// One row: a point to give.
#[derive(Debug)]
pub struct PointRow {
    /// The row's key: email, quantity and reason (see [`PointsAdd::key`]).
    key: String,
    email: String,
    quantity: i64,
    reason: Option<String>,
    /// The row's line, for its marker.
    line: u64,
}

/// The token of a run: a short hash of what identifies it in its
/// checkpoint, so a resume finds the markers its earlier part wrote and a
/// `--fresh` run (a new run) does not take them for its own.
pub fn run_token(run: i64, started_at: i64, input_hash: &str) -> String {
    let digest = sha1_smol::Sha1::from(format!("{run}:{started_at}:{input_hash}"))
        .digest()
        .to_string();
    digest[..8].to_string()
}

impl Operation for PointsAdd {
    type Row = PointRow;

    fn kind(&self) -> &'static str {
        "points.add"
    }

    fn actions(&self) -> &'static [&'static str] {
        &[ADDED]
    }

    fn intent(&self, name: &str) -> Option<(Intent, &'static str)> {
        (name == ADD).then_some((ADD, ADDED))
    }

    fn start(&mut self, input: &mut CsvInput) -> anyhow::Result<()> {
        self.columns = Columns::new(&input.headers, self.map.as_deref())?;
        for needed in ["email", "quantity"] {
            if self.columns.get(needed).is_none() {
                return Err(usage(format!(
                    "{}: no {needed} column (its columns: {}); rename one with --map",
                    input.source.display(),
                    input.headers.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn parse(&self, cells: &csv::StringRecord) -> Result<Parsed<PointRow>, String> {
        let email = self
            .columns
            .cell(cells, "email")
            .ok_or("email is empty")?
            .to_string();
        if !email.contains('@') {
            return Err(format!("email {email:?} is not an email address"));
        }
        let q = self
            .columns
            .cell(cells, "quantity")
            .ok_or("quantity is empty")?;
        let quantity: i64 = q
            .parse()
            .map_err(|_| format!("quantity {q:?} is not a whole number"))?;
        if quantity == 0 {
            return Err("quantity is 0: give a non-zero number of points".into());
        }
        let reason = self.columns.cell(cells, "reason").map(str::to_string);
        if reason.as_deref().is_some_and(|r| r.contains("[ps:")) {
            return Err("the reason holds \"[ps:\", which prefsync keeps for its markers".into());
        }
        let key = format!(
            "{} {quantity:+} {}",
            email.to_lowercase(),
            reason.as_deref().unwrap_or("")
        );
        Ok(Parsed::Row(PointRow {
            key: key.trim_end().to_string(),
            email,
            quantity,
            reason,
            line: 0,
        }))
    }

    /// Email, quantity and reason: two rows that give the same user the
    /// same points for the same reason are taken for a line pasted twice
    /// (the second is rejected as a duplicate). To give them twice on
    /// purpose, tell the reasons apart.
    fn key<'r>(&self, row: &'r PointRow) -> &'r str {
        &row.key
    }

    fn key_name(&self) -> &'static str {
        "point"
    }

    async fn prepare(&mut self, p: Prepare<'_>) -> anyhow::Result<()> {
        let run = p
            .checkpoint
            .run(p.run)?
            .ok_or_else(|| anyhow::anyhow!("run {} is not in the checkpoint", p.run))?;
        self.token = run_token(
            run.id,
            run.started_at,
            run.input_hash.as_deref().unwrap_or(""),
        );
        if !self.marker {
            tracing::warn!(
                "--no-marker: a point whose answer is lost is sent again; it may be given twice (at least once, not exactly once)"
            );
        }
        Ok(())
    }

    /// One create a row, no lookup: the writes bound it, not a listing.
    fn cost(&self) -> Cost {
        Cost {
            class: None,
            calls_per_row: 1.0,
        }
    }

    fn plan(
        &self,
        _ck: &crate::checkpoint::Checkpoint,
        _run: i64,
        _row: &mut PointRow,
    ) -> anyhow::Result<Option<Intent>> {
        Ok(Some(ADD))
    }

    fn place(&self, row: &mut PointRow, line: u64, _stopped_detail: Option<String>) {
        row.line = line;
    }

    async fn find_effect(&self, row: &mut PointRow, doubt: Doubt) -> Result<Effect, ApiError> {
        let in_doubt = matches!(
            doubt,
            Doubt::InFlightAtStop(Some(ADD)) | Doubt::OutcomeUnknown(ADD)
        );
        if !in_doubt {
            return Ok(Effect::NotDone);
        }
        if !self.marker {
            // Nothing tells this point from another: at least once.
            tracing::warn!(
                email = %row.email,
                line = row.line,
                "a point may have been given already; --no-marker sends it again"
            );
            return Ok(Effect::NotDone);
        }
        Ok(
            match self
                .find_marked(&row.email, &self.marker_of(row.line))
                .await?
            {
                Some(id) => Effect::Done {
                    action: ADDED,
                    target: id,
                },
                None => Effect::NotDone,
            },
        )
    }

    async fn decide(&self, _row: &mut PointRow) -> Result<Decision, ApiError> {
        Ok(Decision::Send(ADD))
    }

    async fn send(&self, row: &mut PointRow, _intent: Intent) -> Result<Sent, ApiError> {
        let reason = match (&row.reason, self.marker) {
            (Some(r), true) => Some(format!("{r} {}", self.marker_of(row.line))),
            (None, true) => Some(self.marker_of(row.line)),
            (r, false) => r.clone(),
        };
        // Not wrapped, as the reference documents for points [C].
        let mut body = json!({"email": row.email, "quantity": row.quantity});
        if let Some(r) = reason {
            body["reason"] = Value::String(r);
        }
        let reply = self
            .client
            .call(
                Op::PointCreate,
                Some(&self.beta),
                &format!("betas/{}/points.json", self.beta),
                &[],
                Some(&body),
            )
            .await;
        match reply {
            Ok(r) => {
                let point: Value = r.json(Op::PointCreate)?;
                Ok(Sent::Done {
                    action: ADDED,
                    target: point.get("id").and_then(Value::as_u64).unwrap_or(0),
                })
            }
            // 2803: no user with that email in the project.
            Err(ApiError::Rejected {
                status, messages, ..
            }) => Ok(Sent::Rejected {
                status: Some(status),
                message: format!("the API refused the point: {messages}"),
            }),
            Err(e) => Err(e),
        }
    }

    fn settings(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        let map = match &self.map {
            Some(p) => {
                let digest = std::fs::read(p)
                    .map(|b| sha1_smol::Sha1::from(&b).digest().to_string())
                    .unwrap_or_default();
                format!("{} (sha1 {})", p.display(), &digest[..digest.len().min(12)])
            }
            None => "none".into(),
        };
        m.insert("--map".into(), Value::String(map));
        // A resume with another choice would find no markers, or look for
        // markers never written.
        m.insert("--no-marker".into(), Value::Bool(!self.marker));
        m
    }

    fn notes(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "exactly_once".into(),
            Value::String(if self.marker {
                format!("marker [ps:{}:LINE] in each point's reason", self.token)
            } else {
                "no (--no-marker: at least once)".into()
            }),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(headers: &[&str]) -> PointsAdd {
        let client = Client::new(
            "http://127.0.0.1:1/api/v2".parse().unwrap(),
            crate::api::ApiKey::new("k"),
            crate::api::Limiter::new(&[]),
            crate::api::RetryPolicy::default(),
        );
        let mut op = PointsAdd::new(client, "1".into());
        let h: Vec<String> = headers.iter().map(|s| s.to_string()).collect();
        op.columns = Columns::new(&h, None).unwrap();
        op
    }

    fn parse(op: &PointsAdd, cells: &[&str]) -> Result<PointRow, String> {
        match op.parse(&csv::StringRecord::from(cells.to_vec()))? {
            Parsed::Row(r) => Ok(r),
            Parsed::Skip { .. } => panic!("no row is skipped"),
        }
    }

    #[test]
    fn quantity_is_a_non_zero_whole_number() {
        let op = op(&["Email", "Quantity", "Reason"]);
        let r = parse(&op, &["A@x.io", "-5", "refund"]).unwrap();
        assert_eq!((r.quantity, r.key.as_str()), (-5, "a@x.io -5 refund"));
        assert_eq!(parse(&op, &["a@x.io", "7", ""]).unwrap().reason, None);
        for bad in ["0", "1.5", "ten", ""] {
            assert!(parse(&op, &["a@x.io", bad, ""]).is_err(), "{bad:?}");
        }
        assert!(parse(&op, &["nobody", "1", ""]).is_err());
        assert!(parse(&op, &["a@x.io", "1", "x [ps:abc:2]"]).is_err());
    }

    #[test]
    fn a_run_keeps_its_token_and_another_run_gets_another() {
        let t = run_token(3, 1_700_000_000, "abc");
        assert_eq!(t.len(), 8);
        assert_eq!(t, run_token(3, 1_700_000_000, "abc"));
        assert_ne!(t, run_token(4, 1_700_000_000, "abc"));
    }
}
