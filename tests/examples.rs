//! Every example under `examples/` runs as its README says, on the real Docker Engine.

mod support;

use std::process::Command;

use support::*;

fn example(name: &str) -> std::path::PathBuf {
    root().join("examples").join(name).join("acb.yaml")
}

#[test]
fn hello_world() {
    let run = run_task(&example("hello-world"), &[]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    let expected = format!("Hello from run {} on linux/amd64", run.run_id());
    assert!(run.logged("hello", &expected), "{}", run.stderr());
}

#[test]
fn build_and_push_lands_in_the_integrated_registry() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("run")
        .arg(example("build-and-push"))
        .args(["--output", "json", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(report["status"], "Succeeded", "{stderr}");
    let run_id = report["runId"].as_str().unwrap().to_string();
    assert_no_orphans(&run_id);
    let steps = report["steps"].as_array().unwrap();
    let pushed = steps[1]["pushed"].as_array().unwrap();
    assert_eq!(pushed.len(), 2);
    let digest = pushed[0]["digest"].as_str().unwrap().to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    // The image that ran is the one built: its CMD prints the greeting and the build arg.
    assert!(
        stderr.contains("Hello from an image built and pushed by acr-task"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("version {run_id}")), "{stderr}");
    // Base-image dependencies are recorded with the image actually used: busybox is made
    // on this machine, so it has an image id and no registry digest.
    let bases = steps[0]["built"]["baseImages"].as_array().unwrap();
    assert_eq!(bases[0]["image"], "busybox");
    assert!(bases[0]["digest"].is_null(), "{}", bases[0]);
    assert!(bases[0]["imageId"].as_str().unwrap().starts_with("sha256:"));

    // The run's registry port is gone: the engine keeps no tags naming it.
    let image = pushed[0]["image"].as_str().unwrap().to_string();
    let run_registry = image.split_once('/').unwrap().0.to_string();
    let images = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .output()
        .unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&images.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{run_registry}/")))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "tags for a dead port: {left:?}");

    // The data dir now holds the pushed image: serve it, ask for both tags, pull one.
    let (mut child, addr) = spawn_server(data.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    for tag in [run_id.as_str(), "latest"] {
        let resp = rt
            .block_on(
                client
                    .head(format!("http://{addr}/v2/hello-acr/manifests/{tag}"))
                    .header(
                        "Accept",
                        "application/vnd.docker.distribution.manifest.v2+json",
                    )
                    .send(),
            )
            .unwrap();
        assert_eq!(resp.status(), 200, "tag {tag}");
        assert_eq!(
            resp.headers()["docker-content-digest"].to_str().unwrap(),
            digest
        );
    }
    let pulled = Command::new("docker")
        .args(["pull", "-q", &format!("{addr}/hello-acr:latest")])
        .output()
        .unwrap();
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    let _ = child.kill();
    let _ = child.wait();
    remove_images_of(&addr);
    remove_images_of(&run_registry);
}

#[test]
fn detached_service_is_reached_by_step_id() {
    let run = run_task(&example("detached-service"), &[]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(
        run.logged("fetch", "served by the web step"),
        "{}",
        run.stderr()
    );
}

#[test]
fn fan_out_fan_in() {
    let run = run_task(&example("fan-out-fan-in"), &[]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    for word in ["left", "middle", "right"] {
        assert!(run.logged("join", word), "{}", run.stderr());
    }
}

#[test]
fn values_file_and_set_later_wins() {
    let values = root().join("examples/values/values.yaml");
    let run = run_task(
        &example("values"),
        &[
            "--values",
            values.to_str().unwrap(),
            "--set",
            "stage=prod",
            "--set",
            "target=acr",
        ],
    );
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    let greeting = format!("Hello, acr! (image tag web:{})", run.run_id());
    assert!(run.logged("show", &greeting), "{}", run.stderr());
    assert!(run.logged("stage", "stage is prod"), "{}", run.stderr());
}

#[test]
fn quick_build_pushes_one_image() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args([
            "build",
            "-t",
            "quick/app:{{.Run.ID}}",
            "--build-arg",
            "VERSION=quick",
            "--secret-build-arg",
            "TOKEN=quick-s3cret",
            "--output",
            "json",
            "--data",
        ])
        .arg(data.path())
        .arg(root().join("examples/build-and-push"))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(report["status"], "Succeeded", "{err}");
    let id = report["runId"].as_str().unwrap();
    assert_no_orphans(id);
    let pushed = &report["steps"][1]["pushed"][0];
    // The tag was rendered as az renders it, under the run's registry.
    let image = pushed["image"].as_str().unwrap();
    assert!(image.ends_with(&format!("/quick/app:{id}")), "{image}");
    assert!(pushed["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(
        !err.contains("quick-s3cret")
            && !String::from_utf8_lossy(&out.stdout).contains("quick-s3cret")
    );
    if let Some((registry, _)) = image.split_once('/') {
        remove_images_of(registry);
    }

    // --no-push builds only.
    let out = Command::new(bin())
        .args([
            "build",
            "-t",
            "quick/local:v1",
            "--no-push",
            "-o",
            "json",
            "--data",
        ])
        .arg(data.path())
        .arg(root().join("examples/build-and-push"))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["status"],
        "Succeeded",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{report}");
    let built = steps[0]["built"]["tags"][0].as_str().unwrap().to_string();
    let _ = Command::new("docker").args(["rmi", &built]).output();
}

/// A tarball URL is a context, as `az acr build` takes one.
#[test]
fn build_from_a_tarball_url() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY hello.txt /hello.txt\n",
    )
    .unwrap();
    std::fs::write(ctx.join("hello.txt"), "from a tarball\n").unwrap();
    let tarball = dir.path().join("ctx.tar.gz");
    let ok = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&ctx)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    let body = std::fs::read(&tarball).unwrap();
    // A one-file HTTP server on loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let wanted = String::from_utf8_lossy(&buf[..n]).contains("GET /ctx.tar.gz ");
            let answer: &[u8] = if wanted {
                &body
            } else {
                b"this is not a tarball"
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                answer.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(answer);
        }
    });
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args([
            "build",
            "-t",
            "tarball/app:1",
            "--no-push",
            "-o",
            "json",
            "--data",
        ])
        .arg(data.path())
        .arg(format!("http://{addr}/ctx.tar.gz"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(report["status"], "Succeeded", "{err}");
    assert!(err.contains("COPY hello.txt"), "{err}");
    let built = report["steps"][0]["built"]["tags"][0]
        .as_str()
        .unwrap()
        .to_string();
    let _ = Command::new("docker").args(["rmi", &built]).output();
    // Not a tarball: a clear error naming the URL.
    let out = Command::new(bin())
        .args(["build", "-t", "x:1", "--no-push", "--data"])
        .arg(data.path())
        .arg(format!("http://{addr}/ctx.tar"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tarball context") && err.contains("/ctx.tar"),
        "{err}"
    );
}
