//! The OCI distribution grammar of repository names and tags, as plain functions with no
//! I/O: the registry, access control (scope-map patterns) and clients all read names by it.

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, ≤ 255 chars.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 255 && !name.is_empty() && name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// A repository pattern: an exact name, `prefix/*` (anything below `prefix/`), or `*`.
pub fn valid_pattern(p: &str) -> bool {
    let base = p.strip_suffix("/*").unwrap_or(p);
    p == "*" || valid_name(base)
}

/// Whether a repository pattern (scope maps, content-trust policies) matches `repo`.
pub fn pattern_matches(pattern: &str, repo: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => repo.starts_with(prefix) && repo.len() > prefix.len(),
        None => pattern == repo,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for ok in ["a", "library/busybox", "a.b_c__d---e/f0", "x/y/z"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "", "A", "a/../b", "/a", "a/", "a//b", "-a", "a_", "a___b", "a..b", "..",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(!valid_name(&"a".repeat(256)));
        assert!(valid_name(&"a".repeat(255)));
    }

    #[test]
    fn tags() {
        assert!(valid_tag("v1.0_rc-1"));
        assert!(valid_tag("_x"));
        assert!(!valid_tag("-x"));
        assert!(!valid_tag(".x"));
        assert!(!valid_tag(&"a".repeat(129)));
    }
}
