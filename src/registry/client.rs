//! A client for the distribution API of any registry: ours (`repository --registry`) and
//! others (the base-image poller). HTTPS with the system's roots plus `--ca-cert` files;
//! loopback registries may also speak plain HTTP, as Docker allows. Docker's token flow:
//! a `401` with a `Bearer` challenge is answered by fetching a token from its realm
//! (anonymously, or with the host's `docker login` credentials) and retrying.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use super::reference::{is_loopback, ImageRef};
use crate::credentials::{Credential, Credentials};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach registry at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("registry at {0} sent a malformed response")]
    Malformed(String),
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("registry at {addr}: authentication failed: {message}")]
    Auth { addr: String, message: String },
    #[error("CA certificate {path}: {message}")]
    CaCert { path: PathBuf, message: String },
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A tagged manifest as seen over HTTP (the API has no "all manifests" listing).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteManifest {
    pub digest: String,
    pub media_type: String,
    /// `artifactType`, else an image manifest's config media type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub size: u64,
    pub tags: Vec<String>,
}

/// Media types asked for, so a digest is that of what `docker pull` resolves.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Largest response body read (manifests are at most 4 MiB; listings can be longer).
const MAX_BODY: usize = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

/// What every client shares: the HTTP connection pool, trusted roots and credentials.
#[derive(Clone)]
pub struct Transport {
    http: reqwest::Client,
    credentials: Arc<Credentials>,
}

/// An HTTP client that trusts the system's roots plus the PEM certificates in `ca_certs`
/// (also what outgoing webhooks use).
pub fn http_client(ca_certs: &[PathBuf]) -> Result<reqwest::Client, ClientError> {
    client_builder(ca_certs)?
        .build()
        .map_err(|e| ClientError::Connect {
            addr: "-".into(),
            message: format!("cannot set up the HTTP client: {}", error_chain(&e)),
        })
}

