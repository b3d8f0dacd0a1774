//! `acr-task serve` latencies and queue throughput, on the real Docker Engine:
//!
//! ```sh
//! cargo bench --bench serve -- webhook      # signed GitHub push -> run started
//! cargo bench --bench serve -- base-image   # base image tag moved in our registry -> dependent run started
//! cargo bench --bench serve -- queue [RUNS] [CONCURRENCY]   # default 1000 runs, 4 at once
//! cargo bench --bench serve -- page [RUNS]   # the web page's runs list over 100,000 stored runs
//! cargo bench --bench serve -- log-stream    # a log line on the page (SSE) vs `--follow`
//! cargo bench --bench serve -- agent-claims [RUNS]   # 8 agents claiming and finishing (no engine)
//! scripts/with-postgres sh -c 'ACR_TASK_DATABASE=$ACR_TASK_TEST_POSTGRES BENCH_REPLICAS=2 \
//!     cargo bench --bench serve -- agent-claims'   # the same on PostgreSQL, over 2 replicas
//! cargo bench --bench serve -- agents [RUNS] [AGENTS]  # trivial runs on real `acr-task agent`s
//! cargo bench --bench serve -- build-cache   # a rebuild on a cold engine with acb's registry cache vs without
//! ```
//!
//! "Started" is the run's `started_at` (when the queue handed it to the executor), taken
//! from the server; the clock is the same machine's. Prints median, p95 and max.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

const ITERATIONS: usize = 20;

struct Serve {
    child: Child,
    addr: String,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn start(data: &Path, concurrency: usize) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(["serve", "--listen", "127.0.0.1:0", "--concurrency"])
        .arg(concurrency.to_string())
        .arg("--data")
        .arg(data)
        // A loopback bench server: the API without logins (an argon2 check per request
        // would be measured too), contexts from the temp dir and the source tree.
        .arg("--insecure-open-api")
        .arg("--context-root")
        .arg(std::env::temp_dir())
        .args(["--context-root", env!("CARGO_MANIFEST_DIR")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting acr-task serve");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("reading the first line");
    let addr = first.trim().trim_start_matches("listening on ").to_string();
    Serve {
        child,
        url: format!("http://{addr}"),
        addr,
    }
}

fn ts(s: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s.as_str().expect("a timestamp"))
        .expect("an RFC 3339 timestamp")
        .with_timezone(&Utc)
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{what}: n={} median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        ms.len(),
        p(0.5),
        p(0.95),
        p(1.0)
    );
}

async fn create(http: &reqwest::Client, s: &Serve, spec: Value) {
    let r = http
        .post(format!("{}/api/tasks", s.url))
        .json(&spec)
        .send()
        .await
        .expect("POST /api/tasks");
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON")
}

async fn wait_finished(http: &reqwest::Client, s: &Serve, id: &str) -> Value {
    loop {
        let v = get(http, format!("{}/api/runs/{id}", s.url)).await;
        if ["Succeeded", "Failed", "Canceled", "TimedOut"]
            .contains(&v["status"].as_str().unwrap_or(""))
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn trivial_context(dir: &Path) -> String {
    std::fs::write(
        dir.join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - cmd: busybox true\n",
    )
    .expect("writing acb.yaml");
    dir.display().to_string()
}

async fn webhook() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = start(&tmp.path().join("data"), 4);
    let http = reqwest::Client::new();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    let secret = "bench";
    create(
        &http,
        &s,
        json!({"name": "hook", "context": trivial_context(&ctx),
               "triggers": {"commit": {"secret": secret}}}),
    )
    .await;
    let mut lat = Vec::new();
    for i in 0..ITERATIONS {
        // A local context builds its working tree; the commit only names the delivery.
        let body = serde_json::to_vec(&json!({"ref": "refs/heads/main",
            "after": format!("{:040x}", i + 1)}))
        .expect("json");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(&body);
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let sent = Utc::now();
        let r = http
            .post(format!("{}/api/webhooks/github/hook", s.url))
            .header("x-github-event", "push")
            .header("x-github-delivery", format!("bench-{i}"))
            .header("x-hub-signature-256", sig)
            .body(body)
            .send()
            .await
            .expect("POST webhook");
        let v: Value = r.json().await.expect("json");
        let id = v["run"]["id"].as_str().expect("a queued run").to_string();
        let run = wait_finished(&http, &s, &id).await;
        lat.push(
            (ts(&run["startedAt"]) - sent)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1000.0,
        );
    }
    report("webhook POST -> run started", lat);
}

fn docker(args: &[&str]) {
    let ok = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "docker {args:?} failed");
}

