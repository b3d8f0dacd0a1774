//! OCI artifacts beside images: a Helm chart (Helm's config and layer media types) and a
//! generic artifact, pushed and pulled by the ORAS Python client (oras-py from PyPI, which
//! `make setup` installs in `.venv`), read back by skopeo, and listed by `repository
//! show-manifests` with their artifact types.

mod registry_common;

use std::path::PathBuf;
use std::process::Command;

use registry_common::{cli_ok, spawn_server};
use serde_json::Value;

const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
const THING_CONFIG: &str = "application/vnd.example.thing.config.v1+json";

/// The virtual environment's Python with oras-py: missing is a failure, not a skip.
fn python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import oras"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} with oras-py is required by this test: run `make setup`",
        py.display()
    );
    py
}

fn m_digest(body: &[u8]) -> String {
    registry_common::digest(body)
}

#[test]
fn helm_charts_and_generic_artifacts_go_through_oras_and_list_with_their_types() {
    let py = python();
    registry_common::require_tool("skopeo", "apt-get install -y skopeo");
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (mut server, addr) = spawn_server(data.path());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/oras/artifacts.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&addr)
        .arg(work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oras-py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["chart"]["same"], true, "{got}");
    assert_eq!(got["chart"]["configMediaType"], HELM_CONFIG, "{got}");
    assert_eq!(got["thing"]["same"], true, "{got}");
    assert_eq!(got["thing"]["configMediaType"], THING_CONFIG, "{got}");

    // skopeo reads the chart's manifest as pushed.
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{addr}/charts/hello:0.1.0"))
        .output()
        .unwrap();
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let m: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(m["config"]["mediaType"], HELM_CONFIG);
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    );

    // Listed with their artifact types, over the API and on the files.
    let over_api = |repo: &str| -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
            .args([
                "repository",
                "show-manifests",
                repo,
                "--registry",
                &addr,
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(over_api("charts/hello")[0]["artifactType"], HELM_CONFIG);
    assert_eq!(over_api("things/notes")[0]["artifactType"], THING_CONFIG);
    let _ = server.kill();
    let _ = server.wait();
    let table = cli_ok(
        data.path(),
        &["repository", "show-manifests", "charts/hello", "-o", "tsv"],
    );
    assert!(
        table.contains(HELM_CONFIG) && table.contains("0.1.0"),
        "{table}"
    );
    // The chart's name and version, from its config.
    let args = [
        "repository",
        "show",
        "--name",
        "charts/hello",
        "--image",
        "charts/hello:0.1.0",
        "-o",
        "json",
    ];
    let shown: Value = serde_json::from_str(&cli_ok(data.path(), &args)).unwrap();
    assert_eq!(shown["chart"]["name"], "hello", "{shown}");
    assert_eq!(shown["chart"]["version"], "0.1.0", "{shown}");
    assert_eq!(shown["chart"]["appVersion"], "1.16.0", "{shown}");
    assert_eq!(shown["artifactType"], HELM_CONFIG, "{shown}");
    assert_eq!(shown["digest"], m_digest(&raw.stdout), "{shown}");
    assert_eq!(
        shown["changeableAttributes"]["writeEnabled"], true,
        "{shown}"
    );
}
