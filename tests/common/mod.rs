//! Shared test helpers: an in-process sandbox and a client pointed at it.

// Each test binary uses a different part of these helpers.
#![allow(dead_code)]

use prefsync::api::{ApiKey, Client, Limiter, RateOverride, RetryPolicy};
use prefsync::sandbox::{Sandbox, SandboxConfig};
use serde_json::Value;

pub const KEY: &str = "sandbox-key";

pub async fn sandbox(config: SandboxConfig) -> Sandbox {
    Sandbox::start(config, 0).await.expect("sandbox starts")
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 8,
        base_delay: std::time::Duration::from_millis(5),
        max_delay: std::time::Duration::from_millis(100),
        timeout: std::time::Duration::from_secs(10),
    }
}

pub fn client_for(base: &str, key: &str, rates: &[&str]) -> Client {
    let rates: Vec<RateOverride> = rates.iter().map(|r| r.parse().unwrap()).collect();
    Client::new(
        base.parse().unwrap(),
        ApiKey::new(key),
        Limiter::new(&rates),
        fast_retry(),
    )
}

pub fn client(s: &Sandbox) -> Client {
    client_for(&s.base_url(), KEY, &[])
}

/// All users of a project as the sandbox holds them.
pub fn users(s: &Sandbox, beta: u64) -> Vec<Value> {
    s.app.with_world(|w| {
        let p = w.project(beta);
        p.users.values().map(|u| p.user_json(u)).collect()
    })
}

/// A client whose quotas are far above the sandbox's (for a sandbox with
/// limits off: `rate_scale: 0.0`).
pub fn unlimited_client(s: &Sandbox) -> Client {
    client_for(
        &s.base_url(),
        KEY,
        &[
            "testers-list=100000/1s",
            "account-list=100000/1s",
            "rewards-list=100000/1s",
            "points-list=100000/1s",
            "betas=100000/1s",
        ],
    )
}
