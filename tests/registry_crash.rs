//! SIGKILL the registry process in the middle of uploads and manifest pushes, restart it on
//! the same data, and check that everything acknowledged is intact, nothing partial is
//! visible, and fsck is clean.

mod registry_common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use registry_common::*;

#[derive(Default)]
struct Acked {
    blobs: Vec<(String, Vec<u8>)>,
    manifests: Vec<(String, String, Vec<u8>)>, // tag, digest, bytes
    /// Blobs whose upload started but was not acknowledged.
    attempted: Vec<(String, Vec<u8>)>,
}

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Push blobs in chunks and tag a manifest for each, until the server goes away.
async fn writer(base: String, worker: u64, round: u64, acked: Arc<Mutex<Acked>>) {
    let c = reqwest::Client::new();
    let config = b"{}".to_vec();
    for i in 0u64.. {
        let seed = round * 1_000_000 + worker * 10_000 + i;
        let data = pseudo_random(seed, 256 * 1024 + (seed as usize % 7) * 100_000);
        let d = digest(&data);
        acked
            .lock()
            .unwrap()
            .attempted
            .push((d.clone(), data.clone()));
        let Ok(r) = c
            .post(format!("{base}/v2/crash/blobs/uploads/"))
            .send()
            .await
        else {
            return;
        };
        let Some(loc) = r
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string())
        else {
            return;
        };
        let mut off = 0;
        for chunk in data.chunks(100_000) {
            let r = c
                .patch(format!("{base}{loc}"))
                .header(
                    "content-range",
                    format!("{}-{}", off, off + chunk.len() - 1),
                )
                .body(chunk.to_vec())
                .send()
                .await;
            if !matches!(r, Ok(ref r) if r.status() == 202) {
                return;
            }
            off += chunk.len();
        }
        match c.put(format!("{base}{loc}?digest={d}")).send().await {
            Ok(r) if r.status() == 201 => {
                acked.lock().unwrap().blobs.push((d.clone(), data.clone()))
            }
            _ => return,
        }
        let cd = match c
            .post(format!(
                "{base}/v2/crash/blobs/uploads/?digest={}",
                digest(&config)
            ))
            .body(config.clone())
            .send()
            .await
        {
            Ok(r) if r.status() == 201 => digest(&config),
            _ => return,
        };
        let m = serde_json::to_vec(&image_manifest((&cd, 2), &[(&d, data.len())])).unwrap();
        let tag = format!("r{round}-w{worker}-{i}");
        match c
            .put(format!("{base}/v2/crash/manifests/{tag}"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(m.clone())
            .send()
            .await
        {
            Ok(r) if r.status() == 201 => {
                acked.lock().unwrap().manifests.push((tag, digest(&m), m))
            }
            _ => return,
        }
    }
}

fn fsck(data: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(["registry", "fsck", "--data"])
        .arg(data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "fsck found problems:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_pushes_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));
    for round in 0..3u64 {
        let (mut child, addr) = spawn_server(dir.path());
        let base = format!("http://{addr}");
        let workers: Vec<_> = (0..3)
            .map(|w| tokio::spawn(writer(base.clone(), w, round, acked.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(400 + round * 150)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for w in workers {
            w.await.unwrap();
        }
    }
    let a = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        a.blobs.len() >= 3 && !a.manifests.is_empty(),
        "the writers got too little done to test anything ({} blobs, {} manifests)",
        a.blobs.len(),
        a.manifests.len()
    );

    // Restart: recovery clears abandoned uploads.
    let (mut child, addr) = spawn_server(dir.path());
    let base = format!("http://{addr}");
    let c = reqwest::Client::new();
    for (d, data) in &a.blobs {
        let r = c
            .get(format!("{base}/v2/crash/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged blob {d} lost");
        assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    }
    for (tag, d, m) in &a.manifests {
        let r = c
            .get(format!("{base}/v2/crash/manifests/{tag}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged manifest {tag} lost");
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
    }
    // Whatever was in flight is either absent or complete — never partial.
    for (d, data) in &a.attempted {
        let r = c
            .get(format!("{base}/v2/crash/blobs/{d}"))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            404 => {}
            200 => assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]),
            s => panic!("unexpected status {s} for {d}"),
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("registry/uploads"))
            .unwrap()
            .count(),
        0,
        "abandoned uploads were cleared at restart"
    );
    let report = fsck(dir.path());
    assert!(report.contains("clean"), "{report}");
    child.kill().unwrap();
    child.wait().unwrap();
    // gc afterwards keeps every tagged manifest's blobs, and the store stays clean.
    let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(["registry", "gc", "--grace", "0", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fsck(dir.path());
}
