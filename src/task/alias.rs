//! `$` aliases, applied to the raw text before templates are rendered (as acr-builder's
//! preprocessor does): built-in aliases (`$ID` -> `{{.Run.ID}}`, ...), user aliases from the
//! `alias:` section, a custom directive character, and the doubled directive (`$$`) as an
//! escape for a literal one.

use std::collections::BTreeMap;
use std::path::Path;

use super::tree::{self, Node, Raw};
use super::{Alias, Diagnostic, RemoteAlias};

/// Built-in aliases and the `.Run` field each stands for.
pub const BUILTIN_ALIASES: &[(&str, &str)] = &[
    ("ID", "{{.Run.ID}}"),
    ("SharedVolume", "{{.Run.SharedVolume}}"),
    ("Registry", "{{.Run.Registry}}"),
    ("RegistryName", "{{.Run.RegistryName}}"),
    ("Date", "{{.Run.Date}}"),
    ("OS", "{{.Run.OS}}"),
    ("Architecture", "{{.Run.Architecture}}"),
    ("Commit", "{{.Run.Commit}}"),
    ("Branch", "{{.Run.Branch}}"),
    ("TaskName", "{{.Run.TaskName}}"),
];

/// Image aliases (acb's Linux defaults): as the image of a `cmd` they name the image.
/// `acr` is an image carrying acr-task itself (made on this machine, as the busybox
/// runner is), so a step can talk to the run's registry; the others are acb's.
pub const IMAGE_ALIASES: &[(&str, &str)] = &[
    ("acr", ACR_IMAGE),
    ("az", "mcr.microsoft.com/acr/azure-cli:2ff604c"),
    ("bash", "mcr.microsoft.com/acr/bash:2ff604c"),
    ("curl", "mcr.microsoft.com/acr/curl:2ff604c"),
    ("cssc", "mcr.microsoft.com/acr/cssc:2ff604c"),
];

/// The image the `acr` alias names.
pub const ACR_IMAGE: &str = "acr-task/acr:latest";

/// The image an image alias names.
pub fn image_alias(name: &str) -> Option<&'static str> {
    IMAGE_ALIASES
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
}

/// Largest alias file read or fetched.
const MAX_ALIAS_FILE: u64 = 1024 * 1024;

const DEFAULT_DIRECTIVE: char = '$';

/// The `alias:` section split out of a task file.
pub(crate) struct Split {
    /// The `alias:` section, other lines blanked so line numbers stay true.
    pub alias_text: String,
    /// The rest of the file, alias lines blanked so line numbers stay true.
    pub rest: String,
    pub has_alias: bool,
}

/// Splits the top-level `alias:` section from the rest, line by line as acr-builder does
/// (the section ends at the next top-level `key:` line).
pub(crate) fn split(text: &str) -> Split {
    let mut alias_text = String::with_capacity(64);
    let mut rest = String::with_capacity(text.len());
    let mut inside = false;
    let mut has_alias = false;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let top_level = is_top_level_key(body);
        if !body.starts_with('#') {
            if !inside && top_level && key_of(body) == "alias" {
                inside = true;
                has_alias = true;
            } else if inside && top_level {
                inside = false;
            }
        }
        let newline = &line[body.len()..];
        if inside {
            alias_text.push_str(line);
            rest.push_str(newline);
        } else {
            alias_text.push_str(newline);
            rest.push_str(line);
        }
    }
    Split {
        alias_text,
        rest,
        has_alias,
    }
}

fn is_top_level_key(line: &str) -> bool {
    match line.chars().next() {
        None => false,
        Some(c) if c.is_whitespace() || c == '#' || c == '-' || c == ':' => false,
        Some(_) => line.contains(':'),
    }
}

fn key_of(line: &str) -> &str {
    line.split(':').next().unwrap_or("").trim()
}

/// The resolved alias table.
pub(crate) struct Aliases {
    pub directive: char,
    /// User aliases only (they also apply to a `cmd`'s image without the directive).
    pub user: BTreeMap<String, String>,
    table: BTreeMap<String, String>,
}

