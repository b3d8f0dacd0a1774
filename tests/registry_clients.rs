//! Real clients against the registry: the Docker Engine (docker CLI) and skopeo.
//! These tests fail (not skip) when docker, the engine or skopeo is missing.

mod registry_common;

use std::process::Command;

use registry_common::*;
use serde_json::json;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Run a blocking command off the runtime's worker so the in-process server keeps serving.
async fn run_async(mut cmd: Command) -> String {
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap()
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_engine_pushes_and_pulls_an_image() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let image = format!("{}/{}/busybox:v1", reg.addr(), unique("it"));
    let marker = unique("marker-");
    make_busybox_image(&image, &marker);
    let pushed = run_async(cmd("docker", &["push", &image])).await;
    assert!(pushed.contains("digest: sha256:"), "{pushed}");
    run_async(cmd("docker", &["rmi", &image])).await;
    run_async(cmd("docker", &["pull", &image])).await;
    let out = run_async(cmd("docker", &["run", "--rm", &image])).await;
    assert_eq!(out, marker);
    // A second push of the same image only HEADs blobs and re-puts the manifest.
    let again = run_async(cmd("docker", &["push", &image])).await;
    assert!(again.contains("Layer already exists"), "{again}");
    // The same image under another repository: the engine mounts the layer across.
    let other = format!("{}/{}/copy:v1", reg.addr(), unique("it"));
    run_async(cmd("docker", &["tag", &image, &other])).await;
    let mounted = run_async(cmd("docker", &["push", &other])).await;
    assert!(mounted.contains("Mounted from"), "{mounted}");
    run_async(cmd("docker", &["rmi", &image, &other])).await;
    let store = reg.registry().store().clone();
    reg.shutdown().await;
    assert!(store.fsck().unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_in_and_out_and_inspects() {
    require_docker();
    require_tool("skopeo", "apt-get install -y skopeo");
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let local = format!("acr-task-test/{}:v1", unique("sk"));
    make_busybox_image(&local, "skopeo");
    let dest = format!("docker://{}/skopeo/bb:v1", reg.addr());
    run_async(cmd(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("docker-daemon:{local}"),
            &dest,
        ],
    ))
    .await;
    let inspect = run_async(cmd("skopeo", &["inspect", "--tls-verify=false", &dest])).await;
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["RepoTags"], json!(["v1"]));
    let digest_reported = v["Digest"].as_str().unwrap().to_string();
    let raw = run_async(cmd(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &dest],
    ))
    .await;
    assert_eq!(digest(raw.as_bytes()), digest_reported);

    // Out to an OCI layout and back in under another name, as OCI.
    let out = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:bb", out.path().display());
    run_async(cmd(
        "skopeo",
        &["copy", "--src-tls-verify=false", &dest, &layout],
    ))
    .await;
    let dest2 = format!("docker://{}/skopeo/oci:v1", reg.addr());
    run_async(cmd(
        "skopeo",
        &[
            "copy",
            "--dest-tls-verify=false",
            "--format",
            "oci",
            &layout,
            &dest2,
        ],
    ))
    .await;
    let raw2 = run_async(cmd(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &dest2],
    ))
    .await;
    let m: serde_json::Value = serde_json::from_str(&raw2).unwrap();
    assert_eq!(m["mediaType"], OCI_MANIFEST);
    run_async(cmd("docker", &["rmi", &local])).await;
    reg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_a_multi_arch_index() {
    require_tool("skopeo", "apt-get install -y skopeo");
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let layout = tempfile::tempdir().unwrap();
    let index_digest = write_multi_arch_layout(layout.path());
    let dest = format!("docker://{}/multi/arch:v1", reg.addr());
    run_async(cmd(
        "skopeo",
        &[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            &format!("oci:{}:multi", layout.path().display()),
            &dest,
        ],
    ))
    .await;
    let r = reqwest::Client::new()
        .get(format!("{}/v2/multi/arch/manifests/v1", base(&reg)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    // skopeo compresses the uncompressed layers for a registry, which rewrites the
    // manifests and so the index: its digest differs from the layout's.
    let stored_digest = r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(stored_digest, index_digest);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);

    // Back out, all platforms (skopeo's oci: writer may re-encode the index, so check the
    // registry's raw copy for byte identity instead).
    let out = tempfile::tempdir().unwrap();
    run_async(cmd(
        "skopeo",
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &dest,
            &format!("oci:{}:back", out.path().display()),
        ],
    ))
    .await;
    assert!(out.path().join("index.json").exists());
    let raw = run_async(cmd(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &dest],
    ))
    .await;
    assert_eq!(digest(raw.as_bytes()), stored_digest);
    let arm = run_async(cmd(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--override-arch",
            "arm64",
            &dest,
        ],
    ))
    .await;
    let v: serde_json::Value = serde_json::from_str(&arm).unwrap();
    assert_eq!(v["Architecture"], "arm64");
    let infos = reg
        .registry()
        .manifests("multi/arch")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(infos.len(), 3);
    reg.shutdown().await;
}
