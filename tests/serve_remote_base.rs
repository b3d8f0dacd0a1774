//! A base image in another registry, polled over HTTPS (a private CA given with
//! `--ca-cert`) through Docker's token flow with `docker login` credentials: when its
//! tag moves, the task that builds FROM it is rebuilt once, and the new build records
//! the new digest.

mod serve_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::*;

fn tls(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `acr-task serve --registry-only` over TLS with auth: the "outside" registry.
struct Outside {
    child: Child,
    addr: String,
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn outside_registry(data: &Path) -> (Outside, String) {
    let acr = |args: &[&str]| {
        ok(
            Command::new(bin())
                .args(args)
                .arg("--data")
                .arg(data)
                .output()
                .unwrap(),
            &format!("acr-task {args:?}"),
        )
    };
    acr(&[
        "scope-map",
        "create",
        "rw",
        "--repository",
        "base/*",
        "content/read",
        "content/write",
    ]);
    let out = Command::new(bin())
        .args([
            "token",
            "create",
            "builder",
            "--scope-map",
            "rw",
            "-o",
            "json",
            "--data",
        ])
        .arg(data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ok(out, "token create");
    let password = stderr
        .lines()
        .find_map(|l| l.strip_prefix("builder password1: "))
        .unwrap_or_else(|| panic!("no password in {stderr}"))
        .to_string();
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--registry-only",
            "--auth",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(tls("server.pem"))
        .arg("--tls-key")
        .arg(tls("server-key.pem"))
        .arg("--data")
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line was {line:?}"))
        .to_string();
    (Outside { child, addr }, password)
}

/// docker with its own config dir: `docker login` there is what `serve` reads too.
fn docker(config: &Path, args: &[&str]) -> String {
    ok(
        Command::new("docker")
            .env("DOCKER_CONFIG", config)
            .args(args)
            .output()
            .unwrap(),
        &format!("docker {args:?}"),
    )
}

/// Builds `image` FROM busybox with a distinguishing label and pushes it; its digest.
fn push_base(config: &Path, image: &str, version: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM busybox\nLABEL base.version={version}\n"),
    )
    .unwrap();
    docker(
        config,
        &[
            "build",
            "-q",
            "-t",
            image,
            &dir.path().display().to_string(),
        ],
    );
    let out = docker(config, &["push", image]);
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
async fn tls_registry_base_image_poll_with_token_auth_rebuilds_once() {
    require_docker();
    let tmp = tempfile::tempdir().unwrap();
    let (outside, password) = outside_registry(&tmp.path().join("outside"));
    let config = tmp.path().join("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    let login = Command::new("docker")
        .env("DOCKER_CONFIG", &config)
        .args(["login", &outside.addr, "-u", "builder", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(password.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    ok(login, "docker login to the TLS registry");
    let base = format!("{}/base/img:1", outside.addr);
    let d1 = push_base(&config, &base, "one");

    // `serve` finds the login in DOCKER_CONFIG and trusts the test CA.
    let ca = tls("ca.pem").display().to_string();
    let serve = Serve::start_with_env(
        &tmp.path().join("d"),
        1,
        &["--base-image-poll", "1", "--ca-cert", &ca],
        &[("DOCKER_CONFIG", &config)],
    );
    let api = serve.client();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {base}\n")).unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - id: build\n    build: -t $Registry/remote-app:latest .\n",
    )
    .unwrap();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "remote-app", "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api.post("/api/tasks/remote-app/runs", &json!({})).await;
    let first = v["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&first, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}");
    assert_eq!(base_digest(&run).as_deref(), Some(d1.as_str()), "{run}");

    // Polls see the same digest: nothing is queued.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(api.runs("remote-app").await.len(), 1, "{}", serve.stderr());

    let d2 = push_base(&config, &base, "two");
    assert_ne!(d1, d2);
    let start = Instant::now();
    let rebuilt = loop {
        let runs = api.runs("remote-app").await;
        if let Some(r) = runs.iter().find(|r| r["id"] != first.as_str()) {
            break r.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no rebuild after the base moved:\n{}",
            serve.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let t = &rebuilt["trigger"];
    assert_eq!(t["kind"], "base_image", "{rebuilt}");
    assert_eq!(t["image"], base.as_str());
    assert_eq!(t["old_digest"], d1.as_str());
    assert_eq!(t["new_digest"], d2.as_str());
    let id = rebuilt["id"].as_str().unwrap();
    let done = api
        .wait_status(id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(base_digest(&done).as_deref(), Some(d2.as_str()), "{done}");
    // Once: later polls find the recorded digest current.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(api.runs("remote-app").await.len(), 2, "{}", serve.stderr());
}
