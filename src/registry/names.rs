//! The distribution API's view of names, tags and digests (errors as the spec's codes),
//! and parsing of `/v2/...` paths. The grammar itself is in [`crate::names`].

pub use crate::names::{valid_name, valid_tag};
use crate::store::Reference;

use super::errors::ApiError;

/// A digest this registry can verify: `sha256` or `sha512`, lowercase hex of the right
/// length; any other well-formed algorithm is refused as unsupported.
pub fn parse_digest(d: &str) -> Result<String, ApiError> {
    match crate::digest::parse(d) {
        Ok(_) => Ok(d.to_string()),
        Err(crate::digest::Invalid::Unsupported(alg)) => Err(ApiError::digest_invalid(format!(
            "unsupported digest algorithm {alg:?}: sha256 and sha512 are"
        ))),
        Err(crate::digest::Invalid::Malformed) => {
            Err(ApiError::digest_invalid(format!("invalid digest {d:?}")))
        }
    }
}

pub fn parse_reference(r: &str) -> Result<Reference, ApiError> {
    if r.contains(':') {
        Ok(Reference::Digest(parse_digest(r)?))
    } else if valid_tag(r) {
        Ok(Reference::Tag(r.to_string()))
    } else {
        // The spec has no tag error of its own; an invalid tag makes the request invalid.
        Err(ApiError::manifest_invalid(format!("invalid tag {r:?}")))
    }
}

/// What a `/v2/<rest>` path addresses. The name is not yet validated.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    UploadStart(String),
    Upload(String, String),
    Referrers(String, String),
    /// ACR's `/acr/v1/{name}/_tags` (tags with times and attributes).
    AcrTags(String),
    /// `/acr/v1/{name}/_tags/{tag}` (DELETE, conditional on `If-Match`).
    AcrTag(String, String),
    /// `/acr/v1/{name}/_manifests` (manifests with times, tags, subject and references).
    AcrManifests(String),
    /// `/acr/v1/{name}/_manifests/{digest}` (DELETE while nothing names it).
    AcrManifest(String, String),
}

/// What an `/acr/v1/<rest>` path (ACR's own API, as acr-cli uses it) addresses.
pub fn parse_acr_route(rest: &str) -> Option<Route> {
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name = |k: usize| segs[..n - k].join("/");
    match (
        n >= 2,
        segs.get(n.wrapping_sub(1)),
        segs.get(n.wrapping_sub(2)),
    ) {
        (true, Some(&"_tags"), _) => Some(Route::AcrTags(name(1))),
        (true, Some(&"_manifests"), _) => Some(Route::AcrManifests(name(1))),
        (true, Some(t), Some(&"_tags")) if n >= 3 => Some(Route::AcrTag(name(2), t.to_string())),
        (true, Some(d), Some(&"_manifests")) if n >= 3 => {
            Some(Route::AcrManifest(name(2), d.to_string()))
        }
        _ => None,
    }
}

/// Parse from the end, because names may themselves contain `/`.
pub fn parse_route(rest: &str) -> Option<Route> {
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name = |k: usize| segs[..n - k].join("/");
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        return Some(Route::Tags(name(2)));
    }
    if n >= 3 && segs[n - 2] == "manifests" {
        return Some(Route::Manifest(name(2), segs[n - 1].to_string()));
    }
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Some(Route::UploadStart(name(2)));
    }
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        if segs[n - 1].is_empty() {
            return Some(Route::UploadStart(name(3)));
        }
        return Some(Route::Upload(name(3), segs[n - 1].to_string()));
    }
    if n >= 3 && segs[n - 2] == "blobs" {
        return Some(Route::Blob(name(2), segs[n - 1].to_string()));
    }
    if n >= 3 && segs[n - 2] == "referrers" {
        return Some(Route::Referrers(name(2), segs[n - 1].to_string()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acr_api_paths() {
        assert_eq!(
            parse_acr_route("a/b/_tags"),
            Some(Route::AcrTags("a/b".into()))
        );
        assert_eq!(
            parse_acr_route("a/_tags/v1"),
            Some(Route::AcrTag("a".into(), "v1".into()))
        );
        assert_eq!(
            parse_acr_route("a/_manifests"),
            Some(Route::AcrManifests("a".into()))
        );
        assert_eq!(
            parse_acr_route("a/b/_manifests/sha256:x"),
            Some(Route::AcrManifest("a/b".into(), "sha256:x".into()))
        );
        assert_eq!(parse_acr_route("_tags"), None);
        assert_eq!(parse_acr_route("a/tags"), None);
    }

    #[test]
    fn digests() {
        assert!(parse_digest(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(parse_digest("sha256:abc").is_err());
        assert!(parse_digest(&format!("sha512:{}", "a".repeat(128))).is_ok());
        assert!(parse_digest(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(parse_digest("nonsense").is_err());
    }

    #[test]
    fn routes_parse_from_the_end() {
        assert_eq!(
            parse_route("a/b/blobs/uploads/"),
            Some(Route::UploadStart("a/b".into()))
        );
        assert_eq!(
            parse_route("a/blobs/uploads/123"),
            Some(Route::Upload("a".into(), "123".into()))
        );
        assert_eq!(
            parse_route("a/manifests/blobs"),
            Some(Route::Manifest("a".into(), "blobs".into()))
        );
        assert_eq!(parse_route("x/tags/list"), Some(Route::Tags("x".into())));
        assert_eq!(parse_route("_catalog"), Some(Route::Catalog));
        assert_eq!(parse_route("nothing"), None);
    }

    proptest::proptest! {
        #[test]
        fn path_and_name_parsing_never_panics(path in "[a-z0-9/._:-]{0,80}") {
            let _ = parse_route(&path);
            let _ = valid_name(&path);
            let _ = valid_tag(&path);
            let _ = parse_reference(&path);
        }
    }
}
