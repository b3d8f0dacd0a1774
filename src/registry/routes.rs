//! `/v2/...` routing: axum cannot express names with `/` in them, so one wildcard route
//! hands the path to [`names::parse_route`] and dispatches on method.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

use super::errors::ApiError;
use super::names::{parse_acr_route, parse_route, valid_name, Route};
use super::{blobs, manifests, Registry, RequestContext, REQUEST_CONTEXT};
use crate::auth::http::{token_router, Need};
use crate::auth::Auth;

const API_VERSION: &str = "Docker-Distribution-API-Version";

pub(super) fn router(reg: Registry) -> Router {
    Router::new()
        .route("/v2", any(base))
        .route("/v2/", any(base))
        .route("/v2/{*rest}", any(dispatch))
        .route("/acr/v1/{*rest}", any(dispatch_acr))
        .layer(axum::middleware::from_fn(with_context))
        .with_state(reg)
}

/// The user behind a request, set by the auth gate for [`with_context`].
#[derive(Debug, Clone)]
pub(super) struct Actor(pub String);

/// Run the request with its [`RequestContext`] in scope, so events it raises carry it.
async fn with_context(req: Request, next: Next) -> Response {
    // Built in a block: a borrow of the (non-Sync) request must not live across the await.
    let ctx = {
        let h = |k: &str| {
            req.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        RequestContext {
            id: uuid::Uuid::new_v4().to_string(),
            host: h("host"),
            method: req.method().to_string(),
            useragent: h("user-agent"),
            actor: req
                .extensions()
                .get::<Actor>()
                .map(|a| a.0.clone())
                .unwrap_or_default(),
            replicated: None,
        }
    };
    REQUEST_CONTEXT.scope(ctx, next.run(req)).await
}

async fn base() -> Response {
    let mut r = (StatusCode::OK, [("content-type", "application/json")], "{}").into_response();
    r.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    r
}

pub(super) type Q = HashMap<String, String>;

async fn dispatch(State(reg): State<Registry>, Path(rest): Path<String>, req: Request) -> Response {
    let route = parse_route(&rest);
    dispatch_route(reg, route, format!("/v2/{rest}"), req).await
}

/// ACR's own API (`/acr/v1/...`), as acr-cli uses it; same gate, throttle and errors.
async fn dispatch_acr(
    State(reg): State<Registry>,
    Path(rest): Path<String>,
    req: Request,
) -> Response {
    let route = parse_acr_route(&rest);
    dispatch_route(reg, route, format!("/acr/v1/{rest}"), req).await
}

async fn dispatch_route(
    reg: Registry,
    route: Option<Route>,
    rest: String,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let result = match parse_query(parts.uri.query()) {
        Ok(mut q) => {
            if parts.extensions.get::<NoMount>().is_some() {
                // The gate found no pull on the mount's source: a plain upload instead.
                q.remove("mount");
                q.remove("from");
            }
            let client = parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip())
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
            match throttle(&reg, &method).await {
                Ok(()) => {
                    handle(
                        &reg,
                        &method,
                        route,
                        &rest,
                        client,
                        &q,
                        &parts.headers,
                        body,
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::error!(%method, path = %rest, code = e.code, "request failed");
            } else {
                tracing::debug!(%method, path = %rest, code = e.code, msg = %e.message, "request refused");
            }
            e.into_response()
        }
    };
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// The tier's request rates: one operation of the request's kind, or 429.
async fn throttle(reg: &Registry, method: &Method) -> Result<(), ApiError> {
    let store = reg.inner.store.clone();
    let props = match store.fresh_properties() {
        Some(p) => p,
        None => tokio::task::spawn_blocking(move || store.properties()).await??,
    };
    let op = super::throttle::Op::of(method);
    reg.inner
        .throttle
        .admit(op, &props.limits())
        .map_err(|secs| {
            let kind = match op {
                super::throttle::Op::Read => "read",
                super::throttle::Op::Write => "write",
            };
            ApiError::too_many(
                format!(
                    "the registry's {kind} operations a minute ({} tier) are used up: retry in \
                     {secs} s, or raise the rate (`acr-task registry update --sku <higher tier>` \
                     or `--{kind}-ops-limit N`)",
                    props.sku
                ),
                secs,
            )
        })
}

/// The query string, decoded once for both the access check and the handler. A key given
/// twice is refused: otherwise the gate could check one `from=` and the handler use another.
pub(super) fn parse_query(raw: Option<&str>) -> Result<Q, ApiError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Q::new());
    };
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            "malformed query string",
        )
    };
    let uri: axum::http::Uri = format!("/?{raw}").parse().map_err(|_| bad())?;
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&uri).map_err(|_| bad())?;
    let mut q = Q::new();
    for (k, v) in pairs {
        if q.contains_key(&k) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                format!("query parameter `{k}` is given more than once"),
            ));
        }
        q.insert(k, v);
    }
    Ok(q)
}

