//! The command lines inside steps: `cmd: image args...` and `build: <docker build args>`,
//! split the way a POSIX shell splits words (quotes and backslashes), as ACR does.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("unterminated quote in `{0}`")]
    Unterminated(String),
    #[error("empty {0}")]
    Empty(&'static str),
    #[error("`{flag}` needs a value")]
    MissingValue { flag: String },
    #[error("unsupported build flag `{0}`")]
    UnknownFlag(String),
    #[error("--build-arg `{0}` is not KEY=VALUE")]
    BadBuildArg(String),
    #[error("expected exactly one build context, found {0}")]
    Context(usize),
}

/// Splits a command line into words.
pub fn split_words(s: &str) -> Result<Vec<String>, ArgsError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(ArgsError::Unterminated(s.into())),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c)
                            }
                            None => return Err(ArgsError::Unterminated(s.into())),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(ArgsError::Unterminated(s.into())),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => cur.push(c),
                    None => cur.push('\\'),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// `cmd: image args...` → (image, args).
pub fn parse_cmd(cmd: &str) -> Result<(String, Vec<String>), ArgsError> {
    let mut words = split_words(cmd)?.into_iter();
    let image = words.next().ok_or(ArgsError::Empty("cmd"))?;
    Ok((image, words.collect()))
}

/// The `docker build` arguments of a `build` step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildArgs {
    pub tags: Vec<String>,
    pub dockerfile: Option<String>,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub no_cache: bool,
    pub pull: bool,
    pub platform: Option<String>,
    pub network: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub context: String,
}

/// Parses `docker build` flags. Unknown flags are refused rather than silently ignored.
pub fn parse_build(build: &str) -> Result<BuildArgs, ArgsError> {
    let words = split_words(build)?;
    let mut out = BuildArgs::default();
    let mut contexts = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        if !w.starts_with('-') || w == "-" {
            contexts.push(w);
            continue;
        }
        let (flag, inline) = match w.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (w.clone(), None),
        };
        let mut value = |flag: &str| -> Result<String, ArgsError> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .ok_or_else(|| ArgsError::MissingValue { flag: flag.into() }),
            }
        };
        match flag.as_str() {
            "-t" | "--tag" => out.tags.push(value(&flag)?),
            "-f" | "--file" => out.dockerfile = Some(value(&flag)?),
            "--build-arg" => {
                let kv = value(&flag)?;
                match kv.split_once('=') {
                    Some((k, v)) => out.build_args.insert(k.into(), v.into()),
                    // `--build-arg KEY` takes the value from the environment, as docker does.
                    None => match std::env::var(&kv) {
                        Ok(v) => out.build_args.insert(kv, v),
                        Err(_) => return Err(ArgsError::BadBuildArg(kv)),
                    },
                };
            }
            "--label" => {
                let kv = value(&flag)?;
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                out.labels.insert(k.into(), v.into());
            }
            "--target" => out.target = Some(value(&flag)?),
            "--platform" => out.platform = Some(value(&flag)?),
            "--network" => out.network = Some(value(&flag)?),
            "--no-cache" => out.no_cache = inline.as_deref() != Some("false"),
            "--pull" => out.pull = inline.as_deref() != Some("false"),
            // Accepted for compatibility; the engine already behaves this way.
            "--rm" | "--force-rm" | "-q" | "--quiet" => {}
            _ => return Err(ArgsError::UnknownFlag(flag)),
        }
    }
    if contexts.len() != 1 {
        return Err(ArgsError::Context(contexts.len()));
    }
    out.context = contexts.remove(0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_shell_quoting() {
        assert_eq!(
            split_words(r#"sh -c 'echo "a b"' "x y" z\ w"#).unwrap(),
            vec!["sh", "-c", r#"echo "a b""#, "x y", "z w"]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("a ''").unwrap(), vec!["a", ""]);
        assert!(split_words("echo 'oops").is_err());
    }

    #[test]
    fn build_flags() {
        let b = parse_build("-t r/app:1 --tag=r/app:latest -f docker/Dockerfile --build-arg V=2 --target final --no-cache --platform linux/amd64 .").unwrap();
        assert_eq!(b.tags, vec!["r/app:1", "r/app:latest"]);
        assert_eq!(b.dockerfile.as_deref(), Some("docker/Dockerfile"));
        assert_eq!(b.build_args.get("V").map(String::as_str), Some("2"));
        assert_eq!(b.target.as_deref(), Some("final"));
        assert!(b.no_cache);
        assert_eq!(b.platform.as_deref(), Some("linux/amd64"));
        assert_eq!(b.context, ".");
        assert_eq!(parse_build("-t x"), Err(ArgsError::Context(0)));
        assert_eq!(
            parse_build("--squash ."),
            Err(ArgsError::UnknownFlag("--squash".into()))
        );
        assert_eq!(
            parse_build(". -t"),
            Err(ArgsError::MissingValue { flag: "-t".into() })
        );
    }
}
