//! Manifests (OCI image manifest and index, Docker schema 2 manifest and list, artifacts),
//! tag listing, the catalog and the referrers API.

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::names::{parse_digest, parse_reference};
use super::routes::{respond, Q};
use super::{current_context, Registry, MAX_MANIFEST_BYTES};
use crate::store::{Descriptor, NewManifest, Reference, StoreError};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

fn is_index(mt: &str) -> bool {
    mt == OCI_INDEX || mt == DOCKER_LIST
}

/// What a manifest body tells us, checked against the spec's required shape.
struct Parsed {
    media_type: String,
    artifact_type: Option<String>,
    subject: Option<String>,
    blobs: Vec<Descriptor>,
    children: Vec<Descriptor>,
}

fn descriptor_digest(d: &Value, what: &str) -> Result<String, ApiError> {
    descriptor(d, what).map(|d| d.digest)
}

/// A descriptor's digest and size, checked against the spec's required fields.
fn descriptor(d: &Value, what: &str) -> Result<Descriptor, ApiError> {
    if !d.is_object() {
        return Err(ApiError::manifest_invalid(format!(
            "{what} is not a descriptor"
        )));
    }
    let digest = d
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::manifest_invalid(format!("{what} has no digest")))?;
    let Some(size) = d.get("size").and_then(Value::as_u64) else {
        return Err(ApiError::manifest_invalid(format!(
            "{what} has no valid size"
        )));
    };
    if d.get("mediaType").and_then(Value::as_str).is_none() {
        return Err(ApiError::manifest_invalid(format!(
            "{what} has no mediaType"
        )));
    }
    let digest = parse_digest(digest)
        .map_err(|e| ApiError::manifest_invalid(format!("{what}: {}", e.message)))?;
    Ok(Descriptor { digest, size })
}

fn parse_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::manifest_invalid(format!("manifest is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::manifest_invalid("manifest is not a JSON object"));
    }
    let field = v.get("mediaType").and_then(Value::as_str);
    let known = |m: &str| [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&m);
    let media_type = match (content_type, field) {
        (Some(c), Some(f)) if c != f && known(c) => {
            return Err(ApiError::manifest_invalid(format!(
                "Content-Type {c} does not match mediaType {f}"
            )))
        }
        (_, Some(f)) => f,
        (Some(c), None) => c,
        (None, None) => return Err(ApiError::manifest_invalid("manifest has no media type")),
    };
    if !known(media_type) {
        return Err(ApiError::unsupported(format!(
            "manifest media type {media_type} is not supported"
        )));
    }
    if v.get("schemaVersion").and_then(Value::as_i64) != Some(2) {
        return Err(ApiError::manifest_invalid("schemaVersion must be 2"));
    }
    let subject = match v.get("subject") {
        None | Some(Value::Null) => None,
        Some(s) => Some(descriptor_digest(s, "subject")?),
    };
    let artifact_type = super::artifact_type_of(&v);
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    if is_index(media_type) {
        let list = v
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::manifest_invalid("index has no manifests array"))?;
        for (i, m) in list.iter().enumerate() {
            children.push(descriptor(m, &format!("manifests[{i}]"))?);
        }
    } else {
        let config = v
            .get("config")
            .ok_or_else(|| ApiError::manifest_invalid("manifest has no config"))?;
        blobs.push(descriptor(config, "config")?);
        let layers = v
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::manifest_invalid("manifest has no layers array"))?;
        for (i, l) in layers.iter().enumerate() {
            let d = descriptor(l, &format!("layers[{i}]"))?;
            // Foreign (non-distributable) layers live elsewhere and are never uploaded here.
            if l.get("urls").is_none() {
                blobs.push(d);
            }
        }
    }
    Ok(Parsed {
        media_type: media_type.to_string(),
        artifact_type,
        subject,
        blobs,
        children,
    })
}

