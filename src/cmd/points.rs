//! `prefsync points add`: the flags into the operation, then the common
//! bulk runner.

use std::sync::Arc;

use serde_json::json;

use crate::api::Client;
use crate::cli::PointsWhat;
use crate::engine::Subscriber;
use crate::exit::Exit;
use crate::ops::points::PointsAdd;

pub async fn run(
    client: &Client,
    what: &PointsWhat,
    beta: &str,
    progress: Arc<dyn Subscriber>,
) -> anyhow::Result<Exit> {
    let PointsWhat::Add(a) = what;
    let mut op = PointsAdd::new(client.clone(), beta.to_string());
    op.map = a.bulk.map.clone();
    op.marker = !a.no_marker;
    let options = json!({"no_marker": a.no_marker});
    super::bulk::run(client, op, &a.bulk, beta, options, progress).await
}
