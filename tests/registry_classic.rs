//! Classic registries: a directory written by the real `docker-registry` (through docker
//! and skopeo pushes) served as it is, what is pushed to it readable by `docker-registry`
//! again, Classic's limits; and the one-way upgrade to a managed tier while clients pull
//! (no pull fails) and push (refused with the reason until it completes), resumed after a
//! kill -9 without copying anything twice.

mod serve_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use serve_common::registry_common::{
    make_busybox_image, require_docker, require_tool, run, skopeo_digest, Distribution, PullLoop,
};
use serve_common::Serve;

/// A Classic directory written by `docker-registry`: `n` images pushed by docker
/// (`classic/appN:v1`) and copied by skopeo (`classic/copyN:s1`). Returns the digest of
/// every `repo:tag`.
fn classic_storage(root: &Path, n: usize) -> BTreeMap<String, String> {
    require_docker();
    require_tool("skopeo", "apt-get install -y skopeo");
    let dist = Distribution::start(root);
    let mut tags = BTreeMap::new();
    for i in 0..n {
        let image = format!("{}/classic/app{i}:v1", dist.addr);
        make_busybox_image(&image, &format!("classic image {i}"));
        run(Command::new("docker").args(["push", &image]));
        run(Command::new("skopeo").args([
            "copy",
            "--dest-tls-verify=false",
            &format!("docker-daemon:{image}"),
            &format!("docker://{}/classic/copy{i}:s1", dist.addr),
        ]));
        for name in [format!("classic/app{i}:v1"), format!("classic/copy{i}:s1")] {
            let d = skopeo_digest(&format!("{}/{name}", dist.addr));
            tags.insert(name, d);
        }
    }
    tags
}

fn show(serve: &Serve) -> Value {
    let (ok, out, err) = serve.acr(&["registry", "show", "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Every file under `dir` with its size (what "left untouched" compares).
fn listing(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    e.metadata().unwrap().len(),
                );
            }
        }
    }
    out
}

#[test]
fn classic_storage_is_served_as_it_is_and_stays_readable_by_docker_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("classic");
    let tags = classic_storage(&root, 1);
    let classic = root.display().to_string();
    let serve = Serve::start_with(
        &tmp.path().join("d"),
        1,
        &["--sku", "Classic", "--classic-storage", &classic],
    );
    let addr = serve.addr.clone();
    // docker pull and run what docker-registry stored; skopeo reads the same digests.
    let image = format!("{addr}/classic/app0:v1");
    run(Command::new("docker").args(["pull", &image]));
    let said = run(Command::new("docker").args(["run", "--rm", &image]));
    assert_eq!(said.trim(), "classic image 0");
    for (name, digest) in &tags {
        assert_eq!(&skopeo_digest(&format!("{addr}/{name}")), digest, "{name}");
    }
    // Pushes land in the Classic tree.
    let pushed = format!("{addr}/classic/new:n1");
    run(Command::new("docker").args(["tag", &image, &pushed]));
    run(Command::new("docker").args(["push", &pushed]));
    let pushed_digest = skopeo_digest(&pushed);
    // Classic's limits: no deletes, webhooks, tokens or scope maps; each says why.
    let body = run(Command::new("curl").args([
        "-sS",
        "-X",
        "DELETE",
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}/v2/classic/new/manifests/{pushed_digest}"),
    ]));
    assert!(
        body.ends_with("\n403")
            && body.contains("DENIED")
            && body.contains("deletes need a managed tier"),
        "{body}"
    );
    for args in [
        &[
            "webhook",
            "create",
            "w",
            "--uri",
            "https://hooks.example.com/x",
            "--actions",
            "push",
        ][..],
        &[
            "scope-map",
            "create",
            "m",
            "--repository",
            "a/*",
            "content/read",
        ][..],
    ] {
        let (ok, _, err) = serve.acr(args);
        assert!(
            !ok && err.contains("need a managed tier"),
            "{args:?}: {err}"
        );
    }
    let v = show(&serve);
    assert_eq!(v["sku"], "Classic");
    assert_eq!(v["classic"]["storage"], classic);
    drop(serve);
    // docker-registry itself reads what acr-task pushed.
    let dist = Distribution::start(&root);
    assert_eq!(
        skopeo_digest(&format!("{}/classic/new:n1", dist.addr)),
        pushed_digest
    );
    let copy = tmp.path().join("copy");
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/classic/new:n1", dist.addr),
        &format!("dir:{}", copy.display()),
    ]));
    let _ = Command::new("docker")
        .args(["rmi", &image, &pushed])
        .output();
    drop(dist);
    // With no server, `registry update` runs the upgrade itself and says what it did.
    let out = Command::new(serve_common::bin())
        .args(["registry", "update", "--sku", "Premium", "--data"])
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("Upgraded to Premium") && err.contains("tags verified"),
        "{err}"
    );
    let out = Command::new(serve_common::bin())
        .args([
            "repository",
            "show-tags",
            "classic/new",
            "-o",
            "tsv",
            "--data",
        ])
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "n1");
}