/// [`http_client`]'s builder, for callers that set more (webhooks: no redirects).
pub fn client_builder(ca_certs: &[PathBuf]) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut extra = Vec::new();
    for path in ca_certs {
        let err = |message: String| ClientError::CaCert {
            path: path.clone(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| err(format!("not a PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(err("no CERTIFICATE block found".into()));
        }
        extra.extend(certs);
    }
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("acr-task/", env!("CARGO_PKG_VERSION")));
    if !extra.is_empty() {
        b = b.tls_certs_merge(extra);
    }
    Ok(b)
}

impl Transport {
    /// Trusts the system's roots plus the PEM files in `ca_certs`.
    pub fn new(ca_certs: &[PathBuf], credentials: Credentials) -> Result<Transport, ClientError> {
        Ok(Transport {
            http: http_client(ca_certs)?,
            credentials: Arc::new(credentials),
        })
    }
}

struct Token {
    value: String,
    expires: Instant,
}

/// One registry host. Remembers which scheme it answered on and the tokens it issued.
pub struct RegistryClient {
    addr: String,
    t: Transport,
    scheme: Mutex<Option<&'static str>>,
    tokens: Mutex<HashMap<String, Token>>,
}

impl RegistryClient {
    /// `addr` is `HOST[:PORT]`.
    pub fn new(addr: impl Into<String>, t: Transport) -> Self {
        RegistryClient {
            addr: addr.into(),
            t,
            scheme: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// `HOST[:PORT]` of this registry.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This host's credential; off the async threads, as it may run a credential helper.
    async fn credential(&self) -> Option<Credential> {
        let (creds, addr) = (self.t.credentials.clone(), self.addr.clone());
        tokio::task::spawn_blocking(move || creds.get(&addr))
            .await
            .ok()
            .flatten()
    }

    /// Sends `method path`, answering an auth challenge once. `scope` is what the request
    /// needs (`repository:NAME:pull`), used when the challenge names none.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        scope: &str,
    ) -> Result<HttpResponse, ClientError> {
        let resp = self
            .open(method.clone(), path, scope, true, Outgoing::default())
            .await?;
        self.read(&method, resp).await
    }

    /// Sends `method path` with extra `headers` (`If-Match`), answering an auth challenge
    /// once.
    pub async fn request_with_headers(
        &self,
        method: reqwest::Method,
        path: &str,
        scope: &str,
        headers: &[(&str, String)],
    ) -> Result<HttpResponse, ClientError> {
        let out = Outgoing {
            headers,
            body: None,
        };
        let resp = self.open(method.clone(), path, scope, true, out).await?;
        self.read(&method, resp).await
    }

    /// Sends `method path` with `body` of type `content_type` (a blob or manifest upload),
    /// answering an auth challenge once.
    pub async fn request_with_body(
        &self,
        method: reqwest::Method,
        path: &str,
        scope: &str,
        content_type: &str,
        body: bytes::Bytes,
    ) -> Result<HttpResponse, ClientError> {
        let resp = self
            .open(
                method.clone(),
                path,
                scope,
                true,
                Outgoing {
                    body: Some((content_type, body)),
                    ..Outgoing::default()
                },
            )
            .await?;
        self.read(&method, resp).await
    }

    /// `GET path` whose body the caller streams (a blob): the whole exchange has no time
    /// limit, only the wait for the response's headers; the caller bounds the body.
    pub async fn stream(&self, path: &str, scope: &str) -> Result<reqwest::Response, ClientError> {
        self.open(
            reqwest::Method::GET,
            path,
            scope,
            false,
            Outgoing::default(),
        )
        .await
    }

    /// The response of `method path` after at most one auth challenge, body unread.
    /// `whole`: the 30 s limit covers the body too.
    async fn open(
        &self,
        method: reqwest::Method,
        path: &str,
        scope: &str,
        whole: bool,
        body: Outgoing<'_>,
    ) -> Result<reqwest::Response, ClientError> {
        let cached = self.cached_token(scope);
        let r = self
            .send(
                &method,
                path,
                cached.as_deref().map(Auth::Bearer),
                whole,
                body.clone(),
            )
            .await?;
        if r.status().as_u16() != 401 {
            return Ok(r);
        }
        let challenge = r
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(parse_challenge)
            .unwrap_or_default();
        match challenge.scheme.to_ascii_lowercase().as_str() {
            "bearer" => {
                let scope = challenge
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| scope.to_string());
                let token = self.fetch_token(&challenge, &scope).await?;
                self.send(&method, path, Some(Auth::Bearer(&token)), whole, body)
                    .await
            }
            "basic" => match self.credential().await {
                Some(c) => {
                    self.send(&method, path, Some(Auth::Basic(&c)), whole, body)
                        .await
                }
                None => Ok(r),
            },
            _ => Ok(r),
        }
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().ok()?;
        tokens
            .get(scope)
            .filter(|t| t.expires > Instant::now())
            .map(|t| t.value.clone())
    }

    async fn send(
        &self,
        method: &reqwest::Method,
        path: &str,
        auth: Option<Auth<'_>>,
        whole: bool,
        body: Outgoing<'_>,
    ) -> Result<reqwest::Response, ClientError> {
        let known = self.scheme.lock().ok().and_then(|s| *s);
        // Docker's rule for loopback registries: HTTPS first, plain HTTP if that fails.
        let candidates: &[&'static str] = match known {
            Some("https") => &["https"],
            Some(_) => &["http"],
            None if is_loopback(&self.addr) => &["https", "http"],
            None => &["https"],
        };
        let mut failures = Vec::new();
        for scheme in candidates {
            let url = format!("{scheme}://{}{path}", self.addr);
            let mut req = self
                .t
                .http
                .request(method.clone(), &url)
                .header("accept", MANIFEST_ACCEPT);
            if whole {
                req = req.timeout(TIMEOUT);
            }
            if let Some((content_type, bytes)) = &body.body {
                req = req
                    .header("content-type", *content_type)
                    .body(bytes.clone());
            }
            for (k, v) in body.headers {
                req = req.header(*k, v);
            }
            req = match auth {
                Some(Auth::Bearer(t)) => req.bearer_auth(t),
                Some(Auth::Basic(c)) => req.basic_auth(&c.username, Some(&c.password)),
                None => req,
            };
            match tokio::time::timeout(TIMEOUT, req.send()).await {
                Ok(Ok(resp)) => {
                    if let Ok(mut s) = self.scheme.lock() {
                        *s = Some(scheme);
                    }
                    return Ok(resp);
                }
                Ok(Err(e)) => failures.push(format!("{scheme}: {}", error_chain(&e))),
                Err(_) => failures.push(format!(
                    "{scheme}: no answer within {} s",
                    TIMEOUT.as_secs()
                )),
            }
        }
        Err(ClientError::Connect {
            addr: self.addr.clone(),
            message: failures.join("; "),
        })
    }

    async fn read(
        &self,
        method: &reqwest::Method,
        resp: reqwest::Response,
    ) -> Result<HttpResponse, ClientError> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        if method != reqwest::Method::HEAD {
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| ClientError::Connect {
                    addr: self.addr.clone(),
                    message: error_chain(&e),
                })?;
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(ClientError::Malformed(self.addr.clone()));
                }
                body.extend_from_slice(&chunk);
            }
        }
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    /// Docker's token flow: `GET realm?service=..&scope=..`, with basic credentials when
    /// `docker login` stored some for this host.
    async fn fetch_token(&self, c: &Challenge, scope: &str) -> Result<String, ClientError> {
        let auth_err = |message: String| ClientError::Auth {
            addr: self.addr.clone(),
            message,
        };
        let realm = c
            .params
            .get("realm")
            .ok_or_else(|| auth_err("the Bearer challenge names no realm".into()))?;
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| auth_err(format!("token realm {realm:?}: {e}")))?;
        if url.scheme() != "https" && !url.host_str().is_some_and(is_loopback) {
            // Credentials never travel in clear text to another machine.
            return Err(auth_err(format!("token realm {realm} is not HTTPS")));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = c.params.get("service") {
                q.append_pair("service", s);
            }
            for s in scope.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", s);
            }
        }
        let mut req = self.t.http.get(url.clone()).timeout(TIMEOUT);
        if let Some(cred) = self.credential().await {
            req = req.basic_auth(&cred.username, Some(&cred.password));
        }
        let resp = req.send().await.map_err(|e| ClientError::Connect {
            addr: realm.clone(),
            message: error_chain(&e),
        })?;
        let status = resp.status();
        let r = self.read(&reqwest::Method::GET, resp).await?;
        if !status.is_success() {
            return Err(auth_err(format!(
                "token endpoint {realm} answered HTTP {}",
                status.as_u16()
            )));
        }
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|_| auth_err(format!("token endpoint {realm} sent no JSON")))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_err(format!("token endpoint {realm} sent no token")))?
            .to_string();
        // The spec's default lifetime is 60 s; renew a little early.
        let ttl = v["expires_in"].as_u64().unwrap_or(60).max(10);
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(
                scope.to_string(),
                Token {
                    value: token.clone(),
                    expires: Instant::now() + Duration::from_secs(ttl - 5),
                },
            );
        }
        Ok(token)
    }

    async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        scope: &str,
    ) -> Result<HttpResponse, ClientError> {
        let r = self.request(method.clone(), path, scope).await?;
        if !(200..300).contains(&r.status) {
            return Err(ClientError::Status {
                method: method.to_string(),
                path: path.to_string(),
                status: r.status,
                body: String::from_utf8_lossy(&r.body).trim().to_string(),
            });
        }
        Ok(r)
    }

    /// Every repository of the catalog (all its pages).
    pub async fn repositories(&self) -> Result<Vec<String>, ClientError> {
        self.paged("/v2/_catalog?n=1000", "repositories", "registry:catalog:*")
            .await
    }

    /// Every tag of `repo` (all pages).
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, ClientError> {
        self.paged(&format!("/v2/{repo}/tags/list?n=1000"), "tags", &pull(repo))
            .await
    }

    /// A listing followed through its `Link: <...>; rel="next"` pages (at most 10,000).
    async fn paged(&self, first: &str, key: &str, scope: &str) -> Result<Vec<String>, ClientError> {
        let mut out = Vec::new();
        let mut path = first.to_string();
        for _ in 0..10_000 {
            let r = self.ok(reqwest::Method::GET, &path, scope).await?;
            let v: Value = serde_json::from_slice(&r.body)
                .map_err(|_| ClientError::Malformed(self.addr.clone()))?;
            out.extend(strings(&v[key]));
            match r.header("link").and_then(next_link) {
                Some(next) if next != path => path = next,
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    /// Manifests reachable through tags, grouped by digest.
    pub async fn manifests(&self, repo: &str) -> Result<Vec<RemoteManifest>, ClientError> {
        let mut out: Vec<RemoteManifest> = Vec::new();
        for tag in self.tags(repo).await? {
            // The body too: the artifact type is in it.
            let r = self
                .ok(
                    reqwest::Method::GET,
                    &format!("/v2/{repo}/manifests/{tag}"),
                    &pull(repo),
                )
                .await?;
            let digest = r
                .header("docker-content-digest")
                .unwrap_or_default()
                .to_string();
            if let Some(m) = out.iter_mut().find(|m| m.digest == digest) {
                m.tags.push(tag);
                continue;
            }
            out.push(RemoteManifest {
                digest,
                media_type: r.header("content-type").unwrap_or_default().to_string(),
                artifact_type: serde_json::from_slice(&r.body)
                    .ok()
                    .and_then(|v| super::artifact_type_of(&v)),
                size: r.body.len() as u64,
                tags: vec![tag],
            });
        }
        Ok(out)
    }

    /// Delete a tag or (by digest) a manifest with its tags.
    pub async fn delete_manifest(&self, repo: &str, reference: &str) -> Result<(), ClientError> {
        self.ok(
            reqwest::Method::DELETE,
            &format!("/v2/{repo}/manifests/{reference}"),
            &format!("repository:{repo}:delete"),
        )
        .await
        .map(|_| ())
    }

    /// The digest `image`'s tag resolves to now (`HEAD` on the manifest; `GET` and hash it
    /// when a registry sends no `Docker-Content-Digest`). `None` if the tag is gone.
    pub async fn manifest_digest(&self, image: &ImageRef) -> Result<Option<String>, ClientError> {
        let path = format!("/v2/{}/manifests/{}", image.repository, image.reference);
        let scope = pull(&image.repository);
        let mut r = self.request(reqwest::Method::HEAD, &path, &scope).await?;
        if r.status == 404 {
            return Ok(None);
        }
        if (200..300).contains(&r.status) {
            if let Some(d) = r.header("docker-content-digest") {
                return Ok(Some(d.to_string()));
            }
            r = self.ok(reqwest::Method::GET, &path, &scope).await?;
            use sha2::Digest;
            return Ok(Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(&r.body))
            )));
        }
        Err(ClientError::Status {
            method: "HEAD".into(),
            path,
            status: r.status,
            body: String::new(),
        })
    }
}

