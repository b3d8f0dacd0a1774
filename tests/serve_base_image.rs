//! Base-image trigger: pushing a new base image to our registry rebuilds the task that
//! builds FROM it, once, and the new image records the new base digest.

mod serve_common;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use serve_common::*;

fn docker(args: &[&str]) -> String {
    let o = Command::new("docker").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Builds `image` FROM busybox with a distinguishing label, pushes it, returns its digest.
fn push_base(image: &str, version: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM busybox\nLABEL base.version={version}\n"),
    )
    .unwrap();
    docker(&[
        "build",
        "-q",
        "-t",
        image,
        &dir.path().display().to_string(),
    ]);
    let out = docker(&["push", image]);
    out.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in push output: {out}"))
        .to_string()
}

fn base_digest(run: &Value) -> Option<String> {
    run["report"]["steps"].as_array()?.iter().find_map(|s| {
        s["built"]["base_images"][0]["digest"]
            .as_str()
            .map(str::to_string)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn new_base_digest_rebuilds_the_dependent_task_once() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 2);
    let api = serve.client();
    let reg = serve.addr.clone();
    let base = format!("{reg}/base/img:1");
    let d1 = push_base(&base, "one");

    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {base}\n")).unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - id: build\n    build: -t $Registry/app:latest .\n  - id: push\n    push: [\"$Registry/app:latest\"]\n",
    )
    .unwrap();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "app", "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api.post("/api/tasks/app/runs", &json!({})).await;
    let first = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&first, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}\n{}", serve.stderr());
    assert_eq!(base_digest(&run).as_deref(), Some(d1.as_str()), "{run}");
    // Its own push of app:latest (its output) queued nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(api.runs("app").await.len(), 1);

    let d2 = push_base(&base, "two");
    assert_ne!(d1, d2);
    let mut runs = Vec::new();
    for _ in 0..100 {
        runs = api.runs("app").await;
        if runs.len() > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.len(), 2, "the base push queued one run: {runs:?}");
    let t = &runs[0]["trigger"];
    assert_eq!(t["kind"], "base_image", "{t}");
    assert_eq!(t["image"], base.as_str());
    assert_eq!(t["old_digest"], d1.as_str());
    assert_eq!(t["new_digest"], d2.as_str());
    let id = runs[0]["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}");
    assert_eq!(base_digest(&run).as_deref(), Some(d2.as_str()), "{run}");
    // Pushing the same digest again (a retag of the same image) changes nothing.
    docker(&["push", &base]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(api.runs("app").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_image_in_another_registry_is_polled_by_digest() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    // The "other" registry: a second acr-task serving only its registry.
    let other = Serve::start_with(&data.path().join("other"), 1, &["--registry-only"]);
    let serve = Serve::start_with(&data.path().join("d"), 2, &["--base-image-poll", "1"]);
    let api = serve.client();
    let base = format!("{}/upstream/base:1", other.addr);
    let d1 = push_base(&base, "up-one");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {base}\n")).unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - id: build\n    build: -t $Registry/down:latest .\n",
    )
    .unwrap();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "down", "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api.post("/api/tasks/down/runs", &json!({})).await;
    let first = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&first, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}");
    assert_eq!(base_digest(&run).as_deref(), Some(d1.as_str()), "{run}");
    // Polls see the same digest: nothing queued.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(api.runs("down").await.len(), 1);

    let d2 = push_base(&base, "up-two");
    let mut runs = Vec::new();
    for _ in 0..100 {
        runs = api.runs("down").await;
        if runs.len() > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.len(), 2, "{}", serve.stderr());
    let t = &runs[0]["trigger"];
    assert_eq!(t["kind"], "base_image");
    assert_eq!(t["old_digest"], d1.as_str());
    assert_eq!(t["new_digest"], d2.as_str());
}
