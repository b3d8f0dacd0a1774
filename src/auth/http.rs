//! HTTP face of the gate: the token endpoint (`GET /oauth2/token`, distribution's token
//! protocol with basic auth) and request authorization with distribution-style errors.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;

use super::jwt::Claims;
use super::scope::{allows, parse_scope, Access, Grants};
use super::{Auth, AuthError};

/// How long a login may wait for a free password-hashing slot before it is refused.
const LOGIN_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Path of the token endpoint (ACR's).
pub const TOKEN_PATH: &str = "/oauth2/token";

/// What a server's token endpoint answered a client of the task API.
#[derive(Debug)]
pub enum ApiToken {
    /// A bearer token for `registry:tasks:read,write`.
    Token(String),
    /// The server has no token endpoint (an older one): send the credentials each time.
    NoEndpoint,
    /// The credentials were refused, with this HTTP status.
    Refused(reqwest::StatusCode),
}

/// Asks `base`'s token endpoint for a task-API bearer token with `user`'s password, the
/// one way the CLI and agents log in for many calls.
pub async fn fetch_api_token(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    password: &str,
) -> Result<ApiToken, reqwest::Error> {
    let url = format!("{base}{TOKEN_PATH}?scope=registry:tasks:read,write");
    let resp = http
        .get(&url)
        .basic_auth(user, Some(password))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Ok(ApiToken::NoEndpoint);
    }
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    Ok(
        match v["token"].as_str().or_else(|| v["access_token"].as_str()) {
            Some(t) if status.is_success() => ApiToken::Token(t.to_string()),
            _ => ApiToken::Refused(status),
        },
    )
}

/// Why a request was refused; renders as a distribution error body.
#[derive(Debug)]
pub enum AuthFailure {
    /// 401 UNAUTHORIZED with this `WWW-Authenticate` value.
    Unauthorized {
        challenge: String,
        message: String,
    },
    /// 403 DENIED: authenticated, but the token does not grant the action.
    Denied(String),
    /// 429 TOOMANYREQUESTS: too many failed logins (or logins at once); retry after
    /// this many seconds.
    TooMany(u64),
    Internal,
}

impl IntoResponse for AuthFailure {
    fn into_response(self) -> Response {
        let mut retry_after = None;
        let (status, code, msg, challenge) = match self {
            AuthFailure::Unauthorized { challenge, message } => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                message,
                Some(challenge),
            ),
            AuthFailure::Denied(m) => (StatusCode::FORBIDDEN, "DENIED", m, None),
            AuthFailure::TooMany(secs) => {
                retry_after = Some(secs);
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    format!("too many login attempts; try again in {secs} s"),
                    None,
                )
            }
            AuthFailure::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error".to_string(),
                None,
            ),
        };
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": msg, "detail": null }]
        });
        let mut r = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        if let Some(c) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        if let Some(s) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// What a request needs: one of `actions` on resource (`kind`, `name`).
#[derive(Debug, Clone, Copy)]
pub struct Need<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub actions: &'a [&'a str],
}

/// The `Host` header if it looks like `host[:port]`, for the challenge's realm.
fn host_of(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c))
        })
        .unwrap_or("localhost")
        .to_string()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

fn basic(headers: &HeaderMap) -> Option<Option<(String, String)>> {
    let v = headers.get(header::AUTHORIZATION)?;
    let parsed = (|| {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (u, p) = s.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    })();
    Some(parsed)
}

