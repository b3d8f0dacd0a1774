//! Git commit triggers: signed webhooks (GitHub, GitLab, Gitea) against a real git
//! repository, building exactly the pushed commit; refused deliveries queue nothing.

mod serve_common;

use std::time::Duration;

use serde_json::{json, Value};
use serve_common::*;

async fn deliver(api: &Api, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
    let mut req = api
        .http
        .post(format!("{}{path}", api.base))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn push_body(reference: &str, after: &str) -> Vec<u8> {
    // Shaped like GitHub's push payload (the fields the trigger reads, plus some noise).
    serde_json::to_vec(&json!({
        "ref": reference,
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "repository": {"full_name": "me/app"},
        "pusher": {"name": "me"},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_push_builds_that_commit_and_bad_deliveries_queue_nothing() {
    require_docker();
    let repo = Repo::new();
    let acb = std::fs::read_to_string(data_file("git-acb.yaml")).unwrap();
    let c1 = repo.commit(
        &[("acb.yaml", &acb), ("version.txt", "version-one\n")],
        "one",
    );
    let c2 = repo.commit(&[("version.txt", "version-two\n")], "two");
    let c3 = repo.commit(&[("version.txt", "version-three\n")], "three");
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 2);
    let api = serve.client();
    let secret = "It's a Secret to Everybody";
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "app", "context": repo.url(), "branch": "main",
                    "triggers": {"commit": {"secret": secret}}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let hook = "/api/webhooks/github/app";

    // The older commit, not the branch tip: the run must build exactly it.
    let body = push_body("refs/heads/main", &c1);
    let sig = github_signature(secret, &body);
    let gh = |delivery: &str| {
        vec![
            ("x-github-event", "push".to_string()),
            ("x-github-delivery", delivery.to_string()),
            ("x-hub-signature-256", sig.clone()),
        ]
    };
    let (st, v) = deliver(&api, hook, &gh("d-1"), &body).await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["queued"], true);
    let id = v["run"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["run"]["trigger"]["kind"], "commit");
    assert_eq!(v["run"]["trigger"]["commit"], c1.as_str());

    // Replay of the same delivery: 200, nothing queued.
    let (st, v) = deliver(&api, hook, &gh("d-1"), &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["queued"], false);
    // The attack: the same signed payload under a fresh (unsigned) delivery id.
    let (st, v) = deliver(&api, hook, &gh("d-replayed"), &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["queued"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("payload"), "{v}");
    // Another signed payload for the same commit (a redelivery): the commit is known.
    let mut again = body.clone();
    again.extend_from_slice(b"\n");
    let mut h = gh("d-again");
    h[2].1 = github_signature(secret, &again);
    let (st, v) = deliver(&api, hook, &h, &again).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["queued"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("commit"), "{v}");
    // Wrong signature, no signature: 401.
    let mut wrong = gh("d-2");
    wrong[2].1 = github_signature("not the secret", &body);
    let (st, _) = deliver(&api, hook, &wrong, &body).await;
    assert_eq!(st, 401);
    let (st, v) = deliver(&api, hook, &gh("d-3")[..2], &body).await;
    assert_eq!(st, 401, "{v}");
    // Tampered body under the original signature: 401.
    let tampered = push_body("refs/heads/main", &c2);
    let (st, _) = deliver(&api, hook, &gh("d-4"), &tampered).await;
    assert_eq!(st, 401);
    // Correctly signed but malformed: 400 with the reason.
    let junk = b"{\"ref\": 42}".to_vec();
    let mut h = gh("d-5");
    h[2].1 = github_signature(secret, &junk);
    let (st, v) = deliver(&api, hook, &h, &junk).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].is_string());
    // Unknown task: 404.
    let (st, _) = deliver(&api, "/api/webhooks/github/nope", &gh("d-6"), &body).await;
    assert_eq!(st, 404);
    // Another branch: accepted, nothing queued.
    let other = push_body("refs/heads/feature", &c2);
    let mut h = gh("d-7");
    h[2].1 = github_signature(secret, &other);
    let (st, v) = deliver(&api, hook, &h, &other).await;
    assert_eq!(st, 200);
    assert_eq!(v["queued"], false);

    let run = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}\n{}", serve.stderr());
    assert_eq!(run["commit"], c1.as_str());
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert!(log.contains(&format!("commit={c1} branch=main")), "{log}");
    assert!(
        log.contains("version-one"),
        "built the pushed commit: {log}"
    );
    assert!(!log.contains("version-two"), "{log}");
    assert_eq!(
        api.runs("app").await.len(),
        1,
        "only the one good delivery queued"
    );

    // GitLab (token) and Gitea (HMAC without prefix) queue runs too.
    let body2 = push_body("refs/heads/main", &c2);
    let (st, v) = deliver(
        &api,
        "/api/webhooks/gitlab/app",
        &[
            ("x-gitlab-event", "Push Hook".into()),
            ("x-gitlab-token", secret.into()),
            ("x-gitlab-event-uuid", "g-1".into()),
        ],
        &body2,
    )
    .await;
    assert_eq!(st, 202, "{v}");
    let (st, _) = deliver(
        &api,
        "/api/webhooks/gitlab/app",
        &[
            ("x-gitlab-event", "Push Hook".into()),
            ("x-gitlab-token", "wrong".into()),
        ],
        &body2,
    )
    .await;
    assert_eq!(st, 401);
    // (Another commit: the same one again would be a replay, whichever the provider.)
    let body3 = push_body("refs/heads/main", &c3);
    let gitea_sig = github_signature(secret, &body3)
        .trim_start_matches("sha256=")
        .to_string();
    let (st, v) = deliver(
        &api,
        "/api/webhooks/gitea/app",
        &[
            ("x-gitea-event", "push".into()),
            ("x-gitea-signature", gitea_sig),
            ("x-gitea-delivery", "t-1".into()),
        ],
        &body3,
    )
    .await;
    assert_eq!(st, 202, "{v}");
    let gid = v["run"]["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&gid, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}");
    let log = api.text(&format!("/api/runs/{gid}/logs")).await;
    assert!(log.contains("version-three"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_commit_in_a_watched_checkout_queues_a_run() {
    require_docker();
    let repo = Repo::new();
    let acb = std::fs::read_to_string(data_file("git-acb.yaml")).unwrap();
    repo.commit(&[("acb.yaml", &acb), ("version.txt", "first\n")], "one");
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 2);
    let api = serve.client();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "local", "context": repo.dir.path().display().to_string(),
                    "triggers": {"commit": {"watch": true}}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    // Give the watcher a look at the current head first (that queues nothing).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(api.runs("local").await.is_empty());
    let c2 = repo.commit(&[("version.txt", "second\n")], "two");
    let mut runs = Vec::new();
    for _ in 0..100 {
        runs = api.runs("local").await;
        if !runs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.len(), 1, "{}", serve.stderr());
    assert_eq!(runs[0]["trigger"]["source"], "watch");
    let id = runs[0]["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}");
    assert_eq!(run["commit"], c2.as_str());
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert!(log.contains("second"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_a_remote_branch_queues_a_run_for_a_new_commit() {
    require_docker();
    let repo = Repo::new();
    let acb = std::fs::read_to_string(data_file("git-acb.yaml")).unwrap();
    repo.commit(&[("acb.yaml", &acb), ("version.txt", "first\n")], "one");
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(&data.path().join("d"), 2);
    let api = serve.client();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "polled", "context": repo.url(),
                    "triggers": {"commit": {"poll_interval": 1}}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(api.runs("polled").await.is_empty());
    let c2 = repo.commit(&[("version.txt", "second\n")], "two");
    let mut runs = Vec::new();
    for _ in 0..100 {
        runs = api.runs("polled").await;
        if !runs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.len(), 1, "{}", serve.stderr());
    assert_eq!(runs[0]["trigger"]["source"], "poll");
    assert_eq!(runs[0]["trigger"]["commit"], c2.as_str());
    let id = runs[0]["id"].as_str().unwrap().to_string();
    let run = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run["status"], "Succeeded", "{run}");
}
