//! `acr-task serve` tasks and runs over HTTP and through `acr-task task`, on the real
//! Docker Engine.

mod serve_common;

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use serve_common::*;

fn ctx(name: &str) -> String {
    data_file(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_crud_and_validation() {
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 2);
    let api = serve.client();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "hello", "context": ctx("hello")}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["triggers"]["baseImage"], true);
    let (st, _) = api
        .post(
            "/api/tasks",
            &json!({"name": "hello", "context": ctx("hello")}),
        )
        .await;
    assert_eq!(st, 409, "a second create of the same name is refused");

    // An invalid task file is refused with the validation messages.
    let bad = std::fs::read_to_string(data_file("invalid.yaml")).unwrap();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "bad", "context": ctx("hello"), "task_yaml": bad}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let diags = v["diagnostics"].as_array().unwrap();
    assert!(!diags.is_empty(), "{v}");
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    // A missing task file in the context, an invalid cron, a relative context.
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "nofile", "context": ctx("hello"), "file": "missing.yaml"}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "cron", "context": ctx("hello"),
                    "triggers": {"timers": [{"name": "t", "schedule": "61 * * * *"}]}}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cron"), "{v}");
    let (st, _) = api
        .post("/api/tasks", &json!({"name": "rel", "context": "some/dir"}))
        .await;
    assert_eq!(st, 400);
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "plat", "context": ctx("hello"), "platform": "linux/sparc"}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("sparc"), "{v}");
    let (st, _) = api.get("/api/tasks/bad").await;
    assert_eq!(st, 404, "refused tasks are not stored");

    // Update keeps validation; then show, list, delete.
    let (st, v) = api
        .send(
            Method::PUT,
            "/api/tasks/hello",
            &json!({"name": "hello", "context": ctx("hello"), "timeout": 600,
                    "triggers": {"timers": [{"name": "nightly", "schedule": "0 3 * * *"}]}}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = api.get("/api/tasks/hello").await;
    assert_eq!(v["timeout"], 600);
    assert_eq!(v["triggers"]["timers"][0]["schedule"], "0 3 * * *");
    let (st, _) = api
        .send(
            Method::PUT,
            "/api/tasks/hello",
            &json!({"name": "hello", "context": ctx("hello"), "task_yaml": bad}),
        )
        .await;
    assert_eq!(st, 400);

    // The CLI shows the same.
    let out = serve
        .cli()
        .args(["task", "list", "--server", &serve.url, "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "hello");
    let out = serve
        .cli()
        .args(["task", "create", "bad", "--server", &serve.url, "--context"])
        .arg(data_file("hello"))
        .arg("--inline")
        .arg(data_file("invalid.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the task file is invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (st, _) = api
        .send(Method::DELETE, "/api/tasks/hello", &json!({}))
        .await;
    assert_eq!(st, 204);
    let (st, _) = api.get("/api/tasks/hello").await;
    assert_eq!(st, 404);
    let (st, _) = api.post("/api/tasks/hello/runs", &json!({})).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_are_queued_logged_listed_and_canceled() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 2);
    let api = serve.client();
    for (name, dir) in [("hello", "hello"), ("sleepy", "sleep")] {
        let (st, v) = api
            .post("/api/tasks", &json!({"name": name, "context": ctx(dir)}))
            .await;
        assert_eq!(st, 201, "{v}");
    }
    // The CLI queues, follows the log to the end and exits 0.
    let out = serve
        .cli()
        .args(["task", "run", "hello", "--follow", "--server", &serve.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", serve.stderr());
    let runs = api.runs("hello").await;
    assert_eq!(runs.len(), 1);
    let id = runs[0]["id"].as_str().unwrap().to_string();
    assert!(
        stdout.contains(&format!("hello | hello-from-{id}")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("Run {id} Succeeded")), "{stdout}");
    let run = &runs[0];
    assert_eq!(run["status"], "Succeeded");
    assert_eq!(run["trigger"]["kind"], "manual");
    assert_eq!(run["report"]["steps"][0]["status"], "Succeeded");
    assert!(run["startedAt"].is_string() && run["finishedAt"].is_string());
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert!(log.contains(&format!("hello-from-{id}")), "{log}");

    // Cancel a running run: it ends Canceled and leaves nothing behind.
    let (st, v) = api.post("/api/tasks/sleepy/runs", &json!({})).await;
    assert_eq!(st, 202, "{v}");
    let sid = v["id"].as_str().unwrap().to_string();
    api.wait_status(&sid, &["Running"], Duration::from_secs(30))
        .await;
    // Wait until its container exists, so that the cancel stops a real step.
    for _ in 0..100 {
        if leftovers(&sid).iter().any(|l| l.starts_with("ps ")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = serve
        .cli()
        .args(["task", "cancel-run", &sid, "--server", &serve.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = api
        .wait_status(
            &sid,
            &["Canceled", "Failed", "Succeeded"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(v["status"], "Canceled", "{v}");
    assert!(leftovers(&sid).is_empty(), "{:?}", leftovers(&sid));
    let (st, _) = api
        .post(&format!("/api/runs/{sid}/cancel"), &json!({}))
        .await;
    assert_eq!(st, 409, "a finished run cannot be canceled");

    // list-runs in the CLI: newest first.
    let out = serve
        .cli()
        .args(["task", "list-runs", "--server", &serve.url, "-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["id"], sid.as_str());
    assert_eq!(v[1]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_over_the_task_timeout_ends_timed_out_and_cleaned_up() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 1);
    let api = serve.client();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "slow", "context": ctx("sleep"), "timeout": 3}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api.post("/api/tasks/slow/runs", &json!({})).await;
    let id = v["id"].as_str().unwrap().to_string();
    // Follow the log over HTTP while it runs: the stream ends when the run does.
    let started = std::time::Instant::now();
    let out = serve
        .cli()
        .args(["task", "logs", &id, "--follow", "--server", &serve.url])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the 120 s sleep was cut short"
    );
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains(&format!("run {id}: TimedOut")), "{log}");
    let (_, v) = api.get(&format!("/api/runs/{id}")).await;
    assert_eq!(v["status"], "TimedOut", "{v}");
    assert_eq!(v["error"], "the run timed out after 3 s");
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_platform_is_applied_to_its_runs() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 2);
    let api = serve.client();
    for (name, platform) in [("amd", "linux/amd64"), ("arm", "linux/arm64")] {
        let (st, v) = api
            .post(
                "/api/tasks",
                &json!({"name": name, "context": ctx("hello"), "platform": platform}),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let (_, v) = api.post("/api/tasks/amd/runs", &json!({})).await;
    let amd = v["id"].as_str().unwrap().to_string();
    let (_, v) = api.post("/api/tasks/arm/runs", &json!({})).await;
    let arm = v["id"].as_str().unwrap().to_string();
    let done = api
        .wait_status(&amd, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    // The engine is asked for arm64 and says the local amd64 image does not match.
    let done = api
        .wait_status(&arm, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "Failed", "{done}");
    let log = api.text(&format!("/api/runs/{arm}/logs")).await;
    assert!(
        log.contains("does not match the specified platform"),
        "{log}"
    );
}
