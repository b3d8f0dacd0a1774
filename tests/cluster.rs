//! Two `acr-task serve` replicas sharing one PostgreSQL database (a throw-away cluster,
//! started by `scripts/with-postgres` for this test when the environment names none):
//! runs queued on one are taken by both, timers fire on the leader only, and a kill -9
//! of the leader loses neither a timer firing nor a run it was running. Then the registry
//! shared as well (PostgreSQL and SeaweedFS): pushes, uploads and the tier's rates across
//! replicas, a replica killed mid-stream; and pulls redirected to the bucket.

mod serve_common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use serve_common::*;

/// The database URL; without one, runs `test` again under `scripts/with-postgres` (so a
/// plain `cargo test` tests a real PostgreSQL too, never skips) and returns None.
fn postgres_or_rerun(test: &str) -> Option<String> {
    match std::env::var("ACR_TASK_TEST_POSTGRES") {
        Ok(url) => Some(url),
        Err(_) => {
            rerun_under(test, &["with-postgres"]);
            None
        }
    }
}

/// Runs this binary's `test` again under `scripts` (each wrapping the next), which start
/// the servers it needs; fails unless it passed there.
fn rerun_under(test: &str, scripts: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let out = std::process::Command::new(dir.join(scripts[0]))
        .args(scripts[1..].iter().map(|s| dir.join(s)))
        .arg(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "under {scripts:?}:\n{text}"
    );
}

/// Whether `serve` leads, by its metrics.
async fn leads(api: &Api) -> bool {
    let m = api.text("/metrics").await;
    let value = m.lines().find_map(|l| l.strip_prefix("acr_task_leader "));
    match value {
        Some("1") => true,
        Some("0") => false,
        _ => panic!("no acr_task_leader gauge: {m}"),
    }
}

