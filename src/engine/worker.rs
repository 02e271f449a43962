//! The workers, and the exactly-once protocol every operation runs under.
//!
//! Per row: if it was in flight when a run stopped, ask the operation
//! whether its effect is there ([`Operation::find_effect`]); then decide;
//! in a dry run, record what would happen and stop there; make the intent
//! durable (unless the dispatch did); send; on an unknown outcome ask
//! again before each retry; on "decide again" (a create whose email is
//! taken) decide again. Failures are classified once, here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use super::coordinator::{Job, ToCoordinator, WORK_CHUNK};
use super::{Decision, Doubt, Effect, Intent, Operation, Sent, cells_json};
use crate::api::{ApiError, Client};
use crate::checkpoint::RowUpdate;
use crate::stop::Stop;

/// Times a call whose outcome stays unknown is sent before the row is
/// rejected as `outcome_unknown` (each time, the operation found that it
/// had not taken effect).
const SEND_TRIES: u32 = 4;

/// Times a row may be decided again after its world changed under it.
const REDECIDES: u32 = 2;

/// A worker reports what it has done at least this often.
const REPORT_AFTER: Duration = Duration::from_millis(250);

struct Ctx<O> {
    op: Arc<O>,
    /// A strict order's turns.
    turns: Option<Turns>,
    /// For the pause before a call refused by a plain 503 is sent again.
    client: Client,
    dry_run: bool,
    coordinator: mpsc::Sender<ToCoordinator>,
    stop: Stop,
    fatal: std::sync::Mutex<Option<ApiError>>,
}

