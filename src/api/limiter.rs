//! One rate limiter shared by every worker of a run.
//!
//! Each endpoint class has a quota of N requests per period P. The server's
//! window semantics are unknown (fixed or sliding), so the pacing must hold
//! in *any* window of length P: never more than N requests in it.
//!
//! The pacing is governor's GCRA, with each request costing M cells
//! ([`CELLS_PER_REQUEST`]) and a burst of M + j cells (j spare cells). With
//! M·N − j cells per period (the cell length rounded up), a window of
//! length P holds at most N grants — a full bucket gives M + j cells, the
//! period adds fewer than M·N − j, and N + 1 grants need M·(N + 1) — while
//! a waiter that wakes late loses nothing as long as it is less than j
//! cells late: the spare cells keep what its lateness accrued for the next
//! grant. A burst-1 quota (one cell a request) loses every late wake-up
//! for good instead: 0.977–0.989 of the quota with 8 waiters, measured.
//!
//! That bound is on grants; the server counts arrivals, which network and
//! scheduling jitter bunch. g more cells a period are left unused
//! ([`GUARD`]): N + 1 grants then span more than P by g cells, room for
//! that jitter. The steady rate is 1 − (j + g)/(M·N) of the quota: 0.991.
//! Waiters sleep on tokio's timer, then precisely (see
//! [`sleep_precisely`]); governor runs on tokio's clock, so tests on
//! paused time are exact.
//!
//! A throttled answer (429 or 503) slows the class for every worker at once:
//! the class pauses for the server's `Retry-After` (or a backoff), and its
//! rate is halved, down to 1/16. After a full quota's worth of successes at
//! a slowed rate, the rate doubles again, step by step. governor cannot
//! change a running quota, so each change swaps in a new limiter that starts
//! empty (it grants nothing a window already holds); a grant from the old
//! one that a pause or a swap overtook is not used.
//!
//! The limiter also keeps what a display shows of it: the wall-clock time
//! during which at least one worker waited ([`Limiter::waited`]), and the
//! current state ([`Limiter::condition`]: paused, rate halved).

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::ops::Add;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use tokio::time::Instant;

/// The cells (M) one request costs. Many cells a request let a few spare
/// ones (j) absorb late wake-ups without ever allowing a request more in a
/// window; 100 makes a cell 1% of a request's spacing.
const CELLS_PER_REQUEST: u32 = 100;
/// The spare cells (j), as a fraction of a period's M·N: a waiter may wake
/// up to this much of the period late (4 ms at 60 a second, 240 ms at 60 a
/// minute) and lose nothing.
const SPARE: f64 = 0.004;
/// Cells a period keeps unused (g) so that network jitter bunching the
/// requests' arrivals (5 ms at 60 a second) cannot put N + 1 of them in a
/// window the server counts: the GCRA bound is on grants, and N + 1 late-
/// compensated grants can span exactly P without it.
const GUARD: f64 = 0.005;
/// How close to its grant a waiter leaves tokio's timer (millisecond ticks,
/// up to a tick late) for a precise sleep on a blocking thread.
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

/// An instant on tokio's clock, as governor's clocks measure time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct At(Instant);

impl Add<Nanos> for At {
    type Output = At;
    fn add(self, n: Nanos) -> At {
        At(self.0 + Duration::from(n))
    }
}

impl Reference for At {
    fn duration_since(&self, earlier: At) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }

    fn saturating_sub(&self, d: Nanos) -> At {
        At(self.0.checked_sub(d.into()).unwrap_or(self.0))
    }
}

/// tokio's clock: paused in tests, where sleeps are exact.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl Clock for TokioClock {
    type Instant = At;
    fn now(&self) -> At {
        At(Instant::now())
    }
}

type Gcra = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<At>>;

/// governor's limiter for `quota` slowed `slowdown` times: M cells a
/// request, a burst of M + j, M·N − j − g cells a period. A limiter
/// swapped in starts empty; the first one starts full (the first request
/// goes at once).
fn pacer(quota: Quota, slowdown: u32, empty: bool) -> Gcra {
    let m = u64::from(CELLS_PER_REQUEST);
    let cells = u64::from(quota.count.max(1)) * m;
    let part = |f: f64| (cells as f64 * f).ceil() as u64;
    let spare = part(SPARE).clamp(1, u64::from(u32::MAX - CELLS_PER_REQUEST));
    let per_period = cells.saturating_sub(spare + part(GUARD)).max(1);
    let period = quota.period * slowdown;
    let cell = (period.as_nanos().div_ceil(u128::from(per_period)) as u64).max(1);
    let burst = NonZeroU32::new(CELLS_PER_REQUEST + spare as u32).expect("at least M cells");
    let q = governor::Quota::with_period(Duration::from_nanos(cell))
        .expect("a cell lasts at least a nanosecond")
        .allow_burst(burst);
    let g = Gcra::direct_with_clock(q, TokioClock);
    if empty {
        let _ = g.check_n(burst);
    }
    g
}