#[test]
fn the_upgrade_keeps_every_pull_working_and_refuses_pushes_until_it_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("classic");
    let tags = classic_storage(&root, 3);
    let classic = root.display().to_string();
    let serve = Serve::start_with(
        &tmp.path().join("d"),
        1,
        &[
            "--sku",
            "Classic",
            "--classic-storage",
            &classic,
            "--job-pace-ms",
            "300",
        ],
    );
    let addr = serve.addr.clone();
    let before = listing(&root.join("docker"));
    // A local image to push while the upgrade runs.
    let pushed = format!("{addr}/classic/pushed:p1");
    run(Command::new("docker").args(["pull", &format!("{addr}/classic/app1:v1")]));
    run(Command::new("docker").args(["tag", &format!("{addr}/classic/app1:v1"), &pushed]));

    // One client pulls in a loop from before the upgrade to after it.
    let puller = PullLoop::start(
        (0..3)
            .map(|i| format!("{addr}/classic/copy{i}:s1"))
            .collect(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _, err) = serve.acr(&["registry", "update", "--sku", "Standard", "--no-wait"]);
    assert!(ok, "{err}");
    let pulls_before = puller.pulls();
    // Another client pushes: refused with the reason while it runs, accepted after.
    let mut refusals = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the push never went through");
        let out = Command::new("docker")
            .args(["push", &pushed])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            break;
        }
        assert!(
            text.contains("being upgraded from Classic to Standard")
                && text.contains("pushes resume when the upgrade completes"),
            "a push failed for another reason: {text}"
        );
        refusals += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(refusals >= 1, "no push was refused during the upgrade");
    let during = puller.pulls() - pulls_before;
    assert!(during >= 2, "only {during} pulls overlapped the upgrade");
    // It is done: following it returns at once with the new tier.
    let (ok, out, err) = serve.acr(&["registry", "update", "--sku", "Standard"]);
    assert!(ok && out.contains("Standard"), "{out}\n{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (pulls, failures) = puller.stop();
    assert!(
        failures.is_empty(),
        "{} pulls failed, the first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(pulls >= 3, "too few pulls to tell");

    let v = show(&serve);
    assert_eq!(v["sku"], "Standard");
    let up = &v["classic"]["upgrade"];
    assert!(up["finished"].is_string(), "{v}");
    assert_eq!(
        up["progress"]["objectsDone"],
        up["progress"]["objectsTotal"]
    );
    // Every tag resolves to the same digest; managed storage serves, verified by fsck.
    for (name, digest) in &tags {
        assert_eq!(&skopeo_digest(&format!("{addr}/{name}")), digest, "{name}");
    }
    let (ok, out, err) = serve.acr(&["registry", "fsck"]);
    assert!(ok && out.contains("clean"), "{out}{err}");
    // Deletes work now; the Classic directory was not touched by any of it.
    let (ok, _, err) = serve.acr(&["repository", "delete", "classic/pushed", "--yes"]);
    assert!(ok, "{err}");
    assert_eq!(listing(&root.join("docker")), before);
    // One-way.
    let (ok, _, err) = serve.acr(&["registry", "update", "--sku", "Classic"]);
    assert!(!ok && err.contains("one-way"), "{err}");
    let _ = Command::new("docker")
        .args(["rmi", &pushed, &format!("{addr}/classic/app1:v1")])
        .output();
}

#[test]
fn a_killed_upgrade_resumes_without_copying_anything_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("classic");
    let tags = classic_storage(&root, 3);
    let classic = root.display().to_string();
    let data = tmp.path().join("d");
    let args = |pace: &'static str| {
        vec![
            "--sku".to_string(),
            "Classic".into(),
            "--classic-storage".into(),
            classic.clone(),
            "--job-pace-ms".into(),
            pace.into(),
        ]
    };
    let a = args("400");
    let mut serve = Serve::start_with(&data, 1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, _, err) = serve.acr(&["registry", "update", "--sku", "Basic", "--no-wait"]);
    assert!(ok, "{err}");
    // Wait until part of it is done (and saved), then kill -9.
    let deadline = Instant::now() + Duration::from_secs(60);
    let total = loop {
        assert!(Instant::now() < deadline, "the upgrade made no progress");
        let p = show(&serve)["classic"]["upgrade"]["progress"].clone();
        let done = p["objectsDone"].as_u64().unwrap_or(0);
        let total = p["objectsTotal"].as_u64().unwrap_or(0);
        assert!(
            total == 0 || done < total,
            "finished before the kill: pace it slower"
        );
        if done >= 3 {
            break total;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    serve.kill();
    // Restarted with the same command line, it resumes on its own; `update` follows it.
    let b = args("0");
    let serve = Serve::start_with(&data, 1, &b.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, out, err) = serve.acr(&["registry", "update", "--sku", "Basic"]);
    assert!(ok, "{out}\n{err}");
    let v = show(&serve);
    assert_eq!(v["sku"], "Basic");
    let p = &v["classic"]["upgrade"]["progress"];
    assert_eq!(p["objectsDone"].as_u64(), Some(total));
    let (copied, bytes) = (
        p["bytesCopied"].as_u64().unwrap(),
        p["bytesTotal"].as_u64().unwrap(),
    );
    assert!(
        copied > 0 && copied <= bytes,
        "copied {copied} bytes of {bytes}: something was copied twice"
    );
    for (name, digest) in &tags {
        assert_eq!(
            &skopeo_digest(&format!("{}/{name}", serve.addr)),
            digest,
            "{name}"
        );
    }
    let (ok, out, err) = serve.acr(&["registry", "fsck"]);
    assert!(ok && out.contains("clean"), "{out}{err}");
    // Restarting again with --sku Classic keeps the managed registry (and says so).
    drop(serve);
    let serve = Serve::start_with(&data, 1, &b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(show(&serve)["sku"], "Basic");
    assert!(
        serve.stderr().contains("upgraded from Classic to Basic"),
        "{}",
        serve.stderr()
    );
}