/// Runs `concurrency` workers until the queue is closed and empty. Returns
/// the failure that stopped the run, if one did.
pub(super) async fn work_all<O: Operation>(
    client: Client,
    op: Arc<O>,
    (concurrency, dry_run, strict): (usize, bool, bool),
    jobs: mpsc::Receiver<Vec<Job<O::Row>>>,
    coordinator: mpsc::Sender<ToCoordinator>,
    stop: Stop,
) -> anyhow::Result<Option<ApiError>> {
    let ctx = Arc::new(Ctx {
        op,
        turns: strict.then(Turns::default),
        client,
        dry_run,
        coordinator,
        stop,
        fatal: std::sync::Mutex::new(None),
    });
    // Workers are tasks of their own, so they run on every core (a
    // `for_each_concurrent` would poll them all from one task).
    let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let ctx = ctx.clone();
            let jobs = jobs.clone();
            tokio::spawn(async move {
                let mut updates = Vec::with_capacity(WORK_CHUNK);
                loop {
                    let chunk = jobs.lock().await.recv().await;
                    let Some(chunk) = chunk else { return };
                    let mut since = Instant::now();
                    let last = chunk.len() - 1;
                    for (i, job) in chunk.into_iter().enumerate() {
                        work(&ctx, job, &mut updates).await;
                        // Report at the end of the chunk, or sooner when rows
                        // are slow (rate-limited lookups), so progress and
                        // the checkpoint keep up.
                        if !updates.is_empty() && (i == last || since.elapsed() >= REPORT_AFTER) {
                            let rows =
                                std::mem::replace(&mut updates, Vec::with_capacity(WORK_CHUNK));
                            let _ = ctx.coordinator.send(ToCoordinator::Rows(rows)).await;
                            since = Instant::now();
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.context("a worker panicked")?;
    }
    let fatal = ctx.fatal.lock().unwrap().take();
    Ok(fatal)
}

/// What became of one row.
enum Outcome {
    Row(RowUpdate),
    /// The whole run must stop (access denied, throttled past its budget).
    Abort(ApiError),
    /// Stopped before the row was sent: it stays open for the next run.
    Left,
}

/// Does one row; returns what the checkpoint should record of it.
async fn work<O: Operation>(ctx: &Ctx<O>, mut job: Job<O::Row>, updates: &mut Vec<RowUpdate>) {
    let outcome = if ctx.stop.is_set() {
        Outcome::Left
    } else {
        process(ctx, &mut job).await
    };
    let update = match outcome {
        Outcome::Row(u) => {
            if let RowUpdate::Done {
                action, target_id, ..
            } = &u
            {
                ctx.op.finished(&mut job.row, action, *target_id);
            }
            // Why a done row is as it is, when the operation says (already
            // delivered, already suppressed): the results file shows it.
            let note = match &u {
                RowUpdate::Done { action, .. } => ctx.op.done_note(&job.row, action),
                _ => None,
            };
            updates.push(u);
            note.map(|message| RowUpdate::Note {
                line: job.line,
                message,
            })
        }
        Outcome::Abort(e) => {
            let mut f = ctx.fatal.lock().unwrap();
            if f.is_none() {
                tracing::error!("stopping the run: {e}");
                *f = Some(e);
            }
            ctx.stop.trigger();
            None
        }
        // Never sent: back to pending, so a resume need not ask about it.
        Outcome::Left => (!job.was_sending).then_some(RowUpdate::Pending { line: job.line }),
    };
    // Answered (or left): the next row's turn.
    release_turn(ctx, &mut job);
    updates.extend(update);
}

/// The turns of a strict order: a row's in-turn call waits until every
/// row with an earlier turn is answered, or has decided on a call that
/// does not wait (an update). Turns are given in the order rows are handed
/// out, and workers take rows in that order, so the earliest turn not yet
/// released always belongs to a row being worked on: nobody waits forever.
#[derive(Default)]
struct Turns {
    /// The earliest turn not released, and the later ones released early.
    state: std::sync::Mutex<(u64, std::collections::BTreeSet<u64>)>,
    moved: tokio::sync::Notify,
}

impl Turns {
    fn release(&self, turn: u64) {
        let mut g = self.state.lock().unwrap();
        let (next, ahead) = &mut *g;
        if turn < *next {
            return;
        }
        if turn > *next {
            ahead.insert(turn);
            return;
        }
        *next += 1;
        while ahead.remove(next) {
            *next += 1;
        }
        drop(g);
        self.moved.notify_waiters();
    }

    /// Waits for `turn`; `false` when the run stops first.
    async fn wait(&self, turn: u64, stop: &Stop) -> bool {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.state.lock().unwrap().0 == turn {
                return true;
            }
            if stop.is_set() {
                return false;
            }
            tokio::select! {
                () = &mut moved => {}
                () = stop.wait() => {}
            }
        }
    }
}

fn release_turn<O: Operation>(ctx: &Ctx<O>, job: &mut Job<O::Row>) {
    if let (Some(turns), Some(t)) = (&ctx.turns, job.turn.take()) {
        turns.release(t);
    }
}

fn done<R>(job: &Job<R>, action: &'static str, target: u64) -> Outcome {
    Outcome::Row(RowUpdate::Done {
        line: job.line,
        action,
        target_id: target,
    })
}

fn rejected<R>(job: &Job<R>, class: &'static str, status: Option<u16>, message: String) -> Outcome {
    Outcome::Row(RowUpdate::Rejected {
        line: job.line,
        class,
        http_status: status,
        message,
        raw: Some(cells_json(&job.raw)),
    })
}

/// Sorts a failed call into the row's fate.
fn classify<R>(job: &Job<R>, e: ApiError) -> Outcome {
    match e {
        e if e.is_access_denied() => Outcome::Abort(e),
        e @ (ApiError::Throttled { .. }
        | ApiError::Unreachable { .. }
        | ApiError::Unavailable { .. }
        | ApiError::ProjectNotFound { .. }
        | ApiError::Cancelled { .. }) => Outcome::Abort(e),
        e @ (ApiError::Server { .. } | ApiError::Transport { .. }) => {
            let status = e.status();
            rejected(job, "retries_exhausted", status, e.to_string())
        }
        e @ ApiError::OutcomeUnknown { .. } => {
            rejected(job, "outcome_unknown", None, e.to_string())
        }
        e => {
            let status = e.status();
            rejected(job, "rejected_by_api", status, e.to_string())
        }
    }
}

/// Makes `intent` durable, with the operation's detail, before the call
/// that carries it out, unless the dispatch (or an earlier try) already
/// did. `false` when the coordinator is gone (the run is ending).
async fn intend<O: Operation>(ctx: &Ctx<O>, job: &mut Job<O::Row>, intent: Intent) -> bool {
    let detail = ctx.op.detail(&job.row, intent);
    if job.durable == Some(intent) && job.durable_detail == detail {
        return true;
    }
    let (tx, rx) = oneshot::channel();
    if ctx
        .coordinator
        .send(ToCoordinator::Intend(job.line, intent, detail.clone(), tx))
        .await
        .is_err()
        || rx.await.is_err()
    {
        return false;
    }
    job.durable = Some(intent);
    job.durable_detail = detail;
    true
}

async fn process<O: Operation>(ctx: &Ctx<O>, job: &mut Job<O::Row>) -> Outcome {
    let op = &*ctx.op;
    op.place(&mut job.row, job.line, job.stopped_detail.take());
    if job.was_sending {
        // The stopped run may have sent this row's call just before it died.
        match op
            .find_effect(&mut job.row, Doubt::InFlightAtStop(job.stopped_intent))
            .await
        {
            Ok(Effect::Done { action, target }) => return done(job, action, target),
            Ok(Effect::NotDone) => {}
            Err(e) => return classify(job, e),
        }
    }
    let mut unknown = 0;
    let mut refused = 0;
    for _ in 0..=REDECIDES {
        let intent = match op.decide(&mut job.row).await {
            Ok(Decision::Done { action, target }) => return done(job, action, target),
            Ok(Decision::Reject { message }) => {
                return rejected(job, "rejected_by_api", None, message);
            }
            Ok(Decision::Drift { message }) => {
                if op.stop_on_drift() {
                    tracing::warn!(line = job.line, "drift: stopping the run (--on-drift stop)");
                    ctx.stop.trigger();
                }
                return rejected(job, "drift", None, message);
            }
            Ok(Decision::Send(intent)) => intent,
            Err(e) => return classify(job, e),
        };
        if ctx.dry_run {
            let action = op.intent(intent).map_or(intent, |(_, a)| a);
            return done(job, action, 0);
        }
        // A strict order: this call waits for its turn; any other call
        // lets the next row have it at once.
        if let (Some(turns), Some(t)) = (&ctx.turns, job.turn) {
            if !op.in_turn(intent) {
                release_turn(ctx, job);
            } else if !turns.wait(t, &ctx.stop).await {
                return Outcome::Left;
            }
        }
        loop {
            if ctx.stop.is_set() || !intend(ctx, job, intent).await {
                return Outcome::Left;
            }
            match op.send(&mut job.row, intent).await {
                Ok(Sent::Done { action, target }) => return done(job, action, target),
                Ok(Sent::Rejected { status, message }) => {
                    return rejected(job, "rejected_by_api", status, message);
                }
                Ok(Sent::Redecide) => break,
                Err(ApiError::OutcomeUnknown {
                    op: call,
                    cause,
                    status,
                }) => {
                    tracing::debug!(line = job.line, %cause, "{intent}: outcome unknown; asking whether it took effect");
                    match op
                        .find_effect(&mut job.row, Doubt::OutcomeUnknown(intent))
                        .await
                    {
                        Ok(Effect::Done { action, target }) => return done(job, action, target),
                        // A 503 says the server did not take the request
                        // on, and the check agrees: a refusal, not a doubt,
                        // so it does not use up the row's tries; the client
                        // paces it and stops the run (resumable) if the
                        // server stays down.
                        Ok(Effect::NotDone) if status == Some(503) => {
                            refused += 1;
                            if let Err(e) = ctx.client.pause_to_resend(call, refused, &cause).await
                            {
                                return Outcome::Abort(e);
                            }
                            continue;
                        }
                        Ok(Effect::NotDone) if unknown + 1 < SEND_TRIES => {
                            unknown += 1;
                            continue;
                        }
                        Ok(Effect::NotDone) => {
                            return rejected(
                                job,
                                "outcome_unknown",
                                None,
                                format!(
                                    "the {intent} was sent {SEND_TRIES} times without a clear answer and did not take effect; run again to retry"
                                ),
                            );
                        }
                        Err(e) => return classify(job, e),
                    }
                }
                Err(e) => return classify(job, e),
            }
        }
    }
    rejected(
        job,
        "rejected_by_api",
        None,
        "the record changed under this row each time it was decided; run again to retry".into(),
    )
}