/// Sleeps until `until`: on tokio's timer to just short of it, then the
/// rest on a blocking thread, precise to tens of microseconds (a late
/// wake-up eats the spare cells).
async fn sleep_precisely(until: Instant) {
    if until > Instant::now() + PRECISE_WINDOW {
        tokio::time::sleep_until(until - PRECISE_WINDOW).await;
    }
    let rest = until.saturating_duration_since(Instant::now());
    if rest.is_zero() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    // On paused time (tests) a real sleep does not move tokio's clock.
    if Instant::now() < until {
        tokio::time::sleep_until(until).await;
    }
}

/// The wall-clock time during which at least one worker waited: eight
/// workers waiting through the same ten seconds count ten seconds, not
/// eighty.
#[derive(Default)]
pub struct WaitClock {
    state: Mutex<WaitState>,
}

#[derive(Default)]
struct WaitState {
    waiting: u32,
    since: Option<Instant>,
    total: Duration,
}

impl WaitClock {
    /// A wait begins; it ends when the guard is dropped.
    pub fn begin(&self) -> Waiting<'_> {
        let mut st = self.state.lock().unwrap();
        if st.waiting == 0 {
            st.since = Some(Instant::now());
        }
        st.waiting += 1;
        Waiting(self)
    }

    /// The time so far, the wait under way included.
    pub fn total(&self) -> Duration {
        let st = self.state.lock().unwrap();
        st.total + st.since.map_or(Duration::ZERO, |s| s.elapsed())
    }
}

/// A wait under way (see [`WaitClock::begin`]).
pub struct Waiting<'a>(&'a WaitClock);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap();
        st.waiting -= 1;
        if st.waiting == 0
            && let Some(s) = st.since.take()
        {
            st.total += s.elapsed();
        }
    }
}

/// One class's gate (for one project, or the whole company).
struct Gate {
    quota: Option<Quota>,
    state: Mutex<GateState>,
}

struct GateState {
    /// The pacing at the current rate; `None` without a quota.
    pacer: Option<Arc<Gcra>>,
    /// Bumped at each swap of the pacer.
    generation: u64,
    slowdown: u32,
    paused_until: Option<Instant>,
    successes: u32,
}

impl Gate {
    fn new(quota: Option<Quota>) -> Gate {
        Gate {
            quota,
            state: Mutex::new(GateState {
                pacer: quota.map(|q| Arc::new(pacer(q, 1, false))),
                generation: 0,
                slowdown: 1,
                paused_until: None,
                successes: 0,
            }),
        }
    }

    async fn acquire(&self, clock: &WaitClock) {
        let mut waiting = None;
        let cost = NonZeroU32::new(CELLS_PER_REQUEST).expect("nonzero");
        loop {
            let (paused, pacer, generation) = {
                let st = self.state.lock().unwrap();
                (st.paused_until, st.pacer.clone(), st.generation)
            };
            if let Some(p) = paused.filter(|p| *p > Instant::now()) {
                waiting.get_or_insert_with(|| clock.begin());
                tokio::time::sleep_until(p).await;
                continue;
            }
            let Some(pacer) = pacer else { return };
            // governor's `until_n_ready` is this loop on its own timer;
            // here it sleeps on tokio's, the clock the pacer reads, and
            // looks at the gate again after each sleep (a pause, a swap).
            match pacer.check_n(cost) {
                Ok(Ok(())) => {
                    let st = self.state.lock().unwrap();
                    if st.generation == generation
                        && st.paused_until.is_none_or(|p| p <= Instant::now())
                    {
                        return;
                    }
                }
                Ok(Err(not_until)) => {
                    waiting.get_or_insert_with(|| clock.begin());
                    sleep_precisely(not_until.earliest_possible().0).await;
                }
                Err(_) => unreachable!("the burst holds a request's cells"),
            }
        }
    }

