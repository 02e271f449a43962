//! A Prefinery-compatible server for rehearsing migrations offline and for
//! our tests. It follows `shared/api/prefinery-api-v2.md`: the endpoints,
//! bodies, status codes, documented error codes, rate limits and key
//! permissions, and it can inject faults.
//!
//! It is a library first: [`router`] and [`serve`] let tests start it
//! in-process on `127.0.0.1:0`; [`Sandbox::start`] does both and shuts the
//! server down when dropped.

mod faults;
mod keys;
mod limits;
mod routes;
pub mod webhooks;
pub mod world;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;

pub use keys::{DEFAULT_KEY, KeySpec, Keys, Permission};
pub use webhooks::{WebhookConfig, WebhookStats};
pub use world::World;

/// How the sandbox behaves. `Default` is a well-behaved server that accepts
/// `sandbox-key` with every permission and enforces the documented limits.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub keys: Keys,
    /// Multiplies every documented rate (60 turns 60/min into 60/s).
    /// Zero turns rate limiting off.
    pub rate_scale: f64,
    pub throttle_status: u16,
    /// At most this many writes per period for the whole company, answered
    /// like any throttled request past it. Prefinery documents no write
    /// limit, so this is off by default; it rehearses a server that has one.
    pub write_limit: Option<(u32, Duration)>,
    pub retry_after: Option<u64>,
    pub seed: u64,
    /// 5xx before the request is applied.
    pub fail_rate: f64,
    /// The write is applied, then a 5xx or a dropped connection.
    pub fail_after_write_rate: f64,
    /// The connection drops before the request is applied.
    pub drop_rate: f64,
    pub latency_ms: Option<(u64, u64)>,
    /// Users `user{i}@example.com` seeded into project 1.
    pub seed_testers: usize,
    /// Persist the state to this SQLite file (in memory when unset).
    pub state_path: Option<PathBuf>,
    /// Add a `total_count` key to `X-Pagination` (the real key is unknown).
    pub total_key: bool,
    /// Send webhooks for every state change (off when unset).
    pub webhook: Option<WebhookConfig>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            keys: Keys::default(),
            rate_scale: 1.0,
            throttle_status: 503,
            write_limit: None,
            retry_after: None,
            seed: 1,
            fail_rate: 0.0,
            fail_after_write_rate: 0.0,
            drop_rate: 0.0,
            latency_ms: None,
            seed_testers: 0,
            state_path: None,
            total_key: false,
            webhook: None,
        }
    }
}

/// The shared state behind the router.
pub struct App {
    pub config: SandboxConfig,
    pub world: Mutex<World>,
    pub limits: limits::Limits,
    pub faults: faults::Faults,
    pub stats: limits::Stats,
    /// The webhook sender, when `webhook` is set.
    pub webhooks: Option<webhooks::Webhooks>,
    dirty: std::sync::atomic::AtomicBool,
}

impl App {
    pub fn new(config: SandboxConfig) -> anyhow::Result<Arc<App>> {
        let mut world = match &config.state_path {
            Some(p) if p.exists() => load_state(p)?,
            _ => World::new(),
        };
        if config.seed_testers > 0 && world.project(1).users.is_empty() {
            world.seed_testers(1, config.seed_testers);
        }
        // Seeding is no change a webhook announces.
        let webhooks = config.webhook.clone().map(|w| {
            world.changes = Some(Vec::new());
            webhooks::Webhooks::start(w, config.seed)
        });
        Ok(Arc::new(App {
            limits: limits::Limits::new(config.rate_scale, config.write_limit),
            faults: faults::Faults::new(&config),
            stats: limits::Stats::default(),
            webhooks,
            world: Mutex::new(world),
            config,
            dirty: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// Runs `f` on the world (for tests and admin routes).
    pub fn with_world<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.world.lock().unwrap())
    }

    pub fn stats_json(&self) -> Value {
        self.stats.to_json(&self.limits)
    }

    /// Writes the state to `--state`, if set and changed.
    pub fn save(&self) -> anyhow::Result<()> {
        let Some(path) = &self.config.state_path else {
            return Ok(());
        };
        if !self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        let json = serde_json::to_string(&*self.world.lock().unwrap())?;
        let conn = rusqlite::Connection::open(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sandbox_state (version INTEGER NOT NULL, world TEXT NOT NULL);
             DELETE FROM sandbox_state;",
        )?;
        conn.execute(
            "INSERT INTO sandbox_state (version, world) VALUES (1, ?1)",
            [json],
        )?;
        Ok(())
    }

    /// Hands the changes a request made to the webhook sender (a no-op
    /// when webhooks are off).
    pub fn announce(&self, w: &mut World) {
        if let (Some(hooks), Some(changes)) = (&self.webhooks, w.changes.as_mut())
            && !changes.is_empty()
        {
            let changes = std::mem::take(changes);
            hooks.send(changes, |b| {
                w.projects
                    .get(&b)
                    .map(|p| p.uid.clone())
                    .unwrap_or_default()
            });
        }
    }

    fn touched(&self) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
    }
}

fn load_state(path: &std::path::Path) -> anyhow::Result<World> {
    let conn = rusqlite::Connection::open(path)?;
    let json: String =
        conn.query_row("SELECT world FROM sandbox_state LIMIT 1", [], |r| r.get(0))?;
    let mut w: World = serde_json::from_str(&json)?;
    w.reindex();
    Ok(w)
}

/// The sandbox's routes: the API under `/api/v2/` and admin routes under
/// `/__sandbox/`.
pub fn router(app: Arc<App>) -> Router {
    routes::router(app)
}

/// Serves until `shutdown` completes, then saves the state.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let saver = app.config.state_path.is_some().then(|| {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = app.save() {
                    tracing::warn!("failed to save the sandbox state: {e:#}");
                }
            }
        })
    });
    let result = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    if let Some(s) = saver {
        s.abort();
    }
    if let Err(e) = app.save() {
        tracing::warn!("failed to save the sandbox state: {e:#}");
    }
    result
}

/// A running sandbox, shut down when dropped.
pub struct Sandbox {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Sandbox {
    /// Binds `127.0.0.1:port` (0 = any free port) and serves in the
    /// background on the current tokio runtime.
    pub async fn start(config: SandboxConfig, port: u16) -> anyhow::Result<Sandbox> {
        let app = App::new(config)?;
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve(listener, app.clone(), async move {
            let _ = rx.await;
        }));
        Ok(Sandbox {
            addr,
            app,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// The base URL to give prefsync: `http://127.0.0.1:PORT/api/v2`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/v2", self.addr)
    }

    /// Stops serving and waits for in-flight requests.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
