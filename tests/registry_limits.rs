//! The registry under hostile or careless clients: slow uploads that would pin threads,
//! too many sessions, abandoned sessions, bodies that stall, heads that never end, one
//! client holding every connection, oversized blobs, and manifests that lie about sizes.
//! Each test carries the attack and checks that other clients are still served.

mod registry_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use acr_task::listen::ConnectionLimits;
use acr_task::registry::{start, RegistryConfig, RegistryLimits, RunningRegistry};
use registry_common::*;

async fn start_with(
    dir: &std::path::Path,
    limits: RegistryLimits,
    connections: ConnectionLimits,
) -> RunningRegistry {
    let mut cfg = RegistryConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.limits = limits;
    cfg.connections = connections;
    start(cfg).await.unwrap()
}

/// Opens an upload session in `repo`; returns its absolute URL.
async fn open_session(c: &reqwest::Client, base: &str, repo: &str) -> reqwest::Response {
    c.post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap()
}

fn location(base: &str, r: &reqwest::Response) -> String {
    let loc = r.headers()["location"].to_str().unwrap();
    if loc.starts_with("http") {
        loc.to_string()
    } else {
        format!("{base}{loc}")
    }
}

/// A request body that sends `first` and then nothing, until the sender is dropped.
fn stalled_body(first: Vec<u8>) -> (reqwest::Body, tokio::sync::mpsc::Sender<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
    let stream = futures_util::stream::unfold((Some(first), rx), |(first, mut rx)| async move {
        if let Some(f) = first {
            return Some((Ok::<_, std::io::Error>(bytes::Bytes::from(f)), (None, rx)));
        }
        // Pends until the test drops the sender, then ends the body.
        rx.recv().await;
        None
    });
    (reqwest::Body::wrap_stream(stream), tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_uploads_pin_no_threads_and_pulls_stay_fast() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RegistryLimits {
        max_uploads_per_repository: 1000,
        max_uploads_per_client: 1000,
        ..RegistryLimits::default()
    };
    let conns = ConnectionLimits {
        per_client: 2000,
        total: 2000,
        ..ConnectionLimits::default()
    };
    let reg = start_with(dir.path(), limits, conns).await;
    let base = base(&reg);
    let c = reqwest::Client::new();
    let data = vec![7u8; 64 * 1024];
    let d = push_blob(&c, &base, "fast", &data).await;
    // 600 uploads that send a little and then stall: more than tokio's 512 blocking
    // threads, so a design that parks a thread per waiting upload starves every pull.
    let mut stalls = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..600 {
        let r = open_session(&c, &base, &format!("slow{}", i % 10)).await;
        assert_eq!(r.status(), 202);
        let url = location(&base, &r);
        let (body, hold) = stalled_body(vec![1u8; 1024]);
        stalls.push(hold);
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let _ = c.patch(url).body(body).send().await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.get(format!("{base}/v2/fast/blobs/{d}")).send(),
        )
        .await
        .expect("a pull hung behind stalled uploads")
        .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), data.len());
        worst = worst.max(t0.elapsed());
    }
    assert!(
        worst < Duration::from_secs(1),
        "pulls beside 600 stalled uploads took up to {worst:?}"
    );
    drop(stalls);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    reg.shutdown().await;
}

#[tokio::test]
async fn upload_sessions_are_capped_per_repository_and_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RegistryLimits {
        max_uploads_per_repository: 3,
        max_uploads_per_client: 5,
        ..RegistryLimits::default()
    };
    let reg = start_with(dir.path(), limits, ConnectionLimits::default()).await;
    let base = base(&reg);
    let c = reqwest::Client::new();
    let mut open = Vec::new();
    for _ in 0..3 {
        let r = open_session(&c, &base, "a").await;
        assert_eq!(r.status(), 202);
        open.push(location(&base, &r));
    }
    let r = open_session(&c, &base, "a").await;
    assert_eq!(r.status(), 429);
    let msg = r.text().await.unwrap();
    assert!(
        msg.contains("TOOMANYREQUESTS") && msg.contains("repository a"),
        "{msg}"
    );
    // Cancelling one frees its place.
    let r = c.delete(open.pop().unwrap()).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(open_session(&c, &base, "a").await.status(), 202);
    // Other repositories until the client's own limit (5 in all).
    assert_eq!(open_session(&c, &base, "b").await.status(), 202);
    assert_eq!(open_session(&c, &base, "b").await.status(), 202);
    let r = open_session(&c, &base, "c").await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("this client"));
    reg.shutdown().await;
}

#[tokio::test]
async fn abandoned_sessions_are_swept_with_their_data() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RegistryLimits {
        upload_idle: Duration::from_secs(2),
        ..RegistryLimits::default()
    };
    let reg = start_with(dir.path(), limits, ConnectionLimits::default()).await;
    let base = base(&reg);
    let c = reqwest::Client::new();
    let r = open_session(&c, &base, "a").await;
    let url = location(&base, &r);
    let r = c.patch(&url).body(vec![5u8; 1000]).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let uploads = dir.path().join("uploads");
    let files = || std::fs::read_dir(&uploads).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files(), 1);
    // No request touches it: within a few sweeps it is gone, data included.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.get(&url).send().await.unwrap();
        if r.status() == 404 {
            assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle session was never swept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(files(), 0, "the swept session left its data behind");
    reg.shutdown().await;
}