    /// Swaps in a pacer at the current slowdown.
    fn repace(&self, st: &mut GateState) {
        if let Some(q) = self.quota {
            st.pacer = Some(Arc::new(pacer(q, st.slowdown, true)));
            st.generation += 1;
        }
    }

    fn on_throttled(&self, pause: Duration) {
        let mut st = self.state.lock().unwrap();
        let until = Instant::now() + pause;
        if st.paused_until.is_none_or(|p| p < until) {
            st.paused_until = Some(until);
        }
        st.successes = 0;
        if self.quota.is_some() && st.slowdown < MAX_SLOWDOWN {
            st.slowdown *= 2;
            self.repace(&mut st);
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
            self.repace(&mut st);
        }
    }

    fn slowdown(&self) -> u32 {
        self.state.lock().unwrap().slowdown
    }

    /// The pause left, and the slowdown.
    fn condition(&self) -> (Duration, u32) {
        let st = self.state.lock().unwrap();
        let left = st.paused_until.map_or(Duration::ZERO, |p| {
            p.saturating_duration_since(Instant::now())
        });
        (left, st.slowdown)
    }
}

/// The run's limiter. Cheap to clone; every clone shares the same gates.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    quotas: HashMap<RateClass, Option<Quota>>,
    waits: WaitClock,
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
                waits: WaitClock::default(),
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
            g.acquire(&self.inner.waits).await;
        }
    }

    /// The wall-clock time during which at least one worker waited on this
    /// limiter (a pause included).
    pub fn waited(&self) -> Duration {
        self.inner.waits.total()
    }

    /// What slows the run now, for a display: `paused 20s: throttled`
    /// while a class is paused, else `rate halved` (or `rate 1/4`, ...)
    /// while one runs slowed; `None` at full speed.
    pub fn condition(&self) -> Option<String> {
        let gates = self.inner.gates.lock().unwrap();
        let (pause, slowdown) = gates
            .values()
            .flat_map(|g| g.values())
            .map(|g| g.condition())
            .fold((Duration::ZERO, 1), |(p, s), (gp, gs)| {
                (p.max(gp), s.max(gs))
            });
        if !pause.is_zero() {
            Some(format!(
                "paused {}s: throttled",
                pause.as_secs_f64().ceil() as u64
            ))
        } else {
            match slowdown {
                1 => None,
                2 => Some("rate halved".into()),
                n => Some(format!("rate 1/{n}")),
            }
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

    /// The grants' times, `n` from each of `workers` sharing `limiter`.
    async fn grants(limiter: &Limiter, workers: usize, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (l, times) = (limiter.clone(), times.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..n {
                    l.acquire(RateClass::TestersList, Some("1")).await;
                    times.lock().unwrap().push(start.elapsed());
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut v = times.lock().unwrap().clone();
        v.sort();
        v
    }

    /// The most grants in any window of length `window`.
    fn max_in_window(times: &[Duration], window: Duration) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|u| **u < times[i] + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// Eight workers share one quota: never more than the quota in any
    /// window, and at least 99% of it in steady state (on paused time, so
    /// exact: the target itself).
    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_quota_in_any_window_and_uses_99_percent() {
        let limiter = Limiter::new(&[
            "testers-list=60/1m".parse().unwrap(),
            "account-list=100000/1s".parse().unwrap(),
        ]);
        let t = grants(&limiter, 8, 30).await;
        assert_eq!(t[0], Duration::ZERO, "the first request goes at once");
        assert!(max_in_window(&t, Duration::from_secs(60)) <= 60);
        let n = t.len() - 1;
        let rate = n as f64 / (t[n] - t[0]).as_secs_f64() * 60.0;
        assert!(
            (0.990 * 60.0..=60.0).contains(&rate),
            "steady rate {rate}/min"
        );
    }

    /// A waiter that always wakes late (here by up to 0.3% of the period,
    /// within the spare cells) loses nothing of the rate and never puts
    /// more than the quota in a window; a burst-1 pacing would lose each
    /// lateness for good.
    #[tokio::test(start_paused = true)]
    async fn late_wake_ups_cost_nothing_and_never_exceed_the_quota() {
        let q = Quota::new(60, Duration::from_secs(1));
        let g = pacer(q, 1, false);
        let cost = NonZeroU32::new(CELLS_PER_REQUEST).unwrap();
        let start = Instant::now();
        let mut t = Vec::new();
        let mut late = 0u64;
        while t.len() < 600 {
            match g.check_n(cost).unwrap() {
                Ok(()) => t.push(start.elapsed()),
                Err(nu) => {
                    // 0 to 3 ms late, varying.
                    late = (late + 3) % 4;
                    let at = nu.earliest_possible().0 + Duration::from_millis(late);
                    tokio::time::sleep_until(at).await;
                }
            }
        }
        assert!(max_in_window(&t, Duration::from_secs(1)) <= 60);
        let rate = 599.0 / (t[599] - t[0]).as_secs_f64();
        assert!(rate >= 0.990 * 60.0, "steady rate {rate}/s");
    }

    /// Eight workers on real time share one gate: the quota holds in every
    /// window, at close to the target rate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_share_the_gate() {
        let limiter = Limiter::new(&[
            "testers-list=60/0.6s".parse().unwrap(),
            "account-list=100000/1s".parse().unwrap(),
        ]);
        let t = grants(&limiter, 8, 10).await;
        assert!(max_in_window(&t, Duration::from_millis(600)) <= 60);
        // 80 grants at one per 10.09 ms: the 80th is at about 795 ms.
        let took = t[79];
        assert!(took >= Duration::from_millis(785), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    /// Waits that overlap count once: eight workers waiting through the
    /// same ten seconds count ten seconds, and a gap counts nothing.
    #[tokio::test(start_paused = true)]
    async fn wait_time_is_wall_clock_not_summed_over_workers() {
        let clock = Arc::new(WaitClock::default());
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let clock = clock.clone();
            tasks.push(tokio::spawn(async move {
                // Worker 0 waits 0–10 s, the others inside it.
                tokio::time::sleep(Duration::from_millis(i * 500)).await;
                let _w = clock.begin();
                let end = if i == 0 { 10_000 } else { i * 500 + 2_000 };
                tokio::time::sleep(Duration::from_millis(end - i * 500)).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(clock.total(), Duration::from_secs(10));
        // Two more, overlapping each other, after a 2 s gap: 1.5 s more.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let a = clock.begin();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = clock.begin();
        assert_eq!(
            clock.total(),
            Duration::from_secs(11),
            "a wait under way counts"
        );
        drop(a);
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(b);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(clock.total(), Duration::from_millis(11_500));
    }

    /// The limiter's own wait: eight workers paced through ~8 s wait about
    /// 8 s of wall clock, not 8 × that.
    #[tokio::test(start_paused = true)]
    async fn the_limiter_counts_wall_clock_waits() {
        let limiter = Limiter::new(&[
            "testers-list=10/1s".parse().unwrap(),
            "account-list=100000/1s".parse().unwrap(),
        ]);
        let t = grants(&limiter, 8, 10).await;
        let span = t[79];
        let waited = limiter.waited();
        assert!(waited <= span, "{waited:?} > {span:?}");
        assert!(waited >= span.mul_f64(0.95), "{waited:?} of {span:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_pauses_every_worker_and_recovers() {
        let limiter = Limiter::new(&["testers-list=60/1s".parse().unwrap()]);
        limiter.acquire(RateClass::TestersList, Some("1")).await;
        assert_eq!(limiter.condition(), None);
        limiter.throttled(RateClass::TestersList, Some("1"), Duration::from_secs(5));
        assert_eq!(limiter.slowdown(RateClass::TestersList, Some("1")), 2);
        assert_eq!(limiter.condition().as_deref(), Some("paused 5s: throttled"));
        let before = Instant::now();
        limiter.acquire(RateClass::TestersList, Some("1")).await;
        assert!(Instant::now() - before >= Duration::from_millis(4_990));
        assert_eq!(limiter.condition().as_deref(), Some("rate halved"));
        // Halved: 60 grants take twice as long as at full speed.
        let before = Instant::now();
        for _ in 0..60 {
            limiter.acquire(RateClass::TestersList, Some("1")).await;
        }
        let took = Instant::now() - before;
        assert!(took >= Duration::from_millis(1_990), "{took:?}");
        for _ in 0..60 {
            limiter.succeeded(RateClass::TestersList, Some("1"));
        }
        assert_eq!(limiter.slowdown(RateClass::TestersList, Some("1")), 1);
        assert_eq!(limiter.condition(), None);
        // Another project is not affected.
        assert_eq!(limiter.slowdown(RateClass::TestersList, Some("2")), 1);
    }
}
