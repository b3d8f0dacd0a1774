//! Image signatures and content trust against a real `acr-task serve`: `sign`, `verify`,
//! `show-manifests --referrers`, openssl verifying our stored signatures (cosign's documented
//! way), an openssl-made signature in cosign's tag scheme read by `verify`,
//! and a Premium registry's content trust refusing pulls by tag of unsigned images.

mod serve_common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use serve_common::registry_common::{
    digest, image_manifest, push_blob, put_manifest, require_tool,
};
use serve_common::Serve;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn image(c: &reqwest::Client, base: &str, repo: &str, tag: &str) -> String {
    let config =
        json!({ "architecture": "amd64", "os": "linux", "marker": format!("{repo}:{tag}") })
            .to_string();
    let cd = push_blob(c, base, repo, config.as_bytes()).await;
    let layer = format!("layer of {repo}:{tag}");
    let ld = push_blob(c, base, repo, layer.as_bytes()).await;
    let body =
        serde_json::to_vec(&image_manifest((&cd, config.len()), &[(&ld, layer.len())])).unwrap();
    let r = put_manifest(c, base, repo, tag, OCI_MANIFEST, &body).await;
    assert_eq!(r.status(), 201);
    digest(&body)
}

/// `acr-task ARGS` (no --data): (success, stdout, stderr).
fn acr(s: &Serve, dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = s.cli().current_dir(dir).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn ok(r: (bool, String, String)) -> String {
    assert!(r.0, "failed:\n{}\n{}", r.1, r.2);
    r.1
}

async fn pull(c: &reqwest::Client, base: &str, repo: &str, reference: &str) -> (u16, Value) {
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_are_stored_as_referrers_read_by_skopeo_and_enforced_by_content_trust() {
    require_tool("skopeo", "apt-get install skopeo (make setup)");
    let openssl = Command::new("openssl").arg("version").output();
    assert!(
        openssl.is_ok_and(|o| o.status.success()),
        "`openssl` is required by this test and was not found: apt-get install openssl (make setup)"
    );
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let s = Serve::start(dir.path(), 1);
    let (c, base, host) = (reqwest::Client::new(), s.url.clone(), s.addr.clone());
    let v1 = image(&c, &base, "prod/app", "v1").await;
    let v2 = image(&c, &base, "prod/app", "v2").await;
    image(&c, &base, "dev/tool", "v1").await;

    ok(acr(&s, work.path(), &["generate-key-pair"]));
    ok(acr(
        &s,
        work.path(),
        &["generate-key-pair", "--output-key-prefix", "other"],
    ));
    let key = std::fs::read_to_string(work.path().join("cosign.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let (again, _, err) = acr(&s, work.path(), &["generate-key-pair"]);
    assert!(!again && err.contains("exists"), "{err}");

    // Sign v1 (by tag: its digest is what is signed); the key never shows in the output.
    let out = ok(acr(
        &s,
        work.path(),
        &[
            "sign",
            &format!("{host}/prod/app:v1"),
            "--key",
            "cosign.key",
            "-o",
            "json",
        ],
    ));
    assert!(!out.contains(&key[30..70]));
    let signed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(signed["digest"], v1.as_str());
    let sig_digest = signed["signature"].as_str().unwrap().to_string();

    // verify: exit 0 with the right key, 1 with another, 1 for the unsigned tag.
    let out = ok(acr(
        &s,
        work.path(),
        &[
            "verify",
            &format!("{host}/prod/app:v1"),
            "--key",
            "cosign.pub",
            "-o",
            "json",
        ],
    ));
    let v: Value = serde_json::from_str(&out).unwrap();
    let sigs = v["signatures"].as_array().unwrap();
    assert_eq!(sigs.len(), 2, "the referrer and cosign's tag: {v}");
    assert!(sigs.iter().all(|s| s["valid"] == true), "{v}");
    assert_eq!(sigs[0]["identity"], format!("{host}/prod/app").as_str());
    let (good, out, _) = acr(
        &s,
        work.path(),
        &[
            "verify",
            &format!("{host}/prod/app:v1"),
            "--key",
            "other.pub",
        ],
    );
    assert!(
        !good && out.contains("NOT verified") && out.contains("no given key made it"),
        "{out}"
    );
    let (good, out, _) = acr(
        &s,
        work.path(),
        &[
            "verify",
            &format!("{host}/prod/app:v2"),
            "--key",
            "cosign.pub",
        ],
    );
    assert!(!good && out.contains("0 valid signature(s) of 0"), "{out}");
    // A public key cannot sign; a private one is not taken for verifying.
    let (good, _, err) = acr(
        &s,
        work.path(),
        &[
            "sign",
            &format!("{host}/prod/app:v2"),
            "--key",
            "cosign.pub",
        ],
    );
    assert!(
        !good && err.contains("signing needs the private one"),
        "{err}"
    );

    // The referrer is listed under its image, with its artifact type.
    let listed = ok(s.acr(&[
        "repository",
        "show-manifests",
        "prod/app",
        "--referrers",
        "-o",
        "json",
    ]));
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let m1 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["digest"] == v1.as_str())
        .unwrap();
    assert_eq!(m1["referrers"][0]["digest"], sig_digest.as_str());
    assert_eq!(
        m1["referrers"][0]["artifactType"],
        "application/vnd.dev.cosign.artifact.sig.v1+json"
    );
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["digest"] != sig_digest.as_str()));
    let table = ok(s.acr(&["repository", "show-manifests", "prod/app", "--referrers"]));
    assert!(table.contains(&format!("\u{2514} {sig_digest}")), "{table}");

    // openssl checks the stored signature over the stored payload with cosign.pub: the
    // format is plain ECDSA P-256/SHA-256, as cosign documents ("verify in openssl").
    // (Debian's skopeo is built with sigstore disabled, so it cannot be the checker.)
    let (_, refm) = pull(&c, &base, "prod/app", &sig_digest).await;
    let layer = &refm["layers"][0];
    assert_eq!(refm["subject"]["digest"], v1.as_str());
    let payload_digest = layer["digest"].as_str().unwrap();
    let payload = c
        .get(format!("{base}/v2/prod/app/blobs/{payload_digest}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let p: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        p["critical"]["image"]["docker-manifest-digest"],
        v1.as_str()
    );
    assert_eq!(p["critical"]["type"], "cosign container image signature");
    use base64::Engine as _;
    let sig_b64 = layer["annotations"]["dev.cosignproject.cosign/signature"]
        .as_str()
        .unwrap();
    let der = base64::engine::general_purpose::STANDARD
        .decode(sig_b64)
        .unwrap();
    std::fs::write(work.path().join("ours.payload"), &payload).unwrap();
    std::fs::write(work.path().join("ours.sig"), der).unwrap();
    let openssl_verify = |pubkey: &str| {
        Command::new("openssl")
            .current_dir(work.path())
            .args([
                "dgst",
                "-sha256",
                "-verify",
                pubkey,
                "-signature",
                "ours.sig",
                "ours.payload",
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        openssl_verify("cosign.pub"),
        "openssl refused our signature"
    );
    assert!(
        !openssl_verify("other.pub"),
        "openssl took it with another key"
    );

    // A signature made with openssl in cosign's tag scheme (cosign's documented "sign with
    // OpenSSL" flow) is read by verify.
    let w = work.path();
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .current_dir(w)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "openssl.key",
    ]);
    run(&["ec", "-in", "openssl.key", "-pubout", "-out", "openssl.pub"]);
    let dd = dev_digest(&c, &base).await;
    let payload = format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{host}/dev/tool"}},"image":{{"docker-manifest-digest":"{dd}"}},"type":"cosign container image signature"}},"optional":{{"by":"openssl"}}}}"#
    );
    std::fs::write(w.join("payload.json"), &payload).unwrap();
    run(&[
        "dgst",
        "-sha256",
        "-sign",
        "openssl.key",
        "-out",
        "payload.sig",
        "payload.json",
    ]);
    let sig = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(w.join("payload.sig")).unwrap());
    let pd = push_blob(&c, &base, "dev/tool", payload.as_bytes()).await;
    let cfg = push_blob(&c, &base, "dev/tool", b"{}").await;
    let tagm = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": pd,
            "size": payload.len(), "annotations": {"dev.cosignproject.cosign/signature": sig}}]
    });
    let tag = format!("{}.sig", dd.replace(':', "-"));
    let r = put_manifest(
        &c,
        &base,
        "dev/tool",
        &tag,
        OCI_MANIFEST,
        &serde_json::to_vec(&tagm).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 201);
    let out = ok(acr(
        &s,
        w,
        &[
            "verify",
            &format!("{host}/dev/tool:v1"),
            "--key",
            "openssl.pub",
        ],
    ));
    assert!(out.contains("Verified") && out.contains(&tag), "{out}");

    // Content trust: a Premium feature; then pulls by tag of unsigned images are DENIED.
    ok(s.acr(&[
        "registry",
        "config",
        "content-trust",
        "add",
        "--repository",
        "prod/*",
        "--key",
        &w.join("cosign.pub").display().to_string(),
    ]));
    ok(s.acr(&["registry", "update", "--sku", "Standard"]));
    let (on, _, err) = s.acr(&["registry", "update", "--content-trust", "enabled"]);
    assert!(
        !on && err.contains("content trust") && err.contains("Premium"),
        "{err}"
    );
    ok(s.acr(&["registry", "update", "--sku", "Premium"]));
    ok(s.acr(&["registry", "update", "--content-trust", "enabled"]));
    let shown = ok(s.acr(&["registry", "config", "content-trust", "show", "-o", "json"]));
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["status"], "enabled");
    assert_eq!(shown["policies"][0]["repository"], "prod/*");

    assert_eq!(pull(&c, &base, "prod/app", "v1").await.0, 200);
    let (status, body) = pull(&c, &base, "prod/app", "v2").await;
    assert_eq!(status, 403);
    assert_eq!(body["errors"][0]["code"], "DENIED");
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("\"prod/*\"") && msg.contains(&v2), "{msg}");
    // By digest, and outside the policy's repositories, pulls go on; so do signatures.
    assert_eq!(pull(&c, &base, "prod/app", &v2).await.0, 200);
    assert_eq!(pull(&c, &base, "dev/tool", "v1").await.0, 200);
    let sig_tag = format!("{}.sig", v1.replace(':', "-"));
    assert_eq!(pull(&c, &base, "prod/app", &sig_tag).await.0, 200);
    // A real client is refused too, with the policy in its words.
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/prod/app:v2"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    // Signing v2 lets it through; a tampered signature (another key's) would not.
    ok(acr(
        &s,
        w,
        &["sign", &format!("{host}/prod/app:v2"), "--key", "other.key"],
    ));
    assert_eq!(pull(&c, &base, "prod/app", "v2").await.0, 403);
    let o = s
        .cli()
        .current_dir(w)
        .env("SIGNING_KEY", &key)
        .args([
            "sign",
            &format!("{host}/prod/app:v2"),
            "--key",
            "env://SIGNING_KEY",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pull(&c, &base, "prod/app", "v2").await.0, 200);
    // Disabled again, nothing is held back.
    ok(s.acr(&["registry", "update", "--content-trust", "disabled"]));
    image(&c, &base, "prod/app", "v3").await;
    assert_eq!(pull(&c, &base, "prod/app", "v3").await.0, 200);
}

async fn dev_digest(c: &reqwest::Client, base: &str) -> String {
    let r = c
        .head(format!("{base}/v2/dev/tool/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string()
}
