//! The Docker token flow over real HTTP: challenge, token endpoint, scope checks on every
//! registry route, bad tokens, anonymous pull, rate limiting, cross-repository mounts.

mod registry_common;

use std::sync::Arc;
use std::time::Duration;

use acr_task::auth::{Auth, AuthSettings, Permission, ScopeRule};
use acr_task::registry::{start_with_auth, RegistryConfig, RunningRegistry};
use base64::Engine;
use registry_common::*;

struct Env {
    _dir: tempfile::TempDir,
    reg: RunningRegistry,
    auth: Arc<Auth>,
    base: String,
}

async fn env(settings: AuthSettings) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let auth = Auth::open(dir.path(), settings).unwrap();
    let reg = start_with_auth(
        RegistryConfig::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap()),
        Some(auth.clone()),
    )
    .await
    .unwrap();
    let base = format!("http://{}", reg.addr());
    Env {
        _dir: dir,
        reg,
        auth,
        base,
    }
}

fn rule(repo: &str, actions: &[Permission]) -> ScopeRule {
    ScopeRule {
        repository: repo.into(),
        actions: actions.to_vec(),
    }
}

/// A token with `rules`; returns its password1.
fn make_token(e: &Env, name: &str, rules: &[ScopeRule]) -> String {
    let s = e.auth.store();
    s.create_scope_map(&format!("{name}-map"), "", rules, &Default::default())
        .unwrap();
    let (_, secrets) = s
        .create_token(
            name,
            &format!("{name}-map"),
            None,
            true,
            false,
            &Default::default(),
        )
        .unwrap();
    secrets[0].value.clone()
}

async fn get_token(e: &Env, user: &str, pass: &str, scopes: &[&str]) -> reqwest::Response {
    // Scope values here never need escaping beyond ':' and ','.
    let mut url = format!("{}/oauth2/token?service=acr-task", e.base);
    for s in scopes {
        url.push_str(&format!(
            "&scope={}",
            s.replace(':', "%3A").replace(',', "%2C")
        ));
    }
    reqwest::Client::new()
        .get(url)
        .basic_auth(user, Some(pass))
        .send()
        .await
        .unwrap()
}

async fn bearer(e: &Env, user: &str, pass: &str, scopes: &[&str]) -> String {
    let r = get_token(e, user, pass, scopes).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_i64().unwrap() > 0);
    v["token"].as_str().unwrap().to_string()
}

fn client(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

/// The `access` claim of a JWT (payload only; the registry checks the signature).
fn access_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&raw).unwrap()["access"].clone()
}

