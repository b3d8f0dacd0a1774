//! `GET /metrics` and `--log-format json` on a real `acr-task serve`: the scrape needs the
//! task API's credentials unless `--public-metrics`; a run, a push and a webhook delivery
//! show in the counters; every log line of a run names the run and its step.

mod serve_common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use serde_json::{json, Value};
use serve_common::registry_common::{digest, image_manifest, push_blob, put_manifest};
use serve_common::*;

/// A webhook receiver answering 200 to every request, counting them.
fn receiver() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            let mut buf = [0u8; 65536];
            let _ = s.read(&mut buf);
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, n)
}

async fn scrape(api: &Api) -> (u16, String, String) {
    let r = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (st, ct, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_runs_pushes_and_deliveries() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(
        &data.path().join("d"),
        2,
        &["--auth", "--log-format", "json"],
    );
    let api = serve.client();

    // Without credentials the scrape is refused, with a challenge; a wrong password too.
    let (st, _, _) = scrape(&serve.anonymous()).await;
    assert_eq!(st, 401);
    let wrong = Api {
        base: serve.url.clone(),
        http: reqwest::Client::builder()
            .default_headers(
                [(
                    reqwest::header::AUTHORIZATION,
                    base64_basic("admin", "not-it").parse().unwrap(),
                )]
                .into_iter()
                .collect(),
            )
            .build()
            .unwrap(),
    };
    assert_eq!(scrape(&wrong).await.0, 401);
    let (st, ct, before) = scrape(&api).await;
    assert_eq!(st, 200, "{before}");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(before.trim_end().ends_with("# EOF"), "{before}");
    assert_eq!(
        sample(&before, "acr_task_queue_depth"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(sample(&before, "acr_task_run_concurrency"), Some(2.0));

    // A push (with a webhook listening), and a run.
    let (hook, delivered) = receiver();
    let (ok, _, err) = serve.acr(&[
        "webhook",
        "create",
        "pushes",
        "--uri",
        &format!("http://{hook}/hook"),
        "--actions",
        "push",
        "--allow-private-destination",
    ]);
    assert!(ok, "{err}");
    let reg = serve.registry_client("metrics/app").await;
    let layer = vec![7u8; 300_000];
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let l = push_blob(&reg, &serve.url, "metrics/app", &layer).await;
    let c = push_blob(&reg, &serve.url, "metrics/app", &config).await;
    let m = serde_json::to_vec(&image_manifest((&c, config.len()), &[(&l, layer.len())])).unwrap();
    let r = put_manifest(
        &reg,
        &serve.url,
        "metrics/app",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &m,
    )
    .await;
    assert_eq!(r.status(), 201);
    let pulled = reg
        .get(format!("{}/v2/metrics/app/blobs/{l}", serve.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(digest(&pulled), l);

    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "hello", "context": data_file("hello").display().to_string(),
                    "triggers": {"baseImage": false}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = api.post("/api/tasks/hello/runs", &json!({})).await;
    assert_eq!(st, 202, "{v}");
    let run = v["id"].as_str().unwrap().to_string();
    let done = api
        .wait_status(&run, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}\n{}", serve.stderr());
    for _ in 0..100 {
        if delivered.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (_, _, after) = scrape(&api).await;
    let get = |s: &str| sample(&after, s).unwrap_or_else(|| panic!("no {s} in\n{after}"));
    assert_eq!(
        get(r#"acr_task_runs{task="hello",status="Succeeded"}"#),
        1.0
    );
    assert_eq!(get(r#"acr_task_trigger_events_total{kind="manual"}"#), 1.0);
    assert_eq!(
        get(r#"acr_task_run_duration_seconds_count{task="hello",status="Succeeded"}"#),
        1.0
    );
    assert!(get(r#"acr_task_run_duration_seconds_sum{task="hello",status="Succeeded"}"#) > 0.0);
    assert_eq!(
        get(r#"acr_task_step_duration_seconds_count{kind="cmd",status="Succeeded"}"#),
        1.0
    );
    assert_eq!(
        get(r#"acr_task_registry_requests_total{route="upload_start",method="POST",status="201"}"#),
        2.0
    );
    assert_eq!(
        get(r#"acr_task_registry_requests_total{route="manifest",method="PUT",status="201"}"#),
        1.0
    );
    assert!(
        get(r#"acr_task_registry_requests_total{route="blob",method="GET",status="200"}"#) >= 1.0
    );
    // Bytes both ways: the layer went in and came out.
    assert!(get("acr_task_registry_received_bytes_total") >= layer.len() as f64);
    assert!(get("acr_task_registry_sent_bytes_total") >= layer.len() as f64);
    assert!(get("acr_task_registry_upload_duration_seconds_count") >= 2.0);
    assert!(get("acr_task_registry_pull_duration_seconds_count") >= 1.0);
    assert!(get("acr_task_storage_used_bytes") >= layer.len() as f64);
    assert!(
        get(r#"acr_task_webhook_deliveries_total{result="delivered"}"#) >= 1.0,
        "{after}"
    );
    assert_eq!(get("acr_task_queue_depth"), 0.0);

    // Every log line of the run names it; a step's lines name the step too.
    let log = serve.stderr();
    // Every log line is JSON; only the first start's admin password notice (for a person,
    // once) is plain text.
    let (json_lines, plain): (Vec<&str>, Vec<&str>) = log.lines().partition(|l| l.starts_with('{'));
    assert!(
        plain
            .iter()
            .all(|l| !l.contains(" INFO ") && !l.contains(" WARN ")),
        "a text log line under --log-format json:\n{log}"
    );
    let lines: Vec<Value> = json_lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let in_run: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["run"] == run.as_str()))
        })
        .collect();
    assert!(!in_run.is_empty(), "no line in the run's span:\n{log}");
    let step_lines: Vec<&Value> = in_run
        .iter()
        .copied()
        .filter(|v| v["span"]["name"] == "step")
        .collect();
    assert!(
        step_lines
            .iter()
            .any(|v| v["fields"]["message"] == "step finished" && v["span"]["step"] == "hello"),
        "{log}"
    );
    // Both lifecycle lines, in the step's span inside the run's.
    assert!(
        step_lines
            .iter()
            .any(|v| v["fields"]["message"] == "step started"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn public_metrics_need_no_credentials() {
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 1, &["--auth", "--public-metrics"]);
    let (st, _, text) = scrape(&serve.anonymous()).await;
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("# TYPE acr_task_queue_depth gauge"), "{text}");
    // Only the scrape: the task API stays closed.
    let (st, _) = serve.anonymous().get("/api/tasks").await;
    assert_eq!(st, 401);
}
