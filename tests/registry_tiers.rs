//! Registry tiers: `registry show|show-usage|update`, the storage limit against real
//! `docker push`es, the request rates' 429s, the count limits of webhooks, tokens and
//! scope maps, and tier moves refused before anything changes.

mod registry_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use registry_common::*;
use serde_json::Value;

/// The `show-usage` line named `name`: (limit, current value).
fn usage_of(data: &Path, name: &str) -> (i64, u64) {
    let v = cli_json(data, &["registry", "show-usage", "-o", "json"]);
    let line = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {v}"))
        .clone();
    (
        line["limit"].as_i64().unwrap(),
        line["currentValue"].as_u64().unwrap(),
    )
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_new_registry_is_premium_and_tiers_carry_acrs_limits() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let v = cli_json(d, &["registry", "update", "--sku", "basic", "-o", "json"]);
    assert_eq!(v["sku"], "Basic");
    assert_eq!(v["storageLimitBytes"], 10u64 << 30);
    assert_eq!(v["limits"]["readOpsPerMinute"], 1000);
    assert_eq!(v["limits"]["writeOpsPerMinute"], 100);
    assert_eq!(v["limits"]["webhooks"], 2);
    assert_eq!(v["limits"]["contentTrust"], false);
    let table = cli_ok(d, &["registry", "show"]);
    assert!(
        table.contains("Basic") && table.contains("10 GiB"),
        "{table}"
    );
    let v = cli_json(
        d,
        &[
            "registry",
            "update",
            "--sku",
            "Premium",
            "--storage-limit",
            "200GiB",
            "-o",
            "json",
        ],
    );
    assert_eq!(v["sku"], "Premium");
    assert_eq!(v["storageLimitBytes"], 200u64 << 30, "the override wins");
    assert_eq!(v["limits"]["webhooks"], 500);
    assert_eq!(v["limits"]["geoReplication"], true);
    assert_eq!(usage_of(d, "Webhooks"), (500, 0));
    let tsv = cli_ok(d, &["registry", "show-usage", "-o", "tsv"]);
    assert!(
        tsv.lines()
            .any(|l| l == format!("Size\t{}\t0\tBytes", 200u64 << 30)),
        "{tsv}"
    );
    // Back to the tier's own figure.
    let v = cli_json(
        d,
        &[
            "registry",
            "update",
            "--storage-limit",
            "unlimited",
            "-o",
            "json",
        ],
    );
    assert_eq!(v["storageLimitBytes"], Value::Null);
    let (ok, _, err) = cli(d, &["registry", "update", "--sku", "Classic"]);
    assert!(!ok && err.contains("one-way"), "{err}");
    let (ok, _, err) = cli(d, &["registry", "update", "--sku", "Gold"]);
    assert!(!ok && err.contains("Basic, Standard or Premium"), "{err}");
}

#[test]
fn docker_pushes_stop_at_the_storage_limit_and_leave_nothing_behind() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    cli_ok(
        d,
        &[
            "registry",
            "update",
            "--sku",
            "Basic",
            "--storage-limit",
            "256KiB",
        ],
    );
    let (child, addr) = spawn_server(d);
    let _server = Server(child);
    let image = format!("{addr}/tiers/full:v1");
    make_busybox_image(&image, "over the limit");
    let out = Command::new("docker")
        .args(["push", &image])
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the push passed the limit: {err}");
    assert!(err.contains("storage limit is 256 KiB (Basic)"), "{err}");
    assert!(
        err.contains("repository delete") && err.contains("--sku"),
        "{err}"
    );
    // Nothing of it is visible, nothing is counted, and the store is whole.
    let (_, used) = usage_of(d, "Size");
    assert!(used <= 256 << 10, "{used} bytes used past the limit");
    let (_, tags, _) = cli(d, &["repository", "show-tags", "tiers/full", "-o", "tsv"]);
    assert!(!tags.contains("v1"), "{tags}");
    cli_ok(d, &["registry", "fsck"]);
    // Raised on the files, the running registry sees it within a second.
    cli_ok(d, &["registry", "update", "--storage-limit", "64MiB"]);
    std::thread::sleep(Duration::from_millis(1100));
    run(Command::new("docker").args(["push", &image]));
    let (limit, used) = usage_of(d, "Size");
    assert_eq!(limit, 64 << 20);
    assert!(used > 256 << 10, "the pushed image counts: {used}");
    // A tier too small for what is stored is refused with the sizes, and nothing changes.
    let (ok, _, err) = cli(d, &["registry", "update", "--storage-limit", "1KiB"]);
    assert!(!ok, "a limit below the use was taken");
    assert!(
        err.contains("1 KiB of storage but") && err.contains("is stored"),
        "{err}"
    );
    assert_eq!(usage_of(d, "Size").0, 64 << 20, "unchanged");
    // Deleting frees the room at once (before gc).
    cli_ok(d, &["repository", "delete", "tiers/full", "--yes"]);
    assert_eq!(usage_of(d, "Size").1, 0);
    let _ = Command::new("docker").args(["rmi", &image]).output();
}

