//! One rate limiter shared by every worker of a run.
//!
//! Each endpoint class has a quota of N requests per period P. The server's
//! window semantics are unknown (fixed or sliding), so requests are spaced
//! evenly, one every P/N plus a 1% margin, with no burst: no interval of
//! length P can ever hold more than N of them, and the steady rate is 99% of
//! the quota. The margin absorbs network jitter, which can bunch requests that
//! left evenly spaced, since the server counts arrivals.
//!
//! Each waiter *reserves* its slot on a fixed grid (a GCRA whose theoretical
//! arrival time advances by the spacing per request) and then sleeps until
//! it. governor was tried first: its waiters race for the next cell, so each
//! late wake-up pushes every later slot back, and with 8 workers at a 10 ms
//! spacing that lost 4.4% of the quota (57.4 of 60). Reserving keeps the
//! slots on the grid whatever the scheduler does.
//!
//! A throttled answer (429 or 503) slows the class for every worker at once:
//! the class pauses for the server's `Retry-After` (or a backoff), and its
//! spacing is doubled, up to 16 times. After a full quota's worth of
//! successes at a slowed rate, the spacing halves again, step by step.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The fraction of a quota the limiter aims at: leaves ~1% for jitter.
const UTILISATION_TARGET: f64 = 0.99;
/// How close to its slot a waiter leaves tokio's timer for a precise sleep.
const PRECISE_WINDOW: Duration = Duration::from_millis(2);
/// The slowest a class gets after repeated throttling, as a multiple of its
/// normal spacing.
const MAX_SLOWDOWN: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RateClass {
    /// Testers list, per project.
    TestersList,
    /// Testers list, all projects of the company together.
    AccountList,
    RewardsList,
    PointsList,
    /// Projects list and show.
    Betas,
    /// Every write; no documented limit, so no quota unless given.
    Writes,
    /// Reads with no documented limit (show a user, suppressions list).
    Other,
}

impl RateClass {
    pub const ALL: [RateClass; 7] = [
        RateClass::TestersList,
        RateClass::AccountList,
        RateClass::RewardsList,
        RateClass::PointsList,
        RateClass::Betas,
        RateClass::Writes,
        RateClass::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RateClass::TestersList => "testers-list",
            RateClass::AccountList => "account-list",
            RateClass::RewardsList => "rewards-list",
            RateClass::PointsList => "points-list",
            RateClass::Betas => "betas",
            RateClass::Writes => "writes",
            RateClass::Other => "other",
        }
    }

    /// The documented limit, where there is one.
    pub fn default_quota(self) -> Option<Quota> {
        let q = |n, secs| Some(Quota::new(n, Duration::from_secs(secs)));
        match self {
            RateClass::TestersList => q(60, 60),
            RateClass::AccountList => q(180, 60),
            RateClass::RewardsList | RateClass::PointsList => q(60, 60),
            RateClass::Betas => q(90, 15 * 60),
            RateClass::Writes | RateClass::Other => None,
        }
    }

    /// Whether the quota counts per project (the key's scope) or per company.
    fn per_project(self) -> bool {
        matches!(self, RateClass::TestersList)
    }
}

impl FromStr for RateClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RateClass::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = RateClass::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown rate class {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// N requests per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub count: u32,
    pub period: Duration,
}

impl Quota {
    pub fn new(count: u32, period: Duration) -> Quota {
        Quota { count, period }
    }

    /// The spacing between two requests at the target utilisation.
    pub fn spacing(&self) -> Duration {
        self.period
            .div_f64(f64::from(self.count.max(1)) * UTILISATION_TARGET)
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.count,
            humantime::format_duration(self.period)
        )
    }
}

/// A `--rate CLASS=N/PERIOD` override, e.g. `testers-list=60/1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateOverride {
    pub class: RateClass,
    pub quota: Quota,
}

impl FromStr for RateOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            || format!("invalid --rate {s:?}: expected CLASS=N/PERIOD, e.g. testers-list=60/1m");
        let (class, rest) = s.split_once('=').ok_or_else(usage)?;
        let class: RateClass = class.trim().parse()?;
        let quota: Quota = rest
            .parse()
            .map_err(|e| format!("invalid --rate {s:?}: {e}"))?;
        Ok(RateOverride { class, quota })
    }
}

/// `N/PERIOD`, e.g. `60/1m`.
impl FromStr for Quota {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || "expected N/PERIOD, e.g. 60/1m".to_string();
        let (count, period) = s.split_once('/').ok_or_else(usage)?;
        let count: u32 = count.trim().parse().map_err(|_| usage())?;
        if count == 0 {
            return Err("the count must be at least 1".into());
        }
        let period = parse_period(period.trim()).ok_or_else(usage)?;
        Ok(Quota::new(count, period))
    }
}

