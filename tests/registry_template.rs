//! `registry export` / `registry deploy` between two real `acr-task serve --auth` servers,
//! and `registry relocate` deploying an acr-task source's settings before its content.

mod serve_common;

use std::path::Path;

use serde_json::Value;
use serve_common::registry_common::{image_manifest, push_blob, put_manifest};
use serve_common::Serve;

/// `acr-task ARGS` against `s` as its admin (`--server`): (success, stdout, stderr).
fn on(s: &Serve, args: &[&str]) -> (bool, String, String) {
    let out = s
        .cli()
        .args(args)
        .args(["--server", &s.url])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn ok(s: &Serve, args: &[&str]) -> String {
    let (good, out, err) = on(s, args);
    assert!(good, "acr-task {args:?} failed:\n{out}\n{err}");
    out
}

fn export(s: &Serve, file: &Path) -> Value {
    ok(s, &["registry", "export", "--file", file.to_str().unwrap()]);
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// A template without what differs between two registries by nature (each one's own key).
fn comparable(mut v: Value) -> Value {
    v["encryption"]["keyId"] = Value::Null;
    v
}

/// A pull's answer without credentials: 401, or with anonymous pull 404 (no such
/// repository, which the caller may read).
async fn anonymous_ping(s: &Serve) -> u16 {
    reqwest::get(format!("{}/v2/app/none/tags/list", s.url))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A source with every kind of setting: a Standard registry with anonymous pull, a scope
/// map, two tokens (one disabled), a signed webhook with a header, a task with a commit
/// secret, a timer and a secret reference.
fn configure_source(src: &Serve, repo: &serve_common::Repo) {
    ok(
        src,
        &[
            "registry",
            "update",
            "--sku",
            "Standard",
            "--anonymous-pull-enabled",
            "true",
        ],
    );
    ok(
        src,
        &[
            "scope-map",
            "create",
            "ci",
            "--description",
            "CI pushes",
            "--repository",
            "app/*",
            "content/read",
            "content/write",
        ],
    );
    ok(src, &["token", "create", "--scope-map", "ci", "ci"]);
    ok(
        src,
        &[
            "token",
            "create",
            "--scope-map",
            "ci",
            "--no-passwords",
            "--status",
            "disabled",
            "old",
        ],
    );
    ok(
        src,
        &[
            "webhook",
            "create",
            "--uri",
            "https://hooks.example.com/acr",
            "--actions",
            "push,delete",
            "--scope",
            "app/*",
            "--secret",
            "hook-secret-value",
            "--header",
            "X-Api-Key=header-secret-value",
            "ci",
        ],
    );
    ok(
        src,
        &[
            "task",
            "create",
            "build",
            "--cmd",
            "busybox echo hi",
            "--context",
            &repo.url(),
            "--commit-secret",
            "commit-secret-value",
            "--timer",
            "nightly=0 3 * * *",
            "--secret",
            "npm=env:ACR_TASK_SECRET_NPM",
        ],
    );
}

/// A source and a target `serve --auth`, in `dir`.
fn two_servers(dir: &Path) -> (Serve, Serve) {
    let mut both = ["source", "target"].map(|name| {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).unwrap();
        Some(Serve::start_with(&data, 1, &["--auth"]))
    });
    (both[0].take().unwrap(), both[1].take().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_deploys_once_refuses_what_the_target_cannot_hold_and_keeps_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = two_servers(dir.path());
    let repo = serve_common::Repo::new();
    repo.commit(&[("README", "app")], "first");
    configure_source(&src, &repo);
    ok(&dst, &["registry", "update", "--sku", "Basic"]);

    let file = dir.path().join("registry.json");
    let t = export(&src, &file);
    let text = std::fs::read_to_string(&file).unwrap();
    for secret in [
        "hook-secret-value",
        "header-secret-value",
        "commit-secret-value",
    ] {
        assert!(!text.contains(secret), "{secret} in the template:\n{text}");
    }
    assert!(!text.to_lowercase().contains("password"), "{text}");
    assert_eq!(t["tier"], "Standard");
    assert_eq!(t["anonymousPull"], true);
    assert_eq!(t["encryption"]["enabled"], true);
    assert_eq!(t["tokens"].as_array().unwrap().len(), 2, "{t}");
    assert_eq!(t["webhooks"][0]["secret"], "***");
    assert_eq!(t["webhooks"][0]["headers"]["X-Api-Key"], "***");
    assert_eq!(t["tasks"][0]["triggers"]["commit"]["secret"], "***");
    assert_eq!(t["tasks"][0]["secrets"]["npm"], "env:ACR_TASK_SECRET_NPM");
    let before = export(&dst, &dir.path().join("before.json"));
    let tpl = file.to_str().unwrap();

    // The secrets the template cannot hold are asked for, by name; nothing changes.
    let (good, _, err) = on(&dst, &["registry", "deploy", "--template", tpl]);
    assert!(!good);
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains("--set webhooks.ci.secret=VALUE"), "{err}");
    assert!(
        err.contains("--set webhooks.ci.headers.X-Api-Key=VALUE"),
        "{err}"
    );
    assert!(
        err.contains("--set tasks.build.triggers.commit.secret=VALUE"),
        "{err}"
    );
    let secrets = [
        "--set",
        "webhooks.ci.secret=hook-secret-2",
        "--set",
        "webhooks.ci.headers.X-Api-Key=key-2",
        "--set",
        "tasks.build.triggers.commit.secret=commit-secret-2",
    ];
    // A lower tier than the settings need: refused whole, before any change.
    let mut low = vec![
        "registry",
        "deploy",
        "--template",
        tpl,
        "--set",
        "tier=Basic",
    ];
    low.extend(secrets);
    let (good, _, err) = on(&dst, &low);
    assert!(!good);
    assert!(
        err.contains("anonymous pull needs the Standard or Premium tier"),
        "{err}"
    );
    assert_eq!(export(&dst, &dir.path().join("after-refusal.json")), before);
    assert_eq!(anonymous_ping(&dst).await, 401);

    // The dry run lists the differences and changes nothing.
    let mut dry = vec![
        "registry",
        "deploy",
        "--template",
        tpl,
        "--dry-run",
        "-o",
        "json",
    ];
    dry.extend(secrets);
    let plan: Value = serde_json::from_str(&ok(&dst, &dry)).unwrap();
    let changes: Vec<&str> = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    // Both registries run on this machine: the same name, so no name change.
    assert_eq!(before["name"], t["name"]);
    assert_eq!(
        changes,
        [
            "~ registry: tier Basic -> Standard, anonymous pull false -> true",
            "+ scope map ci (1 rule)",
            "+ token ci (scope map ci, enabled, no passwords)",
            "+ token old (scope map ci, disabled, no passwords)",
            "+ webhook ci (push,delete on https://hooks.example.com/acr)",
            "+ task build",
        ],
        "{plan}"
    );
    assert_eq!(export(&dst, &dir.path().join("after-dry-run.json")), before);

    // Deployed: the target reads back as the template, and its settings work.
    let mut deploy = vec!["registry", "deploy", "--template", tpl];
    deploy.extend(secrets);
    let out = ok(&dst, &deploy);
    assert!(out.contains("6 change(s) made"), "{out}");
    let after = export(&dst, &dir.path().join("after.json"));
    assert_eq!(comparable(after), comparable(t.clone()));
    assert_eq!(anonymous_ping(&dst).await, 404, "anonymous pull is on");
    let hooks: Value = serde_json::from_str(&ok(&dst, &["webhook", "list", "-o", "json"])).unwrap();
    assert_eq!(hooks[0]["signed"], true, "{hooks}");
    // A token deployed has no password until one is generated; then it logs in.
    let cred: Value = serde_json::from_str(&ok(
        &dst,
        &["credential", "renew", "--token", "ci", "-o", "json"],
    ))
    .unwrap();
    let password = cred["passwords"][0]["value"].as_str().unwrap().to_string();
    let login = reqwest::Client::new()
        .get(format!(
            "{}/oauth2/token?service=acr-task&scope=repository:app/x:push,pull",
            dst.url
        ))
        .basic_auth("ci", Some(&password))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);

    // Again: nothing to do, and it says so.
    let out = ok(&dst, &["registry", "deploy", "--template", tpl]);
    assert!(
        out.contains("No changes: the registry already matches the template."),
        "{out}"
    );

    // What the target has beyond the template is kept, never deleted.
    ok(
        &dst,
        &[
            "scope-map",
            "create",
            "extra",
            "--repository",
            "other",
            "content/read",
        ],
    );
    let out = ok(&dst, &["registry", "deploy", "--template", tpl]);
    assert!(
        out.contains("= scope map extra (on the target, not in the template: kept)"),
        "{out}"
    );
    assert!(out.contains("No changes"), "{out}");

    // The settings are the registry's: a restarted server still has them.
    let td = dst.data.clone();
    drop(dst);
    let dst = Serve::start_with(&td, 1, &["--auth"]);
    assert_eq!(
        anonymous_ping(&dst).await,
        404,
        "anonymous pull after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relocation_from_an_acr_task_server_deploys_its_settings_before_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = two_servers(dir.path());
    ok(
        &src,
        &[
            "scope-map",
            "create",
            "ci",
            "--repository",
            "app/*",
            "content/read",
        ],
    );
    ok(
        &src,
        &[
            "token",
            "create",
            "--scope-map",
            "ci",
            "--no-passwords",
            "ci",
        ],
    );
    // Content: two tags pushed as the admin (Docker's token flow).
    let token: Value = reqwest::Client::new()
        .get(format!(
            "{}/oauth2/token?service=acr-task&scope=repository:app/web:push,pull",
            src.url
        ))
        .basic_auth("admin", Some(&src.password))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let c = reqwest::Client::builder()
        .default_headers({
            let mut h = reqwest::header::HeaderMap::new();
            h.insert("authorization", bearer.parse().unwrap());
            h
        })
        .build()
        .unwrap();
    let base = src.url.clone();
    for tag in ["v1", "v2"] {
        let config = format!("{{\"tag\":\"{tag}\"}}");
        let cd = push_blob(&c, &base, "app/web", config.as_bytes()).await;
        let ld = push_blob(&c, &base, "app/web", format!("layer {tag}").as_bytes()).await;
        let m = image_manifest((&cd, config.len()), &[(&ld, 8)]);
        let r = put_manifest(
            &c,
            &base,
            "app/web",
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&m).unwrap(),
        )
        .await;
        assert_eq!(r.status(), 201);
    }

    let relocate = |extra: &[&str]| {
        let mut args = vec![
            "registry", "relocate", "--source", &src.addr, "--target", &dst.url, "-o", "json",
        ];
        args.extend(extra);
        let out = dst.cli().args(&args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // The source's settings are its admin's to read: without that login, a clear refusal.
    let (good, _, err) = relocate(&["--username", "ci", "--password=nothing"]);
    assert!(!good);
    assert!(
        err.contains("read by its admin only") && err.contains("--content-only"),
        "{err}"
    );

    let admin = format!("--password={}", src.password);
    let (good, out, err) = relocate(&["--username", "admin", &admin]);
    assert!(good, "{out}\n{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["copied"], 2, "{r}");
    assert!(r["differences"].as_array().unwrap().is_empty(), "{r}");
    let changes = r["settings"]["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c == "+ token ci (scope map ci, enabled, no passwords)"),
        "{r}"
    );
    let tokens: Value = serde_json::from_str(&ok(&dst, &["token", "list", "-o", "json"])).unwrap();
    assert_eq!(tokens[0]["name"], "ci", "{tokens}");

    // Resumed or repeated: neither settings nor content change again.
    let (good, out, err) = relocate(&["--username", "admin", &admin]);
    assert!(good, "{out}\n{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["settings"]["changes"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["alreadyThere"], 2, "{r}");
}
