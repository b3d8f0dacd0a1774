//! `acr-task import` from real source registries: Debian's `docker-registry` (filled by
//! skopeo; referrers by the tag schema, as tools write them there) into a registry's files,
//! and another `acr-task serve --auth` over TLS with a token into a running server, where
//! the import moves a tag a task builds FROM (its base-image trigger runs once) and a
//! webhook sees the push. Bad input: a tag that is gone, an unreachable source, wrong
//! credentials, a blob whose bytes do not match its digest (nothing of it visible), a tag
//! that names other content (refused without --force).

mod serve_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use serve_common::registry_common::{
    cli, cli_json, cli_ok, digest, require_tool, resolve, run, spawn_server,
    write_multi_arch_layout, Distribution,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A blob pushed as every registry takes it: POST a session, PUT the bytes with the digest.
async fn upload(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{url}{sep}digest={d}"))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    d
}

async fn put_manifest(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    mt: &str,
    body: &[u8],
) {
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", mt)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// A signature-like artifact referring to `subject` (an index), stored in `repo` with the
/// referrers tag schema's index (`sha256-<hex>`) as tools keep it on registries without
/// the referrers API. Returns the artifact's digest.
async fn push_referrer(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    subject: &str,
    size: usize,
) -> String {
    let empty = b"{}";
    let cd = upload(c, base, repo, empty).await;
    let sig = b"a signature over the index";
    let ld = upload(c, base, repo, sig).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cd, "size": 2},
        "layers": [{"mediaType": "application/vnd.example.signature.v1", "digest": ld, "size": sig.len()}],
        "subject": {"mediaType": OCI_INDEX, "digest": subject, "size": size}
    }))
    .unwrap();
    let md = digest(&m);
    put_manifest(c, base, repo, &md, OCI_MANIFEST, &m).await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": m.len(),
                       "artifactType": "application/vnd.example.signature"}]
    }))
    .unwrap();
    let tag = subject.replacen(':', "-", 1);
    put_manifest(c, base, repo, &tag, OCI_INDEX, &index).await;
    md
}

fn import(data: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["import"];
    all.extend_from_slice(args);
    cli(data, &all)
}

