//! `acr-task run` end to end on the real Docker Engine: step semantics, failures, cleanup.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn failing_step_fails_the_run_and_skips_what_waits_for_it() {
    let run = run_task(&data("fail-exit.yaml"), &[]);
    assert!(!run.output.status.success(), "exit code must be non-zero");
    assert_eq!(run.status(), "Failed");
    assert_eq!(run.step("ok")["status"], "Succeeded");
    assert_eq!(run.step("bad")["status"], "Failed");
    assert_eq!(run.step("bad")["exitCode"], 3);
    assert_eq!(run.step("after")["status"], "Skipped");
    assert!(run.logged("bad", "about to fail"), "{}", run.stderr());
}

#[test]
fn step_timeout_kills_the_container() {
    let start = Instant::now();
    let run = run_task(&data("timeout.yaml"), &[]);
    assert!(
        start.elapsed() < Duration::from_secs(40),
        "the 60 s sleep was not cut short"
    );
    assert_eq!(run.step("slow")["status"], "TimedOut");
    assert_eq!(run.step("slow")["error"], "step slow timed out after 2 s");
    assert_eq!(run.status(), "Failed");
}

#[test]
fn ignore_errors_exit_codes_retries_and_repeat() {
    let run = run_task(&data("semantics.yaml"), &[]);
    assert_eq!(
        run.status(),
        "Succeeded",
        "{}\n{}",
        run.report,
        run.stderr()
    );
    assert_eq!(run.step("ignored")["ignoredError"], true);
    assert_eq!(run.step("expected-code")["exitCode"], 7);
    assert_eq!(run.step("flaky")["attempts"], 3);
    assert_eq!(run.step("repeated")["attempts"], 3);
    assert!(run.logged("check", "counts-ok"), "{}", run.stderr());
}

#[test]
fn missing_image_names_the_image_and_the_step() {
    let run = run_task(&data("missing-image.yaml"), &[]);
    assert_eq!(run.status(), "Failed");
    let err = run.step("ghost")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("step ghost") && err.contains("127.0.0.1:9/no/such-image:1"),
        "{err}"
    );
}

#[test]
fn build_failure_shows_the_tail_of_the_build_log() {
    let run = run_task(&data("build-fail/acb.yaml"), &[]);
    assert_eq!(run.status(), "Failed");
    let err = run.step("broken-build")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("error: the thing is broken"), "{err}");
    assert!(err.contains("returned a non-zero code"), "{err}");
}

#[test]
fn env_working_directory_entrypoint_user_and_secret_volumes() {
    let run = run_task(&data("env-workdir.yaml"), &[]);
    let err = run.stderr();
    assert_eq!(run.status(), "Succeeded", "{err}");
    for (step, line) in [
        ("defaults", "env-ok"),
        ("relative-wd", "/workspace/sub"),
        ("no-override", "/"),
        ("entry", "entry-ok"),
        ("as-nobody", "65534"),
        ("mounted", "secret-token"),
    ] {
        assert!(run.logged(step, line), "{step} should log {line}:\n{err}");
    }
}

#[test]
fn keep_leaves_only_the_kept_container() {
    let run = run_task_with(&data("keep.yaml"), &[], false);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    let name = format!("{}_kept", run.run_id());
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", &name])
        .output()
        .unwrap();
    let running = String::from_utf8_lossy(&out.stdout).trim() == "true";
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    // The network and workspace volume the kept container uses stay with it.
    let label = format!("label=io.acr-task.run={}", run.run_id());
    for kind in ["network", "volume"] {
        let ids = Command::new("docker")
            .args([kind, "ls", "-q", "--filter", &label])
            .output()
            .unwrap();
        for id in String::from_utf8_lossy(&ids.stdout).lines() {
            let _ = Command::new("docker").args([kind, "rm", id]).output();
        }
    }
    assert_no_orphans(&run.run_id());
    assert!(running, "kept container {name} should still run");
    let dropped = format!("{}_dropped", run.run_id());
    let out = Command::new("docker")
        .args(["inspect", &dropped])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "detached container without keep must be removed"
    );
}