#[tokio::test(flavor = "multi_thread")]
async fn request_rates_answer_429_with_retry_after() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    cli_ok(
        d,
        &[
            "registry",
            "update",
            "--sku",
            "Basic",
            "--write-ops-limit",
            "5",
            "--read-ops-limit",
            "8",
        ],
    );
    let (child, addr) = spawn_server(d);
    let _server = Server(child);
    let c = reqwest::Client::new();
    let base = format!("http://{addr}");
    // A minute's worth passes at once; the next write waits.
    for i in 0..5 {
        let r = c
            .post(format!("{base}/v2/rates/a/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "write {i}");
    }
    let r = c
        .post(format!("{base}/v2/rates/a/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&after), "Retry-After {after}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
    let m = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        m.contains("write operations") && m.contains("--write-ops-limit"),
        "{m}"
    );
    // Reads have their own rate; the version check is not counted.
    for _ in 0..8 {
        let r = c
            .get(format!("{base}/v2/rates/a/tags/list"))
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 429);
    }
    let r = c
        .get(format!("{base}/v2/rates/a/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        c.get(format!("{base}/v2/")).send().await.unwrap().status(),
        200
    );
    // 5 a minute is one every 12 s: after Retry-After, one more write passes.
    let wait = Instant::now();
    tokio::time::sleep(Duration::from_secs(after)).await;
    let r = c
        .post(format!("{base}/v2/rates/a/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "after {:?}", wait.elapsed());
}

#[test]
fn webhooks_tokens_and_scope_maps_stop_at_the_tiers_count() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    cli_ok(
        d,
        &["registry", "update", "--sku", "Basic", "--token-limit", "1"],
    );
    for name in ["one", "two"] {
        cli_ok(
            d,
            &[
                "webhook",
                "create",
                name,
                "--uri",
                "https://hooks.example.com/x",
                "--actions",
                "push",
            ],
        );
    }
    let (ok, _, err) = cli(
        d,
        &[
            "webhook",
            "create",
            "three",
            "--uri",
            "https://hooks.example.com/x",
            "--actions",
            "push",
        ],
    );
    assert!(!ok, "a third webhook on Basic");
    assert!(err.contains("Basic tier allows 2 webhooks"), "{err}");
    assert_eq!(usage_of(d, "Webhooks"), (2, 2));
    // Standard allows ten.
    cli_ok(d, &["registry", "update", "--sku", "Standard"]);
    cli_ok(
        d,
        &[
            "webhook",
            "create",
            "three",
            "--uri",
            "https://hooks.example.com/x",
            "--actions",
            "push",
        ],
    );
    cli_ok(
        d,
        &[
            "scope-map",
            "create",
            "pull",
            "--repository",
            "a/*",
            "content/read",
        ],
    );
    cli_ok(
        d,
        &[
            "token",
            "create",
            "t1",
            "--scope-map",
            "pull",
            "--no-passwords",
        ],
    );
    let (ok, _, err) = cli(
        d,
        &[
            "token",
            "create",
            "t2",
            "--scope-map",
            "pull",
            "--no-passwords",
        ],
    );
    assert!(!ok && err.contains("allows 1 tokens"), "{err}");
    assert!(err.contains("--token-limit"), "{err}");
    assert_eq!(usage_of(d, "Tokens"), (1, 1));
    cli_ok(d, &["registry", "update", "--scope-map-limit", "1"]);
    let (ok, _, err) = cli(
        d,
        &[
            "scope-map",
            "create",
            "push",
            "--repository",
            "a/*",
            "content/write",
        ],
    );
    assert!(!ok && err.contains("allows 1 scope maps"), "{err}");
}