/// What a request sends beyond its method and path.
#[derive(Clone, Default)]
struct Outgoing<'a> {
    headers: &'a [(&'a str, String)],
    body: Option<(&'a str, bytes::Bytes)>,
}

/// A manifest as fetched: its digest (verified against the body), media type and body.
pub struct FetchedManifest {
    pub digest: String,
    pub media_type: String,
    pub body: Vec<u8>,
}

impl RegistryClient {
    /// `repo`'s manifest `reference` (a tag or digest); `None` if there is none. The body's
    /// digest is computed here: a registry's header is not trusted.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<FetchedManifest>, ClientError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let r = self
            .request(reqwest::Method::GET, &path, &pull(repo))
            .await?;
        if r.status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&r.status) {
            return Err(refused("GET", path, &r));
        }
        let digest = crate::digest::of_bytes(crate::digest::Algorithm::Sha256, &r.body);
        if reference.contains(':') && reference != digest {
            return Err(ClientError::Malformed(self.addr.clone()));
        }
        Ok(Some(FetchedManifest {
            digest,
            media_type: r.header("content-type").unwrap_or_default().to_string(),
            body: r.body,
        }))
    }

    /// A small blob (at most `max` bytes), its digest verified; `None` if absent or larger.
    pub async fn get_small_blob(
        &self,
        repo: &str,
        digest: &str,
        max: u64,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let alg =
            crate::digest::parse(digest).map_err(|_| ClientError::Malformed(digest.into()))?;
        let r = self
            .ok(
                reqwest::Method::GET,
                &format!("/v2/{repo}/blobs/{digest}"),
                &pull(repo),
            )
            .await;
        let r = match r {
            Ok(r) => r,
            Err(ClientError::Status { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if r.body.len() as u64 > max {
            return Ok(None);
        }
        if crate::digest::of_bytes(alg, &r.body) != digest {
            return Err(ClientError::Malformed(format!(
                "{}: blob {digest}",
                self.addr
            )));
        }
        Ok(Some(r.body))
    }

    /// Uploads `bytes` as a blob of `repo` (one POST and one PUT), unless it is there.
    pub async fn push_small_blob(&self, repo: &str, bytes: &[u8]) -> Result<String, ClientError> {
        let digest = crate::digest::of_bytes(crate::digest::Algorithm::Sha256, bytes);
        let scope = format!("repository:{repo}:pull,push");
        let head = self
            .request(
                reqwest::Method::HEAD,
                &format!("/v2/{repo}/blobs/{digest}"),
                &scope,
            )
            .await?;
        if head.status == 200 {
            return Ok(digest);
        }
        let start = self
            .ok(
                reqwest::Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &scope,
            )
            .await?;
        let location = start
            .header("location")
            .and_then(same_host_path)
            .ok_or_else(|| ClientError::Malformed(self.addr.clone()))?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let path = format!("{location}{sep}digest={digest}");
        let r = self
            .request_with_body(
                reqwest::Method::PUT,
                &path,
                &scope,
                "application/octet-stream",
                bytes::Bytes::copy_from_slice(bytes),
            )
            .await?;
        if r.status != 201 {
            return Err(refused("PUT", path, &r));
        }
        Ok(digest)
    }

    /// Puts a manifest under `reference` (a tag, or its digest); returns its digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Vec<u8>,
    ) -> Result<String, ClientError> {
        let digest = crate::digest::of_bytes(crate::digest::Algorithm::Sha256, &body);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let r = self
            .request_with_body(
                reqwest::Method::PUT,
                &path,
                &format!("repository:{repo}:pull,push"),
                media_type,
                body.into(),
            )
            .await?;
        if r.status != 201 {
            return Err(refused("PUT", path, &r));
        }
        Ok(digest)
    }

    /// The descriptors of `digest`'s referrers in `repo` (of `artifact_type`, if given),
    /// from the referrers API; a registry without it answers none.
    pub async fn referrers(
        &self,
        repo: &str,
        digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Value>, ClientError> {
        let mut path = format!("/v2/{repo}/referrers/{digest}");
        if let Some(t) = artifact_type {
            // `+` in a query is a space: media types need it escaped.
            path = format!("{path}?artifactType={}", t.replace('+', "%2B"));
        }
        let r = self
            .request(reqwest::Method::GET, &path, &pull(repo))
            .await?;
        if r.status == 404 {
            return Ok(Vec::new());
        }
        if !(200..300).contains(&r.status) {
            return Err(refused("GET", path, &r));
        }
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|_| ClientError::Malformed(self.addr.clone()))?;
        Ok(v["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| artifact_type.is_none_or(|t| d["artifactType"] == t))
            .collect())
    }
}

/// A response that is not what was asked for, as an error naming the request.
fn refused(method: &str, path: String, r: &HttpResponse) -> ClientError {
    ClientError::Status {
        method: method.to_string(),
        path,
        status: r.status,
        body: summary(&r.body),
    }
}

/// The path (and query) of an upload `Location`: relative, or on this same host.
fn same_host_path(location: &str) -> Option<String> {
    let path = match location.find("://") {
        Some(i) => &location[location[i + 3..].find('/').map(|j| i + 3 + j)?..],
        None => location,
    };
    path.starts_with("/v2/").then(|| path.to_string())
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    Bearer(&'a str),
    Basic(&'a Credential),
}

/// The scope a pull of `repo` needs.
pub(crate) fn pull(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// The path of a `Link` header's `rel="next"` target (same host only).
fn next_link(h: &str) -> Option<String> {
    h.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
            return None;
        }
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        same_host_path(url)
    })
}

/// What an error body says, briefly: the distribution spec's first error message, else
/// the start of the text.
pub fn summary(body: &[u8]) -> String {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(m) = v.as_ref().and_then(|v| v["errors"][0]["message"].as_str()) {
        return m.to_string();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None if text.is_empty() => "(no message)".to_string(),
        None => text.to_string(),
    }
}

/// An error and its causes on one line (reqwest's own message is only the outermost).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A parsed `WWW-Authenticate` header: its scheme and `key=value` parameters.
#[derive(Debug, Default, PartialEq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="https://a/token",service="reg",scope="repository:x:pull,push"`
/// (quoted values may hold commas and `\"`).
pub fn parse_challenge(h: &str) -> Challenge {
    let h = h.trim();
    let (scheme, mut rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            rest = &q[end.min(q.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        params.insert(key, value);
    }
    Challenge {
        scheme: scheme.to_string(),
        params,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_pages_follow_the_next_link() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/_catalog?last=b&n=2")
        );
        assert_eq!(
            next_link(r#"<https://r.example/v2/a/tags/list?last=x>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?last=x")
        );
        assert_eq!(next_link(r#"</v2/_catalog?last=b>; rel="prev""#), None);
        assert_eq!(
            next_link(r#"<https://evil.example/other>; rel="next""#),
            None
        );
    }

    #[test]
    fn challenges_as_registries_send_them() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(c.scheme, "Bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull,push");
        let c = parse_challenge(r#"Basic realm="my \"reg\"", charset=UTF-8"#);
        assert_eq!(c.scheme, "Basic");
        assert_eq!(c.params["realm"], "my \"reg\"");
        assert_eq!(c.params["charset"], "UTF-8");
        let c = parse_challenge("Bearer");
        assert!(c.params.is_empty());
        // Unterminated quotes and stray text do not panic.
        let c = parse_challenge(r#"Bearer realm="unterminated"#);
        assert_eq!(c.params["realm"], "unterminated");
        let _ = parse_challenge("=,=\"\\");
    }

    /// A registry that answers like Docker Hub: every request without a token gets a
    /// Bearer challenge; the token endpoint hands out anonymous pull tokens.
    async fn hub_like() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let tokens_issued = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let realm = format!("http://{addr}/token");
        let issued = tokens_issued.clone();
        let app = axum::Router::new()
            .route(
                "/token",
                axum::routing::get(
                    move |q: axum::extract::Query<HashMap<String, String>>| async move {
                        assert_eq!(q.get("service").map(String::as_str), Some("hub"));
                        let scope = q.get("scope").cloned().unwrap_or_default();
                        issued.fetch_add(1, Ordering::SeqCst);
                        axum::Json(serde_json::json!({
                            "token": format!("tok:{scope}"), "expires_in": 300
                        }))
                    },
                ),
            )
            .route(
                "/v2/{*rest}",
                axum::routing::any(move |h: HeaderMap, uri: axum::http::Uri| {
                    let realm = realm.clone();
                    async move {
                        let path = uri.path().to_string();
                        let repo = path
                            .trim_start_matches("/v2/")
                            .split("/manifests/")
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        let want = format!("Bearer tok:repository:{repo}:pull");
                        if h.get("authorization").and_then(|v| v.to_str().ok())
                            != Some(want.as_str())
                        {
                            let c = format!(
                                "Bearer realm=\"{realm}\",service=\"hub\",scope=\"repository:{repo}:pull\""
                            );
                            return (StatusCode::UNAUTHORIZED, [("www-authenticate", c)], "")
                                .into_response();
                        }
                        match repo.as_str() {
                            "library/alpine" => (
                                [("docker-content-digest", "sha256:abc")],
                                "{}",
                            )
                                .into_response(),
                            // No digest header: the client must hash the body.
                            "library/nodigest" => "{\"schemaVersion\":2}".into_response(),
                            _ => StatusCode::NOT_FOUND.into_response(),
                        }
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, tokens_issued)
    }

    #[tokio::test]
    async fn anonymous_token_flow_digests_and_token_reuse() {
        use std::sync::atomic::Ordering;
        let (addr, issued) = hub_like().await;
        let t = Transport::new(&[], Credentials::default()).unwrap();
        let c = RegistryClient::new(addr.clone(), t);
        let alpine = ImageRef::parse(&format!("{addr}/library/alpine:3")).unwrap();
        assert_eq!(
            c.manifest_digest(&alpine).await.unwrap().as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        // The token is reused until it expires.
        c.manifest_digest(&alpine).await.unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        use sha2::Digest;
        let body_digest = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(b"{\"schemaVersion\":2}"))
        );
        let nodigest = ImageRef::parse(&format!("{addr}/library/nodigest")).unwrap();
        assert_eq!(
            c.manifest_digest(&nodigest).await.unwrap(),
            Some(body_digest)
        );
        let gone = ImageRef::parse(&format!("{addr}/library/gone:1")).unwrap();
        assert_eq!(c.manifest_digest(&gone).await.unwrap(), None);
    }

    #[tokio::test]
    async fn unreachable_registry_names_both_schemes_tried() {
        let t = Transport::new(&[], Credentials::default()).unwrap();
        // Port 9 (discard) is closed on loopback.
        let c = RegistryClient::new("127.0.0.1:9", t);
        let e = c.repositories().await.unwrap_err().to_string();
        assert!(
            e.contains("127.0.0.1:9") && e.contains("https:") && e.contains("http:"),
            "{e}"
        );
    }
}
