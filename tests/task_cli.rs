//! `acr-task validate` through the real binary, and the `--dry-run` plan printers.

use std::path::{Path, PathBuf};
use std::process::Command;

use acr_task::cli::validate::{plan_dot, plan_json, plan_table};
use acr_task::plan::Plan;
use acr_task::task::{self, RunInfo, Values};

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tasks")
        .join(p)
}

fn acr_task(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_file_exits_zero_with_summary() {
    let f = data("valid/fan-out-fan-in.yaml");
    let (code, out, _) = acr_task(&["validate", f.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(out, "valid: 7 steps, 4 levels\n");
    let (code, out, _) = acr_task(&["validate", f.to_str().unwrap(), "--output", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"valid": true, "errors": [], "warnings": []})
    );
}

#[test]
fn what_acr_ignores_is_a_warning_and_strict_makes_it_an_error() {
    let f = data("warn/unknown-step-field.yaml");
    let (code, out, err) = acr_task(&["validate", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "valid: 1 steps, 1 levels, 1 warning\n");
    assert_eq!(
        err,
        format!(
            "{}:5:5: warning: unknown field `ignoreError` in a step is ignored, as ACR ignores it; did you mean `ignoreErrors`?\n",
            f.display()
        )
    );
    let (code, out, _) = acr_task(&["validate", f.to_str().unwrap(), "-o", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["errors"], serde_json::json!([]));
    assert_eq!(v["warnings"][0]["line"], 5);
    assert_eq!(v["warnings"][0]["severity"], "warning");
    let (code, _, err) = acr_task(&["validate", f.to_str().unwrap(), "--strict"]);
    assert_eq!(code, 1);
    assert!(err.contains(":5:5: unknown field `ignoreError`"), "{err}");
    assert!(!err.contains("warning:"), "{err}");
}

#[test]
fn invalid_file_exits_one_with_diagnostics() {
    let f = data("invalid/push-not-a-list.yaml");
    let (code, out, err) = acr_task(&["validate", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "{}:3:11: `push` takes a list: `push: [\"app\"]`\n",
            f.display()
        )
    );
    let (code, out, _) = acr_task(&["validate", f.to_str().unwrap(), "-o", "json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], false);
    let e = &v["errors"][0];
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(3), Some(11))
    );
    assert_eq!(e["file"], f.display().to_string());
    assert_eq!(e["message"], "`push` takes a list: `push: [\"app\"]`");
}

#[test]
fn values_file_and_set() {
    let f = data("valid/conditionals.yaml");
    let vals = data("valid/conditionals.values.yaml");
    let (code, out, err) = acr_task(&[
        "validate",
        f.to_str().unwrap(),
        "--values",
        vals.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "valid: 6 steps, 3 levels\n");
    let (code, out, _) = acr_task(&[
        "validate",
        f.to_str().unwrap(),
        "--values",
        vals.to_str().unwrap(),
        "--set",
        "deploy=false",
    ]);
    assert_eq!((code, out.as_str()), (0, "valid: 4 steps, 2 levels\n"));
    // Without values, `{{if .Values.deploy}}` is false, as in ACR (missingkey=zero): a
    // missing value is an error only where it would be printed.
    let (code, out, err) = acr_task(&["validate", f.to_str().unwrap()]);
    assert_eq!(
        (code, out.as_str()),
        (0, "valid: 1 steps, 1 levels\n"),
        "{err}"
    );
    // A missing value that is printed renders empty, as in ACR, with a warning.
    let printed = data("warn/undeclared-secret.yaml");
    let (code, _, err) = acr_task(&["validate", printed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: secret `token` has no value"),
        "{err}"
    );
    let (code, _, err) = acr_task(&["validate", f.to_str().unwrap(), "--set", "oops"]);
    assert_eq!(code, 1);
    assert!(err.contains("`oops` is not of the form key=value"), "{err}");
    // `--set` keys are used as written, as acb uses them.
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.yaml");
    std::fs::write(
        &t,
        "steps:\n  - cmd: busybox echo {{ index .Values \"a.b\" }}-{{ .Values.x }}\n",
    )
    .unwrap();
    let (code, out, err) = acr_task(&[
        "run",
        t.to_str().unwrap(),
        "--dry-run",
        "-o",
        "json",
        "--set",
        "a.b=c",
        "--set",
        "x=1,y=2",
    ]);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["steps"][0]["what"], "busybox echo c-1,y=2", "{plan}");
}

#[test]
fn plan_as_json_and_dot() {
    let path = data("valid/fan-out-fan-in.yaml");
    let t = task::load_file(&path, &RunInfo::default(), &Values::default()).unwrap();
    let p = Plan::new(&t).unwrap();
    let j = plan_json(&t, &p);
    assert_eq!(
        j["levels"][1],
        serde_json::json!(["lint", "unit", "build-amd64", "build-arm64"])
    );
    assert_eq!(
        j["steps"][5]["waitsFor"],
        serde_json::json!(["lint", "unit", "build-amd64", "build-arm64"])
    );
    assert_eq!(
        j["criticalPath"]["steps"],
        serde_json::json!(["checkout", "lint", "gate", "push"])
    );
    assert_eq!(j["criticalPath"]["timeoutSeconds"], 2400);
    let dot = plan_dot(&t, &p);
    assert!(dot.starts_with("digraph acb {\n"));
    assert!(dot.contains("  \"checkout\" -> \"unit\";\n"));
    assert!(dot.contains("  \"lint\" -> \"gate\" [style=bold];\n"));
    assert!(dot.trim_end().ends_with('}'));
}

#[test]
fn plan_as_table() {
    let path = data("valid/build-push-run.yaml");
    let run = RunInfo {
        id: "ca1".into(),
        registry: "r:5000".into(),
        ..Default::default()
    };
    let t = task::load_file(&path, &run, &Values::default()).unwrap();
    let p = Plan::new(&t).unwrap();
    assert_eq!(
        plan_table(&t, &p),
        "3 steps, 3 levels, version v1.1.0\n\
         level 0:\n\
         \x20 acb_step_0  build  -t r:5000/hello-world:ca1 .  [waits for: -]\n\
         level 1:\n\
         \x20 acb_step_1  push   r:5000/hello-world:ca1  [waits for: acb_step_0]\n\
         level 2:\n\
         \x20 acb_step_2  cmd    r:5000/hello-world:ca1  [waits for: acb_step_1]\n\
         critical path (by timeout, 1800 s): acb_step_0 -> acb_step_1 -> acb_step_2\n"
    );
}

fn policy_data(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/policy")
        .join(p)
        .display()
        .to_string()
}

#[test]
fn validate_reports_what_a_servers_policy_refuses_at_its_place() {
    let f = policy_data("escapes.yaml");
    // On one's own machine (no policy) the file is fine.
    let (code, out, err) = acr_task(&["validate", &f]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = acr_task(&["validate", &f, "--policy", &policy_data("server.yaml")]);
    assert_eq!(code, 1, "{err}");
    for (line, col, rule) in [
        (5, 17, "`privileged`"),
        (7, 13, "`dockerSocket`"),
        (9, 20, "`hostNetwork`"),
        (9, 25, "`hostNetwork`"),
        (10, 14, "`publishPorts`"),
    ] {
        let at = format!("escapes.yaml:{line}:{col}: ");
        assert!(
            err.lines().any(|l| l.contains(&at) && l.contains(rule)),
            "no {rule} at {at} in:\n{err}"
        );
    }
    assert!(err.contains("serve --allow docker-socket"), "{err}");
}

#[test]
fn a_policy_file_with_a_typo_is_a_clear_error() {
    let (code, _, err) = acr_task(&[
        "validate",
        &policy_data("escapes.yaml"),
        "--policy",
        &policy_data("typo.yaml"),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("typo.yaml:2:"), "{err}");
    assert!(err.contains("privilegd"), "{err}");
}

#[test]
fn run_time_failures_are_reported_by_validate() {
    let (code, _, err) = acr_task(&["validate", &policy_data("unknown-flag.yaml")]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown-flag.yaml:2:10: "), "{err}");
    assert!(err.contains("`--frobnicate`"), "{err}");
    let (code, _, err) = acr_task(&["validate", &policy_data("host-path-volume.yaml")]);
    assert_eq!(code, 1);
    assert!(err.contains("host-path-volume.yaml:4:"), "{err}");
    assert!(err.contains("a host path"), "{err}");
}

#[test]
fn invalid_utf8_is_reported_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("acb.yaml");
    std::fs::write(&f, b"steps:\n  - cmd: busybox echo caf\xe9 ok\n").unwrap();
    let (code, _, err) = acr_task(&["validate", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("acb.yaml:2:26: invalid UTF-8 (byte 0xe9)"),
        "{err}"
    );
}

#[test]
fn shell_completions_and_exit_codes() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = acr_task(&["completion", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("credential") && out.contains("timer"),
            "{shell}"
        );
    }
    // The bash script is valid bash.
    let (_, script, _) = acr_task(&["completion", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("acr-task.bash");
    std::fs::write(&f, script).unwrap();
    let ok = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(ok.success());
    // Usage errors exit 2; failures exit 1.
    let (code, _, _) = acr_task(&["run", "--no-such-option"]);
    assert_eq!(code, 2);
    let (code, _, err) = acr_task(&["validate", "/no/such/file.yaml"]);
    assert_eq!(code, 1, "{err}");
    // A format a command cannot give is refused, naming the ones it can.
    let (code, _, err) = acr_task(&["task", "list", "-o", "tsv"]);
    assert_eq!(code, 2);
    assert!(err.contains("use table or json"), "{err}");
    let f = data("valid/fan-out-fan-in.yaml");
    let (code, _, err) = acr_task(&["run", f.to_str().unwrap(), "-o", "tsv"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("tsv") && err.contains("table or json"),
        "{err}"
    );
    let (code, _, err) = acr_task(&["run", f.to_str().unwrap(), "-o", "dot"]);
    assert_eq!(code, 1);
    assert!(err.contains("--dry-run"), "{err}");
}
