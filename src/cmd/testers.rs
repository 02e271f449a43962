//! `prefsync testers delete|checkin`: the flags to an operation, run by
//! the common bulk command.

use std::sync::Arc;

use crate::api::Client;
use crate::cli::TestersWhat;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::ops::testers_checkin::TestersCheckin;
use crate::ops::testers_delete::TestersDelete;

pub async fn run(
    client: &Client,
    what: &TestersWhat,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    match what {
        TestersWhat::Delete(d) => {
            let a = &d.bulk;
            let mut op = TestersDelete::new(client.clone(), beta.to_string(), a.checkpoint.clone());
            op.map = a.map.clone();
            op.yes = d.yes;
            op.max_delete = d.max_delete;
            op.backup = d.backup.clone();
            let options = serde_json::json!({ "max_delete": d.max_delete, "yes": d.yes });
            super::bulk::run(client, op, a, beta, options, progress).await
        }
        TestersWhat::Checkin(a) => {
            let mut op = TestersCheckin::new(client.clone(), beta.to_string());
            op.map = a.map.clone();
            super::bulk::run(client, op, a, beta, serde_json::json!({}), progress).await
        }
    }
}
