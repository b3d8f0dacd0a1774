//! The outgoing POST: plain HTTP/1.1 over tokio, one request per connection (webhook
//! receivers here are local services; https is not supported yet).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::WebhookError;

/// (host:port for connecting, Host header, path) of an `http://` URI.
pub fn parse_http_uri(uri: &str) -> Result<(String, String, String), WebhookError> {
    let rest = uri.strip_prefix("http://").ok_or_else(|| {
        WebhookError::Invalid(format!("webhook uri {uri:?} must start with http://"))
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let ok = !authority.is_empty()
        && !authority.contains('@')
        && authority
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-:[]_".contains(&c))
        && path.bytes().all(|c| c > b' ' && c != 0x7f);
    if !ok {
        return Err(WebhookError::Invalid(format!(
            "invalid webhook uri {uri:?}"
        )));
    }
    let connect = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((connect, authority.to_string(), path.to_string()))
}

/// POST `body` to `uri`; returns the HTTP status. Errors are connection-level.
pub async fn post(
    uri: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let (connect, host, path) = parse_http_uri(uri).map_err(|e| e.to_string())?;
    let work = async {
        let mut s = tokio::net::TcpStream::connect(&connect)
            .await
            .map_err(|e| format!("connect {connect}: {e}"))?;
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: acr-task-webhook\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        s.write_all(body).await.map_err(|e| format!("send: {e}"))?;
        // The status line is all we need; read until it is complete.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 8192 {
            let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "malformed HTTP response".to_string())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("timed out after {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_http_uri("http://127.0.0.1:9/hook?x=1").unwrap(),
            (
                "127.0.0.1:9".into(),
                "127.0.0.1:9".into(),
                "/hook?x=1".into()
            )
        );
        assert_eq!(parse_http_uri("http://example").unwrap().0, "example:80");
        assert!(parse_http_uri("https://x/").is_err());
        assert!(parse_http_uri("http://a b/").is_err());
        assert!(parse_http_uri("http://u:p@x/").is_err());
    }
}
