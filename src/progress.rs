//! The displays of a run's progress: a bar on a terminal, a log line every
//! few seconds otherwise, or nothing; the CLI picks one. Each is a
//! subscriber of the engine's events (any [`Progress`] is): it shows
//! [`Event::Progress`] and clears itself when the run ends.

use std::sync::Mutex;

use crate::engine::events::{Event, Subscriber};
use std::time::{Duration, Instant};

/// A view of a running job.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub done: u64,
    pub total: u64,
    /// What is counted ("rows", "users", "pages").
    pub unit: &'static str,
    pub elapsed: Duration,
    /// Time spent waiting on the rate limiter, summed over workers.
    pub limiter_wait: Duration,
    pub throttled: u64,
    /// Seconds left, when it can be told (it accounts for the rate limit).
    pub eta: Option<Duration>,
    /// Records done alongside (users when exporting pages of users), and
    /// their total when the server tells it.
    pub items: Option<Items>,
}

#[derive(Debug, Clone, Copy)]
pub struct Items {
    pub done: u64,
    pub total: Option<u64>,
    /// The total is an upper bound (pages × page size): the server did not
    /// say how many records there are.
    pub approximate: bool,
    pub unit: &'static str,
}

impl Items {
    fn describe(&self) -> String {
        match self.total {
            Some(t) => format!(
                "{} {} of {}{}",
                self.unit,
                self.done,
                if self.approximate { "at most " } else { "" },
                t.max(self.done)
            ),
            None => format!("{} {}", self.unit, self.done),
        }
    }
}

impl Snapshot {
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.done as f64 / s } else { 0.0 }
    }
}

/// A display of progress.
pub trait Progress: Send + Sync {
    fn update(&self, s: &Snapshot);
    fn finish(&self) {}
}

impl<P: Progress + ?Sized> Subscriber for P {
    fn event(&self, e: &Event<'_>) -> anyhow::Result<()> {
        match e {
            Event::Progress(s) => self.update(s),
            Event::Finished { .. } | Event::ExportFinished => self.finish(),
            Event::Started { .. } => {}
        }
        Ok(())
    }
}

/// Reports nothing (`--quiet`, tests).
pub struct Silent;

impl Progress for Silent {
    fn update(&self, _: &Snapshot) {}
}

/// A log line every `every` (stderr is not a terminal: cron, CI).
pub struct LogLines {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogLines {
    pub fn new(every: Duration) -> LogLines {
        LogLines {
            every,
            last: Mutex::new(None),
        }
    }
}

impl Progress for LogLines {
    fn update(&self, s: &Snapshot) {
        let mut last = self.last.lock().unwrap();
        if last.is_some_and(|l| l.elapsed() < self.every) {
            return;
        }
        *last = Some(Instant::now());
        let items = s.items.map(|i| i.describe());
        tracing::info!(
            items,
            done = s.done,
            total = s.total,
            rate = format!("{:.1}/s", s.rate()),
            limiter_wait_s = s.limiter_wait.as_secs(),
            throttled = s.throttled,
            eta_s = s.eta.map(|d| d.as_secs()),
            "{} {} of {}{}",
            s.unit,
            s.done,
            s.total,
            s.items
                .map(|i| format!(", {}", i.describe()))
                .unwrap_or_default()
        );
    }
}

/// An indicatif bar (stderr is a terminal).
pub struct Bar {
    bar: indicatif::ProgressBar,
}

impl Bar {
    pub fn new() -> Bar {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .expect("the template is valid"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar { bar }
    }
}

impl Default for Bar {
    fn default() -> Self {
        Bar::new()
    }
}

impl Progress for Bar {
    fn update(&self, s: &Snapshot) {
        self.bar.set_length(s.total);
        self.bar.set_position(s.done);
        let eta = s
            .eta
            .map(|d| {
                format!(
                    ", ETA {}",
                    humantime::format_duration(Duration::from_secs(d.as_secs()))
                )
            })
            .unwrap_or_default();
        let items = s
            .items
            .map(|i| format!(" · {}", i.describe()))
            .unwrap_or_default();
        self.bar.set_message(format!(
            "{}{items} · {:.1}/s · waited on rate limit {}s · throttled {}{eta}",
            s.unit,
            s.rate(),
            s.limiter_wait.as_secs(),
            s.throttled
        ));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
