//! Background loops that queue runs: registry pushes (base-image updates), cron timers,
//! polled remote branches and watched local checkouts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::db::{DbError, NewRun};
use super::model::{RunRecord, Trigger};
use super::queue::Queue;
use crate::registry::client::{RegistryClient, Transport};
use crate::registry::reference::ImageRef;
use crate::registry::{EventAction, Registry, RegistryEvent};
use crate::triggers::cron::Clock;
use crate::triggers::{base_image, cron, git};

pub struct Watchers {
    pub queue: Arc<Queue>,
    pub registry: Registry,
    pub registry_host: String,
    pub clock: Arc<dyn Clock>,
    pub halt: CancellationToken,
    /// Seconds between digest checks of base images in other registries (0: never).
    pub remote_poll: u64,
    pub remote: Transport,
    /// Whether this server leads the servers sharing its database: timers, pollers and
    /// watched checkouts queue runs only on the leader (once for everyone).
    pub leading: super::leader::Leadership,
}

impl Watchers {
    fn leads(&self) -> bool {
        *self.leading.borrow()
    }
}

/// Pushes that arrive within this window are handled together (a storm queues once).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Starts the loops into `bg`; they end when it stops (`halt` is its token).
pub fn spawn_all(w: Watchers, bg: &crate::background::Background) {
    let w = Arc::new(w);
    bg.spawn("base-image trigger", base_images(w.clone()));
    bg.spawn("timers", timers(w.clone()));
    bg.spawn("commit watcher", commits(w.clone()));
    if w.remote_poll > 0 {
        bg.spawn("remote base-image poller", remote_bases(w));
    }
}

/// Polls base images that live in other registries (`HEAD` on the manifest, Docker's
/// token flow where asked) and queues the tasks built on one whose digest changed.
async fn remote_bases(w: Arc<Watchers>) {
    // One client per registry host: it keeps the host's scheme and tokens between polls.
    let mut clients: BTreeMap<String, RegistryClient> = BTreeMap::new();
    // Images whose last poll failed: warned about once, until a poll succeeds again.
    let mut failing = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = w.halt.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(w.remote_poll)) => {}
        }
        if !w.leads() {
            continue;
        }
        let bases = match w.queue.db().base_images() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reading the base-image index");
                continue;
            }
        };
        // One request per image, however many tasks use it.
        let mut current: BTreeMap<String, Option<String>> = BTreeMap::new();
        for (_, base, recorded) in &bases {
            // A base with no registry digest was made locally: no registry can say it moved.
            if recorded.is_none()
                || current.contains_key(base)
                || base_image::local_repo_tag(base, &w.registry_host).is_some()
            {
                continue;
            }
            let Some(image) = ImageRef::parse(base).filter(|r| !r.is_digest()) else {
                continue;
            };
            let host = image.api_host().to_string();
            let client = clients
                .entry(host.clone())
                .or_insert_with(|| RegistryClient::new(host, w.remote.clone()));
            let digest = match client.manifest_digest(&image).await {
                Ok(d) => {
                    if failing.remove(base) {
                        tracing::info!(image = %base, "base image poll works again");
                    }
                    d
                }
                Err(e) => {
                    if failing.insert(base.clone()) {
                        tracing::warn!(image = %base, error = %e, "base image poll failed (said once until it works again)");
                    } else {
                        tracing::debug!(image = %base, error = %e, "base image poll");
                    }
                    None
                }
            };
            current.insert(base.clone(), digest);
        }
        if let Err(e) = on_remote_digests(&w.queue, &current) {
            tracing::error!(error = %e, "base-image poll");
        }
    }
}

