//! Base-image dependencies of a Dockerfile: every `FROM` image, multi-stage aware
//! (stages referenced by name are not images), with `ARG` defaults and build args substituted.

use std::collections::BTreeMap;

/// The external images a Dockerfile builds on, in order, without duplicates.
pub fn base_images(dockerfile: &str, build_args: &BTreeMap<String, String>) -> Vec<String> {
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut out: Vec<String> = Vec::new();
    let mut seen_from = false;
    for line in logical_lines(dockerfile) {
        let mut words = line.split_whitespace();
        let Some(instr) = words.next() else { continue };
        match instr.to_ascii_uppercase().as_str() {
            // Only ARGs before the first FROM are in scope for FROM lines.
            "ARG" if !seen_from => {
                for decl in words {
                    let (k, v) = match decl.split_once('=') {
                        Some((k, v)) => (k, Some(unquote(v))),
                        None => (decl, None),
                    };
                    let value = build_args.get(k).cloned().or(v.map(str::to_string));
                    if let Some(value) = value {
                        args.insert(k.to_string(), value);
                    }
                }
            }
            "FROM" => {
                seen_from = true;
                let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                let Some(image) = rest.first() else { continue };
                let image = substitute(image, &args);
                if rest.len() >= 3 && rest[1].eq_ignore_ascii_case("AS") {
                    stages.push(rest[2].to_ascii_lowercase());
                } else {
                    stages.push(String::new());
                }
                let is_stage = stages[..stages.len() - 1]
                    .iter()
                    .any(|s| *s == image.to_ascii_lowercase());
                if !is_stage && image != "scratch" && !out.contains(&image) {
                    out.push(image);
                }
            }
            _ => {}
        }
    }
    out
}

/// Joins `\` continuations and drops comments.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for raw in text.lines() {
        let t = raw.trim();
        if cur.is_empty() && (t.starts_with('#') || t.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            lines.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

fn unquote(v: &str) -> &str {
    v.trim_matches('"').trim_matches('\'')
}

/// `$VAR`, `${VAR}` and `${VAR:-default}` substitution.
fn substitute(s: &str, args: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            chars.next();
            let inner: String = chars.by_ref().take_while(|c| *c != '}').collect();
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner.as_str(), None),
            };
            match args.get(name).filter(|v| !v.is_empty()) {
                Some(v) => out.push_str(v),
                None => out.push_str(default.unwrap_or("")),
            }
        } else {
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push_str(args.get(&name).map(String::as_str).unwrap_or(""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_stage_with_args() {
        let df = "ARG BASE=busybox\nARG TAG\nFROM ${BASE}:${TAG:-latest} AS build\nRUN x\n\
                  FROM --platform=linux/amd64 build AS test\nFROM registry:5000/app/run:1 \\\n  AS final\n\
                  COPY --from=build /x /x\nFROM scratch\n";
        let mut args = BTreeMap::new();
        assert_eq!(
            base_images(df, &args),
            vec!["busybox:latest", "registry:5000/app/run:1"]
        );
        args.insert("TAG".into(), "1.36".into());
        args.insert("BASE".into(), "runner".into());
        assert_eq!(
            base_images(df, &args),
            vec!["runner:1.36", "registry:5000/app/run:1"]
        );
    }
}
