//! Scheduling semantics against a fake runtime (no Docker): ordering, parallelism bounds,
//! failure propagation, timeouts and cancellation. The same behaviours are also exercised
//! on the real engine in `tests/run_docker.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::runtime::{BuildOutput, RuntimeError};
use crate::task::{RunInfo, Values};

/// `cmd: sleep MS [EXIT]`: sleeps then exits with EXIT (default 0).
#[derive(Default)]
struct Fake {
    running: AtomicUsize,
    max_running: AtomicUsize,
    order: Mutex<Vec<String>>,
    removed: Mutex<Vec<String>>,
}

impl Runtime for Fake {
    async fn ping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn create_network(
        &self,
        _: &str,
        _: Option<&str>,
        _: bool,
        _: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn remove_network(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn network_gateway(
        &self,
        _: &str,
    ) -> Result<Option<crate::runtime::NetworkGateway>, RuntimeError> {
        Ok(None)
    }
    async fn create_volume(
        &self,
        _: &str,
        _: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn remove_volume(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn fill_volume(
        &self,
        _: &str,
        _: Option<crate::runtime::VolumeSource<'_>>,
        _: &BTreeMap<String, Vec<u8>>,
        _: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn read_volume_file(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, RuntimeError> {
        Ok(Some(b"FROM scratch\n".to_vec()))
    }
    async fn ensure_image(
        &self,
        _: &str,
        _: PullPolicy,
        _: Option<&str>,
        _: Option<&crate::runtime::Credential>,
        _: &LogSink,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn build(&self, _: &BuildSpec, _: &LogSink) -> Result<BuildOutput, RuntimeError> {
        Ok(BuildOutput {
            image_id: "sha256:fake".into(),
        })
    }
    async fn run(&self, spec: &ContainerSpec, log: &LogSink) -> Result<i64, RuntimeError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.order.lock().unwrap().push(spec.name.clone());
        log(format!("running {}", spec.name));
        let ms: u64 = spec.args.first().and_then(|a| a.parse().ok()).unwrap_or(0);
        let code: i64 = spec.args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
        // Decrement even when the future is dropped (timeout/cancel).
        struct Done<'a>(&'a AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _done = Done(&self.running);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(code)
    }
    async fn start_detached(&self, _: &ContainerSpec, _: &LogSink) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn remove_container(&self, name: &str) -> Result<(), RuntimeError> {
        self.removed.lock().unwrap().push(name.to_string());
        Ok(())
    }
    async fn push(
        &self,
        image: &str,
        _: Option<&crate::runtime::Credential>,
        _: &LogSink,
    ) -> Result<String, RuntimeError> {
        Ok(format!("sha256:{:0>64}", image.len()))
    }
    async fn image_digest(
        &self,
        _: &str,
    ) -> Result<Option<crate::runtime::ImageIdentity>, RuntimeError> {
        Ok(None)
    }
    async fn image_label(&self, _: &str, _: &str) -> Result<Option<Option<String>>, RuntimeError> {
        Ok(Some(None))
    }
    async fn remove_run_resources(&self, _: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
}

async fn run_yaml(
    yaml: &str,
    max_parallel: usize,
    cancel: CancellationToken,
) -> (RunReport, Arc<Fake>, Vec<Event>) {
    let task = crate::task::load_str("test.yaml", yaml, &RunInfo::default(), &Values::default())
        .expect("valid task");
    let plan = Plan::new(&task).expect("plan");
    let fake = Arc::new(Fake::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cfg = RunConfig::for_run("t1", std::env::temp_dir(), max_parallel);
    let report = execute(
        fake.clone(),
        Arc::new(task),
        Arc::new(plan),
        cfg,
        tx,
        cancel,
    )
    .await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (report, fake, events)
}

#[tokio::test]
async fn independent_steps_run_together_up_to_max_parallel() {
    let yaml = "steps:\n".to_string()
        + &(0..6)
            .map(|i| format!("  - id: s{i}\n    when: ['-']\n    cmd: sleep 100\n"))
            .collect::<String>();
    let (report, fake, _) = run_yaml(&yaml, 4, CancellationToken::new()).await;
    assert!(report.succeeded());
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 4);
    let (_, fake, _) = run_yaml(&yaml, 1, CancellationToken::new()).await;
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn steps_without_when_run_in_file_order() {
    let yaml = "steps:\n  - id: a\n    cmd: sleep 30\n  - id: b\n    cmd: sleep 10\n  - id: c\n    cmd: sleep 1\n";
    let (report, fake, _) = run_yaml(yaml, 8, CancellationToken::new()).await;
    assert!(report.succeeded());
    assert_eq!(*fake.order.lock().unwrap(), vec!["t1_a", "t1_b", "t1_c"]);
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failure_cancels_running_steps_and_skips_the_rest() {
    let yaml = "steps:\n  - id: long\n    when: ['-']\n    cmd: sleep 100000\n  - id: bad\n    when: ['-']\n    cmd: sleep 10 2\n  - id: after\n    when: [bad]\n    cmd: sleep 1\n";
    let (report, fake, events) = run_yaml(yaml, 8, CancellationToken::new()).await;
    assert_eq!(report.status, Status::Failed);
    assert_eq!(
        report.error.as_deref(),
        Some("step `bad` failed: exited with code 2")
    );
    let by_id = |id: &str| report.steps.iter().find(|s| s.id == id).unwrap().clone();
    assert_eq!(by_id("bad").exit_code, Some(2));
    assert_eq!(by_id("long").status, Status::Canceled);
    assert_eq!(by_id("after").status, Status::Skipped);
    assert!(
        fake.removed
            .lock()
            .unwrap()
            .contains(&"t1_long".to_string()),
        "canceled container removed"
    );
    assert!(matches!(events.last(), Some(Event::RunFinished { .. })));
}

#[tokio::test]
async fn step_and_total_timeouts() {
    let yaml = "steps:\n  - id: slow\n    cmd: sleep 5000\n    timeout: 1\n";
    let (report, _, _) = run_yaml(yaml, 8, CancellationToken::new()).await;
    assert_eq!(report.steps[0].status, Status::TimedOut);
    assert_eq!(
        report.steps[0].error.as_deref(),
        Some("step slow timed out after 1 s")
    );
    let yaml =
        "totalTimeout: 1\nsteps:\n  - id: a\n    cmd: sleep 600\n  - id: b\n    cmd: sleep 5000\n";
    let (report, _, _) = run_yaml(yaml, 8, CancellationToken::new()).await;
    assert_eq!(report.status, Status::TimedOut);
    assert_eq!(report.steps[0].status, Status::Succeeded);
    assert_eq!(report.steps[1].status, Status::Canceled);
}

#[tokio::test]
async fn retries_repeat_and_ignore_errors() {
    let yaml = "steps:\n  - id: flaky\n    cmd: sleep 1 1\n    retries: 2\n    retryDelay: 0\n    ignoreErrors: true\n  - id: rep\n    cmd: sleep 1\n    repeat: 3\n";
    let (report, _, _) = run_yaml(yaml, 8, CancellationToken::new()).await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.steps[0].attempts, 3);
    assert!(report.steps[0].ignored_error);
    assert_eq!(report.steps[1].attempts, 4);
}

#[tokio::test]
async fn cancel_stops_the_run() {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.cancel();
    });
    let yaml = "steps:\n  - id: a\n    cmd: sleep 100000\n  - id: b\n    cmd: sleep 1\n";
    let (report, _, _) = run_yaml(yaml, 8, cancel).await;
    assert_eq!(report.status, Status::Canceled);
    assert_eq!(report.steps[0].status, Status::Canceled);
    assert_eq!(report.steps[1].status, Status::Skipped);
}

#[tokio::test]
async fn push_reports_digests() {
    let yaml = "steps:\n  - push: [r/a:1, r/b:2]\n";
    let (report, _, _) = run_yaml(yaml, 8, CancellationToken::new()).await;
    assert!(report.succeeded());
    assert_eq!(report.steps[0].id, "acb_step_0");
    assert_eq!(report.steps[0].pushed.len(), 2);
    assert_eq!(report.steps[0].pushed[1].image, "r/b:2");
}
