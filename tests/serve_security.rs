//! `acr-task serve` attacked as another local program, a web page and a task author would:
//! the API is never open by default, foreign host names and cross-site requests are
//! refused, and stored tasks are held to the sandbox policy when stored and again when
//! they run, on the real Docker Engine.

mod serve_common;

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use serve_common::*;

fn ctx(name: &str) -> String {
    data_file(name).display().to_string()
}

/// An inline task (no context) with this task file.
fn inline(name: &str, yaml: &str) -> Value {
    json!({"name": name, "context": "", "task_yaml": yaml})
}

fn token(serve: &Serve, name: &str, actions: &[&str]) -> String {
    let registry = serve.data.clone();
    let out = std::process::Command::new(bin())
        .args([
            "scope-map",
            "create",
            &format!("{name}-map"),
            "--repository",
            "*",
        ])
        .args(actions)
        .arg("--data")
        .arg(&registry)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin())
        .args([
            "token",
            "create",
            name,
            "--scope-map",
            &format!("{name}-map"),
        ])
        .args(["-o", "json", "--data"])
        .arg(&registry)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no password in {v}"))
        .to_string()
}

fn as_user(serve: &Serve, user: &str, password: &str) -> Api {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        "authorization",
        base64_basic(user, password).parse().unwrap(),
    );
    Api {
        base: serve.url.clone(),
        http: reqwest::Client::builder()
            .default_headers(h)
            .build()
            .unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_task_api_needs_credentials_from_the_first_start() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("d");
    let mut serve = Serve::start(&dir, 1);
    // The admin was made, shown once, and kept for this user only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("admin.password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(serve.password.len(), 43);
    // Printed on stderr just after the address, once.
    let t0 = std::time::Instant::now();
    while !serve.stderr().contains(&serve.password) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(serve.stderr().matches(&serve.password).count(), 1);

    let anon = serve.anonymous();
    for (m, path) in [
        (Method::GET, "/api/tasks"),
        (Method::POST, "/api/tasks"),
        (Method::GET, "/api/runs"),
        (Method::GET, "/api/csrf-token"),
    ] {
        let (st, v) = anon.send(m.clone(), path, &inline("x", "steps: []")).await;
        assert_eq!(st, 401, "{m} {path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("credentials"), "{v}");
    }
    let (st, _) = anon.get("/api/health").await;
    assert_eq!(st, 200);
    let (st, _) = serve.client().get("/api/tasks").await;
    assert_eq!(st, 200);

    // Registry permissions do not manage tasks; the task permissions do.
    let ops = token(&serve, "ops", &["metadata/read", "metadata/write"]);
    let viewer = token(&serve, "viewer", &["tasks/read"]);
    let manager = token(&serve, "manager", &["tasks/write"]);
    let hello = json!({"name": "hello", "context": ctx("hello")});
    let (st, _) = as_user(&serve, "ops", &ops).get("/api/tasks").await;
    assert_eq!(st, 403);
    let (st, _) = as_user(&serve, "viewer", &viewer)
        .post("/api/tasks", &hello)
        .await;
    assert_eq!(st, 403);
    let (st, v) = as_user(&serve, "manager", &manager)
        .post("/api/tasks", &hello)
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = as_user(&serve, "viewer", &viewer)
        .get("/api/tasks/hello")
        .await;
    assert_eq!((st, v["name"].as_str()), (200, Some("hello")));

    // A restart keeps the credential and shows nothing again.
    let password = serve.password.clone();
    serve.kill();
    let again = Serve::start(&dir, 1);
    assert_eq!(again.password, password);
    let (st, _) = again.client().get("/api/tasks").await;
    assert_eq!(st, 200);
    assert_eq!(again.stderr().matches("Created the admin user").count(), 1);
    let (st, _) = again.client().get("/api/tasks").await;
    assert_eq!(st, 200);
}

#[test]
fn an_open_api_is_only_for_loopback() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "serve",
            "--insecure-open-api",
            "--listen",
            "0.0.0.0:0",
            "--data",
        ])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only on a loopback address"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_loopback_api_asks_nothing() {
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 1, &["--insecure-open-api"]);
    let (st, _) = serve.anonymous().get("/api/tasks").await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_host_names_and_cross_site_requests_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 1, &["--server-name", "ci.example"]);
    let http = reqwest::Client::new();
    let basic = base64_basic("admin", &serve.password);
    let send = |m: Method, path: &str, headers: &[(&str, &str)], body: Option<Value>| {
        let mut r = http
            .request(m, format!("{}{path}", serve.url))
            .header("authorization", &basic);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    // DNS rebinding: a page's own name, pointed at 127.0.0.1, reaches nothing.
    for path in ["/v2/", "/api/health", "/api/tasks"] {
        let r = send(
            Method::GET,
            path,
            &[("host", "rebind.attacker.example")],
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        assert!(r.text().await.unwrap().contains("--server-name"));
    }
    let r = send(Method::GET, "/v2/", &[("host", "ci.example:443")], None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let hello = || Some(json!({"name": "hello", "context": ctx("hello")}));
    // A cross-site form or fetch: refused, credentials or not.
    let r = send(
        Method::POST,
        "/api/tasks",
        &[("origin", "http://attacker.example")],
        hello(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("cross-origin"));
    let r = send(
        Method::POST,
        "/api/tasks/hello/runs",
        &[
            ("content-type", "text/plain"),
            ("sec-fetch-site", "cross-site"),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    // The server's own page: same origin, and the CSRF token is required.
    let origin = serve.url.clone();
    let r = send(Method::POST, "/api/tasks", &[("origin", &origin)], hello())
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("X-CSRF-Token"));
    let (st, v) = serve.client().get("/api/csrf-token").await;
    assert_eq!(st, 200);
    let csrf = v["token"].as_str().unwrap().to_string();
    let r = send(
        Method::POST,
        "/api/tasks",
        &[("origin", &origin), ("x-csrf-token", "0000")],
        hello(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = send(
        Method::POST,
        "/api/tasks",
        &[("origin", &origin), ("x-csrf-token", &csrf)],
        hello(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Programs (no Origin, no cookie) need no token.
    let (st, _) = serve
        .client()
        .post("/api/tasks/hello/runs", &json!({}))
        .await;
    assert_eq!(st, 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_tasks_are_held_to_the_policy_when_stored() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("d");
    let serve = Serve::start(&dir, 1);
    let api = serve.client();
    let refused = |v: &Value, want: &str| {
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(want), "wanted {want:?} in {v}");
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            inline("priv", "steps:\n  - cmd: busybox true\n    privileged: true\n"),
            "task.yaml:3:17: step `acb_step_0`: privileged containers",
        ),
        (
            inline(
                "sock",
                "steps:\n  - cmd: -v /var/run/docker.sock:/var/run/docker.sock docker ps\n",
            ),
            "task.yaml:2:13: step `acb_step_0`: volume `/var/run/docker.sock",
        ),
        (
            inline("hostnet", "steps:\n  - cmd: busybox true\n    network: host\n"),
            "policy rule `hostNetwork`",
        ),
        (
            inline(
                "join",
                "networks:\n  - name: bridge\n    skipCreation: true\nsteps:\n  - cmd: busybox true\n",
            ),
            "policy rule `joinNetworks`",
        ),
        (
            json!({"name": "data", "context": dir.display().to_string()}),
            "is the server's own data",
        ),
        (
            json!({"name": "registry", "context": dir.join("registry").display().to_string()}),
            "is the server's own data",
        ),
        (
            json!({"name": "etc", "context": "/etc"}),
            "outside the directories this server allows",
        ),
        (
            json!({"name": "up", "context": ctx("hello"), "file": "../../../../etc/passwd"}),
            "inside the context",
        ),
        (
            json!({"name": "envsecret", "context": ctx("hello"), "secrets": {"k": "env:HOME"}}),
            "may not be used as a secret",
        ),
        (
            json!({"name": "filesecret", "context": ctx("hello"),
                   "secrets": {"k": format!("file:{}", dir.join("admin.password").display())}}),
            "server's own data",
        ),
        (
            inline(
                "alias",
                &format!(
                    "version: v1.1.0\nalias:\n  src: [{}]\nsteps:\n  - cmd: busybox true\n",
                    dir.join("admin.password").display()
                ),
            ),
            "inside the task's context",
        ),
    ];
    for (spec, want) in cases {
        let (st, v) = api.post("/api/tasks", &spec).await;
        assert_eq!(st, 400, "{spec}: {v}");
        refused(&v, want);
    }
    let (_, v) = api.get("/api/tasks").await;
    assert_eq!(v, json!([]), "nothing refused was stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_can_allow_more() {
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 1, &["--allow", "privileged"]);
    let (st, v) = serve
        .client()
        .post(
            "/api/tasks",
            &inline(
                "priv",
                "steps:\n  - cmd: busybox true\n    privileged: true\n",
            ),
        )
        .await;
    assert_eq!(st, 201, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_git_context_that_changed_is_checked_again_when_it_runs() {
    require_docker();
    let repo = Repo::new();
    repo.commit(&[("acb.yaml", "steps:\n  - cmd: busybox true\n")], "fine");
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 1);
    let api = serve.client();
    let (st, v) = api
        .post("/api/tasks", &json!({"name": "g", "context": repo.url()}))
        .await;
    assert_eq!(st, 201, "{v}");
    repo.commit(
        &[(
            "acb.yaml",
            "steps:\n  - id: escape\n    cmd: --privileged -v /:/host busybox cat /host/etc/shadow\n",
        )],
        "sneaky",
    );
    let (st, v) = api.post("/api/tasks/g/runs", &json!({})).await;
    assert_eq!(st, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(60))
        .await;
    assert_eq!(run["status"], "Failed", "{run}");
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert!(
        log.contains("acb.yaml:3:") && log.contains("`privileged`"),
        "{log}"
    );
    assert!(log.contains("policy rule `mounts`"), "{log}");
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_run_within_the_policys_limits() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("small"), "multi\nline-secret-value\n").unwrap();
    std::fs::write(secrets.path().join("big"), vec![b'x'; 70 * 1024]).unwrap();
    let serve = Serve::start_with(
        &data.path().join("d"),
        1,
        &[
            "--step-memory",
            "64MiB",
            "--step-pids",
            "100",
            "--secret-dir",
            secrets.path().to_str().unwrap(),
        ],
    );
    let api = serve.client();
    // cgroup v1 or v2, whichever the engine uses.
    let show = "cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/memory.max";
    let yaml = format!(
        "secrets:\n  - id: s\n    keyvault: https://example.vault.azure.net/secrets/s\nsteps:\n  - id: capped\n    cmd: busybox sh -c '{show}'\n  - id: asks-less\n    cmd: --pids-limit 50 -m 1g busybox sh -c '{show}'\n  - id: secret\n    cmd: busybox sh -c 'echo \"$S\"'\n    env: [\"S={{{{.Secrets.s}}}}\"]\n"
    );
    let mut spec = inline("limits", &yaml);
    spec["secrets"] = json!({"s": format!("file:{}", secrets.path().join("small").display())});
    let (st, v) = api.post("/api/tasks", &spec).await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api.post("/api/tasks/limits/runs", &json!({})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert_eq!(run["status"], "Succeeded", "{run}\n{log}");
    assert!(log.contains("capped | 100"), "{log}");
    assert!(log.contains(&format!("capped | {}", 64 << 20)), "{log}");
    assert!(log.contains("asks-less | 50"), "{log}");
    assert!(log.contains(&format!("asks-less | {}", 64 << 20)), "{log}");
    assert!(!log.contains("line-secret-value"), "{log}");

    // A secret file over the size limit fails the run before anything starts, saying why.
    spec["name"] = json!("big");
    spec["secrets"] = json!({"s": format!("file:{}", secrets.path().join("big").display())});
    let (st, v) = api.post("/api/tasks", &spec).await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api.post("/api/tasks/big/runs", &json!({})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(60))
        .await;
    assert_eq!(run["status"], "Failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("larger than this server's limit"),
        "{run}"
    );
}

#[test]
fn print_policy_shows_what_the_options_make_and_reads_back() {
    let out = std::process::Command::new(bin())
        .args([
            "serve",
            "--print-policy",
            "--allow",
            "privileged",
            "--step-memory",
            "1GiB",
        ])
        .args(["--secret-dir", "/etc/acr-task/secrets"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let yaml = String::from_utf8_lossy(&out.stdout).to_string();
    for want in [
        "privileged: true",
        "hostNetwork: false",
        "memory: 1GiB",
        "/etc/acr-task/secrets",
    ] {
        assert!(yaml.contains(want), "{want} not in:\n{yaml}");
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("policy.yaml");
    std::fs::write(&f, &yaml).unwrap();
    std::fs::write(
        dir.path().join("acb.yaml"),
        "steps:\n  - cmd: busybox true\n    privileged: true\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["validate"])
        .arg(dir.path().join("acb.yaml"))
        .arg("--policy")
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
