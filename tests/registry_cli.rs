//! `acr-task repository ...` and `acr-task registry gc|fsck` on a real data directory, and
//! gc running while pushes continue.

mod registry_common;

use std::process::Command;
use std::time::{Duration, Instant};

use registry_common::*;
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Push an image (config + one layer) tagged with each of `tags`; returns its digest.
async fn push_image(
    c: &reqwest::Client,
    b: &str,
    repo: &str,
    layer: &[u8],
    tags: &[&str],
) -> String {
    let cfg = push_blob(c, b, repo, b"{}").await;
    let l = push_blob(c, b, repo, layer).await;
    let m = serde_json::to_vec(&image_manifest((&cfg, 2), &[(&l, layer.len())])).unwrap();
    for t in tags {
        let r = put_manifest(c, b, repo, t, OCI_MANIFEST, &m).await;
        assert_eq!(r.status(), 201);
    }
    digest(&m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_commands_list_show_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    // `--data` is the top data directory; the registry is its `registry/`.
    let data = dir.path();
    let reg = start_in(&data.join("registry")).await;
    let b = base(&reg);
    let c = reqwest::Client::new();
    let web = push_image(&c, &b, "app/web", b"web layer", &["v1", "v2"]).await;
    push_image(&c, &b, "other", b"other layer", &["latest"]).await;
    let orphan = push_blob(&c, &b, "other", b"never referenced").await;

    // The CLI reads the store beside the running server.
    assert_eq!(
        cli_json(data, &["repository", "list", "-o", "json"]),
        json!(["app/web", "other"])
    );
    assert_eq!(
        cli_ok(data, &["repository", "show-tags", "app/web", "-o", "tsv"]),
        "v1\nv2\n"
    );
    let ms = cli_json(
        data,
        &["repository", "show-manifests", "app/web", "-o", "json"],
    );
    assert_eq!(ms[0]["digest"], web.as_str());
    assert_eq!(ms[0]["tags"], json!(["v1", "v2"]));
    assert_eq!(ms[0]["mediaType"], OCI_MANIFEST);
    let table = cli_ok(data, &["repository", "show-manifests", "app/web"]);
    assert!(table.starts_with("DIGEST"), "{table}");
    assert!(table.contains(&web) && table.contains("v1,v2"), "{table}");

    // A tag given where a repository belongs is refused, with the two commands to use.
    let (ok, _, err) = cli(data, &["repository", "delete", "app/web:v1", "--yes"]);
    assert!(
        !ok && err.contains("repository untag --image app/web:v1"),
        "{err}"
    );
    // Destructive commands ask first; with no terminal to ask, they need --yes.
    let (ok, _, err) = cli(data, &["repository", "delete", "other"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    let store = reg.registry().store().clone();
    let before = store.outbox_last().unwrap();
    cli_ok(data, &["repository", "untag", "--image", "app/web:v1"]);
    assert_eq!(
        cli_json(data, &["repository", "show-tags", "app/web", "-o", "json"]),
        json!(["v2"])
    );
    let r = c
        .get(format!("{b}/v2/app/web/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the running server sees the CLI's delete");
    cli_ok(
        data,
        &[
            "repository",
            "delete",
            "--image",
            &format!("app/web@{web}"),
            "--yes",
        ],
    );
    assert_eq!(
        cli_json(
            data,
            &["repository", "show-manifests", "app/web", "-o", "json"]
        ),
        json!([])
    );
    cli_ok(data, &["repository", "delete", "other", "--yes"]);
    // The CLI's deletes went through the registry's service: each wrote its events (what
    // webhooks and the base-image trigger read), as deletes over the API do.
    let events: Vec<Value> = store
        .outbox_after(before, 100)
        .unwrap()
        .into_iter()
        .map(|(_, p)| serde_json::from_str(&p).unwrap())
        .collect();
    let said: Vec<(String, String, Option<String>)> = events
        .iter()
        .map(|e| {
            (
                e["event"]["action"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["event"]["repository"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["event"]["tag"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert!(
        said.contains(&("delete".into(), "app/web".into(), Some("v1".into()))),
        "{said:?}"
    );
    assert!(
        said.contains(&("delete".into(), "app/web".into(), Some("v2".into()))),
        "{said:?}"
    );
    assert!(
        said.contains(&("delete".into(), "other".into(), Some("latest".into()))),
        "{said:?}"
    );
    assert_eq!(events[0]["context"]["method"], "CLI");
    assert_eq!(
        cli_json(data, &["repository", "list", "-o", "json"]),
        json!(["app/web"])
    );
    let (ok, _, err) = cli(data, &["repository", "delete", "nope", "--yes"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, _, _) = cli(data, &["repository", "show-tags", "nope"]);
    assert!(!ok);

    // Within the grace period nothing goes, and gc says what it kept and why.
    let kept = cli_ok(data, &["registry", "gc"]);
    assert!(
        kept.contains("removed 0 manifests, 0 blobs")
            && kept.contains("4 blobs")
            && kept.contains("younger than the 600 s grace period"),
        "{kept}"
    );
    // Everything is now unreferenced: a dry run lists it and removes nothing.
    let dry = cli_json(
        data,
        &["registry", "gc", "--dry-run", "--grace", "0", "-o", "json"],
    );
    let n = dry["blobs"].as_array().unwrap().len();
    assert_eq!(n, 4, "{dry}"); // {} config, two layers, the orphan
    assert!(dry["blobs"].as_array().unwrap().contains(&json!(orphan)));
    let r = c
        .get(format!("{b}/v2/app/web/blobs/{}", digest(b"web layer")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the web layer is still linked to app/web");
    let gc = cli_json(data, &["registry", "gc", "--grace", "0", "-o", "json"]);
    assert_eq!(gc["blobs"].as_array().unwrap().len(), 4);
    let r = c
        .get(format!("{b}/v2/app/web/blobs/{}", digest(b"web layer")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let fsck = cli_ok(data, &["registry", "fsck"]);
    assert!(fsck.contains("clean"), "{fsck}");
    // `delete --image REPO:TAG` takes the manifest with every tag pointing to it.
    push_image(&c, &b, "multi", b"multi layer", &["a", "b"]).await;
    cli_ok(
        data,
        &["repository", "delete", "--image", "multi:a", "--yes"],
    );
    assert_eq!(
        cli_json(data, &["repository", "show-tags", "multi", "-o", "json"]),
        json!([])
    );
    // The registry directory itself is not a data directory: the error names the right one.
    for args in [&["repository", "list"][..], &["token", "list"]] {
        let (ok, _, err) = cli(&data.join("registry"), args);
        assert!(!ok);
        assert!(
            err.contains("is a registry directory")
                && err.contains(&format!("--data {}", data.display())),
            "{err}"
        );
    }
    reg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_during_pushes_never_breaks_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let store = reg.registry().store().clone();
    let b = base(&reg);
    let c = reqwest::Client::new();
    let stale = push_blob(&c, &b, "busy", b"stale, unreferenced").await;

    let stop = Instant::now() + Duration::from_secs(2);
    let gc_store = store.clone();
    let gc_loop = tokio::task::spawn_blocking(move || {
        let mut runs = 0;
        while Instant::now() < stop {
            gc_store.gc(30, false).unwrap();
            runs += 1;
        }
        runs
    });
    let mut pushed = Vec::new();
    let mut i = 0u32;
    while Instant::now() < stop {
        let layer = format!("layer {i}");
        let tag = format!("t{i}");
        pushed.push((
            tag.clone(),
            push_image(&c, &b, "busy", layer.as_bytes(), &[&tag]).await,
        ));
        i += 1;
    }
    let runs = gc_loop.await.unwrap();
    assert!(
        runs > 1 && pushed.len() > 5,
        "{runs} gc runs, {} pushes",
        pushed.len()
    );
    for (tag, d) in &pushed {
        let r = c
            .get(format!("{b}/v2/busy/manifests/{tag}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    }
    // With no grace, the stale blob goes and every tagged image stays whole.
    let report = store.gc(-1, false).unwrap();
    assert_eq!(report.blobs, vec![stale]);
    let fsck = store.fsck().unwrap();
    assert!(fsck.is_clean(), "{:?}", fsck.issues);
    for i in 0..pushed.len() {
        let d = digest(format!("layer {i}").as_bytes());
        let r = c
            .head(format!("{b}/v2/busy/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    reg.shutdown().await;
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(dir.path());
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli_http(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "acr-task {args:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_commands_over_http_raise_events() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let b = base(&reg);
    let addr = reg.addr().to_string();
    let c = reqwest::Client::new();
    let d = push_image(&c, &b, "web/app", b"layer", &["v1", "v2"]).await;
    let mut events = reg.registry().subscribe();
    let list: Value = serde_json::from_str(&cli_http(&[
        "repository",
        "list",
        "--registry",
        &addr,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(list, json!(["web/app"]));
    let tags = cli_http(&[
        "repository",
        "show-tags",
        "web/app",
        "--registry",
        &addr,
        "-o",
        "tsv",
    ]);
    assert_eq!(tags, "v1\nv2\n");
    let ms: Value = serde_json::from_str(&cli_http(&[
        "repository",
        "show-manifests",
        "web/app",
        "--registry",
        &addr,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(ms[0]["digest"], d.as_str());
    assert_eq!(ms[0]["tags"], json!(["v1", "v2"]));
    cli_http(&[
        "repository",
        "untag",
        "--image",
        "web/app:v1",
        "--registry",
        &addr,
    ]);
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.tag.as_deref(), Some("v1"));
    // az's semantics: the manifest v2 names goes, with every tag that points to it.
    cli_http(&[
        "repository",
        "delete",
        "--image",
        "web/app:v2",
        "--yes",
        "--registry",
        &addr,
    ]);
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.digest, d);
    assert_eq!(reg.registry().tags("web/app").await.unwrap(), Some(vec![]));
    let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(["repository", "show-tags", "nope", "--registry", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME_UNKNOWN"));
    reg.shutdown().await;
}
