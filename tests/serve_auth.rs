//! `acr-task serve --auth`: the management API needs the admin (or a managing token);
//! commit webhooks stay reachable (their signatures are their authentication).

use std::process::Command;

#[path = "registry_common/mod.rs"]
mod registry_common;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_acr-task")
}

/// `credential renew --admin -o json` returns the generated password once, in the JSON.
fn admin_password(registry_dir: &std::path::Path) -> String {
    let out = Command::new(bin())
        .args(["credential", "renew", "--admin", "-o", "json", "--data"])
        .arg(registry_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["username"], "admin");
    v["passwords"][0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no password in {v}"))
        .to_string()
}

#[test]
fn management_api_needs_credentials_when_auth_is_on() {
    let data = tempfile::tempdir().unwrap();
    let password = admin_password(data.path());
    let (mut child, addr) = registry_common::spawn_serve(&["--auth"], data.path());
    let server = format!("http://{addr}");
    let list = |creds: Option<(&str, &str)>| {
        let mut cmd = Command::new(bin());
        cmd.args(["task", "list", "--server", &server])
            .env_remove("ACR_TASK_USERNAME")
            .env_remove("ACR_TASK_PASSWORD");
        if let Some((u, p)) = creds {
            cmd.env("ACR_TASK_USERNAME", u).env("ACR_TASK_PASSWORD", p);
        }
        cmd.output().unwrap()
    };
    let anonymous = list(None);
    let wrong = list(Some(("admin", "not-the-password")));
    let admin = list(Some(("admin", &password)));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (health, hook) = rt.block_on(async {
        let c = reqwest::Client::new();
        let health = c
            .get(format!("{server}/api/health"))
            .send()
            .await
            .unwrap()
            .status();
        let hook = c
            .post(format!("{server}/api/webhooks/github/no-such-task"))
            .body("{}")
            .send()
            .await
            .unwrap()
            .status();
        (health, hook)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !anonymous.status.success(),
        "anonymous task list must be refused"
    );
    assert!(!wrong.status.success(), "a wrong password must be refused");
    assert!(
        admin.status.success(),
        "admin: {}",
        String::from_utf8_lossy(&admin.stderr)
    );
    assert_eq!(health, 200);
    assert_ne!(
        hook, 401,
        "commit webhooks authenticate by signature, not by login"
    );
    assert!(!String::from_utf8_lossy(&admin.stdout).contains(&password));
}
