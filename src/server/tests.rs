//! Queue order and the concurrency limit on a fake executor; timers on an injected clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::TimeZone;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::db::{NewRun, ServerStore};
use super::model::{TaskSpec, TimerTrigger, Trigger};
use super::queue::{Cancel, Queue};
use super::runner::{Executor, Job, Outcome};
use super::sqlite::SqliteServer;
use super::watchers::fire_timers;
use crate::exec::Status;

#[derive(Default)]
struct Fake {
    active: AtomicUsize,
    peak: AtomicUsize,
    order: Mutex<Vec<String>>,
}

struct FakeExec(Arc<Fake>, Duration);

impl Executor for FakeExec {
    fn run(&self, job: Job) -> BoxFuture<'static, Outcome> {
        let f = self.0.clone();
        let d = self.1;
        Box::pin(async move {
            let now = f.active.fetch_add(1, Ordering::SeqCst) + 1;
            f.peak.fetch_max(now, Ordering::SeqCst);
            f.order.lock().unwrap().push(job.run.id.clone());
            let status = tokio::select! {
                _ = tokio::time::sleep(d) => Status::Succeeded,
                _ = job.cancel.cancelled() => Status::Canceled,
            };
            f.active.fetch_sub(1, Ordering::SeqCst);
            Outcome {
                status,
                error: None,
                commit: None,
                report: None,
            }
        })
    }
    fn cleanup(&self, _run_id: &str) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

fn setup(concurrency: usize) -> (tempfile::TempDir, Arc<Queue>) {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(SqliteServer::open(&dir.path().join("server.db")).unwrap());
    db.put_task(
        &TaskSpec {
            name: "t".into(),
            context: "/".into(),
            ..Default::default()
        },
        true,
    )
    .unwrap();
    let q = Arc::new(Queue::new(db, concurrency, "127.0.0.1:1".into()));
    (dir, q)
}

fn manual() -> NewRun {
    NewRun {
        task: "t".into(),
        trigger: Trigger::Manual,
        commit: None,
        branch: None,
    }
}