#[test]
fn parallel_steps_overlap_and_max_parallel_bounds_them() {
    let file = root().join("examples/fan-out-fan-in/acb.yaml");
    let overlaps = |run: &Run| {
        let iv: Vec<(u64, u64)> = ["left", "middle", "right"]
            .iter()
            .map(|id| {
                let s = run.step(id);
                let start = s["startedMs"].as_u64().unwrap();
                (start, start + s["durationMs"].as_u64().unwrap())
            })
            .collect();
        iv.iter()
            .enumerate()
            .any(|(i, a)| iv.iter().skip(i + 1).any(|b| a.0 < b.1 && b.0 < a.1))
    };
    let run = run_task(&file, &[]);
    assert_eq!(run.status(), "Succeeded");
    assert!(
        overlaps(&run),
        "independent steps should run at the same time: {}",
        run.report
    );
    let join = run.step("join")["startedMs"].as_u64().unwrap();
    for id in ["left", "middle", "right"] {
        let s = run.step(id);
        assert!(join >= s["startedMs"].as_u64().unwrap() + s["durationMs"].as_u64().unwrap());
    }
    let serial = run_task(&file, &["--max-parallel", "1"]);
    assert_eq!(serial.status(), "Succeeded");
    assert!(
        !overlaps(&serial),
        "--max-parallel 1 must run one step at a time: {}",
        serial.report
    );
}

#[test]
fn sigterm_cancels_and_removes_everything() {
    require_docker();
    let data_dir = tempfile::tempdir().unwrap();
    let child = Command::new(bin())
        .args(["run"])
        .arg(data("long.yaml"))
        .args(["--output", "json", "--data"])
        .arg(data_dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the long step's container runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let out = Command::new("docker")
            .args(["ps", "--format", "{{.Names}}", "--filter", "name=_long"])
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(n) = names.lines().find(|n| n.ends_with("_long")) {
            break n.trim_end_matches("_long").to_string();
        }
        assert!(Instant::now() < deadline, "the long step never started");
        std::thread::sleep(Duration::from_millis(200));
    };
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "Canceled");
    assert_eq!(report["runId"], run_id.as_str());
    assert_no_orphans(&run_id);
}

