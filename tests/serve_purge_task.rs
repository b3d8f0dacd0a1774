//! `acr purge` inside a stored task on `acr-task serve --auth`, as in ACR: the run's own
//! login may purge its registry (and only through the conditional deletes of ACR's API),
//! keeping the newest tag and deleting the manifests left untagged. Real engine.

mod serve_common;

use std::time::Duration;

use serde_json::{json, Value};
use serve_common::registry_common::remove_images_of;
use serve_common::{require_docker, Serve};

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_task_purges_its_registry_with_acr_purge() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 1, &["--auth"]);
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nARG N\nLABEL n=$N\n",
    )
    .unwrap();
    // Two images, three tags: old:1 and old:2 name the first, new:1 the second.
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n\
         \x20 - build: -t $Registry/purged/app:old1 -t $Registry/purged/app:old2 --build-arg N=1 .\n\
         \x20 - push: [\"$Registry/purged/app:old1\", \"$Registry/purged/app:old2\"]\n\
         \x20 - build: -t $Registry/purged/app:new1 --build-arg N=2 .\n\
         \x20 - push: [\"$Registry/purged/app:new1\"]\n\
         \x20 - id: purge\n\
         \x20   cmd: acr purge --filter 'purged/.*:^old' --ago 0d --untagged\n",
    )
    .unwrap();
    let api = serve.client();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "tidy", "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = api.post("/api/tasks/tidy/runs", &json!({})).await;
    assert_eq!(st, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(
            &id,
            &["Succeeded", "Failed", "TimedOut"],
            Duration::from_secs(240),
        )
        .await;
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    remove_images_of(&serve.addr);
    assert_eq!(run["status"], "Succeeded", "{run}\n{log}");
    assert!(
        log.contains("Number of deleted tags: 2") && log.contains("Number of deleted manifests: 1"),
        "{log}"
    );
    let (ok, out, err) = serve.acr(&["repository", "show-manifests", "purged/app", "-o", "json"]);
    assert!(ok, "{err}");
    let ms: Value = serde_json::from_str(&out).unwrap();
    let ms = ms.as_array().unwrap();
    assert_eq!(ms.len(), 1, "{ms:?}");
    assert_eq!(ms[0]["tags"], json!(["new1"]));
}