/// A stored manifest's bytes as the store takes them, parsed by the rules of a push (the
/// upgrade's copy of a Classic registry's manifests). `media_type` is used when the
/// manifest names none.
pub(crate) fn to_store(
    repo: &str,
    digest: &str,
    content: &[u8],
    media_type: &str,
    tag: Option<String>,
) -> Result<NewManifest, ApiError> {
    let parsed = parse_manifest(content, Some(media_type))?;
    Ok(NewManifest {
        repo: repo.to_string(),
        digest: digest.to_string(),
        media_type: parsed.media_type,
        artifact_type: parsed.artifact_type,
        subject: parsed.subject,
        content: content.to_vec(),
        blobs: parsed.blobs,
        children: parsed.children,
        tag,
        sealed: None,
    })
}

pub(super) async fn put(
    reg: &Registry,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let reference = parse_reference(reference)?;
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "SIZE_INVALID",
            format!("manifest exceeds {MAX_MANIFEST_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_MANIFEST_BYTES) {
        return Err(too_big());
    }
    let bytes = axum::body::to_bytes(body, MAX_MANIFEST_BYTES + 1)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"))
            {
                too_big()
            } else {
                ApiError::manifest_invalid(format!("manifest body: {e}"))
            }
        })?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(too_big());
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
    let (digest, subject) = store_manifest(
        reg,
        name,
        &reference,
        &bytes,
        ct.as_deref(),
        current_context(),
    )
    .await?;
    let mut hdrs = vec![
        ("Location", format!("/v2/{name}/manifests/{digest}")),
        ("Docker-Content-Digest", digest),
        ("Content-Length", "0".to_string()),
    ];
    if let Some(s) = subject {
        hdrs.push(("OCI-Subject", s));
    }
    Ok(respond(StatusCode::CREATED, &hdrs, Body::empty()))
}

/// Stores a manifest pushed as `reference` (a tag, or the digest it must have), checked as
/// a push is, with its push event: its digest and subject. Every manifest push (HTTP,
/// import) is made here.
pub(crate) async fn store_manifest(
    reg: &Registry,
    name: &str,
    reference: &Reference,
    bytes: &[u8],
    content_type: Option<&str>,
    ctx: super::RequestContext,
) -> Result<(String, Option<String>), ApiError> {
    let parsed = parse_manifest(bytes, content_type)?;
    // Named by digest: by that digest's algorithm (sha256 or sha512); else sha256.
    let alg = match reference {
        Reference::Digest(d) => crate::digest::parse(d).unwrap_or(crate::digest::Algorithm::Sha256),
        Reference::Tag(_) => crate::digest::Algorithm::Sha256,
    };
    let digest = crate::digest::of_bytes(alg, bytes);
    let tag = match reference {
        Reference::Digest(d) if *d != digest => {
            return Err(ApiError::digest_invalid(format!(
                "manifest digest {digest} does not match {d}"
            )))
        }
        Reference::Digest(_) => None,
        Reference::Tag(t) => Some(t.clone()),
    };
    let m = NewManifest {
        repo: name.to_string(),
        digest: digest.clone(),
        media_type: parsed.media_type.clone(),
        artifact_type: parsed.artifact_type,
        subject: parsed.subject.clone(),
        content: bytes.to_vec(),
        blobs: parsed.blobs,
        children: parsed.children,
        tag,
        sealed: None,
    };
    let store = reg.inner.store.clone();
    let event = blocking(move || super::service::push_manifest(&store, &m, &ctx)).await?;
    reg.announce(vec![event]);
    Ok((digest, parsed.subject))
}

pub(super) async fn get(
    reg: &Registry,
    name: &str,
    reference: &str,
    head: bool,
) -> Result<Response, ApiError> {
    // No manifest can be known by a tag that is not a valid one: unknown, as the
    // distribution spec's conformance suite expects (a push with it is invalid).
    if !reference.contains(':') && !super::names::valid_tag(reference) {
        return Err(ApiError::manifest_unknown(reference));
    }
    let r = parse_reference(reference)?;
    let by_tag = matches!(r, Reference::Tag(_));
    let store = reg.inner.store.clone();
    let n = name.to_string();
    let Some((row, denial)) = blocking(move || {
        let Some(row) = store.get_manifest(&n, &r)? else {
            return Ok(None);
        };
        // Content trust guards pulls by tag: a digest names content the puller chose.
        let denial = match by_tag {
            true => super::trust::check(&store, &n, &row)?,
            false => None,
        };
        Ok(Some((row, denial)))
    })
    .await?
    else {
        return Err(ApiError::manifest_unknown(reference));
    };
    if let Some(d) = denial {
        // The digest goes with the refusal: a signer can then sign what the tag names.
        let mut resp = axum::response::IntoResponse::into_response(ApiError::denied(d.to_string()));
        if let Ok(v) = axum::http::HeaderValue::from_str(&row.digest) {
            resp.headers_mut().insert("docker-content-digest", v);
        }
        return Ok(resp);
    }
    let hdrs = [
        ("Content-Type", row.media_type.clone()),
        ("Content-Length", row.size.to_string()),
        ("Docker-Content-Digest", row.digest.clone()),
        ("ETag", format!("\"{}\"", row.digest)),
    ];
    let body = if head {
        Body::empty()
    } else {
        Body::from(row.content)
    };
    Ok(respond(StatusCode::OK, &hdrs, body))
}

