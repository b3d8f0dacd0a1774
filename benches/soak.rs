//! Slow clients cannot starve the others: 300 uploads that trickle a few bytes and stall,
//! from one client address (127.0.0.2), while another client (127.0.0.1) pulls a blob in a
//! loop. Reports the pulls' latency (goal: p99 < 100 ms) and what the slow uploads got.
//!
//! ```sh
//! cargo bench --bench soak            # 300 slow uploads, 20 s of pulls
//! cargo bench --bench soak -- 600 30  # 600 uploads, 30 s
//! ```

use std::time::{Duration, Instant};

use acr_task::listen::ConnectionLimits;
use acr_task::registry::{start, RegistryConfig, RegistryLimits};
use sha2::{Digest, Sha256};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let slow: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(300);
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().expect("temp dir");
    // The defaults, but for the caps that would refuse most of one address's uploads:
    // the point is that uploads which are let in do not starve anyone.
    let mut cfg = RegistryConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.limits = RegistryLimits {
        max_uploads_per_client: slow + 10,
        max_uploads_per_repository: slow + 10,
        ..RegistryLimits::default()
    };
    cfg.connections = ConnectionLimits {
        per_client: slow + 10,
        ..ConnectionLimits::default()
    };
    let reg = start(cfg).await.expect("registry");
    let base = format!("http://{}", reg.addr());
    let fast = reqwest::Client::new();
    let data = vec![42u8; 1024 * 1024];
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    let r = fast
        .post(format!("{base}/v2/bench/blobs/uploads/?digest={digest}"))
        .body(data.clone())
        .send()
        .await
        .expect("push");
    assert_eq!(r.status(), 201);

    let slow_client = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut holds = Vec::new();
    let mut tasks = Vec::new();
    let mut opened = 0;
    for i in 0..slow {
        let r = slow_client
            .post(format!("{base}/v2/slow{}/blobs/uploads/", i % 10))
            .send()
            .await;
        let Ok(r) = r else { continue };
        if r.status() != 202 {
            continue;
        }
        opened += 1;
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
        holds.push(tx);
        let stream = futures_util::stream::unfold((0u8, rx), |(n, mut rx)| async move {
            if n < 3 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"trickle")),
                    (n + 1, rx),
                ));
            }
            rx.recv().await;
            None
        });
        let c = slow_client.clone();
        let url = format!("{base}{loc}");
        tasks.push(tokio::spawn(async move {
            c.patch(url)
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("{opened} slow uploads open; load {}", load.trim());
    let end = Instant::now() + Duration::from_secs(secs);
    let mut ms = Vec::new();
    while Instant::now() < end {
        let t0 = Instant::now();
        let r = fast
            .get(format!("{base}/v2/bench/blobs/{digest}"))
            .send()
            .await
            .expect("pull");
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.expect("body").len(), data.len());
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "pulls of 1 MiB beside {opened} slow uploads: n={} p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 < 100 ms: {})",
        ms.len(),
        p(0.5),
        p(0.99),
        p(1.0),
        if p(0.99) < 100.0 { "met" } else { "missed" }
    );
    drop(holds);
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(90), t).await {
            *statuses.entry(s).or_insert(0) += 1;
        }
    }
    println!("slow uploads answered: {statuses:?} (400: abandoned after the body idle limit, 202: finished)");
    reg.shutdown().await;
}
