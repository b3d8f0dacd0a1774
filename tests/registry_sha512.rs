//! sha512 wherever a digest appears, as the OCI distribution spec's conformance suite
//! (main branch) pushes and pulls it: blob uploads (monolithic, POST then PUT, chunked,
//! streamed), HEAD/GET/DELETE of blobs, cross-repository mounts, manifests pushed and
//! fetched by a sha512 digest, referrers of a sha512 subject; and refusals for a wrong
//! sha512 and for an algorithm that is not registered.

mod registry_common;

use registry_common::*;
use serde_json::json;
use sha2::Digest;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)))
}

fn location(base: &str, r: &reqwest::Response) -> String {
    let l = r.headers()["location"].to_str().unwrap().to_string();
    if l.starts_with("http") {
        l
    } else {
        format!("{base}{l}")
    }
}

/// `url` with `k=v` added to its query.
fn with_query(url: &str, k: &str, v: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{k}={v}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha512_digests_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start_in(dir.path()).await;
    let b = base(&reg);
    let c = reqwest::Client::new();

    // Monolithic: POST ?digest= with the body.
    let config = br#"{"architecture":"amd64","os":"linux","sha512":true}"#.to_vec();
    let cd = sha512(&config);
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/?digest={cd}"))
        .header("content-type", "application/octet-stream")
        .body(config.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], cd.as_str());

    // POST, then PUT ?digest= with the body.
    let one = b"layer one, pushed with POST then PUT".to_vec();
    let d1 = sha512(&one);
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let url = location(&b, &r);
    let r = c
        .put(with_query(&url, "digest", &d1))
        .header("content-type", "application/octet-stream")
        .body(one.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Chunked: PATCH with Content-Range twice, then PUT.
    let two: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d2 = sha512(&two);
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let mut url = location(&b, &r);
    let (first, second) = two.split_at(60_000);
    for (start, chunk) in [(0usize, first), (60_000, second)] {
        let r = c
            .patch(&url)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{start}-{}", start + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        url = location(&b, &r);
    }
    let r = c.put(with_query(&url, "digest", &d2)).send().await.unwrap();
    assert_eq!(r.status(), 201);

    // Streamed: one PATCH without Content-Range, then PUT.
    let three = b"layer three, streamed".to_vec();
    let d3 = sha512(&three);
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let url = location(&b, &r);
    let r = c.patch(&url).body(three.clone()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let url = location(&b, &r);
    let r = c.put(with_query(&url, "digest", &d3)).send().await.unwrap();
    assert_eq!(r.status(), 201);

    // A sha512 that the content does not have is refused, and nothing is stored.
    let wrong = sha512(b"something else");
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/?digest={wrong}"))
        .body(b"not that".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .head(format!("{b}/v2/r/blobs/{wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // An algorithm that is not registered: unsupported, said as DIGEST_INVALID.
    let r = c
        .post(format!(
            "{b}/v2/r/blobs/uploads/?digest=blake3:{}",
            "a".repeat(64)
        ))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    // HEAD and GET by sha512.
    for (d, data) in [(&d1, &one), (&d2, &two), (&d3, &three)] {
        let r = c.head(format!("{b}/v2/r/blobs/{d}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{d}");
        assert_eq!(
            r.headers()["content-length"],
            data.len().to_string().as_str()
        );
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
        let got = c
            .get(format!("{b}/v2/r/blobs/{d}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], &data[..]);
    }

    // Mount into another repository.
    let r = c
        .post(format!("{b}/v2/other/blobs/uploads/?mount={d1}&from=r"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], d1.as_str());
    let r = c
        .head(format!("{b}/v2/other/blobs/{d1}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A manifest of sha512 blobs, pushed and fetched by its own sha512 digest.
    let m = serde_json::to_vec(&image_manifest(
        (&cd, config.len()),
        &[(&d1, one.len()), (&d2, two.len()), (&d3, three.len())],
    ))
    .unwrap();
    let md = sha512(&m);
    let r = put_manifest(&c, &b, "r", &md, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    let r = c
        .get(format!("{b}/v2/r/manifests/{md}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    assert_eq!(&r.bytes().await.unwrap()[..], &m[..]);
    // Named by a sha512 that is not its content's: refused.
    let r = put_manifest(&c, &b, "r", &wrong, OCI_MANIFEST, &m).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    // A referrer of the sha512 subject, itself pushed by sha512.
    let empty = b"{}".to_vec();
    let ed = sha512(&empty);
    let r = c
        .post(format!("{b}/v2/r/blobs/uploads/?digest={ed}"))
        .body(empty.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sig = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": md, "size": m.len()},
    }))
    .unwrap();
    let sd = sha512(&sig);
    let r = put_manifest(&c, &b, "r", &sd, OCI_MANIFEST, &sig).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["oci-subject"], md.as_str());
    let v: serde_json::Value = c
        .get(format!("{b}/v2/r/referrers/{md}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"][0]["digest"], sd.as_str(), "{v}");
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.signature"
    );

    // fsck re-hashes every blob and manifest by the algorithm it is named by.
    let store = reg.registry().store().clone();
    let report = store.fsck().unwrap();
    assert!(report.is_clean(), "{:?}", report.issues);

    // DELETE of the manifest and of a blob by sha512.
    let r = c
        .delete(format!("{b}/v2/r/manifests/{sd}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .delete(format!("{b}/v2/r/blobs/{d3}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c.head(format!("{b}/v2/r/blobs/{d3}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // gc finds sha512 blobs as it finds sha256 ones: once nothing references them.
    let r = c
        .delete(format!("{b}/v2/r/manifests/{md}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let gc = store.gc(0, false).unwrap();
    assert!(gc.blobs.contains(&d2), "{:?}", gc.blobs);
    assert!(!blob_digests(&store).contains(&d2), "gc removed {d2}");
    assert!(store.fsck().unwrap().is_clean());
    reg.shutdown().await;
}