/// Set by the gate on an upload start whose caller may not pull the mount's source.
#[derive(Debug, Clone, Copy)]
struct NoMount;

fn check_name(name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::name_invalid(format!(
            "invalid repository name {name:?}"
        )))
    }
}

fn not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
        format!("method {method} not supported here"),
    )
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    reg: &Registry,
    method: &Method,
    route: Option<Route>,
    path: &str,
    client: std::net::IpAddr,
    q: &Q,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(route) = route else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no such endpoint: {path}"),
        ));
    };
    match route {
        Route::AcrTags(name)
        | Route::AcrManifests(name)
        | Route::AcrTag(name, _)
        | Route::AcrManifest(name, _)
            if !valid_name(&name) =>
        {
            check_name(&name)?;
            Err(not_allowed(method))
        }
        Route::AcrTags(name) => match *method {
            Method::GET => super::acr_api::tags(reg, &name).await,
            _ => Err(not_allowed(method)),
        },
        Route::AcrManifests(name) => match *method {
            Method::GET => super::acr_api::manifests(reg, &name).await,
            _ => Err(not_allowed(method)),
        },
        Route::AcrTag(name, tag) => match *method {
            Method::DELETE => super::acr_api::delete_tag(reg, &name, &tag, headers).await,
            _ => Err(not_allowed(method)),
        },
        Route::AcrManifest(name, digest) => match *method {
            Method::DELETE => super::acr_api::delete_manifest(reg, &name, &digest).await,
            _ => Err(not_allowed(method)),
        },
        Route::Catalog => match *method {
            Method::GET => manifests::catalog(reg, q).await,
            _ => Err(not_allowed(method)),
        },
        Route::Tags(name) => {
            check_name(&name)?;
            match *method {
                Method::GET => manifests::tags_list(reg, &name, q).await,
                _ => Err(not_allowed(method)),
            }
        }
        Route::Manifest(name, reference) => {
            check_name(&name)?;
            match *method {
                Method::GET => manifests::get(reg, &name, &reference, false).await,
                Method::HEAD => manifests::get(reg, &name, &reference, true).await,
                Method::PUT => manifests::put(reg, &name, &reference, headers, body).await,
                Method::DELETE => manifests::delete(reg, &name, &reference).await,
                _ => Err(not_allowed(method)),
            }
        }
        Route::Referrers(name, digest) => {
            check_name(&name)?;
            match *method {
                Method::GET => manifests::referrers(reg, &name, &digest, q).await,
                _ => Err(not_allowed(method)),
            }
        }
        Route::Blob(name, digest) => {
            check_name(&name)?;
            match *method {
                Method::GET => blobs::get(reg, &name, &digest, headers, false).await,
                Method::HEAD => blobs::get(reg, &name, &digest, headers, true).await,
                Method::DELETE => blobs::delete(reg, &name, &digest).await,
                _ => Err(not_allowed(method)),
            }
        }
        Route::UploadStart(name) => {
            check_name(&name)?;
            match *method {
                Method::POST => blobs::start_upload(reg, &name, client, q, headers, body).await,
                _ => Err(not_allowed(method)),
            }
        }
        Route::Upload(name, id) => {
            check_name(&name)?;
            let mut body = body;
            if let Some(owner) = blobs::held_elsewhere(reg, &name, &id, client, headers).await? {
                let sent =
                    blobs::forward(reg, &owner, client, method, &name, &id, q, headers, body);
                match sent.await? {
                    blobs::Forwarded::Answer(answer) => {
                        // The holder counted it against the tier's rate: counted here
                        // too, it would count twice for the registry.
                        reg.inner
                            .throttle
                            .give_back(super::throttle::Op::of(method));
                        return Ok(answer);
                    }
                    blobs::Forwarded::TakenOver(b) => body = b,
                }
            }
            match *method {
                Method::GET => blobs::upload_status(reg, &name, &id).await,
                Method::PATCH => blobs::patch_upload(reg, &name, &id, headers, body).await,
                Method::PUT => blobs::finish_upload(reg, &name, &id, q, headers, body).await,
                Method::DELETE => blobs::cancel_upload(reg, &name, &id).await,
                _ => Err(not_allowed(method)),
            }
        }
    }
}

