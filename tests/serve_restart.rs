//! A killed and restarted `serve` keeps its queue and history: queued runs still run; the
//! run that was cut off is marked Failed and its containers are removed.

mod serve_common;

use std::time::Duration;

use serde_json::json;
use serve_common::*;

#[tokio::test(flavor = "multi_thread")]
async fn killed_serve_keeps_queue_and_history() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("d");
    let ctx = |d: &str| data_file(d).display().to_string();
    let mut serve = Serve::start(&dir, 1);
    let api = serve.client();
    for (name, d) in [("sleepy", "sleep"), ("hello", "hello")] {
        let (st, v) = api
            .post("/api/tasks", &json!({"name": name, "context": ctx(d)}))
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let (_, v) = api.post("/api/tasks/hello/runs", &json!({})).await;
    let done = v["id"].as_str().unwrap().to_string();
    api.wait_status(&done, &["Succeeded"], Duration::from_secs(60))
        .await;
    let (_, v) = api.post("/api/tasks/sleepy/runs", &json!({})).await;
    let long = v["id"].as_str().unwrap().to_string();
    // Concurrency 1: this one waits behind the long run.
    let (_, v) = api.post("/api/tasks/hello/runs", &json!({})).await;
    let queued = v["id"].as_str().unwrap().to_string();
    api.wait_status(&long, &["Running"], Duration::from_secs(30))
        .await;
    let mut up = false;
    for _ in 0..200 {
        if leftovers(&long).iter().any(|l| l.starts_with("ps ")) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the long run's container never started");
    assert_eq!(
        api.get(&format!("/api/runs/{queued}")).await.1["status"],
        "Queued"
    );

    serve.kill();
    assert!(
        !leftovers(&long).is_empty(),
        "a SIGKILL leaves the run's resources behind"
    );

    let serve = Serve::start(&dir, 1);
    let api = serve.client();
    let v = api
        .wait_status(&long, &["Failed"], Duration::from_secs(10))
        .await;
    assert_eq!(v["error"], "interrupted by a restart of serve");
    let v = api
        .wait_status(&queued, &["Succeeded", "Failed"], Duration::from_secs(60))
        .await;
    assert_eq!(v["status"], "Succeeded", "{v}\n{}", serve.stderr());
    assert!(leftovers(&long).is_empty(), "{:?}", leftovers(&long));
    // History survived: all three runs, newest first.
    let (_, runs) = api.get("/api/runs").await;
    let ids: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![queued.as_str(), long.as_str(), done.as_str()]);
    assert_eq!(
        api.get(&format!("/api/runs/{done}")).await.1["status"],
        "Succeeded"
    );
}
