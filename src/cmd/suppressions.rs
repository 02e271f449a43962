//! `prefsync suppressions add|remove`: the flags to an operation, run by
//! the common bulk command.

use std::sync::Arc;

use crate::api::Client;
use crate::cli::SuppressionsWhat;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::ops::suppressions::{SuppressionsAdd, SuppressionsRemove};

pub async fn run(
    client: &Client,
    what: &SuppressionsWhat,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    match what {
        SuppressionsWhat::Add(a) => {
            let mut op = SuppressionsAdd::new(client.clone(), beta.to_string());
            op.map = a.map.clone();
            super::bulk::run(client, op, a, beta, serde_json::json!({}), progress).await
        }
        SuppressionsWhat::Remove(a) => {
            let mut op = SuppressionsRemove::new(client.clone(), beta.to_string());
            op.map = a.map.clone();
            super::bulk::run(client, op, a, beta, serde_json::json!({}), progress).await
        }
    }
}