/// `Response::builder()` with a list of headers; header values come from validated input.
pub(super) fn respond(status: StatusCode, headers: &[(&str, String)], body: Body) -> Response {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

// ---- access control (only when an `Auth` gate is configured) --------------------------

/// The registry's routes behind the auth gate, plus the token endpoint (not gated).
pub(super) fn router_with_auth(reg: Registry, auth: Arc<Auth>) -> Router {
    router(reg)
        .layer(axum::middleware::from_fn_with_state(auth.clone(), gate))
        .merge(token_router(auth))
}

/// The access a request needs: `pull` to read, `push` to upload or tag, `delete` to
/// delete, `registry:catalog:*` to list repositories. None = any valid token (`/v2/` ping
/// and paths that are not registry routes, which the handler answers with 404).
fn need_of<'a>(method: &Method, route: &'a Route) -> Need<'a> {
    let read = *method == Method::GET || *method == Method::HEAD;
    let repo = |name: &'a str, actions: &'static [&'static str]| Need {
        kind: "repository",
        name,
        actions,
    };
    match route {
        Route::Catalog => Need {
            kind: "registry",
            name: "catalog",
            actions: &["*"],
        },
        Route::Tags(n) | Route::Referrers(n, _) | Route::AcrTags(n) | Route::AcrManifests(n) => {
            repo(n, &["pull", "metadata_read"])
        }
        Route::AcrTag(n, _) | Route::AcrManifest(n, _) => repo(n, &["delete"]),
        Route::Manifest(n, _) | Route::Blob(n, _) if read => repo(n, &["pull"]),
        Route::Manifest(n, _) | Route::Blob(n, _) if *method == Method::DELETE => {
            repo(n, &["delete"])
        }
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::UploadStart(n) | Route::Upload(n, _) => {
            repo(n, &["push"])
        }
    }
}

async fn gate(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    // Names, tags and digests never contain '%': refusing it keeps the path the gate
    // checks identical to the one the handler decodes.
    if path.contains('%') {
        return ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
            .into_response();
    }
    let route = match path.strip_prefix("/acr/v1/") {
        Some(rest) => parse_acr_route(rest),
        None => {
            let rest = path
                .strip_prefix("/v2")
                .unwrap_or("")
                .trim_start_matches('/');
            if rest.is_empty() {
                None
            } else {
                parse_route(rest)
            }
        }
    };
    let need = route.as_ref().map(|r| need_of(req.method(), r));
    let claims = match auth.authorize(req.headers(), need) {
        Ok(c) => c,
        Err(f) => {
            tracing::debug!(method = %req.method(), %path, ?f, "request refused by auth");
            return f.into_response();
        }
    };
    // A cross-repository mount reads the source repository: without pull there, fall back
    // to a plain upload (as the spec allows) instead of leaking the blob. The query is
    // decoded by the same function the handler uses, so both see the same `from`.
    if let Some(Route::UploadStart(_)) = &route {
        let q = match parse_query(req.uri().query()) {
            Ok(q) => q,
            Err(e) => return e.into_response(),
        };
        if let Some(from) = q.get("from") {
            let may_read = claims
                .as_ref()
                .is_some_and(|c| crate::auth::scope::allows(&c.access, "repository", from, "pull"))
                || auth.anonymous_pull();
            if !may_read {
                req.extensions_mut().insert(NoMount);
            }
        }
    }
    if let Some(c) = &claims {
        req.extensions_mut().insert(Actor(c.sub.clone()));
    }
    next.run(req).await
}
