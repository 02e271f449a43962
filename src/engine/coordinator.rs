//! The one task that owns the input and the checkpoint.
//!
//! Each turn is one transaction: what the workers reported, and, when the
//! workers' queue has taken every row handed out so far, the next rows
//! read and marked `sending` (planned too, in a single pass). Rows go to
//! the queue only once that is committed. Owning both, it needs no round
//! trip between a reader and a writer: one task, no thread hand-offs. It
//! also feeds progress events, from the counts it commits.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::events::{Event, Subscribers};
use super::{
    Cost, Intent, Operation, Parsed, cells_json, duplicate_message, skipped, validation_error,
};
use crate::api::Client;
use crate::checkpoint::{Checkpoint, OpenRow, RowUpdate};
use crate::input::{CsvInput, Record, RecordAt};
use crate::progress::Snapshot;
use crate::stop::Stop;

/// How long the coordinator holds workers' reports for company in one
/// transaction; a report somebody waits on is committed at once.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(2);
const GROUP_COMMIT_MAX: usize = 2048;
/// Open rows fetched from the checkpoint at a time.
const OPEN_CHUNK: usize = 10_000;

/// Rows the coordinator marks `sending` in one transaction before handing
/// them out. After a kill -9, at most this many plus those queued and in
/// flight are asked about on resume; a clean stop puts the unsent ones back.
const DISPATCH_BATCH: usize = 64;

/// Rows a worker takes at a time (one wake-up, one report to the coordinator).
pub(super) const WORK_CHUNK: usize = 8;

/// How often progress is sent to the subscribers at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Progress is sent at least this often, rows finishing or not.
const PROGRESS_TICK: Duration = Duration::from_secs(1);

/// One row handed to a worker.
#[derive(Debug)]
pub(crate) struct Job<R> {
    pub line: u64,
    pub row: R,
    pub raw: csv::StringRecord,
    /// The row was `sending` when the run stopped: ask about it first.
    pub was_sending: bool,
    /// What the stopped run was about to send for it, if it got that far.
    pub stopped_intent: Option<Intent>,
    /// The detail that intent was made durable with.
    pub stopped_detail: Option<String>,
    /// The intent on disk now. A call is sent only once its intent is
    /// durable, so a resume after kill -9 labels the row right.
    pub durable: Option<Intent>,
    /// The detail on disk with it.
    pub durable_detail: Option<String>,
    /// Its turn in a strict order: its in-turn call waits until every
    /// row with an earlier turn is answered.
    pub turn: Option<u64>,
}

/// What workers tell the coordinator.
pub(crate) enum ToCoordinator {
    /// A worker's intent, decided after the dispatch (a lookup, a fallback),
    /// with the operation's detail; acknowledged once committed.
    Intend(u64, Intent, Option<String>, oneshot::Sender<()>),
    /// What became of rows (a worker's chunk).
    Rows(Vec<RowUpdate>),
}

impl ToCoordinator {
    /// Somebody waits for this to be committed.
    fn awaited(&self) -> bool {
        matches!(self, ToCoordinator::Intend(..))
    }
}

/// The rows to hand out, in line order. In a single pass (`plan_too`)
/// every record of the input is planned on the way: checked, then rejected
/// or handed out; otherwise the rows were planned before, and the open ones
/// are read back from the checkpoint.
pub(super) struct RowSource<O: Operation> {
    pub csv: CsvInput,
    pub op: Arc<O>,
    pub plan_too: bool,
    pub run: i64,
    /// The next open rows, from the checkpoint, when not planning.
    pub open: std::iter::Peekable<std::vec::IntoIter<OpenRow>>,
    pub last: u64,
    pub exhausted: bool,
    /// A sorted run: the open rows in their order, read back by offset.
    pub sorted: Option<Sorted>,
}

/// How a sorted run reads its rows: the checkpoint lists the open ones in
/// their order, a chunk at a time, and each record is read at its offset.
pub(super) struct Sorted {
    pub at: RecordAt,
    /// The last `(order key, line)` listed.
    pub after: Option<(i64, u64)>,
    pub queue: std::collections::VecDeque<(i64, u64, OpenRow)>,
    /// A strict order: rows get turns.
    pub turns: bool,
    pub next_turn: u64,
}

/// Rows read at one go: those to send, and (single pass) those refused.
struct Batch<R> {
    jobs: Vec<Job<R>>,
    invalid: Vec<RowUpdate>,
}