impl Auth {
    /// `Bearer realm=...,service=...[,scope=...][,error=...]` for a request to `host`.
    pub fn challenge(
        &self,
        headers: &HeaderMap,
        need: Option<Need<'_>>,
        error: Option<&str>,
    ) -> String {
        let mut c = format!(
            "Bearer realm=\"{}://{}{TOKEN_PATH}\",service=\"{}\"",
            if self.settings.tls { "https" } else { "http" },
            host_of(headers),
            self.settings.service
        );
        if let Some(n) = need {
            let action = n.actions.first().copied().unwrap_or("*");
            c.push_str(&format!(",scope=\"{}:{}:{}\"", n.kind, n.name, action));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error=\"{e}\""));
        }
        c
    }

    /// Check a request's bearer token. `need: None` asks only for a valid token (the
    /// `/v2/` ping). `Ok(None)` means allowed anonymously (anonymous pull).
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        need: Option<Need<'_>>,
    ) -> Result<Option<Claims>, AuthFailure> {
        let Some(tok) = bearer(headers) else {
            if self.anonymous_pull()
                && need.is_some_and(|n| n.kind == "repository" && n.actions.contains(&"pull"))
            {
                return Ok(None);
            }
            return Err(AuthFailure::Unauthorized {
                challenge: self.challenge(headers, need, None),
                message: "authentication required".into(),
            });
        };
        let claims = match self.verify(tok) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "bearer token refused");
                return Err(AuthFailure::Unauthorized {
                    challenge: self.challenge(headers, need, Some("invalid_token")),
                    message: "invalid or expired token".into(),
                });
            }
        };
        let Some(n) = need else {
            return Ok(Some(claims));
        };
        if n.actions
            .iter()
            .any(|a| allows(&claims.access, n.kind, n.name, a))
            || (self.anonymous_pull() && n.kind == "repository" && n.actions.contains(&"pull"))
        {
            return Ok(Some(claims));
        }
        Err(AuthFailure::Denied(format!(
            "requested access to the resource is denied ({}:{}:{} not granted)",
            n.kind,
            n.name,
            n.actions.join("|")
        )))
    }

    /// Checks a user name and password through the brakes: the per-client lockouts, the
    /// per-client in-flight bound and the server-wide bound on password hashing.
    /// `Ok(None)`: wrong credentials (recorded as a failure).
    pub async fn login(
        self: &Arc<Self>,
        ip: IpAddr,
        user: &str,
        pass: &str,
    ) -> Result<Option<Grants>, AuthFailure> {
        let wait = self.limiter.window().as_secs().max(1);
        if !self.limiter.allowed(ip, user) {
            tracing::warn!(%ip, user = %user, "login refused: too many failures");
            return Err(AuthFailure::TooMany(wait));
        }
        let Some(_slot) = self.limiter.enter(ip) else {
            tracing::warn!(%ip, "login refused: too many at once from this client");
            return Err(AuthFailure::TooMany(1));
        };
        // Machine logins have random, long passwords: no slow hashing.
        let machine = if user == super::REPLICATION_USER {
            Some(self.replication_grants(Some(pass)))
        } else if user.starts_with(super::RUN_USER_PREFIX) {
            // Another replica's run login is read from the records, off the async threads.
            let (me, u, p) = (self.clone(), user.to_string(), pass.to_string());
            Some(
                tokio::task::spawn_blocking(move || me.run_grants(&u, Some(&p)))
                    .await
                    .map_err(|_| AuthFailure::Internal)?,
            )
        } else {
            None
        };
        if let Some(g) = machine {
            if g.is_some() {
                self.limiter.succeeded(ip, user);
            } else {
                self.limiter.failed(ip, user);
                tracing::info!(%ip, user = %user, "login failed");
            }
            return Ok(g);
        }
        let permit = tokio::time::timeout(LOGIN_QUEUE_WAIT, self.hashing.acquire())
            .await
            .map_err(|_| AuthFailure::TooMany(1))?
            .map_err(|_| AuthFailure::Internal)?;
        let me = self.clone();
        let (u, p) = (user.to_string(), pass.to_string());
        let res = tokio::task::spawn_blocking(move || me.store.authenticate(&u, &p))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "authentication task failed");
                AuthFailure::Internal
            })?;
        drop(permit);
        match res {
            Ok(Some(g)) => {
                self.limiter.succeeded(ip, user);
                Ok(Some(g))
            }
            Ok(None) => {
                self.limiter.failed(ip, user);
                tracing::info!(%ip, user = %user, "login failed");
                Ok(None)
            }
            Err(e) => {
                tracing::error!(error = %e, "authentication failed");
                Err(AuthFailure::Internal)
            }
        }
    }

    /// The token endpoint's work: authenticate (basic auth or anonymous), grant the
    /// intersection of requested and allowed access, and sign it.
    pub async fn token_request(
        self: &Arc<Self>,
        ip: IpAddr,
        headers: &HeaderMap,
        query: &[(String, String)],
    ) -> Result<serde_json::Value, AuthFailure> {
        let unauthorized = |m: &str| AuthFailure::Unauthorized {
            challenge: format!("Basic realm=\"{}\"", self.settings.service),
            message: m.to_string(),
        };
        if let Some((_, s)) = query.iter().find(|(k, _)| k == "service") {
            if *s != self.settings.service {
                // Same message as bad credentials: say nothing about which part was wrong.
                return Err(unauthorized("authentication failed"));
            }
        }
        let requested: Vec<Access> = query
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').filter_map(parse_scope).collect::<Vec<_>>())
            .collect();
        let (subject, grants) = match basic(headers) {
            None => {
                if !self.anonymous_pull() {
                    return Err(unauthorized("authentication required"));
                }
                (String::new(), Grants::Anonymous { pull: true })
            }
            Some(None) => return Err(unauthorized("authentication failed")),
            Some(Some((user, pass))) => match self.login(ip, &user, &pass).await? {
                Some(g) => (user, g),
                None => return Err(unauthorized("authentication failed")),
            },
        };
        let access = grants.grant(&requested);
        let (token, claims) = self.issue(&subject, access).map_err(|e: AuthError| {
            tracing::error!(error = %e, "issuing a token");
            AuthFailure::Internal
        })?;
        tracing::debug!(user = %subject, access = ?claims.access, "token issued");
        let issued = chrono::DateTime::from_timestamp(claims.iat, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        Ok(serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": claims.exp - claims.iat,
            "issued_at": issued,
        }))
    }
}