#[tokio::test]
async fn a_stalled_body_is_abandoned_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RegistryLimits {
        body_idle: Duration::from_secs(1),
        ..RegistryLimits::default()
    };
    let reg = start_with(dir.path(), limits, ConnectionLimits::default()).await;
    let base = base(&reg);
    let c = reqwest::Client::new();
    let r = open_session(&c, &base, "a").await;
    let url = location(&base, &r);
    let (body, _hold) = stalled_body(b"partial".to_vec());
    let t0 = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(10), c.patch(&url).body(body).send())
        .await
        .expect("the server waited forever for a stalled body");
    if let Ok(r) = answered {
        assert_eq!(r.status(), 400);
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The session is still usable, and what the stalled chunk sent is not in it.
    let data = b"the whole blob".to_vec();
    let d = digest(&data);
    let r = c.patch(&url).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(format!("{url}?digest={d}")).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let got = c
        .get(format!("{base}/v2/a/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().to_vec(), data);
    reg.shutdown().await;
}

#[tokio::test]
async fn blobs_over_the_size_limit_are_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RegistryLimits {
        max_blob_bytes: 1000,
        ..RegistryLimits::default()
    };
    let reg = start_with(dir.path(), limits, ConnectionLimits::default()).await;
    let base = base(&reg);
    let c = reqwest::Client::new();
    let data = vec![1u8; 2000];
    let d = digest(&data);
    let r = c
        .post(format!("{base}/v2/a/blobs/uploads/?digest={d}"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("SIZE_INVALID") && text.contains("1000"),
        "{text}"
    );
    // Chunk by chunk it is refused as well, once the total passes the limit.
    let s = open_session(&c, &base, "a").await;
    let url = location(&base, &s);
    assert_eq!(
        c.patch(&url)
            .body(vec![1u8; 600])
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        c.patch(&url)
            .body(vec![1u8; 600])
            .send()
            .await
            .unwrap()
            .status(),
        413
    );
    let head = c
        .head(format!("{base}/v2/a/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
    // Under the limit all is well.
    push_blob(&c, &base, "a", &data[..1000]).await;
    reg.shutdown().await;
}

#[tokio::test]
async fn manifests_whose_sizes_disagree_with_the_blobs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let base = base(&reg);
    let c = reqwest::Client::new();
    let config = br#"{"os":"linux"}"#;
    let layer = b"layer bytes";
    let cd = push_blob(&c, &base, "r", config).await;
    let ld = push_blob(&c, &base, "r", layer).await;
    for (cs, ls) in [(config.len() + 1, layer.len()), (config.len(), 3)] {
        let m = image_manifest((&cd, cs), &[(&ld, ls)]);
        let r = put_manifest(
            &c,
            &base,
            "r",
            "bad",
            OCI_MANIFEST,
            m.to_string().as_bytes(),
        )
        .await;
        assert_eq!(r.status(), 400);
        let body = r.text().await.unwrap();
        assert!(
            body.contains("MANIFEST_INVALID") && body.contains("size"),
            "{body}"
        );
    }
    let good = image_manifest((&cd, config.len()), &[(&ld, layer.len())]).to_string();
    let r = put_manifest(&c, &base, "r", "v1", OCI_MANIFEST, good.as_bytes()).await;
    assert_eq!(r.status(), 201);
    // An index whose child descriptor lies about the child manifest's size.
    let index = |size: usize| {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest(good.as_bytes()), "size": size}]
        })
        .to_string()
    };
    let idx = "application/vnd.oci.image.index.v1+json";
    let r = put_manifest(&c, &base, "r", "i", idx, index(good.len() + 10).as_bytes()).await;
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let r = put_manifest(&c, &base, "r", "i", idx, index(good.len()).as_bytes()).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        c.get(format!("{base}/v2/r/manifests/bad"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    reg.shutdown().await;
}

/// Reads until the server closes the connection; how long that took.
fn time_to_close(mut s: TcpStream, within: Duration) -> Duration {
    s.set_read_timeout(Some(within)).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t0.elapsed(),
            Ok(_) => continue,
            Err(e) => panic!("the server kept the connection open past {within:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let conns = ConnectionLimits {
        header_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    let reg = start_with(dir.path(), RegistryLimits::default(), conns).await;
    let addr = reg.addr();
    tokio::task::spawn_blocking(move || {
        // A head that never ends (slowloris).
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n")
            .unwrap();
        assert!(time_to_close(s, Duration::from_secs(5)) < Duration::from_secs(4));
        // A kept-alive connection left idle after a request.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        assert!(time_to_close(s, Duration::from_secs(5)) < Duration::from_secs(4));
    })
    .await
    .unwrap();
    reg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let conns = ConnectionLimits {
        per_client: 4,
        header_timeout: Duration::from_secs(20),
        ..ConnectionLimits::default()
    };
    let reg = start_with(dir.path(), RegistryLimits::default(), conns).await;
    let addr = reg.addr();
    // Another client: a connection from 127.0.0.2, another address on the loopback.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = sock.connect(addr).await.unwrap().into_std().unwrap();
    other.set_nonblocking(false).unwrap();
    tokio::task::spawn_blocking(move || {
        let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(300));
        // The fifth from the same address is closed at once...
        let fifth = TcpStream::connect(addr).unwrap();
        assert!(time_to_close(fifth, Duration::from_secs(5)) < Duration::from_secs(2));
        // ...while another address is served.
        let mut s = other;
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        drop(held);
    })
    .await
    .unwrap();
    reg.shutdown().await;
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