/// `15m`, `1s`, `2h`, `0.5s`, or a bare unit (`m` = `1m`).
fn parse_period(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let secs = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        _ => return None,
    };
    let num = &s[..s.len() - 1];
    let n: f64 = if num.is_empty() {
        1.0
    } else {
        num.parse().ok()?
    };
    (n > 0.0 && n.is_finite()).then(|| Duration::from_secs_f64(n * secs))
}

/// One class's gate (for one project, or the whole company).
struct Gate {
    quota: Option<Quota>,
    state: Mutex<GateState>,
}

struct GateState {
    /// The next free slot on the grid.
    next_slot: Option<Instant>,
    slowdown: u32,
    paused_until: Option<Instant>,
    successes: u32,
}

impl Gate {
    fn new(quota: Option<Quota>) -> Gate {
        Gate {
            quota,
            state: Mutex::new(GateState {
                next_slot: None,
                slowdown: 1,
                paused_until: None,
                successes: 0,
            }),
        }
    }

    /// Reserves the next slot and returns when it is due.
    fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        let mut slot = now;
        if let Some(p) = st.paused_until {
            slot = slot.max(p);
        }
        if let Some(q) = self.quota {
            if let Some(n) = st.next_slot {
                slot = slot.max(n);
            }
            st.next_slot = Some(slot + q.spacing() * st.slowdown);
        }
        slot
    }

    async fn acquire(&self) {
        let slot = self.reserve();
        let wait = slot.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return;
        }
        // tokio's timers fire on millisecond ticks, up to a tick late; at
        // short spacings (a sandbox at 60x) that skews requests by several
        // percent of the spacing. Sleep on tokio to just short of the slot,
        // then the rest on a blocking thread, precise to tens of microseconds.
        if wait > PRECISE_WINDOW {
            tokio::time::sleep_until(slot - PRECISE_WINDOW).await;
        }
        let rest = slot.saturating_duration_since(Instant::now());
        if !rest.is_zero() {
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
        }
    }

    fn on_throttled(&self, pause: Duration) {
        let mut st = self.state.lock().unwrap();
        let until = Instant::now() + pause;
        if st.paused_until.is_none_or(|p| p < until) {
            st.paused_until = Some(until);
        }
        // Slots already handed out before the pause move behind it.
        if let Some(n) = st.next_slot {
            st.next_slot = Some(n.max(until));
        }
        st.successes = 0;
        if self.quota.is_some() && st.slowdown < MAX_SLOWDOWN {
            st.slowdown *= 2;
        }
    }

    fn on_success(&self) {
        let mut st = self.state.lock().unwrap();
        if st.slowdown <= 1 {
            return;
        }
        st.successes += 1;
        let enough = self.quota.map_or(10, |q| q.count.clamp(1, 60));
        if st.successes >= enough {
            st.successes = 0;
            st.slowdown /= 2;
        }
    }

    fn slowdown(&self) -> u32 {
        self.state.lock().unwrap().slowdown
    }
}

/// The run's limiter. Cheap to clone; every clone shares the same gates.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    quotas: HashMap<RateClass, Option<Quota>>,
    /// Per class, per scope (the project for per-project classes, else "").
    gates: Mutex<HashMap<RateClass, HashMap<String, Arc<Gate>>>>,
}

