//! The documented rate limits, enforced as sliding windows (the strictest
//! reading of "N per period"), and the request statistics that tests and
//! benchmarks read from `/__sandbox/stats`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How many arrival times per window are kept for the statistics.
const ARRIVALS_KEPT: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitClass {
    TestersList,
    AccountList,
    RewardsList,
    PointsList,
    Betas,
    /// Every write, for the whole company. Not a documented limit: off unless
    /// [`super::SandboxConfig::write_limit`] sets one.
    Writes,
}

impl LimitClass {
    /// The documented quota; `None` for a class that has none.
    fn documented(self) -> Option<(u32, Duration)> {
        Some(match self {
            LimitClass::TestersList | LimitClass::RewardsList | LimitClass::PointsList => {
                (60, Duration::from_secs(60))
            }
            LimitClass::AccountList => (180, Duration::from_secs(60)),
            LimitClass::Betas => (90, Duration::from_secs(900)),
            LimitClass::Writes => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            LimitClass::TestersList => "testers-list",
            LimitClass::AccountList => "account-list",
            LimitClass::RewardsList => "rewards-list",
            LimitClass::PointsList => "points-list",
            LimitClass::Betas => "betas",
            LimitClass::Writes => "writes",
        }
    }
}

struct Window {
    limit: u32,
    period: Duration,
    recent: VecDeque<Instant>,
    arrivals: Vec<Instant>,
    refused: u64,
}

pub struct Limits {
    scale: f64,
    /// The write quota, as given (not scaled: there is no documented one).
    writes: Option<(u32, Duration)>,
    windows: Mutex<BTreeMap<String, Window>>,
    started: Instant,
}

impl Limits {
    pub fn new(scale: f64, writes: Option<(u32, Duration)>) -> Limits {
        Limits {
            scale,
            writes,
            windows: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
        }
    }

    /// The quota enforced for a class, if any: the documented ones scaled
    /// (and off at scale 0), the write quota as configured.
    fn quota(&self, class: LimitClass) -> Option<(u32, Duration)> {
        match class.documented() {
            Some(_) if self.scale <= 0.0 => None,
            Some((limit, period)) => Some((limit, period.div_f64(self.scale))),
            None => self.writes,
        }
    }

    /// Counts a request against every window it falls in; false when any of
    /// them is full (the request is then refused and not counted).
    pub fn admit(&self, classes: &[(LimitClass, String)]) -> bool {
        let classes: Vec<_> = classes
            .iter()
            .filter_map(|(c, scope)| Some((*c, scope, self.quota(*c)?)))
            .collect();
        if classes.is_empty() {
            return true;
        }
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap();
        let mut ok = true;
        for (class, scope, (limit, period)) in &classes {
            let w = windows
                .entry(format!("{}:{scope}", class.name()))
                .or_insert_with(|| Window {
                    limit: *limit,
                    period: *period,
                    recent: VecDeque::new(),
                    arrivals: Vec::new(),
                    refused: 0,
                });
            while w
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= w.period)
            {
                w.recent.pop_front();
            }
            if w.recent.len() >= w.limit as usize {
                ok = false;
            }
        }
        for (class, scope, _) in &classes {
            let w = windows
                .get_mut(&format!("{}:{scope}", class.name()))
                .unwrap();
            if ok {
                w.recent.push_back(now);
                if w.arrivals.len() < ARRIVALS_KEPT {
                    w.arrivals.push(now);
                }
            } else {
                w.refused += 1;
            }
        }
        ok
    }

    fn to_json(&self) -> Value {
        let windows = self.windows.lock().unwrap();
        let mut out = serde_json::Map::new();
        for (name, w) in windows.iter() {
            // The most requests admitted in any window of the period.
            let mut max = 0;
            let mut j = 0;
            for i in 0..w.arrivals.len() {
                while w.arrivals[i].duration_since(w.arrivals[j]) >= w.period {
                    j += 1;
                }
                max = max.max(i - j + 1);
            }
            let span = match (w.arrivals.first(), w.arrivals.last()) {
                (Some(a), Some(b)) if w.arrivals.len() > 1 => b.duration_since(*a).as_secs_f64(),
                _ => 0.0,
            };
            let rate_per_period = if span > 0.0 {
                (w.arrivals.len() - 1) as f64 / span * w.period.as_secs_f64()
            } else {
                0.0
            };
            out.insert(
                name.clone(),
                json!({
                    "limit": w.limit,
                    "period_secs": w.period.as_secs_f64(),
                    "admitted": w.arrivals.len(),
                    "refused": w.refused,
                    "max_in_any_window": max,
                    "steady_rate_per_period": rate_per_period,
                    "utilisation": rate_per_period / f64::from(w.limit),
                    "first_secs": w.arrivals.first().map(|t| t.duration_since(self.started).as_secs_f64()),
                }),
            );
        }
        Value::Object(out)
    }
}

/// Request counts per route and status.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub throttled: AtomicU64,
    by_route: Mutex<HashMap<(&'static str, u16), u64>>,
}

impl Stats {
    pub fn record(&self, route: &'static str, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        *self
            .by_route
            .lock()
            .unwrap()
            .entry((route, status))
            .or_default() += 1;
    }

    pub fn to_json(&self, limits: &Limits) -> Value {
        let mut routes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((route, status), n) in self.by_route.lock().unwrap().iter() {
            routes
                .entry(route.to_string())
                .or_default()
                .insert(status.to_string(), *n);
        }
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "throttled": self.throttled.load(Ordering::Relaxed),
            "routes": routes,
            "windows": limits.to_json(),
        })
    }
}
