//! Encryption at rest through `acr-task serve` and real clients: nothing pushed is on disk
//! in the clear, pulls (whole and ranged) get the plaintext, a wrong or missing key stops
//! the server with the reason, a key rotation rewrites no blob, a customer-managed key,
//! and an unencrypted store encrypted in place while clients pull, resumed after kill -9.

mod serve_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use serve_common::registry_common::{digest, run, skopeo_digest, PullLoop};
use serve_common::{bin, Serve};

const MARKER: &[u8] = b"THIS-PLAINTEXT-MUST-NOT-REST-ON-DISK";

fn encryption(serve: &Serve) -> Value {
    let (ok, out, err) = serve.acr(&["registry", "encryption", "show", "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Files under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
            {
                out.push(p);
            }
        }
    }
    out
}

/// Pushes a layer holding [`MARKER`] (uncompressed, 200 KiB) and a manifest whose
/// annotation holds it too; returns (layer digest, its bytes, manifest digest).
async fn push_marked(base: &str, repo: &str, tag: &str) -> (String, Vec<u8>, String) {
    let c = reqwest::Client::new();
    let mut layer = MARKER.to_vec();
    layer.extend_from_slice(repo.as_bytes());
    layer.extend((0..200_000u32).map(|i| (i % 253) as u8));
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let (ld, cd) = (digest(&layer), digest(&config));
    for (d, body) in [(&ld, &layer), (&cd, &config)] {
        let r = c
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
        "annotations": {"note": String::from_utf8_lossy(MARKER)}
    })
    .to_string();
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    (ld, layer, digest(manifest.as_bytes()))
}

