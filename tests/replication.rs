//! Geo-replication between real `acr-task serve` processes on loopback, each a region
//! with its own data directory and `--auth`: images pushed with the docker CLI and skopeo
//! to different replicas are pulled (and run) from the others; content held before a
//! replica joined reaches it (its backfill, then `Ready`); a tag moved on two replicas
//! at once ends on the same digest everywhere; a delete on one disappears on all; a
//! replica killed with SIGKILL during a stream of pushes, and the origin itself, catch
//! up after a restart with every digest present; a lower tier is refused.

mod serve_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use serve_common::registry_common::{digest, image_manifest, push_blob, put_manifest, run};
use serve_common::{docker_login, make_busybox_image, require_docker, sample, Serve};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

fn start(dir: &Path, name: &str, extra: &[&str]) -> Serve {
    let mut args = vec!["--auth"];
    args.extend_from_slice(extra);
    Serve::start_with(&dir.join(name), 1, &args)
}

/// `acr-task replication ARGS -o json` against `s`, which must succeed.
fn replication(s: &Serve, args: &[&str]) -> Value {
    let (ok, out, err) = s.acr(&[&["replication"], args, &["-o", "json"]].concat());
    assert!(
        ok,
        "replication {args:?} failed:\n{out}\n{err}\n{}",
        s.stderr()
    );
    serde_json::from_str(&out).unwrap()
}

fn join(home: &Serve, name: &str, replica: &Serve) -> Value {
    replication(
        home,
        &[
            "create",
            name,
            "--url",
            &replica.url,
            &format!("--password={}", replica.password),
        ],
    )
}

/// The digest `repo:reference` names on `s` (admin's token), or None.
async fn resolve(s: &Serve, repo: &str, reference: &str) -> Option<String> {
    let c = s.registry_client(repo).await;
    serve_common::registry_common::resolve(&c, &s.url, repo, reference).await
}