pub(super) async fn delete(
    reg: &Registry,
    name: &str,
    reference: &str,
) -> Result<Response, ApiError> {
    let r = parse_reference(reference)?;
    let store = reg.inner.store.clone();
    let n = name.to_string();
    match r {
        Reference::Digest(d) => {
            let ctx = current_context();
            let deleted =
                blocking(move || super::service::delete_manifest(&store, &n, &d, &ctx)).await?;
            let Some(events) = deleted else {
                return Err(ApiError::manifest_unknown(reference));
            };
            reg.announce(events);
        }
        Reference::Tag(t) => {
            let ctx = current_context();
            let deleted =
                blocking(move || super::service::delete_tag(&store, &n, &t, &ctx)).await?;
            let Some(ev) = deleted else {
                return Err(ApiError::manifest_unknown(reference));
            };
            reg.announce(vec![ev]);
        }
    }
    Ok(respond(
        StatusCode::ACCEPTED,
        &[("Content-Length", "0".into())],
        Body::empty(),
    ))
}

fn page_params(q: &Q) -> Result<(Option<usize>, Option<String>), ApiError> {
    let n = match q.get("n") {
        None => None,
        Some(s) => Some(s.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                "invalid n",
            )
        })?),
    };
    Ok((n, q.get("last").cloned()))
}

fn json_response(v: Value, link: Option<String>, content_type: &str) -> Response {
    let body = v.to_string();
    let mut hdrs = vec![
        ("Content-Type", content_type.to_string()),
        ("Content-Length", body.len().to_string()),
    ];
    if let Some(l) = link {
        hdrs.push(("Link", l));
    }
    respond(StatusCode::OK, &hdrs, Body::from(body))
}

pub(super) async fn tags_list(reg: &Registry, name: &str, q: &Q) -> Result<Response, ApiError> {
    let (n, last) = page_params(q)?;
    let store = reg.inner.store.clone();
    let nm = name.to_string();
    let Some(tags) = blocking(move || store.list_tags(&nm, n, last.as_deref())).await? else {
        return Err(ApiError::name_unknown(name));
    };
    let link = match (n, tags.last()) {
        (Some(n), Some(l)) if tags.len() == n => Some(format!(
            "</v2/{name}/tags/list?n={n}&last={l}>; rel=\"next\""
        )),
        _ => None,
    };
    Ok(json_response(
        json!({ "name": name, "tags": tags }),
        link,
        "application/json",
    ))
}

pub(super) async fn catalog(reg: &Registry, q: &Q) -> Result<Response, ApiError> {
    let (n, last) = page_params(q)?;
    let store = reg.inner.store.clone();
    let repos = blocking(move || store.list_repositories(n, last.as_deref())).await?;
    let link = match (n, repos.last()) {
        (Some(n), Some(l)) if repos.len() == n => {
            Some(format!("</v2/_catalog?n={n}&last={l}>; rel=\"next\""))
        }
        _ => None,
    };
    Ok(json_response(
        json!({ "repositories": repos }),
        link,
        "application/json",
    ))
}

