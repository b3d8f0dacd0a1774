//! `acr-task task ...` as an ACR user types it against a running `serve`: quick tasks
//! (`--cmd`, `--image`) with no context, timers added, changed and removed, triggers
//! turned off and on again, `task logs NAME` for the latest run, `run --follow` saying why
//! a run failed, and the webhook URL a commit trigger needs.

mod serve_common;

use std::process::Command;

use serde_json::Value;
use serve_common::*;

/// `acr-task ARGS --server URL` with the admin's credentials: (ok, stdout, stderr).
fn task(serve: &Serve, args: &[&str]) -> (bool, String, String) {
    let o = serve
        .cli()
        .arg("task")
        .args(args)
        .args(["--server", &serve.addr])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn task_ok(serve: &Serve, args: &[&str]) -> (String, String) {
    let (ok, out, err) = task(serve, args);
    assert!(ok, "task {args:?}: {out}\n{err}");
    (out, err)
}

fn show(serve: &Serve, name: &str) -> Value {
    let (out, _) = task_ok(serve, &["show", name, "-o", "json"]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn quick_tasks_timers_triggers_and_logs() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    // `--server HOST:PORT` (no scheme) is how users type it; the helper passes it so.
    let serve = Serve::start(&data.path().join("d"), 1);

    // A quick command task with no context: runs, and `task logs NAME` shows its run.
    let (_, err) = task_ok(
        &serve,
        &[
            "create",
            "hello",
            "--cmd",
            "busybox echo hello-from-{{.Run.ID}}",
            "--context",
            "/dev/null",
        ],
    );
    assert!(!err.contains("webhook"), "{err}");
    let (out, _) = task_ok(&serve, &["run", "hello", "--follow"]);
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("Run "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no run line in {out}"))
        .to_string();
    assert!(out.contains(&format!("hello-from-{id}")), "{out}");
    assert!(out.contains(&format!("Run {id} Succeeded")), "{out}");
    let (logs, _) = task_ok(&serve, &["logs", "hello"]);
    assert!(logs.contains(&format!("hello-from-{id}")), "{logs}");
    let (logs_by_id, _) = task_ok(&serve, &["logs", &id]);
    assert_eq!(logs, logs_by_id);
    let (ok, _, err) = task(&serve, &["logs", "no-such-task"]);
    assert!(
        !ok && err.contains("no-such-task") && !err.contains('{'),
        "{err}"
    );

    // Timers: add, change, remove; the server checks the schedule.
    task_ok(
        &serve,
        &[
            "timer",
            "add",
            "hello",
            "--timer-name",
            "nightly",
            "--schedule",
            "0 3 * * *",
        ],
    );
    task_ok(
        &serve,
        &[
            "timer",
            "update",
            "hello",
            "--timer-name",
            "nightly",
            "--schedule",
            "30 4 * * 1",
        ],
    );
    let (out, _) = task_ok(&serve, &["timer", "list", "hello", "-o", "json"]);
    let timers: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(timers[0]["name"], "nightly");
    assert_eq!(timers[0]["schedule"], "30 4 * * 1");
    let (ok, _, err) = task(
        &serve,
        &[
            "timer",
            "add",
            "hello",
            "--timer-name",
            "bad",
            "--schedule",
            "61 * * * *",
        ],
    );
    assert!(!ok && err.contains("bad"), "{err}");
    task_ok(
        &serve,
        &["timer", "remove", "hello", "--timer-name", "nightly"],
    );
    assert_eq!(
        show(&serve, "hello")["triggers"]["timers"],
        serde_json::json!([])
    );

    // Triggers off and on again.
    task_ok(&serve, &["update", "hello", "--no-base-image-trigger"]);
    assert_eq!(show(&serve, "hello")["triggers"]["baseImage"], false);
    task_ok(
        &serve,
        &["update", "hello", "--base-image-trigger-enabled", "true"],
    );
    assert_eq!(show(&serve, "hello")["triggers"]["baseImage"], true);
    let (_, err) = task_ok(&serve, &["update", "hello", "--commit-secret", "s3cret"]);
    assert!(
        err.contains(&format!("{}/api/webhooks/github/hello", serve.url)),
        "{err}"
    );
    let shown = show(&serve, "hello");
    assert!(!shown.to_string().contains("s3cret"), "{shown}");
    task_ok(
        &serve,
        &["update", "hello", "--commit-trigger-enabled", "false"],
    );
    assert!(show(&serve, "hello")["triggers"]["commit"].is_null());

    // A setup failure (a secret the server does not have) is explained by run --follow.
    task_ok(
        &serve,
        &[
            "create",
            "broken",
            "--cmd",
            "busybox true",
            "--context",
            "/dev/null",
            "--secret",
            "token=env:ACR_TASK_SECRET_NOT_SET_ANYWHERE",
        ],
    );
    let (ok, out, _) = task(&serve, &["run", "broken", "--follow"]);
    assert!(!ok);
    assert!(
        out.contains("Failed") && out.contains("ACR_TASK_SECRET_NOT_SET_ANYWHERE"),
        "{out}"
    );

    // `run --no-wait` queues a run on the server and returns; no task is stored for it.
    let queued = serve
        .cli()
        .args([
            "run",
            "--cmd",
            "busybox echo queued-{{.Run.ID}}",
            "/dev/null",
            "--no-wait",
            "--server",
            &serve.addr,
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        queued.status.success(),
        "{}",
        String::from_utf8_lossy(&queued.stderr)
    );
    let rec: Value = serde_json::from_slice(&queued.stdout).unwrap();
    let qid = rec["id"].as_str().unwrap().to_string();
    assert_eq!(rec["trigger"]["kind"], "quick");
    let (logs, _) = task_ok(&serve, &["logs", &qid, "--follow"]);
    assert!(logs.contains(&format!("queued-{qid}")), "{logs}");
    let (out, _) = task_ok(&serve, &["list", "-o", "json"]);
    assert!(!out.contains("quick-run"), "{out}");
    let local = serve
        .cli()
        .args([
            "run",
            "--cmd",
            "busybox true",
            ".",
            "--no-wait",
            "--server",
            &serve.addr,
        ])
        .output()
        .unwrap();
    assert!(!local.status.success());
    assert!(String::from_utf8_lossy(&local.stderr).contains("cannot read"));
    let tarball = serve
        .cli()
        .args([
            "run",
            "--cmd",
            "busybox true",
            "https://example.com/ctx.tar.gz",
            "--no-wait",
            "--server",
            &serve.addr,
        ])
        .output()
        .unwrap();
    assert!(!tarball.status.success());
    assert!(String::from_utf8_lossy(&tarball.stderr).contains("tarball context"));

    // A quick build task: the context's Dockerfile, pushed with its rendered tag.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nLABEL quick=task\n",
    )
    .unwrap();
    let ctx_arg = ctx.path().display().to_string();
    task_ok(
        &serve,
        &[
            "create",
            "img",
            "--image",
            "quick/img:{{.Run.ID}}",
            "--context",
            &ctx_arg,
        ],
    );
    let (out, _) = task_ok(&serve, &["run", "img", "--follow", "-o", "json"]);
    let run: Value = serde_json::from_str(&out).unwrap();
    let id = run["id"].as_str().unwrap();
    let pushed = run["report"]["steps"][1]["pushed"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(pushed, format!("{}/quick/img:{id}", serve.addr), "{run}");
    let tags = Command::new(bin())
        .args([
            "repository",
            "show-tags",
            "quick/img",
            "-o",
            "json",
            "--registry",
        ])
        .arg(&serve.addr)
        .output()
        .unwrap();
    let tags: Value = serde_json::from_slice(&tags.stdout).unwrap();
    assert_eq!(tags, serde_json::json!([id]));
}