impl Aliases {
    /// Reads the alias section (already parsed); `None` when the file has none.
    /// `base` is the directory that relative `alias.src` files are read from.
    /// `root`, when given, is the directory alias files must be inside (a stored task's
    /// context): a task cannot read the server's other files through `src`.
    pub(crate) fn from_section(
        file: &str,
        base: &Path,
        root: Option<&Path>,
        remote: RemoteAlias,
        node: Option<&Node>,
        diags: &mut Vec<Diagnostic>,
    ) -> (Aliases, Option<Alias>) {
        let mut directive = DEFAULT_DIRECTIVE;
        let mut user = BTreeMap::new();
        let mut model = None;
        if let Some(node) = node {
            let mut alias = Alias::default();
            match &node.raw {
                Raw::Null => {}
                Raw::Map(_) => {
                    if let Some(d) = node.get("directive") {
                        match scalar_text(d) {
                            Some(text) => {
                                let mut chars = text.chars();
                                match (chars.next(), chars.next()) {
                                    (Some(c), None) if !c.is_ascii_alphanumeric() => {
                                        directive = c;
                                        alias.directive = Some(text);
                                    }
                                    (Some(c), None) => diags.push(Diagnostic::new(
                                        file,
                                        d.line,
                                        d.column,
                                        format!(
                                            "alias directive `{c}` must not be a letter or digit"
                                        ),
                                    )),
                                    _ => diags.push(Diagnostic::new(
                                        file,
                                        d.line,
                                        d.column,
                                        format!(
                                            "alias directive `{text}` must be a single character"
                                        ),
                                    )),
                                }
                            }
                            None => diags.push(Diagnostic::new(
                                file,
                                d.line,
                                d.column,
                                "alias directive must be a single character".into(),
                            )),
                        }
                    }
                    match node.entry("values") {
                        None => {}
                        Some((_, v)) => match &v.raw {
                            Raw::Null => {}
                            Raw::Map(entries) => {
                                for (k, val) in entries {
                                    if k.name.is_empty()
                                        || !k.name.chars().all(|c| c.is_ascii_alphanumeric())
                                    {
                                        diags.push(Diagnostic::new(
                                            file,
                                            k.line,
                                            k.column,
                                            format!(
                                                "alias name `{}` may only contain letters and digits",
                                                k.name
                                            ),
                                        ));
                                        continue;
                                    }
                                    match scalar_text(val) {
                                        Some(text) => {
                                            user.insert(k.name.clone(), text);
                                        }
                                        None => diags.push(Diagnostic::new(
                                            file,
                                            val.line,
                                            val.column,
                                            format!("alias `{}` must be a plain value", k.name),
                                        )),
                                    }
                                }
                            }
                            _ => diags.push(Diagnostic::new(
                                file,
                                v.line,
                                v.column,
                                "alias `values` must be a mapping of names to replacements".into(),
                            )),
                        },
                    }
                    if let Some(src) = node.get("src") {
                        read_sources(file, base, root, remote, src, &mut user, diags);
                    }
                }
                _ => diags.push(Diagnostic::new(
                    file,
                    node.line,
                    node.column,
                    "`alias` must be a mapping with `values` and `directive`".into(),
                )),
            }
            alias.values = user.clone();
            model = Some(alias);
        }
        let mut table: BTreeMap<String, String> = BUILTIN_ALIASES
            .iter()
            .chain(IMAGE_ALIASES)
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        // User aliases win over the built-in ones, as in acr-builder.
        table.extend(user.iter().map(|(k, v)| (k.clone(), v.clone())));
        (
            Aliases {
                directive,
                user,
                table,
            },
            model,
        )
    }

