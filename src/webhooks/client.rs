//! The outgoing POST, over HTTP or HTTPS (the system's roots plus `serve --ca-cert`).

use std::time::Duration;

use super::WebhookError;

/// Checks a receiver URI: `http://` or `https://`, a host, no credentials in it.
pub fn check_uri(uri: &str) -> Result<(), WebhookError> {
    let invalid = |why: &str| WebhookError::Invalid(format!("webhook uri {uri:?}: {why}"));
    let u = reqwest::Url::parse(uri).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(invalid("must start with http:// or https://"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        // They would be stored and shown in clear: use --header Authorization=... instead.
        return Err(invalid("must not carry credentials (use --header)"));
    }
    Ok(())
}

/// POST `body` to `uri`; returns the HTTP status. Errors are connection-level (refused,
/// TLS, timeout), with their causes.
pub async fn post(
    http: &reqwest::Client,
    uri: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let mut req = http
        .post(uri)
        .timeout(timeout)
        .header("user-agent", "acr-task-webhook")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    match req.send().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(crate::registry::client::error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert!(check_uri("http://127.0.0.1:9/hook?x=1").is_ok());
        assert!(check_uri("https://hooks.example.com/acr").is_ok());
        assert!(check_uri("http://example").is_ok());
        assert!(check_uri("ftp://x/").is_err());
        assert!(check_uri("http://a b/").is_err());
        assert!(check_uri("http://").is_err());
        let e = check_uri("https://u:p@x/").unwrap_err().to_string();
        assert!(e.contains("credentials"), "{e}");
    }
}
