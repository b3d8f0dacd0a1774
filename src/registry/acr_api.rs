//! ACR's own API for a repository's tags and manifests (`/acr/v1/{name}/_tags`,
//! `/_manifests`), as acr-cli reads them for `acr purge`: times, attributes, and (acr-task's
//! additions) each manifest's subject and references, so a client can plan a purge that
//! never deletes from under an index or a referrer. Deletes here are conditional: a tag only
//! while it names the digest in `If-Match`, a manifest only while nothing names it.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::names::parse_digest;
use super::routes::respond;
use super::{current_context, Registry};
use crate::store::{Attributes, StoreError};

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

fn time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn attributes(a: Option<&Attributes>) -> Value {
    let a = a.copied().unwrap_or(Attributes {
        write_enabled: true,
        delete_enabled: true,
    });
    json!({
        "deleteEnabled": a.delete_enabled,
        "writeEnabled": a.write_enabled,
        "readEnabled": true,
        "listEnabled": true,
    })
}

fn json_ok(v: Value) -> Response {
    respond(
        StatusCode::OK,
        &[("Content-Type", "application/json".into())],
        Body::from(v.to_string()),
    )
}

/// What the listings are made of: the repository's view and its locks.
async fn view(
    reg: &Registry,
    name: &str,
) -> Result<(crate::store::RepoView, Vec<crate::store::Lock>), ApiError> {
    let store = reg.inner.store.clone();
    let n = name.to_string();
    let found = blocking(move || Ok((store.repo_view(&n)?, store.locks(&n)?))).await?;
    match found {
        (Some(v), locks) => Ok((v, locks)),
        (None, _) => Err(ApiError::name_unknown(name)),
    }
}

fn repo_attributes(locks: &[crate::store::Lock]) -> Value {
    attributes(
        locks
            .iter()
            .find(|l| l.tag.is_none())
            .map(|l| &l.attributes),
    )
}

/// `GET /acr/v1/{name}/_tags`: every tag with its digest, times and attributes.
pub(super) async fn tags(reg: &Registry, name: &str) -> Result<Response, ApiError> {
    let (v, locks) = view(reg, name).await?;
    let tags: Vec<Value> = v
        .tags
        .iter()
        .map(|t| {
            let lock = locks
                .iter()
                .find(|l| l.tag.as_deref() == Some(t.tag.as_str()));
            json!({
                "name": t.tag,
                "digest": t.digest,
                "createdTime": time(t.updated),
                "lastUpdateTime": time(t.updated),
                "signed": false,
                "changeableAttributes": attributes(lock.map(|l| &l.attributes)),
            })
        })
        .collect();
    Ok(json_ok(json!({
        "imageName": name,
        "changeableAttributes": repo_attributes(&locks),
        "tags": tags,
    })))
}

/// `GET /acr/v1/{name}/_manifests`: every manifest with its times and tags, and the
/// manifest it refers to (`subject`) and those it names (`references`, an index's).
pub(super) async fn manifests(reg: &Registry, name: &str) -> Result<Response, ApiError> {
    let (v, locks) = view(reg, name).await?;
    let manifests: Vec<Value> = v
        .manifests
        .iter()
        .map(|m| {
            let tags: Vec<&str> = v
                .tags
                .iter()
                .filter(|t| t.digest == m.digest)
                .map(|t| t.tag.as_str())
                .collect();
            json!({
                "digest": m.digest,
                "createdTime": time(m.created),
                "lastUpdateTime": time(m.created),
                "tags": tags,
                "subject": m.subject,
                "references": m.children,
                "changeableAttributes": attributes(None),
            })
        })
        .collect();
    Ok(json_ok(json!({
        "imageName": name,
        "changeableAttributes": repo_attributes(&locks),
        "manifests": manifests,
    })))
}

fn accepted() -> Response {
    respond(
        StatusCode::ACCEPTED,
        &[("Content-Length", "0".into())],
        Body::empty(),
    )
}

fn precondition(m: String) -> ApiError {
    ApiError::new(StatusCode::PRECONDITION_FAILED, "PRECONDITION_FAILED", m)
}

/// `DELETE /acr/v1/{name}/_tags/{tag}`, with `If-Match: "DIGEST"` only while the tag
/// still names that digest (a tag pushed again meanwhile stays: 412).
pub(super) async fn delete_tag(
    reg: &Registry,
    name: &str,
    tag: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if !super::names::valid_tag(tag) {
        return Err(ApiError::manifest_unknown(tag));
    }
    let want = match headers.get("if-match").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(parse_digest(v.trim().trim_matches('"'))?),
        None => None,
    };
    let store = reg.inner.store.clone();
    let (n, t) = (name.to_string(), tag.to_string());
    let ctx = current_context();
    let Some(digest) = want else {
        let deleted = blocking(move || super::service::delete_tag(&store, &n, &t, &ctx)).await?;
        let ev = deleted.ok_or_else(|| ApiError::manifest_unknown(tag))?;
        reg.announce(vec![ev]);
        return Ok(accepted());
    };
    let pair = vec![(t, digest.clone())];
    let (done, events) =
        blocking(move || super::service::delete_tags_if(&store, &n, &pair, &ctx)).await?;
    if done.is_empty() {
        return Err(precondition(format!(
            "{name}:{tag} does not name {digest} now (pushed again, or gone): kept"
        )));
    }
    reg.announce(events);
    Ok(accepted())
}

/// `DELETE /acr/v1/{name}/_manifests/{digest}`: only while no tag, index or referrer names
/// it (and it is no referrer itself); otherwise 412, and it stays.
pub(super) async fn delete_manifest(
    reg: &Registry,
    name: &str,
    digest: &str,
) -> Result<Response, ApiError> {
    let d = parse_digest(digest)?;
    let store = reg.inner.store.clone();
    let n = name.to_string();
    let ctx = current_context();
    let list = vec![d];
    let (done, events) =
        blocking(move || super::service::delete_unreferenced(&store, &n, &list, &ctx)).await?;
    if done.is_empty() {
        return Err(precondition(format!(
            "{name}@{digest} is named by a tag, an index or a referrer, or is gone: kept"
        )));
    }
    reg.announce(events);
    Ok(accepted())
}
