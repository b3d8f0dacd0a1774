//! Geo-replication's convergence between three `acr-task serve` processes on loopback
//! (each a region with its own data directory and `--auth`, as `tests/replication.rs`
//! starts them):
//!
//! ```sh
//! cargo bench --bench replication            # 100 pushes, then one 256 MiB layer
//! cargo bench --bench replication -- 300     # another number of pushes
//! BENCH_REPLICAS=1 cargo bench --bench replication   # home and one replica only
//! ```
//!
//! 1. Small images (a config and a layer of some bytes) pushed one after another to one
//!    replica; for each, the time from its manifest's acknowledgement until its tag is
//!    listed on every other replica (each polled every 10 ms). Median, p95, max.
//! 2. A 256 MiB layer: a plain push of it to the home registry (blob and manifest), then
//!    the time from the manifest's acknowledgement until it is listed on both replicas,
//!    as bytes per second beside the plain push's.
//! 3. Settings: tokens made one after another on the home replica through the API; for
//!    each, the time from its acknowledgement until every other replica holds it (each
//!    polled every 10 ms). Median, p95, max.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest as _;

struct Serve {
    child: Child,
    url: String,
    password: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn start(data: &Path) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(["serve", "--listen", "127.0.0.1:0", "--auth", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting acr-task serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let password = std::fs::read_to_string(data.join("admin.password"))
        .unwrap()
        .trim()
        .to_string();
    Serve {
        child,
        url: format!("http://{addr}"),
        password,
    }
}

/// A client with the admin's bearer token for `scope`.
async fn bearer(s: &Serve, scope: &str) -> reqwest::Client {
    let v: Value = reqwest::Client::new()
        .get(format!(
            "{}/oauth2/token?service=acr-task&scope={scope}",
            s.url
        ))
        .basic_auth("admin", Some(&s.password))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap();
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// Pushes `data` whose digest is `d` in one request (hashed before, as a client does
/// before it uploads: the time is the registry's).
async fn push_blob(
    c: &reqwest::Client,
    s: &Serve,
    repo: &str,
    d: String,
    data: Vec<u8>,
) -> (String, usize) {
    let n = data.len();
    let r = c
        .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", s.url))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    (d, n)
}

/// Pushes config and layer (`(digest, bytes)`) and the manifest tagged `tag`; returns
/// when it is acknowledged.
async fn push_image(
    c: &reqwest::Client,
    s: &Serve,
    repo: &str,
    tag: &str,
    (layer_digest, layer): (String, Vec<u8>),
) {
    let config = format!("{{\"tag\":\"{tag}\"}}").into_bytes();
    let (cd, cn) = push_blob(c, s, repo, digest(&config), config).await;
    let (ld, ln) = push_blob(c, s, repo, layer_digest, layer).await;
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ln}],
    });
    let r = c
        .put(format!("{}/v2/{repo}/manifests/{tag}", s.url))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&m).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// Polls `repo`'s tag list on `s` every 10 ms until `want` tags are listed; each tag's
