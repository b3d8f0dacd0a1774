//! The registry's management commands against a running `serve`: `token`, `scope-map`,
//! `credential`, `webhook` and `repository` with `--server`, or with the `--data` a server
//! holds (they then go through its API, as the admin), and refused for anyone else.

mod serve_common;

use std::process::Command;

use serde_json::Value;
use serve_common::*;

/// `acr-task ARGS` as `user` (the admin when `None`): (ok, stdout, stderr).
fn acr_as(serve: &Serve, user: Option<(&str, &str)>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(bin());
    let (u, p) = user.unwrap_or(("admin", &serve.password));
    c.env("ACR_TASK_USERNAME", u).env("ACR_TASK_PASSWORD", p);
    let o = c.args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn ok(serve: &Serve, args: &[&str]) -> String {
    let (good, out, err) = acr_as(serve, None, args);
    assert!(good, "acr-task {args:?}: {out}\n{err}");
    out
}

#[test]
fn management_commands_go_through_a_running_server() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 1, &["--auth"]);
    let url = serve.url.clone();
    let data_arg = serve.data.display().to_string();

    ok(
        &serve,
        &[
            "scope-map",
            "create",
            "ci",
            "--repository",
            "app/*",
            "content/read",
            "content/write",
            "--server",
            &url,
        ],
    );
    let out = ok(
        &serve,
        &[
            "token",
            "create",
            "ci",
            "--scope-map",
            "ci",
            "-o",
            "json",
            "--server",
            &serve.addr,
        ],
    );
    let token: Value = serde_json::from_str(&out).unwrap();
    let pw = token["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(token["scopeMap"], "ci");

    // The token works with the docker CLI right away.
    let config = data.path().join("docker-config");
    docker_login(&config, &serve.addr, "ci", &pw);
    let image = format!("{}/app/web:1", serve.addr);
    make_busybox_image(&image, "managed");
    let push = Command::new("docker")
        .env("DOCKER_CONFIG", &config)
        .args(["push", &image])
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );

    // Without --server, the --data a server holds is managed through that server: a
    // token that is not the admin is refused there (the files would not ask).
    let ci = Some(("ci", pw.as_str()));
    let (good, _, err) = acr_as(&serve, ci, &["token", "list", "--data", &data_arg]);
    assert!(!good && err.contains("needs the admin user"), "{err}");
    let out = ok(
        &serve,
        &["token", "list", "-o", "json", "--data", &data_arg],
    );
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "ci", "{list}");

    // Passwords renewed through the server come back in the JSON, once.
    let out = ok(
        &serve,
        &[
            "credential",
            "renew",
            "--token",
            "ci",
            "--password2",
            "-o",
            "json",
            "--server",
            &url,
        ],
    );
    let renewed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(renewed["passwords"][0]["name"], "password2");
    assert!(renewed["passwords"][0]["value"].as_str().unwrap().len() > 20);

    // Webhooks too.
    ok(
        &serve,
        &[
            "webhook",
            "create",
            "hook",
            "--uri",
            "https://hooks.example.com/x",
            "--actions",
            "push",
            "--server",
            &url,
        ],
    );
    let out = ok(&serve, &["webhook", "list", "-o", "json", "--server", &url]);
    let hooks: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(hooks[0]["name"], "hook");
    ok(
        &serve,
        &["webhook", "delete", "hook", "--yes", "--server", &url],
    );

    // Repositories: through the server's registry API, as the admin; the token may read
    // but not delete.
    let out = ok(
        &serve,
        &[
            "repository",
            "show-tags",
            "app/web",
            "-o",
            "json",
            "--data",
            &data_arg,
        ],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        serde_json::json!(["1"])
    );
    let (good, _, err) = acr_as(
        &serve,
        ci,
        &[
            "repository",
            "delete",
            "--image",
            "app/web:1",
            "--yes",
            "--server",
            &url,
        ],
    );
    assert!(!good && err.to_lowercase().contains("denied"), "{err}");
    ok(
        &serve,
        &[
            "repository",
            "delete",
            "--image",
            "app/web:1",
            "--yes",
            "--server",
            &url,
        ],
    );
    let out = ok(
        &serve,
        &[
            "repository",
            "show-tags",
            "app/web",
            "-o",
            "json",
            "--server",
            &url,
        ],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        serde_json::json!([])
    );

    // Maintenance too: gc and fsck run in the server; only the admin may ask.
    let (good, _, err) = acr_as(&serve, ci, &["registry", "gc", "--server", &url]);
    assert!(!good && err.contains("admin"), "{err}");
    let out = ok(
        &serve,
        &[
            "registry", "gc", "--grace", "0", "-o", "json", "--data", &data_arg,
        ],
    );
    let gc: Value = serde_json::from_str(&out).unwrap();
    assert!(!gc["blobs"].as_array().unwrap().is_empty(), "{gc}");
    let out = ok(&serve, &["registry", "fsck", "--server", &url]);
    assert!(out.contains("clean"), "{out}");

    let (good, _, err) = acr_as(&serve, None, &["token", "delete", "ci", "--server", &url]);
    assert!(!good && err.contains("--yes"), "{err}");
    ok(
        &serve,
        &["token", "delete", "ci", "--yes", "--server", &url],
    );
    let (good, _, err) = acr_as(&serve, None, &["token", "show", "ci", "--server", &url]);
    assert!(
        !good && err.contains("not found") && !err.contains('{'),
        "{err}"
    );
}

#[test]
fn the_tier_is_managed_through_a_running_server_and_enforced_there() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 3, &["--auth"]);
    let data_arg = serve.data.display().to_string();
    // Through the server that holds --data: the change applies to it at once.
    let out = ok(
        &serve,
        &[
            "registry", "update", "--sku", "Basic", "-o", "json", "--data", &data_arg,
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sku"], "Basic");
    assert_eq!(v["loginServer"], serve.addr.as_str());
    let out = ok(
        &serve,
        &[
            "registry",
            "show-usage",
            "-o",
            "json",
            "--server",
            &serve.url,
        ],
    );
    let usage: Value = serde_json::from_str(&out).unwrap();
    let runs = usage["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "ConcurrentRuns")
        .cloned()
        .unwrap_or_else(|| panic!("no ConcurrentRuns in {usage}"));
    assert_eq!(runs["limit"], 3, "the server's --concurrency");
    for name in ["a", "b", "c"] {
        let (good, _, err) = acr_as(
            &serve,
            None,
            &[
                "webhook",
                "create",
                name,
                "--uri",
                "https://hooks.example.com/x",
                "--actions",
                "push",
                "--server",
                &serve.url,
            ],
        );
        assert_eq!(good, name != "c", "{name}: {err}");
        if name == "c" {
            assert!(err.contains("Basic tier allows 2 webhooks"), "{err}");
        }
    }
    // Only the admin changes the tier.
    let (good, _, err) = acr_as(
        &serve,
        Some(("nobody", "wrong")),
        &[
            "registry", "update", "--sku", "Premium", "--server", &serve.url,
        ],
    );
    assert!(!good, "{err}");
}
