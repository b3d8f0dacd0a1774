//! A git context over HTTPS, as from GitHub: a real smart-HTTP git server (`git
//! http-backend` behind our TLS listener, certificate from the test CA) and
//! `acr-task run --context https://...#branch`. The CA is trusted through OpenSSL's
//! `SSL_CERT_FILE`, as on any machine with a private CA; without it the run fails and
//! says why.

mod support;

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use support::*;

fn tls(name: &str) -> PathBuf {
    root().join("tests/data/tls").join(name)
}

/// Runs `git http-backend` as a CGI program for one request.
async fn cgi(root: PathBuf, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    use tokio::io::AsyncWriteExt;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env("REQUEST_METHOD", method.as_str())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&body).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let raw = out.stdout;
    let (head_end, sep) = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (i, 4),
        None => (raw.windows(2).position(|w| w == b"\n\n").unwrap(), 2),
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let mut status = StatusCode::OK;
    let mut resp_headers = HeaderMap::new();
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            status = v[..3]
                .parse::<u16>()
                .map(|c| StatusCode::from_u16(c).unwrap())
                .unwrap();
        } else {
            resp_headers.insert(
                axum::http::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
    }
    (status, resp_headers, raw[head_end + sep..].to_vec()).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_context_over_https_with_a_private_ca() {
    let root_dir = tempfile::tempdir().unwrap();
    let app_dir = root_dir.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    let (commit, branch) = git_repo(
        &app_dir,
        &[
            (
                "acb.yaml",
                "steps:\n  - id: show\n    cmd: busybox sh -c \"echo commit={{.Run.Commit}}; cat /workspace/file.txt\"\n",
            ),
            ("file.txt", "from-https-git\n"),
        ],
    );
    let project_root = root_dir.path().to_path_buf();
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            cgi(project_root.clone(), method, uri, headers, body)
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg =
        acr_task::listen::TlsConfig::load(&tls("server.pem"), &tls("server-key.pem")).unwrap();
    tokio::spawn(acr_task::listen::serve(
        listener,
        app,
        Some(cfg),
        std::future::pending(),
    ));
    let url = format!("https://{addr}/app/.git#{branch}");
    let ca = tls("ca.pem");
    let (run, untrusted) = tokio::task::spawn_blocking(move || {
        let trusted = run_task_env(
            Path::new("acb.yaml"),
            &["--context", &url],
            &[("SSL_CERT_FILE", &ca)],
            true,
        );
        let untrusted = std::process::Command::new(bin())
            .args(["run", "acb.yaml", "--context", &url])
            .output()
            .unwrap();
        (trusted, untrusted)
    })
    .await
    .unwrap();
    assert_eq!(run.status(), "Succeeded", "{}", run.stderr());
    assert!(run.logged("show", "from-https-git"), "{}", run.stderr());
    assert!(
        run.logged("show", &format!("commit={commit}")),
        "{}",
        run.stderr()
    );
    assert!(!untrusted.status.success());
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        err.contains(&format!("https://{addr}/app/.git")) && err.contains("certificate"),
        "{err}"
    );
}
