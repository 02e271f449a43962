//! Applies journalled events to the mirror, apart from the HTTP side.
//!
//! Idempotent and safe out of order: an event is only a hint that a user
//! changed. The user is read again by id (the show call, which the
//! 60-a-minute list quota does not bound) and the current record is
//! written under the mirror's `updated_at` guard; a user the API no longer
//! has (404) is marked deleted. So a duplicate costs at most one more read,
//! and events about one user that arrive in any order end in the same
//! record: the last read is the newest.
//!
//! The events of a batch are grouped by user: one read serves every event
//! of that user journalled before the read started (those that come during
//! it stay pending and cause another read). Users are read concurrently,
//! each by one task only, so two reads of one user are never written in
//! the wrong order.
//!
//! An event naming no user, or of a kind it does not know, is kept in the
//! journal as `unknown`, counted, and logged once per kind.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::Stats;
use super::event::{Kind, interpret};
use super::journal::{Pending, Reader};
use crate::api::{ApiError, Client, Op};
use crate::export::Resource;
use crate::mirror::Mirror;
use crate::ops::tester_ref;
use crate::stop::Stop;

/// Events read from the journal at once.
const BATCH: usize = 512;
/// Users read at once. The show call has no documented limit; four keep a
/// real server's latency (~100-300 ms) from bounding the rate at a few
/// users a second, without hammering it.
const CONCURRENCY: usize = 4;

/// One user's events in a batch.
#[derive(Default)]
struct Group {
    rows: Vec<(i64, Option<String>)>,
    tester: bool,
    rewards: bool,
    points: bool,
    email: Option<String>,
}

pub struct Applier {
    pub client: Client,
    /// The project as the API takes it (id or UID).
    pub beta: String,
    pub beta_id: i64,
    pub mirror: Arc<Mirror>,
    pub journal: Reader,
    pub stats: Arc<Stats>,
    pub wake: Arc<tokio::sync::Notify>,
    /// Kinds already logged as unknown.
    logged: HashSet<String>,
}

