//! Credentials for every registry a run touches: under `serve --auth` a stored task pulls
//! a private base image from its own registry and pushes there with the run's own login,
//! and pulls from a second registry (HTTPS, token auth) with a task credential
//! (`task credential add`, a secret reference); `acr-task run --registry` pushes to such a
//! registry with what `docker login` stored.

mod serve_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use serve_common::*;

fn run(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn docker(config: &Path, args: &[&str]) -> String {
    let (ok, out, err) = run(Command::new("docker")
        .env("DOCKER_CONFIG", config)
        .args(args));
    assert!(ok, "docker {args:?}: {err}");
    out
}

/// Builds `image` FROM busybox, pushes it with `config`'s login, and removes it from the
/// engine, so whoever uses it next must pull it (with credentials).
fn push_private_base(config: &Path, image: &str) {
    make_busybox_image(image, image);
    docker(config, &["push", image]);
    docker(config, &["rmi", image]);
}

/// A second registry: `serve --registry-only --auth` over HTTPS, with a token `builder`
/// that may read and write `upstream/*` and `app/*`; returns it and the token's password.
fn other_registry(data: &Path) -> (Serve, String) {
    let acr = |args: &[&str]| {
        let (ok, out, err) = run(Command::new(bin()).args(args).arg("--data").arg(data));
        assert!(ok, "acr-task {args:?}: {err}");
        (out, err)
    };
    acr(&[
        "scope-map",
        "create",
        "rw",
        "--repository",
        "upstream/*",
        "content/read",
        "content/write",
        "--repository",
        "app/*",
        "content/read",
        "content/write",
    ]);
    let (out, _) = acr(&[
        "token",
        "create",
        "builder",
        "--scope-map",
        "rw",
        "-o",
        "json",
    ]);
    let created: Value = serde_json::from_str(&out).unwrap();
    let password = created["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no password in {out}"))
        .to_string();
    let (cert, key) = (tls("server.pem"), tls("server-key.pem"));
    let other = Serve::start_with(
        data,
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
    (other, password)
}

async fn run_task(api: &Api, task: &str) -> Value {
    let (st, v) = api
        .post(&format!("/api/tasks/{task}/runs"), &json!({}))
        .await;
    assert_eq!(st, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    api.wait_status(
        &id,
        &["Succeeded", "Failed", "TimedOut"],
        Duration::from_secs(180),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_task_under_auth_pulls_private_bases_and_pushes() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let (other, other_password) = other_registry(&data.path().join("other"));
    let other_config = data.path().join("other-config");
    docker_login(&other_config, &other.addr, "builder", &other_password);
    let upstream = format!("{}/upstream/base:1", other.addr);
    push_private_base(&other_config, &upstream);

    let pw_file = data.path().join("secrets/other.pw");
    std::fs::create_dir_all(pw_file.parent().unwrap()).unwrap();
    std::fs::write(&pw_file, format!("{other_password}\n")).unwrap();
    let secret_dir = pw_file.parent().unwrap().display().to_string();
    let serve = Serve::start_with(
        &data.path().join("d"),
        1,
        &["--auth", "--secret-dir", &secret_dir],
    );
    let own_config = data.path().join("own-config");
    docker_login(&own_config, &serve.addr, "admin", &serve.password);
    let own_base = format!("{}/private/base:1", serve.addr);
    push_private_base(&own_config, &own_base);

    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {own_base} AS own\nFROM {upstream}\nLABEL built=yes\n"),
    )
    .unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - build: -t $Registry/app:v1 .\n  - push: [\"$Registry/app:v1\"]\n",
    )
    .unwrap();
    let api = serve.client();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "app", "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    // Without a login for the other registry its base image cannot be pulled.
    let failed = run_task(&api, "app").await;
    assert_eq!(failed["status"], "Failed", "{failed}");
    let log = api
        .text(&format!(
            "/api/runs/{}/logs",
            failed["id"].as_str().unwrap()
        ))
        .await;
    assert!(log.contains(&upstream), "{log}");

    let reference = format!("file:{}", pw_file.display());
    let (ok, out, err) = run(serve.cli().args([
        "task",
        "credential",
        "add",
        "app",
        "--login-server",
        &other.addr,
        "--username",
        "builder",
        "--password",
        &reference,
        "--server",
        &serve.url,
    ]));
    assert!(ok, "{err}");
    assert!(out.contains("added the login"), "{out}");
    let (ok, out, err) = run(serve.cli().args([
        "task",
        "credential",
        "list",
        "app",
        "--server",
        &serve.url,
        "-o",
        "json",
    ]));
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["loginServer"], other.addr.as_str(), "{list}");
    assert_eq!(list[0]["password"], reference.as_str(), "{list}");
    // A password in plain text is refused: only references are stored.
    let (ok, _, err) = run(serve.cli().args([
        "task",
        "credential",
        "update",
        "app",
        "--login-server",
        &other.addr,
        "-u",
        "builder",
        "-p",
        &other_password,
        "--server",
        &serve.url,
    ]));
    assert!(!ok && err.contains("secret reference"), "{err}");

    let run = run_task(&api, "app").await;
    let id = run["id"].as_str().unwrap().to_string();
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert_eq!(
        run["status"],
        "Succeeded",
        "{run}\n{log}\n{}",
        serve.stderr()
    );
    assert!(!log.contains(&other_password), "{log}");
    assert!(!serve.stderr().contains(&other_password));
    // Pushed, with its digest, and readable with the admin's login.
    let pushed = &run["report"]["steps"][1]["pushed"][0];
    let digest = pushed["digest"].as_str().unwrap_or_default().to_string();
    assert!(digest.starts_with("sha256:"), "{run}");
    let app = format!("{}/app:v1", serve.addr);
    docker(&own_config, &["pull", "-q", &app]);
    let got = docker(
        &own_config,
        &[
            "image",
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            &app,
        ],
    );
    assert_eq!(got.trim(), format!("{}/app@{digest}", serve.addr));
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
    remove_images_of(&other.addr);
}

#[test]
fn run_with_registry_pushes_with_the_docker_login() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let (other, password) = other_registry(&data.path().join("other"));
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nLABEL run.registry=yes\n",
    )
    .unwrap();
    let file = ctx.path().join("acb.yaml");
    std::fs::write(
        &file,
        "version: v1.1.0\nsteps:\n  - build: -t $Registry/app/web:1 .\n  - push: [\"$Registry/app/web:1\"]\n",
    )
    .unwrap();
    let acr_run = |config: &Path| {
        std::fs::create_dir_all(config).unwrap();
        run(Command::new(bin())
            .env("DOCKER_CONFIG", config)
            .arg("run")
            .arg(&file)
            .args(["--registry", &other.addr, "-o", "json"]))
    };
    // No login: the push is refused, and the run says so.
    let (ok, out, err) = acr_run(&data.path().join("empty-config"));
    assert!(!ok, "{out}");
    assert!(
        out.contains("unauthorized") && out.contains(&format!("docker login {}", other.addr)),
        "{out}\n{err}"
    );
    let config = data.path().join("config");
    docker_login(&config, &other.addr, "builder", &password);
    let (ok, out, err) = acr_run(&config);
    assert!(ok, "{out}\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let digest = report["steps"][1]["pushed"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let image = format!("{}/app/web:1", other.addr);
    docker(&config, &["rmi", &image]);
    docker(&config, &["pull", "-q", &image]);
    let got = docker(
        &config,
        &[
            "image",
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            &image,
        ],
    );
    assert_eq!(got.trim(), format!("{}/app/web@{digest}", other.addr));
    assert!(!out.contains(&password) && !err.contains(&password));
}
