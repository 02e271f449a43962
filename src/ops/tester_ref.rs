//! A user named by a row, by `id` or by `email` (the operations on users
//! that take either), and how to find that user: one record by id (show,
//! which no documented limit bounds), one by email (a testers-list call, 60
//! a minute), or the whole project listed once into the checkpoint when
//! that costs fewer calls.

use std::collections::HashSet;

use futures::StreamExt as _;
use serde_json::Value;

use crate::api::{ApiError, Client, Op, PAGE_SIZE};
use crate::checkpoint::Checkpoint;
use crate::exit::{StoppedError, usage};
use crate::import::mapping::{email_key, email_problem};
use crate::input::Columns;
use crate::stop::Stop;

/// How a row names its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TesterRef {
    Id(u64),
    /// As the file has it (trimmed); the key is its lower-cased form.
    Email(String),
}

impl TesterRef {
    /// The row's key: the id's digits, or the lower-cased email (an email
    /// has an `@`, so the two never collide).
    pub fn key(&self) -> String {
        match self {
            TesterRef::Id(id) => id.to_string(),
            TesterRef::Email(e) => email_key(e),
        }
    }
}

/// The input's columns, refusing a file with neither `id` nor `email`.
pub fn columns(headers: &[String], map: Option<&std::path::Path>) -> anyhow::Result<Columns> {
    let cols = Columns::new(headers, map)?;
    if cols.get("id").is_none() && cols.get("email").is_none() {
        return Err(usage(format!(
            "the file has neither an id nor an email column (its columns: {}); rename one with --map",
            headers.join(", ")
        )));
    }
    Ok(cols)
}

/// The row's user: its `id` when the row has one, else its `email`.
pub fn parse(cols: &Columns, cells: &csv::StringRecord) -> Result<TesterRef, String> {
    if let Some(id) = cols.cell(cells, "id") {
        return id
            .parse::<u64>()
            .ok()
            .filter(|id| *id > 0)
            .map(TesterRef::Id)
            .ok_or_else(|| format!("id {id:?} is not a Prefinery user id (a positive number)"));
    }
    match cols.cell(cells, "email") {
        None => Err("the row has neither an id nor an email".into()),
        Some(e) => match email_problem(e) {
            Some(problem) => Err(format!("email {e:?} is not valid: {problem}")),
            None => Ok(TesterRef::Email(e.to_string())),
        },
    }
}

/// One user by id; `None` when there is none.
pub async fn show(client: &Client, beta: &str, id: u64) -> Result<Option<Value>, ApiError> {
    match client
        .call(
            Op::TesterShow,
            Some(beta),
            &format!("betas/{beta}/testers/{id}.json"),
            &[],
            None,
        )
        .await
    {
        Ok(r) => r.json(Op::TesterShow).map(Some),
        Err(ApiError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The row's user as it stands now, if there is one.
pub async fn find(client: &Client, beta: &str, who: &TesterRef) -> Result<Option<Value>, ApiError> {
    match who {
        TesterRef::Id(id) => show(client, beta, *id).await,
        TesterRef::Email(e) => Ok(client
            .find_tester(beta, e)
            .await?
            .map(|t| serde_json::to_value(t).expect("a tester serialises"))),
    }
}

pub fn id_of(t: &Value) -> u64 {
    t.get("id").and_then(Value::as_u64).unwrap_or(0)
}

/// Testers-list calls that listing the whole project costs (one project
/// show to learn its size).
pub async fn listing_pages(client: &Client, beta: &str) -> Result<u64, ApiError> {
    let b = client.beta(beta).await?;
    Ok(b.testers_count.unwrap_or(0).div_ceil(PAGE_SIZE as u64))
}

/// Lists the project once and stores in the checkpoint each user a row
/// names: by email (every user, when `wanted` is `None`), and by id when
/// `wanted` holds that id.
pub async fn list_into_known(
    client: &Client,
    ck: &Checkpoint,
    run: i64,
    beta: &str,
    wanted: Option<&HashSet<String>>,
    stop: &Stop,
) -> anyhow::Result<u64> {
    let mut pages = std::pin::pin!(client.pages::<Value>(
        Op::TestersList,
        Some(beta.to_string()),
        format!("betas/{beta}/testers.json"),
        vec![],
        1
    ));
    let mut n = 0u64;
    while let Some(page) = pages.next().await {
        if stop.is_set() {
            return Err(anyhow::Error::new(StoppedError(
                "stopped while listing the project".into(),
            )));
        }
        let page = page?;
        ck.begin()?;
        for t in &page.items {
            let (Some(email), Some(id)) = (
                t.get("email").and_then(Value::as_str),
                t.get("id").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let record = t.to_string();
            let by_email = email_key(email);
            if wanted.is_none_or(|w| w.contains(&by_email)) {
                ck.store_known(run, &by_email, id, &record)?;
                n += 1;
            }
            let by_id = id.to_string();
            if wanted.is_some_and(|w| w.contains(&by_id)) {
                ck.store_known(run, &by_id, id, &record)?;
                n += 1;
            }
        }
        ck.commit()?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(h: &[&str]) -> Columns {
        let h: Vec<String> = h.iter().map(|s| s.to_string()).collect();
        columns(&h, None).unwrap()
    }

    #[test]
    fn an_id_wins_over_an_email_and_bad_cells_are_refused() {
        let c = cols(&["email", "id"]);
        let rec = |a: &str, b: &str| csv::StringRecord::from(vec![a, b]);
        assert_eq!(parse(&c, &rec("A@x.io", " 12 ")), Ok(TesterRef::Id(12)));
        assert_eq!(
            parse(&c, &rec("A@x.io", "")).map(|r| r.key()),
            Ok("a@x.io".to_string())
        );
        assert!(parse(&c, &rec("", "")).is_err());
        assert!(parse(&c, &rec("", "x1")).is_err());
        assert!(parse(&c, &rec("", "0")).is_err());
        assert!(parse(&c, &rec("a b@x.io", "")).is_err());
        let h: Vec<String> = vec!["name".into()];
        assert!(columns(&h, None).is_err());
    }
}
