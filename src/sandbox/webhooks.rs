//! The sandbox's outgoing webhooks, as Prefinery sends them (API reference,
//! section 8): one `POST` per state change, signed
//! `X-Prefinery-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`;
//! 200/201 accepted, 429, no reply within 15 s or a connection error retried
//! (attempt N waits 5 s + N⁴ s, up to 15 attempts, divided by the retry
//! scale), 410 removes the endpoint (nothing is sent to it any more),
//! anything else rejected.
//!
//! The envelope is our guess (Prefinery does not document it):
//! `{"id": "evt_…", "event": "tester_updated", "created_at": …, "beta":
//! {"id", "uid"}, "data": {"tester": {…}, "reward"|"point": {…}}}`. The
//! listener must not depend on it, and does not.
//!
//! Sending never slows the API: changes go into a bounded queue with
//! `try_send` (a full queue drops the change and counts it), and a
//! dispatcher task sends them, many at once. Faults for rehearsals:
//! duplicates (the same body delivered twice), reordering (a batch of
//! waiting changes sent in shuffled order), and a random delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use super::world::Change;

/// Changes waiting to be sent at most; past it they are dropped (counted).
const QUEUE: usize = 100_000;
/// Deliveries in flight at most.
const IN_FLIGHT: usize = 64;
/// Prefinery's attempts per event.
pub const MAX_ATTEMPTS: u32 = 15;

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: String,
    /// Probability that a delivery is sent twice.
    pub duplicate_rate: f64,
    /// Send waiting changes in shuffled order.
    pub reorder: bool,
    /// A random delay before each delivery, in ms.
    pub delay_ms: Option<(u64, u64)>,
    /// Divides Prefinery's retry schedule (60: attempt 1 after 0.1 s).
    pub retry_scale: f64,
    /// How long a reply may take (Prefinery: 15 s).
    pub timeout: Duration,
}

/// What the sender did, for `GET /__sandbox/webhooks` and tests.
#[derive(Debug, Default)]
pub struct WebhookStats {
    pub queued: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub attempts: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub rejected: AtomicU64,
    /// Given up after [`MAX_ATTEMPTS`].
    pub failed: AtomicU64,
    /// Not sent: the endpoint was removed by a 410.
    pub dropped_removed: AtomicU64,
    /// Deliveries not finished (waiting, in flight, or between retries).
    pub outstanding: AtomicU64,
    pub endpoint_removed: AtomicBool,
    /// Ids of the events answered 200/201, in order.
    pub accepted_ids: std::sync::Mutex<Vec<String>>,
}

impl WebhookStats {
    pub fn to_json(&self) -> Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "queued": n(&self.queued),
            "dropped_queue_full": n(&self.dropped_queue_full),
            "attempts": n(&self.attempts),
            "delivered": n(&self.delivered),
            "retried": n(&self.retried),
            "rejected": n(&self.rejected),
            "failed": n(&self.failed),
            "dropped_removed": n(&self.dropped_removed),
            "outstanding": n(&self.outstanding),
            "endpoint_removed": self.endpoint_removed.load(Ordering::Relaxed),
            "accepted_ids": *self.accepted_ids.lock().unwrap(),
        })
    }
}

/// The sending side, held by the app.
pub struct Webhooks {
    tx: mpsc::Sender<Value>,
    pub stats: Arc<WebhookStats>,
    next: AtomicU64,
}

impl Webhooks {
    /// Starts the dispatcher on the current runtime.
    pub fn start(config: WebhookConfig, seed: u64) -> Webhooks {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(WebhookStats::default());
        tokio::spawn(dispatch(config, rx, stats.clone(), seed));
        Webhooks {
            tx,
            stats,
            next: AtomicU64::new(1),
        }
    }

