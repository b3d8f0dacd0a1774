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
    #[error("docker flag `{0}` at the start of `cmd` is not supported by acr-task")]
    UnknownRunFlag(String),
    #[error("docker flag `{flag}` at the start of `cmd`: {why}")]
    RunFlag { flag: String, why: String },
    #[error("`cmd` names no image after its docker flags")]
    NoImage,
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

/// `cmd: image args...` → (image, args), docker flags before the image refused.
pub fn parse_cmd(cmd: &str) -> Result<(String, Vec<String>), ArgsError> {
    let c = parse_cmd_line(cmd)?;
    if let Some(f) = c.flag_words.first() {
        return Err(ArgsError::UnknownRunFlag(f.clone()));
    }
    Ok((c.image, c.args))
}

/// `docker run` flags written at the start of a `cmd`: ACR appends `cmd` to
/// `docker run <its own flags>`, so `cmd: -e A=B --user 1000 image args` works there.
/// What each flag may do on a server is the policy's business, not the parser's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFlags {
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Option<String>,
    pub hostname: Option<String>,
    pub add_hosts: Vec<String>,
    pub labels: Vec<String>,
    pub init: bool,
    pub read_only: bool,
    pub tty: bool,
    /// `--cpus`, in billionths of a CPU.
    pub nano_cpus: Option<i64>,
    /// `-m/--memory`, in bytes.
    pub memory: Option<u64>,
    pub pids_limit: Option<i64>,
    pub privileged: bool,
    pub network: Option<String>,
    pub pid: Option<String>,
    pub ipc: Option<String>,
    pub uts: Option<String>,
    pub userns: Option<String>,
    /// `-v/--volume SRC:DST[:OPTS]`: a host path or a docker volume.
    pub volumes: Vec<String>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub security_opt: Vec<String>,
    pub devices: Vec<String>,
    pub publish: Vec<String>,
    pub expose: Vec<String>,
}

/// A `cmd` split into its docker flags, image and arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdLine {
    pub flags: RunFlags,
    /// The flag words as written (for diagnostics).
    pub flag_words: Vec<String>,
    pub image: String,
    pub args: Vec<String>,
}

/// Splits `cmd` into docker flags, image and arguments. Unknown docker flags are refused
/// rather than ignored.
pub fn parse_cmd_line(cmd: &str) -> Result<CmdLine, ArgsError> {
    let words = split_words(cmd)?;
    let mut out = CmdLine::default();
    let mut it = words.into_iter().peekable();
    while let Some(w) = it.next_if(|w| w.starts_with('-') && w.len() > 1) {
        out.flag_words.push(w.clone());
        let (name, inline) = match w.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (w.clone(), None),
        };
        // Short flags may be grouped (`-it`) or carry their value (`-eA=B`).
        let (name, inline) = if !name.starts_with("--") && name.len() > 2 {
            let (flag, rest) = name.split_at(2);
            if rest.chars().all(|c| "itq".contains(c)) && "-i-t-q".contains(flag) {
                for c in rest.chars() {
                    if c == 't' {
                        out.flags.tty = true;
                    }
                }
                (flag.to_string(), None)
            } else {
                (flag.to_string(), Some(rest.to_string()))
            }
        } else {
            (name, inline)
        };
        let mut value = || -> Result<String, ArgsError> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => {
                    let v = it
                        .next()
                        .ok_or_else(|| ArgsError::MissingValue { flag: name.clone() })?;
                    out.flag_words.push(v.clone());
                    Ok(v)
                }
            }
        };
        let on = |inline: &Option<String>| inline.as_deref() != Some("false");
        let bad = |why: &str| ArgsError::RunFlag {
            flag: name.clone(),
            why: why.into(),
        };
        let f = &mut out.flags;
        match name.as_str() {
            "-e" | "--env" => f.env.push(value()?),
            "-w" | "--workdir" => f.workdir = Some(value()?),
            "-u" | "--user" => f.user = Some(value()?),
            "--entrypoint" => f.entrypoint = Some(value()?),
            "-h" | "--hostname" => f.hostname = Some(value()?),
            "--add-host" => f.add_hosts.push(value()?),
            "-l" | "--label" => f.labels.push(value()?),
            "--init" => f.init = on(&inline),
            "--read-only" => f.read_only = on(&inline),
            "-t" | "--tty" => f.tty = on(&inline),
            "-i" | "--interactive" | "--rm" | "-q" | "--quiet" => {}
            "--cpus" => {
                let v = value()?;
                let cpus: f64 = v.parse().map_err(|_| bad("expected a number of CPUs"))?;
                if !(cpus > 0.0 && cpus < 1e6) {
                    return Err(bad("expected a positive number of CPUs"));
                }
                f.nano_cpus = Some((cpus * 1e9) as i64);
            }
            "-m" | "--memory" => f.memory = Some(parse_size(&value()?).map_err(|e| bad(&e))?),
            "--pids-limit" => {
                f.pids_limit = Some(value()?.parse().map_err(|_| bad("expected a number"))?)
            }
            "--privileged" => f.privileged = on(&inline),
            "--network" | "--net" => f.network = Some(value()?),
            "--pid" => f.pid = Some(value()?),
            "--ipc" => f.ipc = Some(value()?),
            "--uts" => f.uts = Some(value()?),
            "--userns" => f.userns = Some(value()?),
            "-v" | "--volume" => f.volumes.push(value()?),
            "--cap-add" => f.cap_add.push(value()?),
            "--cap-drop" => f.cap_drop.push(value()?),
            "--security-opt" => f.security_opt.push(value()?),
            "--device" => f.devices.push(value()?),
            "-p" | "--publish" => f.publish.push(value()?),
            "--expose" => f.expose.push(value()?),
            "-d" | "--detach" => return Err(bad("use `detach: true` on the step")),
            "--name" => return Err(bad("containers are named after the step's id")),
            _ => return Err(ArgsError::UnknownRunFlag(name)),
        }
    }
    out.image = it.next().ok_or(if out.flag_words.is_empty() {
        ArgsError::Empty("cmd")
    } else {
        ArgsError::NoImage
    })?;
    out.args = it.collect();
    Ok(out)
}

