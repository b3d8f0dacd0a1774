//! A small plain-HTTP client for the registry API, enough for `acr-task repository
//! --registry HOST:PORT` (catalog, tags, manifests, deletes). One request per connection;
//! loopback registries only speak plain HTTP here.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach registry at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry at {0} sent a malformed response")]
    Malformed(String),
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A tagged manifest as seen over HTTP (the API has no "all manifests" listing).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteManifest {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct RegistryClient {
    addr: String,
}

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

impl RegistryClient {
    /// `addr` is `HOST:PORT`.
    pub fn new(addr: impl Into<String>) -> Self {
        RegistryClient { addr: addr.into() }
    }

    pub async fn request(&self, method: &str, path: &str) -> Result<HttpResponse, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let mut s = match self.addr.parse::<SocketAddr>() {
            Ok(a) => tokio::net::TcpStream::connect(a).await,
            Err(_) => tokio::net::TcpStream::connect(self.addr.as_str()).await,
        }
        .map_err(connect_err)?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: {ACCEPT}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        );
        s.write_all(req.as_bytes()).await.map_err(connect_err)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(connect_err)?;
        parse_response(&raw, method == "HEAD")
            .ok_or_else(|| ClientError::Malformed(self.addr.clone()))
    }

    async fn ok(&self, method: &str, path: &str) -> Result<HttpResponse, ClientError> {
        let r = self.request(method, path).await?;
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

    async fn json(&self, path: &str) -> Result<Value, ClientError> {
        let r = self.ok("GET", path).await?;
        serde_json::from_slice(&r.body).map_err(|_| ClientError::Malformed(self.addr.clone()))
    }

    pub async fn repositories(&self) -> Result<Vec<String>, ClientError> {
        let v = self.json("/v2/_catalog").await?;
        Ok(strings(&v["repositories"]))
    }

    pub async fn tags(&self, repo: &str) -> Result<Vec<String>, ClientError> {
        let v = self.json(&format!("/v2/{repo}/tags/list")).await?;
        Ok(strings(&v["tags"]))
    }

    /// Manifests reachable through tags, grouped by digest.
    pub async fn manifests(&self, repo: &str) -> Result<Vec<RemoteManifest>, ClientError> {
        let mut out: Vec<RemoteManifest> = Vec::new();
        for tag in self.tags(repo).await? {
            let r = self
                .ok("HEAD", &format!("/v2/{repo}/manifests/{tag}"))
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
                size: r
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                tags: vec![tag],
            });
        }
        Ok(out)
    }

    /// Delete a tag or (by digest) a manifest with its tags.
    pub async fn delete_manifest(&self, repo: &str, reference: &str) -> Result<(), ClientError> {
        self.ok("DELETE", &format!("/v2/{repo}/manifests/{reference}"))
            .await
            .map(|_| ())
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

fn parse_response(raw: &[u8], head: bool) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head_text = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head_text.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if head {
        body.clear();
    } else if chunked {
        body = dechunk(&body)?;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..nl]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[nl + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", false).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"garbage", false).is_none());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            false
        )
        .is_none());
    }
}
