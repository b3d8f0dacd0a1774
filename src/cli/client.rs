//! The client of a running `acr-task serve`'s JSON API, shared by `task ...` and the
//! registry management commands: the server's address as users type it, credentials
//! (`ACR_TASK_USERNAME`/`ACR_TASK_PASSWORD`, or the admin password a server on this
//! machine keeps in its data directory), and errors as the server's sentences.

use anyhow::{bail, Context};
use serde_json::Value;

/// For a server on this machine: the admin password it made on its first start, from the
/// default data directory (`$ACR_TASK_DATA`, ...), readable only by its user.
fn local_admin(server: &str, data: &std::path::Path) -> Option<(String, String)> {
    let url = reqwest::Url::parse(server).ok()?;
    if !crate::registry::reference::is_loopback(url.host_str()?) {
        return None;
    }
    let path = data.join(crate::server::ADMIN_PASSWORD_FILE);
    let text = std::fs::read_to_string(path).ok()?;
    let password = text.trim();
    (!password.is_empty()).then(|| (crate::auth::ADMIN_USER.to_string(), password.to_string()))
}

pub struct Client {
    pub base: String,
    http: reqwest::Client,
    /// Basic credentials for a server started with `--auth`: the admin or a token name,
    /// and its password (`ACR_TASK_USERNAME`, `ACR_TASK_PASSWORD`).
    credentials: Option<(String, String)>,
    /// With [`Client::with_tokens`]: a bearer token of the server's token endpoint, got
    /// with the credentials once (one password check, not one per call) and renewed when
    /// it expires.
    tokens: std::sync::atomic::AtomicBool,
    bearer: std::sync::Mutex<Option<String>>,
}

/// A server address as users type it: a URL, or `HOST:PORT` (plain HTTP on loopback, as
/// `serve` listens by default; HTTPS anywhere else).
fn server_url(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    if s.contains("://") {
        return s.to_string();
    }
    if crate::registry::reference::is_loopback(s) {
        format!("http://{s}")
    } else {
        format!("https://{s}")
    }
}

/// A client of the server that holds the data directory `top` now, if one does (`serve`
/// writes its URL in `serve.url` and holds the registry's `serve.lock`).
pub fn holding(top: &std::path::Path) -> Option<Client> {
    let url = std::fs::read_to_string(top.join(crate::server::SERVE_URL_FILE)).ok()?;
    crate::store::held_by_a_server(&top.join("registry"))
        .then(|| Client::with_data(url.trim(), top))
}

impl Client {
    /// A client of `server` (on this machine: of the default data directory's server).
    pub fn new(server: &str) -> Client {
        Client::with_data(server, &super::default_data_dir())
    }

    /// A client of `server`, which keeps its data in `data` when it runs on this machine.
    pub fn with_data(server: &str, data: &std::path::Path) -> Client {
        let server = &server_url(server);
        let credentials = match (
            std::env::var("ACR_TASK_USERNAME"),
            std::env::var("ACR_TASK_PASSWORD"),
        ) {
            (Ok(u), Ok(p)) => Some((u, p)),
            _ => local_admin(server, data),
        };
        Client {
            base: server.clone(),
            http: reqwest::Client::new(),
            credentials,
            tokens: std::sync::atomic::AtomicBool::new(false),
            bearer: std::sync::Mutex::new(None),
        }
    }

    /// A client of another registry's server with its own login (not this machine's), and
    /// `ca_certs` trusted beside the system's roots.
    pub fn with_login(
        server: &str,
        login: Option<crate::credentials::Credential>,
        ca_certs: &[std::path::PathBuf],
    ) -> anyhow::Result<Client> {
        Ok(Client {
            base: server_url(server),
            http: crate::registry::client::http_client(ca_certs)?,
            credentials: login.map(|c| (c.username, c.password)),
            tokens: std::sync::atomic::AtomicBool::new(false),
            bearer: std::sync::Mutex::new(None),
        })
    }