    /// Replaces `<directive>name` by its alias; unknown names stay as written; a doubled
    /// directive is a literal one.
    /// Gives up (`None`) as soon as the text would pass `max` bytes: a thousand uses of a
    /// long alias must not be built first and measured after.
    pub(crate) fn apply(&self, text: &str, max: usize) -> Option<String> {
        let d = self.directive;
        if !text.contains(d) {
            return Some(text.to_string());
        }
        let mut out = String::with_capacity(text.len() + 64);
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c != d {
                out.push(c);
                continue;
            }
            if let Some(&(_, next)) = chars.peek() {
                if next == d {
                    out.push(d);
                    chars.next();
                    continue;
                }
            }
            let start = i + c.len_utf8();
            let mut end = start;
            while let Some(&(j, n)) = chars.peek() {
                if n.is_ascii_alphanumeric() {
                    end = j + n.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let name = &text[start..end];
            match self.table.get(name) {
                Some(value) => {
                    if out.len().saturating_add(value.len()) > max {
                        return None;
                    }
                    out.push_str(value)
                }
                None => {
                    out.push(d);
                    out.push_str(name);
                }
            }
        }
        Some(out)
    }
}

/// `alias.src`: YAML files of `name: replacement`, paths (relative to the run's context,
/// as acb reads them relative to where it runs) or `http(s)://` URLs fetched with a 2 s
/// timeout, as acb does. Names in `values` win, then later files over earlier ones.
fn read_sources(
    file: &str,
    base: &Path,
    root: Option<&Path>,
    remote: RemoteAlias,
    src: &Node,
    user: &mut BTreeMap<String, String>,
    diags: &mut Vec<Diagnostic>,
) {
    let items: Vec<&Node> = match &src.raw {
        Raw::Seq(items) => items.iter().collect(),
        Raw::Str(_) => vec![src],
        Raw::Null => Vec::new(),
        _ => {
            diags.push(Diagnostic::new(
                file,
                src.line,
                src.column,
                "alias `src` must be a list of alias files".into(),
            ));
            return;
        }
    };
    for item in items.into_iter().rev() {
        let at = |message: String| Diagnostic::new(file, item.line, item.column, message);
        let Some(name) = item.as_str() else {
            diags.push(at("alias `src` entries must be file paths".into()));
            continue;
        };
        let text = if name.starts_with("http://") || name.starts_with("https://") {
            match fetch(name, remote) {
                Ok(t) => t,
                Err(e) => {
                    diags.push(at(format!("cannot fetch alias file `{name}`: {e}")));
                    continue;
                }
            }
        } else {
            let path = base.join(name);
            if let Some(root) = root {
                let inside = match (std::fs::canonicalize(&path), std::fs::canonicalize(root)) {
                    (Ok(p), Ok(r)) => p.starts_with(r),
                    _ => false,
                };
                if !inside {
                    diags.push(at(format!(
                        "alias file `{name}` must be a file inside the task's context"
                    )));
                    continue;
                }
            }
            let read = std::fs::File::open(&path).and_then(|f| {
                use std::io::Read;
                let mut t = String::new();
                f.take(MAX_ALIAS_FILE).read_to_string(&mut t).map(|_| t)
            });
            match read {
                Ok(t) => t,
                Err(e) => {
                    diags.push(at(format!("cannot read alias file `{name}`: {e}")));
                    continue;
                }
            }
        };
        let entries = match tree::parse(&text) {
            Ok((
                Node {
                    raw: Raw::Map(entries),
                    ..
                },
                _,
            )) => entries,
            Ok((Node { raw: Raw::Null, .. }, _)) => Vec::new(),
            Ok(_) => {
                diags.push(at(format!(
                    "alias file `{name}` must be a mapping of names to replacements"
                )));
                continue;
            }
            Err(e) => {
                diags.push(at(format!(
                    "alias file `{name}`:{}:{}: {}",
                    e.line, e.column, e.message
                )));
                continue;
            }
        };
        for (k, v) in entries {
            if !k.name.chars().all(|c| c.is_ascii_alphanumeric()) || k.name.is_empty() {
                diags.push(at(format!(
                    "alias file `{name}`: alias name `{}` may only contain letters and digits",
                    k.name
                )));
                continue;
            }
            if let Some(text) = scalar_text(&v) {
                user.entry(k.name).or_insert(text);
            }
        }
    }
}

fn scalar_text(n: &Node) -> Option<String> {
    match &n.raw {
        Raw::Str(s) => Some(s.clone()),
        Raw::Int(i) => Some(i.to_string()),
        Raw::UInt(u) => Some(u.to_string()),
        Raw::Float(f) => Some(f.to_string()),
        Raw::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses the alias section text into its node (the value under `alias`).
pub(crate) fn parse_section(text: &str) -> Result<Option<Node>, tree::YamlError> {
    let (root, _) = tree::parse(text)?;
    Ok(root.get("alias").cloned())
}

/// Fetches an alias file over HTTP(S): 2 s, at most [`MAX_ALIAS_FILE`], a 2xx answer; with
/// `PublicOnly`, only from a public address (the one checked is the one connected to).
/// On its own thread with its own runtime, so any caller can wait for it.
fn fetch(url: &str, remote: RemoteAlias) -> Result<String, String> {
    let url = url.to_string();
    std::thread::spawn(move || -> Result<String, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let parsed = reqwest::Url::parse(&url).map_err(|e| e.to_string())?;
            let mut builder = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(2))
                .redirect(reqwest::redirect::Policy::none());
            if remote == RemoteAlias::PublicOnly {
                let host = parsed.host_str().ok_or("no host")?.to_string();
                let port = parsed.port_or_known_default().unwrap_or(443);
                let addrs: Vec<std::net::SocketAddr> =
                    tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
                        .await
                        .map_err(|e| e.to_string())?
                        .collect();
                let public = addrs
                    .into_iter()
                    .find(|a| crate::netaddr::is_public(a.ip()))
                    .ok_or_else(|| format!("{host} is not a public address"))?;
                builder = builder.resolve(&host, public);
            }
            let client = builder.build().map_err(|e| e.to_string())?;
            let resp = client.get(parsed).send().await.map_err(|e| {
                // reqwest's own words name the URL only; the causes say what went wrong.
                let mut msg = String::from("the request failed");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    msg = c.to_string();
                    cause = c.source();
                }
                if e.is_timeout() {
                    msg = "no answer within 2 s".into();
                }
                msg
            })?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            let body = resp.bytes().await.map_err(|e| e.to_string())?;
            if body.len() as u64 > MAX_ALIAS_FILE {
                return Err(format!("larger than {MAX_ALIAS_FILE} bytes"));
            }
            String::from_utf8(body.to_vec()).map_err(|_| "not UTF-8 text".to_string())
        })
    })
    .join()
    .map_err(|_| "the fetch failed".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aliases(yaml: &str) -> (Aliases, Vec<Diagnostic>) {
        let node = parse_section(yaml).unwrap();
        let mut diags = Vec::new();
        let (a, _) = Aliases::from_section(
            "f",
            Path::new("."),
            None,
            RemoteAlias::Any,
            node.as_ref(),
            &mut diags,
        );
        (a, diags)
    }

    #[test]
    fn split_keeps_line_numbers() {
        let text = "version: v1.1.0\nalias:\n  values:\n    x: y\nsteps:\n  - cmd: $x\n";
        let s = split(text);
        assert!(s.has_alias);
        assert_eq!(s.rest.lines().count(), text.lines().count());
        assert_eq!(s.rest, "version: v1.1.0\n\n\n\nsteps:\n  - cmd: $x\n");
        assert_eq!(s.alias_text, "\nalias:\n  values:\n    x: y\n\n\n");
    }

    #[test]
    fn builtins_user_escape_and_unknown() {
        let (a, d) = aliases("alias:\n  values:\n    repo: myrepo\n    ID: mine\n");
        assert!(d.is_empty());
        assert_eq!(
            a.apply("$Registry/$repo:$ID", usize::MAX).unwrap(),
            "{{.Run.Registry}}/myrepo:mine"
        );
        assert_eq!(
            a.apply("echo $$HOME $HOME $", usize::MAX).unwrap(),
            "echo $HOME $HOME $"
        );
        assert_eq!(
            a.apply("$repo$repo-x", usize::MAX).unwrap(),
            "myrepomyrepo-x"
        );
    }

    #[test]
    fn custom_directive() {
        let (a, d) = aliases("alias:\n  directive: '#'\n  values:\n    img: busybox\n");
        assert!(d.is_empty());
        assert_eq!(
            a.apply("#img $img ##", usize::MAX).unwrap(),
            "busybox $img #"
        );
    }

    #[test]
    fn bad_directive_and_names() {
        let (_, d) = aliases("alias:\n  directive: ab\n  values:\n    a-b: x\n");
        let msgs: Vec<_> = d.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "f:2:14: alias directive `ab` must be a single character",
                "f:4:5: alias name `a-b` may only contain letters and digits"
            ]
        );
    }
}