impl Limiter {
    pub fn new(overrides: &[RateOverride]) -> Limiter {
        let mut quotas: HashMap<RateClass, Option<Quota>> = RateClass::ALL
            .into_iter()
            .map(|c| (c, c.default_quota()))
            .collect();
        for o in overrides {
            quotas.insert(o.class, Some(o.quota));
        }
        Limiter {
            inner: Arc::new(LimiterInner {
                quotas,
                gates: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn quota(&self, class: RateClass) -> Option<Quota> {
        self.inner.quotas.get(&class).copied().flatten()
    }

    fn gate(&self, class: RateClass, beta: Option<&str>) -> Arc<Gate> {
        let scope = if class.per_project() {
            beta.unwrap_or_default()
        } else {
            ""
        };
        let mut gates = self.inner.gates.lock().unwrap();
        let of_class = gates.entry(class).or_default();
        if let Some(g) = of_class.get(scope) {
            return g.clone();
        }
        let g = Arc::new(Gate::new(self.quota(class)));
        of_class.insert(scope.to_string(), g.clone());
        g
    }

    /// The gates a request of this class passes: a testers list counts
    /// against its project's quota and the company's.
    fn gates_for(&self, class: RateClass, beta: Option<&str>) -> impl Iterator<Item = Arc<Gate>> {
        let also =
            (class == RateClass::TestersList).then(|| self.gate(RateClass::AccountList, beta));
        std::iter::once(self.gate(class, beta)).chain(also)
    }

    /// Waits until a request of this class may be sent.
    pub async fn acquire(&self, class: RateClass, beta: Option<&str>) {
        for g in self.gates_for(class, beta) {
            g.acquire().await;
        }
    }

    /// A throttled answer: every worker of this class waits `pause`, then
    /// goes on at a slower rate.
    pub fn throttled(&self, class: RateClass, beta: Option<&str>, pause: Duration) {
        for g in self.gates_for(class, beta) {
            g.on_throttled(pause);
        }
    }

    pub fn succeeded(&self, class: RateClass, beta: Option<&str>) {
        for g in self.gates_for(class, beta) {
            g.on_success();
        }
    }

    /// How much slower than its quota the class runs now (1 = full speed).
    pub fn slowdown(&self, class: RateClass, beta: Option<&str>) -> u32 {
        self.gate(class, beta).slowdown()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_overrides() {
        let o: RateOverride = "testers-list=60/1m".parse().unwrap();
        assert_eq!(o.class, RateClass::TestersList);
        assert_eq!(o.quota, Quota::new(60, Duration::from_secs(60)));
        let o: RateOverride = "betas=90/15m".parse().unwrap();
        assert_eq!(o.quota.period, Duration::from_secs(900));
        let o: RateOverride = "writes=20/1s".parse().unwrap();
        assert_eq!(o.quota, Quota::new(20, Duration::from_secs(1)));
        assert!("writes=0/1s".parse::<RateOverride>().is_err());
        assert!(
            "nope=1/1s"
                .parse::<RateOverride>()
                .unwrap_err()
                .contains("testers-list")
        );
        assert!("writes=1/1d".parse::<RateOverride>().is_err());
        assert!("writes=1".parse::<RateOverride>().is_err());
    }

    /// The slots handed out: never more than the quota in any window, and
    /// 99% of it in steady state. Checked on the reservations themselves,
    /// which are what the limiter guarantees; wake-up times add scheduler
    /// noise that the 1% margin absorbs (the sandbox test measures arrivals).
    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_quota_in_any_window_and_uses_97_percent() {
        let limiter = Limiter::new(&["testers-list=60/1m".parse().unwrap()]);
        let gate = limiter.gate(RateClass::TestersList, Some("1"));
        let start = Instant::now();
        let mut slots: Vec<Duration> = (0..200).map(|_| gate.reserve() - start).collect();
        slots.sort();
        let window = Duration::from_secs(60);
        for (i, t) in slots.iter().enumerate() {
            let inside = slots[i..].iter().take_while(|u| **u < *t + window).count();
            assert!(
                inside <= 60,
                "{inside} requests in the window from slot {i}"
            );
        }
        let rate = 199.0 / (slots[199] - slots[0]).as_secs_f64() * 60.0;
        assert!(
            (0.97 * 60.0..=60.0).contains(&rate),
            "steady rate {rate}/min"
        );
        assert_eq!(slots[0], Duration::ZERO, "the first request goes at once");
    }

    /// Eight workers on real time share one gate: each acquire returns close
    /// to its slot, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_share_the_gate() {
        let limiter = Limiter::new(&[
            "testers-list=60/0.6s".parse().unwrap(),
            "account-list=1000/1s".parse().unwrap(),
        ]);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let l = limiter.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    l.acquire(RateClass::TestersList, Some("1")).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // 80 requests at one per 10.1 ms: the 80th slot is at 798 ms.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(795), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_pauses_every_worker_and_recovers() {
        let limiter = Limiter::new(&["testers-list=60/1s".parse().unwrap()]);
        limiter.acquire(RateClass::TestersList, Some("1")).await;
        limiter.throttled(RateClass::TestersList, Some("1"), Duration::from_secs(5));
        assert_eq!(limiter.slowdown(RateClass::TestersList, Some("1")), 2);
        let before = Instant::now();
        limiter.acquire(RateClass::TestersList, Some("1")).await;
        assert!(Instant::now() - before >= Duration::from_millis(4_990));
        for _ in 0..60 {
            limiter.succeeded(RateClass::TestersList, Some("1"));
        }
        assert_eq!(limiter.slowdown(RateClass::TestersList, Some("1")), 1);
        // Another project is not affected.
        assert_eq!(limiter.slowdown(RateClass::TestersList, Some("2")), 1);
    }
}