    /// The status of a GET of `path` (the body left unread): what kind of server this is.
    pub async fn probe(&self, path: &str) -> anyhow::Result<reqwest::StatusCode> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .request(reqwest::Method::GET, &url)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Ok(resp.status())
    }

    /// The credentials this client sends, as a registry login.
    pub fn login(&self) -> Option<crate::credentials::Credential> {
        self.credentials
            .as_ref()
            .map(|(u, p)| crate::credentials::Credential {
                username: u.clone(),
                password: p.clone(),
            })
    }

    /// `HOST:PORT` of the server (its registry's name).
    pub fn host_port(&self) -> anyhow::Result<String> {
        let url = reqwest::Url::parse(&self.base)
            .with_context(|| format!("{} is not a server URL", self.base))?;
        let host = url
            .host_str()
            .with_context(|| format!("{} names no host", self.base))?;
        Ok(match url.port_or_known_default() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        })
    }

    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        let bearer = self.bearer.lock().ok().and_then(|b| b.clone());
        match (&self.credentials, bearer) {
            (_, Some(t)) => req.bearer_auth(t),
            (Some((u, p)), None) => req.basic_auth(u, Some(p)),
            (None, None) => req,
        }
    }

    /// A client that logs in once for many calls (a bearer token for the task and
    /// management API, renewed when it expires).
    pub fn with_tokens(mut self) -> Client {
        self.tokens = std::sync::atomic::AtomicBool::new(true);
        self
    }

    /// Gets a bearer token with the credentials (for [`Client::with_tokens`]).
    async fn fetch_token(&self) -> anyhow::Result<()> {
        let Some((u, p)) = &self.credentials else {
            return Ok(());
        };
        use crate::auth::http::{fetch_api_token, ApiToken};
        let answer = fetch_api_token(&self.http, &self.base, u, p)
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        match answer {
            ApiToken::Token(t) => {
                if let Ok(mut b) = self.bearer.lock() {
                    *b = Some(t);
                }
                Ok(())
            }
            // A server without the endpoint: the credentials on every call, as before.
            ApiToken::NoEndpoint => {
                self.tokens
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            ApiToken::Refused(status) => bail!(
                "the server at {} refused the login of {u} (HTTP {status})",
                self.base
            ),
        }
    }

    /// Sends and returns the JSON body; an error status becomes an error with the
    /// server's message (and its diagnostics, one per line).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let has_token = self.bearer.lock().map(|b| b.is_some()).unwrap_or(false);
        let tokens = self.tokens.load(std::sync::atomic::Ordering::Relaxed);
        if tokens && !has_token {
            self.fetch_token().await?;
        }
        let send = || {
            let mut req = self.request(method.clone(), &url);
            if let Some(b) = body {
                req = req.json(b);
            }
            req.send()
        };
        let unreachable = || {
            format!(
                "cannot reach the server at {} (is `acr-task serve` running?)",
                self.base
            )
        };
        let mut resp = send().await.with_context(unreachable)?;
        if tokens && has_token && resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            // The token expired: another, once.
            self.fetch_token().await?;
            resp = send().await.with_context(unreachable)?;
        }
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        let v: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = match (&v, v["error"].as_str()) {
                (_, Some(e)) => e.to_string(),
                (Value::String(t), _) if !t.trim().is_empty() => t.trim().to_string(),
                _ => format!("the server at {} answered {status}", self.base),
            };
            bail!("{msg}");
        }
        Ok(v)
    }
}

/// The sentence in an API error body (`{"error": ...}`), never the raw JSON.
pub fn api_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::server_url;

    #[test]
    fn a_server_without_a_scheme_is_reached() {
        assert_eq!(server_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(server_url("localhost:5000/"), "http://localhost:5000");
        assert_eq!(server_url("[::1]:5000"), "http://[::1]:5000");
        assert_eq!(
            server_url("acr.example.com:443"),
            "https://acr.example.com:443"
        );
        assert_eq!(server_url("acr.example.com"), "https://acr.example.com");
        assert_eq!(
            server_url("https://127.0.0.1:5000/"),
            "https://127.0.0.1:5000"
        );
    }
}
