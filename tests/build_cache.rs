//! acb's registry cache (`cache: enabled` on a build step) on the real engine and our
//! registry: the first build pushes its layers to `REPO:cache_TASK_STEP`; after every
//! local trace of them is gone (as on another agent's engine), a rebuild pulls that image
//! and reuses its layers instead of running the Dockerfile again.

mod serve_common;

use std::process::Command;

use serde_json::Value;
use serve_common::*;

fn run(registry: &str) -> (Value, String) {
    let out = Command::new(bin())
        .args(["run", "--output", "json", "--registry", registry])
        .arg(data_file("build-cache/acb.yaml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no report ({e}): {stderr}"));
    assert_eq!(report["status"], "Succeeded", "{stderr}");
    (report, stderr)
}

#[test]
fn a_rebuild_on_an_engine_without_the_layers_takes_them_from_the_registry_cache() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&dir.path().join("d"), 1, &["--registry-only"]);
    let registry = serve.addr.clone();
    let cache = format!("{registry}/build-cache:cache_quickrun_build");

    let (_, first) = run(&registry);
    assert!(first.contains("this build fills it"), "{first}");
    assert!(first.contains(&format!("cache: pushed {cache}")), "{first}");
    assert_eq!(first.matches("Using cache").count(), 0, "{first}");

    // Another engine, as far as the layers go: the images and their layers are removed.
    remove_images_of(&registry);
    let gone = Command::new("docker")
        .args(["image", "inspect", &cache])
        .output()
        .unwrap();
    assert!(
        !gone.status.success(),
        "the cache image is still on the engine"
    );

    let (_, second) = run(&registry);
    assert!(
        second.contains(&format!("cache: reusing the layers of {cache}")),
        "{second}"
    );
    // All five RUN layers (and the FROM's config) come from the cache.
    assert!(second.matches("Using cache").count() >= 5, "{second}");
    remove_images_of(&registry);
}
