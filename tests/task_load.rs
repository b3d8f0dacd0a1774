//! What loading a task file produces: defaults, generated ids, aliases, templates, values.

use std::path::Path;

use acr_task::plan::Plan;
use acr_task::task::{self, RunInfo, StepKind, Values, DEFAULT_STEP_TIMEOUT};

fn run() -> RunInfo {
    RunInfo {
        id: "ca1".into(),
        registry: "127.0.0.1:5000".into(),
        registry_name: "127.0.0.1".into(),
        date: "20261126-040000z".into(),
        os: "linux".into(),
        architecture: "amd64".into(),
        commit: "abc123".into(),
        branch: "main".into(),
        task_name: "corpus".into(),
        shared_volume: "acb_shared_volume".into(),
    }
}

fn valid(name: &str) -> task::Task {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tasks");
    // Files that load with warnings live in `warn/`.
    let path = Some(dir.join("valid").join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| dir.join("warn").join(name));
    let values_path = path.with_extension("values.yaml");
    let values = if values_path.exists() {
        Values::from_file(&values_path).unwrap()
    } else {
        Values::default()
    };
    task::load_file(&path, &run(), &values).unwrap()
}

#[test]
fn defaults_and_generated_ids() {
    let t = valid("minimal.yaml");
    assert_eq!(t.version, "v1.0.0");
    assert_eq!(t.step_timeout, DEFAULT_STEP_TIMEOUT);
    assert_eq!(t.total_timeout, 3600);
    assert_eq!(t.steps[0].id, "acb_step_0");
    assert_eq!(t.steps[0].effective_timeout(&t), 600);
    assert_eq!(t.steps[0].retry_delay, task::DEFAULT_RETRY_DELAY);
    assert_eq!(t.steps[0].kind(), Some(StepKind::Cmd("busybox echo hello")));

    let t = valid("generated-ids.yaml");
    let ids: Vec<&str> = t.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["acb_step_0", "named", "acb_step_2"]);
    let p = Plan::new(&t).unwrap();
    assert_eq!(p.deps(2), &[0, 1]);
}

#[test]
fn build_push_run_expands_builtin_aliases_and_runs_in_sequence() {
    let t = valid("build-push-run.yaml");
    assert_eq!(
        t.steps[0].build.as_deref(),
        Some("-t 127.0.0.1:5000/hello-world:ca1 .")
    );
    assert_eq!(
        t.steps[1].push.as_deref(),
        Some(&["127.0.0.1:5000/hello-world:ca1".to_string()][..])
    );
    assert_eq!(
        t.steps[2].cmd.as_deref(),
        Some("127.0.0.1:5000/hello-world:ca1")
    );
    let p = Plan::new(&t).unwrap();
    assert_eq!(p.levels().len(), 3);
}

#[test]
fn user_aliases_escape_and_image_alias_without_directive() {
    let t = valid("aliases.yaml");
    assert_eq!(
        t.steps[0].build.as_deref(),
        Some("-t 127.0.0.1:5000/team/api:ca1 -t 127.0.0.1:5000/team/api:main-abc123 .")
    );
    assert_eq!(
        t.steps[1].cmd.as_deref(),
        Some("busybox:stable echo built team/api on linux/amd64 at 20261126-040000z for corpus")
    );
    assert_eq!(
        t.steps[2].cmd.as_deref(),
        Some("busybox:stable echo the image alias also applies without the directive")
    );
    assert_eq!(
        t.steps[3].cmd.as_deref(),
        Some("busybox sh -c 'echo $HOME $UNKNOWNALIAS'")
    );
    let alias = t.alias.unwrap();
    assert_eq!(alias.values["repo"], "team/api");
}

#[test]
fn custom_directive() {
    let t = valid("custom-directive.yaml");
    assert_eq!(
        t.steps[0].cmd.as_deref(),
        Some("busybox sh -c \"echo hello from ca1; echo $HOME; echo &\"")
    );
    assert_eq!(t.alias.unwrap().directive.as_deref(), Some("&"));
}