impl<O: Operation> RowSource<O> {
    /// Up to `max` rows to send (or `max` refused ones).
    fn next_batch(&mut self, ck: &Checkpoint, max: usize) -> anyhow::Result<Batch<O::Row>> {
        let mut b = Batch {
            jobs: Vec::new(),
            invalid: Vec::new(),
        };
        if self.sorted.is_some() {
            self.next_sorted(ck, max, &mut b)?;
            return Ok(b);
        }
        while !self.exhausted && b.jobs.len() < max && b.invalid.len() < max {
            let Some(rec) = self.csv.next_record()? else {
                self.exhausted = true;
                break;
            };
            let line = match &rec {
                Ok(r) => r.line,
                Err(bad) => bad.line,
            };
            let open = if self.plan_too {
                None
            } else {
                if self.open.peek().is_none() {
                    let more = ck.open_rows(self.run, self.last, OPEN_CHUNK)?;
                    if more.is_empty() {
                        self.exhausted = true;
                        break;
                    }
                    self.open = more.into_iter().peekable();
                }
                while self.open.peek().is_some_and(|o| o.line < line) {
                    self.last = self.open.next().unwrap().line;
                }
                if self.open.peek().is_none_or(|o| o.line != line) {
                    continue;
                }
                self.last = line;
                self.open.next()
            };
            let r = match rec {
                Ok(r) => r,
                Err(bad) => {
                    if self.plan_too {
                        b.invalid
                            .push(validation_error(bad.line, bad.message, &bad.fields));
                    }
                    continue;
                }
            };
            self.push_job(ck, r, open, &mut b)?;
        }
        Ok(b)
    }

    /// The next open rows of a sorted run, in their order. Every one was
    /// checked by the planning pass (the file is the same: its fingerprint
    /// is), so a record that no longer reads is an error, not a rejection.
    fn next_sorted(
        &mut self,
        ck: &Checkpoint,
        max: usize,
        b: &mut Batch<O::Row>,
    ) -> anyhow::Result<()> {
        while !self.exhausted && b.jobs.len() < max {
            let s = self.sorted.as_mut().expect("a sorted run");
            if s.queue.is_empty() {
                let more = ck.open_rows_ordered(self.run, s.after, OPEN_CHUNK)?;
                if more.is_empty() {
                    self.exhausted = true;
                    break;
                }
                s.queue = more.into();
            }
            let (ord, offset, open) = s.queue.pop_front().expect("refilled");
            s.after = Some((ord, open.line));
            let r = s.at.read(offset, open.line)?.map_err(|bad| {
                anyhow::anyhow!(
                    "line {} of {} no longer reads as it did when the run was planned: {}",
                    bad.line,
                    self.csv.source.display(),
                    bad.message
                )
            })?;
            self.push_job(ck, r, Some(open), b)?;
        }
        Ok(())
    }

    /// Parses and plans one record into a job (or, in a single pass, a
    /// refusal). `open` is what the checkpoint holds of a planned row.
    fn push_job(
        &mut self,
        ck: &Checkpoint,
        r: Record,
        open: Option<OpenRow>,
        b: &mut Batch<O::Row>,
    ) -> anyhow::Result<()> {
        let line = r.line;
        let mut row = match self.op.parse(&r.fields) {
            Ok(Parsed::Row(row)) => row,
            Ok(Parsed::Skip { class, key, reason }) => {
                if self.plan_too {
                    b.invalid.push(skipped(r.line, class, key, reason));
                }
                return Ok(());
            }
            Err(msg) => {
                if self.plan_too {
                    b.invalid.push(validation_error(r.line, msg, &r.fields));
                }
                return Ok(());
            }
        };
        let (was_sending, stopped_intent, detail) = match open {
            Some(o) => (o.sending, o.intent, o.detail),
            None => (false, None, None),
        };
        let planned = self.op.plan(ck, self.run, &mut row)?;
        let stopped_intent = stopped_intent
            .as_deref()
            .and_then(|s| self.op.intent(s))
            .map(|(i, _)| i);
        // Only a row that may have been sent needs what was kept to
        // prove its effect.
        let detail = detail.filter(|_| was_sending && stopped_intent.is_some());
        let stopped_detail = detail.clone();
        let turn = match &mut self.sorted {
            Some(s) if s.turns => {
                s.next_turn += 1;
                Some(s.next_turn - 1)
            }
            _ => None,
        };
        b.jobs.push(Job {
            line,
            row,
            raw: r.fields,
            was_sending,
            stopped_intent,
            stopped_detail,
            durable: stopped_intent.or(planned),
            durable_detail: detail,
            turn,
        });
        Ok(())
    }
}