/// Runs whose start `serve` logged (its own executor took them).
fn started_by(serve: &Serve) -> Vec<String> {
    serve
        .stderr()
        .lines()
        .filter_map(|l| l.split("server::queue: started run=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every run (of `task`, with one), newest first.
async fn runs_of(api: &Api, task: Option<&str>) -> Vec<Value> {
    let filter = task.map(|t| format!("&task={t}")).unwrap_or_default();
    let (st, v) = api.get(&format!("/api/runs?limit=1000{filter}")).await;
    assert_eq!(st, 200, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_the_queue_and_a_leader_kill_loses_no_timer_or_run() {
    require_docker();
    let Some(url) =
        postgres_or_rerun("replicas_share_the_queue_and_a_leader_kill_loses_no_timer_or_run")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    // One database for both replicas.
    postgres_for(&url, &da);
    std::fs::copy(da.with_extension("pgdb"), db.with_extension("pgdb")).unwrap();
    // One clock for both, 30 times faster than real time: a minute every two seconds,
    // starting a few seconds from now.
    let epoch = (Utc::now() + chrono::Duration::seconds(6)).to_rfc3339();
    let args = [
        "--clock-start",
        "2026-01-01T00:00:00Z",
        "--clock-rate",
        "30",
        "--clock-epoch",
        &epoch,
        "--agent-lease",
        "3",
    ];
    let first = Serve::start_with(&da, 2, &args);
    // The second reaches the database over TLS (the test server's certificate, checked
    // against the test CA): a replica on another machine would.
    let tls_url = format!("{}?sslmode=require", postgres_for(&url, &da));
    let ca = tls("ca.pem");
    let mut b_args = args.to_vec();
    b_args.extend(["--database", &tls_url, "--ca-cert", &ca]);
    // The admin's password was made once, by the first replica, for both: the second
    // finds the admin made and makes none (the operator hands the password around).
    std::fs::create_dir_all(&db).unwrap();
    assert!(!first.password.is_empty());
    let mut replicas = vec![first, Serve::start_with(&db, 2, &b_args)];
    assert_eq!(
        admin_password(&db),
        "",
        "the second replica made no admin password"
    );
    std::fs::write(db.join("admin.password"), &replicas[0].password).unwrap();
    replicas[1].password = replicas[0].password.clone();
    // A bearer token one replica issued holds on the other (one signing key), and so does
    // the admin's password (one set of credentials).
    let from_a = replicas[0].token_client().await;
    let on_b = Api {
        base: replicas[1].url.clone(),
        http: from_a.http.clone(),
    };
    let (st, v) = on_b.get("/api/tasks").await;
    assert_eq!(st, 200, "a token from replica a on replica b: {v}");
    let apis: Vec<Api> = vec![from_a, replicas[1].token_client().await];
    // Exactly one leads.
    let leading: Vec<bool> = vec![leads(&apis[0]).await, leads(&apis[1]).await];
    assert_eq!(
        leading.iter().filter(|l| **l).count(),
        1,
        "one leader: {leading:?}"
    );
    for (name, cmd, timer) in [
        (
            "tick",
            "busybox sh -c 'echo tick-{{.Run.ID}}; sleep 3'",
            Some("every-minute=* * * * *"),
        ),
        ("job", "busybox sh -c 'sleep 3; echo job-{{.Run.ID}}'", None),
    ] {
        let mut c = replicas[0].cli();
        c.args(["task", "create", name, "--server", &replicas[0].url])
            .args(["--cmd", cmd, "--context", "/dev/null"]);
        if let Some(t) = timer {
            c.args(["--timer", t]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "task create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Runs queued on one replica are taken by both (the other hears of them at once).
    let mut jobs = Vec::new();
    for _ in 0..6 {
        let (st, v) = apis[0].post("/api/tasks/job/runs", &json!({})).await;
        assert_eq!(st, 202, "{v}");
        jobs.push(v["id"].as_str().unwrap().to_string());
    }
    let (_, seen) = apis[1].get(&format!("/api/runs/{}", jobs[5])).await;
    assert_eq!(seen["task"], "job", "the other replica shows it: {seen}");
    for id in &jobs {
        let v = apis[1]
            .wait_status(id, &["Succeeded", "Failed"], Duration::from_secs(120))
            .await;
        assert_eq!(v["status"], "Succeeded", "{v}");
    }
    let (on_a, on_b) = (started_by(&replicas[0]), started_by(&replicas[1]));
    for id in &jobs {
        let n = on_a.iter().chain(&on_b).filter(|r| *r == id).count();
        assert_eq!(n, 1, "{id} ran once: a {on_a:?} b {on_b:?}");
    }
    assert!(
        jobs.iter().any(|j| on_a.contains(j)) && jobs.iter().any(|j| on_b.contains(j)),
        "both replicas ran jobs: a {on_a:?} b {on_b:?}"
    );
    // A run's log reads the same through either replica, whichever ran it.
    for id in &jobs {
        for api in &apis {
            let log = api.text(&format!("/api/runs/{id}/logs")).await;
            assert!(log.contains(&format!("job-{id}")), "{id}: {log}");
        }
    }

    // The timer fires (on the leader); kill -9 the leader while it runs a run.
    let leader = usize::from(!leading[0]);
    let other = 1 - leader;
    let start = Instant::now();
    let victims = loop {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the leader never ran a timer run\n{}",
            replicas[leader].stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mine = started_by(&replicas[leader]);
        let running: Vec<String> = runs_of(&apis[other], None)
            .await
            .into_iter()
            .filter(|r| r["status"] == "Running" && r["task"] == "tick")
            .filter_map(|r| r["id"].as_str().map(str::to_string))
            .filter(|id| mine.contains(id))
            .collect();
        if !running.is_empty() {
            break running;
        }
    };
    let ticks_before = runs_of(&apis[other], Some("tick")).await.len();
    assert!(ticks_before >= 1);
    replicas[leader].kill();
    let killed_at = Instant::now();
    while !leads(&apis[other]).await {
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "no takeover\n{}",
            replicas[other].stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took_over = killed_at.elapsed();
    // The new leader fires the timer on: at least three more firings.
    loop {
        let n = runs_of(&apis[other], Some("tick")).await.len();
        if n >= ticks_before + 3 {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the timer stopped after the leader died ({n} runs)\n{}",
            replicas[other].stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // What the dead leader was running is taken over when its lease runs out, and runs
    // to the end as its second attempt.
    for id in &victims {
        let v = apis[other]
            .wait_status(id, &["Succeeded", "Failed"], Duration::from_secs(90))
            .await;
        assert_eq!(v["status"], "Succeeded", "{v}");
        assert_eq!(v["attempt"], 2, "{v}");
        assert!(started_by(&replicas[other]).contains(id), "{id}");
        // Its log tells both attempts, and why the first ended.
        let log = apis[other].text(&format!("/api/runs/{id}/logs")).await;
        assert!(
            log.contains("attempt 1 on a server replica ended")
                && log.contains(&format!("tick-{id}")),
            "{id}: {log}"
        );
    }
    // Every firing is for a time of its own: none fired twice, before, during or after
    // the takeover.
    let mut due: BTreeMap<String, String> = BTreeMap::new();
    for r in runs_of(&apis[other], Some("tick")).await {
        let at = r["trigger"]["due"].as_str().unwrap_or_default().to_string();
        let at = DateTime::parse_from_rfc3339(&at)
            .unwrap_or_else(|e| panic!("due {at:?}: {e}: {r}"))
            .with_timezone(&Utc)
            .to_rfc3339();
        let id = r["id"].as_str().unwrap().to_string();
        if let Some(first) = due.insert(at.clone(), id.clone()) {
            panic!("the firing for {at} was queued twice: {first} and {id}");
        }
    }
    eprintln!(
        "takeover in {:.1} s; {} timer runs; victims {victims:?}",
        took_over.as_secs_f64(),
        due.len()
    );
    // Stop the timer (so the survivor's teardown waits for no new run), then check that
    // no run of either replica left anything behind in the engine.
    let out = replicas[other]
        .cli()
        .args([
            "task",
            "delete",
            "tick",
            "--yes",
            "--server",
            &replicas[other].url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "task delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = runs_of(&apis[other], None)
        .await
        .into_iter()
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    for id in &ids {
        apis[other]
            .wait_status(
                id,
                &["Succeeded", "Failed", "Canceled"],
                Duration::from_secs(90),
            )
            .await;
    }
    drop(replicas);
    for id in &ids {
        assert!(leftovers(id).is_empty(), "{id}: {:?}", leftovers(id));
    }
    // With no server running, commands on a replica's data directory do not pretend its
    // files hold the credentials: they are in PostgreSQL.
    let out = std::process::Command::new(bin())
        .args(["token", "list", "--data"])
        .arg(&da)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PostgreSQL") && err.contains("--server"),
        "{err}"
    );
}

/// PostgreSQL and an S3 bucket; without both, runs `test` again under the scripts that
/// start what is missing (so a plain `cargo test` tests real servers, never skips).
fn shared_or_rerun(test: &str) -> Option<(String, String)> {
    let pg = std::env::var("ACR_TASK_TEST_POSTGRES").ok();
    let s3 = std::env::var("ACR_TASK_TEST_STORAGE").ok();
    if let (Some(pg), Some(s3)) = (&pg, &s3) {
        return Some((pg.clone(), s3.clone()));
    }
    let mut scripts = Vec::new();
    if s3.is_none() {
        scripts.push("with-s3");
    }
    if pg.is_none() {
        scripts.push("with-postgres");
    }
    rerun_under(test, &scripts);
    None
}

/// `docker ARGS...` with the client configuration `config`: its output, or a failure.
fn docker(config: &Path, args: &[&str]) -> String {
    registry_common::run(
        std::process::Command::new("docker")
            .env("DOCKER_CONFIG", config)
            .args(args),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_serve_one_registry_and_a_replica_kill_loses_no_acknowledged_push() {
    require_docker();
    let Some((url, bucket)) = shared_or_rerun(
        "replicas_serve_one_registry_and_a_replica_kill_loses_no_acknowledged_push",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    postgres_for(&url, &da);
    std::fs::copy(da.with_extension("pgdb"), db.with_extension("pgdb")).unwrap();
    // Blobs in a prefix of the bucket both reach; rows in the database both share.
    let storage = format!("{bucket}/{}", uuid::Uuid::new_v4().simple());
    let args = ["--auth", "--storage", storage.as_str()];
    let a = Serve::start_with(&da, 1, &args);
    std::fs::create_dir_all(&db).unwrap();
    let mut b = Serve::start_with(&db, 1, &args);
    b.password = a.password.clone();
    // A replica given the database but not the storage would serve a registry of its own
    // beside the shared one: it is refused, saying what to add.
    let out = std::process::Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("c"))
        .args(["--database", &postgres_for(&url, &da)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("--storage {storage}")),
        "{err}"
    );
    let mut replicas = vec![a, b];

    // docker push through one replica, docker pull of the same image through the other.
    let config = dir.path().join("docker");
    for r in &replicas {
        docker_login(&config, &r.addr, "admin", &replicas[0].password);
    }
    let (on_a, on_b) = (
        format!("{}/shared/app:v1", replicas[0].addr),
        format!("{}/shared/app:v1", replicas[1].addr),
    );
    make_busybox_image(&on_a, "pushed through replica a");
    docker(&config, &["push", &on_a]);
    docker(&config, &["rmi", &on_a]);
    docker(&config, &["pull", &on_b]);
    assert_eq!(
        docker(&config, &["run", "--rm", &on_b]),
        "pushed through replica a"
    );
    docker(&config, &["rmi", &on_b]);
    // One registry: the same repositories through either.
    let listing = |r: &Serve| {
        registry_common::run(
            std::process::Command::new(bin())
                .env("DOCKER_CONFIG", &config)
                .args(["repository", "list", "--registry", &r.addr, "-o", "json"]),
        )
    };
    assert_eq!(listing(&replicas[0]), listing(&replicas[1]));
    assert!(listing(&replicas[1]).contains("shared/app"));

    // An upload begun on one replica goes on through the other (a load balancer need not
    // keep a client on one replica for a blob): a chunk through a, the next through b,
    // the end through b; b sends them to a, which holds the session.
    let ha = replicas[0].registry_client("handoff").await;
    let hb = replicas[1].registry_client("handoff").await;
    let location = begin_upload(&ha, &replicas[0].url, "handoff").await;
    let whole = b"first chunk, second chunk".to_vec();
    send_chunk(&ha, &replicas[0].url, &location, &whole, 0..13).await;
    send_chunk(&hb, &replicas[1].url, &location, &whole, 13..whole.len()).await;
    finish_upload(&hb, &replicas[1].url, &location, &whole).await;
    let digest = registry_common::digest(&whole);
    // Ended: neither replica knows the session any more.
    let r = hb
        .get(format!("{}{location}", replicas[1].url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The tier's read rate holds for the registry, not for each replica: after 40 reads
    // through a, b admits only what is left of the minute's 60 (and a second's refill).
    let (ok, _, err) = replicas[0].acr(&["registry", "update", "--read-ops-limit", "60"]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // settings are read each second
    let reads = |c: reqwest::Client, base: String| {
        let url = format!("{base}/v2/handoff/blobs/{digest}");
        async move {
            let mut admitted = 0;
            for _ in 0..40 {
                let status = c.head(&url).send().await.unwrap().status();
                assert!(status == 200 || status == 429, "{status}");
                admitted += usize::from(status == 200);
            }
            admitted
        }
    };
    assert_eq!(reads(ha.clone(), replicas[0].url.clone()).await, 40);
    tokio::time::sleep(Duration::from_secs(3)).await; // each replica tells the other
    let on_b = reads(hb.clone(), replicas[1].url.clone()).await;
    assert!((15..=30).contains(&on_b), "b admitted {on_b} of 40 reads");
    let (ok, _, err) = replicas[0].acr(&["registry", "update", "--read-ops-limit", "unlimited"]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A stream of pushes through replica a; kill -9 of it midway; the client goes on
    // through replica b, retrying what was cut off. Every push acknowledged (201) by
    // either is then pulled, byte for byte, through b.
    let ca = replicas[0].registry_client("stream").await;
    let cb = replicas[1].registry_client("stream").await;
    let bases = [replicas[0].url.clone(), replicas[1].url.clone()];
    let mut acknowledged: Vec<(String, Vec<u8>, String)> = Vec::new();
    // An upload session held by a, with more than a whole part (8 MiB) acknowledged in
    // two chunks (the second sent through b), is carried on by b once a is killed.
    let la = replicas[0].registry_client("carried").await;
    let lb = replicas[1].registry_client("carried").await;
    let big: Vec<u8> = (0..9_500_000u32).map(|i| (i % 253) as u8).collect();
    let (cut1, cut2) = (9_000_000, 9_400_000);
    let held = begin_upload(&la, &bases[0], "carried").await;
    send_chunk(&la, &bases[0], &held, &big, 0..cut1).await;
    send_chunk(&lb, &bases[1], &held, &big, cut1..cut2).await;
    // And one more, which a carries on itself once restarted at the same address.
    let kept = begin_upload(&la, &bases[0], "carried").await;
    let small = &big[..300_000];
    send_chunk(&la, &bases[0], &kept, small, 0..200_000).await;
    let mut on = 0;
    for i in 0..40 {
        if i == 15 {
            replicas[0].kill();
            // The rest through b: it finds a gone and takes the session over.
            send_chunk(&lb, &bases[1], &held, &big, cut2..big.len()).await;
            finish_upload(&lb, &bases[1], &held, &big).await;
        }
        let layer = format!("layer {i} {}", uuid::Uuid::new_v4()).repeat(2000);
        let config = format!("{{\"n\":{i}}}");
        loop {
            let (c, base) = if on == 0 {
                (&ca, &bases[0])
            } else {
                (&cb, &bases[1])
            };
            match push_image(c, base, "stream", &format!("t{i}"), &layer, &config).await {
                Ok(digest) => {
                    acknowledged.push((format!("t{i}"), layer.clone().into_bytes(), digest));
                    break;
                }
                Err(e) => {
                    assert!(on == 0, "a push through the surviving replica failed: {e}");
                    on = 1;
                }
            }
        }
    }
    assert_eq!(on, 1, "replica a was killed midway");
    for (tag, layer, digest) in &acknowledged {
        let r = cb
            .get(format!("{}/v2/stream/manifests/{tag}", bases[1]))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{tag} acknowledged, then not found");
        assert_eq!(
            r.headers()["docker-content-digest"].to_str().unwrap(),
            digest
        );
        let m: Value = r.json().await.unwrap();
        let layer_digest = m["layers"][0]["digest"].as_str().unwrap();
        let got = cb
            .get(format!("{}/v2/stream/blobs/{layer_digest}", bases[1]))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], &layer[..], "{tag}'s layer");
    }
    // Both replicas answer to one registry still: b's fsck finds every row's content.
    let (ok, out, err) = replicas[1].acr(&["registry", "fsck", "-o", "json"]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["issues"], json!([]), "{out}");
    // With no server on it, the killed replica's directory is not read as a registry
    // of its own: its rows are in the database.
    let (ok, _, err) = replicas[0].acr(&["repository", "list"]);
    assert!(!ok && err.contains("PostgreSQL"), "{err}");

    // Back at its address, a carries on the session it held when it was killed.
    let mut again = Serve::start_at(&replicas[0].addr, &da, 1, &args, &[]);
    again.password = replicas[0].password.clone();
    let la = again.registry_client("carried").await;
    send_chunk(&la, &again.url, &kept, small, 200_000..small.len()).await;
    finish_upload(&la, &again.url, &kept, small).await;
}

/// A new upload session in `repo` through `base`: its location.
async fn begin_upload(c: &reqwest::Client, base: &str, repo: &str) -> String {
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.headers()["location"].to_str().unwrap().to_string()
}

/// The bytes `range` of `data` as a chunk of the session at `location`, acknowledged with
/// the session's new end.
async fn send_chunk(
    c: &reqwest::Client,
    base: &str,
    location: &str,
    data: &[u8],
    range: std::ops::Range<usize>,
) {
    let r = c
        .patch(format!("{base}{location}"))
        .header(
            "content-range",
            format!("{}-{}", range.start, range.end - 1),
        )
        .body(data[range.clone()].to_vec())
        .send()
        .await
        .unwrap();
    let (status, end) = (r.status(), r.headers().get("range").cloned());
    assert_eq!(status, 202, "{}", r.text().await.unwrap());
    assert_eq!(end.unwrap(), format!("0-{}", range.end - 1).as_str());
}

/// Ends the session at `location` as blob `data`, then reads the blob back through `base`.
async fn finish_upload(c: &reqwest::Client, base: &str, location: &str, data: &[u8]) {
    let digest = registry_common::digest(data);
    let r = c
        .put(format!("{base}{location}?digest={digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let blob = r.headers()["location"].to_str().unwrap().to_string();
    let got = c
        .get(format!("{base}{blob}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == data[..], "the blob stored is what was sent");
}

/// Pushes an image of one layer and one config through `base`: its manifest's digest
/// once acknowledged, or why not (a replica gone mid-push).
async fn push_image(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    tag: &str,
    layer: &str,
    config: &str,
) -> Result<String, String> {
    let mut descs = Vec::new();
    for data in [config, layer] {
        let d = registry_common::digest(data.as_bytes());
        let r = c
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
            .body(data.as_bytes().to_vec())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() != 201 {
            return Err(format!("blob: {}", r.status()));
        }
        descs.push((d, data.len()));
    }
    let m =
        registry_common::image_manifest((&descs[0].0, descs[0].1), &[(&descs[1].0, descs[1].1)]);
    let body = serde_json::to_vec(&m).unwrap();
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.clone())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 201 {
        return Err(format!("manifest: {}", r.status()));
    }
    Ok(registry_common::digest(&body))
}

/// A registry server killed, with the engine's images of it, however the test ends (a
/// failed assertion must not leave it holding the output of the test's runner).
struct RegistryProcess {
    child: std::process::Child,
    addr: String,
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        registry_common::remove_images_of(&self.addr);
    }
}

/// `serve --redirect-pulls ARGS...` on `data`, which must refuse to start: its error.
fn redirect_start_refused(data: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(bin())
        .args(["serve", "--registry-only", "--redirect-pulls"])
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_redirect_to_presigned_urls_of_the_bucket() {
    require_docker();
    let Ok(bucket) = std::env::var("ACR_TASK_TEST_STORAGE") else {
        rerun_under(
            "pulls_redirect_to_presigned_urls_of_the_bucket",
            &["with-s3"],
        );
        return;
    };
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prefix = |name: &str| format!("{bucket}/{}-{name}", uuid::Uuid::new_v4().simple());
    // Only unsealed blobs in object storage can be handed out: start says why otherwise.
    let err = redirect_start_refused(&dir.path().join("files"), &[]);
    assert!(
        err.contains("--redirect-pulls: the registry's blobs are not in object storage"),
        "{err}"
    );
    let sealed = prefix("sealed");
    let err = redirect_start_refused(&dir.path().join("sealed"), &["--storage", &sealed]);
    assert!(
        err.contains("--redirect-pulls: the registry is encrypted at rest"),
        "{err}"
    );

    let storage = prefix("plain");
    let data = dir.path().join("plain");
    let (child, addr) = registry_common::spawn_serve(
        &["--redirect-pulls", "--storage", &storage, "--unencrypted"],
        &data,
    );
    let _server = RegistryProcess {
        child,
        addr: addr.clone(),
    };
    // The docker CLI pushes, then pulls its layers from the bucket and runs the image.
    let image = format!("{addr}/redirect/app:v1");
    make_busybox_image(&image, "pulled from the bucket");
    registry_common::run(std::process::Command::new("docker").args(["push", &image]));
    registry_common::run(std::process::Command::new("docker").args(["rmi", &image]));
    registry_common::run(std::process::Command::new("docker").args(["pull", &image]));
    let out =
        registry_common::run(std::process::Command::new("docker").args(["run", "--rm", &image]));
    assert_eq!(out, "pulled from the bucket");

    // A GET of a blob is a redirect to a presigned URL of the bucket, which needs no other
    // credentials, serves ranges, and holds the bytes the digest names; a HEAD is answered
    // here; a blob not in the repository is not redirected anywhere.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://{addr}");
    let manifest: Value = plain
        .get(format!("{base}/v2/redirect/app/manifests/v1"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let r = plain
        .get(format!("{base}/v2/redirect/app/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["docker-content-digest"], layer.as_str());
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&endpoint) && location.contains("X-Amz-Signature="),
        "{location}"
    );
    let bytes = reqwest::get(&location).await.unwrap();
    assert_eq!(bytes.status(), 200);
    assert_eq!(
        registry_common::digest(&bytes.bytes().await.unwrap()),
        layer
    );
    let part = plain
        .get(&location)
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().len(), 10);
    let tampered = location.replace("X-Amz-Signature=", "X-Amz-Signature=0");
    assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);
    let head = plain
        .head(format!("{base}/v2/redirect/app/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let elsewhere = plain
        .get(format!("{base}/v2/other/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 404);
}
