//! The displays of a run's progress: a bar on a terminal, a log line every
//! few seconds otherwise, or nothing; the CLI picks one. Each is a
//! subscriber of the engine's events (any [`Progress`] is): it shows
//! [`Event::Progress`] and clears itself when the run ends.
//!
//! What they show is honest about the present: the rate is the recent one
//! (a sliding window, [`RATE_WINDOW`]), not an average over the whole run;
//! the rate-limit wait is wall-clock time (the limiter's); the limiter's
//! current state ("paused 20s: throttled", "rate halved") is shown while it
//! lasts; each phase (listing, sending, exporting) has its own bar, which
//! appears with the phase's first figures (never an empty `0/0`), and a
//! bar's line fits 80 columns.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::engine::events::{Event, Subscriber};

/// How far back the rate looks: long enough to smooth a pause of a few
/// seconds, short enough to follow a change of pace (listing, then
/// sending) within half a minute.
pub const RATE_WINDOW: Duration = Duration::from_secs(20);

/// The width a bar's line keeps within.
pub const LINE_WIDTH: usize = 80;
/// The bar itself, in columns.
const BAR_WIDTH: usize = 12;

/// A view of a running phase, as its producer knows it. The displays
/// derive the rate and the ETA from successive snapshots.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The phase: `listing`, `sending`, `exporting`. Each has its own bar
    /// and its own rate.
    pub phase: &'static str,
    pub done: u64,
    /// 0 when not known yet.
    pub total: u64,
    /// What is counted ("rows", "users", "pages").
    pub unit: &'static str,
    /// Since the run started.
    pub elapsed: Duration,
    /// Wall-clock time during which at least one worker waited on the
    /// rate limiter (not summed over workers).
    pub limiter_wait: Duration,
    pub throttled: u64,
    /// What slows the run now, from the limiter ("paused 20s: throttled",
    /// "rate halved").
    pub state: Option<String>,
    /// The most units a second the rate limit allows, when a limit bounds
    /// the phase: the ETA never assumes more.
    pub ceiling: Option<f64>,
    /// Records done alongside (users when listing pages of users), and
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
    /// `users 300 of 23300` (for the log).
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

    /// `300/≤23300 users` (for the bar).
    fn short(&self) -> String {
        match self.total {
            Some(t) => format!(
                "{}/{}{} {}",
                self.done,
                if self.approximate { "≤" } else { "" },
                t.max(self.done),
                self.unit
            ),
            None => format!("{} {}", self.done, self.unit),
        }
    }
}

/// The rate over the last [`RATE_WINDOW`] (or since the phase began, when
/// it began more recently).
#[derive(Debug, Clone)]
pub struct RecentRate {
    window: Duration,
    /// (time, done), oldest first; the first is at or before the window's
    /// start, so the rate spans the whole window.
    samples: VecDeque<(Duration, u64)>,
}

impl RecentRate {
    pub fn new(window: Duration) -> RecentRate {
        RecentRate {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records `done` at `at` (time since any fixed start) and returns the
    /// rate, per second, over the window.
    pub fn record(&mut self, at: Duration, done: u64) -> f64 {
        self.samples.push_back((at, done));
        let start = at.saturating_sub(self.window);
        while self.samples.len() > 2 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
        let (t0, d0) = self.samples[0];
        let span = at.saturating_sub(t0).as_secs_f64();
        if span < 0.001 {
            return 0.0;
        }
        done.saturating_sub(d0) as f64 / span
    }
}

/// When the rest will be done at `rate`, never faster than `ceiling`.
pub fn eta(left: u64, rate: f64, ceiling: Option<f64>) -> Option<Duration> {
    let pace = match ceiling {
        Some(c) if rate > 0.0 => rate.min(c),
        Some(c) => c,
        None => rate,
    };
    (pace > 0.0).then(|| Duration::from_secs_f64(left as f64 / pace))
}

/// A display's view of the current phase: its rate, reset when a new
/// phase begins.
struct Pace {
    phase: &'static str,
    rate: RecentRate,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            phase: "",
            rate: RecentRate::new(RATE_WINDOW),
        }
    }

    /// The recent rate and the ETA; whether a new phase began.
    fn see(&mut self, s: &Snapshot) -> (f64, Option<Duration>, bool) {
        let new_phase = self.phase != s.phase;
        if new_phase {
            self.phase = s.phase;
            self.rate = RecentRate::new(RATE_WINDOW);
        }
        let rate = self.rate.record(s.elapsed, s.done);
        let eta = (s.total > 0)
            .then(|| eta(s.total.saturating_sub(s.done), rate, s.ceiling))
            .flatten();
        (rate, eta, new_phase)
    }
}

/// `1h05m`, `15m20s`, `42s`.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn short_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}/s")
    } else if r >= 10.0 {
        format!("{r:.1}/s")
    } else {
        format!("{r:.2}/s")
    }
}