async fn get(base: &str, path: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn pushed_content_rests_encrypted_and_is_pulled_in_the_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let serve = Serve::start(&tmp.path().join("d"), 1);
    let base = serve.url.clone();
    let (ld, layer, md) = push_marked(&base, "enc/app", "v1").await;
    let (status, body) = get(&base, &format!("/v2/enc/app/blobs/{ld}"), None).await;
    assert_eq!((status, body.len()), (200, layer.len()));
    assert_eq!(body, layer, "pulled in the clear");
    let (status, part) = get(
        &base,
        &format!("/v2/enc/app/blobs/{ld}"),
        Some("bytes=65530-131080"),
    )
    .await;
    assert_eq!(status, 206);
    assert_eq!(part, &layer[65530..=131080], "a range across chunks");
    let (_, m) = get(&base, "/v2/enc/app/manifests/v1", None).await;
    assert_eq!(digest(&m), md);
    // A real client agrees.
    assert_eq!(skopeo_digest(&format!("{}/enc/app:v1", serve.addr)), md);
    assert!(
        files_holding(&serve.data, MARKER).is_empty(),
        "plaintext on disk: {:?}",
        files_holding(&serve.data, MARKER)
    );
    let e = encryption(&serve);
    assert_eq!(e["state"], "encrypted");
    assert_eq!(e["keySource"], "managed");
    assert!(e["keyId"].as_str().unwrap().len() == 32);
    let (ok, out, err) = serve.acr(&["registry", "fsck"]);
    assert!(ok && out.contains("clean"), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_or_missing_key_stops_the_server_and_a_rotation_rewrites_no_blob() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let serve = Serve::start(&data, 1);
    let (ld, layer, _) = push_marked(&serve.url, "enc/app", "v1").await;
    let file = data
        .join("registry/blobs/sha256")
        .join(&ld[7..9])
        .join(&ld[7..]);
    let (before, inode) = (
        std::fs::read(&file).unwrap(),
        std::fs::metadata(&file).unwrap().ino(),
    );
    let old = encryption(&serve)["keyId"].as_str().unwrap().to_string();
    let (ok, out, err) = serve.acr(&["registry", "encryption", "rotate-key"]);
    assert!(ok, "{out}{err}");
    let now = encryption(&serve);
    assert_eq!(now["state"], "encrypted");
    assert_ne!(now["keyId"], old.as_str());
    assert_eq!(std::fs::read(&file).unwrap(), before, "no blob rewritten");
    assert_eq!(std::fs::metadata(&file).unwrap().ino(), inode);
    let keys = data.join("registry/encryption.keys");
    assert_eq!(std::fs::read_to_string(&keys).unwrap().lines().count(), 1);
    let (_, body) = get(&serve.url, &format!("/v2/enc/app/blobs/{ld}"), None).await;
    assert_eq!(body, layer);
    let key_id = now["keyId"].as_str().unwrap().to_string();
    drop(serve);

    // A start without the key, or with another, stops with the reason.
    let good = std::fs::read_to_string(&keys).unwrap();
    let start = |what: &str| {
        let out = Command::new(bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(!out.status.success(), "served {what}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    std::fs::remove_file(&keys).unwrap();
    let err = start("without its key");
    assert!(
        err.contains("encryption.keys") && err.contains("cannot be read"),
        "{err}"
    );
    let other = run(Command::new("sh").args(["-c", "head -c 32 /dev/urandom | base64"]));
    std::fs::write(&keys, other).unwrap();
    let err = start("with a wrong key");
    assert!(
        err.contains(&key_id) && err.contains("does not hold"),
        "{err}"
    );
    std::fs::write(&keys, good).unwrap();
    let serve = Serve::start(&data, 1);
    let (_, body) = get(&serve.url, &format!("/v2/enc/app/blobs/{ld}"), None).await;
    assert_eq!(body, layer);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_managed_key_is_needed_to_start_and_rotates_from_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let key_file = tmp.path().join("customer.keys");
    let key = |n: &str| {
        let k = run(Command::new("sh").args(["-c", "head -c 32 /dev/urandom | base64"]));
        format!("# {n}\n{}", k)
    };
    let first = key("first");
    std::fs::write(&key_file, &first).unwrap();
    let kf = key_file.display().to_string();
    let serve = Serve::start_with(&data, 1, &["--encryption-key-file", &kf]);
    let (ld, layer, _) = push_marked(&serve.url, "enc/app", "v1").await;
    let e = encryption(&serve);
    assert_eq!(e["keySource"], "customerManaged");
    assert!(
        !data.join("registry/encryption.keys").exists(),
        "no key of ours"
    );
    // A customer-managed key is a Premium feature, as in ACR.
    let (ok, _, err) = serve.acr(&["registry", "update", "--sku", "Basic"]);
    assert!(
        !ok && err.contains("customer-managed key needs the Premium tier"),
        "{err}"
    );
    // Rotation: the new key first, the old below it, until it completes.
    let second = key("second");
    std::fs::write(&key_file, format!("{second}{first}")).unwrap();
    let out = serve
        .cli()
        .args(["registry", "encryption", "rotate-key", "--data"])
        .arg(&serve.data)
        .env("ACR_TASK_ENCRYPTION_KEY_FILE", &key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(encryption(&serve)["keyId"], e["keyId"]);
    drop(serve);
    std::fs::write(&key_file, &second).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("customer-managed key"),
        "{err}"
    );
    let serve = Serve::start_with(&data, 1, &["--encryption-key-file", &kf]);
    let (_, body) = get(&serve.url, &format!("/v2/enc/app/blobs/{ld}"), None).await;
    assert_eq!(body, layer, "read with only the new key");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unencrypted_store_is_encrypted_in_place_while_clients_pull() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let args = ["--unencrypted", "--job-pace-ms", "150"];
    let mut serve = Serve::start_with(&data, 1, &args);
    let mut pushed = Vec::new();
    for i in 0..6 {
        pushed.push(push_marked(&serve.url, &format!("old/app{i}"), "v1").await);
    }
    assert!(
        !files_holding(&serve.data, MARKER).is_empty(),
        "stored in the clear"
    );
    assert_eq!(encryption(&serve)["state"], "unencrypted");

    // Started, then killed part way: the next start resumes it.
    let (ok, _, err) = serve.acr(&["registry", "encryption", "enable", "--no-wait"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no progress");
        let e = encryption(&serve);
        assert_eq!(
            e["state"], "encrypting",
            "finished before the kill: pace it slower"
        );
        if e["progress"]["objectsDone"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    serve.kill();
    let serve = Serve::start_with(&data, 1, &args);

    // One client pulls in a loop while the rest is sealed.
    let puller = PullLoop::start(
        (0..6)
            .map(|i| format!("{}/old/app{i}:v1", serve.addr))
            .collect(),
    );
    let (ok, out, err) = serve.acr(&["registry", "encryption", "enable"]);
    assert!(ok, "{out}{err}");
    let (pulls, failures) = puller.stop();
    assert!(
        failures.is_empty(),
        "{} pulls failed, the first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(pulls >= 1, "no pull overlapped");
    let e = encryption(&serve);
    assert_eq!(e["state"], "encrypted");
    assert_eq!(e["progress"]["objectsDone"], e["progress"]["objectsTotal"]);
    assert!(
        files_holding(&serve.data.join("registry"), MARKER).is_empty(),
        "plaintext left: {:?}",
        files_holding(&serve.data.join("registry"), MARKER)
    );
    for (i, (ld, layer, md)) in pushed.iter().enumerate() {
        let (_, body) = get(&serve.url, &format!("/v2/old/app{i}/blobs/{ld}"), None).await;
        assert_eq!(&body, layer);
        let (_, m) = get(&serve.url, &format!("/v2/old/app{i}/manifests/v1"), None).await;
        assert_eq!(&digest(&m), md);
    }
    let (ok, out, err) = serve.acr(&["registry", "fsck"]);
    assert!(ok && out.contains("clean"), "{out}{err}");
}