/// What the task API asks of a request: `registry:tasks:read` to look (GET, HEAD),
/// `registry:tasks:write` for anything else.
pub fn tasks_need(method: &axum::http::Method) -> Need<'static> {
    let read = *method == axum::http::Method::GET || *method == axum::http::Method::HEAD;
    Need {
        kind: "registry",
        name: "tasks",
        actions: if read { &["read"] } else { &["write"] },
    }
}

impl Auth {
    /// Who a task-API request comes from, if they may do what it asks: basic credentials
    /// of the admin or of a token with tasks/read or tasks/write on `*` (through the same
    /// brakes as the token endpoint), or a bearer token carrying `registry:tasks:...`.
    pub async fn authorize_tasks(
        self: &Arc<Self>,
        method: &axum::http::Method,
        headers: &HeaderMap,
        ip: IpAddr,
    ) -> Result<String, AuthFailure> {
        let need = tasks_need(method);
        let write = need.actions == ["write"];
        match basic(headers) {
            Some(Some((user, pass))) => match self.login(ip, &user, &pass).await? {
                Some(g) => match g.tasks() {
                    Some(true) => Ok(user),
                    Some(false) if !write => Ok(user),
                    _ => Err(AuthFailure::Denied(format!(
                        "{user} may not {} tasks (needs tasks/{} on the registry)",
                        if write { "manage" } else { "see" },
                        if write { "write" } else { "read" }
                    ))),
                },
                None => Err(AuthFailure::Unauthorized {
                    challenge: self.challenge(headers, Some(need), None),
                    message: "authentication failed".into(),
                }),
            },
            _ => self
                .authorize(headers, Some(need))
                .map(|c| c.map(|c| c.sub).unwrap_or_default()),
        }
    }

    /// The CSRF token of `subject`: browsers must echo it on state-changing requests.
    /// An HMAC under the server's secret key, so only the server can make one.
    pub fn csrf_token(&self, subject: &str) -> String {
        use hmac::Mac;
        match hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key) {
            Ok(mut m) => {
                m.update(b"acr-task csrf\0");
                m.update(subject.as_bytes());
                hex::encode(m.finalize().into_bytes())
            }
            Err(_) => String::new(),
        }
    }

    /// Whether `token` is `subject`'s CSRF token (constant time).
    pub fn csrf_ok(&self, subject: &str, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.csrf_token(subject);
        !want.is_empty() && bool::from(want.as_bytes().ct_eq(token.as_bytes()))
    }
}

/// The client's IP from axum's connect info (127.0.0.1 stands in when it is absent).
pub fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

async fn token_handler(State(auth): State<Arc<Auth>>, req: Request) -> Response {
    let ip = client_ip(&req);
    let query: Vec<(String, String)> = req.uri().query().and_then(query_pairs).unwrap_or_default();
    match auth.token_request(ip, req.headers(), &query).await {
        Ok(v) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            v.to_string(),
        )
            .into_response(),
        Err(f) => f.into_response(),
    }
}

/// Decode `a=b&c=d` keeping repeated keys (several `scope=` are normal).
fn query_pairs(q: &str) -> Option<Vec<(String, String)>> {
    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&format!("/?{q}").parse().ok()?)
        .ok()
        .map(|x| x.0)
}

/// `GET /oauth2/token` (also `/token`, distribution's usual path).
pub fn token_router(auth: Arc<Auth>) -> Router {
    Router::new()
        .route(TOKEN_PATH, get(token_handler))
        .route("/token", get(token_handler))
        .with_state(auth)
}
