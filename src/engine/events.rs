//! What a run tells the world, as one stream of typed events; the bar, the
//! log lines, the summary JSON and the CSV reports are subscribers. The
//! engine and the export never print and never poll: they send events.

use std::path::PathBuf;
use std::sync::Arc;

use super::RunSummary;
use super::report::RunRecords;
use crate::progress::Snapshot;

/// One thing that happened in a run.
pub enum Event<'a> {
    /// The rows to do are known.
    Started {
        kind: &'a str,
        run: i64,
        total: u64,
        /// Rows finished by earlier runs of a resumed run.
        done: u64,
        resumed: bool,
    },
    /// Where the run stands (sent at most a few times a second).
    Progress(&'a Snapshot),
    /// The run ended: its summary, and its records for the reports.
    Finished {
        summary: &'a RunSummary,
        records: &'a RunRecords<'a>,
    },
    /// An export ended (it has no rows of its own to report).
    ExportFinished,
}

/// Something that turns events into output. A subscriber that fails (a
/// report that cannot be written) fails the run; a display should not.
pub trait Subscriber: Send + Sync {
    fn event(&self, e: &Event<'_>) -> anyhow::Result<()>;
}

/// The subscribers of one run, each sent every event in order.
#[derive(Clone, Default)]
pub struct Subscribers(Vec<Arc<dyn Subscriber>>);

impl Subscribers {
    pub fn new(list: Vec<Arc<dyn Subscriber>>) -> Subscribers {
        Subscribers(list)
    }

    /// What every run of a row-by-row operation has: the display, the
    /// reports (errors and results), and the summary JSON when asked.
    pub fn standard(
        progress: Arc<dyn Subscriber>,
        excel_safe: bool,
        summary_json: Option<&std::path::Path>,
    ) -> Subscribers {
        let s = Subscribers::default()
            .with(progress)
            .with(Arc::new(super::report::Reports { excel_safe }));
        match summary_json {
            Some(p) => s.with(Arc::new(SummaryJson(p.to_path_buf()))),
            None => s,
        }
    }

    pub fn with(mut self, s: Arc<dyn Subscriber>) -> Subscribers {
        self.0.push(s);
        self
    }

    /// Sends `e` to every subscriber; the first failure is returned, after
    /// every subscriber has had the event.
    pub fn send(&self, e: &Event<'_>) -> anyhow::Result<()> {
        let mut first = Ok(());
        for s in &self.0 {
            if let Err(err) = s.event(e)
                && first.is_ok()
            {
                first = Err(err);
            }
        }
        first
    }
}

/// Writes the run's summary as JSON when it ends.
pub struct SummaryJson(pub PathBuf);

impl Subscriber for SummaryJson {
    fn event(&self, e: &Event<'_>) -> anyhow::Result<()> {
        if let Event::Finished { summary, .. } = e {
            crate::output::write_json(&self.0, summary)?;
        }
        Ok(())
    }
}
