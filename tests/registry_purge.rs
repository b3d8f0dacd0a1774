//! `acr-task purge` against a real `acr-task serve`: acr purge's filters, `--ago`, `--keep`
//! and `--untagged`, what stays and why, and pushes racing purges and gc.

mod serve_common;

use std::time::Duration;

use serde_json::{json, Value};
use serve_common::registry_common::{digest, image_manifest, push_blob, put_manifest};
use serve_common::Serve;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pushes an image whose config says `marker` (a layer shared by all, one of its own)
/// under `reference` (a tag, or its digest for an untagged push); returns (digest, size,
/// status of the manifest PUT).
async fn image(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    marker: &str,
    tag: Option<&str>,
) -> (String, usize, u16) {
    let config = json!({ "marker": marker }).to_string();
    let cd = push_blob(c, base, repo, config.as_bytes()).await;
    let shared = push_blob(c, base, repo, b"a layer every image shares").await;
    let own = format!("layer of {marker}");
    let od = push_blob(c, base, repo, own.as_bytes()).await;
    let m = image_manifest((&cd, config.len()), &[(&shared, 26), (&od, own.len())]);
    let body = serde_json::to_vec(&m).unwrap();
    let d = digest(&body);
    let status = put_manifest(c, base, repo, tag.unwrap_or(&d), OCI_MANIFEST, &body)
        .await
        .status()
        .as_u16();
    (d, body.len(), status)
}

async fn status_of(c: &reqwest::Client, base: &str, repo: &str, reference: &str) -> u16 {
    c.get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A server on a fresh data directory (kept while the test runs), a client, its URL.
fn server() -> (tempfile::TempDir, Serve, reqwest::Client, String) {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path(), 1);
    let base = s.url.clone();
    (dir, s, reqwest::Client::new(), base)
}

