//! Matching a registry push against the base images tasks build on.

/// `repository:tag` of an image reference that names our registry (`host:port` equal to
/// `registry`, or `localhost`/`127.0.0.1` with its port); None for any other registry.
pub fn local_repo_tag(image: &str, registry: &str) -> Option<(String, String)> {
    let image = image.split('@').next().unwrap_or(image);
    let (host, rest) = image.split_once('/')?;
    let port = registry.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    let ours = host == registry
        || (!port.is_empty()
            && (host == format!("127.0.0.1:{port}") || host == format!("localhost:{port}")));
    if !ours {
        return None;
    }
    // A tag is after the last ':' that follows the last '/'.
    let (repo, tag) = match rest.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (rest, "latest"),
    };
    Some((repo.to_string(), tag.to_string()))
}

/// Whether a task that built on `base` (with `recorded` digest) must rebuild after `digest`
/// was pushed as `repository:tag` to our registry.
pub fn needs_rebuild(
    base: &str,
    recorded: Option<&str>,
    registry: &str,
    repository: &str,
    tag: &str,
    digest: &str,
) -> bool {
    match local_repo_tag(base, registry) {
        Some((r, t)) => r == repository && t == tag && recorded != Some(digest),
        None => false,
    }
}

/// Loop guard: whether `repository:tag` is one of a task's own outputs.
pub fn is_own_output(outputs: &[String], registry: &str, repository: &str, tag: &str) -> bool {
    outputs
        .iter()
        .any(|o| local_repo_tag(o, registry).is_some_and(|(r, t)| r == repository && t == tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_registry_matches() {
        let reg = "127.0.0.1:5000";
        assert_eq!(
            local_repo_tag("127.0.0.1:5000/base/img:1.0", reg),
            Some(("base/img".into(), "1.0".into()))
        );
        assert_eq!(
            local_repo_tag("localhost:5000/base", reg),
            Some(("base".into(), "latest".into()))
        );
        assert_eq!(local_repo_tag("busybox:latest", reg), None);
        assert_eq!(local_repo_tag("docker.io/library/alpine:3", reg), None);
        assert_eq!(local_repo_tag("127.0.0.1:5001/base:1", reg), None);
        assert!(needs_rebuild(
            "127.0.0.1:5000/base:1",
            Some("sha256:old"),
            reg,
            "base",
            "1",
            "sha256:new"
        ));
        assert!(!needs_rebuild(
            "127.0.0.1:5000/base:1",
            Some("sha256:new"),
            reg,
            "base",
            "1",
            "sha256:new"
        ));
        assert!(!needs_rebuild(
            "127.0.0.1:5000/base:2",
            None,
            reg,
            "base",
            "1",
            "d"
        ));
        assert!(is_own_output(
            &["127.0.0.1:5000/app:latest".into()],
            reg,
            "app",
            "latest"
        ));
    }
}