/// A size such as `20GiB`, `512m`, `1.5GB` or `1048576` (bytes). `k`, `m`, `g`, `t` and
/// the `iB` forms are powers of 1024 (as docker's); `KB`, `MB`, `GB`, `TB` powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 20GiB, 512MiB, 1048576)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(v as u64)
}

/// The `docker build` arguments of a `build` step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildArgs {
    pub tags: Vec<String>,
    pub dockerfile: Option<String>,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub no_cache: bool,
    /// `--cache-from`: images the engine may take layers from.
    pub cache_from: Vec<String>,
    pub pull: bool,
    pub platform: Option<String>,
    pub network: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `--build-arg KEY` without a value: taken from the step's environment.
    pub env_build_args: Vec<String>,
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
                    Some((k, v)) => {
                        out.build_args.insert(k.into(), v.into());
                    }
                    // `--build-arg KEY` takes the value from the step's environment, as
                    // docker does from its own (never from acr-task's, which may hold the
                    // server's secrets).
                    None if !kv.is_empty() => out.env_build_args.push(kv),
                    None => return Err(ArgsError::BadBuildArg(kv)),
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
            "--cache-from" => out.cache_from.push(value(&flag)?),
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
    fn docker_flags_before_the_image() {
        let c = parse_cmd_line(
            "-e A=B --env=C=D -it -w /src --user 1000 --cpus 1.5 -m 512m --privileged \
             -v /var/run/docker.sock:/var/run/docker.sock --network host alpine sh -c 'x'",
        )
        .unwrap();
        assert_eq!(c.image, "alpine");
        assert_eq!(c.args, vec!["sh", "-c", "x"]);
        assert_eq!(c.flags.env, vec!["A=B", "C=D"]);
        assert!(c.flags.tty && c.flags.privileged);
        assert_eq!(c.flags.workdir.as_deref(), Some("/src"));
        assert_eq!(c.flags.nano_cpus, Some(1_500_000_000));
        assert_eq!(c.flags.memory, Some(512 << 20));
        assert_eq!(
            c.flags.volumes,
            vec!["/var/run/docker.sock:/var/run/docker.sock"]
        );
        assert_eq!(c.flags.network.as_deref(), Some("host"));
        assert!(c.flag_words.contains(&"--privileged".to_string()));
        // Arguments after the image are the program's, even when they look like flags.
        let c = parse_cmd_line("busybox ls -la").unwrap();
        assert!(c.flag_words.is_empty());
        assert_eq!(c.args, vec!["ls", "-la"]);
        assert_eq!(
            parse_cmd_line("--frobnicate x"),
            Err(ArgsError::UnknownRunFlag("--frobnicate".into()))
        );
        assert_eq!(parse_cmd_line("-e A=B"), Err(ArgsError::NoImage));
        assert!(matches!(
            parse_cmd_line("-d x"),
            Err(ArgsError::RunFlag { .. })
        ));
        assert!(matches!(
            parse_cmd_line("--cpus lots x"),
            Err(ArgsError::RunFlag { .. })
        ));
        assert_eq!(
            parse_cmd("-e A=B x"),
            Err(ArgsError::UnknownRunFlag("-e".into()))
        );
        assert_eq!(
            parse_cmd("x y").unwrap(),
            ("x".to_string(), vec!["y".to_string()])
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn build_flags() {
        let b = parse_build("-t r/app:1 --tag=r/app:latest -f docker/Dockerfile --build-arg V=2 --target final --no-cache --platform linux/amd64 --cache-from r/app:cache .").unwrap();
        assert_eq!(b.cache_from, vec!["r/app:cache"]);
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