fn purge(s: &Serve, args: &[&str]) -> Value {
    let mut all = vec!["purge"];
    all.extend(args);
    all.extend(["-o", "json"]);
    let (ok, out, err) = s.acr(&all);
    assert!(ok, "acr-task {all:?}:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

fn kept_why(r: &Value, item: &str) -> String {
    r["kept"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["item"] == item)
        .map(|k| k["why"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{item} is not among the kept: {r}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_old_tags_and_untagged_manifests_and_keeps_what_is_still_named() {
    let (_dir, s, c, base) = server();
    // Old: v1 (also "stable"), v2, an untagged image, an index "multi" naming p1 and p2,
    // and in another repository five numbered tags.
    let (v1, _, _) = image(&c, &base, "app/web", "v1", Some("v1")).await;
    let (v1b, _, _) = image(&c, &base, "app/web", "v1", Some("stable")).await;
    assert_eq!(v1, v1b);
    let (v2, _, _) = image(&c, &base, "app/web", "v2", Some("v2")).await;
    let (loose, _, _) = image(&c, &base, "app/web", "loose", None).await;
    let (p1, p1s, _) = image(&c, &base, "app/web", "p1", None).await;
    let (p2, p2s, _) = image(&c, &base, "app/web", "p2", None).await;
    let index = json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": p1, "size": p1s, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": p2, "size": p2s, "platform": {"os": "linux", "architecture": "arm64"}},
        ]
    });
    let index = serde_json::to_vec(&index).unwrap();
    let idx = digest(&index);
    assert_eq!(
        put_manifest(&c, &base, "app/web", "keep-multi", OCI_INDEX, &index)
            .await
            .status(),
        201
    );
    for i in 1..=5 {
        image(
            &c,
            &base,
            "app/api",
            &format!("api{i}"),
            Some(&format!("build-{i}")),
        )
        .await;
        // Each a second apart, so --keep has an order to go by.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // New: v3 and a signature of v2 (a referrer, untagged).
    let (v3, _, _) = image(&c, &base, "app/web", "v3", Some("v3")).await;
    let sig = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": push_blob(&c, &base, "app/web", b"{}").await, "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": v2, "size": 1}
    });
    let sig = serde_json::to_vec(&sig).unwrap();
    let sigd = digest(&sig);
    assert_eq!(
        put_manifest(&c, &base, "app/web", &sigd, OCI_MANIFEST, &sig)
            .await
            .status(),
        201
    );

    let args = ["--filter", "app/web:^v", "--ago", "3s", "--untagged"];
    let mut dry_args = args.to_vec();
    dry_args.push("--dry-run");
    let dry = purge(&s, &dry_args);
    assert_eq!(dry["dryRun"], true);
    assert_eq!(
        strings(&dry["tagsDeleted"]),
        ["app/web:v1", "app/web:v2"],
        "{dry}"
    );
    // The index is tagged "keep-multi", which the filter does not match: it stays, and so
    // do the manifests it names.
    assert_eq!(
        strings(&dry["manifestsDeleted"]),
        [format!("app/web@{loose}")],
        "{dry}"
    );
    assert_eq!(
        kept_why(&dry, &format!("app/web@{p1}")),
        format!("named by index {idx}")
    );
    // Nothing moved.
    assert_eq!(status_of(&c, &base, "app/web", "v1").await, 200);
    assert_eq!(status_of(&c, &base, "app/web", &loose).await, 200);

    let r = purge(&s, &args);
    assert_eq!(
        strings(&r["tagsDeleted"]),
        ["app/web:v1", "app/web:v2"],
        "{r}"
    );
    assert_eq!(
        strings(&r["manifestsDeleted"]),
        strings(&dry["manifestsDeleted"]),
        "{r}"
    );
    assert_eq!(
        kept_why(&r, &format!("app/web@{v1}")),
        "still tagged stable"
    );
    assert!(
        kept_why(&r, &format!("app/web@{v2}")).contains("referrer"),
        "{r}"
    );
    assert_eq!(
        kept_why(&r, &format!("app/web@{sigd}")),
        format!("a referrer of {v2}")
    );
    for (reference, want) in [
        ("v1", 404),
        ("v2", 404),
        ("stable", 200),
        ("v3", 200),
        (v1.as_str(), 200),
        (v2.as_str(), 200),
        (sigd.as_str(), 200),
        (loose.as_str(), 404),
        (idx.as_str(), 200),
        (v3.as_str(), 200),
    ] {
        assert_eq!(
            status_of(&c, &base, "app/web", reference).await,
            want,
            "{reference}"
        );
    }
    // Once the index's tag goes, so does the index, then what it named.
    let r = purge(
        &s,
        &["--filter", "app/web:multi", "--ago", "3s", "--untagged"],
    );
    assert_eq!(strings(&r["tagsDeleted"]), ["app/web:keep-multi"], "{r}");
    let gone = strings(&r["manifestsDeleted"]);
    assert!(
        gone.contains(&format!("app/web@{idx}")) && gone.contains(&format!("app/web@{p1}")),
        "{r}"
    );
    assert_eq!(status_of(&c, &base, "app/web", &p2).await, 404);

    // --keep: the two newest of the five stay.
    let r = purge(
        &s,
        &["--filter", "app/.*:^build-", "--ago", "0s", "--keep", "2"],
    );
    assert_eq!(
        strings(&r["tagsDeleted"]),
        ["app/api:build-1", "app/api:build-2", "app/api:build-3"],
        "{r}"
    );
    assert!(kept_why(&r, "app/api:build-5").contains("--keep 2"), "{r}");

    // Bad input is refused in the user's words, before anything is asked.
    let (ok, _, err) = s.acr(&["purge", "--filter", "app", "--ago", "1d"]);
    assert!(!ok && err.contains("REPOSITORY_REGEX:TAG_REGEX"), "{err}");
    let (ok, _, err) = s.acr(&["purge", "--filter", "app:.*", "--ago", "1 week"]);
    assert!(!ok && err.contains("--ago \"1 week\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_racing_purges_and_gc_lose_nothing_acknowledged() {
    let (_dir, s, c, base) = server();
    // Old content for the purges to delete while the pushes go on: tags and untagged
    // images sharing the pushes' common layer.
    for i in 0..10 {
        image(
            &c,
            &base,
            "race",
            &format!("old{i}"),
            Some(&format!("old-{i}")),
        )
        .await;
        image(&c, &base, "race", &format!("loose{i}"), None).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let maintenance = {
        let stop = stop.clone();
        let data = s.data.clone();
        let (user, password) = ("admin".to_string(), s.password.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for args in [
                    vec![
                        "purge",
                        "--filter",
                        "race:^old-",
                        "--ago",
                        "0s",
                        "--untagged",
                    ],
                    vec!["registry", "gc", "--grace", "0"],
                ] {
                    let out = std::process::Command::new(serve_common::bin())
                        .args(&args)
                        .arg("--data")
                        .arg(&data)
                        .env("ACR_TASK_USERNAME", &user)
                        .env("ACR_TASK_PASSWORD", &password)
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{args:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                rounds += 1;
            }
            rounds
        })
    };
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        let (d, _, status) = image(
            &c,
            &base,
            "race",
            &format!("new{i}"),
            Some(&format!("new-{i}")),
        )
        .await;
        if status == 201 {
            acknowledged.push((format!("new-{i}"), d));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = maintenance.join().unwrap();
    eprintln!(
        "{} of 40 pushes acknowledged beside {rounds} purge+gc rounds",
        acknowledged.len()
    );
    assert!(rounds >= 2, "the purges and gc ran {rounds} time(s) only");
    // A push whose blobs gc took before its manifest came is refused (MANIFEST_BLOB_UNKNOWN),
    // never acknowledged and then lost.
    assert!(
        acknowledged.len() >= 10,
        "{} of 40 pushes acknowledged",
        acknowledged.len()
    );
    // Every acknowledged push pulls whole: its manifest by tag, and every blob it names.
    for (tag, d) in &acknowledged {
        let r = c
            .get(format!("{base}/v2/race/manifests/{tag}"))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{tag}");
        let body = r.bytes().await.unwrap();
        assert_eq!(&digest(&body), d, "{tag}");
        let m: Value = serde_json::from_slice(&body).unwrap();
        let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
        blobs.extend(
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string()),
        );
        for b in blobs {
            let r = c
                .get(format!("{base}/v2/race/blobs/{b}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{tag}: blob {b}");
            assert_eq!(digest(&r.bytes().await.unwrap()), b, "{tag}: blob {b}");
        }
    }
    // And what the purges were for is gone.
    let tags: Value = c
        .get(format!("{base}/v2/race/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !tags["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t.as_str().unwrap().starts_with("old-")),
        "{tags}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_policy_deletes_untagged_manifests_in_the_background() {
    let (_dir, s, c, base) = server();
    let (tagged, _, _) = image(&c, &base, "app", "tagged", Some("v1")).await;
    let (loose, _, _) = image(&c, &base, "app", "loose", None).await;
    let show = |s: &Serve| -> Value {
        let (ok, out, err) = s.acr(&["registry", "config", "retention", "show", "-o", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    assert_eq!(show(&s)["status"], "disabled");
    let (ok, _, err) = s.acr(&[
        "registry",
        "config",
        "retention",
        "update",
        "--status",
        "enabled",
        "--days",
        "0",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        show(&s),
        json!({"type": "UntaggedManifests", "status": "enabled", "days": 0})
    );
    let start = std::time::Instant::now();
    while status_of(&c, &base, "app", &loose).await != 404 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the untagged manifest stayed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status_of(&c, &base, "app", "v1").await, 200);
    assert_eq!(status_of(&c, &base, "app", &tagged).await, 200);
    // A policy is a Premium feature: the tier cannot drop below it while it is on.
    let (ok, _, err) = s.acr(&["registry", "update", "--sku", "Standard"]);
    assert!(
        !ok && err.contains("a retention policy needs the Premium tier"),
        "{err}"
    );
    let (ok, _, err) = s.acr(&[
        "registry",
        "config",
        "retention",
        "update",
        "--status",
        "enabled",
        "--days",
        "400",
    ]);
    assert!(!ok && err.contains("0 to 365 days"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_refuse_pushes_and_deletes_and_purges_keep_what_is_locked() {
    let (_dir, s, c, base) = server();
    let (v1, _, _) = image(&c, &base, "app", "v1", Some("v1")).await;
    image(&c, &base, "app", "v2", Some("v2")).await;
    let ok = |args: &[&str]| {
        let (good, out, err) = s.acr(args);
        assert!(good, "{args:?}: {out}\n{err}");
        out
    };
    // `repository update --name app [--image app:TAG] --FLAG VALUE`
    let update = |image: Option<&str>, flag: &str, value: &str| {
        let mut args = vec!["repository", "update", "--name", "app"];
        if let Some(i) = image {
            args.extend(["--image", i]);
        }
        args.extend([flag, value]);
        ok(&args);
    };
    update(Some("app:v1"), "--write-enabled", "false");
    let shown: Value = serde_json::from_str(&ok(&[
        "repository",
        "show",
        "--name",
        "app",
        "--image",
        "app:v1",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        shown["changeableAttributes"],
        json!({"writeEnabled": false, "deleteEnabled": true})
    );
    assert_eq!(shown["digest"], v1.as_str(), "through the server: {shown}");
    // A push over the locked tag, and its delete, are refused with the way to unlock.
    let (_, _, status) = image(&c, &base, "app", "v1-again", Some("v1")).await;
    assert_eq!(status, 403);
    let r = c
        .delete(format!("{base}/v2/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("app:v1 is locked (write-enabled is false)")
            && body.contains(
                "acr-task repository update --name app --image app:v1 --write-enabled true"
            ),
        "{body}"
    );
    let r = c
        .delete(format!("{base}/v2/app/manifests/{v1}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "the manifest a locked tag names");
    let layer = digest(b"layer of v1");
    let r = c
        .delete(format!("{base}/v2/app/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a blob a locked image may use");
    // A purge deletes the rest and says why v1 stays.
    let r = purge(&s, &["--filter", "app:.*", "--ago", "0s", "--untagged"]);
    assert_eq!(strings(&r["tagsDeleted"]), ["app:v2"], "{r}");
    assert!(kept_why(&r, "app:v1").starts_with("locked"), "{r}");
    assert_eq!(status_of(&c, &base, "app", "v1").await, 200);

    // A repository locked against deletes: pushes go on, deletes and purges stop.
    update(None, "--delete-enabled", "false");
    let (_, _, status) = image(&c, &base, "app", "v3", Some("v3")).await;
    assert_eq!(status, 201, "a delete lock still takes pushes");
    let (good, _, err) = s.acr(&["repository", "delete", "app", "--yes"]);
    assert!(
        !good && err.contains("app is locked") && err.contains("nothing was deleted"),
        "{err}"
    );
    // Refused whole: no manifest went before the refusal.
    assert_eq!(status_of(&c, &base, "app", "v3").await, 200);
    assert_eq!(status_of(&c, &base, "app", "v1").await, 200);
    let r = purge(&s, &["--filter", "app:.*", "--ago", "0s"]);
    assert_eq!(strings(&r["tagsDeleted"]), Vec::<String>::new(), "{r}");
    assert!(kept_why(&r, "app").contains("repository is locked"), "{r}");

    // Unlocked, everything goes.
    update(None, "--delete-enabled", "true");
    update(Some("app:v1"), "--write-enabled", "true");
    let r = purge(&s, &["--filter", "app:.*", "--ago", "0s"]);
    assert_eq!(strings(&r["tagsDeleted"]), ["app:v1", "app:v3"], "{r}");
    let (good, _, err) = s.acr(&[
        "repository",
        "update",
        "--name",
        "nope",
        "--write-enabled",
        "false",
    ]);
    assert!(!good && err.contains("no repository nope"), "{err}");
}
