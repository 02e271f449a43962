//! `prefsync demo`: starts the sandbox in-process and runs the main job
//! against it, so a fresh machine with no key and no network shows what
//! prefsync does.

use crate::api::{ApiKey, Client, Limiter, RetryPolicy};
use crate::cli::DemoArgs;
use crate::exit::Exit;
use crate::sandbox::{Sandbox, SandboxConfig};

pub async fn run(_args: &DemoArgs) -> anyhow::Result<Exit> {
    let sandbox = Sandbox::start(SandboxConfig::default(), 0).await?;
    eprintln!("demo: sandbox started at {}", sandbox.base_url());
    let client = Client::new(
        sandbox.base_url().parse()?,
        ApiKey::new(crate::sandbox::DEFAULT_KEY),
        Limiter::new(&[]),
        RetryPolicy::default(),
    );
    let report = super::check::check(&client, "a9b8c7de").await;
    print!("{report}");
    sandbox.shutdown().await;
    Ok(if report.works() {
        Exit::Done
    } else {
        Exit::AccessDenied
    })
}
