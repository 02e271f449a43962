//! `prefsync listen`: keeps a mirror current from Prefinery's webhooks.
//!
//! Three parts, each with one job:
//! - [`server`]: the HTTP side. Verifies each delivery's signature on the
//!   raw body before anything else (401 otherwise), makes it durable in the
//!   journal, then answers 200; 429 when it cannot (Prefinery retries a 429
//!   and nothing else); never 410, which would remove the endpoint.
//! - [`journal`]: the mirror's `webhook_events` table, written with group
//!   commits and fsync.
//! - [`applier`]: reads the journal and brings each user it names up to
//!   date by reading it again from the API.
//!
//! Like the sandbox, it is a library: [`Listener::start`] binds and serves
//! on the current runtime, and tests start it on `127.0.0.1:0`.

pub mod applier;
pub mod event;
pub mod journal;
pub mod server;
pub mod signature;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;

use crate::api::Client;
use crate::mirror::Mirror;
use crate::stop::Stop;
pub use signature::Secrets;

/// What `listen` needs, resolved from its flags.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub mirror: PathBuf,
    /// The project as the API takes it (numeric id or UID).
    pub beta: String,
    pub secrets: Secrets,
    /// The path deliveries are posted to, e.g. `/prefinery`.
    pub path: String,
    /// How far a signature's time may be from now.
    pub tolerance: Duration,
    /// Events journalled and not yet applied past which deliveries are
    /// answered 429 (Prefinery sends them again later).
    pub max_pending: u64,
    /// After a stop, how long the applier may go on applying what is
    /// journalled.
    pub drain: Duration,
}

/// Counters shown by `GET /status`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries accepted (200), duplicates included, since start.
    pub received: AtomicU64,
    /// Of those, bodies already journalled.
    pub duplicates: AtomicU64,
    /// Events applied to the mirror (journal totals at start, then added).
    pub applied: AtomicU64,
    /// Events journalled and not yet applied.
    pub pending: AtomicU64,
    /// Events kept as unknown.
    pub unknown: AtomicU64,
    pub rejected_signature: AtomicU64,
    /// Deliveries answered 429 (journal full, locked or failing).
    pub refused_busy: AtomicU64,
    /// Unix time of the last accepted delivery (0: none yet).
    pub last_event_at: AtomicU64,
    /// Unix time the oldest pending event was received (0: none pending).
    pub oldest_pending: AtomicU64,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    pub received: u64,
    pub duplicates: u64,
    pub applied: u64,
    pub pending: u64,
    pub rejected_signature: u64,
    pub refused_busy: u64,
    pub unknown: u64,
    pub last_event_at: Option<String>,
    /// How long the oldest event not yet applied has waited (0 when none
    /// is pending).
    pub lag_seconds: u64,
}

impl Stats {
    pub fn status(&self) -> Status {
        let at = |v: u64| {
            (v > 0).then(|| crate::time::iso8601(std::time::UNIX_EPOCH + Duration::from_secs(v)))
        };
        let pending = self.pending.load(Ordering::Relaxed);
        let oldest = self.oldest_pending.load(Ordering::Relaxed);
        Status {
            received: self.received.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            applied: self.applied.load(Ordering::Relaxed),
            pending,
            rejected_signature: self.rejected_signature.load(Ordering::Relaxed),
            refused_busy: self.refused_busy.load(Ordering::Relaxed),
            unknown: self.unknown.load(Ordering::Relaxed),
            last_event_at: at(self.last_event_at.load(Ordering::Relaxed)),
            lag_seconds: if pending > 0 && oldest > 0 {
                now_unix().saturating_sub(oldest as i64) as u64
            } else {
                0
            },
        }
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A running listener: the server and the applier.
pub struct Listener {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    stop: Stop,
    applier_stop: Stop,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    applier: tokio::task::JoinHandle<anyhow::Result<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Opens (migrating) the mirror, applies what an earlier run left
    /// pending as the applier starts, and serves on `listener`.
    pub async fn start(
        config: ListenConfig,
        client: Client,
        listener: TcpListener,
    ) -> anyhow::Result<Listener> {
        let mirror = Arc::new(Mirror::open(&config.mirror)?);
        let beta_id = match mirror.project_id(&config.beta)? {
            Some(id) => id,
            None => client.beta(&config.beta).await?.id as i64,
        };
        let reader = journal::Reader::open(&config.mirror)?;
        let counts = reader.counts()?;
        if counts.pending > 0 {
            tracing::info!(
                "{} events journalled by an earlier run are still to apply",
                counts.pending
            );
        }
        let stats = Arc::new(Stats::default());
        stats.applied.store(counts.applied, Ordering::Relaxed);
        stats.unknown.store(counts.unknown, Ordering::Relaxed);
        stats.pending.store(counts.pending, Ordering::Relaxed);
        let wake = Arc::new(tokio::sync::Notify::new());
        let (writer, writer_thread) = {
            let (stats, wake) = (stats.clone(), wake.clone());
            journal::Writer::start(&config.mirror, move |new| {
                stats.pending.fetch_add(new as u64, Ordering::Relaxed);
                if new > 0 {
                    wake.notify_one();
                }
            })?
        };
        let stop = Stop::default();
        // The applier stops after the server, so that the deliveries in
        // flight at the stop are journalled before it drains.
        let applier_stop = Stop::default();
        let applier = {
            let a = applier::Applier::new(
                client,
                config.beta.clone(),
                beta_id,
                mirror,
                reader,
                stats.clone(),
                wake,
            );
            let stop = applier_stop.clone();
            let drain = config.drain;
            tokio::spawn(async move {
                let r = a.run(stop, drain).await;
                if let Err(e) = &r {
                    tracing::error!("the applier stopped: {e:#}");
                }
                r
            })
        };
        let addr = listener.local_addr()?;
        let app = server::router(server::AppState {
            config: Arc::new(config),
            stats: stats.clone(),
            writer,
        });
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.wait().await })
                    .await
            })
        };
        Ok(Listener {
            addr,
            stats,
            stop,
            applier_stop,
            server,
            applier,
            writer: Some(writer_thread),
        })
    }

    /// The counters as `GET /status` shows them.
    pub fn status(&self) -> Status {
        self.stats.status()
    }

    /// A handle that stops the listener when triggered.
    pub fn stopper(&self) -> Stop {
        self.stop.clone()
    }

    /// Waits for a stop (see [`Listener::stopper`]), then stops taking
    /// deliveries, finishes those in flight, and applies what is journalled
    /// (within the drain time).
    pub async fn wait(mut self) -> anyhow::Result<Status> {
        self.stop.wait().await;
        self.finish().await
    }

    /// Stops now, as [`Listener::wait`] does after a stop.
    pub async fn shutdown(self) -> anyhow::Result<Status> {
        self.stop.trigger();
        let mut this = self;
        this.finish().await
    }

    async fn finish(&mut self) -> anyhow::Result<Status> {
        let served = (&mut self.server).await;
        self.applier_stop.trigger();
        let applied = (&mut self.applier).await;
        served??;
        applied??;
        // The handlers are gone with the server: the writer's channel
        // closes and its thread ends once the last commit is done.
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        Ok(self.stats.status())
    }
}