/// Progress, as the coordinator sees it from what it commits.
pub(super) struct ProgressFeed {
    pub subscribers: Subscribers,
    pub client: Client,
    pub cost: Cost,
    pub started: Instant,
    pub total: u64,
    /// Rows finished, this run and before.
    pub done: u64,
    pub last: Option<Instant>,
}

impl ProgressFeed {
    fn finished(&mut self, rows: u64) {
        self.done += rows;
        if self.last.is_some_and(|l| l.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        // When each row needs a limited call, the limit bounds the ETA.
        let limiter = self.client.limiter();
        let ceiling = self.cost.class.and_then(|class| {
            limiter.quota(class).map(|q| {
                f64::from(q.count) / q.period.as_secs_f64() / self.cost.calls_per_row.max(0.001)
            })
        });
        let snapshot = Snapshot {
            phase: "sending",
            done: self.done,
            total: self.total,
            unit: "rows",
            elapsed: self.started.elapsed(),
            limiter_wait: limiter.waited(),
            throttled: self.client.stats().throttled.load(Ordering::Relaxed),
            state: limiter.condition(),
            ceiling,
            items: None,
        };
        // A display that fails does not stop the run.
        let _ = self.subscribers.send(&Event::Progress(&snapshot));
    }
}

/// Owns the checkpoint and the input until every row handed out is
/// reported. Returns the checkpoint and whether the whole input was read.
pub(super) async fn coordinate<O: Operation>(
    ck: Checkpoint,
    mut rows: RowSource<O>,
    mut rx: mpsc::Receiver<ToCoordinator>,
    jobs: mpsc::Sender<Vec<Job<O::Row>>>,
    mut progress: ProgressFeed,
    stop: Stop,
) -> anyhow::Result<(Checkpoint, bool)> {
    let run = rows.run;
    let background = ck.checkpoint_in_background()?;
    let mut jobs = Some(jobs);
    // Committed `sending`, not yet taken by the queue.
    let mut ready: std::collections::VecDeque<Job<O::Row>> = Default::default();
    // Worker reports gathered for the next transaction, and since when.
    let mut held: Vec<ToCoordinator> = Vec::new();
    let mut held_since: Option<tokio::time::Instant> = None;
    let hold = |held: &mut Vec<ToCoordinator>,
                since: &mut Option<tokio::time::Instant>,
                m: ToCoordinator| {
        held.push(m);
        since.get_or_insert_with(tokio::time::Instant::now);
    };
    let mut reports_open = true;
    loop {
        // Hand out what is committed while the queue has room.
        if let Some(tx) = &jobs {
            while !ready.is_empty() {
                let Ok(permit) = tx.try_reserve() else { break };
                permit.send(next_chunk(&mut ready));
            }
        }
        let stopped = stop.is_set();
        if stopped && !ready.is_empty() {
            // Never sent: back to pending, so a resume need not ask about them.
            let back = ready
                .drain(..)
                .filter(|j| !j.was_sending)
                .map(|j| RowUpdate::Pending { line: j.line })
                .collect();
            hold(&mut held, &mut held_since, ToCoordinator::Rows(back));
        }
        let want_rows = ready.is_empty() && !rows.exhausted && !stopped && jobs.is_some();
        if !want_rows && ready.is_empty() && jobs.is_some() {
            // Nothing more to hand out: workers end once the queue is empty.
            jobs = None;
        }
        while held.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(m) => hold(&mut held, &mut held_since, m),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    reports_open = false;
                    break;
                }
            }
        }
        // Group commit: a transaction costs far more than a row, so reports
        // wait a little for company, unless somebody waits on them or rows
        // are to be marked anyway.
        let commit_now = want_rows
            || held.len() >= GROUP_COMMIT_MAX
            || held.iter().any(ToCoordinator::awaited)
            || (!held.is_empty() && !reports_open)
            || held_since.is_some_and(|t| t.elapsed() >= GROUP_COMMIT_WINDOW);
        if !commit_now {
            if !reports_open && held.is_empty() {
                break;
            }
            let deadline = held_since.map(|t| t + GROUP_COMMIT_WINDOW);
            let tx = jobs.as_ref();
            tokio::select! {
                m = rx.recv(), if reports_open => match m {
                    Some(m) => hold(&mut held, &mut held_since, m),
                    None => reports_open = false,
                },
                // Room in the queue for rows already committed.
                Ok(permit) = async { tx.unwrap().reserve().await }, if tx.is_some() && !ready.is_empty() => {
                    permit.send(next_chunk(&mut ready));
                }
                () = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {}
                () = stop.wait(), if !stopped && !ready.is_empty() => {}
                // While every worker waits (a pause), the display still
                // hears how things stand.
                () = tokio::time::sleep(PROGRESS_TICK) => progress.finished(0),
            }
            continue;
        }

        ck.begin()?;
        let mut acks = Vec::new();
        // Every worker's reports in one go, so done rows share statements.
        // Their order across workers does not matter: each row has one
        // worker, and a row's intent is committed before its call.
        let mut updates = Vec::new();
        for m in held.drain(..) {
            match m {
                ToCoordinator::Intend(line, intent, detail, ack) => {
                    ck.apply(
                        run,
                        &RowUpdate::Sending {
                            line,
                            intent,
                            detail,
                        },
                    )?;
                    acks.push(ack);
                }
                ToCoordinator::Rows(rows) => updates.extend(rows),
            }
        }
        ck.apply_all(run, &updates)?;
        let mut finished = updates
            .iter()
            .filter(|u| {
                matches!(
                    u,
                    RowUpdate::Done { .. } | RowUpdate::Rejected { .. } | RowUpdate::Skipped { .. }
                )
            })
            .count() as u64;
        held_since = None;
        if want_rows {
            let batch = rows.next_batch(&ck, DISPATCH_BATCH)?;
            ck.apply_all(run, &batch.invalid)?;
            finished += batch.invalid.len() as u64;
            if rows.plan_too {
                let op = &rows.op;
                let plan: Vec<_> = batch
                    .jobs
                    .iter()
                    .map(|j| (j.line, op.key(&j.row), j.durable))
                    .collect();
                let firsts = ck.plan_sending_all(run, &plan)?;
                drop(plan);
                for (job, first) in batch.jobs.into_iter().zip(firsts) {
                    match first {
                        Some(first) => {
                            let message = duplicate_message(op.key_name(), op.key(&job.row), first);
                            ck.apply(
                                run,
                                &RowUpdate::Rejected {
                                    line: job.line,
                                    class: "validation",
                                    http_status: None,
                                    message,
                                    raw: Some(cells_json(&job.raw)),
                                },
                            )?;
                            finished += 1;
                        }
                        None => ready.push_back(job),
                    }
                }
            } else if rows.sorted.is_some() {
                // Lines out of order: one statement a row.
                for j in &batch.jobs {
                    ck.apply(
                        run,
                        &RowUpdate::Dispatched {
                            from: j.line,
                            to: j.line,
                            intent: j.durable,
                        },
                    )?;
                }
                ready.extend(batch.jobs);
            } else {
                // The batch holds every open row between its first and last
                // line: one statement per run of equal intents.
                let marks: Vec<_> = batch.jobs.iter().map(|j| (j.line, j.durable)).collect();
                for same in marks.chunk_by(|a, b| a.1 == b.1) {
                    let (from, to) = (same[0].0, same[same.len() - 1].0);
                    let intent = same[0].1;
                    ck.apply(run, &RowUpdate::Dispatched { from, to, intent })?;
                }
                ready.extend(batch.jobs);
            }
        }
        ck.commit()?;
        for a in acks {
            let _ = a.send(());
        }
        if finished > 0 {
            progress.finished(finished);
        }
        // The transaction ran on a runtime thread: let its other tasks in.
        tokio::task::yield_now().await;
    }
    drop(background);
    ck.checkpoint_on_commit()?;
    Ok((ck, rows.exhausted))
}

/// The next chunk a worker takes.
fn next_chunk<R>(ready: &mut std::collections::VecDeque<Job<R>>) -> Vec<Job<R>> {
    let n = WORK_CHUNK.min(ready.len());
    ready.drain(..n).collect()
}
