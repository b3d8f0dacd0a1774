//! A stored task with a signing key (a secret reference): its push steps sign what they
//! push on `acr-task serve`, and `acr-task verify` accepts the signature. Real engine.

mod serve_common;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use serve_common::registry_common::remove_images_of;
use serve_common::{require_docker, Serve};

fn out(c: &mut Command) -> (bool, String, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_task_signs_what_it_pushes_with_its_signing_key() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let secrets = data.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let serve = Serve::start_with(
        &data.path().join("d"),
        1,
        &["--secret-dir", &secrets.display().to_string()],
    );
    let (ok, _, err) = out(serve.cli().current_dir(&secrets).arg("generate-key-pair"));
    assert!(ok, "{err}");

    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nLABEL signed=yes\n",
    )
    .unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - build: -t $Registry/signed/app:v1 .\n  - push: [\"$Registry/signed/app:v1\"]\n",
    )
    .unwrap();
    let context = ctx.path().display().to_string();
    let create = |key: &str| {
        out(serve.cli().args([
            "task",
            "create",
            "app",
            "--context",
            &context,
            "--signing-key",
            key,
            "--server",
            &serve.url,
        ]))
    };
    // A key in plain text (or a path) is refused: only references are stored.
    let (ok, _, err) = create("cosign.key");
    assert!(!ok && err.contains("secret reference"), "{err}");
    let reference = format!("file:{}", secrets.join("cosign.key").display());
    let (ok, _, err) = create(&reference);
    assert!(ok, "{err}");

    let api = serve.client();
    let (st, v) = api.post("/api/tasks/app/runs", &json!({})).await;
    assert_eq!(st, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(
            &id,
            &["Succeeded", "Failed", "TimedOut"],
            Duration::from_secs(180),
        )
        .await;
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    remove_images_of(&serve.addr);
    assert_eq!(run["status"], "Succeeded", "{run}\n{log}");
    assert!(
        log.contains("signed ") && log.contains("signed/app:v1"),
        "{log}"
    );
    // The key itself never reaches the log.
    let key = std::fs::read_to_string(secrets.join("cosign.key")).unwrap();
    assert!(!log.contains(&key[30..70]));

    let (ok, out, err) = out(serve.cli().current_dir(&secrets).args([
        "verify",
        &format!("{}/signed/app:v1", serve.addr),
        "--key",
        "cosign.pub",
    ]));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("Verified"), "{out}");
}
