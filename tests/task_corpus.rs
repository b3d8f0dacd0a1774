//! Data-driven: every file under tests/data/tasks/valid loads and plans with no warning;
//! every file under tests/data/tasks/warn loads (as ACR accepts it) with exactly the
//! warnings in its `.expected` file; every file under tests/data/tasks/invalid fails with
//! exactly the diagnostics in its `.expected` file.
//! Every file under tests/data/tasks/public (real task files) gets acb's verdict.
//! A `NAME.values.yaml` next to `NAME.yaml` supplies `.Values`.
//! Regenerate the expected files after a deliberate message change with
//! `ACR_TASK_UPDATE_EXPECTED=1 cargo test --test task_corpus` (then review the diff).

use std::path::{Path, PathBuf};

use acr_task::plan::Plan;
use acr_task::task::{self, RunInfo, Values};

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

fn task_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".yaml") && !name.ends_with(".values.yaml")
        })
        .collect();
    files.sort();
    files
}

fn values_for(path: &Path) -> Values {
    let v = path.with_extension("values.yaml");
    if v.exists() {
        Values::from_file(&v).unwrap()
    } else {
        Values::default()
    }
}

fn load(path: &Path) -> Result<task::Loaded, task::Diagnostics> {
    load_with(path, &run())
}

fn load_with(path: &Path, info: &RunInfo) -> Result<task::Loaded, task::Diagnostics> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let options = task::LoadOptions {
        alias_dir: path.parent().map(Path::to_path_buf),
        ..task::LoadOptions::default()
    };
    task::load_str_checked(&name, &text, info, &values_for(path), &options, &|_| {
        Vec::new()
    })
}

/// Compares `got` with `path`'s `.expected` file (or writes it when updating).
fn expect(path: &Path, got: &str, failures: &mut Vec<String>) {
    for line in got.lines() {
        let mut parts = line.splitn(4, ':');
        let (_, l, c) = (parts.next(), parts.next(), parts.next());
        let ok = matches!((l.and_then(|l| l.parse::<usize>().ok()), c.and_then(|c| c.parse::<usize>().ok())), (Some(l), Some(c)) if l > 0 && c > 0)
            || line.contains("the task has no steps");
        assert!(ok, "{}: diagnostic without a place: {line}", path.display());
    }
    let expected_path = path.with_extension("expected");
    if std::env::var_os("ACR_TASK_UPDATE_EXPECTED").is_some() {
        std::fs::write(&expected_path, got).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path)
        .unwrap_or_else(|_| panic!("missing {}", expected_path.display()));
    if expected != got {
        failures.push(format!(
            "{}:\n--- expected\n{expected}--- got\n{got}",
            path.display()
        ));
    }
}

#[test]
fn valid_files_load_and_plan() {
    let files = task_files("tests/data/tasks/valid");
    assert!(files.len() >= 25, "corpus shrank: {}", files.len());
    let mut failures = Vec::new();
    for f in &files {
        match load(f) {
            Ok(task::Loaded { warnings, .. }) if !warnings.is_empty() => failures.push(format!(
                "{}: warnings:\n{}",
                f.display(),
                task::Diagnostics(warnings)
            )),
            Ok(task::Loaded { task: t, .. }) => {
                let plan = Plan::new(&t).unwrap();
                assert_eq!(plan.len(), t.steps.len());
                assert!(t
                    .steps
                    .iter()
                    .all(|s| s.kind().is_some() && !s.id.is_empty()));
                // Nothing of the template or alias syntax is left after loading.
                let dump = format!("{t:?}");
                assert!(!dump.contains("{{"), "{}: unrendered template", f.display());
                assert!(
                    !dump.contains("$Registry"),
                    "{}: unexpanded alias",
                    f.display()
                );
            }
            Err(d) => failures.push(format!("{}:\n{d}", f.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "valid files rejected:\n{}",
        failures.join("\n")
    );
}

#[test]
fn files_with_warnings_load_with_exactly_those_warnings() {
    let files = task_files("tests/data/tasks/warn");
    assert!(files.len() >= 8, "corpus shrank: {}", files.len());
    let mut failures = Vec::new();
    for f in &files {
        match load(f) {
            Ok(l) if l.warnings.is_empty() => failures.push(format!("{}: no warning", f.display())),
            Ok(l) => expect(
                f,
                &format!("{}\n", task::Diagnostics(l.warnings)),
                &mut failures,
            ),
            Err(d) => failures.push(format!("{}: refused:\n{d}", f.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_files_give_exact_diagnostics() {
    let files = task_files("tests/data/tasks/invalid");
    assert!(files.len() >= 30, "corpus shrank: {}", files.len());
    let mut failures = Vec::new();
    for f in &files {
        match load(f) {
            Ok(_) => failures.push(format!("{}: accepted", f.display())),
            Err(d) => expect(f, &format!("{d}\n"), &mut failures),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Real task files from public repositories (`tests/data/tasks/public/README.md` says where
/// each comes from): each gets acb's verdict (its `# acb:` line), with the run values the
/// acb probes were run with; every refusal names a line and column.
#[test]
fn public_task_files_get_acbs_verdict() {
    let info = RunInfo {
        id: "cf1".into(),
        registry: "myregistry.azurecr.io".into(),
        registry_name: "myregistry".into(),
        date: "20240102-030405z".into(),
        commit: "0123456789abcdef".into(),
        branch: "main".into(),
        ..run()
    };
    let files = task_files("tests/data/tasks/public");
    assert!(files.len() >= 30, "the public corpus is missing: {files:?}");
    let mut wrong = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let verdict = text
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("# acb: "))
            .unwrap_or_else(|| panic!("{}: no `# acb:` line", path.display()));
        let accepts = verdict.starts_with("accepts");
        let got = load_with(path, &info);
        match (accepts, got) {
            (true, Ok(l)) => {
                if let Err(e) = Plan::new(&l.task) {
                    wrong.push(format!("{}: acb accepts; plan fails: {e}", path.display()));
                }
            }
            (false, Err(d)) => {
                let errors: Vec<_> = d.0.iter().filter(|x| !x.is_warning()).collect();
                if errors.iter().any(|x| x.line == 0) {
                    wrong.push(format!(
                        "{}: an error without a place:\n{d}",
                        path.display()
                    ));
                }
            }
            (true, Err(d)) => {
                wrong.push(format!("{}: acb accepts; we refuse:\n{d}", path.display()))
            }
            (false, Ok(_)) => wrong.push(format!(
                "{}: acb refuses ({verdict}); we accept",
                path.display()
            )),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
