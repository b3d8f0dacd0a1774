//! The outgoing POST, over HTTP or HTTPS (the system's roots plus `serve --ca-cert`).
//!
//! A webhook is a request the server makes on someone's behalf, so it must not become a
//! way into the server's own network: redirects are never followed (a receiver cannot
//! bounce the request, with its signature and custom headers, elsewhere), and loopback,
//! link-local and private destinations need an explicit opt-in when the webhook is
//! created. The check is made on the addresses actually connected to (a resolver that
//! drops private ones), so a name that later resolves to 127.0.0.1 gets nowhere.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::WebhookError;

pub use crate::netaddr::is_public;

/// Resolves names but keeps only public addresses: what webhooks without the opt-in use.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves only to private or local addresses; create the webhook \
                     with --allow-private-destination to deliver there"
                )
                .into());
            }
            let out: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(out)
        })
    }
}

/// The two delivery clients: public destinations only, and any destination (for webhooks
/// created with the opt-in). Neither follows redirects.
pub fn delivery_clients(
    base: reqwest::ClientBuilder,
    base_any: reqwest::ClientBuilder,
) -> Result<(reqwest::Client, reqwest::Client), WebhookError> {
    let build = |b: reqwest::ClientBuilder| {
        b.redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WebhookError::Invalid(format!("cannot set up the HTTP client: {e}")))
    };
    Ok((
        build(base.dns_resolver(Arc::new(PublicOnly)))?,
        build(base_any)?,
    ))
}

/// The destination's host as an address, when it is written as one.
fn literal_ip(uri: &str) -> Option<IpAddr> {
    let u = reqwest::Url::parse(uri).ok()?;
    u.host_str()?.trim_matches(['[', ']']).parse().ok()
}

/// At creation: a destination that is (or resolves only to) a private or local address
/// needs `allow_private`. A name that does not resolve yet is let through; delivery
/// checks again on every attempt.
pub fn check_destination(uri: &str, allow_private: bool) -> Result<(), WebhookError> {
    if allow_private {
        return Ok(());
    }
    let refuse = |what: String| {
        WebhookError::Invalid(format!(
            "webhook uri {uri:?}: {what}; if that is intended, create it with \
             --allow-private-destination"
        ))
    };
    if let Some(ip) = literal_ip(uri) {
        if !is_public(ip) {
            return Err(refuse(format!(
                "{ip} is a loopback, link-local or private address"
            )));
        }
        return Ok(());
    }
    let Some((host, port)) = reqwest::Url::parse(uri)
        .ok()
        .and_then(|u| Some((u.host_str()?.to_string(), u.port_or_known_default()?)))
    else {
        return Ok(());
    };
    use std::net::ToSocketAddrs;
    if let Ok(addrs) = (host.as_str(), port).to_socket_addrs() {
        let addrs: Vec<SocketAddr> = addrs.collect();
        if !addrs.is_empty() && addrs.iter().all(|a| !is_public(a.ip())) {
            return Err(refuse(format!(
                "{host} resolves to loopback, link-local or private addresses"
            )));
        }
    }
    Ok(())
}

/// At delivery: the resolver guards names; an address written in the URI is checked here.
pub fn destination_allowed(uri: &str, allow_private: bool) -> Result<(), String> {
    match literal_ip(uri) {
        Some(ip) if !allow_private && !is_public(ip) => Err(format!(
            "destination {ip} is a private or local address and this webhook was not created \
             with --allow-private-destination"
        )),
        _ => Ok(()),
    }
}

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
    fn private_destinations_need_the_opt_in() {
        assert!(check_destination("http://127.0.0.1:9/h", false).is_err());
        assert!(check_destination("http://[::1]:9/h", false).is_err());
        assert!(check_destination("http://169.254.169.254/latest/meta-data", false).is_err());
        assert!(check_destination("http://localhost:9/h", false).is_err());
        assert!(check_destination("http://127.0.0.1:9/h", true).is_ok());
        assert!(check_destination("https://8.8.8.8/h", false).is_ok());
        assert!(destination_allowed("http://10.0.0.1/", false).is_err());
        assert!(destination_allowed("http://10.0.0.1/", true).is_ok());
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_not_connected_to() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let e = match PublicOnly.resolve(name).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("localhost resolved to an address a webhook may reach"),
        };
        assert!(e.contains("--allow-private-destination"), "{e}");
    }

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
