//! The registry's HTTP API through a plain HTTP client: uploads, manifests, listing,
//! referrers, deletes, events, and the spec's errors for bad input.

mod registry_common;

use registry_common::*;
use serde_json::json;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[tokio::test]
async fn base_endpoint_announces_the_api_version() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let r = reqwest::get(format!("{}/v2/", base(&reg))).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    reg.shutdown().await;
}

#[tokio::test]
async fn chunked_upload_resume_and_range_reads() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let b = base(&reg);
    let c = reqwest::Client::new();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = digest(&data);

    let r = c
        .post(format!("{b}/v2/a/b/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(r.headers().contains_key("docker-upload-uuid"));

    let r = c
        .patch(format!("{b}{loc}"))
        .header("content-range", "0-99999")
        .body(data[..100_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-99999");

    // Out of order: refused with 416, nothing applied.
    let r = c
        .patch(format!("{b}{loc}"))
        .header("content-range", "200000-299999")
        .body(data[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);

    // Resume: ask where we are.
    let r = c.get(format!("{b}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-99999");

    let r = c
        .patch(format!("{b}{loc}"))
        .header("content-range", "100000-199999")
        .body(data[100_000..200_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Last chunk goes with the PUT.
    let r = c
        .put(format!("{b}{loc}?digest={d}"))
        .body(data[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    assert_eq!(
        r.headers()["location"],
        format!("/v2/a/b/blobs/{d}").as_str()
    );

    let r = c
        .head(format!("{b}/v2/a/b/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "300000");
    let r = c.get(format!("{b}/v2/a/b/blobs/{d}")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    let r = c
        .get(format!("{b}/v2/a/b/blobs/{d}"))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 1000-1999/300000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[1000..2000]);
    let r = c
        .get(format!("{b}/v2/a/b/blobs/{d}"))
        .header("range", "bytes=400000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);

    // Finished sessions are gone.
    let r = c.get(format!("{b}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    reg.shutdown().await;
}

#[tokio::test]
async fn mount_link_and_blob_delete() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let b = base(&reg);
    let c = reqwest::Client::new();
    let d = push_blob(&c, &b, "src", b"shared layer").await;
    let r = c
        .head(format!("{b}/v2/dst/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{b}/v2/dst/blobs/uploads/?mount={d}&from=src"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    let r = c
        .head(format!("{b}/v2/dst/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Mount from a repository that lacks the blob falls back to an upload session.
    let other = digest(b"nowhere");
    let r = c
        .post(format!("{b}/v2/dst/blobs/uploads/?mount={other}&from=src"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.delete(format!("{b}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), 204);

    let r = c
        .delete(format!("{b}/v2/dst/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .head(format!("{b}/v2/dst/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .head(format!("{b}/v2/src/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    reg.shutdown().await;
}

#[tokio::test]
async fn manifests_tags_catalog_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let mut events = reg.registry().subscribe();
    let b = base(&reg);
    let c = reqwest::Client::new();
    let cfg = push_blob(&c, &b, "app", b"{}").await;
    let layer = push_blob(&c, &b, "app", b"layer-bytes").await;
    let m = serde_json::to_vec(&image_manifest((&cfg, 2), &[(&layer, 11)])).unwrap();
    let md = digest(&m);
    for tag in ["v1", "v2", "v3", "latest"] {
        let r = put_manifest(&c, &b, "app", tag, OCI_MANIFEST, &m).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    }
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.repository, "app");
    assert_eq!(ev.tag.as_deref(), Some("v1"));
    assert_eq!(ev.digest, md);
    assert_eq!(ev.media_type, OCI_MANIFEST);
    assert_eq!(ev.size, m.len() as u64);

    for reference in ["v1", md.as_str()] {
        let r = c
            .get(format!("{b}/v2/app/manifests/{reference}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);
    }
    let r = c
        .head(format!("{b}/v2/app/manifests/v2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], m.len().to_string().as_str());

    // Pagination with Link.
    let r = c
        .get(format!("{b}/v2/app/tags/list?n=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["link"],
        "</v2/app/tags/list?n=2&last=v1>; rel=\"next\""
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v, json!({"name": "app", "tags": ["latest", "v1"]}));
    let r = c
        .get(format!("{b}/v2/app/tags/list?n=2&last=v1"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["v2", "v3"]));
    let r = c
        .get(format!("{b}/v2/nope/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    push_blob(&c, &b, "zz/other", b"x").await;
    let r = c.get(format!("{b}/v2/_catalog?n=1")).send().await.unwrap();
    assert!(r.headers().contains_key("link"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["app"]));
    let r = c
        .get(format!("{b}/v2/_catalog?n=10&last=app"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["zz/other"]));

    assert_eq!(
        reg.registry().resolve("app", "latest").await.unwrap(),
        Some((md.clone(), OCI_MANIFEST.to_string()))
    );
    assert_eq!(reg.registry().resolve("app", "nope").await.unwrap(), None);

    // Delete a tag, then the manifest with its remaining tags.
    let mut events = reg.registry().subscribe();
    let r = c
        .delete(format!("{b}/v2/app/manifests/v3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.action, acr_task::registry::EventAction::Delete);
    assert_eq!(ev.tag.as_deref(), Some("v3"));
    assert_eq!(ev.digest, md);
    assert_eq!(ev.media_type, OCI_MANIFEST);
    let r = c
        .get(format!("{b}/v2/app/manifests/v3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = c
        .delete(format!("{b}/v2/app/manifests/{md}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c.get(format!("{b}/v2/app/tags/list")).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
    let tags = reg.registry().tags("app").await.unwrap().unwrap();
    assert!(tags.is_empty());
    reg.shutdown().await;
}

#[tokio::test]
async fn index_and_referrers_with_artifact_type_filter() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let b = base(&reg);
    let c = reqwest::Client::new();
    let cfg = push_blob(&c, &b, "multi", b"{}").await;
    let layer = push_blob(&c, &b, "multi", b"amd64").await;
    let m = serde_json::to_vec(&image_manifest((&cfg, 2), &[(&layer, 5)])).unwrap();
    let md = digest(&m);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": m.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    }))
    .unwrap();
    // The index's child must be pushed first.
    let r = put_manifest(&c, &b, "multi", "all", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let r = put_manifest(&c, &b, "multi", &md, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201);
    let r = put_manifest(&c, &b, "multi", "all", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 201);

    // Two artifacts referring to the image.
    let empty = push_blob(&c, &b, "multi", b"{}").await;
    let sig_blob = push_blob(&c, &b, "multi", b"signature").await;
    let mut refs = Vec::new();
    for (atype, ann) in [
        ("application/vnd.example.sig", "a"),
        ("application/vnd.example.sbom", "b"),
    ] {
        let art = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": atype,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sig_blob, "size": 9}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": md, "size": m.len()},
            "annotations": {"which": ann}
        }))
        .unwrap();
        let ad = digest(&art);
        let r = put_manifest(&c, &b, "multi", &ad, OCI_MANIFEST, &art).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["oci-subject"], md.as_str());
        refs.push(ad);
    }
    let r = c
        .get(format!("{b}/v2/multi/referrers/{md}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    let r = c
        .get(format!(
            "{b}/v2/multi/referrers/{md}?artifactType=application/vnd.example.sbom"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["artifactType"], "application/vnd.example.sbom");
    assert_eq!(list[0]["annotations"]["which"], "b");
    assert_eq!(list[0]["digest"], refs[1].as_str());
    let none = digest(b"no such subject");
    let r = c
        .get(format!("{b}/v2/multi/referrers/{none}"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"], json!([]));
    reg.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_spec_errors_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let b = base(&reg);
    let c = reqwest::Client::new();

    // Wrong digest, monolithic and chunked.
    let wrong = digest(b"something else");
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/?digest={wrong}"))
        .body(b"payload".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    c.patch(format!("{b}{loc}"))
        .body(b"payload".to_vec())
        .send()
        .await
        .unwrap();
    let r = c
        .put(format!("{b}{loc}?digest={wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .head(format!("{b}/v2/r/blobs/{}", digest(b"payload")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/?digest=sha256:nothex"))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .put(format!(
            "{b}/v2/r/blobs/uploads/00000000-0000-0000-0000-000000000000?digest={wrong}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // A chunk shorter than its Content-Range is refused and not applied.
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c
        .patch(format!("{b}{loc}"))
        .header("content-range", "0-99")
        .body(vec![1u8; 50])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = c.get(format!("{b}{loc}")).send().await.unwrap();
    assert_eq!(r.headers()["range"], "0-0");

    // Invalid names.
    let long = "a".repeat(256);
    for name in ["Upper", "_lead", "a//b", "a-", long.as_str()] {
        let r = c
            .post(format!("{b}/v2/{name}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{name}");
        assert_eq!(error_code(r).await, "NAME_INVALID", "{name}");
    }

    // HTTP clients normalise `..` away, so send that one by hand.
    let status = raw_status(reg.addr(), "POST /v2/a/../b/blobs/uploads/").await;
    assert_eq!(status, 400, "a/../b");

    // Manifests.
    let cfg = push_blob(&c, &b, "r", b"{}").await;
    let missing = digest(b"never pushed");
    let m = serde_json::to_vec(&image_manifest((&cfg, 2), &[(&missing, 12)])).unwrap();
    let r = put_manifest(&c, &b, "r", "v1", OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let r = put_manifest(&c, &b, "r", "v1", OCI_MANIFEST, b"{not json").await;
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let r = put_manifest(
        &c,
        &b,
        "r",
        "v1",
        "application/x-weird",
        b"{\"schemaVersion\":2}",
    )
    .await;
    assert_eq!(r.status(), 415);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    let ok = serde_json::to_vec(&image_manifest((&cfg, 2), &[])).unwrap();
    let r = put_manifest(&c, &b, "r", "-bad-tag", OCI_MANIFEST, &ok).await;
    assert_eq!(r.status(), 400);
    // GET and HEAD of a reference that is no valid tag: unknown, as the spec's
    // conformance suite expects (no manifest can have such a tag).
    for bad in [".bad", "-bad-tag", &"t".repeat(129)] {
        let r = c
            .get(format!("{b}/v2/r/manifests/{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{bad}");
        assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
        let r = c
            .head(format!("{b}/v2/r/manifests/{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{bad}");
    }
    let r = put_manifest(&c, &b, "r", &wrong, OCI_MANIFEST, &ok).await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let mut huge = image_manifest((&cfg, 2), &[]);
    huge["annotations"] = json!({"pad": "x".repeat(4 * 1024 * 1024)});
    let r = put_manifest(
        &c,
        &b,
        "r",
        "big",
        OCI_MANIFEST,
        &serde_json::to_vec(&huge).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "SIZE_INVALID");

    let r = c.get(format!("{b}/v2/r/tags/list")).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!([]), "nothing was tagged");
    let store = reg.registry().store().clone();
    reg.shutdown().await;
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.issues);
    assert_eq!(report.manifests_checked, 0);
    assert_eq!(report.blobs_checked, 1, "only the config blob was stored");
}

/// Status code of a request written straight to the socket (no path normalisation).
async fn raw_status(addr: std::net::SocketAddr, request_line: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{request_line} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn truncated_body_is_refused_and_leaves_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let data = vec![7u8; 100];
    let d = digest(&data);
    let mut s = tokio::net::TcpStream::connect(reg.addr()).await.unwrap();
    s.write_all(
        format!(
            "POST /v2/t/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&data[..10]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let c = reqwest::Client::new();
    let r = c
        .head(format!("{}/v2/t/blobs/{d}", base(&reg)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let store = reg.registry().store().clone();
    reg.shutdown().await;
    let leftovers = std::fs::read_dir(dir.path().join("uploads"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "the partial upload was removed");
    assert_eq!(blob_digests(&store), Vec::<String>::new());
}

/// Each file in `tests/data/registry/bad-manifests` is named `<EXPECTED_CODE>--<case>.json`.
#[tokio::test]
async fn bad_manifest_fixtures_get_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let b = base(&reg);
    let c = reqwest::Client::new();
    push_blob(&c, &b, "fx", b"{}").await;
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/registry/bad-manifests");
    let mut n = 0;
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let expected = name.split("--").next().unwrap();
        let body = std::fs::read(&path).unwrap();
        let r = put_manifest(&c, &b, "fx", "v1", OCI_MANIFEST, &body).await;
        assert_eq!(r.status(), 400, "{name}");
        assert_eq!(error_code(r).await, expected, "{name}");
        n += 1;
    }
    assert!(n >= 8);
    let r = c.get(format!("{b}/v2/fx/tags/list")).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
    reg.shutdown().await;
}

#[tokio::test]
async fn oversized_manifest_without_content_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let chunks =
        (0..5).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1024 * 1024])));
    let r = reqwest::Client::new()
        .put(format!("{}/v2/big/manifests/v1", base(&reg)))
        .header("content-type", OCI_MANIFEST)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "SIZE_INVALID");
    reg.shutdown().await;
}
