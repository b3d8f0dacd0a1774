//! Image references as Docker reads them (`alpine`, `user/app:1`, `host:5000/a/b@sha256:..`):
//! which registry serves them, the repository there, and the tag or digest.

/// Where an image lives and which version of it is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host as written (`docker.io` for short names).
    pub registry: String,
    pub repository: String,
    /// A tag (`latest` when none is given) or, with `@`, a digest.
    pub reference: String,
}

/// Docker Hub's name in references, and the host its API is served from.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

impl ImageRef {
    /// Parses a reference with Docker's rules: the first component names a registry only
    /// if it has a `.` or `:` or is `localhost`; otherwise the image is on Docker Hub, where
    /// one-component names live under `library/`. None for an empty or malformed name.
    pub fn parse(image: &str) -> Option<ImageRef> {
        let image = image.trim();
        let (name, digest) = match image.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (image, None),
        };
        // A tag follows the last ':' after the last '/'.
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (name, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((h, rest)) if names_registry(h) => (h.to_string(), rest.to_string()),
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty()
            || repository.split('/').any(str::is_empty)
            || tag.is_some_and(str::is_empty)
        {
            return None;
        }
        let reference = match (digest, tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_string(),
        };
        Some(ImageRef {
            registry,
            repository,
            reference,
        })
    }

    /// `host[:port]` that serves the registry API for this image.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Whether the reference is a digest (such an image never changes).
    pub fn is_digest(&self) -> bool {
        self.reference.contains(':')
    }
}

/// Docker's rule for the first component of a name with a `/`: it names a registry only if
/// it has a `.` or `:` or is `localhost`.
pub fn names_registry(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

/// Whether `host[:port]` is a loopback registry, which Docker lets speak plain HTTP.
pub fn is_loopback(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => n,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (String, String, String, String) {
        let r = ImageRef::parse(s).unwrap();
        let host = r.api_host().to_string();
        (r.registry, host, r.repository, r.reference)
    }

    #[test]
    fn docker_hub_short_names_and_other_registries() {
        let p = |a: &str, b: &str, c: &str, d: &str| {
            (a.to_string(), b.to_string(), c.to_string(), d.to_string())
        };
        assert_eq!(
            parts("alpine"),
            p(
                "docker.io",
                "registry-1.docker.io",
                "library/alpine",
                "latest"
            )
        );
        assert_eq!(
            parts("user/app:1.2"),
            p("docker.io", "registry-1.docker.io", "user/app", "1.2")
        );
        assert_eq!(
            parts("docker.io/library/alpine:3"),
            p("docker.io", "registry-1.docker.io", "library/alpine", "3")
        );
        assert_eq!(
            parts("index.docker.io/busybox"),
            p(
                "docker.io",
                "registry-1.docker.io",
                "library/busybox",
                "latest"
            )
        );
        assert_eq!(
            parts("127.0.0.1:5000/base/img:1"),
            p("127.0.0.1:5000", "127.0.0.1:5000", "base/img", "1")
        );
        assert_eq!(
            parts("mcr.microsoft.com/dotnet/runtime"),
            p(
                "mcr.microsoft.com",
                "mcr.microsoft.com",
                "dotnet/runtime",
                "latest"
            )
        );
        assert_eq!(
            parts("localhost/app@sha256:abcd"),
            p("localhost", "localhost", "app", "sha256:abcd")
        );
        assert!(ImageRef::parse("localhost/app@sha256:abcd")
            .unwrap()
            .is_digest());
        assert_eq!(ImageRef::parse(""), None);
        assert_eq!(ImageRef::parse("host.io/"), None);
        assert_eq!(ImageRef::parse("app:"), None);
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.9.9.9",
            "[::1]:80",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["registry-1.docker.io", "10.0.0.1:5000", "example.com:443"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