/// first sighting.
async fn watch(
    c: reqwest::Client,
    url: String,
    repo: &str,
    want: usize,
) -> std::collections::HashMap<String, Instant> {
    let mut seen = std::collections::HashMap::new();
    while seen.len() < want {
        if let Ok(r) = c
            .get(format!("{url}/v2/{repo}/tags/list?n=10000"))
            .send()
            .await
        {
            if let Ok(v) = r.json::<Value>().await {
                let now = Instant::now();
                for t in v["tags"].as_array().into_iter().flatten() {
                    if let Some(t) = t.as_str() {
                        seen.entry(t.to_string()).or_insert(now);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| a.parse::<usize>().is_ok())
        .map(|a| a.parse().unwrap())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let replicas: usize = std::env::var("BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .clamp(1, 4);
    let names = ["home", "west", "east", "north", "south"];
    let servers: Vec<Serve> = names[..=replicas]
        .iter()
        .map(|r| start(&dir.path().join(r)))
        .collect();
    let (home, others) = (&servers[0], &servers[1..]);
    let api = reqwest::Client::new();
    for (name, s) in names[1..].iter().zip(others) {
        let r = api
            .post(format!("{}/api/registry/replications", home.url))
            .basic_auth("admin", Some(&home.password))
            .json(&json!({"name": name, "url": s.url, "username": "admin", "password": s.password}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} UTC, {} cores, load {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // 1. Small pushes to home, each timed until listed on west and east.
    let repo = "bench/small";
    let mut watchers = Vec::new();
    for s in others {
        let c = bearer(s, &format!("repository:{repo}:pull")).await;
        let url = s.url.clone();
        watchers.push(tokio::spawn(async move { watch(c, url, repo, n).await }));
    }
    let push = bearer(home, &format!("repository:{repo}:pull,push")).await;
    let mut acked = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let layer = format!("layer {i} {}", "x".repeat(1024)).into_bytes();
        push_image(&push, home, repo, &format!("t{i}"), (digest(&layer), layer)).await;
        acked.push((format!("t{i}"), Instant::now()));
    }
    let pushing = started.elapsed();
    let mut seen = Vec::new();
    for w in watchers {
        seen.push(w.await.unwrap());
    }
    let mut lat: Vec<f64> = acked
        .iter()
        .map(|(t, at)| {
            let everywhere = seen.iter().map(|s| s[t]).max().unwrap();
            everywhere.saturating_duration_since(*at).as_secs_f64() * 1000.0
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{n} pushes to home in {:.1} s ({:.1}/s); acknowledged -> listed on all {replicas} \
         replicas: \
         median {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        pushing.as_secs_f64(),
        n as f64 / pushing.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.95),
        lat[lat.len() - 1]
    );

    // 2. One 256 MiB layer: a plain push to home, then its replication.
    let repo = "bench/large";
    let big: Vec<u8> = (0..256u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mib = big.len() as f64 / (1 << 20) as f64;
    let mut watchers = Vec::new();
    for s in others {
        let c = bearer(s, &format!("repository:{repo}:pull")).await;
        let url = s.url.clone();
        watchers.push(tokio::spawn(async move { watch(c, url, repo, 1).await }));
    }
    let push = bearer(home, &format!("repository:{repo}:pull,push")).await;
    let big = (digest(&big), big);
    let t0 = Instant::now();
    push_image(&push, home, repo, "big", big).await;
    let acked = Instant::now();
    let plain = acked - t0;
    let mut arrived = Vec::new();
    for w in watchers {
        arrived.push(w.await.unwrap()["big"] - acked);
    }
    arrived.sort();
    let rate = |d: Duration| mib * 1.048576 / d.as_secs_f64();
    let all = arrived[arrived.len() - 1];
    println!(
        "256 MiB layer: plain push {:.1} MB/s ({:.2} s); replicated (the {replicas} replicas \
         pulling it at once) to the first {:.1} MB/s ({:.2} s, {:.2}x the plain push), to all \
         {:.1} MB/s ({:.2} s, {:.2}x; {:.1} MB/s replicated in all); load after {}",
        rate(plain),
        plain.as_secs_f64(),
        rate(arrived[0]),
        arrived[0].as_secs_f64(),
        plain.as_secs_f64() / arrived[0].as_secs_f64(),
        rate(all),
        all.as_secs_f64(),
        plain.as_secs_f64() / all.as_secs_f64(),
        rate(all) * replicas as f64,
        load()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // 3. Tokens made on home, each timed until held by every replica.
    let tokens = 20;
    let manage = bearer(home, "registry:tasks:read,write").await;
    let r = manage
        .post(format!("{}/api/registry/scope-maps", home.url))
        .json(&json!({"name": "bench", "rules": [{"repository": "bench/*", "actions": ["content/read"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let mut pollers = Vec::new();
    for s in others {
        pollers.push((bearer(s, "registry:tasks:read,write").await, s.url.clone()));
    }
    let mut lat = Vec::new();
    for i in 0..tokens {
        let name = format!("bench{i}");
        let r = manage
            .post(format!("{}/api/registry/tokens", home.url))
            .json(&json!({"name": name, "scopeMap": "bench", "expiry": null, "enabled": true, "noPasswords": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let acked = Instant::now();
        for (c, url) in &pollers {
            loop {
                let r = c
                    .get(format!("{url}/api/registry/tokens/{name}"))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    break;
                }
                assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        lat.push(acked.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{tokens} tokens made on home; acknowledged -> held by all {replicas} replicas: \
         median {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        pct(&lat, 0.5),
        pct(&lat, 0.95),
        lat[lat.len() - 1]
    );
}
