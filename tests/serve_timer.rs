//! Timer trigger through the binary: `serve` on a clock that starts just before a minute
//! boundary and runs 30× faster, a task with two cron timers made by `task create`, and
//! runs that record which timer fired.

mod serve_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serve_common::*;

#[tokio::test(flavor = "multi_thread")]
async fn two_cron_timers_fire_and_each_run_names_its_timer() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(
        &data.path().join("d"),
        2,
        &[
            "--clock-start",
            "2026-01-01T00:00:50Z",
            "--clock-rate",
            "30",
        ],
    );
    let api = serve.client();
    let ctx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/serve/hello");
    let out = serve
        .cli()
        .args([
            "task",
            "create",
            "nightly",
            "--server",
            &serve.url,
            "--context",
        ])
        .arg(&ctx)
        .args([
            "--timer",
            "every-minute=* * * * *",
            "--timer",
            "even-minutes=*/2 * * * *",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "task create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad expression is refused at create, with the reason.
    let bad = serve
        .cli()
        .args(["task", "create", "bad", "--server", &serve.url, "--context"])
        .arg(&ctx)
        .args(["--timer", "oops=61 * * * *"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("oops") && err.contains("61 * * * *"), "{err}");

    // One real second is 30 s on the server's clock: both timers fire within seconds.
    let start = Instant::now();
    let mut fired = BTreeSet::new();
    while fired.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timers did not both fire: {fired:?}\n{}",
            serve.stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        for run in api.runs("nightly").await {
            let t = &run["trigger"];
            assert_eq!(t["kind"], "timer", "{run}");
            let schedule = match t["name"].as_str() {
                Some("every-minute") => "* * * * *",
                Some("even-minutes") => "*/2 * * * *",
                other => panic!("unknown timer {other:?}: {run}"),
            };
            assert_eq!(t["schedule"], schedule, "{run}");
            fired.insert(t["name"].as_str().unwrap().to_string());
        }
    }
    // The runs really ran the task.
    let first = api.runs("nightly").await.last().cloned().unwrap();
    let id = first["id"].as_str().unwrap();
    let done = api
        .wait_status(id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert!(log.contains(&format!("hello-from-{id}")), "{log}");
}
