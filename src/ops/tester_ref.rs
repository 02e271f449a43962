//! A user named by a row, by `id` or by `email` (the operations on users
//! that take either), and how to find that user: one record by id (show,
//! which no documented limit bounds), one by email (a testers-list call, 60
//! a minute), or the whole project listed once into the checkpoint when
//! that costs fewer calls.

use std::collections::HashSet;

use futures::StreamExt as _;
use serde_json::Value;

use crate::api::{ApiError, Client, Op, PAGE_SIZE, RateClass};
use crate::checkpoint::{Checkpoint, ListingMark};
use crate::engine::events::{Event, Subscribers};
use crate::exit::{StoppedError, usage};
use crate::import::mapping::{email_key, email_problem};
use crate::input::Columns;
use crate::progress::{Items, Snapshot};
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
/// `wanted` holds that id. Returns the users stored.
///
/// A phase of its own: it sends progress (pages of total, users, the
/// limiter's wait and state), stops at once on `stop` (the time budget,
/// Ctrl-C) with a [`StoppedError`], and resumes: each page's users and the
/// next page to list are committed together, so the same run resumed lists
/// only the pages left (a user who moved across a page boundary in between
/// is found by the lookup a `taken` answer or an update leads to, as for
/// any listing that ages while a run goes on). A listing that finished is
/// done again by a resumed run: the rows it sent since changed the
/// project.
pub async fn list_into_known(
    client: &Client,
    ck: &Checkpoint,
    run: i64,
    beta: &str,
    wanted: Option<&HashSet<String>>,
    stop: &Stop,
    progress: &Subscribers,
) -> anyhow::Result<u64> {
    // A listing left unfinished is taken up where it stopped: nothing was
    // sent since it began (a run sends only once its listing is done). A
    // finished one is not: the run sent rows since, and lists afresh.
    let mark = ck
        .listing(run)?
        .filter(|m| m.next_page.is_some())
        .unwrap_or(ListingMark {
            next_page: Some(1),
            pages_done: 0,
            users: 0,
        });
    let first = mark.next_page.unwrap_or(1);
    if first > 1 {
        tracing::info!(
            pages_done = mark.pages_done,
            users = mark.users,
            "resuming the listing of the project at page {first}"
        );
    }
    let mut pages = std::pin::pin!(client.pages::<Value>(
        Op::TestersList,
        Some(beta.to_string()),
        format!("betas/{beta}/testers.json"),
        vec![],
        first
    ));
    let feed = ListingFeed {
        client,
        progress,
        started: std::time::Instant::now(),
    };
    let mut mark = mark;
    let mut total = 0u64;
    let mut users = None;
    feed.send(&mark, total, users);
    loop {
        let page = tokio::select! {
            biased;
            // A page under way is dropped: it is a read, and the next run
            // asks for it again.
            () = stop.wait() => {
                return Err(anyhow::Error::new(StoppedError(format!(
                    "stopped while listing the project ({} pages done{}, {} users); \
                     run the same command again to resume the listing",
                    mark.pages_done,
                    if total > 0 { format!(" of {total}") } else { String::new() },
                    mark.users
                ))));
            }
            page = pages.next() => page,
        };
        let Some(page) = page else { break };
        let page = page?;
        if let Some(p) = &page.pagination {
            // Stored users are those the rows name, when some are wanted.
            users = p.total.filter(|_| wanted.is_none());
            total = p
                .pages
                .or_else(|| {
                    Some(
                        p.total?
                            .div_ceil(p.per_page.unwrap_or(PAGE_SIZE as u64).max(1)),
                    )
                })
                .unwrap_or(total);
        }
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
                mark.users += 1;
            }
            let by_id = id.to_string();
            if wanted.is_some_and(|w| w.contains(&by_id)) {
                ck.store_known(run, &by_id, id, &record)?;
                mark.users += 1;
            }
        }
        mark.pages_done += 1;
        // As the page stream goes on: the header's next page, else the one
        // after.
        mark.next_page = (!page.last).then(|| {
            page.pagination
                .as_ref()
                .and_then(|p| p.next_page)
                .filter(|n| *n > page.number)
                .unwrap_or(page.number + 1)
        });
        ck.set_listing(run, &mark)?;
        ck.commit()?;
        feed.send(&mark, total, users);
    }
    if mark.next_page.is_some() {
        mark.next_page = None;
        ck.set_listing(run, &mark)?;
    }
    Ok(mark.users)
}

/// The listing's progress, as a phase of the run.
struct ListingFeed<'a> {
    client: &'a Client,
    progress: &'a Subscribers,
    started: std::time::Instant,
}

impl ListingFeed<'_> {
    /// `total` pages and `users` in the project, when the header tells.
    fn send(&self, mark: &ListingMark, total: u64, users: Option<u64>) {
        let limiter = self.client.limiter();
        let snapshot = Snapshot {
            phase: "listing",
            done: mark.pages_done,
            total: total.max(mark.pages_done),
            unit: "pages",
            elapsed: self.started.elapsed(),
            limiter_wait: limiter.waited(),
            throttled: self
                .client
                .stats()
                .throttled
                .load(std::sync::atomic::Ordering::Relaxed),
            state: limiter.condition(),
            // One testers-list call a page.
            ceiling: limiter
                .quota(RateClass::TestersList)
                .map(|q| f64::from(q.count) / q.period.as_secs_f64()),
            items: Some(Items {
                done: mark.users,
                total: users,
                approximate: false,
                unit: "users",
            }),
        };
        // A display that fails does not stop the run.
        let _ = self.progress.send(&Event::Progress(&snapshot));
    }
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
