//! Signing and content trust in runs, on the real Docker Engine: `acr-task run
//! --signing-key` signs what its push steps push, and with content trust enabled on the
//! integrated registry a run builds FROM a signed image but refuses an unsigned one.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::{bin, remove_images_of, require_docker};

/// `acr-task run FILE CONTEXT --data DATA ARGS -o json`: (report, stderr).
fn run(data: &Path, dir: &Path, file: &str, args: &[&str]) -> (Value, String) {
    let out = Command::new(bin())
        .current_dir(dir)
        .args(["run", file, "."])
        .args(["--output", "json", "--data"])
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
    // The run's registry (a port of its own each run) is gone: untag what it pushed.
    for s in report["steps"].as_array().into_iter().flatten() {
        for p in s["pushed"].as_array().into_iter().flatten() {
            if let Some((host, _)) = p["image"].as_str().and_then(|i| i.split_once('/')) {
                remove_images_of(host);
            }
        }
    }
    (report, stderr)
}

fn cli(data: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .current_dir(dir)
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn runs_sign_their_pushes_and_refuse_unsigned_images_of_protected_repositories() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = Command::new(bin())
        .current_dir(d)
        .arg("generate-key-pair")
        .output()
        .unwrap();
    assert!(keys.status.success());
    std::fs::write(
        d.join("Dockerfile"),
        "FROM busybox\nRUN echo built > /built\n",
    )
    .unwrap();
    std::fs::write(
        d.join("push-unsigned.yaml"),
        "version: v1.1.0\nsteps:\n  - build: -t $Registry/prod/unsigned:v1 .\n  - push: [\"$Registry/prod/unsigned:v1\"]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("push-signed.yaml"),
        "version: v1.1.0\nsteps:\n  - build: -t $Registry/prod/base:v1 .\n  - push: [\"$Registry/prod/base:v1\"]\n",
    )
    .unwrap();

    let (r, err) = run(data.path(), d, "push-unsigned.yaml", &[]);
    assert_eq!(r["status"], "Succeeded", "{err}");
    let (r, err) = run(
        data.path(),
        d,
        "push-signed.yaml",
        &["--signing-key", "cosign.key"],
    );
    assert_eq!(r["status"], "Succeeded", "{err}");
    assert!(
        err.contains("signed ") && err.contains("prod/base:v1"),
        "{err}"
    );

    // The integrated registry's files: both images, one with its signature as a referrer.
    let listed: Value = serde_json::from_str(&cli(
        data.path(),
        d,
        &[
            "repository",
            "show-manifests",
            "prod/base",
            "--referrers",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    let image = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["tags"] == serde_json::json!(["v1"]))
        .unwrap_or_else(|| panic!("no manifest tagged v1: {listed}"));
    let sigs = image["referrers"].as_array().cloned().unwrap_or_default();
    assert_eq!(sigs.len(), 1, "{listed}");
    assert_eq!(
        sigs[0]["artifactType"],
        "application/vnd.dev.cosign.artifact.sig.v1+json"
    );

    // Content trust on prod/*: a build FROM the signed image runs; the unsigned one is
    // refused before the engine is asked for it.
    cli(data.path(), d, &["registry", "update", "--sku", "Premium"]);
    cli(
        data.path(),
        d,
        &[
            "registry",
            "config",
            "content-trust",
            "add",
            "--repository",
            "prod/*",
            "--key",
            "cosign.pub",
        ],
    );
    cli(
        data.path(),
        d,
        &["registry", "update", "--content-trust", "enabled"],
    );
    std::fs::write(
        d.join("use.yaml"),
        "version: v1.1.0\nsteps:\n  - id: app\n    build: -f Dockerfile.app --build-arg Registry=$Registry -t acr-task-signing-test-app:v1 .\n  - id: unsigned\n    cmd: $Registry/prod/unsigned:v1 cat /built\n    when: [app]\n",
    )
    .unwrap();
    std::fs::write(
        d.join("Dockerfile.app"),
        "ARG Registry\nFROM $Registry/prod/base:v1\nRUN cat /built\n",
    )
    .unwrap();
    let (r, err) = run(data.path(), d, "use.yaml", &[]);
    let _ = Command::new("docker")
        .args(["rmi", "acr-task-signing-test-app:v1"])
        .output();
    assert_eq!(r["status"], "Failed", "{err}");
    let steps = r["steps"].as_array().unwrap();
    let step = |id: &str| steps.iter().find(|s| s["id"] == id).unwrap().clone();
    assert_eq!(step("app")["status"], "Succeeded", "{err}");
    let refused = step("unsigned");
    assert_eq!(refused["status"], "Failed", "{err}");
    let why = refused["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("content trust") && why.contains("\"prod/*\""),
        "{why}\n{err}"
    );
}