impl Applier {
    pub fn new(
        client: Client,
        beta: String,
        beta_id: i64,
        mirror: Arc<Mirror>,
        journal: Reader,
        stats: Arc<Stats>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Applier {
        Applier {
            client,
            beta,
            beta_id,
            mirror,
            journal,
            stats,
            wake,
            logged: HashSet::new(),
        }
    }

    /// Applies until `stop`, then until nothing is pending, or until
    /// `drain` has passed since the stop (what is left is applied at the
    /// next start).
    pub async fn run(mut self, stop: Stop, drain: Duration) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        let mut stopped_at: Option<tokio::time::Instant> = None;
        loop {
            if stop.is_set() && stopped_at.is_none() {
                stopped_at = Some(tokio::time::Instant::now());
            }
            if stopped_at.is_some_and(|t| t.elapsed() > drain) {
                let left = self.journal.counts()?.pending;
                if left > 0 {
                    tracing::warn!(
                        "stopping with {left} events pending: they are applied at the next start"
                    );
                }
                return Ok(());
            }
            // Registered before the read, so a commit in between wakes us.
            let wake = self.wake.clone();
            let woken = wake.notified();
            let batch = self.journal.pending(BATCH)?;
            self.update_lag()?;
            if batch.is_empty() {
                if stopped_at.is_some() {
                    return Ok(());
                }
                tokio::select! {
                    _ = woken => {}
                    _ = stop.wait() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            match self.apply(batch).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(
                        "failed to apply events (they stay pending; retrying in {:?}): {e:#}",
                        backoff
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait(), if stopped_at.is_none() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// `n` events left pending for `counter` (applied, unknown).
    fn settled(&self, counter: &std::sync::atomic::AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.pending.fetch_sub(n as u64, Ordering::Relaxed);
    }

    fn update_lag(&self) -> anyhow::Result<()> {
        let oldest = self
            .journal
            .oldest_pending()?
            .and_then(|t| crate::time::parse_iso8601(&t))
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        self.stats.oldest_pending.store(oldest, Ordering::Relaxed);
        Ok(())
    }

    async fn apply(&mut self, batch: Vec<Pending>) -> anyhow::Result<()> {
        let mut groups: BTreeMap<u64, Group> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut gone = Vec::new();
        for p in &batch {
            let it = interpret(&p.body);
            if it.kind == Kind::Unknown {
                let kind = it.event.clone().unwrap_or_else(|| "(no event name)".into());
                if self.logged.insert(kind.clone()) {
                    tracing::warn!(
                        event = kind.as_str(),
                        "an event of a kind not understood (or naming no user): kept in the journal as unknown, not applied (logged once per kind)"
                    );
                }
                unknown.push((p.id, it.event, it.user_id, it.email));
                continue;
            }
            let id = match it.user_id {
                Some(id) => Some(id),
                None => self.id_by_email(it.email.as_deref().unwrap_or("")).await?,
            };
            let Some(id) = id else {
                // An email the API does not know: that user is gone.
                if let Some(e) = &it.email {
                    self.mirror.mark_deleted_email(self.beta_id, e)?;
                }
                gone.push((p.id, it.event, None, it.email));
                continue;
            };
            let g = groups.entry(id).or_default();
            g.rows.push((p.id, it.event));
            g.email = g.email.take().or(it.email);
            match it.kind {
                Kind::Tester => g.tester = true,
                Kind::Rewards => g.rewards = true,
                Kind::Points => g.points = true,
                Kind::Unknown => unreachable!(),
            }
        }
        if !unknown.is_empty() {
            self.journal.mark(&unknown, "unknown", None)?;
            self.settled(&self.stats.unknown, unknown.len());
        }
        if !gone.is_empty() {
            self.journal.mark(&gone, "applied", Some("no such user"))?;
            self.settled(&self.stats.applied, gone.len());
        }
        let this = &*self;
        let results: Vec<(u64, Group, anyhow::Result<()>)> = futures::stream::iter(groups)
            .map(|(id, g)| async move {
                let r = this.apply_user(id, &g).await;
                (id, g, r)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut first_error = None;
        let mut done = Vec::new();
        for (id, g, r) in results {
            match r {
                Ok(()) => done.extend(
                    g.rows
                        .iter()
                        .map(|(row, ev)| (*row, ev.clone(), Some(id), g.email.clone())),
                ),
                Err(e) => {
                    let ids: Vec<i64> = g.rows.iter().map(|r| r.0).collect();
                    let why = format!("{e:#}");
                    self.journal.failed(&ids, &why)?;
                    first_error.get_or_insert(e);
                }
            }
        }
        // One commit for the batch: the mirror's writes came first, so a
        // crash before it only means reading those users once more.
        self.journal.mark(&done, "applied", None)?;
        self.settled(&self.stats.applied, done.len());
        self.update_lag()?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A user's id from the mirror, else from the API (a testers-list
    /// call); `None` when the API has no such user.
    async fn id_by_email(&self, email: &str) -> anyhow::Result<Option<u64>> {
        if email.is_empty() {
            return Ok(None);
        }
        if let Some((id, _)) = self.mirror.tester_ref(self.beta_id, None, Some(email))? {
            return Ok(Some(id));
        }
        Ok(self
            .client
            .find_tester(&self.beta, email)
            .await?
            .map(|t| t.id))
    }

    async fn apply_user(&self, id: u64, g: &Group) -> anyhow::Result<()> {
        let mut email = g.email.clone();
        let need_email = (g.rewards || g.points) && email.is_none();
        if need_email && let Some((_, e)) = self.mirror.tester_ref(self.beta_id, Some(id), None)? {
            email = e;
        }
        if g.tester || (need_email && email.is_none()) {
            match tester_ref::show(&self.client, &self.beta, id).await? {
                Some(rec) => {
                    if let Some(e) = rec.get("email").and_then(Value::as_str) {
                        email = Some(e.to_string());
                    }
                    self.mirror.write_tester(self.beta_id, &rec)?;
                }
                None => {
                    self.mirror.mark_deleted(self.beta_id, id)?;
                    return Ok(());
                }
            }
        }
        let Some(email) = email else {
            return Ok(());
        };
        for (wanted, resource, op) in [
            (g.rewards, Resource::Rewards, Op::RewardsList),
            (g.points, Resource::Points, Op::PointsList),
        ] {
            if wanted {
                let items = self.list_for(resource, op, &email).await?;
                self.mirror
                    .replace_user_records(self.beta_id, resource, id, &items)?;
            }
        }
        Ok(())
    }

    /// A user's rewards or points, every page, filtered by email.
    async fn list_for(&self, r: Resource, op: Op, email: &str) -> Result<Vec<Value>, ApiError> {
        let pages: Vec<crate::api::Page<Value>> = self
            .client
            .pages(
                op,
                Some(self.beta.clone()),
                r.path(&self.beta),
                vec![("email".into(), email.into())],
                1,
            )
            .try_collect()
            .await?;
        Ok(pages.into_iter().flat_map(|p| p.items).collect())
    }
}
