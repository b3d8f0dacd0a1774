//! The ready-made task files under `tasks/` run as their comments say.

mod support;

use support::*;

#[test]
fn quick_build_builds_pushes_and_runs_the_image() {
    let context = root().join("examples/build-and-push");
    let run = run_task(
        &root().join("tasks/quick-build.yaml"),
        &[
            "--context",
            context.to_str().unwrap(),
            "--set",
            "image=ready/quick:v1",
        ],
    );
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    let pushed = &run.step("push")["pushed"][0];
    assert!(pushed["image"]
        .as_str()
        .unwrap()
        .ends_with("/ready/quick:v1"));
    assert!(pushed["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(
        run.logged("smoke", "Hello from an image built and pushed by acr-task"),
        "{}",
        run.stderr()
    );
}

#[test]
fn quick_build_without_an_image_value_is_refused_before_running() {
    let out = std::process::Command::new(bin())
        .args(["validate"])
        .arg(root().join("tasks/quick-build.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("quick-build.yaml:7:25: template: give the image with --set image=NAME:TAG"),
        "{err}"
    );
}
