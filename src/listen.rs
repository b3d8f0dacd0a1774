//! Serving an axum app on a bound listener, over plain HTTP or TLS (`serve --tls-cert`).
//! One way for the registry and the task service alike: both need client addresses (the
//! login rate limit), limits on connections and a graceful stop.
//!
//! [`check_host`] guards every route of both: a request whose `Host` is not one of the
//! server's names is refused. A web page that points a name it controls at 127.0.0.1 (DNS
//! rebinding) sends that name, so it reaches neither the registry nor the task API. IP
//! literals, `localhost`, the machine's own host name and `serve --server-name` are the
//! server's names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio_rustls::rustls;

/// A server certificate chain and key, ready to accept TLS connections.
#[derive(Clone)]
pub struct TlsConfig(Arc<rustls::ServerConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS certificate {cert} with key {key}: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

impl TlsConfig {
    /// Loads a PEM certificate chain (leaf first) and its PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsConfig, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pem_err = |path: &Path, message: String| TlsError::Pem {
            path: path.to_path_buf(),
            message,
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_err(cert, "no CERTIFICATE block found".into()));
        }
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            pem_err(
                key,
                format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
            )
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config_err = |source| TlsError::Config {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_no_client_auth()
            .with_single_cert(certs, private)
            .map_err(config_err)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsConfig(Arc::new(config)))
    }
}

/// A TLS handshake that takes longer than this is dropped (a stalled client holds nothing).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most headers in one request (hyper's buffer limit bounds their total size).
const MAX_HEADERS: usize = 128;

/// How many connections one server holds at once (and one client address of them), and
/// how long a client may take to send a request's headers, which is also how long a
/// kept-alive connection may sit idle before its next request.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub total: usize,
    pub per_client: usize,
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            total: 1024,
            per_client: 256,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Open connections per client address, so one client cannot hold every slot.
#[derive(Default)]
struct PerClient(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PerClient {
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<ClientSlot> {
        let mut m = self.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            ip,
        })
    }
}

struct ClientSlot {
    table: Arc<PerClient>,
    ip: std::net::IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.0.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// The names this server answers to.
#[derive(Debug, Clone)]
pub struct HostNames {
    names: Vec<String>,
}

impl HostNames {
    /// `localhost`, the machine's host name, and `extra` (lower-cased).
    pub fn new(extra: &[String]) -> HostNames {
        let mut names = vec!["localhost".to_string()];
        if let Some(h) = hostname() {
            names.push(h.to_ascii_lowercase());
        }
        names.extend(extra.iter().map(|n| n.trim().to_ascii_lowercase()));
        HostNames { names }
    }

    /// Whether a `Host` header value names this server (the port does not matter).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim();
        let name = if let Some(rest) = host.strip_prefix('[') {
            // [v6]:port
            return rest
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        } else {
            match host.rsplit_once(':') {
                Some((n, port)) if port.chars().all(|c| c.is_ascii_digit()) => n,
                _ => host,
            }
        };
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.names.contains(&name)
    }
}

/// The machine's host name, if it has one.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end])
        .ok()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Middleware for every route: the `Host` must be one of the server's names.
pub async fn check_host(State(names): State<Arc<HostNames>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"));
    match host {
        Some(h) if !names.allows(h) => {
            tracing::warn!(host = %h, path = %req.uri().path(), "request for another host name refused");
            refuse(
                req.uri().path(),
                StatusCode::FORBIDDEN,
                "DENIED",
                format!(
                    "this server does not answer to the name {h:?}; if it is one of its names, \
                     start it with `serve --server-name {}`",
                    h.rsplit_once(':').map_or(h, |(n, _)| n)
                ),
            )
        }
        _ => next.run(req).await,
    }
}

/// An error in the shape the path's clients read: distribution's for the registry and its
/// token endpoint, `{"error": ...}` for the rest.
pub fn refuse(path: &str, status: StatusCode, code: &str, message: String) -> Response {
    let body = if path.starts_with("/v2") || path.starts_with("/oauth2") || path == "/token" {
        serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]})
    } else {
        serde_json::json!({"error": message})
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_else(|_| status.into_response())
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests end.
/// Handlers see the client address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<TlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, tls, ConnectionLimits::default(), shutdown).await
}

/// [`serve`] with explicit connection limits. Plain and TLS connections go through the
/// same hyper builder, so both have the header timeout and the limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<TlsConfig>,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tls.map(|TlsConfig(config)| tokio_rustls::TlsAcceptor::from(config));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.total.max(1)));
    let per_client = Arc::new(PerClient::default());
    tokio::pin!(shutdown);
    loop {
        // At the total limit, wait for a connection to end before accepting another.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_client.enter(peer.ip(), limits.per_client) else {
            tracing::debug!(%peer, "connection refused: too many from this client");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone().layer(axum::Extension(ConnectInfo(peer)));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_headers(MAX_HEADERS);
            let result = match acceptor {
                None => {
                    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn =
                        builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        let n = HostNames::new(&["registry.example.com".into()]);
        for ok in [
            "127.0.0.1:5000",
            "localhost:5000",
            "LOCALHOST",
            "[::1]:5000",
            "10.1.2.3",
            "registry.example.com:443",
            "registry.example.com.",
        ] {
            assert!(n.allows(ok), "{ok}");
        }
        for bad in [
            "attacker.example:5000",
            "127.0.0.1.nip.io:5000",
            "localhost.attacker.example",
            "[nonsense]",
        ] {
            assert!(!n.allows(bad), "{bad}");
        }
    }
}