/// Waits until `f` holds (checked every 200 ms), or fails saying what did not happen.
async fn until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `s` holds token `name` (asked with the admin's login, so no failed login
/// is counted against the token's).
async fn until_token(s: &Serve, name: &str) {
    until(
        &format!("token {name} reaches {}", s.addr),
        Duration::from_secs(30),
        || async { s.acr(&["token", "show", name]).0 },
    )
    .await;
}

async fn everywhere(servers: &[&Serve], repo: &str, reference: &str) -> Option<String> {
    let mut seen = Vec::new();
    for s in servers {
        seen.push(resolve(s, repo, reference).await);
    }
    seen.windows(2)
        .all(|w| w[0] == w[1])
        .then(|| seen[0].clone())
        .flatten()
}

/// Pushes a small image (config and one layer, `marker` making it unique) by the API.
async fn push_small(s: &Serve, repo: &str, tag: &str, marker: &str) -> String {
    let c = s.registry_client(repo).await;
    let layer = format!("layer {marker}").into_bytes();
    let config = format!("{{\"marker\":\"{marker}\"}}").into_bytes();
    let l = push_blob(&c, &s.url, repo, &layer).await;
    let cfg = push_blob(&c, &s.url, repo, &config).await;
    let m =
        serde_json::to_vec(&image_manifest((&cfg, config.len()), &[(&l, layer.len())])).unwrap();
    let r = put_manifest(&c, &s.url, repo, tag, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    digest(&m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_take_pushes_anywhere_and_converge() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        start(dir.path(), "a", &[]),
        start(dir.path(), "b", &[]),
        start(dir.path(), "c", &[]),
    );
    let all = [&a, &b, &c];
    let docker = dir.path().join("docker");
    for s in all {
        docker_login(&docker, &s.addr, "admin", &s.password);
    }
    let dockercli = |args: &[&str]| {
        run(Command::new("docker")
            .env("DOCKER_CONFIG", &docker)
            .args(args));
    };

    // Held by the home registry before there is any replica: the backfill brings it.
    let image_a = format!("{}/team/app:v1", a.addr);
    make_busybox_image(&image_a, "pushed to the home region");
    dockercli(&["push", &image_a]);
    let before = resolve(&a, "team/app", "v1").await.unwrap();
    // More than a backfill's batch, over two repositories.
    let mut held = Vec::new();
    for i in 0..45 {
        let repo = if i % 3 == 0 { "base/few" } else { "team/many" };
        let tag = format!("t{i}");
        let d = push_small(&a, repo, &tag, &format!("held {i}")).await;
        held.push((repo, tag, d));
    }

    // A lower tier is refused, saying why.
    let basic = start(dir.path(), "basic", &["--sku", "Basic"]);
    let (ok, _, err) = a.acr(&[
        "replication",
        "create",
        "low",
        "--url",
        &basic.url,
        "--password",
        &basic.password,
    ]);
    assert!(!ok && err.contains("Premium"), "{err}");
    drop(basic);

    let west = join(&a, "west", &b);
    assert_eq!(west["name"], "west");
    join(&a, "east", &c);
    let list = replication(&a, &["list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["home", "east", "west"], "{list}");
    until(
        "the image held before reaches both replicas",
        Duration::from_secs(60),
        || async { everywhere(&all, "team/app", "v1").await.as_deref() == Some(before.as_str()) },
    )
    .await;
    for (repo, tag, d) in &held {
        for s in [&b, &c] {
            until(
                &format!("{repo}:{tag} backfilled"),
                Duration::from_secs(60),
                || async { resolve(s, repo, tag).await.as_deref() == Some(d.as_str()) },
            )
            .await;
        }
    }
    until("both replicas Ready", Duration::from_secs(30), || async {
        let l = replication(&a, &["list"]);
        l.as_array().unwrap().iter().all(|r| r["status"] == "Ready")
    })
    .await;

    // Scope maps, tokens and webhooks are the registry's: made on one replica, they hold
    // on every one; a token deleted on another stops working everywhere.
    let ok = |s: &Serve, args: &[&str]| {
        let (ok, out, err) = s.acr(args);
        assert!(ok, "{args:?}: {out}\n{err}");
        out
    };
    ok(
        &a,
        &[
            "scope-map",
            "create",
            "readers",
            "--repository",
            "team/*",
            "content/read",
            "metadata/read",
        ],
    );
    let made: Value = serde_json::from_str(&ok(
        &a,
        &[
            "token",
            "create",
            "reader",
            "--scope-map",
            "readers",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    let reader = made["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    ok(
        &b,
        &[
            "webhook",
            "create",
            "audit",
            "--uri",
            "http://127.0.0.1:9/hook",
            "--actions",
            "push",
            "--allow-private-destination",
        ],
    );
    let login = |s: &Serve| {
        let url = format!(
            "{}/oauth2/token?service=acr-task&scope=repository:team/app:pull",
            s.url
        );
        let pw = reader.clone();
        async move {
            reqwest::Client::new()
                .get(url)
                .basic_auth("reader", Some(pw))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Waited for by name, then one login: logins failed while it is on its way would
    // meet the server's brake on failed logins.
    until_token(&c, "reader").await;
    assert_eq!(
        login(&c).await,
        200,
        "the token made on home logs in on east"
    );
    until(
        "the webhook made on west is listed on east",
        Duration::from_secs(30),
        || async {
            c.acr(&["webhook", "list", "-o", "json"])
                .1
                .contains("\"audit\"")
        },
    )
    .await;
    // Deleted where it was not made: gone everywhere.
    ok(&c, &["webhook", "delete", "audit", "-y"]);
    until(
        "the webhook deleted on east is gone on west",
        Duration::from_secs(30),
        || async {
            !b.acr(&["webhook", "list", "-o", "json"])
                .1
                .contains("\"audit\"")
        },
    )
    .await;
    let reader_docker = dir.path().join("reader-docker");
    docker_login(&reader_docker, &c.addr, "reader", &reader);
    run(Command::new("docker")
        .env("DOCKER_CONFIG", &reader_docker)
        .args(["pull", &format!("{}/team/app:v1", c.addr)]));
    ok(&b, &["token", "delete", "reader", "-y"]);
    until(
        "the token deleted on west fails on home",
        Duration::from_secs(30),
        || async { login(&a).await == 401 },
    )
    .await;

    // A push with the docker CLI to one replica, with skopeo to another: each is pulled
    // from the others.
    let image_b = format!("{}/team/api:v1", b.addr);
    make_busybox_image(&image_b, "pushed to west");
    dockercli(&["push", &image_b]);
    let auth_c = format!("admin:{}", c.password);
    run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &auth_c,
        &format!("docker-daemon:{image_a}"),
        &format!("docker://{}/tools/cli:2.0", c.addr),
    ]));
    for (repo, tag) in [("team/api", "v1"), ("tools/cli", "2.0")] {
        until(
            &format!("{repo}:{tag} on every replica"),
            Duration::from_secs(60),
            || async { everywhere(&all, repo, tag).await.is_some() },
        )
        .await;
    }
    // Pulled through another region and run.
    let from_c = format!("{}/team/api:v1", c.addr);
    dockercli(&["pull", &from_c]);
    let out = run(Command::new("docker").args(["run", "--rm", &from_c]));
    assert_eq!(out.trim(), "pushed to west");
    dockercli(&["rmi", &from_c, &image_b, &image_a]);

    // One tag moved on two replicas at once: every replica ends on the same digest.
    for round in 0..3 {
        let (ma, mb) = (format!("a{round}"), format!("b{round}"));
        let (x, y) = tokio::join!(
            push_small(&a, "team/moving", "latest", &ma),
            push_small(&b, "team/moving", "latest", &mb),
        );
        let start = Instant::now();
        let won = loop {
            if let Some(d) = everywhere(&all, "team/moving", "latest").await {
                break d;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let mut seen = Vec::new();
                for s in all {
                    seen.push(resolve(s, "team/moving", "latest").await);
                }
                panic!(
                    "the moved tag did not converge: {seen:?} (pushed {x} to home, {y} to west)"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(won == x || won == y, "{won} is neither push");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            everywhere(&all, "team/moving", "latest").await.as_deref(),
            Some(won.as_str()),
            "it stays"
        );
    }

    // A delete on one replica disappears on all.
    let gone = resolve(&b, "tools/cli", "2.0").await.unwrap();
    let cl = b.registry_client("tools/cli").await;
    let r = cl
        .delete(format!("{}/v2/tools/cli/manifests/{gone}", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for s in all {
        until(
            "the delete reaches every replica",
            Duration::from_secs(30),
            || async { resolve(s, "tools/cli", &gone).await.is_none() },
        )
        .await;
    }

    // Nothing left to send, and the table names everyone.
    until("no lag", Duration::from_secs(30), || async {
        let l = replication(&b, &["list"]);
        l.as_array().unwrap().iter().all(|r| r["lagEvents"] == 0)
    })
    .await;
    let (ok, table, _) = a.acr(&["replication", "list"]);
    assert!(
        ok && table.contains("home (this server)") && table.contains("Ready"),
        "{table}"
    );

    // East's endpoint turned off: it is kept in step but serves no client.
    replication(
        &a,
        &["update", "east", "--region-endpoint-enabled", "false"],
    );
    let quiet = push_small(&a, "team/quiet", "v1", "while east is off").await;
    let cl = c.registry_client("team/quiet").await;
    let r = cl
        .get(format!("{}/v2/team/quiet/manifests/v1", c.url))
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("region endpoint is disabled"));
    let pull = Command::new("docker")
        .env("DOCKER_CONFIG", &docker)
        .args(["pull", &format!("{}/team/api:v1", c.addr)])
        .output()
        .unwrap();
    assert!(
        !pull.status.success(),
        "a client pulled from a disabled endpoint"
    );
    until(
        "east applied what home took meanwhile",
        Duration::from_secs(30),
        || async {
            let e = replication(&a, &["show", "east"]);
            e["lagEvents"] == 0 && e["regionEndpointEnabled"] == false
        },
    )
    .await;
    replication(&a, &["update", "east", "--region-endpoint-enabled", "true"]);
    assert_eq!(
        resolve(&c, "team/quiet", "v1").await.as_deref(),
        Some(quiet.as_str())
    );

    // Removed: west leaves the group (the group's secret changes, so what it kept no
    // longer works) and no longer receives what home accepts; home and east, under the
    // new secret, stay in step both ways.
    let (ok, _, err) = a.acr(&["replication", "delete", "west", "-y"]);
    assert!(ok, "{err}");
    let later = push_small(&a, "team/after", "v1", "after west left").await;
    until("east still in step", Duration::from_secs(30), || async {
        resolve(&c, "team/after", "v1").await.as_deref() == Some(later.as_str())
    })
    .await;
    let back = push_small(&c, "team/after", "v2", "from east after west left").await;
    until(
        "home hears east under the new secret",
        Duration::from_secs(30),
        || async { resolve(&a, "team/after", "v2").await.as_deref() == Some(back.as_str()) },
    )
    .await;
    until("west left the group", Duration::from_secs(30), || async {
        replication(&b, &["list"])
            .as_array()
            .is_some_and(|l| l.is_empty())
    })
    .await;
    let names: Vec<String> = replication(&c, &["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["east", "home"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(resolve(&b, "team/after", "v1").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_killed_during_pushes_catch_up_with_every_digest() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), "a", &[]);
    let mut b = start(dir.path(), "b", &[]);
    join(&a, "west", &b);
    let b_addr = b.addr.clone();

    let mut pushed = Vec::new();
    for i in 0..30 {
        if i == 10 {
            b.kill(); // the receiver dies mid-stream
        }
        pushed.push((
            format!("v{i}"),
            push_small(&a, "stream/app", &format!("v{i}"), &format!("m{i}")).await,
        ));
    }
    // A delete made while west is down reaches it when it is back.
    let (gone_tag, gone) = pushed.remove(3);
    let cl = a.registry_client("stream/app").await;
    let r = cl
        .delete(format!("{}/v2/stream/app/manifests/{gone}", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Home's /metrics shows west behind, and failing, while it is down.
    let west = |series: &str| format!("acr_task_replication_{series}{{replica=\"west\"}}");
    let api = a.token_client().await;
    until(
        "home's metrics show west behind and failing",
        Duration::from_secs(30),
        || async {
            let m = api.text("/metrics").await;
            sample(&m, &west("lag_events")).is_some_and(|n| n >= 1.0)
                && sample(&m, &west("lag_seconds")).is_some()
                && sample(&m, &west("failing")) == Some(1.0)
                && sample(&m, &west("ready")) == Some(1.0)
        },
    )
    .await;
    // So does the registry's page, to the admin: west's row, with its last error.
    let page = a.page("/ui/registry").await;
    let row = page
        .split("<tr id=\"replica-west\">")
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row for west:\n{page}"));
    assert!(row.contains("Ready") && row.contains(" events, "), "{row}");
    assert!(!row.contains("<td class=\"error\"></td>"), "{row}");
    assert!(page.contains("<tr id=\"replica-home\">"), "{page}");
    let b = Serve::start_at(&b_addr, &dir.path().join("b"), 1, &["--auth"], &[]);
    // And the sender dies too, with events not yet sent, then comes back.
    let a_addr = a.addr.clone();
    let mut a = a;
    for i in 30..40 {
        pushed.push((
            format!("v{i}"),
            push_small(&a, "stream/app", &format!("v{i}"), &format!("m{i}")).await,
        ));
    }
    a.kill();
    let a = Serve::start_at(&a_addr, &dir.path().join("a"), 1, &["--auth"], &[]);
    for (tag, d) in &pushed {
        until(
            &format!("stream/app:{tag} on the restarted replica"),
            Duration::from_secs(90),
            || async { resolve(&b, "stream/app", tag).await.as_deref() == Some(d.as_str()) },
        )
        .await;
    }
    until(
        "the delete made while west was down",
        Duration::from_secs(30),
        || async {
            resolve(&b, "stream/app", &gone).await.is_none()
                && resolve(&b, "stream/app", &gone_tag).await.is_none()
        },
    )
    .await;
    let l = replication(&a, &["show", "west"]);
    assert_eq!(l["status"], "Ready", "{l}");
    let api = a.token_client().await;
    until(
        "home's metrics show west caught up",
        Duration::from_secs(30),
        || async {
            let m = api.text("/metrics").await;
            sample(&m, &west("lag_events")) == Some(0.0)
                && sample(&m, &west("failing")) == Some(0.0)
                && sample(&m, &west("backfill_remaining_manifests")) == Some(0.0)
        },
    )
    .await;
}

/// A build task on one replica, FROM a base image of the registry: a new base pushed to
/// another replica rebuilds it once (the trigger sees the replicated push once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_base_image_pushed_to_another_replica_triggers_once() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), "a", &[]);
    let b = start(dir.path(), "b", &[]);
    join(&a, "west", &b);
    let docker = dir.path().join("docker");
    docker_login(&docker, &a.addr, "admin", &a.password);
    docker_login(&docker, &b.addr, "admin", &b.password);
    let dockercli = |args: &[&str]| {
        run(Command::new("docker")
            .env("DOCKER_CONFIG", &docker)
            .args(args))
    };
    let push_base = |image: &str, version: &str| {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM busybox\nLABEL base.version={version}\n"),
        )
        .unwrap();
        dockercli(&[
            "build",
            "-q",
            "-t",
            image,
            &ctx.path().display().to_string(),
        ]);
        let out = dockercli(&["push", image]);
        out.split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap_or_else(|| panic!("no digest in {out}"))
            .to_string()
    };
    // `FROM busybox` needs the runner image, made from the host's busybox-static.
    run(Command::new(serve_common::bin()).args(["runner", "build"]));
    // The base, pushed to home, where the task is.
    let base = format!("{}/base/img:1", a.addr);
    let d1 = push_base(&base, "one");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {base}\n")).unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - build: -t $Registry/app:latest .\n  - push: [\"$Registry/app:latest\"]\n",
    )
    .unwrap();
    let api = a.client();
    let (st, v) = api
        .post(
            "/api/tasks",
            &serde_json::json!({"name": "app", "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api
        .post("/api/tasks/app/runs", &serde_json::json!({}))
        .await;
    let first = v["id"].as_str().unwrap().to_string();
    let r = api
        .wait_status(&first, &["Succeeded", "Failed"], Duration::from_secs(180))
        .await;
    assert_eq!(r["status"], "Succeeded", "{r}\n{}", a.stderr());

    // A new base pushed to west: home rebuilds, once.
    let on_west = format!("{}/base/img:1", b.addr);
    let d2 = push_base(&on_west, "two");
    assert_ne!(d1, d2);
    until(
        "the base pushed to west triggers home's task",
        Duration::from_secs(60),
        || async { api.runs("app").await.len() > 1 },
    )
    .await;
    let runs = api.runs("app").await;
    assert_eq!(runs[0]["trigger"]["kind"], "base_image", "{}", runs[0]);
    assert_eq!(runs[0]["trigger"]["newDigest"], d2.as_str(), "{}", runs[0]);
    let id = runs[0]["id"].as_str().unwrap().to_string();
    let r = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(180))
        .await;
    assert_eq!(r["status"], "Succeeded", "{r}\n{}", a.stderr());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(api.runs("app").await.len(), 2, "one base push, one run");
    let _ = Command::new("docker")
        .args(["rmi", &base, &on_west])
        .output();
}

/// Replicas on HTTPS with certificates of a private CA (`--ca-cert`): they join, push and
/// pull to each other over it, and a webhook of the registry (kept on both) hears a push
/// once, from the replica that accepted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_over_https_with_a_private_ca_and_webhooks_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = (
        serve_common::tls("server.pem"),
        serve_common::tls("server-key.pem"),
        serve_common::tls("ca.pem"),
    );
    let tls = [
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--ca-cert",
        ca.as_str(),
        "--webhook-backoff-ms",
        "100",
    ];
    let a = start(dir.path(), "a", &tls);
    let b = start(dir.path(), "b", &tls);
    let https = |s: &Serve| format!("https://{}", s.addr);
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let client = || {
        reqwest::Client::builder()
            .add_root_certificate(root.clone())
            .build()
            .unwrap()
    };
    // Without the CA nobody trusts these servers: the https is real.
    assert!(reqwest::Client::new()
        .get(format!("{}/v2/", https(&a)))
        .send()
        .await
        .is_err());

    let r = client()
        .post(format!("{}/api/registry/replications", https(&a)))
        .basic_auth("admin", Some(&a.password))
        .json(&serde_json::json!({
            "name": "west", "url": https(&b), "username": "admin", "password": b.password,
            "homeUrl": https(&a),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    // A webhook made on home reaches west too; a push to west is delivered once.
    let (hook, bodies) = serve_common::receiver();
    let r = client()
        .post(format!("{}/api/registry/webhooks", https(&a)))
        .basic_auth("admin", Some(&a.password))
        .json(&serde_json::json!({
            "name": "ci", "uri": format!("http://{hook}/hook"), "actions": ["push"],
            "scope": "app/*", "headers": {}, "secret": null, "allowPrivateDestination": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    until(
        "the webhook reaches west",
        Duration::from_secs(30),
        || async {
            let r = client()
                .get(format!("{}/api/registry/webhooks", https(&b)))
                .basic_auth("admin", Some(&b.password))
                .send()
                .await
                .unwrap();
            r.text().await.unwrap().contains("\"ci\"")
        },
    )
    .await;

    // A push to west over https, with a token from west's token endpoint.
    let token = |s: &Serve, scope: &str| {
        let (url, pw, c) = (https(s), s.password.clone(), client());
        let scope = scope.to_string();
        async move {
            let v: Value = c
                .get(format!("{url}/oauth2/token?service=acr-task&scope={scope}"))
                .basic_auth("admin", Some(pw))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["token"].as_str().unwrap().to_string()
        }
    };
    let tw = token(&b, "repository:app/web:pull,push").await;
    let layer = b"served over https".to_vec();
    let config = b"{}".to_vec();
    let c = client();
    for blob in [&layer, &config] {
        let r = c
            .post(format!(
                "{}/v2/app/web/blobs/uploads/?digest={}",
                https(&b),
                digest(blob)
            ))
            .bearer_auth(&tw)
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let m = serde_json::to_vec(&image_manifest(
        (&digest(&config), config.len()),
        &[(&digest(&layer), layer.len())],
    ))
    .unwrap();
    let r = c
        .put(format!("{}/v2/app/web/manifests/v1", https(&b)))
        .bearer_auth(&tw)
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ta = token(&a, "repository:app/web:pull").await;
    until(
        "the push to west is pulled from home over https",
        Duration::from_secs(30),
        || async {
            let r = c
                .get(format!("{}/v2/app/web/blobs/{}", https(&a), digest(&layer)))
                .bearer_auth(&ta)
                .send()
                .await
                .unwrap();
            r.status() == 200 && r.bytes().await.unwrap().as_ref() == layer.as_slice()
        },
    )
    .await;
    until("the push is delivered", Duration::from_secs(30), || async {
        !bodies.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = bodies.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one push, one delivery: {got:?}");
    assert!(
        got[0].contains("\"app/web\"") && got[0].contains(&digest(&m)),
        "{}",
        got[0]
    );
}

/// A member down while another is removed misses the change of the group's secret: when
/// it is back, the member list re-sent under the secret it still has brings it the new
/// one, and it is in step again both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_missed_a_removal_learns_the_new_secret() {
    let dir = tempfile::tempdir().unwrap();
    let resend = [("ACR_TASK_REPLICATION_RESEND", Path::new("2"))];
    let at = |name: &str| Serve::start_with_env(&dir.path().join(name), 1, &["--auth"], &resend);
    let (a, b, mut c) = (at("a"), at("b"), at("c"));
    join(&a, "west", &b);
    join(&a, "east", &c);
    until("east Ready", Duration::from_secs(30), || async {
        replication(&a, &["show", "east"])["status"] == "Ready"
    })
    .await;
    let c_addr = c.addr.clone();
    c.kill();
    let (ok, _, err) = a.acr(&["replication", "delete", "west", "-y"]);
    assert!(ok, "{err}");
    let c = Serve::start_at(&c_addr, &dir.path().join("c"), 1, &["--auth"], &resend);
    let from_c = push_small(&c, "back/app", "v1", "east after the removal").await;
    until(
        "home hears east under the new secret",
        Duration::from_secs(60),
        || async { resolve(&a, "back/app", "v1").await.as_deref() == Some(from_c.as_str()) },
    )
    .await;
    let from_a = push_small(&a, "back/app", "v2", "home to east").await;
    until("east hears home", Duration::from_secs(30), || async {
        resolve(&c, "back/app", "v2").await.as_deref() == Some(from_a.as_str())
    })
    .await;
    let names: Vec<String> = replication(&c, &["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["east", "home"], "east learned that west left");
    // West, removed while east was away, reaches neither with what it kept.
    let from_b = push_small(&b, "back/app", "v3", "west after it left").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(resolve(&a, "back/app", "v3").await, None);
    assert_ne!(resolve(&b, "back/app", "v3").await, None, "{from_b}");
}

/// A replica away longer than the outbox keeps events is backfilled again when it is
/// back, though nothing happened since the prune, and the deletes it missed reach it with
/// the backfill: a manifest's and a tag's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_away_longer_than_the_outbox_keeps_learns_the_deletes_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    // Home keeps its events one second: west's time away outlasts them.
    let keep = [("ACR_TASK_OUTBOX_KEEP", Path::new("1"))];
    let home = |addr: Option<&str>| match addr {
        Some(at) => Serve::start_at(at, &dir.path().join("a"), 1, &["--auth"], &keep),
        None => Serve::start_with_env(&dir.path().join("a"), 1, &["--auth"], &keep),
    };
    let mut a = home(None);
    let mut b = start(dir.path(), "b", &[]);
    join(&a, "west", &b);
    let gone = push_small(&a, "away/app", "v1", "deleted while west was away").await;
    let untagged = push_small(&a, "away/app", "v2", "untagged while west was away").await;
    for (tag, d) in [("v1", &gone), ("v2", &untagged)] {
        until(
            &format!("away/app:{tag} on west"),
            Duration::from_secs(30),
            || async { resolve(&b, "away/app", tag).await.as_deref() == Some(d.as_str()) },
        )
        .await;
    }
    let b_addr = b.addr.clone();
    b.kill();
    let cl = a.registry_client("away/app").await;
    for reference in [gone.as_str(), "v2"] {
        let r = cl
            .delete(format!("{}/v2/away/app/manifests/{reference}", a.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "deleting {reference}");
    }
    // Past the outbox's keep; home restarted prunes the events west did not get.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let a_addr = a.addr.clone();
    a.kill();
    let a = home(Some(&a_addr));
    // Nothing happens on home after the prune: the gap shows all the same.
    let b = Serve::start_at(&b_addr, &dir.path().join("b"), 1, &["--auth"], &[]);
    until(
        "the deletes west missed reach it",
        Duration::from_secs(60),
        || async {
            resolve(&b, "away/app", &gone).await.is_none()
                && resolve(&b, "away/app", "v1").await.is_none()
                && resolve(&b, "away/app", "v2").await.is_none()
        },
    )
    .await;
    until("west backfilled again", Duration::from_secs(30), || async {
        replication(&a, &["show", "west"])["status"] == "Ready"
    })
    .await;
    // And the stream goes on from there.
    let after = push_small(&a, "away/app", "v3", "pushed after the prune").await;
    until(
        "a push after the backfill on west",
        Duration::from_secs(30),
        || async { resolve(&b, "away/app", "v3").await.as_deref() == Some(after.as_str()) },
    )
    .await;
    // The manifest only untagged is still there, by digest.
    assert_eq!(
        resolve(&b, "away/app", &untagged).await.as_deref(),
        Some(untagged.as_str()),
        "the manifest only untagged is kept at west"
    );
}

/// The registry's own settings (anonymous pull, the retention policy, content trust) are
/// the registry's on every replica: a server joining takes the group's with the
/// invitation, a change made on any replica holds on all (a trust policy set at home refuses the unsigned image at
/// west); and a replicated registry cannot leave Premium.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registrys_settings_hold_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (start(dir.path(), "a", &[]), start(dir.path(), "b", &[]));
    let ok = |s: &Serve, args: &[&str]| {
        let (ok, out, err) = s.acr(args);
        assert!(ok, "{args:?} failed:\n{out}\n{err}");
        out
    };
    let show = |s: &Serve| -> Value {
        serde_json::from_str(&ok(s, &["registry", "show", "-o", "json"])).unwrap()
    };
    // West's own setting before it joins; home's retention policy.
    ok(
        &b,
        &["registry", "update", "--anonymous-pull-enabled", "true"],
    );
    let line = |s: &Serve, words: &str| ok(s, &words.split(' ').collect::<Vec<_>>());
    line(
        &a,
        "registry config retention update --status enabled --days 30",
    );
    let pushed = push_small(&a, "team/app", "v1", "settings").await;
    // A token (of the scope map `readers`, made once per server) and its password.
    let token = |s: &Serve, name: &str| {
        let (_, out, _) = s.acr(&["scope-map", "show", "readers"]);
        if out.is_empty() {
            line(
                s,
                "scope-map create readers --repository team/* content/read",
            );
        }
        let made: Value = serde_json::from_str(&line(
            s,
            &format!("token create {name} --scope-map readers -o json"),
        ))
        .unwrap();
        made["credentials"]["passwords"][0]["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // A token named alike on both before west joins (home's wins), one only west has (it
    // reaches home).
    let (ci_home, ci_west) = (token(&a, "ci"), token(&b, "ci"));
    let west_only = token(&b, "deploy");
    let login = |s: &Serve, user: &str, pw: &str| {
        let url = format!(
            "{}/oauth2/token?service=acr-task&scope=repository:team/app:pull",
            s.url
        );
        let (user, pw) = (user.to_string(), pw.to_string());
        async move {
            reqwest::Client::new()
                .get(url)
                .basic_auth(user, Some(pw))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    join(&a, "west", &b);
    assert_eq!(login(&b, "ci", &ci_home).await, 200, "home's ci at west");
    assert_eq!(
        login(&b, "ci", &ci_west).await,
        401,
        "west's own ci is gone"
    );
    until_token(&a, "deploy").await;
    assert_eq!(
        login(&a, "deploy", &west_only).await,
        200,
        "the token only west had logs in at home"
    );
    assert_eq!(login(&a, "ci", &ci_home).await, 200, "home's ci stays");
    // A third server with its own token of that name: west's, now the registry's, wins
    // there too (west's was stamped when it joined, so no two joiners' tie).
    let c = start(dir.path(), "c", &[]);
    // What is not an invitation is refused, saying so.
    let r = reqwest::Client::new()
        .post(format!("{}/api/registry/replications/join", c.url))
        .basic_auth("admin", Some(&c.password))
        .body("{\"secret\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("not an invitation"), "{text}");
    let deploy_east = token(&c, "deploy");
    join(&a, "east", &c);
    assert_eq!(
        login(&c, "deploy", &west_only).await,
        200,
        "west's deploy at east"
    );
    assert_eq!(
        login(&c, "deploy", &deploy_east).await,
        401,
        "east's own is gone"
    );
    replication(&a, &["delete", "east", "-y"]);
    drop(c);
    // Taken with the invitation, before anything of the registry's is served there.
    let v = show(&b);
    assert_eq!(
        (&v["anonymousPullEnabled"], &v["retention"]["days"]),
        (&Value::Bool(false), &Value::from(30)),
        "west takes the registry's settings as they are at home when it joins: {v}"
    );
    assert_eq!(
        show(&a)["anonymousPullEnabled"],
        false,
        "home keeps its own"
    );
    until(
        "the image reaches west",
        Duration::from_secs(30),
        || async { resolve(&b, "team/app", "v1").await.as_deref() == Some(pushed.as_str()) },
    )
    .await;

    // Anonymous pull turned on at west: home serves pulls without credentials.
    let anonymous = |s: &Serve| {
        let url = format!("{}/v2/team/app/manifests/v1", s.url);
        async move {
            reqwest::Client::new()
                .get(url)
                .header("accept", ACCEPT)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(anonymous(&a).await, 401);
    ok(
        &b,
        &["registry", "update", "--anonymous-pull-enabled", "true"],
    );
    until(
        "home serves anonymous pulls",
        Duration::from_secs(30),
        || async { anonymous(&a).await == 200 },
    )
    .await;

    // Content trust set at home: west refuses the unsigned image by tag.
    let prefix = dir.path().join("trust");
    run(a
        .cli()
        .arg("generate-key-pair")
        .arg("--output-key-prefix")
        .arg(&prefix));
    let public = prefix.with_extension("pub");
    ok(
        &a,
        &[
            "registry",
            "config",
            "content-trust",
            "add",
            "--repository",
            "team/*",
            "--key",
            public.to_str().unwrap(),
        ],
    );
    ok(&a, &["registry", "update", "--content-trust", "enabled"]);
    until(
        "west refuses the unsigned image",
        Duration::from_secs(30),
        || async { anonymous(&b).await == 403 },
    )
    .await;
    assert_eq!(show(&b)["contentTrust"], show(&a)["contentTrust"]);

    // Below Premium, neither replica goes while they are replicated.
    for s in [&a, &b] {
        let (good, _, err) = s.acr(&["registry", "update", "--sku", "Standard"]);
        assert!(
            !good && err.contains("geo-replication") && err.contains("replication delete"),
            "{err}"
        );
        assert_eq!(show(s)["sku"], "Premium");
    }
    ok(&a, &["registry", "update", "--content-trust", "disabled"]);
    line(&a, "registry config retention update --status disabled");
    ok(&a, &["replication", "delete", "west", "-y"]);
    let v: Value = serde_json::from_str(&ok(
        &a,
        &["registry", "update", "--sku", "Standard", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(v["sku"], "Standard");
}