/// Queues each task whose recorded digest of a polled base image differs from `current`.
pub fn on_remote_digests(
    queue: &Queue,
    current: &BTreeMap<String, Option<String>>,
) -> Result<Vec<RunRecord>, DbError> {
    let db = queue.db();
    let mut queued = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (task, base, recorded) in db.base_images()? {
        // No recorded registry digest: the base was made locally, nothing to compare.
        let (Some(Some(digest)), Some(old)) = (current.get(&base), &recorded) else {
            continue;
        };
        if old == digest || seen.contains(&task) {
            continue;
        }
        let Some(spec) = db.task(&task)? else {
            continue;
        };
        if !spec.triggers.base_image {
            continue;
        }
        // A queued run will build on the new digest anyway, and one already started for
        // this very digest will record it: polling again before it ends must not re-queue.
        let busy = db.active_runs(&task)?.iter().any(|r| {
            r.status == crate::exec::Status::Queued
                || matches!(&r.trigger, Trigger::BaseImage { image, new_digest, .. }
                    if *image == base && new_digest == digest)
        });
        if busy {
            continue;
        }
        seen.insert(task.clone());
        queued.push(queue.enqueue(NewRun {
            task: task.clone(),
            trigger: Trigger::BaseImage {
                image: base.clone(),
                old_digest: recorded.clone(),
                new_digest: digest.clone(),
            },
            commit: None,
            branch: spec.is_git().then(|| spec.branch().to_string()),
        })?);
    }
    Ok(queued)
}

