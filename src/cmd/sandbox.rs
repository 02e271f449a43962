//! `prefsync sandbox`: the sandbox server as a process.

use anyhow::Context;

use crate::cli::SandboxArgs;
use crate::exit::usage;
use crate::sandbox::{Keys, Sandbox, SandboxConfig, WebhookConfig};

pub fn config_from_args(a: &SandboxArgs) -> anyhow::Result<SandboxConfig> {
    let keys = match &a.keys {
        Some(p) => Keys::from_file(p).map_err(|e| usage(format!("{e:#}")))?,
        None => Keys::default(),
    };
    let latency_ms = min_max("--latency-ms", a.latency_ms.as_deref())?;
    let webhook = match &a.webhook_url {
        None => None,
        Some(url) => {
            let Some(secret) = a.webhook_secret.clone() else {
                return Err(usage("--webhook-url needs --webhook-secret"));
            };
            if !(0.0..=1.0).contains(&a.webhook_duplicate_rate) {
                return Err(usage(format!(
                    "invalid --webhook-duplicate-rate {}: expected a probability from 0 to 1",
                    a.webhook_duplicate_rate
                )));
            }
            let retry_scale = a.webhook_retry_scale.unwrap_or(if a.rate_scale > 0.0 {
                a.rate_scale
            } else {
                1.0
            });
            if !(retry_scale > 0.0 && retry_scale.is_finite()) {
                return Err(usage(
                    "invalid --webhook-retry-scale: expected a positive factor",
                ));
            }
            Some(WebhookConfig {
                url: url::Url::parse(url)
                    .map_err(|e| usage(format!("invalid --webhook-url {url:?}: {e}")))?
                    .to_string(),
                secret,
                duplicate_rate: a.webhook_duplicate_rate,
                reorder: a.webhook_reorder,
                delay_ms: min_max("--webhook-delay", a.webhook_delay.as_deref())?,
                retry_scale,
                timeout: std::time::Duration::from_secs(15),
            })
        }
    };
    for (name, p) in [
        ("--fail-rate", a.fail_rate),
        ("--fail-after-write-rate", a.fail_after_write_rate),
        ("--drop-rate", a.drop_rate),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(usage(format!(
                "invalid {name} {p}: expected a probability from 0 to 1"
            )));
        }
    }
    if a.rate_scale < 0.0 || !a.rate_scale.is_finite() {
        return Err(usage(
            "invalid --rate-scale: expected 0 (off) or a positive factor",
        ));
    }
    Ok(SandboxConfig {
        keys,
        rate_scale: a.rate_scale,
        throttle_status: a.throttle_status,
        write_limit: a.write_limit.map(|q| (q.count, q.period)),
        retry_after: a.retry_after,
        seed: a.seed,
        fail_rate: a.fail_rate,
        fail_after_write_rate: a.fail_after_write_rate,
        drop_rate: a.drop_rate,
        latency_ms,
        seed_testers: a.seed_testers,
        state_path: a.state.clone(),
        total_key: a.total_key,
        webhook,
    })
}

/// `MIN:MAX` in milliseconds.
fn min_max(flag: &str, s: Option<&str>) -> anyhow::Result<Option<(u64, u64)>> {
    let Some(s) = s else {
        return Ok(None);
    };
    let parsed = s
        .split_once(':')
        .and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?)));
    match parsed {
        Some((lo, hi)) if lo <= hi => Ok(Some((lo, hi))),
        _ => Err(usage(format!(
            "invalid {flag} {s:?}: expected MIN:MAX in milliseconds, e.g. 5:20"
        ))),
    }
}

pub async fn run(a: &SandboxArgs) -> anyhow::Result<()> {
    let config = config_from_args(a)?;
    let sandbox = Sandbox::start(config, a.port)
        .await
        .with_context(|| format!("failed to start the sandbox on port {}", a.port))?;
    if let Some(p) = &a.port_file {
        // Written whole, then renamed: a reader never sees a partial number.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, sandbox.addr.port().to_string())
            .and_then(|_| std::fs::rename(&tmp, p))
            .with_context(|| format!("failed to write the port file {}", p.display()))?;
    }
    eprintln!(
        "sandbox listening on {} (projects 1 = a9b8c7de and 2 = b7c6d5e4; default key: sandbox-key). Ctrl-C stops it.",
        sandbox.base_url()
    );
    tokio::signal::ctrl_c().await.ok();
    sandbox.shutdown().await;
    Ok(())
}