pub(super) async fn referrers(
    reg: &Registry,
    name: &str,
    digest: &str,
    q: &Q,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let store = reg.inner.store.clone();
    let n = name.to_string();
    let rows = blocking(move || store.referrers(&n, &digest)).await?;
    let filter = q.get("artifactType");
    let manifests: Vec<Value> = rows
        .into_iter()
        .filter(|r| filter.is_none() || r.artifact_type.as_ref() == filter)
        .map(|r| {
            let mut d = json!({
                "mediaType": r.media_type,
                "digest": r.digest,
                "size": r.size,
            });
            if let Some(a) = &r.artifact_type {
                d["artifactType"] = json!(a);
            }
            if let Ok(v) = serde_json::from_slice::<Value>(&r.content) {
                if let Some(a) = v.get("annotations").filter(|a| a.is_object()) {
                    d["annotations"] = a.clone();
                }
            }
            d
        })
        .collect();
    let mut resp = json_response(
        json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests }),
        None,
        OCI_INDEX,
    );
    if filter.is_some() {
        resp.headers_mut().insert(
            "OCI-Filters-Applied",
            axum::http::HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_lists_config_and_layers_but_not_foreign_layers() {
        let m = json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": d('a'), "size": 1},
            "layers": [
                {"mediaType": "x", "digest": d('b'), "size": 2},
                {"mediaType": "y", "digest": d('c'), "size": 3, "urls": ["http://x"]}
            ]
        });
        let p = parse_manifest(m.to_string().as_bytes(), Some(DOCKER_MANIFEST)).unwrap();
        let want = |c, size| Descriptor { digest: d(c), size };
        assert_eq!(p.blobs, vec![want('a', 1), want('b', 2)]);
        assert_eq!(p.media_type, DOCKER_MANIFEST);
    }

    #[test]
    fn bad_manifests_are_refused_with_the_right_code() {
        let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
            (b"not json".to_vec(), Some(OCI_MANIFEST), "MANIFEST_INVALID"),
            (b"{}".to_vec(), Some("application/x-unknown"), "UNSUPPORTED"),
            (br#"{"schemaVersion":1}"#.to_vec(), Some(OCI_MANIFEST), "MANIFEST_INVALID"),
            (
                json!({"schemaVersion":2,"mediaType":OCI_INDEX,"manifests":[]}).to_string().into_bytes(),
                Some(OCI_MANIFEST),
                "MANIFEST_INVALID",
            ),
            (
                json!({"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1},"layers":[]})
                    .to_string()
                    .into_bytes(),
                Some(OCI_MANIFEST),
                "MANIFEST_INVALID",
            ),
        ];
        for (body, ct, code) in cases {
            match parse_manifest(&body, ct) {
                Err(e) => assert_eq!(e.code, code, "{}", String::from_utf8_lossy(&body)),
                Ok(_) => panic!("accepted {}", String::from_utf8_lossy(&body)),
            }
        }
    }

    #[test]
    fn artifact_type_falls_back_to_config_media_type() {
        let m = json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.example.sbom", "digest": d('a'), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d('f'), "size": 10}
        });
        let p = parse_manifest(m.to_string().as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.example.sbom")
        );
        assert_eq!(p.subject, Some(d('f')));
    }

    proptest::proptest! {
        #[test]
        fn manifest_parsing_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_manifest(&body, Some(OCI_MANIFEST));
            let _ = parse_manifest(&body, None);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let keys = prop::sample::select(vec![
            "schemaVersion",
            "mediaType",
            "config",
            "layers",
            "manifests",
            "subject",
            "digest",
            "size",
            "urls",
            "artifactType",
            "annotations",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            Just(json!(2)),
            Just(json!(OCI_MANIFEST)),
            Just(json!(OCI_INDEX)),
            Just(json!(format!("sha256:{}", "a".repeat(64)))),
            "[ -~]{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(keys.clone(), inner, 0..6).prop_map(|m| {
                    Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    proptest::proptest! {
        /// Any body, shaped like a manifest or not, is accepted or refused with a spec
        /// error: never a panic. (Run more: `PROPTEST_CASES=20000`.)
        #[test]
        fn manifest_parser_never_panics(
            v in json_value(),
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            ct in proptest::sample::select(vec![None, Some(OCI_MANIFEST), Some(OCI_INDEX), Some(DOCKER_MANIFEST), Some("text/plain")]),
        ) {
            let _ = parse_manifest(v.to_string().as_bytes(), ct);
            let _ = parse_manifest(&raw, ct);
        }
    }
}