    /// Queues the changes of one request, never waiting.
    pub fn send(&self, changes: Vec<Change>, uid_of: impl Fn(u64) -> String) {
        for c in changes {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let body = json!({
                "id": format!("evt_{n:08}"),
                "event": c.event,
                "created_at": crate::time::iso8601(std::time::SystemTime::now()),
                "beta": {"id": c.beta, "uid": uid_of(c.beta)},
                "data": c.data,
            });
            self.stats.outstanding.fetch_add(1, Ordering::Relaxed);
            match self.tx.try_send(body) {
                Ok(()) => {
                    self.stats.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.stats.outstanding.fetch_sub(1, Ordering::Relaxed);
                    self.stats
                        .dropped_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn dispatch(
    config: WebhookConfig,
    mut rx: mpsc::Receiver<Value>,
    stats: Arc<WebhookStats>,
    seed: u64,
) {
    let http = reqwest::Client::builder()
        .timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("the HTTP client builds with static settings");
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_b00c);
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 64).await > 0 {
        if config.reorder {
            rng.shuffle(&mut batch);
        }
        for body in batch.drain(..) {
            let copies = if rng.f64() < config.duplicate_rate {
                stats.outstanding.fetch_add(1, Ordering::Relaxed);
                2
            } else {
                1
            };
            let body = bytes::Bytes::from(body.to_string());
            for _ in 0..copies {
                let delay = config
                    .delay_ms
                    .map(|(lo, hi)| Duration::from_millis(rng.u64(lo..=hi)));
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let (http, config, stats, body) =
                    (http.clone(), config.clone(), stats.clone(), body.clone());
                tokio::spawn(async move {
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    deliver(&http, &config, &stats, body).await;
                    stats.outstanding.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
    }
}

/// Prefinery's wait before attempt `n + 1` after `n` failed: 5 s + n⁴ s.
pub fn retry_delay(n: u32, scale: f64) -> Duration {
    let secs = 5.0 + f64::from(n).powi(4);
    Duration::from_secs_f64(secs / scale.max(f64::MIN_POSITIVE))
}

/// Signed as the listener checks it (one definition of the scheme).
fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    crate::listen::signature::sign(secret, t, body)
}

async fn deliver(
    http: &reqwest::Client,
    config: &WebhookConfig,
    stats: &WebhookStats,
    body: bytes::Bytes,
) {
    for attempt in 1..=MAX_ATTEMPTS {
        if stats.endpoint_removed.load(Ordering::Relaxed) {
            stats.dropped_removed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        stats.attempts.fetch_add(1, Ordering::Relaxed);
        // Signed at each attempt, as a sender whose signature carries the
        // time must.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let r = http
            .post(&config.url)
            .header("content-type", "application/json")
            .header("x-prefinery-signature", signature(&config.secret, t, &body))
            .body(body.clone())
            .send()
            .await;
        let retry = match r.map(|r| r.status().as_u16()) {
            Ok(200 | 201) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                let id = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_string))
                    .unwrap_or_default();
                stats.accepted_ids.lock().unwrap().push(id);
                return;
            }
            Ok(410) => {
                tracing::warn!(
                    "the webhook endpoint answered 410: it is removed, nothing more is sent to it"
                );
                stats.endpoint_removed.store(true, Ordering::Relaxed);
                return;
            }
            Ok(429) => true,
            Ok(_) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // No reply in time, or no connection.
            Err(_) => true,
        };
        if retry && attempt < MAX_ATTEMPTS {
            stats.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(retry_delay(attempt, config.retry_scale)).await;
        }
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_schedule() {
        assert_eq!(retry_delay(1, 1.0), Duration::from_secs(6));
        assert_eq!(retry_delay(5, 1.0), Duration::from_secs(630));
        assert_eq!(retry_delay(1, 60.0), Duration::from_millis(100));
        // Attempt 15 comes about 14 h after attempt 14 (section 8).
        assert_eq!(retry_delay(14, 1.0).as_secs(), 38_421);
    }

    #[test]
    fn signed_as_documented() {
        // The same vector the listener's test checks, computed by python's hmac.
        assert_eq!(
            signature("secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }
}