#[test]
fn templates_with_values_file() {
    let t = valid("templated-tags.yaml");
    assert_eq!(
        t.steps[0].build.as_deref(),
        Some("-t 127.0.0.1:5000/team/web:1.4.2 -t 127.0.0.1:5000/team/web:ca1 --build-arg VERSION=1.4.2 .")
    );
    let t = valid("conditionals.yaml");
    let ids: Vec<&str> = t.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "build",
            "push",
            "notify",
            "test-unit",
            "test-integration",
            "test-e2e"
        ]
    );
    assert_eq!(
        t.steps[2].cmd.as_deref(),
        Some("busybox echo deployed to STAGING")
    );
    let t = valid("sprig-funcs.yaml");
    assert_eq!(t.steps[0].id, "web");
    assert_eq!(
        t.steps[0].cmd.as_deref(),
        Some("busybox echo \"WEB-SVC\" fallback Web_SVC Web-SVC-007")
    );
    assert_eq!(t.steps[0].timeout, Some(90));
}

#[test]
fn set_overrides_values_file() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tasks/valid/conditionals.yaml");
    let mut values = Values::from_file(&path.with_extension("values.yaml")).unwrap();
    values.set("deploy=false").unwrap();
    let t = task::load_file(&path, &run(), &values).unwrap();
    let ids: Vec<&str> = t.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["build", "test-unit", "test-integration", "test-e2e"]);
}

#[test]
fn every_field_is_read() {
    let t = valid("every-field.yaml");
    assert_eq!(t.step_timeout, 900);
    assert_eq!(t.total_timeout, 7200);
    assert_eq!(t.working_directory.as_deref(), Some("/workspace/src"));
    assert_eq!(
        t.secrets[0].client_id.as_deref(),
        Some("6cb9b7f6-d9d0-4a37-8e2b-8a6e3d3c3c3c")
    );
    assert!(t.networks[0].is_default);
    assert_eq!(t.volumes[0].secret["settings.json"], "eyJhIjogMX0=");
    let b = &t.steps[0];
    assert_eq!((b.timeout, b.retries, b.retry_delay), (Some(1200), 2, 10));
    assert_eq!((b.cmd_download_retries, b.cmd_download_retry_delay), (3, 5));
    assert_eq!(b.cache.as_deref(), Some("enabled"));
    let s = &t.steps[1];
    assert!(s.detach && s.disable_working_directory_override);
    assert_eq!(s.entry_point.as_deref(), Some("/bin/sh"));
    assert_eq!(s.ports, ["8080:80"]);
    assert_eq!(s.user.as_deref(), Some("1000"));
    assert_eq!(s.start_delay, 2);
    assert_eq!(s.volume_mounts[0].mount_path, "/etc/app");
    let p = &t.steps[2];
    assert_eq!((p.repeat, p.ignore_errors), (2, true));
    assert_eq!(p.exited_with, [0, 1]);
    assert_eq!(p.exited_without, [137]);
    assert_eq!(t.steps[3].push.as_ref().unwrap().len(), 2);
}

#[test]
fn plan_shapes() {
    let t = valid("fan-out-fan-in.yaml");
    let p = Plan::new(&t).unwrap();
    let level_ids: Vec<Vec<&str>> = p
        .levels()
        .iter()
        .map(|l| l.iter().map(|&i| t.steps[i].id.as_str()).collect())
        .collect();
    assert_eq!(
        level_ids,
        vec![
            vec!["checkout"],
            vec!["lint", "unit", "build-amd64", "build-arm64"],
            vec!["gate"],
            vec!["push"]
        ]
    );
    let t = valid("forward-reference.yaml");
    let p = Plan::new(&t).unwrap();
    assert_eq!(p.topo_order(), &[1, 0]);
    let t = valid("detached-services.yaml");
    let p = Plan::new(&t).unwrap();
    assert_eq!(p.roots(), vec![0, 1]);
    assert_eq!(p.deps(2), &[0, 1]);
}

#[test]
fn template_error_lines_survive_line_changing_templates() {
    // `{{range}}` adds lines before the bad `when`; the diagnostic still names line 9.
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tasks/invalid/templated-error-line.yaml");
    let values = Values::from_file(&path.with_extension("values.yaml")).unwrap();
    let e = task::load_file(&path, &run(), &values).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!((e.0[0].line, e.0[0].column), (9, 41));
}

#[test]
fn alias_files_merge_under_values() {
    let t = valid("alias-files.yaml");
    assert_eq!(
        t.steps[0].cmd.as_deref(),
        Some("busybox:stable echo platform builds team/api")
    );
    assert_eq!(
        t.steps[1].cmd.as_deref(),
        Some("busybox:stable echo image alias from a file")
    );
}
