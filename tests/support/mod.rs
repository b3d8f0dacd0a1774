//! Helpers for tests that drive the `acr-task` binary against the real Docker Engine.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[path = "../registry_common/mod.rs"]
mod registry_common;
#[allow(unused_imports)]
pub use registry_common::{remove_images_of, require_docker, spawn_server};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_acr-task")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Run {
    pub output: Output,
    pub report: Value,
}

impl Run {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn run_id(&self) -> String {
        self.report["runId"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    pub fn step(&self, id: &str) -> &Value {
        self.report["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["id"] == id))
            .unwrap_or_else(|| panic!("no step {id} in {}", self.report))
    }
    /// Whether step `id` logged a line equal to `text` (the prefix is padded to align ids).
    pub fn logged(&self, id: &str, text: &str) -> bool {
        self.stderr().lines().any(|l| {
            l.split_once(" | ")
                .map(|(p, rest)| p.trim_end() == id && rest == text)
                .unwrap_or(false)
        })
    }
    pub fn status(&self) -> &str {
        self.report["status"].as_str().unwrap_or_default()
    }
}

/// `acr-task run FILE --output json` with a private data dir; parses the report.
pub fn run_task(file: &Path, extra: &[&str]) -> Run {
    run_task_with(file, extra, true)
}

/// `run_task`, optionally without the check that nothing of the run is left behind.
pub fn run_task_with(file: &Path, extra: &[&str], check_orphans: bool) -> Run {
    run_task_env(file, extra, &[], check_orphans)
}

/// `run_task_with`, with these environment variables set for `acr-task`.
pub fn run_task_env(
    file: &Path,
    extra: &[&str],
    env: &[(&str, &Path)],
    check_orphans: bool,
) -> Run {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(bin())
        .arg("run")
        .arg(file)
        .args(["--output", "json", "--data"])
        .arg(data.path())
        .args(extra)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .expect("running acr-task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    // Images pushed to the run's own registry (gone with its temp data dir) are untagged
    // from the engine, so suites do not pile them up.
    let registries: std::collections::BTreeSet<String> = report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["pushed"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| {
            p["image"]
                .as_str()
                .and_then(|i| i.split_once('/'))
                .map(|(h, _)| h.to_string())
        })
        .filter(|h| h.starts_with("127.0.0.1:"))
        .collect();
    for r in registries {
        remove_images_of(&r);
    }
    let run = Run { output, report };
    if check_orphans {
        assert_no_orphans(&run.run_id());
    }
    run
}

fn docker_lines(args: &[&str]) -> Vec<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Every container, network and volume of a run is gone after it ends.
pub fn assert_no_orphans(run_id: &str) {
    assert!(!run_id.is_empty());
    let label = format!("label=io.acr-task.run={run_id}");
    let containers = docker_lines(&["ps", "-a", "-q", "--filter", &label]);
    let networks = docker_lines(&["network", "ls", "-q", "--filter", &label]);
    let volumes = docker_lines(&["volume", "ls", "-q", "--filter", &label]);
    assert!(
        containers.is_empty() && networks.is_empty() && volumes.is_empty(),
        "run {run_id} left containers {containers:?}, networks {networks:?}, volumes {volumes:?}"
    );
    let named = docker_lines(&[
        "ps",
        "-a",
        "--format",
        "{{.Names}}",
        "--filter",
        &format!("name={run_id}_"),
    ]);
    assert!(named.is_empty(), "run {run_id} left containers {named:?}");
}

pub fn data(rel: &str) -> PathBuf {
    root().join("tests/data/run").join(rel)
}

/// A git repository in `dir` with `files` committed once; its (commit, branch).
pub fn git_repo(dir: &Path, files: &[(&str, &str)]) -> (String, String) {
    let repo = git2::Repository::init(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let mut idx = repo.index().unwrap();
    idx.add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("t", "t@example.com").unwrap();
    let commit = repo
        .commit(Some("HEAD"), &sig, &sig, "first", &tree, &[])
        .unwrap();
    let branch = repo.head().unwrap().shorthand().unwrap().to_string();
    (commit.to_string(), branch)
}
