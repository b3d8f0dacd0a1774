//! Real clients through the auth gate: `docker login` then push/pull via the Docker
//! Engine against `acr-task serve --auth`, with identities made by the CLI. Fails (not
//! skips) when docker or the engine is missing.

mod registry_common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use registry_common::*;

fn acr(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap()
}

fn acr_ok(data: &Path, args: &[&str]) -> Output {
    let o = acr(data, args);
    assert!(
        o.status.success(),
        "acr-task {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `token create` with JSON output: returns password1 (inside the JSON, as az gives it).
fn create_token(data: &Path, name: &str, map: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", name, "--scope-map", map, "-o", "json"];
    args.extend_from_slice(extra);
    let o = acr_ok(data, &args);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["name"], name);
    let pass = json["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no password in {json}"))
        .to_string();
    assert_eq!(json["credentials"]["passwords"][0]["name"], "password1");
    assert!(!String::from_utf8_lossy(&o.stderr).contains(&pass));
    pass
}

fn serve(data: &Path) -> (Child, String) {
    spawn_serve(&["--registry-only", "--auth"], data)
}

/// docker with its own config dir, so logins never touch the user's ~/.docker.
struct Docker {
    config: tempfile::TempDir,
}

impl Docker {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_CONFIG", self.config.path()).args(args);
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        run(&mut self.cmd(args))
    }
    /// Run and expect failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.cmd(args).output().unwrap();
        assert!(
            !o.status.success(),
            "docker {args:?} should have failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }
    fn login(&self, addr: &str, user: &str, pass: &str) -> Output {
        let mut c = self.cmd(&["login", addr, "-u", user, "--password-stdin"]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(pass.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }
}

#[test]
fn docker_login_push_pull_with_scoped_tokens() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    acr_ok(
        data,
        &[
            "scope-map",
            "create",
            "rw",
            "--repository",
            "demo/*",
            "content/read",
            "content/write",
        ],
    );
    acr_ok(
        data,
        &[
            "scope-map",
            "create",
            "ro",
            "--repository",
            "demo/app",
            "content/read",
        ],
    );
    acr_ok(
        data,
        &[
            "scope-map",
            "create",
            "others",
            "--repository",
            "other/*",
            "content/read",
            "content/write",
        ],
    );
    let pusher = create_token(data, "pusher", "rw", &[]);
    let reader = create_token(data, "reader", "ro", &[]);
    let other = create_token(data, "other", "others", &[]);
    let expired = create_token(
        data,
        "expired",
        "rw",
        &["--expiration", "2020-01-01T00:00:00Z"],
    );
    // Listing never shows secrets.
    let list = acr_ok(data, &["token", "list", "-o", "json"]).stdout;
    let list = String::from_utf8_lossy(&list);
    for p in [&pusher, &reader, &other] {
        assert!(!list.contains(p.as_str()));
    }
    assert!(!list.contains("argon2"));

    let (server, addr) = serve(data);
    let _server = Server(server);
    let docker = Docker {
        config: tempfile::tempdir().unwrap(),
    };
    let image = format!("{addr}/demo/app:{suffix}");
    let marker = format!("marker-{suffix}");
    make_busybox_image(&image, &marker);

    // Without login, push is refused.
    let err = docker.fails(&["push", &image]);
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );

    // The read-write token pushes, and what it pushed pulls back.
    let o = docker.login(&addr, "pusher", &pusher);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pushed = docker.ok(&["push", &image]);
    assert!(pushed.contains("digest: sha256:"), "{pushed}");
    docker.ok(&["rmi", &image]);
    docker.ok(&["pull", &image]);
    assert_eq!(docker.ok(&["run", "--rm", &image]), marker);

    // A pull-only token pulls but cannot push: DENIED.
    let o = docker.login(&addr, "reader", &reader);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    docker.ok(&["rmi", &image]);
    docker.ok(&["pull", &image]);
    let v2 = format!("{addr}/demo/app:{suffix}-v2");
    docker.ok(&["tag", &image, &v2]);
    let err = docker.fails(&["push", &v2]);
    assert!(err.contains("denied"), "{err}");

    // A token for other/* never opens demo/app.
    let o = docker.login(&addr, "other", &other);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    docker.ok(&["rmi", &image]);
    let err = docker.fails(&["pull", &image]);
    assert!(
        err.contains("denied") || err.contains("unauthorized"),
        "{err}"
    );
    let err = docker.fails(&["push", &v2]);
    assert!(err.contains("denied"), "{err}");

    // Expired tokens, wrong passwords and disabled tokens cannot log in.
    docker.ok(&["logout", &addr]);
    assert!(!docker.login(&addr, "expired", &expired).status.success());
    assert!(!docker
        .login(&addr, "pusher", "wrong-password")
        .status
        .success());
    acr_ok(data, &["token", "update", "pusher", "--status", "disabled"]);
    assert!(!docker.login(&addr, "pusher", &pusher).status.success());

    // The admin user: off by default, enabled by `credential renew --admin`.
    let o = acr_ok(data, &["credential", "renew", "--admin"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let admin = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("admin")
                .map(|r| r.split_whitespace().last().unwrap_or(""))
        })
        .filter(|p| p.len() == 43)
        .unwrap_or_else(|| panic!("no admin password in {out}"))
        .to_string();
    let o = docker.login(&addr, "admin", &admin);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    docker.ok(&["push", &v2]);
    docker.ok(&["logout", &addr]);

    // `image` was removed before the refused pull; only the v2 tag is left.
    docker.ok(&["rmi", &v2]);
}

/// Stops the server when the test ends, pass or fail.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `repository --registry` against an auth registry takes its credentials the way the
/// docker CLI does: here from a credential helper (`credHelpers` in config.json runs
/// `docker-credential-<name> get`), and with none it is refused.
#[test]
fn registry_client_uses_docker_credential_helpers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("reg");
    acr_ok(
        &data,
        &[
            "scope-map",
            "create",
            "lister",
            "--repository",
            "*",
            "metadata/read",
            "content/read",
        ],
    );
    let pass = create_token(&data, "lister", "lister", &[]);
    let (mut child, addr) = serve(&data);
    // A helper that knows one server, as docker-credential-pass and friends do.
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let helper = bin_dir.join("docker-credential-acrtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\n[ \"$server\" = \"{addr}\" ] || {{ echo 'credentials not found' >&2; exit 1; }}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"lister\",\"Secret\":\"{pass}\"}}' \"$server\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("docker");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("config.json"),
        format!(r#"{{"credHelpers":{{"{addr}":"acrtest"}}}}"#),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let list = |config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_acr-task"))
            .args(["repository", "list", "--registry", &addr, "-o", "json"])
            .env("DOCKER_CONFIG", config)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let o = list(&config);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let repos: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(repos.is_array(), "{repos}");
    // No helper, no credentials: the anonymous token request is refused.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = list(&empty);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
}