/// The base-image trigger reads the registry's event outbox from its cursor in the
/// server's store: pushes accepted while the task service was down (or that a crash cut
/// off) still queue their dependents when it starts. Only the leader reads it, from the
/// saved cursor each time, so replicas sharing a registry queue each push's dependents
/// once and a new leader goes on where the last one stopped.
async fn base_images(w: Arc<Watchers>) {
    let mut rx = w.registry.subscribe();
    let db = w.queue.db().clone();
    loop {
        if w.leads() {
            if let Err(e) = base_image_pass(&w, &db).await {
                tracing::error!(error = %e, "base-image trigger");
            }
        }
        // Wait for a push (or, as a safety net, a few seconds), then let a burst settle.
        tokio::select! {
            _ = w.halt.cancelled() => return,
            r = rx.recv() => {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                    return;
                }
                tokio::select! {
                    _ = w.halt.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Reads the outbox from the saved cursor to its end, queues the dependents of the tags
/// pushed and saves the cursor past them.
async fn base_image_pass(
    w: &Watchers,
    db: &Arc<dyn super::db::ServerStore>,
) -> Result<(), super::ServerError> {
    let cursor = match db.registry_cursor()? {
        Some(c) => c,
        // First start: begin at the outbox's end, and remember that at once.
        None => {
            let last = w.registry.last_event_seq().await?;
            db.set_registry_cursor(last)?;
            last
        }
    };
    let mut batch: BTreeMap<(String, String), RegistryEvent> = BTreeMap::new();
    let mut next = cursor;
    loop {
        let events = w.registry.events_after(next, 1024).await?;
        let Some(last) = events.last().map(|(seq, _)| *seq) else {
            break;
        };
        for (_, e) in events {
            if let (EventAction::Push, Some(tag)) = (e.event.action, e.event.tag.clone()) {
                // The latest push of a tag wins within a batch.
                batch.insert((e.event.repository.clone(), tag), e.event);
            }
        }
        next = last;
    }
    if next != cursor {
        let events: Vec<RegistryEvent> = batch.into_values().collect();
        on_pushes(&w.queue, &w.registry_host, &events)?;
        db.set_registry_cursor(next)?;
    }
    Ok(())
}

/// Queues every task whose recorded base image was replaced by one of `events`; returns
/// the runs queued. A task is queued at most once per batch, never for its own output,
/// and not while it already has a run waiting.
pub fn on_pushes(
    queue: &Queue,
    registry_host: &str,
    events: &[RegistryEvent],
) -> Result<Vec<RunRecord>, DbError> {
    let db = queue.db();
    let mut queued = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (task, base, recorded) in db.base_images()? {
        if seen.contains(&task) {
            continue;
        }
        for ev in events {
            let Some(tag) = ev.tag.as_deref() else {
                continue;
            };
            if !base_image::needs_rebuild(
                &base,
                recorded.as_deref(),
                registry_host,
                &ev.repository,
                tag,
                &ev.digest,
            ) {
                continue;
            }
            let Some(spec) = db.task(&task)? else { break };
            if !spec.triggers.base_image {
                break;
            }
            if base_image::is_own_output(&db.outputs(&task)?, registry_host, &ev.repository, tag) {
                tracing::info!(task = %task, image = %base, "not rebuilding a task on its own output");
                break;
            }
            seen.insert(task.clone());
            if db.has_run_with_status(&task, crate::exec::Status::Queued)? {
                break;
            }
            let rec = queue.enqueue(NewRun {
                task: task.clone(),
                trigger: Trigger::BaseImage {
                    image: base.clone(),
                    old_digest: recorded.clone(),
                    new_digest: ev.digest.clone(),
                },
                commit: None,
                branch: spec.is_git().then(|| spec.branch().to_string()),
            })?;
            queued.push(rec);
            break;
        }
    }
    Ok(queued)
}

async fn timers(w: Arc<Watchers>) {
    loop {
        if w.leads() {
            if let Err(e) = fire_timers(&w.queue, w.clock.now()) {
                tracing::error!(error = %e, "timer trigger");
            }
        }
        tokio::select! {
            _ = w.halt.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Queues a run for every timer that fired since it was last looked at, as of `now`.
/// A timer seen for the first time starts counting from `now`.
pub fn fire_timers(queue: &Queue, now: DateTime<Utc>) -> Result<Vec<RunRecord>, DbError> {
    let db = queue.db();
    let mut queued = Vec::new();
    let stamp = now.to_rfc3339();
    for spec in db.tasks()? {
        for t in &spec.triggers.timers {
            let Ok(c) = cron::parse(&t.schedule) else {
                continue;
            };
            let seen = db.timer_last_fired(&spec.name, &t.name)?;
            let last = seen
                .as_deref()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|d| d.with_timezone(&Utc));
            let Some(last) = last else {
                db.set_timer_fired(&spec.name, &t.name, seen.as_deref(), &stamp)?;
                continue;
            };
            // Recorded first, on the condition that no one else did: a firing is queued
            // once even by two servers that both think they lead for a moment.
            let Some(due) = cron::due(&c, last, now) else {
                continue;
            };
            if db.set_timer_fired(&spec.name, &t.name, seen.as_deref(), &stamp)? {
                queued.push(queue.enqueue(NewRun {
                    task: spec.name.clone(),
                    trigger: Trigger::Timer {
                        name: t.name.clone(),
                        schedule: t.schedule.clone(),
                        due: Some(due.to_rfc3339()),
                    },
                    commit: None,
                    branch: spec.is_git().then(|| spec.branch().to_string()),
                })?);
            }
        }
    }
    Ok(queued)
}

/// How often a watched local checkout is also polled, in case a file event was missed.
const LOCAL_SAFETY_POLL: Duration = Duration::from_secs(30);

/// Watches the refs of a task's local checkout with `notify` (inotify on Linux): a commit
/// moves `refs/heads/<branch>` (or `packed-refs`), and the task's name is sent to `tx`.
fn watch_refs(
    name: &str,
    context: &str,
    tx: &tokio::sync::mpsc::UnboundedSender<String>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let repo = git2::Repository::discover(context).ok()?;
    let git_dir = repo.path().to_path_buf();
    let (tx, task) = (tx.clone(), name.to_string());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.send(task.clone());
        }
    })
    .ok()?;
    watcher
        .watch(&git_dir, notify::RecursiveMode::NonRecursive)
        .ok()?;
    watcher
        .watch(
            &git_dir.join("refs/heads"),
            notify::RecursiveMode::Recursive,
        )
        .ok()?;
    Some(watcher)
}

/// Polls remote branches (at each task's interval); watches local checkouts' refs with
/// `notify`, polling them now and then as a safety net.
async fn commits(w: Arc<Watchers>) {
    let mut next_poll: BTreeMap<String, tokio::time::Instant> = BTreeMap::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut watched: BTreeMap<String, (String, notify::RecommendedWatcher)> = BTreeMap::new();
    let mut touched: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    loop {
        let q = w.queue.clone();
        if let Ok(tasks) = q.db().tasks() {
            let local: BTreeMap<String, String> = tasks
                .iter()
                .filter(|t| !t.is_git() && t.triggers.commit.as_ref().is_some_and(|c| c.watch))
                .map(|t| (t.name.clone(), t.context.clone()))
                .collect();
            watched.retain(|name, (ctx, _)| local.get(name) == Some(ctx));
            for (name, ctx) in local {
                if let std::collections::btree_map::Entry::Vacant(slot) = watched.entry(name) {
                    if let Some(watcher) = watch_refs(slot.key(), &ctx, &tx) {
                        slot.insert((ctx, watcher));
                    }
                }
            }
        }
        let mut due: Vec<String> = std::mem::take(&mut touched).into_iter().collect();
        due.extend({
            let now = tokio::time::Instant::now();
            match q.db().tasks() {
                Ok(tasks) => tasks
                    .into_iter()
                    .filter(|t| {
                        let Some(c) = &t.triggers.commit else {
                            return false;
                        };
                        let interval = if t.is_git() {
                            match c.poll_interval {
                                Some(s) => Duration::from_secs(s.max(1)),
                                None => return false,
                            }
                        } else if c.watch {
                            LOCAL_SAFETY_POLL
                        } else {
                            return false;
                        };
                        let at = next_poll.get(&t.name).copied().unwrap_or(now);
                        if at <= now {
                            next_poll.insert(t.name.clone(), now + interval);
                            true
                        } else {
                            false
                        }
                    })
                    .map(|t| t.name)
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "reading tasks");
                    Vec::new()
                }
            }
        });
        due.sort();
        due.dedup();
        if !due.is_empty() && w.leads() {
            let q2 = q.clone();
            let r = tokio::task::spawn_blocking(move || {
                for name in due {
                    if let Err(e) = check_head(&q2, &name) {
                        tracing::warn!(task = %name, error = %e, "commit trigger");
                    }
                }
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "commit trigger task");
            }
        }
        tokio::select! {
            _ = w.halt.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            Some(name) = rx.recv() => {
                touched.insert(name);
                // A commit writes several files: take the burst as one look.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while let Ok(n) = rx.try_recv() {
                    touched.insert(n);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("git: {0}")]
    Git(#[from] git2::Error),
}

/// Queues a run when the task's branch moved since last seen (the first look only records).
fn check_head(queue: &Queue, name: &str) -> Result<Option<RunRecord>, HeadError> {
    let db = queue.db();
    let Some(spec) = db.task(name)? else {
        return Ok(None);
    };
    let branch = spec.branch().to_string();
    let (head, source) = if spec.is_git() {
        (git::remote_branch_head(&spec.context, &branch)?, "poll")
    } else {
        (
            git::local_branch_head(std::path::Path::new(&spec.context), &branch)?,
            "watch",
        )
    };
    let Some(head) = head else { return Ok(None) };
    let before = db.head(name)?;
    if before.as_deref() == Some(head.as_str()) {
        return Ok(None);
    }
    db.set_head(name, &head)?;
    if before.is_none() {
        return Ok(None);
    }
    let rec = queue.enqueue(NewRun {
        task: name.to_string(),
        trigger: Trigger::Commit {
            source: source.into(),
            delivery: None,
            commit: head.clone(),
            branch: branch.clone(),
        },
        commit: Some(head),
        branch: Some(branch),
    })?;
    Ok(Some(rec))
}
