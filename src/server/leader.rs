//! Which of the `serve` replicas sharing one database leads: the leader alone runs the
//! loops that must happen once for everyone (timers, branch and base-image pollers, the
//! expiry of lapsed leases). The store decides ([`ServerStore::try_lead`]: always this
//! server on SQLite; a PostgreSQL advisory lock held by one connection, so a leader
//! killed loses it the moment its connection closes and another replica takes over at
//! its next look, a second later).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::db::ServerStore;

/// How often a replica asks to lead (and the leader checks it still does).
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Whether this server leads now; the receiver moves when that changes.
pub type Leadership = watch::Receiver<bool>;

/// Looks once (so the answer is known before the loops start), then keeps looking in
/// `bg` until it stops.
pub async fn start(db: Arc<dyn ServerStore>, bg: &crate::background::Background) -> Leadership {
    let first = look(&db).await;
    if first {
        tracing::info!("leading: timers, pollers and lease expiry run on this server");
    }
    let (tx, rx) = watch::channel(first);
    bg.spawn("leadership", async move {
        loop {
            tokio::time::sleep(LOOK_EVERY).await;
            let now = look(&db).await;
            let was = tx.send_replace(now);
            if now && !was {
                tracing::info!("now leading: timers, pollers and lease expiry run on this server");
            } else if was && !now {
                tracing::warn!("no longer leading: another server runs timers and pollers");
            }
        }
    });
    rx
}

/// One look; an error means not leading (a leader that cannot reach the database must
/// not act as one).
async fn look(db: &Arc<dyn ServerStore>) -> bool {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.try_lead()).await {
        Ok(Ok(lead)) => lead,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "asking the database who leads");
            false
        }
        Err(_) => false,
    }
}