#[test]
fn unreachable_engine_is_one_clear_error() {
    let out = Command::new(bin())
        .args(["run"])
        .arg(root().join("examples/hello-world/acb.yaml"))
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .args(["--registry", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the Docker Engine at unix:///nonexistent/docker.sock"),
        "{err}"
    );
    assert!(err.contains("DOCKER_HOST"), "{err}");
}

#[test]
fn secrets_are_substituted_and_masked_in_logs_and_report() {
    let run = run_task(&data("secrets.yaml"), &["--secret", "token=s3cr3t-value"]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(run.logged("use", "token is ***"), "{}", run.stderr());
    assert!(!run.stderr().contains("s3cr3t-value"));
    assert!(!run.report.to_string().contains("s3cr3t-value"));
    // A declared secret without a value is refused before anything runs, where it is
    // declared, with the fix.
    let missing = Command::new(bin())
        .arg("run")
        .arg(data("secrets.yaml"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains(
            "secrets.yaml:4:9: secret `token` has no value; pass it with --secret token=VALUE"
        ),
        "{err}"
    );
    assert!(!err.contains("not declared"), "{err}");
}

#[test]
fn symlinks_in_the_context_are_sent_as_links_even_when_they_lead_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/file"), "inside\n").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", d.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../elsewhere", d.join("sub/up")).unwrap();
    std::os::unix::fs::symlink("sub/file", d.join("in")).unwrap();
    std::fs::write(
        d.join("acb.yaml"),
        "steps:\n  - id: look\n    cmd: busybox sh -c 'readlink abs; readlink sub/up; readlink in; cat in'\n",
    )
    .unwrap();
    let run = run_task(&d.join("acb.yaml"), &[]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    // Links stay links (their targets are never read on the host), and the one that
    // leaves the context points where it resolves from /workspace.
    assert!(run.logged("look", "/etc/hostname"), "{}", run.stderr());
    assert!(run.logged("look", "/elsewhere"), "{}", run.stderr());
    assert!(run.logged("look", "sub/file"), "{}", run.stderr());
    assert!(run.logged("look", "inside"), "{}", run.stderr());
}

#[test]
fn multi_line_and_encoded_secrets_are_masked() {
    let key = "first-secret-line-AAAA\nsecond-secret-line-BBBB\nthird-secret-line-CCCC";
    let run = run_task(
        &data("secret-forms.yaml"),
        &["--secret", &format!("key={key}")],
    );
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(run.logged("show", "done"), "{}", run.stderr());
    let all = format!("{}{}", run.stderr(), run.report);
    for needle in ["secret-line", "AAAA", "BBBB", "CCCC"] {
        assert!(!all.contains(needle), "{needle} leaked:\n{all}");
    }
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(key);
    assert!(!all.contains(&b64[..20]), "base64 leaked:\n{all}");
}

#[test]
fn git_context_at_a_ref_sets_commit_and_branch() {
    let repo_dir = tempfile::tempdir().unwrap();
    let (commit, branch) = git_repo(
        repo_dir.path(),
        &[
            (
                "acb.yaml",
                "steps:\n  - id: show\n    cmd: busybox sh -c \"echo commit={{.Run.Commit}} branch={{.Run.Branch}}; cat /workspace/file.txt\"\n",
            ),
            ("file.txt", "from-git\n"),
        ],
    );
    let url = format!("file://{}#{branch}", repo_dir.path().display());
    let run = run_task(std::path::Path::new("acb.yaml"), &["--context", &url]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(run.logged("show", "from-git"), "{}", run.stderr());
    assert!(
        run.logged("show", &format!("commit={commit} branch={branch}")),
        "{}",
        run.stderr()
    );
}

#[test]
fn build_context_comes_from_the_workspace_with_dockerignore() {
    let run = run_task(&data("workspace-build/acb.yaml"), &[]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(
        run.logged("check", "generated-at-run-time"),
        "{}",
        run.stderr()
    );
    assert!(run.logged("check", "no-ignored-files"), "{}", run.stderr());
    let _ = Command::new("docker")
        .args(["rmi", &format!("workspace-build:{}", run.run_id())])
        .output();
}

#[test]
fn platform_reaches_templates_builds_and_containers() {
    let file = data("platform/acb.yaml");
    let run = run_task(&file, &["--platform", "linux/amd64"]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(
        run.logged("show", "platform=linux/amd64"),
        "{}",
        run.stderr()
    );
    assert!(
        run.logged("check", "built-for-the-platform"),
        "{}",
        run.stderr()
    );
    let image = format!("platform-check:{}", run.run_id());
    let arch = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{.Os}}/{{.Architecture}}",
            &image,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&arch.stdout).trim(), "linux/amd64");
    let _ = Command::new("docker").args(["rmi", &image]).output();

    // The engine is asked for arm64: the amd64 runner image does not match, and the
    // step fails saying so instead of silently running the host's platform.
    let run = run_task(&file, &["--platform", "linux/arm64"]);
    assert_eq!(run.status(), "Failed", "{}", run.report);
    let err = run.step("show")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("platform"), "{err}");

    let bad = Command::new(bin())
        .args(["run", "--platform", "linux/sparc"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(e.contains("unknown architecture \"sparc\""), "{e}");
}

#[test]
fn acr_alias_lists_and_untags_in_the_run_registry() {
    let run = run_task(&data("acr-alias/acb.yaml"), &[]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    let registry = run.report["steps"][1]["pushed"][0]["image"]
        .as_str()
        .and_then(|i| i.split_once('/'))
        .map(|(r, _)| r.to_string())
        .expect("a pushed image");
    let digest = run.report["steps"][1]["pushed"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        run.logged("tags", &format!("{registry}/acr-alias:v1"))
            && run.logged("tags", &format!("{registry}/acr-alias:v2")),
        "{}",
        run.stderr()
    );
    assert!(
        run.logged("manifests", &format!("{registry}/acr-alias@{digest}")),
        "{}",
        run.stderr()
    );
    // The tag deleted by the step is gone for the next one; the other stays.
    assert!(
        run.logged("after", &format!("{registry}/acr-alias:v2")),
        "{}",
        run.stderr()
    );
    let said = |step: &str, needle: &str| {
        run.stderr()
            .lines()
            .any(|l| l.starts_with(&format!("{step} ")) && l.contains(needle))
    };
    assert!(!said("after", "acr-alias:v1"), "{}", run.stderr());
    // acr purge, as acr-cli: a dry run names what would go and deletes nothing; then the
    // remaining tag goes, and with --untagged the manifest no tag names any more.
    assert!(
        said("dry", "DRY RUN") && said("dry", &format!("{registry}/acr-alias:v2")),
        "{}",
        run.stderr()
    );
    assert!(said("dry", "Number of deleted tags: 1"), "{}", run.stderr());
    assert_eq!(run.step("purge")["exitCode"], 0, "{}", run.stderr());
    assert!(
        said("purge", &format!("{registry}/acr-alias:v2"))
            && said("purge", &format!("{registry}/acr-alias@{digest}"))
            && said("purge", "Number of deleted tags: 1")
            && said("purge", "Number of deleted manifests: 1"),
        "{}",
        run.stderr()
    );
}

/// As `az acr run`: `-f FILE CONTEXT` with the context positional, `GIT_URL#ref:folder`,
/// `--cmd 'IMAGE ARGS' /dev/null`, `--no-logs` and `--timeout`.
#[test]
fn az_style_run_arguments() {
    // A positional context that is not the task file's directory.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("hello.txt"), "from-positional\n").unwrap();
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("acb.yaml");
    std::fs::write(
        &file,
        "steps:\n  - id: show\n    cmd: busybox cat hello.txt\n",
    )
    .unwrap();
    let ctx_arg = ctx.path().display().to_string();
    let run = run_task(&file, &[&ctx_arg]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(run.logged("show", "from-positional"), "{}", run.stderr());

    // A folder of a git repository at a branch.
    let repo_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo_dir.path().join("app")).unwrap();
    let (_, branch) = git_repo(
        repo_dir.path(),
        &[
            (
                "app/acb.yaml",
                "steps:\n  - id: show\n    cmd: busybox cat in-folder.txt\n",
            ),
            ("app/in-folder.txt", "from-the-folder\n"),
            ("top.txt", "top\n"),
        ],
    );
    let url = format!("file://{}#{branch}:app", repo_dir.path().display());
    let run = run_task(std::path::Path::new("acb.yaml"), &[&url]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(run.logged("show", "from-the-folder"), "{}", run.stderr());
    let url = format!(
        "file://{}#{branch}:no-such-folder",
        repo_dir.path().display()
    );
    let out = Command::new(bin())
        .args(["run", "acb.yaml", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-folder"), "{err}");

    // A quick command, rendered; with --no-logs its output is not shown.
    let run = run_command(&["--cmd", "busybox echo quick-{{.Run.ID}}", "/dev/null"]);
    let id = run.run_id();
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(
        run.stderr().contains(&format!("quick-{id}")),
        "{}",
        run.stderr()
    );
    let run = run_command(&["--cmd", "busybox echo quiet-output", "--no-logs"]);
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(!run.stderr().contains("quiet-output"), "{}", run.stderr());

    // --timeout cuts the whole run short.
    let start = Instant::now();
    let run = run_command(&["--cmd", "busybox sleep 30", "--timeout", "2"]);
    assert!(start.elapsed() < Duration::from_secs(25));
    assert_eq!(run.status(), "TimedOut", "{}", run.report);
}

/// `acr-task run ARGS --output json` without a task file.
fn run_command(args: &[&str]) -> Run {
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(bin())
        .arg("run")
        .args(args)
        .args(["--output", "json", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let run = Run { output, report };
    assert_no_orphans(&run.run_id());
    run
}

#[test]
fn steps_prepared_ahead_behave_as_docker_run() {
    let run = run_task(&data("warm.yaml"), &[]);
    let err = run.stderr();
    assert_eq!(run.status(), "Succeeded", "{}\n{err}", run.report);
    assert!(run.logged("read", "written-by-write"), "{err}");
    assert!(
        run.logged("gated", "busybox"),
        "no prepared container:\n{err}"
    );
    assert!(
        run.logged("stdin-closed", "stdin-eof from-task sh"),
        "{err}"
    );
    assert_eq!(run.step("image-default")["exitCode"], 0);
    assert_eq!(run.step("not-found")["exitCode"], 127);
    assert!(
        run.logged(
            "not-found",
            "exec: \"no-such-program\": executable file not found in $PATH"
        ),
        "{err}"
    );
    assert!(run.logged("after", "after-ok"), "{err}");
}
