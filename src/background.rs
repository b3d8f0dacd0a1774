//! The one way acr-task runs and stops background work (the run queue, the trigger
//! watchers, webhook intake and delivery, the registry's upkeep, a served listener).
//!
//! Every loop is spawned into a [`Background`]; stopping it cancels one token. Work that
//! must finish its own way (the run queue cancelling its runs, a listener letting requests
//! end) watches [`Background::token`] and is waited for by [`Background::shutdown`];
//! other loops are dropped at their next await. Dropping a `Background` cancels too, so an
//! owner that goes away never leaves its loops running.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Default)]
pub struct Background {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Background {
    pub fn new() -> Background {
        Background::default()
    }

    /// Cancelled when this background stops (for work spawned with [`Self::spawn_graceful`]).
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `work` until it ends or the background stops (then it is dropped).
    pub fn spawn(&self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => tracing::debug!(task = name, "background task stopped"),
                _ = work => {}
            }
        });
    }

    /// Runs `work`, which watches [`Self::token`] and ends by itself once it is cancelled.
    pub fn spawn_graceful(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// Stops everything and waits up to `grace` for it to end; false if something did not.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        let ended = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        if !ended {
            tracing::warn!(
                left = self.tasks.len(),
                "background work still running after {} s; leaving it",
                grace.as_secs()
            );
        }
        ended
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A runtime of its own for a client library that is async while its caller is not (a
/// store trait is synchronous and called from async handlers and plain threads alike):
/// [`OwnRuntime::wait`] runs a future there and blocks for its output. Shut down without
/// blocking when dropped (an owner may be dropped inside another runtime).
pub struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    /// A runtime of `threads` workers named `name`.
    pub fn new(name: &str, threads: usize) -> std::io::Result<OwnRuntime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(name)
            .enable_all()
            .build()
            .map(|rt| OwnRuntime(Some(rt)))
    }

    /// Runs `f` here and waits for it; `None` if the runtime dropped it (shutting down).
    pub fn wait<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let rt = self.0.as_ref()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().ok()
    }

    /// Starts `f` here without waiting (a connection's driver, say).
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.0 {
            rt.spawn(f);
        }
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for OwnRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnRuntime")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn shutdown_stops_loops_and_waits_for_graceful_work() {
        let bg = Background::new();
        let looped = Arc::new(AtomicBool::new(false));
        let l = looped.clone();
        bg.spawn("forever", async move {
            loop {
                l.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let finished = Arc::new(AtomicBool::new(false));
        let (f, token) = (finished.clone(), bg.token());
        bg.spawn_graceful(async move {
            token.cancelled().await;
            // Its own clean-up, after the stop and before shutdown returns.
            tokio::time::sleep(Duration::from_millis(50)).await;
            f.store(true, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(looped.load(Ordering::SeqCst));
        assert!(bg.shutdown(Duration::from_secs(5)).await);
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn dropping_the_owner_stops_its_loops() {
        let bg = Background::new();
        let token = bg.token();
        bg.spawn("forever", std::future::pending());
        drop(bg);
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn work_that_ignores_the_stop_is_reported_not_awaited_forever() {
        let bg = Background::new();
        bg.spawn_graceful(std::future::pending());
        assert!(!bg.shutdown(Duration::from_millis(50)).await);
    }
}