async fn base_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = start(&tmp.path().join("data"), 4);
    let http = reqwest::Client::new();
    // Two variants of the base, pushed once; each iteration moves tag `1` between them
    // with one manifest PUT, as a registry client's push ends.
    for v in ["a", "b"] {
        let d = tmp.path().join(format!("base-{v}"));
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("Dockerfile"), format!("FROM busybox\nLABEL v={v}\n"))
            .expect("Dockerfile");
        let image = format!("{}/bench/base:{v}", s.addr);
        docker(&["build", "-q", "-t", &image, &d.display().to_string()]);
        docker(&["push", &image]);
    }
    let manifest = |tag: &str| {
        let http = http.clone();
        let url = format!("{}/v2/bench/base/manifests/{tag}", s.url);
        async move {
            let r = http
                .get(url)
                .header("accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .expect("GET manifest");
            let ct = r.headers()["content-type"]
                .to_str()
                .expect("content type")
                .to_string();
            (ct, r.bytes().await.expect("manifest body"))
        }
    };
    let a = manifest("a").await;
    let b = manifest("b").await;
    let put = |m: &(String, bytes::Bytes)| {
        http.put(format!("{}/v2/bench/base/manifests/1", s.url))
            .header("content-type", m.0.clone())
            .body(m.1.clone())
            .send()
    };
    put(&a).await.expect("PUT");
    let ctx = tmp.path().join("app");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}/bench/base:1\n", s.addr),
    )
    .expect("Dockerfile");
    std::fs::write(
        ctx.join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - build: -t $Registry/bench/app:latest .\n    pull: true\n",
    )
    .expect("acb.yaml");
    create(
        &http,
        &s,
        json!({"name": "app", "context": ctx.display().to_string()}),
    )
    .await;
    let r: Value = http
        .post(format!("{}/api/tasks/app/runs", s.url))
        .send()
        .await
        .expect("run")
        .json()
        .await
        .expect("json");
    let first = wait_finished(&http, &s, r["id"].as_str().expect("id")).await;
    assert_eq!(first["status"], "Succeeded", "{first}");
    let mut lat = Vec::new();
    for i in 0..ITERATIONS {
        let m = if i % 2 == 0 { &b } else { &a };
        let r = put(m).await.expect("PUT");
        let accepted = Utc::now();
        assert!(r.status().is_success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let run = loop {
            let runs = get(&http, format!("{}/api/runs?task=app", s.url)).await;
            let list = runs.as_array().cloned().unwrap_or_default();
            if list.len() > i + 1 {
                break list[0].clone();
            }
            assert!(Instant::now() < deadline, "no run was queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let run = wait_finished(&http, &s, run["id"].as_str().expect("id")).await;
        lat.push(
            (ts(&run["startedAt"]) - accepted)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1000.0,
        );
    }
    report("base-image manifest accepted -> dependent run started", lat);
}

async fn queue(runs: usize, concurrency: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = start(&tmp.path().join("data"), concurrency);
    let http = reqwest::Client::new();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    create(
        &http,
        &s,
        json!({"name": "trivial", "context": trivial_context(&ctx)}),
    )
    .await;
    let t0 = Instant::now();
    for _ in 0..runs {
        let r = http
            .post(format!("{}/api/tasks/trivial/runs", s.url))
            .send()
            .await
            .expect("queue");
        assert_eq!(r.status(), 202);
    }
    let queued_in = t0.elapsed();
    let all = loop {
        let v = get(&http, format!("{}/api/runs?limit={}", s.url, runs + 10)).await;
        let list = v.as_array().cloned().unwrap_or_default();
        if list.len() == runs && list.iter().all(|r| r["finishedAt"].is_string()) {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let total = t0.elapsed();
    let ok = all.iter().filter(|r| r["status"] == "Succeeded").count();
    // Most runs overlapping at any instant, from the recorded start and finish times.
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for r in &all {
        edges.push((ts(&r["startedAt"]), 1));
        edges.push((ts(&r["finishedAt"]), -1));
    }
    edges.sort_by_key(|e| (e.0, e.1));
    let (mut cur, mut peak) = (0, 0);
    for (_, d) in edges {
        cur += d;
        peak = peak.max(cur);
    }
    println!(
        "queue: {runs} runs queued in {:.2} s; all finished in {:.1} s ({:.1} runs/s); \
         {ok} succeeded, {} lost; peak concurrency {peak} (limit {concurrency})",
        queued_in.as_secs_f64(),
        total.as_secs_f64(),
        runs as f64 / total.as_secs_f64(),
        runs - all.len(),
    );
    assert_eq!(all.len(), runs, "runs were lost");
    assert!(
        peak <= concurrency as i32,
        "the concurrency limit was exceeded"
    );
}

/// Makes pool `bench` and a trivial task `t` in it.
async fn pool_and_task(http: &reqwest::Client, s: &Serve) {
    let r = http
        .post(format!("{}/api/agentpools", s.url))
        .json(&json!({"name": "bench"}))
        .send()
        .await
        .expect("pool");
    assert_eq!(r.status(), 201);
    create(
        http,
        s,
        json!({"name": "t", "taskYaml": "version: v1.1.0\nsteps:\n  - cmd: busybox true\n", "agentPool": "bench"}),
    )
    .await;
}

async fn queue_runs(http: &reqwest::Client, s: &Serve, runs: usize) -> Duration {
    let t0 = Instant::now();
    for _ in 0..runs {
        let r = http
            .post(format!("{}/api/tasks/t/runs", s.url))
            .send()
            .await
            .expect("queue");
        assert_eq!(r.status(), 202);
    }
    t0.elapsed()
}

/// The server's side of the agent protocol alone: 8 agents (HTTP clients, no engine)
/// claim queued runs and report them finished at once, as fast as the server hands
/// them out. Claims per second, and the claim + finish round trip per run.
async fn agent_claims(runs: usize) {
    const AGENTS: usize = 8;
    let tmp = tempfile::tempdir().expect("tempdir");
    // BENCH_REPLICAS=2 (with ACR_TASK_DATABASE naming a PostgreSQL database, which every
    // replica then shares): the agents spread over that many serve replicas.
    let replicas: usize = std::env::var("BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    assert!(
        replicas == 1 || std::env::var("ACR_TASK_DATABASE").is_ok(),
        "BENCH_REPLICAS needs ACR_TASK_DATABASE (the database the replicas share)"
    );
    let servers: Vec<Serve> = (0..replicas)
        .map(|i| start(&tmp.path().join(format!("data{i}")), 1))
        .collect();
    let s = &servers[0];
    let http = reqwest::Client::new();
    pool_and_task(&http, s).await;
    let queued_in = queue_runs(&http, s, runs).await;
    let mut ids = Vec::new();
    for i in 0..AGENTS {
        let server = &servers[i % replicas];
        let v: Value = http
            .post(format!("{}/api/agents", server.url))
            .json(&json!({"pool": "bench", "name": format!("b{i}"), "concurrency": 1}))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("agent");
        ids.push((
            v["id"].as_str().expect("id").to_string(),
            server.url.clone(),
        ));
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (id, url) in ids {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                let r = http
                    .post(format!("{url}/api/agents/{id}/claim?wait=0"))
                    .json(&json!({}))
                    .send()
                    .await
                    .expect("claim");
                if r.status() == 204 {
                    return lat;
                }
                let a: Value = r.json().await.expect("assignment");
                let run = a["run"]["id"].as_str().expect("run id");
                let done = json!({"lease": a["lease"], "outcome": {"status": "Succeeded", "error": null, "commit": null, "report": null}});
                let f = http
                    .post(format!("{url}/api/agents/{id}/runs/{run}/finish"))
                    .json(&done)
                    .send()
                    .await
                    .expect("finish");
                assert_eq!(f.status(), 204);
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("agent"));
    }
    let took = t0.elapsed();
    assert_eq!(all.len(), runs, "every run claimed once");
    println!(
        "agent-claims: {runs} runs queued in {:.2} s; {AGENTS} agents on {replicas} replica(s) claimed and finished them in {:.2} s: {:.0} claims/s",
        queued_in.as_secs_f64(),
        took.as_secs_f64(),
        runs as f64 / took.as_secs_f64()
    );
    report("agent-claims: claim + finish per run", all);
}

/// Trivial runs (`busybox true`) on `agents` real `acr-task agent` processes (2 runs at
/// once each): the wall time, and the claim-to-start overhead per run.
async fn agents(runs: usize, agents: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = start(&tmp.path().join("data"), 1);
    let http = reqwest::Client::new();
    pool_and_task(&http, &s).await;
    let mut children = Vec::new();
    for i in 0..agents {
        children.push(KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_acr-task"))
                .args([
                    "agent",
                    "--server",
                    &s.url,
                    "--pool",
                    "bench",
                    "--concurrency",
                    "2",
                ])
                .args(["--name", &format!("b{i}")])
                .arg("--work-dir")
                .arg(tmp.path().join(format!("w{i}")))
                .stderr(Stdio::null())
                .spawn()
                .expect("agent"),
        ));
    }
    loop {
        let v = get(&http, format!("{}/api/agentpools/bench", s.url)).await;
        if v["agentsOnline"].as_u64() == Some(agents as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    queue_runs(&http, &s, runs).await;
    let all = loop {
        let v = get(&http, format!("{}/api/runs?limit={}", s.url, runs + 10)).await;
        let list = v.as_array().cloned().unwrap_or_default();
        if list.len() == runs && list.iter().all(|r| r["finishedAt"].is_string()) {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let took = t0.elapsed();
    let ok = all.iter().filter(|r| r["status"] == "Succeeded").count();
    // Queued to handed out, for runs that found an agent waiting (the first few).
    println!(
        "agents: {runs} trivial runs on {agents} agent(s) x 2: {:.1} s ({:.2} runs/s), {ok} succeeded",
        took.as_secs_f64(),
        runs as f64 / took.as_secs_f64()
    );
    drop(children);
}

/// A 5-layer Dockerfile rebuilt on an engine that has none of its layers (as a second
/// agent's), with `cache: enabled` (layers pulled from the registry cache the first build
/// pushed) and with `cache: disabled`. Each layer stands for real work: 2 s of it and
/// 8 MiB of new files.
async fn build_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args([
            "serve",
            "--registry-only",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(tmp.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("first line");
    let _serve = KillOnDrop(child);
    let registry = first.trim().trim_start_matches("listening on ").to_string();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    let mut dockerfile = String::from("FROM busybox\n");
    for i in 1..=5 {
        dockerfile.push_str(&format!(
            "RUN sleep 2 && dd if=/dev/urandom of=/layer{i} bs=1M count=8 2>/dev/null\n"
        ));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("Dockerfile");
    let task = |cache: &str| {
        format!(
            "version: v1.1.0\nsteps:\n  - id: build\n    build: -t $Registry/bench-cache:{{{{.Run.ID}}}} .\n    cache: {cache}\n"
        )
    };
    let build = |cache: &str| {
        std::fs::write(ctx.join("acb.yaml"), task(cache)).expect("acb.yaml");
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
            .args(["run", "--registry", &registry, "-o", "json"])
            .arg(ctx.join("acb.yaml"))
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64()
    };
    let forget = || {
        // Every image of the bench registry, and with them their layers.
        let out = Command::new("docker")
            .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .output()
            .expect("docker images");
        for img in String::from_utf8_lossy(&out.stdout).lines() {
            if img.starts_with(&format!("{registry}/")) {
                let _ = Command::new("docker").args(["rmi", "-f", img]).output();
            }
        }
    };
    let fill = build("enabled");
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        forget();
        with.push(build("enabled"));
        forget();
        without.push(build("disabled"));
    }
    forget();
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    println!(
        "build-cache: first build {fill:.1} s; rebuild on a cold engine: with the registry cache \
         median {:.1} s, without {:.1} s ({:.1}x)",
        with[1],
        without[1],
        without[1] / with[1]
    );
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The runs list of the web page with `runs` runs stored (written straight into a fresh
/// `server.db` in one transaction: queueing 100,000 through the API would take minutes):
/// the first page, a deep page and a filter that few runs match.
async fn page(runs: usize) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    {
        let db = data.join("server.db");
        drop(acr_task::server::sqlite::SqliteServer::open(&db).expect("server.db"));
        let mut c = rusqlite::Connection::open(&db).expect("open");
        let tx = c.transaction().expect("tx");
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO runs(id, task, status, trigger, queued_at, started_at, \
                     finished_at) VALUES(?1, ?2, ?3, '{\"kind\":\"manual\"}', \
                     '2026-12-01T00:00:00.000Z', '2026-12-01T00:00:01.000Z', \
                     '2026-12-01T00:00:09.000Z')",
                )
                .expect("prepare");
            for i in 0..runs {
                // One run in a thousand failed; tasks t0..t19.
                let status = if i % 1000 == 7 { "Failed" } else { "Succeeded" };
                st.execute(rusqlite::params![
                    format!("cb{i:x}"),
                    format!("t{}", i % 20),
                    status
                ])
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let s = start(&data, 1);
    let http = reqwest::Client::new();
    for (what, path) in [
        ("first page", "/".to_string()),
        ("page at the middle", format!("/?before={}", runs / 2)),
        ("one task", "/?task=t3".to_string()),
        ("a rare status", "/?status=Failed".to_string()),
    ] {
        let mut ms = Vec::new();
        for _ in 0..ITERATIONS {
            let t = Instant::now();
            let r = http
                .get(format!("{}{path}", s.url))
                .send()
                .await
                .expect("GET");
            assert!(r.status().is_success(), "{path}: {}", r.status());
            let body = r.text().await.expect("body");
            assert!(body.contains("data-run="), "{path} lists runs");
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        report(&format!("runs list of {runs} runs, {what}"), ms);
    }
}

/// How much later a log line reaches the web page (server-sent events) than the CLI's
/// `--follow` stream: both opened on one running run, arrival times compared line by line.
async fn log_stream() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = start(&tmp.path().join("data"), 1);
    let http = reqwest::Client::new();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - cmd: busybox sh -c \"sleep 2; for i in $(seq 1 40); do echo line-$i; sleep 0.1; done\"\n",
    )
    .expect("acb.yaml");
    create(
        &http,
        &s,
        json!({"name": "logs", "context": ctx.display().to_string()}),
    )
    .await;
    let run = http
        .post(format!("{}/api/tasks/logs/runs", s.url))
        .json(&json!({}))
        .send()
        .await
        .expect("run")
        .json::<Value>()
        .await
        .expect("json");
    let id = run["id"].as_str().expect("id").to_string();
    let t0 = Instant::now();
    let follow = {
        let (http, url) = (
            http.clone(),
            format!("{}/api/runs/{id}/logs?follow=true", s.url),
        );
        tokio::spawn(async move { arrivals(http, url, t0).await })
    };
    let sse = {
        let (http, url) = (http.clone(), format!("{}/ui/runs/{id}/events", s.url));
        tokio::spawn(async move { arrivals(http, url, t0).await })
    };
    let (follow, sse) = (follow.await.expect("follow"), sse.await.expect("sse"));
    let mut extra = Vec::new();
    for (line, at) in &follow {
        if let Some(b) = sse.get(line) {
            extra.push(b - at);
        }
    }
    assert!(
        extra.len() >= 40,
        "both streams saw the lines ({} matched)",
        extra.len()
    );
    report("log line: page (SSE) minus --follow", extra);
}

/// When each `line-N` arrived on a streamed response (ms after `t0`).
async fn arrivals(
    http: reqwest::Client,
    url: String,
    t0: Instant,
) -> std::collections::HashMap<String, f64> {
    use futures_util::StreamExt;
    let mut out = std::collections::HashMap::new();
    let r = http.get(url).send().await.expect("stream");
    let mut body = r.bytes_stream();
    let mut pending = String::new();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        let now = t0.elapsed().as_secs_f64() * 1000.0;
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            if let Some(p) = line.find("line-") {
                let name: String = line[p..]
                    .trim()
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                out.entry(name).or_insert(now);
            }
            if line.starts_with("event: end") {
                return out;
            }
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let what = args.first().map(String::as_str).unwrap_or("all");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        if what == "webhook" || what == "all" {
            webhook().await;
        }
        if what == "base-image" || what == "all" {
            base_image().await;
        }
        if what == "queue" || what == "all" {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
            let c = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
            queue(n, c).await;
        }
        if what == "page" || what == "all" {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
            page(n).await;
        }
        if what == "log-stream" || what == "all" {
            log_stream().await;
        }
        if what == "agent-claims" || what == "all" {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
            agent_claims(n).await;
        }
        if what == "build-cache" || what == "all" {
            build_cache().await;
        }
        if what == "agents" {
            let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
            let a = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
            agents(n, a).await;
        }
    });
}