fn import_json(data: &Path, args: &[&str]) -> Value {
    let mut all = vec!["import"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    cli_json(data, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_with_its_platforms_and_referrers_comes_from_docker_registry() {
    require_tool("skopeo", "apt-get install -y skopeo");
    let dist_root = tempfile::tempdir().unwrap();
    let dist = Distribution::start(dist_root.path());
    let src = format!("http://{}", dist.addr);
    let layout = tempfile::tempdir().unwrap();
    write_multi_arch_layout(layout.path());
    run(Command::new("skopeo").args([
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.path().display()),
        &format!("docker://{}/multi/arch:v1", dist.addr),
    ]));
    let c = reqwest::Client::new();
    let index = resolve(&c, &src, "multi/arch", "v1").await.unwrap();
    let index_body = c
        .get(format!("{src}/v2/multi/arch/manifests/{index}"))
        .header("accept", OCI_INDEX)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let platforms: Vec<String> = serde_json::from_slice::<Value>(&index_body).unwrap()["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect();
    let signature = push_referrer(&c, &src, "multi/arch", &index, index_body.len()).await;

    let target = tempfile::tempdir().unwrap();
    let t = target.path();
    let source = format!("{}/multi/arch:v1", dist.addr);
    let r = import_json(t, &["--source", &source]);
    assert_eq!(r["digest"], index.as_str(), "{r}");
    assert_eq!(r["targets"], json!(["multi/arch:v1"]), "{r}");
    // The index, its two platforms and the signature; two configs, two layers and the
    // signature's two blobs.
    assert_eq!(r["manifests"], 4, "{r}");
    assert_eq!(r["referrers"], 1, "{r}");
    assert_eq!(r["blobsCopied"], 6, "{r}");

    // Again: nothing is copied twice.
    let again = import_json(t, &["--source", &source]);
    assert_eq!(
        (again["blobsCopied"].as_u64(), again["bytesCopied"].as_u64()),
        (Some(0), Some(0)),
        "{again}"
    );
    assert_eq!(again["manifests"], 0, "{again}");
    // Into another repository: every blob is there already, linked rather than copied.
    let mirror = import_json(t, &["--source", &source, "--image", "mirror/arch:stable"]);
    assert_eq!(
        (
            mirror["blobsCopied"].as_u64(),
            mirror["blobsPresent"].as_u64()
        ),
        (Some(0), Some(6)),
        "{mirror}"
    );

    // A tag that names other content is not replaced without --force.
    let one = format!("{}/multi/arch@{}", dist.addr, platforms[0]);
    let (ok, _, err) = import(t, &["--source", &one, "--image", "mirror/arch:stable"]);
    assert!(!ok);
    assert!(
        err.contains("mirror/arch:stable already names") && err.contains("--force"),
        "{err}"
    );
    let forced = import_json(
        t,
        &["--source", &one, "--image", "mirror/arch:stable", "--force"],
    );
    assert_eq!(forced["digest"], platforms[0].as_str(), "{forced}");

    // Bad sources say what and where.
    let (ok, _, err) = import(t, &["--source", &format!("{}/multi/arch:gone", dist.addr)]);
    assert!(
        !ok && err.contains("multi/arch:gone is not in the source registry"),
        "{err}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (ok, _, err) = import(t, &["--source", &format!("{closed}/multi/arch:v1")]);
    assert!(!ok && err.contains("cannot reach registry"), "{err}");
    let (ok, _, err) = import(t, &["--source", "no way"]);
    assert!(!ok && err.contains("is not an image reference"), "{err}");

    // A blob whose bytes changed at the source: refused, and nothing of the image shows.
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = upload(&c, &src, "bad/img", config).await;
    let layer = vec![7u8; 4096];
    let ld = upload(&c, &src, "bad/img", &layer).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}]
    }))
    .unwrap();
    put_manifest(&c, &src, "bad/img", "v1", OCI_MANIFEST, &m).await;
    let hex = ld.trim_start_matches("sha256:");
    let data = dist_root.path().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    std::fs::write(&data, vec![8u8; 4096]).unwrap();
    let (ok, _, err) = import(t, &["--source", &format!("{}/bad/img:v1", dist.addr)]);
    assert!(!ok, "{err}");
    assert!(
        err.contains(&ld) && err.contains("does not match its digest"),
        "{err}"
    );
    cli_ok(t, &["registry", "fsck"]);

    // What the registry serves: the same digests, the platforms whole, the signature as a
    // referrer of the index; and no trace of the refused image.
    let (mut server, addr) = spawn_server(t);
    let ours = format!("http://{addr}");
    assert_eq!(
        resolve(&c, &ours, "multi/arch", "v1").await.as_deref(),
        Some(index.as_str())
    );
    assert_eq!(
        resolve(&c, &ours, "mirror/arch", "stable").await.as_deref(),
        Some(platforms[0].as_str())
    );
    assert_eq!(resolve(&c, &ours, "bad/img", "v1").await, None);
    let refs: Value = c
        .get(format!("{ours}/v2/multi/arch/referrers/{index}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refs["manifests"][0]["digest"], signature.as_str(), "{refs}");
    assert_eq!(
        refs["manifests"][0]["artifactType"],
        "application/vnd.example.signature"
    );
    let out = tempfile::tempdir().unwrap();
    run(Command::new("skopeo").args([
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{addr}/multi/arch:v1"),
        &format!("oci:{}:back", out.path().display()),
    ]));
    let _ = server.kill();
    let _ = server.wait();
    drop(dist);
}

/// A registry served by `acr-task serve --registry-only --auth` over TLS, whose token
/// `builder` may read and write `upstream/*`. Returns the server and the token's password.
fn tls_source(data: &Path) -> (serve_common::Serve, String) {
    let acr = |args: &[&str]| cli_ok(data, args);
    acr(&[
        "scope-map",
        "create",
        "rw",
        "--repository",
        "upstream/*",
        "content/read",
        "content/write",
    ]);
    let created: Value = serde_json::from_str(&acr(&[
        "token",
        "create",
        "builder",
        "--scope-map",
        "rw",
        "-o",
        "json",
    ]))
    .unwrap();
    let password = created["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let (cert, key) = (
        serve_common::tls("server.pem"),
        serve_common::tls("server-key.pem"),
    );
    let serve = serve_common::Serve::start_with(
        data,
        1,
        &[
            "--registry-only",
            "--auth",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    (serve, password)
}

/// `docker build` of an image FROM the busybox runner with a label, pushed with the docker
/// config `config`: its digest.
fn push_base(config: Option<&Path>, image: &str, version: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM busybox\nLABEL base.version={version}\n"),
    )
    .unwrap();
    let docker = |args: &[&str]| {
        let mut c = Command::new("docker");
        if let Some(cfg) = config {
            c.env("DOCKER_CONFIG", cfg);
        }
        run(c.args(args))
    };
    docker(&[
        "build",
        "-q",
        "-t",
        image,
        &dir.path().display().to_string(),
    ]);
    let out = docker(&["push", image]);
    docker(&["rmi", image]);
    out.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no digest in push output: {out}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_over_tls_with_a_token_moves_a_base_tag_and_triggers_once() {
    serve_common::require_docker();
    // The base images are built FROM the busybox runner.
    run(Command::new(serve_common::bin()).args(["runner", "build"]));
    let dir = tempfile::tempdir().unwrap();
    let (source, password) = tls_source(&dir.path().join("source"));
    let config = dir.path().join("docker-config");
    serve_common::docker_login(&config, &source.addr, "builder", &password);

    // The target: a whole server trusting the source's CA, with a task building FROM its
    // own copy of the base, and a webhook on pushes.
    let ca = serve_common::tls("ca.pem");
    let serve = serve_common::Serve::start_with(&dir.path().join("target"), 1, &["--ca-cert", &ca]);
    let api = serve.client();
    let base = format!("{}/upstream/base:1", serve.addr);
    let d1 = push_base(None, &base, "one");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {base}\n")).unwrap();
    std::fs::write(
        ctx.path().join("acb.yaml"),
        "version: v1.1.0\nsteps:\n  - id: build\n    build: -t $Registry/app:latest .\n",
    )
    .unwrap();
    let (st, v) = api
        .post(
            "/api/tasks",
            &json!({"name": "app", "context": ctx.path().display().to_string()}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (_, v) = api.post("/api/tasks/app/runs", &json!({})).await;
    let first = v["id"].as_str().unwrap().to_string();
    let run1 = api
        .wait_status(&first, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run1["status"], "Succeeded", "{run1}\n{}", serve.stderr());
    let (hook_addr, deliveries) = serve_common::receiver();
    let (ok, _, err) = serve.acr(&[
        "webhook",
        "create",
        "imports",
        "--uri",
        &format!("http://{hook_addr}/hook"),
        "--actions",
        "push",
        "--allow-private-destination",
    ]);
    assert!(ok, "{err}");

    // A new base at the source, pushed there with the token.
    let upstream = format!("{}/upstream/base:1", source.addr);
    let d2 = push_base(Some(&config), &upstream, "two");
    assert_ne!(d1, d2);

    let import = |extra: &[&str]| {
        let mut c = serve.cli();
        c.args(["import", "--source", &upstream, "--registry", &serve.url])
            .args(extra);
        c.env("DOCKER_CONFIG", dir.path().join("no-docker-config"));
        c.output().unwrap()
    };
    // Wrong credentials: refused by the source, said as such.
    let o = import(&["--username", "builder", "--password", "wrong"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("credentials"), "{err}");
    // The tag names d1 here: replaced only with --force.
    let o = import(&["--username", "builder", "--password", &password]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--force"), "{err}");
    // `docker login`'s credentials for the source are used when none are given.
    let mut c = serve.cli();
    c.args([
        "import",
        "--source",
        &upstream,
        "--registry",
        &serve.url,
        "--force",
        "-o",
        "json",
    ])
    .env("DOCKER_CONFIG", &config);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["digest"], d2.as_str(), "{r}");

    // The moved tag rebuilds the task once, with the imported base.
    let mut runs = Vec::new();
    for _ in 0..300 {
        runs = api.runs("app").await;
        if runs.len() > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.len(), 2, "the import queued one run: {runs:?}");
    let t = &runs[0]["trigger"];
    assert_eq!(t["kind"], "base_image", "{t}");
    assert_eq!(t["newDigest"], d2.as_str(), "{t}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.runs("app").await.len(), 2);
    let id = runs[0]["id"].as_str().unwrap().to_string();
    let run2 = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(120))
        .await;
    assert_eq!(run2["status"], "Succeeded", "{run2}");

    // The webhook got the import's push of the tag.
    let start = std::time::Instant::now();
    loop {
        let got = deliveries.lock().unwrap().clone();
        let hit = got
            .iter()
            .find_map(|b| serde_json::from_str::<Value>(b).ok())
            .filter(|v| {
                v["target"]["repository"] == "upstream/base" && v["target"]["digest"] == d2.as_str()
            });
        if let Some(v) = hit {
            assert_eq!(v["action"], "push", "{v}");
            assert_eq!(v["target"]["tag"], "1", "{v}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no delivery: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("docker")
        .args(["rmi", "-f", &format!("{}/app:latest", serve.addr)])
        .output();
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Fills `base` with `repos` × `tags` images over one shared base layer, each with its own
/// small layer. Returns (repository, tag, its layer's digest) of every image.
async fn fill(base: &str, repos: &[&str], tags: usize) -> Vec<(String, String, String)> {
    let c = reqwest::Client::new();
    let shared = vec![42u8; 512 * 1024];
    let mut out = Vec::new();
    for repo in repos {
        let sd = upload(&c, base, repo, &shared).await;
        for t in 0..tags {
            let own = format!("{repo} {t} {}", uuid::Uuid::new_v4()).repeat(2000);
            let ld = upload(&c, base, repo, own.as_bytes()).await;
            let config =
                format!(r#"{{"architecture":"amd64","os":"linux","variant":"{repo}{t}"}}"#);
            let cd = upload(&c, base, repo, config.as_bytes()).await;
            let m = serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sd, "size": shared.len()},
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": own.len()}
                ]
            }))
            .unwrap();
            put_manifest(&c, base, repo, &format!("v{t}"), OCI_MANIFEST, &m).await;
            out.push((repo.to_string(), format!("v{t}"), ld));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relocation_is_filtered_resumed_after_kill_9_and_verified() {
    let dist_root = tempfile::tempdir().unwrap();
    let dist = Distribution::start(dist_root.path());
    let src = format!("http://{}", dist.addr);
    let repos = ["app0", "app1", "team/app2", "team/app3", "app4", "app5"];
    let images = fill(&src, &repos, 3).await;
    fill(&src, &["skip/me"], 1).await;
    // One blob whose bytes changed at the source: that tag fails, the rest goes on.
    let (bad_repo, bad_tag, bad_layer) = images.last().unwrap().clone();
    let hex = bad_layer.trim_start_matches("sha256:");
    let path = dist_root.path().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::write(&path, vec![b'x'; len]).unwrap();

    let target = tempfile::tempdir().unwrap();
    let t = target.path();
    let (mut server, addr) = serve_common::registry_common::spawn_serve(&[], t);
    let source = dist.addr.clone();
    let relocate = move |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "registry",
            "relocate",
            "--source",
            &source,
            "--filter",
            "^(team/)?app",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let plan = cli_json(t, &strs(&relocate(&["--dry-run", "-o", "json"])));
    // A distribution source has no settings to deploy: content only.
    assert_eq!(plan["settings"], Value::Null, "{plan}");
    let plan = plan["items"].as_array().unwrap();
    assert_eq!(plan.len(), 18, "{plan:?}");
    assert!(plan.iter().all(|i| i["state"] == "copy"), "{plan:?}");
    assert!(!plan.iter().any(|i| i["repository"] == "skip/me"));

    // Interrupted: killed (SIGKILL) once the target holds something.
    let mut first = Command::new(serve_common::bin())
        .args(relocate(&["--concurrency", "2"]))
        .arg("--data")
        .arg(t)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = reqwest::Client::new();
    let start = std::time::Instant::now();
    loop {
        let cat: Value = c
            .get(format!("http://{addr}/v2/_catalog"))
            .basic_auth("admin", Some(serve_common::admin_password(t)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        if cat["repositories"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "nothing arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = first.kill();
    let _ = first.wait();

    // Again: it goes on from there; what is there is not copied again.
    let (ok, out, err) = cli(t, &strs(&relocate(&["-o", "json"])));
    assert!(!ok, "the damaged tag fails the relocation: {out}\n{err}");
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    assert_eq!(r["tags"], 18, "{r}");
    assert_eq!(r["failed"], 1, "{r}");
    assert_eq!(
        r["copied"].as_u64().unwrap() + r["alreadyThere"].as_u64().unwrap(),
        17,
        "{r}"
    );
    let failed = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["state"] == "failed")
        .unwrap();
    assert_eq!(
        (failed["repository"].as_str(), failed["tag"].as_str()),
        (Some(bad_repo.as_str()), Some(bad_tag.as_str()))
    );
    let e = failed["error"].as_str().unwrap();
    assert!(
        e.contains(&bad_layer) && e.contains("does not match its digest"),
        "{e}"
    );
    assert_eq!(r["differences"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["differences"][0]["tag"], bad_tag.as_str(), "{r}");
    assert_eq!(r["differences"][0]["target"], Value::Null, "{r}");

    // A third run copies nothing: every good tag is there at the source's digest.
    let (_, out, _) = cli(t, &strs(&relocate(&["-o", "json"])));
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r["alreadyThere"].as_u64(), r["blobsCopied"].as_u64()),
        (Some(17), Some(0)),
        "{r}"
    );
    let _ = server.kill();
    let _ = server.wait();
}
