//! `prefsync rewards issue|deliver|revoke`: the flags into the operation,
//! then the common bulk runner.

use std::sync::Arc;

use serde_json::json;

use crate::api::Client;
use crate::cli::RewardsWhat;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::ops::rewards::{Change, RewardsChange, RewardsIssue};

pub async fn run(
    client: &Client,
    what: &RewardsWhat,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let (bulk, change) = match what {
        RewardsWhat::Issue(a) => {
            let mut op = RewardsIssue::new(client.clone(), beta.to_string());
            op.map = a.bulk.map.clone();
            op.again = a.again;
            let options = json!({"again": a.again});
            return super::bulk::run(client, op, &a.bulk, beta, options, progress).await;
        }
        RewardsWhat::Deliver(a) => (&a.bulk, Change::Deliver),
        RewardsWhat::Revoke(a) => (&a.bulk, Change::Revoke),
    };
    let mut op = RewardsChange::new(client.clone(), beta.to_string(), change);
    op.map = bulk.map.clone();
    super::bulk::run(client, op, bulk, beta, json!({}), progress).await
}
