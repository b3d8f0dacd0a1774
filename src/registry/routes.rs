//! `/v2/...` routing: axum cannot express names with `/` in them, so one wildcard route
//! hands the path to [`names::parse_route`] and dispatches on method.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

use super::errors::ApiError;
use super::names::{parse_route, valid_name, Route};
use super::{blobs, manifests, Registry};

const API_VERSION: &str = "Docker-Distribution-API-Version";

pub(super) fn router(reg: Registry) -> Router {
    Router::new()
        .route("/v2", any(base))
        .route("/v2/", any(base))
        .route("/v2/{*rest}", any(dispatch))
        .with_state(reg)
}

async fn base() -> Response {
    let mut r = (StatusCode::OK, [("content-type", "application/json")], "{}").into_response();
    r.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    r
}

pub(super) type Q = HashMap<String, String>;

async fn dispatch(
    State(reg): State<Registry>,
    method: Method,
    Path(rest): Path<String>,
    Query(q): Query<Q>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut resp = match handle(&reg, &method, &rest, &q, &headers, body).await {
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

async fn handle(
    reg: &Registry,
    method: &Method,
    rest: &str,
    q: &Q,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(route) = parse_route(rest) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no such endpoint: /v2/{rest}"),
        ));
    };
    match route {
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
                Method::POST => blobs::start_upload(reg, &name, q, headers, body).await,
                _ => Err(not_allowed(method)),
            }
        }
        Route::Upload(name, id) => {
            check_name(&name)?;
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
