//! Outgoing webhooks against real HTTP receivers: event shape, HMAC signature, custom
//! headers, scope filtering, retry after a failure, a slow receiver not slowing pushes,
//! and undelivered events surviving a restart of `acr-task serve --registry-only`.

mod registry_common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acr_task::webhooks::{
    verify_signature, DeliveryOptions, Dispatcher, NewWebhook, SIGNATURE_HEADER,
};
use axum::http::{HeaderMap, StatusCode};
use registry_common::*;

/// One request the receiver saw: (headers, body, status it answered).
type Hit = (HeaderMap, Vec<u8>, u16);

#[derive(Clone, Default)]
struct Received {
    hits: Arc<Mutex<Vec<Hit>>>,
}

/// An HTTP receiver on `listener` answering 500 to the first `fail_first` requests and
/// sleeping `delay` before each answer.
async fn receiver(
    listener: tokio::net::TcpListener,
    fail_first: usize,
    delay: Duration,
) -> Received {
    receiver_with(listener, fail_first, delay, None).await
}

/// [`receiver`] over HTTPS when `tls` is given.
async fn receiver_with(
    listener: tokio::net::TcpListener,
    fail_first: usize,
    delay: Duration,
    tls: Option<acr_task::listen::TlsConfig>,
) -> Received {
    let rec = Received::default();
    let r = rec.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let r = r.clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut hits = r.hits.lock().unwrap();
                let status = if hits.len() < fail_first { 500 } else { 200 };
                hits.push((headers, body.to_vec(), status));
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    tokio::spawn(acr_task::listen::serve(
        listener,
        app,
        tls,
        std::future::pending(),
    ));
    rec
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn push_image(base: &str, repo: &str, tag: &str) -> String {
    let c = reqwest::Client::new();
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = push_blob(&c, base, repo, config).await;
    let m = image_manifest((&cd, config.len()), &[]);
    let body = m.to_string();
    let r = put_manifest(
        &c,
        base,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 201);
    digest(body.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_events_are_retried_and_slow_receivers_do_not_slow_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let base = format!("http://{}", reg.addr());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let rec = receiver(l, 1, Duration::ZERO).await;
    let slow_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow_l.local_addr().unwrap();
    let slow = receiver(slow_l, 0, Duration::from_secs(3)).await;

    let d = Dispatcher::start(
        reg.registry(),
        dir.path(),
        DeliveryOptions {
            backoff: Duration::from_millis(100),
            ..DeliveryOptions::default()
        },
    )
    .unwrap();
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("X-Custom".to_string(), "yes".to_string());
    d.store()
        .create(
            &NewWebhook {
                name: "main",
                uri: &format!("http://{addr}/hook"),
                actions: &["push".into(), "delete".into()],
                scope: Some("samples/*"),
                headers: &headers,
                secret: Some("s3cret"),
                allow_private: true,
            },
            &Default::default(),
        )
        .unwrap();
    d.store()
        .create(
            &NewWebhook {
                allow_private: true,
                ..NewWebhook::new(
                    "slow",
                    &format!("http://{slow_addr}/hook"),
                    &["push".into()],
                )
            },
            &Default::default(),
        )
        .unwrap();
    // Listing never shows the secret or header values.
    let listed = serde_json::to_string(
        &d.store()
            .all()
            .unwrap()
            .into_iter()
            .map(|w| w.info)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(
        !listed.contains("s3cret") && !listed.contains("\"yes\""),
        "{listed}"
    );

    // The slow receiver takes 3 s per event; the push must not wait for it.
    let t = Instant::now();
    let digest = push_image(&base, "samples/a", "v1").await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "push took {:?}",
        t.elapsed()
    );
    // Outside the scope: no event for `main`.
    push_image(&base, "other", "v1").await;

    // First attempt answered 500, the retry succeeds.
    wait_for("a retried delivery", Duration::from_secs(10), || {
        rec.hits.lock().unwrap().iter().any(|h| h.2 == 200)
    })
    .await;
    let hits = rec.hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 2, "one failure then one success");
    assert_eq!(hits[0].1, hits[1].1, "the retry resends the same event");
    let (h, body, _) = &hits[1];
    let sig = h[SIGNATURE_HEADER].to_str().unwrap();
    assert!(verify_signature("s3cret", body, sig));
    assert!(!verify_signature("other", body, sig));
    assert_eq!(h["x-custom"], "yes");
    assert_eq!(h["content-type"], "application/json");
    let ev: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(ev["action"], "push");
    assert_eq!(ev["target"]["repository"], "samples/a");
    assert_eq!(ev["target"]["tag"], "v1");
    assert_eq!(ev["target"]["digest"], digest);
    assert_eq!(
        ev["target"]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(ev["target"]["size"].as_u64().unwrap() > 0);
    assert_eq!(ev["request"]["method"], "PUT");
    assert_eq!(ev["request"]["host"], reg.addr().to_string());
    assert!(!ev["id"].as_str().unwrap().is_empty());
    assert!(ev["timestamp"].as_str().unwrap().contains('T'));
    assert_eq!(ev["actor"]["name"], "");

    let history = d.store().history("main", 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].state, "delivered");
    assert_eq!(history[0].attempts, 2);
    assert_eq!(history[0].last_status, Some(200));

    // A delete is delivered too.
    let r = reqwest::Client::new()
        .delete(format!("{base}/v2/samples/a/manifests/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_for("the delete event", Duration::from_secs(10), || {
        rec.hits.lock().unwrap().iter().any(|(_, b, s)| {
            *s == 200
                && serde_json::from_slice::<serde_json::Value>(b).unwrap()["action"] == "delete"
        })
    })
    .await;
    // The slow receiver got both pushes eventually.
    wait_for("the slow receiver", Duration::from_secs(15), || {
        slow.hits.lock().unwrap().len() >= 2
    })
    .await;
    drop(d);
    reg.shutdown().await;
}

fn acr(data: &Path, args: &[&str]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "acr-task {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data: &Path) -> (Server, String) {
    serve_with(data, &[])
}

fn serve_with(data: &Path, extra: &[&str]) -> (Server, String) {
    let mut args = vec!["--registry-only", "--webhook-backoff-ms", "200"];
    args.extend_from_slice(extra);
    let (child, addr) = spawn_serve(&args, data);
    (Server(child), addr)
}

fn tls_file(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_receivers_are_checked_against_the_trusted_roots() {
    let tls = acr_task::listen::TlsConfig::load(
        Path::new(&tls_file("server.pem")),
        Path::new(&tls_file("server-key.pem")),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let rec = receiver_with(listener, 0, Duration::ZERO, Some(tls)).await;
    let uri = format!("https://127.0.0.1:{port}/hook");
    for (dir, extra) in [
        (tempfile::tempdir().unwrap(), vec![]),
        (
            tempfile::tempdir().unwrap(),
            vec!["--ca-cert".to_string(), tls_file("ca.pem")],
        ),
    ] {
        let data = dir.path();
        acr(
            data,
            &[
                "webhook",
                "create",
                "tls",
                "--uri",
                &uri,
                "--actions",
                "push",
                "--allow-private-destination",
            ],
        );
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (_server, addr) = serve_with(data, &extra);
        let before = rec.hits.lock().unwrap().len();
        push_image(&format!("http://{addr}"), "app", "v1").await;
        let start = Instant::now();
        let ev = loop {
            let ev = events(data, "tls");
            if ev[0]["attempts"].as_u64().unwrap_or(0) >= 1 {
                break ev;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no attempt: {ev}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if extra.is_empty() {
            // The test CA is not a system root: the handshake fails, nothing is sent.
            assert_eq!(ev[0]["state"], "pending", "{ev}");
            let err = ev[0]["lastError"].as_str().unwrap_or_default();
            assert!(err.contains("certificate"), "{ev}");
            assert_eq!(rec.hits.lock().unwrap().len(), before);
        } else {
            assert_eq!(ev[0]["state"], "delivered", "{ev}");
            assert_eq!(ev[0]["lastStatus"], 200, "{ev}");
            assert_eq!(rec.hits.lock().unwrap().len(), before + 1);
        }
    }
}

fn events(data: &Path, hook: &str) -> serde_json::Value {
    let o = acr(data, &["webhook", "list-events", hook, "-o", "json"]);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_events_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // A port with nobody listening yet.
    let port: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let uri = format!("http://{port}/hook");
    let o = acr(
        data,
        &[
            "webhook",
            "create",
            "ci",
            "--uri",
            &uri,
            "--actions",
            "push",
            "--secret",
            "k",
            "--allow-private-destination",
            "-o",
            "json",
        ],
    );
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(created[0]["signed"], true);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("\"k\""));

    let (server, addr) = serve(data);
    push_image(&format!("http://{addr}"), "app", "v1").await;
    // The receiver is down: the delivery fails and stays pending.
    let start = Instant::now();
    loop {
        let ev = events(data, "ci");
        if ev[0]["attempts"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(ev[0]["state"], "pending");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no attempt recorded: {ev}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);

    // Receiver up, server restarted: the queued event is delivered, signed.
    let rec = receiver(
        tokio::net::TcpListener::bind(port).await.unwrap(),
        0,
        Duration::ZERO,
    )
    .await;
    let (_server, _addr) = serve(data);
    wait_for(
        "the event queued before the restart",
        Duration::from_secs(15),
        || !rec.hits.lock().unwrap().is_empty(),
    )
    .await;
    let (h, body, _) = rec.hits.lock().unwrap()[0].clone();
    assert!(verify_signature(
        "k",
        &body,
        h[SIGNATURE_HEADER].to_str().unwrap()
    ));
    let ev: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ev["target"]["repository"], "app");
    let start = Instant::now();
    while events(data, "ci")[0]["state"] != "delivered" {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Ping: delivered now, recorded in the history.
    let o = acr(data, &["webhook", "ping", "ci", "-o", "json"]);
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p[0]["state"], "delivered");
    assert_eq!(p[0]["action"], "ping");
    assert_eq!(events(data, "ci").as_array().unwrap().len(), 2);
    let listed = acr(data, &["webhook", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["name"], "ci");
    acr(data, &["webhook", "delete", "ci", "--yes"]);
    // Pinging a webhook that is gone fails.
    let o = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(["webhook", "ping", "ci", "--data"])
        .arg(data)
        .output()
        .unwrap();
    assert!(!o.status.success());
}

/// Events are read from the registry's outbox, not only heard live: a push accepted while
/// no dispatcher runs (a crash between the commit and the queue) is delivered when one
/// starts, and a further restart delivers nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_no_dispatcher_runs_are_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let base = format!("http://{}", reg.addr());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let rec = receiver(l, 0, Duration::ZERO).await;
    let opts = DeliveryOptions {
        backoff: Duration::from_millis(100),
        ..DeliveryOptions::default()
    };
    let d = Dispatcher::start(reg.registry(), dir.path(), opts.clone()).unwrap();
    d.store()
        .create(
            &NewWebhook {
                allow_private: true,
                ..NewWebhook::new("hook", &format!("http://{addr}/hook"), &["push".into()])
            },
            &Default::default(),
        )
        .unwrap();
    // Let the first start record where the outbox ends, then stop it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(d);

    let digest = push_image(&base, "catchup/app", "v1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rec.hits.lock().unwrap().is_empty(),
        "no dispatcher was running"
    );

    let d = Dispatcher::start(reg.registry(), dir.path(), opts.clone()).unwrap();
    wait_for(
        "the event committed while down",
        Duration::from_secs(10),
        || !rec.hits.lock().unwrap().is_empty(),
    )
    .await;
    let body: serde_json::Value = serde_json::from_slice(&rec.hits.lock().unwrap()[0].1).unwrap();
    assert_eq!(body["target"]["digest"], digest.as_str());
    assert_eq!(body["target"]["repository"], "catchup/app");
    drop(d);

    // Restarted again: the cursor was saved, nothing is delivered twice.
    let _d = Dispatcher::start(reg.registry(), dir.path(), opts).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(rec.hits.lock().unwrap().len(), 1);
    reg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_and_private_receivers_need_the_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    // Where a redirect would lead (with the signature and custom headers).
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inner = l.local_addr().unwrap();
    let rec = receiver(l, 0, Duration::ZERO).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector = l.local_addr().unwrap();
    let to = format!("http://{inner}/hook");
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let to = to.clone();
            async move { axum::response::Redirect::temporary(&to) }
        }),
    );
    tokio::spawn(acr_task::listen::serve(
        l,
        app,
        None,
        std::future::pending(),
    ));

    let d = Dispatcher::start(
        reg.registry(),
        dir.path(),
        DeliveryOptions {
            backoff: Duration::from_millis(50),
            max_attempts: 2,
            ..DeliveryOptions::default()
        },
    )
    .unwrap();
    let hook = format!("http://{redirector}/hook");
    let mut headers = std::collections::BTreeMap::new();
    headers.insert(
        "Authorization".to_string(),
        "Bearer for-the-receiver".to_string(),
    );
    // Without the opt-in, a loopback receiver is refused when the webhook is made.
    let e = d
        .store()
        .create(
            &NewWebhook {
                name: "plain",
                uri: &hook,
                actions: &["push".into()],
                scope: None,
                headers: &headers,
                secret: Some("k"),
                allow_private: false,
            },
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("--allow-private-destination"), "{e}");
    let e = d
        .store()
        .create(
            &NewWebhook {
                name: "meta",
                uri: "http://169.254.169.254/latest/meta-data/",
                actions: &["push".into()],
                scope: None,
                headers: &headers,
                secret: None,
                allow_private: false,
            },
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("private"), "{e}");
    d.store()
        .create(
            &NewWebhook {
                name: "r",
                uri: &hook,
                actions: &["push".into()],
                scope: None,
                headers: &headers,
                secret: Some("k"),
                allow_private: true,
            },
            &Default::default(),
        )
        .unwrap();
    push_image(&base(&reg), "app", "v1").await;
    let store = d.store().clone();
    wait_for("the delivery to fail", Duration::from_secs(10), || {
        store
            .history("r", 10)
            .unwrap()
            .first()
            .is_some_and(|h| h.state == "failed")
    })
    .await;
    let h = &store.history("r", 10).unwrap()[0];
    assert_eq!(h.last_status, Some(307));
    assert!(h
        .last_error
        .as_deref()
        .unwrap()
        .contains("redirects are not followed"));
    assert!(
        rec.hits.lock().unwrap().is_empty(),
        "the redirect was followed with the webhook's headers"
    );
    drop(d);
    reg.shutdown().await;
}