/// Push a one-layer image to `repo:tag` with `c`; returns the manifest response.
async fn push_image(c: &reqwest::Client, base: &str, repo: &str, tag: &str) -> reqwest::Response {
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = format!("layer of {repo}").into_bytes();
    let cd = push_blob(c, base, repo, config).await;
    let ld = push_blob(c, base, repo, &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
    put_manifest(
        c,
        base,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        m.to_string().as_bytes(),
    )
    .await
}

#[tokio::test]
async fn challenge_token_and_scoped_push_pull() {
    let e = env(AuthSettings::default()).await;
    let plain = reqwest::Client::new();

    // Ping without credentials: the challenge names our token endpoint and service.
    let r = plain.get(format!("{}/v2/", e.base)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let ch = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        ch,
        format!(
            "Bearer realm=\"http://{}/oauth2/token\",service=\"acr-task\"",
            e.reg.addr()
        )
    );
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    // A repository route's challenge carries the scope it needs.
    let r = plain
        .get(format!("{}/v2/samples/a/manifests/v1", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .ends_with(",scope=\"repository:samples/a:pull\""));

    let rw = make_token(
        &e,
        "writer",
        &[rule(
            "samples/*",
            &[Permission::ContentRead, Permission::ContentWrite],
        )],
    );
    let ro = make_token(
        &e,
        "reader",
        &[rule("samples/a", &[Permission::ContentRead])],
    );

    // Wrong password and unknown users get 401 from the token endpoint.
    assert_eq!(get_token(&e, "writer", "nope", &[]).await.status(), 401);
    assert_eq!(get_token(&e, "ghost", &rw, &[]).await.status(), 401);
    // No credentials and no anonymous pull: 401.
    let r = plain
        .get(format!("{}/oauth2/token?service=acr-task", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The login token (no scope) opens /v2/ only.
    let t = bearer(&e, "writer", &rw, &[]).await;
    assert_eq!(access_of(&t), serde_json::json!([]));
    let r = client(&t)
        .get(format!("{}/v2/", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Push with a pull,push token.
    let t = bearer(&e, "writer", &rw, &["repository:samples/a:pull,push"]).await;
    assert_eq!(
        access_of(&t),
        serde_json::json!([{"type":"repository","name":"samples/a","actions":["pull","push"]}])
    );
    let mut events = e.reg.registry().subscribe_with_context();
    let r = push_image(&client(&t), &e.base, "samples/a", "v1").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Events name who pushed (webhook payloads carry it as actor.name).
    let (ev, ctx) = events.recv().await.unwrap();
    assert_eq!(ev.repository, "samples/a");
    assert_eq!(ctx.actor, "writer");
    assert_eq!(ctx.method, "PUT");

    // The reader asks for pull,push and gets pull only; it reads but cannot write.
    let t = bearer(&e, "reader", &ro, &["repository:samples/a:pull,push"]).await;
    assert_eq!(
        access_of(&t),
        serde_json::json!([{"type":"repository","name":"samples/a","actions":["pull"]}])
    );
    let c = client(&t);
    let r = c
        .get(format!("{}/v2/samples/a/manifests/v1", e.base))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/v2/samples/a/tags/list", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v2/samples/a/blobs/uploads/", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let r = c
        .delete(format!("{}/v2/samples/a/manifests/v1", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Its token for samples/a never opens samples/b, even though samples/b exists.
    let tw = bearer(&e, "writer", &rw, &["repository:samples/b:pull,push"]).await;
    assert_eq!(
        push_image(&client(&tw), &e.base, "samples/b", "v1")
            .await
            .status(),
        201
    );
    let r = c
        .get(format!("{}/v2/samples/b/manifests/v1", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Asking the token endpoint for samples/b grants nothing there.
    let t = bearer(&e, "reader", &ro, &["repository:samples/b:pull"]).await;
    assert_eq!(access_of(&t), serde_json::json!([]));
    // The catalog needs registry:catalog:*, which tokens without metadata/read on * lack.
    let t = bearer(&e, "writer", &rw, &["registry:catalog:*"]).await;
    let r = client(&t)
        .get(format!("{}/v2/_catalog", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The admin user (off until renewed) may do everything, the catalog included.
    assert_eq!(get_token(&e, "admin", "", &[]).await.status(), 401);
    let admin = e.auth.store().renew_admin().unwrap().value;
    let t = bearer(&e, "admin", &admin, &["registry:catalog:*"]).await;
    let r = client(&t)
        .get(format!("{}/v2/_catalog", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["samples/a", "samples/b"])
    );
    e.reg.shutdown().await;
}

#[tokio::test]
async fn expired_tampered_and_foreign_tokens_are_unauthorized() {
    let e = env(AuthSettings {
        token_ttl: Duration::from_secs(1),
        ..AuthSettings::default()
    })
    .await;
    let p = make_token(&e, "ci", &[rule("*", &[Permission::ContentRead])]);
    let t = bearer(&e, "ci", &p, &["repository:x:pull"]).await;
    let url = format!("{}/v2/x/tags/list", e.base);
    // Valid now: the repository is unknown, which is a 404 past the gate.
    assert_eq!(client(&t).get(&url).send().await.unwrap().status(), 404);

    // Tampered: swap the payload for one granting more; the signature no longer matches.
    let mut parts: Vec<&str> = t.split('.').collect();
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        serde_json::json!({"iss":"acr-task","sub":"ci","aud":"acr-task","exp":9999999999i64,
            "nbf":0,"iat":0,"jti":"x","access":[{"type":"repository","name":"x","actions":["*"]}]})
        .to_string(),
    );
    parts[1] = &forged;
    let r = client(&parts.join(".")).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));
    assert_eq!(error_code(r).await, "UNAUTHORIZED");

    // Signed with our key but for another service.
    let key = std::fs::read(e._dir.path().join("token-signing.key")).unwrap();
    let now = chrono::Utc::now().timestamp();
    let other = acr_task::auth::jwt::issue(
        &key,
        &acr_task::auth::jwt::Claims {
            iss: "acr-task".into(),
            sub: "ci".into(),
            aud: "elsewhere".into(),
            exp: now + 60,
            nbf: now,
            iat: now,
            jti: "j".into(),
            access: vec![acr_task::auth::Access::repo("x", &["pull"])],
        },
    )
    .unwrap();
    assert_eq!(client(&other).get(&url).send().await.unwrap().status(), 401);
    // Garbage.
    assert_eq!(client("abc").get(&url).send().await.unwrap().status(), 401);
    // A token request for another service is refused.
    let r = reqwest::Client::new()
        .get(format!("{}/oauth2/token?service=elsewhere", e.base))
        .basic_auth("ci", Some(&p))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Expired (ttl 1 s, no leeway).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = client(&t).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    e.reg.shutdown().await;
}

#[tokio::test]
async fn anonymous_pull_when_enabled() {
    let e = env(AuthSettings {
        anonymous_pull: true,
        ..AuthSettings::default()
    })
    .await;
    let p = make_token(
        &e,
        "ci",
        &[rule(
            "*",
            &[Permission::ContentRead, Permission::ContentWrite],
        )],
    );
    let t = bearer(&e, "ci", &p, &["repository:pub:pull,push"]).await;
    assert_eq!(
        push_image(&client(&t), &e.base, "pub", "v1").await.status(),
        201
    );
    let plain = reqwest::Client::new();
    // The ping still challenges (so docker learns where to get tokens)...
    assert_eq!(
        plain
            .get(format!("{}/v2/", e.base))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // ...but reads need nothing, and an anonymous token grants pull only.
    let r = plain
        .get(format!("{}/v2/pub/manifests/v1", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = plain
        .get(format!(
            "{}/oauth2/token?service=acr-task&scope=repository:pub:pull,push",
            e.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        access_of(v["token"].as_str().unwrap()),
        serde_json::json!([{"type":"repository","name":"pub","actions":["pull"]}])
    );
    // Writes still need credentials.
    let r = plain
        .post(format!("{}/v2/pub/blobs/uploads/", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = plain
        .delete(format!("{}/v2/pub/manifests/v1", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    e.reg.shutdown().await;
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_ip_and_user() {
    let e = env(AuthSettings {
        max_failures: 3,
        failure_window: Duration::from_secs(2),
        ..AuthSettings::default()
    })
    .await;
    let p = make_token(&e, "ci", &[rule("*", &[Permission::ContentRead])]);
    let other = make_token(&e, "other", &[rule("*", &[Permission::ContentRead])]);
    for _ in 0..3 {
        assert_eq!(get_token(&e, "ci", "wrong", &[]).await.status(), 401);
    }
    // Locked: even the right password is refused until the window passes.
    let r = get_token(&e, "ci", &p, &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    // Another user from the same address is not affected.
    assert_eq!(get_token(&e, "other", &other, &[]).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get_token(&e, "ci", &p, &[]).await.status(), 200);
    e.reg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_flood_neither_exhausts_the_server_nor_locks_out_the_owner() {
    let e = env(AuthSettings::default()).await;
    let p = make_token(&e, "ci", &[rule("*", &[Permission::ContentRead])]);
    // The attacker, from 127.0.0.1: 300 wrong logins at once, for many user names.
    let url = format!("{}/oauth2/token?service=acr-task", e.base);
    let attacker = reqwest::Client::new();
    let flood: Vec<_> = (0..300)
        .map(|i| {
            let req = attacker
                .get(&url)
                .basic_auth(format!("user{}", i % 50), Some("wrong"));
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The owner, from another address, gets in at once and is not locked out.
    let owner = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let t0 = std::time::Instant::now();
    let r = owner
        .get(&url)
        .basic_auth("ci", Some(&p))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "the owner waited {:?} behind the flood",
        t0.elapsed()
    );
    let mut counts = std::collections::BTreeMap::new();
    for f in flood {
        // 0: the connection itself was refused or reset (the per-address connection
        // limit), which is a refusal too.
        let s = f.await.unwrap().unwrap_or(0);
        *counts.entry(s).or_insert(0) += 1;
    }
    // Most were refused before any password was hashed; none got in.
    assert!(!counts.contains_key(&200), "{counts:?}");
    let refused = counts.get(&429).copied().unwrap_or(0) + counts.get(&0).copied().unwrap_or(0);
    assert!(refused >= 250, "{counts:?}");
    eprintln!("flood answers: {counts:?}");
    // Spraying, one at a time, from a third address (the flood's kept-alive connections
    // fill 127.0.0.1's connection limit): within 30 failures (10 per user name, 30 per
    // address) the address is refused even with a good password, and told when to retry.
    let sprayer = reqwest::Client::builder()
        .local_address("127.0.0.3".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut refused = None;
    for i in 0..31 {
        let r = sprayer
            .get(&url)
            .basic_auth(format!("spray{i}"), Some("wrong"))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            refused = Some(i);
            break;
        }
        assert_eq!(r.status(), 401);
    }
    assert!(
        refused.is_some(),
        "spraying from one address was never refused"
    );
    let r = sprayer
        .get(&url)
        .basic_auth("ci", Some(&p))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // The owner's own address is still fine.
    let r = owner
        .get(&url)
        .basic_auth("ci", Some(&p))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    e.reg.shutdown().await;
}

#[tokio::test]
async fn mount_needs_pull_on_the_source_repository() {
    let e = env(AuthSettings::default()).await;
    let all = make_token(
        &e,
        "all",
        &[rule(
            "*",
            &[Permission::ContentRead, Permission::ContentWrite],
        )],
    );
    let only_b = make_token(
        &e,
        "onlyb",
        &[rule(
            "b",
            &[Permission::ContentRead, Permission::ContentWrite],
        )],
    );
    let t = bearer(&e, "all", &all, &["repository:a:pull,push"]).await;
    let secret = b"secret layer of a";
    let d = push_blob(&client(&t), &e.base, "a", secret).await;
    let mount = |tok: String| {
        let url = format!("{}/v2/b/blobs/uploads/?mount={d}&from=a", e.base);
        async move { client(&tok).post(url).send().await.unwrap().status() }
    };
    // Without pull on `a`: no mount, a fresh upload session instead; the blob stays hidden.
    let t = bearer(
        &e,
        "onlyb",
        &only_b,
        &["repository:b:pull,push", "repository:a:pull"],
    )
    .await;
    assert_eq!(mount(t.clone()).await, 202);
    // The attack: the check reads one `from` (b, allowed), the handler another (a). Repeated
    // keys, plainly or percent-encoded, are refused outright.
    for q in [
        format!("mount={d}&from=b&from=a"),
        format!("mount={d}&from=b&fro%6D=a"),
        format!("%6Dount={d}&from=b&from=a"),
    ] {
        let r = client(&t)
            .post(format!("{}/v2/b/blobs/uploads/?{q}", e.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        assert_eq!(error_code(r).await, "UNSUPPORTED", "{q}");
    }
    let r = client(&t)
        .head(format!("{}/v2/b/blobs/{d}", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // With pull on `a`: mounted.
    let t = bearer(
        &e,
        "all",
        &all,
        &["repository:b:pull,push", "repository:a:pull"],
    )
    .await;
    assert_eq!(mount(t).await, 201);
    e.reg.shutdown().await;
}

#[tokio::test]
async fn task_api_needs_task_permissions_not_registry_ones() {
    let e = env(AuthSettings::default()).await;
    let reader = make_token(&e, "reader", &[rule("*", &[Permission::ContentRead])]);
    // metadata/write is a registry permission: before, it also managed tasks.
    let ops = make_token(&e, "ops", &[rule("*", &[Permission::MetadataWrite])]);
    let viewer = make_token(&e, "viewer", &[rule("*", &[Permission::TasksRead])]);
    let manager = make_token(&e, "manager", &[rule("*", &[Permission::TasksWrite])]);
    let admin = e.auth.store().renew_admin().unwrap().value;
    // A stand-in for `serve`'s API, behind the guard it uses.
    let guard = Arc::new(acr_task::server::guard::ApiGuard {
        auth: e.auth.clone(),
        open: false,
    });
    let app = axum::Router::new()
        .route(
            "/api/tasks",
            axum::routing::get(|| async { "tasks" }).post(|| async { "created" }),
        )
        .layer(axum::middleware::from_fn_with_state(
            guard,
            acr_task::server::guard::api_guard,
        ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}/api/tasks", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let c = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();

    let r = c.get(&api).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("scope=\"registry:tasks:read\""));
    let get = |u: &str, p: &str| c.get(&api).basic_auth(u, Some(p)).send();
    let post = |u: &str, p: &str| c.post(&api).basic_auth(u, Some(p)).send();
    assert_eq!(status(get("admin", &admin).await.unwrap()), 200);
    assert_eq!(status(post("admin", &admin).await.unwrap()), 200);
    assert_eq!(status(get("manager", &manager).await.unwrap()), 200);
    assert_eq!(status(post("manager", &manager).await.unwrap()), 200);
    assert_eq!(status(get("viewer", &viewer).await.unwrap()), 200);
    assert_eq!(status(post("viewer", &viewer).await.unwrap()), 403);
    assert_eq!(status(get("ops", &ops).await.unwrap()), 403);
    assert_eq!(status(post("ops", &ops).await.unwrap()), 403);
    assert_eq!(status(get("reader", &reader).await.unwrap()), 403);
    assert_eq!(status(get("admin", "wrong").await.unwrap()), 401);
    // Bearer tokens from the token endpoint work too, when they carry registry:tasks.
    let t = bearer(&e, "admin", &admin, &["registry:tasks:read,write"]).await;
    assert_eq!(status(client(&t).post(&api).send().await.unwrap()), 200);
    let t = bearer(&e, "viewer", &viewer, &["registry:tasks:read,write"]).await;
    assert_eq!(
        access_of(&t),
        serde_json::json!([{"type": "registry", "name": "tasks", "actions": ["read"]}])
    );
    assert_eq!(status(client(&t).get(&api).send().await.unwrap()), 200);
    assert_eq!(status(client(&t).post(&api).send().await.unwrap()), 403);
    let t = bearer(&e, "ops", &ops, &["registry:tasks:read,write"]).await;
    assert_eq!(access_of(&t), serde_json::json!([]));
    assert_eq!(status(client(&t).get(&api).send().await.unwrap()), 403);
    // A token may not carry task permissions for one repository only.
    let bad = e.auth.store().create_scope_map(
        "odd",
        "",
        &[rule("samples/*", &[Permission::TasksWrite])],
        &Default::default(),
    );
    assert!(bad.unwrap_err().to_string().contains("whole registry"));
    e.reg.shutdown().await;
}

#[tokio::test]
async fn disabling_a_token_revokes_its_issued_bearer_tokens() {
    let e = env(AuthSettings::default()).await;
    let p = make_token(&e, "ci", &[rule("*", &[Permission::ContentRead])]);
    let t = bearer(&e, "ci", &p, &["repository:x:pull"]).await;
    let url = format!("{}/v2/x/tags/list", e.base);
    assert_eq!(client(&t).get(&url).send().await.unwrap().status(), 404);
    // Disabled from outside the server (as `acr-task token update --status disabled`
    // does from another process): the 300 s bearer token stops within a second or so.
    let other = acr_task::auth::AuthStore::open(e._dir.path()).unwrap();
    other.set_token_status("ci", false).unwrap();
    let start = std::time::Instant::now();
    loop {
        let r = client(&t).get(&url).send().await.unwrap();
        if r.status() == 401 {
            assert!(r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("error=\"invalid_token\""));
            break;
        }
        assert_eq!(r.status(), 404);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the disabled token's bearer token still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Enabled again: the same bearer token (not expired) works again.
    other.set_token_status("ci", true).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(client(&t).get(&url).send().await.unwrap().status(), 404);
    // Deleted: revoked for good.
    other.delete_token("ci").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(client(&t).get(&url).send().await.unwrap().status(), 401);
}

#[tokio::test]
async fn a_narrower_scope_map_applies_to_issued_bearer_tokens() {
    let e = env(AuthSettings::default()).await;
    let p = make_token(
        &e,
        "dev",
        &[rule(
            "demo/*",
            &[Permission::ContentRead, Permission::ContentWrite],
        )],
    );
    let t = bearer(&e, "dev", &p, &["repository:demo/app:pull,push"]).await;
    let c = client(&t);
    let uploads = format!("{}/v2/demo/app/blobs/uploads/", e.base);
    assert_eq!(c.post(&uploads).send().await.unwrap().status(), 202);
    // content/write is taken away from the scope map (by another process, say).
    let other = acr_task::auth::AuthStore::open(e._dir.path()).unwrap();
    other
        .update_scope_map(
            "dev-map",
            &[],
            &[rule("demo/*", &[Permission::ContentWrite])],
            None,
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = c.post(&uploads).send().await.unwrap();
    assert_eq!(r.status(), 403, "the old bearer token still pushes");
    assert_eq!(error_code(r).await, "DENIED");
    // Pulling is still granted.
    let tags = format!("{}/v2/demo/app/tags/list", e.base);
    assert_eq!(c.get(&tags).send().await.unwrap().status(), 404);
}

/// A run's own login (`serve` makes one per run): it may push only where the task
/// pushes, pull anywhere, is refused with a wrong password, and ends with the run,
/// bearer tokens already issued to it included.
#[tokio::test]
async fn a_run_login_is_scoped_to_its_task_and_ends_with_the_run() {
    let e = env(AuthSettings::default()).await;
    let grants = acr_task::auth::Grants::Rules(vec![
        (
            "*".into(),
            vec![Permission::ContentRead, Permission::MetadataRead],
        ),
        (
            "app".into(),
            vec![Permission::ContentRead, Permission::ContentWrite],
        ),
    ]);
    let login = e.auth.start_run("r1abc", grants, Duration::from_secs(600));
    assert!(login.username.starts_with("run."));
    assert!(!format!("{login:?}").contains(&login.password));
    let r = get_token(&e, &login.username, "wrong", &["repository:app:push"]).await;
    assert_eq!(r.status(), 401);
    let t = bearer(
        &e,
        &login.username,
        &login.password,
        &["repository:app:pull,push", "repository:other:pull,push"],
    )
    .await;
    let access = access_of(&t);
    let actions = |repo: &str| -> Vec<String> {
        access
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["name"] == repo)
            .flat_map(|a| a["actions"].as_array().unwrap().clone())
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let mut app = actions("app");
    app.sort();
    assert_eq!(app, ["pull", "push"]);
    assert_eq!(actions("other"), ["pull"]);
    let c = client(&t);
    assert_eq!(push_image(&c, &e.base, "app", "v1").await.status(), 201);
    let upload = format!("{}/v2/other/blobs/uploads/", e.base);
    assert_eq!(c.post(&upload).send().await.unwrap().status(), 403);
    let url = format!("{}/v2/app/tags/list", e.base);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    e.auth.end_run("r1abc");
    assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
    let r = get_token(
        &e,
        &login.username,
        &login.password,
        &["repository:app:pull"],
    )
    .await;
    assert_eq!(r.status(), 401);
}
