//! The distribution spec's error body (`{"errors":[{code,message,detail}]}`) and statuses.

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429s).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 403 DENIED: the request is understood and will not be done (a tier's limit).
    pub fn denied(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "DENIED", m)
    }
    /// 429 TOOMANYREQUESTS with when to come back.
    pub fn too_many(m: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", m)
        }
    }
    pub fn blob_unknown(d: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob unknown to registry: {d}"),
        )
    }
    pub fn upload_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID", m)
    }
    pub fn upload_unknown() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
            "blob upload unknown to registry",
        )
    }
    pub fn digest_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", m)
    }
    pub fn manifest_blob_unknown(d: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!("manifest references unknown content: {d}"),
        )
    }
    pub fn manifest_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", m)
    }
    pub fn manifest_unknown(r: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest unknown: {r}"),
        )
    }
    pub fn name_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", m)
    }
    pub fn name_unknown(n: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("repository name not known to registry: {n}"),
        )
    }
    pub fn size_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "SIZE_INVALID", m)
    }
    pub fn unsupported(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED", m)
    }
    pub fn range_invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID", m)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "registry internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            "internal error",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::MissingRef(d) => ApiError::manifest_blob_unknown(&d),
            e @ StoreError::SizeMismatch { .. } => {
                ApiError::manifest_invalid(format!("descriptor size mismatch: {e}"))
            }
            StoreError::BlobMissing(d) => ApiError::blob_unknown(&d),
            StoreError::Limit(l) => ApiError::denied(l.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{ "code": self.code, "message": self.message, "detail": null }]
        });
        let mut r = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(s) = self.retry_after {
            r = r.header(header::RETRY_AFTER, s);
        }
        r.body(Body::from(body.to_string()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}
