//! A stop signal shared by every task of a run: Ctrl-C, `--max-duration`, or
//! a failure that makes going on pointless.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Stop {
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    /// Triggers this stop after `d` (`--max-duration`), unless the task is
    /// aborted first.
    pub fn after(&self, d: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let stop = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            tracing::warn!("--max-duration reached: stopping after the calls in flight");
            stop.trigger();
        })
    }
}
