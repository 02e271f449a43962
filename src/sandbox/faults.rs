//! Seeded fault injection: the same seed gives the same sequence of faults
//! for the same sequence of requests.

use std::sync::Mutex;
use std::time::Duration;

use super::SandboxConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// 5xx before anything is applied.
    FailBefore,
    /// The connection drops before anything is applied.
    DropBefore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterWrite {
    None,
    Fail,
    Drop,
}

pub struct Faults {
    rng: Mutex<fastrand::Rng>,
    fail: f64,
    after_write: f64,
    drop: f64,
    latency: Option<(u64, u64)>,
}

impl Faults {
    pub fn new(c: &SandboxConfig) -> Faults {
        Faults {
            rng: Mutex::new(fastrand::Rng::with_seed(c.seed)),
            fail: c.fail_rate,
            after_write: c.fail_after_write_rate,
            drop: c.drop_rate,
            latency: c.latency_ms,
        }
    }

    pub fn latency(&self) -> Option<Duration> {
        let (lo, hi) = self.latency?;
        let ms = self.rng.lock().unwrap().u64(lo..=hi.max(lo));
        Some(Duration::from_millis(ms))
    }

    pub fn before(&self) -> Fault {
        if self.fail == 0.0 && self.drop == 0.0 {
            return Fault::None;
        }
        let mut r = self.rng.lock().unwrap();
        if r.f64() < self.drop {
            Fault::DropBefore
        } else if r.f64() < self.fail {
            Fault::FailBefore
        } else {
            Fault::None
        }
    }

    pub fn after_write(&self) -> AfterWrite {
        if self.after_write == 0.0 {
            return AfterWrite::None;
        }
        let mut r = self.rng.lock().unwrap();
        if r.f64() < self.after_write {
            if r.bool() {
                AfterWrite::Fail
            } else {
                AfterWrite::Drop
            }
        } else {
            AfterWrite::None
        }
    }
}