/// The text beside the bar, within `width` columns: the counts always,
/// then, as room allows, the limiter's state, the ETA, the records, the
/// rate, the wait and the throttle count.
fn bar_message(s: &Snapshot, rate: f64, eta: Option<Duration>, width: usize) -> String {
    let counts = if s.total > 0 {
        format!("{}/{} {}", s.done, s.total.max(s.done), s.unit)
    } else {
        format!("{} {}", s.done, s.unit)
    };
    let mut parts: Vec<(usize, String)> = vec![(0, counts)];
    let mut add = |rank: usize, p: Option<String>| {
        if let Some(p) = p {
            parts.push((rank, p));
        }
    };
    // Ranked by what matters most; shown in the order of `rank`.
    add(5, s.state.clone());
    add(2, Some(short_rate(rate)));
    add(3, eta.map(|d| format!("ETA {}", short_duration(d))));
    add(1, s.items.map(|i| i.short()));
    add(
        6,
        (!s.limiter_wait.is_zero()).then(|| format!("waited {}", short_duration(s.limiter_wait))),
    );
    add(
        7,
        (s.throttled > 0).then(|| format!("throttled {}", s.throttled)),
    );
    let priority = [0, 5, 3, 1, 2, 6, 7];
    let mut kept: Vec<&(usize, String)> = Vec::new();
    let mut used = 0;
    for rank in priority {
        if let Some(p) = parts.iter().find(|(r, _)| *r == rank) {
            let cost = p.1.chars().count() + if kept.is_empty() { 0 } else { 3 };
            if used + cost <= width {
                used += cost;
                kept.push(p);
            }
        }
    }
    kept.sort_by_key(|(r, _)| *r);
    kept.iter()
        .map(|(_, p)| p.as_str())
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Room for the message on a bar's line of [`LINE_WIDTH`]: the line is
/// `PHASE BAR MESSAGE`.
fn message_width(phase: &str) -> usize {
    LINE_WIDTH.saturating_sub(phase.chars().count() + 1 + BAR_WIDTH + 1)
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

/// A log line every `every` (stderr is not a terminal: cron, CI), and one
/// at once when a phase begins.
pub struct LogLines {
    every: Duration,
    state: Mutex<(Option<Instant>, Pace)>,
}

impl LogLines {
    pub fn new(every: Duration) -> LogLines {
        LogLines {
            every,
            state: Mutex::new((None, Pace::new())),
        }
    }
}

impl Progress for LogLines {
    fn update(&self, s: &Snapshot) {
        let mut st = self.state.lock().unwrap();
        let (rate, eta, new_phase) = st.1.see(s);
        if !new_phase && st.0.is_some_and(|l| l.elapsed() < self.every) {
            return;
        }
        st.0 = Some(Instant::now());
        let items = s.items.map(|i| i.describe());
        tracing::info!(
            phase = s.phase,
            items,
            done = s.done,
            total = s.total,
            rate = format!("{rate:.2}/s"),
            limiter_wait_s = s.limiter_wait.as_secs(),
            throttled = s.throttled,
            state = s.state.as_deref(),
            eta_s = eta.map(|d| d.as_secs()),
            "{}: {} {} of {}{}{}",
            s.phase,
            s.unit,
            s.done,
            if s.total > 0 {
                s.total.to_string()
            } else {
                "?".into()
            },
            s.items
                .map(|i| format!(", {}", i.describe()))
                .unwrap_or_default(),
            s.state
                .as_deref()
                .map(|st| format!(" ({st})"))
                .unwrap_or_default()
        );
    }
}

/// An indicatif bar (stderr is a terminal), one per phase. No bar shows
/// before a phase's first figures.
pub struct Bar {
    state: Mutex<(Option<indicatif::ProgressBar>, Pace)>,
}

impl Bar {
    pub fn new() -> Bar {
        Bar {
            state: Mutex::new((None, Pace::new())),
        }
    }

    fn style(known_total: bool) -> indicatif::ProgressStyle {
        let t = if known_total {
            "{prefix} {bar:12} {msg}"
        } else {
            // The bar's place, with a spinner instead of a 0/0 bar.
            "{prefix} {spinner:<12} {msg}"
        };
        indicatif::ProgressStyle::with_template(t).expect("the template is valid")
    }
}

impl Default for Bar {
    fn default() -> Self {
        Bar::new()
    }
}

impl Progress for Bar {
    fn update(&self, s: &Snapshot) {
        let mut st = self.state.lock().unwrap();
        let (rate, eta, new_phase) = st.1.see(s);
        if new_phase && let Some(old) = st.0.take() {
            old.finish_and_clear();
        }
        let bar = st.0.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(s.total);
            bar.set_style(Bar::style(s.total > 0));
            bar.set_prefix(s.phase);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        if s.total > 0 && bar.length() == Some(0) {
            bar.set_style(Bar::style(true));
        }
        bar.set_length(s.total.max(s.done));
        bar.set_position(s.done);
        bar.set_message(bar_message(s, rate, eta, message_width(s.phase)));
    }

    fn finish(&self) {
        if let Some(bar) = self.state.lock().unwrap().0.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// The rate follows the recent pace: after a slow minute (listing, 1/s)
    /// then fast sending (150/s), it shows ~150/s once the window has
    /// passed, where the average over the run would say ~60/s.
    #[test]
    fn the_rate_is_over_the_recent_window() {
        let mut r = RecentRate::new(RATE_WINDOW);
        let mut done = 0;
        let mut rate = 0.0;
        for t in 0..=60 {
            done += 1;
            rate = r.record(secs(t as f64), done);
        }
        assert!((rate - 1.0).abs() < 0.01, "{rate}");
        for t in 61..=120 {
            done += 150;
            rate = r.record(secs(t as f64), done);
        }
        assert!((rate - 150.0).abs() < 0.01, "{rate}");
        let average = done as f64 / 120.0;
        assert!(average < 80.0, "the run's average: {average}");
        // Nothing done for a while: the rate falls to 0 within the window.
        for t in 121..=141 {
            rate = r.record(secs(t as f64), done);
        }
        assert_eq!(rate, 0.0);
        // Samples closer together than the window keep the window's span.
        let mut r = RecentRate::new(secs(10.0));
        for i in 0..1000 {
            rate = r.record(secs(i as f64 * 0.1), i * 5);
        }
        assert!((rate - 50.0).abs() < 0.01, "{rate}");
        assert!(r.samples.len() <= 102, "{} samples kept", r.samples.len());
    }

    #[test]
    fn the_eta_never_assumes_more_than_the_limit() {
        assert_eq!(eta(100, 10.0, None), Some(secs(10.0)));
        assert_eq!(eta(100, 10.0, Some(1.0)), Some(secs(100.0)));
        assert_eq!(eta(100, 0.0, Some(2.0)), Some(secs(50.0)));
        assert_eq!(eta(100, 0.0, None), None);
    }

    /// The line drawn for `s` at `rate`.
    fn line(s: &Snapshot, rate: f64) -> String {
        let eta = eta(s.total - s.done, rate, s.ceiling);
        let msg = bar_message(s, rate, eta, message_width(s.phase));
        // What indicatif draws: the prefix, the bar, the message.
        format!("{} {} {}", s.phase, "#".repeat(BAR_WIDTH), msg)
    }

    /// A bar's line fits 80 columns with the longest realistic figures,
    /// and keeps what matters most: the counts and the limiter's state.
    #[test]
    fn a_bar_fits_80_columns() {
        let export = Snapshot {
            phase: "exporting",
            done: 99_999,
            total: 100_000,
            unit: "pages",
            elapsed: secs(360_000.0),
            limiter_wait: secs(350_000.0),
            throttled: 1_234,
            state: Some("paused 120s: throttled".into()),
            ceiling: Some(1.0),
            items: Some(Items {
                done: 2_499_975,
                total: Some(2_500_000),
                approximate: true,
                unit: "users",
            }),
        };
        let listing = Snapshot {
            phase: "listing",
            done: 400,
            total: 932,
            unit: "pages",
            elapsed: secs(400.0),
            limiter_wait: secs(390.0),
            throttled: 2,
            state: Some("rate 1/16".into()),
            ceiling: Some(1.0),
            items: Some(Items {
                done: 10_000,
                total: Some(23_300),
                approximate: false,
                unit: "users",
            }),
        };
        let sending = Snapshot {
            phase: "sending",
            done: 1_234_567,
            total: 10_000_000,
            unit: "rows",
            elapsed: secs(7_000.0),
            limiter_wait: secs(12.0),
            throttled: 0,
            state: None,
            ceiling: None,
            items: None,
        };
        for s in [&export, &listing, &sending] {
            // A slow rate: the longest ETA.
            let l = line(s, 0.98);
            assert!(
                l.chars().count() <= LINE_WIDTH,
                "{} columns: {l}",
                l.chars().count()
            );
            assert!(l.contains(&format!("{}/", s.done)), "{l}");
            if let Some(st) = &s.state {
                assert!(l.contains(st.as_str()), "{l}");
            }
        }
        // With room, everything shows.
        let l = line(
            &Snapshot {
                done: 12_345,
                total: 100_000,
                ..sending.clone()
            },
            151.0,
        );
        assert_eq!(
            l,
            "sending ############ 12345/100000 rows · 151/s · ETA 9m40s · waited 12s"
        );
        let l = line(&listing, 0.98);
        assert!(l.contains("10000/23300 users"), "{l}");
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(secs(42.4)), "42s");
        assert_eq!(short_duration(secs(920.0)), "15m20s");
        assert_eq!(short_duration(secs(3_900.0)), "1h05m");
    }
}
