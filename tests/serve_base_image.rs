//! Base-image trigger: pushing a new base image to our registry rebuilds the task that
//! builds FROM it, once, and the new image records the new base digest. Base images in
//! other registries (plain HTTP on loopback; HTTPS with a private CA and token auth) are
//! polled by digest to the same effect.

mod serve_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use serve_common::*;

fn docker(args: &[&str]) -> String {
    docker_as(None, args)
}

/// The docker CLI, with its own config dir (`docker login`s land there) when given.
fn docker_as(config: Option<&Path>, args: &[&str]) -> String {
    let mut c = Command::new("docker");
    if let Some(dir) = config {
        c.env("DOCKER_CONFIG", dir);
    }
    let o = c.args(args).output().unwrap();
    assert!(
        o.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Builds `image` FROM busybox with a distinguishing label, pushes it, returns its digest.
fn push_base(image: &str, version: &str) -> String {
    push_base_as(None, image, version)
}

fn push_base_as(config: Option<&Path>, image: &str, version: &str) -> String {
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
    let out = docker_as(config, &["push", image]);
    out.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in push output: {out}"))
        .to_string()
}

fn base_digest(run: &Value) -> Option<String> {
    run["report"]["steps"].as_array()?.iter().find_map(|s| {
        s["built"]["baseImages"][0]["digest"]
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
    assert_eq!(t["oldDigest"], d1.as_str());
    assert_eq!(t["newDigest"], d2.as_str());
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

/// Creates task `name` building FROM `base` and runs it once; the run must succeed and
/// record `digest`. Returns the context (keep it alive) and the run id.
async fn build_on(api: &Api, name: &str, base: &str, digest: &str) -> (tempfile::TempDir, String) {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {base}\n")).unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        format!(
            "version: v1.1.0\nsteps:\n  - id: build\n    build: -t $Registry/{name}:latest .\n"
        ),
    )
    .unwrap();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": name, "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api
        .post(&format!("/api/tasks/{name}/runs"), &json!({}))
        .await;
    let first = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&first, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}");
    assert_eq!(base_digest(&run).as_deref(), Some(digest), "{run}");
    (ctx, first)
}

/// The first run of `task` other than `first`, waited for up to a minute.
async fn next_run(serve: &Serve, task: &str, first: &str) -> Value {
    let api = serve.client();
    let start = std::time::Instant::now();
    loop {
        let runs = api.runs(task).await;
        if let Some(r) = runs.iter().find(|r| r["id"] != first) {
            return r.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no run of {task} after {first}:\n{}",
            serve.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A base image pushed while the task service is down (its registry served alone on the
/// same address and data) still rebuilds the dependent task when `serve` comes back: the
/// trigger reads the registry's event outbox from where it stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_base_push_while_the_task_service_is_down_is_caught_up() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let d = data.path().join("d");
    let mut serve = Serve::start(&d, 1);
    let addr = serve.addr.clone();
    let base = format!("{addr}/base/down:1");
    let d1 = push_base(&base, "before");
    let (_ctx, first) = build_on(&serve.client(), "caught", &base, &d1).await;
    serve.kill();

    // Only the registry runs, on the same address and data: the push lands in the outbox.
    let registry = Serve::start_at(&addr, &d, 1, &["--registry-only"], &[]);
    let d2 = push_base(&base, "while-down");
    drop(registry);

    let serve = Serve::start_at(&addr, &d, 1, &[], &[]);
    let rebuilt = next_run(&serve, "caught", &first).await;
    assert_eq!(rebuilt["trigger"]["kind"], "base_image", "{rebuilt}");
    assert_eq!(rebuilt["trigger"]["oldDigest"], d1.as_str());
    assert_eq!(rebuilt["trigger"]["newDigest"], d2.as_str());
}

/// A task built FROM `base`, in a registry that `serve` polls: runs once on `d1`; when
/// `push_new` moves the tag, exactly one run is queued with both digests and records the
/// new one.
async fn polled_base_rebuilds_once(
    serve: &Serve,
    base: &str,
    d1: &str,
    push_new: impl Fn() -> String,
) {
    let api = serve.client();
    let (_ctx, first) = build_on(&api, "down", base, d1).await;
    // Polls see the same digest: nothing queued.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(api.runs("down").await.len(), 1, "{}", serve.stderr());

    let d2 = push_new();
    assert_ne!(d1, d2);
    let rebuilt = next_run(serve, "down", &first).await;
    let t = &rebuilt["trigger"];
    assert_eq!(t["kind"], "base_image", "{rebuilt}");
    assert_eq!(t["image"], base);
    assert_eq!(t["oldDigest"], d1);
    assert_eq!(t["newDigest"], d2.as_str());
    let id = rebuilt["id"].as_str().unwrap();
    let done = api
        .wait_status(id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(base_digest(&done).as_deref(), Some(d2.as_str()), "{done}");
    // Once, though polls went on while it ran: later ones find the recorded digest.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(api.runs("down").await.len(), 2, "{}", serve.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_image_in_another_registry_is_polled_by_digest() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    // The "other" registry: a second acr-task serving only its registry.
    let other = Serve::start_with(&data.path().join("other"), 1, &["--registry-only"]);
    let serve = Serve::start_with(&data.path().join("d"), 2, &["--base-image-poll", "1"]);
    let base = format!("{}/upstream/base:1", other.addr);
    let d1 = push_base(&base, "up-one");
    polled_base_rebuilds_once(&serve, &base, &d1, || push_base(&base, "up-two")).await;
}

/// `acr` with `--data DIR`, which must succeed; its (stdout, stderr).
fn acr(data: &Path, args: &[&str]) -> (String, String) {
    let o = Command::new(bin())
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "acr-task {args:?}: {err}");
    (out, err)
}

/// The other registry over HTTPS (a certificate from the test CA) with auth and no
/// anonymous pull: `serve` trusts the CA through `--ca-cert`, and follows Docker's token
/// flow with the credentials `docker login` stored in DOCKER_CONFIG.
#[tokio::test(flavor = "multi_thread")]
async fn a_base_image_in_a_tls_registry_with_token_auth_is_polled() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let other_data = data.path().join("other");
    acr(
        &other_data,
        &[
            "scope-map",
            "create",
            "rw",
            "--repository",
            "upstream/*",
            "content/read",
            "content/write",
        ],
    );
    let (out, _) = acr(
        &other_data,
        &[
            "token",
            "create",
            "builder",
            "--scope-map",
            "rw",
            "-o",
            "json",
        ],
    );
    let created: Value = serde_json::from_str(&out).unwrap();
    let password = created["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no password in {out}"))
        .to_string();
    let (cert, key) = (tls("server.pem"), tls("server-key.pem"));
    let other = Serve::start_with(
        &other_data,
        1,
        &[
            "--registry-only",
            "--auth",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let config = data.path().join("docker-config");
    docker_login(&config, &other.addr, "builder", &password);

    let ca = tls("ca.pem");
    let serve = Serve::start_with_env(
        &data.path().join("d"),
        1,
        &["--base-image-poll", "1", "--ca-cert", &ca],
        &[("DOCKER_CONFIG", &config)],
    );
    let base = format!("{}/upstream/base:1", other.addr);
    let d1 = push_base_as(Some(&config), &base, "tls-one");
    polled_base_rebuilds_once(&serve, &base, &d1, || {
        push_base_as(Some(&config), &base, "tls-two")
    })
    .await;
}