async fn wait_all_finished(q: &Queue, n: usize) {
    for _ in 0..500 {
        let runs = q.db().runs(None, n + 10).unwrap();
        if runs.len() == n && runs.iter().all(|r| r.is_finished()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("runs did not finish");
}

#[tokio::test]
async fn runs_oldest_first_never_above_the_limit_and_none_lost() {
    let (_d, q) = setup(3);
    let fake = Arc::new(Fake::default());
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(q.enqueue(manual()).unwrap().id);
    }
    let stop = CancellationToken::new();
    let h = tokio::spawn(q.clone().run_loop(
        Arc::new(FakeExec(fake.clone(), Duration::from_millis(10))),
        stop.clone(),
    ));
    wait_all_finished(&q, 40).await;
    stop.cancel();
    h.await.unwrap();
    assert_eq!(fake.peak.load(Ordering::SeqCst), 3);
    assert_eq!(
        *fake.order.lock().unwrap(),
        ids,
        "runs start in queue order"
    );
    let runs = q.db().runs(None, 100).unwrap();
    assert!(runs
        .iter()
        .all(|r| r.status == crate::exec::Status::Succeeded));
    // Ids are short, unique and sort by queue order.
    assert!(ids[0].len() <= 4, "{}", ids[0]);
    let seqs: Vec<i64> = runs.iter().rev().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
}

#[tokio::test]
async fn cancel_a_queued_and_a_running_run() {
    let (_d, q) = setup(1);
    let fake = Arc::new(Fake::default());
    let a = q.enqueue(manual()).unwrap().id;
    let b = q.enqueue(manual()).unwrap().id;
    let stop = CancellationToken::new();
    let h = tokio::spawn(q.clone().run_loop(
        Arc::new(FakeExec(fake.clone(), Duration::from_secs(60))),
        stop.clone(),
    ));
    assert_eq!(q.cancel(&b).unwrap(), Cancel::Dequeued);
    for _ in 0..100 {
        if fake.active.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(q.cancel(&a).unwrap(), Cancel::Signalled);
    wait_all_finished(&q, 2).await;
    assert_eq!(
        q.db().run(&a).unwrap().unwrap().status,
        crate::exec::Status::Canceled
    );
    assert_eq!(
        q.db().run(&b).unwrap().unwrap().status,
        crate::exec::Status::Canceled
    );
    assert_eq!(q.cancel(&a).unwrap(), Cancel::AlreadyFinished);
    assert_eq!(q.cancel("nope").unwrap(), Cancel::NotFound);
    stop.cancel();
    h.await.unwrap();
    assert_eq!(*fake.order.lock().unwrap(), vec![a]);
}

#[tokio::test]
async fn interrupted_runs_are_failed_on_recovery_and_queued_ones_kept() {
    let (_d, q) = setup(1);
    let a = q.enqueue(manual()).unwrap().id;
    let b = q.enqueue(manual()).unwrap().id;
    assert_eq!(
        q.db().claim_next("local", 60_000).unwrap().unwrap().run.id,
        a
    );
    let fake = Arc::new(Fake::default());
    let ids = q.recover(&FakeExec(fake, Duration::ZERO)).await.unwrap();
    assert_eq!(ids, vec![a.clone()]);
    let ra = q.db().run(&a).unwrap().unwrap();
    assert_eq!(ra.status, crate::exec::Status::Failed);
    assert_eq!(
        ra.error.as_deref(),
        Some("interrupted by a restart of serve")
    );
    assert_eq!(
        q.db().run(&b).unwrap().unwrap().status,
        crate::exec::Status::Queued
    );
}

#[test]
fn timers_fire_on_an_injected_clock() {
    let (_d, q) = setup(1);
    let mut spec = q.db().task("t").unwrap().unwrap();
    spec.triggers.timers = vec![
        TimerTrigger {
            name: "every5".into(),
            schedule: "*/5 * * * *".into(),
        },
        TimerTrigger {
            name: "hourly".into(),
            schedule: "0 * * * *".into(),
        },
    ];
    q.db().put_task(&spec, false).unwrap();
    let t0 = chrono::Utc.with_ymd_and_hms(2026, 1, 1, 0, 1, 0).unwrap();
    let m = |n| t0 + chrono::Duration::minutes(n);
    assert!(
        fire_timers(&q, t0).unwrap().is_empty(),
        "first look only starts the clock"
    );
    assert!(fire_timers(&q, m(2)).unwrap().is_empty());
    let fired = fire_timers(&q, m(4)).unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(
        fired[0].trigger,
        Trigger::Timer {
            name: "every5".into(),
            schedule: "*/5 * * * *".into(),
            due: Some(m(4).to_rfc3339()),
        }
    );
    assert!(
        fire_timers(&q, m(5)).unwrap().is_empty(),
        "fires once per occurrence"
    );
    // 00:10 (every5) and 01:00 (hourly) both passed: one run each, not one per missed tick.
    let fired = fire_timers(&q, m(60)).unwrap();
    let mut names: Vec<String> = fired
        .iter()
        .map(|r| match &r.trigger {
            Trigger::Timer { name, .. } => name.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    names.sort();
    assert_eq!(names, vec!["every5", "hourly"]);
}

fn push(repo: &str, tag: &str, digest: &str) -> crate::registry::RegistryEvent {
    crate::registry::RegistryEvent {
        action: crate::registry::EventAction::Push,
        repository: repo.into(),
        tag: Some(tag.into()),
        digest: digest.into(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 1,
    }
}

#[test]
fn base_image_pushes_queue_dependents_once_and_never_a_task_on_its_own_output() {
    use super::watchers::on_pushes;
    let (_d, q) = setup(1);
    let reg = "127.0.0.1:5000";
    for name in ["selfish", "other"] {
        q.db()
            .put_task(
                &TaskSpec {
                    name: name.into(),
                    context: "/".into(),
                    ..Default::default()
                },
                true,
            )
            .unwrap();
    }
    // `selfish` builds FROM its own output; `t` and `other` build on base:1.
    q.db()
        .set_dependencies(
            "selfish",
            &[(format!("{reg}/selfish:latest"), Some("sha256:a".into()))],
            &[format!("{reg}/selfish:latest")],
        )
        .unwrap();
    for t in ["t", "other"] {
        q.db()
            .set_dependencies(
                t,
                &[(format!("{reg}/base:1"), Some("sha256:old".into()))],
                &[format!("{reg}/{t}:latest")],
            )
            .unwrap();
    }
    let mut spec = q.db().task("other").unwrap().unwrap();
    spec.triggers.base_image = false;
    q.db().put_task(&spec, false).unwrap();

    assert!(on_pushes(&q, reg, &[push("selfish", "latest", "sha256:b")])
        .unwrap()
        .is_empty());
    assert!(
        on_pushes(&q, reg, &[push("base", "1", "sha256:old")])
            .unwrap()
            .is_empty(),
        "same digest as recorded: nothing to do"
    );
    assert!(on_pushes(&q, reg, &[push("base", "2", "sha256:new")])
        .unwrap()
        .is_empty());
    let queued = on_pushes(
        &q,
        reg,
        &[
            push("base", "1", "sha256:new"),
            push("base", "1", "sha256:newer"),
        ],
    )
    .unwrap();
    assert_eq!(queued.len(), 1, "one run for a burst; `other` opted out");
    assert_eq!(queued[0].task, "t");
    assert!(matches!(
        &queued[0].trigger,
        Trigger::BaseImage { old_digest: Some(o), .. } if o == "sha256:old"
    ));
    assert!(
        on_pushes(&q, reg, &[push("base", "1", "sha256:newest")])
            .unwrap()
            .is_empty(),
        "a run is already waiting: it will build on the newest base"
    );
}

#[test]
fn polled_digest_change_queues_once_even_while_its_run_is_running() {
    use super::watchers::on_remote_digests;
    let (_d, q) = setup(1);
    let base = "mcr.example.com/base:1".to_string();
    q.db()
        .set_dependencies("t", &[(base.clone(), Some("sha256:old".into()))], &[])
        .unwrap();
    let current = |d: &str| std::collections::BTreeMap::from([(base.clone(), Some(d.into()))]);
    assert!(on_remote_digests(&q, &current("sha256:old"))
        .unwrap()
        .is_empty());
    let queued = on_remote_digests(&q, &current("sha256:new")).unwrap();
    assert_eq!(queued.len(), 1);
    assert!(matches!(
        &queued[0].trigger,
        Trigger::BaseImage { image, old_digest: Some(o), new_digest: n }
            if *image == base && o == "sha256:old" && n == "sha256:new"
    ));
    // The run starts (Running) but has not recorded the new digest yet: the next poll
    // sees the same change and must not queue it again.
    let running = q.db().claim_next("local", 60_000).unwrap().unwrap().run;
    assert_eq!(running.id, queued[0].id);
    assert!(on_remote_digests(&q, &current("sha256:new"))
        .unwrap()
        .is_empty());
    // A further change while it runs is new work.
    assert_eq!(
        on_remote_digests(&q, &current("sha256:newer"))
            .unwrap()
            .len(),
        1
    );
    // An unreachable registry (no digest) queues nothing.
    let gone = std::collections::BTreeMap::from([(base.clone(), None)]);
    assert!(on_remote_digests(&q, &gone).unwrap().is_empty());

    // A task whose image of that name was made locally (no registry digest recorded)
    // is never queued by what a registry says: the two are different images.
    q.db()
        .put_task(
            &TaskSpec {
                name: "local".into(),
                context: "/".into(),
                ..Default::default()
            },
            true,
        )
        .unwrap();
    q.db()
        .set_dependencies("local", &[(base.clone(), None)], &[])
        .unwrap();
    let queued = on_remote_digests(&q, &current("sha256:newest")).unwrap();
    assert!(queued.iter().all(|r| r.task != "local"), "{queued:?}");
}

/// Every server-state backend, opened fresh in `dir`: the bodies below run against each
/// (PostgreSQL joins this list).
/// PostgreSQL is in the list when `ACR_TASK_TEST_POSTGRES` names a server
/// (`scripts/with-postgres` starts a throw-away one; `make test` runs these so).
fn store_backends(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn ServerStore>)> {
    let mut out: Vec<(&'static str, Arc<dyn ServerStore>)> = vec![(
        "sqlite",
        Arc::new(SqliteServer::open(&dir.join("server.db")).unwrap()),
    )];
    if let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") {
        let db = crate::pg::fresh_database(&url).unwrap();
        out.push((
            "postgres",
            Arc::new(super::postgres::PgServer::open(&db).unwrap()),
        ));
    }
    out
}

#[test]
fn every_store_backend_queues_claims_and_finishes_runs_in_order() {
    use crate::exec::{RunReport, Status};
    let dir = tempfile::tempdir().unwrap();
    for (name, db) in store_backends(dir.path()) {
        let spec = TaskSpec {
            name: "t".into(),
            context: "/".into(),
            ..Default::default()
        };
        assert!(db.put_task(&spec, true).unwrap(), "{name}");
        assert!(!db.put_task(&spec, true).unwrap(), "{name}: created twice");
        let a = db.enqueue_with(&manual(), None).unwrap();
        let b = db.enqueue_with(&manual(), Some(&spec)).unwrap();
        assert!(a.id.starts_with(db.run_prefix()) && a.seq < b.seq, "{name}");
        assert_eq!(
            db.quick_spec(&b.id).unwrap().map(|s| s.name),
            Some("t".into())
        );
        assert!(db.quick_spec(&a.id).unwrap().is_none(), "{name}");
        assert!(db.has_run_with_status("t", Status::Queued).unwrap());
        // Oldest first; a claimed run can no longer be cancelled as queued.
        let claimed = db.claim_next("local", 60_000).unwrap().unwrap().run;
        assert_eq!(
            (claimed.id.as_str(), claimed.status),
            (a.id.as_str(), Status::Running)
        );
        assert!(!db.cancel_queued(&a.id).unwrap(), "{name}");
        assert!(db.cancel_queued(&b.id).unwrap(), "{name}");
        assert!(db.claim_next("local", 60_000).unwrap().is_none(), "{name}");
        let report = RunReport {
            run_id: a.id.clone(),
            status: Status::Succeeded,
            started_at: "2026-12-03T00:00:00Z".into(),
            duration_ms: 5,
            error: None,
            steps: vec![],
        };
        db.set_commit(&a.id, "abc").unwrap();
        db.finish(&a.id, Status::Succeeded, None, Some(&report))
            .unwrap();
        let done = db.run(&a.id).unwrap().unwrap();
        assert_eq!(done.status, Status::Succeeded, "{name}");
        assert_eq!(done.commit.as_deref(), Some("abc"), "{name}");
        assert_eq!(done.report.map(|r| r.run_id), Some(a.id.clone()), "{name}");
        assert_eq!(db.run(&b.id).unwrap().unwrap().status, Status::Canceled);
        let listed: Vec<String> = db
            .runs(Some("t"), 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(listed, [b.id.clone(), a.id.clone()], "{name}: newest first");
        assert!(db.active_runs("t").unwrap().is_empty(), "{name}");
        // A run cut off by a stop is failed at its server's next start; where one server
        // owns the database every running run is its own, where replicas share it
        // another replica's run ends when its lease does, queued again as its next attempt.
        let c = db.enqueue_with(&manual(), None).unwrap();
        let d = db.enqueue_with(&manual(), None).unwrap();
        let held = db.claim_next("replica-a", 0).unwrap().unwrap();
        assert_eq!(held.run.id, c.id, "{name}");
        if name == "sqlite" {
            assert_eq!(
                db.fail_interrupted("replica-b").unwrap(),
                std::slice::from_ref(&c.id),
                "{name}"
            );
        } else {
            // Another replica's run: left to its lease.
            assert!(
                db.fail_interrupted("replica-b").unwrap().is_empty(),
                "{name}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
            let lapsed = db.expire_leases(3).unwrap();
            assert_eq!(lapsed.len(), 1, "{name}");
            assert!(lapsed[0].requeued && lapsed[0].agent.is_none(), "{name}");
            let again = db.claim_next("replica-b", 60_000).unwrap().unwrap();
            assert_eq!(
                (again.run.id.as_str(), again.run.attempt),
                (c.id.as_str(), 2)
            );
            // The first holder's lease is gone: it can neither renew nor finish.
            assert_eq!(
                db.renew_lease(&c.id, &held.lease, 60_000).unwrap(),
                super::db::LeaseState::Lost
            );
            assert!(!db
                .finish_leased(&c.id, &held.lease, Status::Succeeded, None, None)
                .unwrap());
            assert!(db
                .finish_leased(&c.id, &again.lease, Status::Succeeded, None, None)
                .unwrap());
        }
        assert_eq!(db.run(&d.id).unwrap().unwrap().status, Status::Queued);
    }
}

#[test]
fn every_store_backend_remembers_trigger_state_until_the_task_goes() {
    let dir = tempfile::tempdir().unwrap();
    for (name, db) in store_backends(dir.path()) {
        let spec = TaskSpec {
            name: "t".into(),
            context: "/".into(),
            ..Default::default()
        };
        db.put_task(&spec, true).unwrap();
        assert!(db.record_delivery("github", "d1", "t").unwrap(), "{name}");
        assert!(
            !db.record_delivery("github", "d1", "t").unwrap(),
            "{name}: a replay"
        );
        assert!(db.record_delivery("gitlab", "d1", "t").unwrap(), "{name}");
        db.set_dependencies(
            "t",
            &[("base:1".into(), Some("sha256:x".into()))],
            &["out:1".into()],
        )
        .unwrap();
        db.set_dependencies("t", &[("base:2".into(), None)], &["out:2".into()])
            .unwrap();
        assert_eq!(
            db.base_images().unwrap(),
            [("t".into(), "base:2".into(), None)]
        );
        assert_eq!(db.outputs("t").unwrap(), ["out:2"], "{name}");
        let first = "2026-12-03T00:00:00Z";
        assert!(db.set_timer_fired("t", "nightly", None, first).unwrap());
        assert!(
            !db.set_timer_fired("t", "nightly", None, first).unwrap(),
            "{name}: the first look is recorded once"
        );
        // Two servers that read the same last firing: only one records the next.
        let next = "2026-12-04T00:00:00Z";
        assert!(db
            .set_timer_fired("t", "nightly", Some(first), next)
            .unwrap());
        assert!(!db
            .set_timer_fired("t", "nightly", Some(first), next)
            .unwrap());
        assert_eq!(
            db.timer_last_fired("t", "nightly").unwrap().as_deref(),
            Some(next),
            "{name}"
        );
        db.set_head("t", "abc").unwrap();
        assert_eq!(db.head("t").unwrap().as_deref(), Some("abc"), "{name}");
        assert_eq!(db.registry_cursor().unwrap(), None, "{name}");
        db.set_registry_cursor(42).unwrap();
        assert_eq!(db.registry_cursor().unwrap(), Some(42), "{name}");
        assert!(db.delete_task("t").unwrap(), "{name}");
        assert!(!db.delete_task("t").unwrap(), "{name}");
        assert!(db.base_images().unwrap().is_empty(), "{name}");
        assert!(
            db.timer_last_fired("t", "nightly").unwrap().is_none(),
            "{name}"
        );
        assert!(db.head("t").unwrap().is_none(), "{name}");
    }
}

#[test]
fn every_store_backend_leases_pool_runs_once_and_hands_back_lost_ones() {
    use super::db::{AgentPool, LeaseState};
    use crate::exec::Status;
    let dir = tempfile::tempdir().unwrap();
    for (name, db) in store_backends(dir.path()) {
        let pool = AgentPool {
            name: "p1".into(),
            max_runs: Some(2),
            created_at: String::new(),
        };
        assert!(db.put_pool(&pool, true).unwrap(), "{name}");
        assert!(!db.put_pool(&pool, true).unwrap(), "{name}: made twice");
        let spec = TaskSpec {
            name: "t".into(),
            context: "/".into(),
            agent_pool: Some("p1".into()),
            ..Default::default()
        };
        db.put_task(&spec, true).unwrap();
        let local = TaskSpec {
            name: "l".into(),
            context: "/".into(),
            ..Default::default()
        };
        db.put_task(&local, true).unwrap();
        let runs: Vec<_> = (0..3)
            .map(|_| db.enqueue_with(&manual(), None).unwrap())
            .collect();
        assert!(runs.iter().all(|r| r.pool.as_deref() == Some("p1")));
        let l = db
            .enqueue_with(
                &NewRun {
                    task: "l".into(),
                    ..manual()
                },
                None,
            )
            .unwrap();
        // The server's own executor takes only runs of no pool; agents only their pool's.
        assert_eq!(
            db.claim_next("local", 60_000).unwrap().map(|c| c.run.id),
            Some(l.id.clone())
        );
        assert!(db.claim_next("local", 60_000).unwrap().is_none(), "{name}");
        assert!(db.claim_leased("nope", "a", 60_000).unwrap().is_none());
        let a = db.claim_leased("p1", "agent-a", 60_000).unwrap().unwrap();
        let b = db.claim_leased("p1", "agent-b", 60_000).unwrap().unwrap();
        assert_eq!(
            (a.run.id.as_str(), b.run.id.as_str()),
            (runs[0].id.as_str(), runs[1].id.as_str())
        );
        assert_eq!(a.run.agent.as_deref(), Some("agent-a"));
        // The pool's limit holds across agents.
        assert!(
            db.claim_leased("p1", "agent-c", 60_000).unwrap().is_none(),
            "{name}"
        );
        assert_eq!(db.pool_counts("p1").unwrap(), (1, 2), "{name}");
        // A restart fails the server's own cut-off runs, not runs on agents.
        assert_eq!(
            db.fail_interrupted("local").unwrap(),
            std::slice::from_ref(&l.id),
            "{name}"
        );
        assert_eq!(db.run(&a.run.id).unwrap().unwrap().status, Status::Running);
        // Renewals need the lease; a cancel request reaches the holder.
        assert_eq!(
            db.renew_lease(&a.run.id, "wrong", 60_000).unwrap(),
            LeaseState::Lost
        );
        assert!(db.request_cancel(&b.run.id).unwrap(), "{name}");
        assert_eq!(
            db.renew_lease(&b.run.id, &b.lease, 60_000).unwrap(),
            LeaseState::Held { cancel: true }
        );
        assert!(db
            .finish_leased(&b.run.id, &b.lease, Status::Canceled, None, None)
            .unwrap());
        // A lease that runs out: queued again as attempt 2, and the old holder's late
        // report changes nothing.
        assert!(db.renew_lease(&a.run.id, &a.lease, 0).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(5));
        let expired = db.expire_leases(3).unwrap();
        assert_eq!(expired.len(), 1, "{name}: {expired:?}");
        assert!(expired[0].requeued && expired[0].agent.as_deref() == Some("agent-a"));
        assert!(!db
            .finish_leased(&a.run.id, &a.lease, Status::Succeeded, None, None)
            .unwrap());
        assert_eq!(
            db.renew_lease(&a.run.id, &a.lease, 60_000).unwrap(),
            LeaseState::Lost
        );
        let again = db.claim_leased("p1", "agent-c", 60_000).unwrap().unwrap();
        assert_eq!(
            (again.run.id.as_str(), again.run.attempt),
            (a.run.id.as_str(), 2)
        );
        // Given back by its agent: attempt 3; after the last attempt a lost lease fails it.
        let back = db
            .release_lease(&again.run.id, &again.lease, 3)
            .unwrap()
            .unwrap();
        assert!(back.requeued && back.attempt == 2, "{name}: {back:?}");
        let third = db.claim_leased("p1", "agent-c", 0).unwrap().unwrap();
        assert_eq!(third.run.attempt, 3);
        // Given back with no limit (an agent stopping is no failure): queued again even
        // past the attempts an expiry allows.
        let given = db
            .release_lease(&third.run.id, &third.lease, u32::MAX)
            .unwrap()
            .unwrap();
        assert!(given.requeued && given.attempt == 3, "{name}: {given:?}");
        let third = db.claim_leased("p1", "agent-c", 0).unwrap().unwrap();
        assert_eq!(third.run.attempt, 4);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let e = db.expire_leases(3).unwrap();
        assert!(!e[0].requeued, "{name}");
        let failed = db.run(&a.run.id).unwrap().unwrap();
        assert_eq!(failed.status, Status::Failed);
        assert!(failed
            .error
            .unwrap()
            .contains("(attempt 4, the last: 3 may end this way)"));
        // Agents and pools.
        let agent = super::db::AgentRecord {
            id: "agent-a".into(),
            pool: "p1".into(),
            name: "host".into(),
            labels: Default::default(),
            concurrency: 2,
            version: String::new(),
            registered_at: String::new(),
            last_seen: String::new(),
            draining: false,
        };
        db.put_agent(&agent).unwrap();
        assert!(db.agent_seen("agent-a", true).unwrap());
        assert!(!db.agent_seen("agent-z", false).unwrap());
        let listed = db.agents(Some("p1")).unwrap();
        assert!(listed.len() == 1 && listed[0].draining && !listed[0].last_seen.is_empty());
        assert!(db.delete_pool("p1").unwrap(), "{name}");
        assert!(db.agents(None).unwrap().is_empty(), "{name}");
    }
}

#[test]
fn one_server_leads_and_another_takes_over_when_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteServer::open(&dir.path().join("server.db")).unwrap();
    assert!(sqlite.try_lead().unwrap(), "alone, a server always leads");
    let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") else {
        return;
    };
    let db = crate::pg::fresh_database(&url).unwrap();
    let a = super::postgres::PgServer::open(&db).unwrap();
    let b = super::postgres::PgServer::open(&db).unwrap();
    assert!(a.try_lead().unwrap());
    assert!(!b.try_lead().unwrap(), "one leader at a time");
    assert!(a.try_lead().unwrap(), "the leader keeps leading");
    assert!(!b.try_lead().unwrap());
    // The leader's connection closes with it (a process killed): the lock goes too.
    drop(a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.try_lead().unwrap() {
        assert!(std::time::Instant::now() < deadline, "no takeover");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_run_change_on_one_server_wakes_another() {
    let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") else {
        return;
    };
    let db = crate::pg::fresh_database(&url).unwrap();
    let a = super::postgres::PgServer::open(&db).unwrap();
    let b = super::postgres::PgServer::open(&db).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    b.listen(Arc::new(move |change| {
        let _ = tx.lock().map(|t| t.send(change));
    }))
    .unwrap();
    use super::db::RunChange;
    let wait = || rx.recv_timeout(std::time::Duration::from_secs(10));
    // The first wake-up comes on connecting (what was missed while away).
    assert_eq!(wait().expect("listening"), RunChange::Queued);
    let run = a.enqueue_with(&manual(), None).unwrap();
    assert_eq!(wait().expect("a run queued elsewhere"), RunChange::Queued);
    a.cancel_queued(&run.id).unwrap();
    assert_eq!(wait().expect("a run ended elsewhere"), RunChange::Ended);
}

#[test]
fn every_store_backend_keeps_run_logs_in_order_and_reads_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    for (name, db) in store_backends(dir.path()) {
        let run = db.enqueue_with(&manual(), None).unwrap().id;
        assert!(db.read_log(&run, 0, 100).unwrap().is_empty(), "{name}");
        db.append_log(&run, b"one | first\n").unwrap();
        db.append_log(&run, b"").unwrap();
        db.append_log(&run, b"two | second\nthree | third\n")
            .unwrap();
        let all = b"one | first\ntwo | second\nthree | third\n";
        assert_eq!(db.read_log(&run, 0, 1000).unwrap(), all, "{name}");
        // Any window, across chunk boundaries.
        for (from, max) in [(0, 5), (4, 12), (12, 100), (11, 1), (40, 10), (100, 10)] {
            let want: Vec<u8> = all.iter().skip(from).take(max).copied().collect();
            assert_eq!(
                db.read_log(&run, from as u64, max as u64).unwrap(),
                want,
                "{name}: {from}+{max}"
            );
        }
        // Appends from several writers at once (two replicas) each land whole.
        let busy = db.enqueue_with(&manual(), None).unwrap().id;
        std::thread::scope(|s| {
            for w in 0..4 {
                let (db, busy) = (&db, &busy);
                s.spawn(move || {
                    for i in 0..25 {
                        db.append_log(busy, format!("w{w} | line {i}\n").as_bytes())
                            .unwrap();
                    }
                });
            }
        });
        let text = String::from_utf8(db.read_log(&busy, 0, 1 << 20).unwrap()).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 100, "{name}: {text}");
        lines.sort();
        lines.dedup();
        assert_eq!(lines.len(), 100, "{name}: every line once, whole");
        // Logs are per run; an id that could name a path is refused or finds nothing.
        assert!(db.read_log("other", 0, 100).unwrap().is_empty(), "{name}");
        assert!(db
            .read_log("../server", 0, 100)
            .map(|l| l.is_empty())
            .unwrap_or(true));
    }
}
