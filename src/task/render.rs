//! Go text/template rendering over `.Run` and `.Values`, with the sprig functions task
//! files commonly use. A missing value is an error (not `<no value>`), pointed at the line
//! and column of its first use.

use std::collections::BTreeMap;
use std::sync::Arc;

use gotmpl::{MissingKey, Template, TemplateError, Value};

use super::{Diagnostic, RunInfo, Values};

/// Renders `text` (already alias-expanded). `original` is the file as written, used to
/// point execution errors at a place.
/// With `empty_missing`, a missing value renders as nothing, as ACR does (Go's
/// `missingkey=zero` with `<no value>` removed); otherwise it is an error.
pub(crate) fn render(
    file: &str,
    text: &str,
    original: &str,
    run: &RunInfo,
    values: &Values,
    empty_missing: bool,
) -> Result<String, Diagnostic> {
    if !text.contains("{{") {
        return Ok(text.to_string());
    }
    let protected = protect_secrets(text);
    let text = protected.as_str();
    let data = data(run, values);
    let missing = if empty_missing {
        MissingKey::ZeroValue
    } else {
        MissingKey::Error
    };
    let out = match render_simple(file, text, &data, missing) {
        Some(out) => out,
        None => {
            let tmpl = with_funcs(Template::new(file))
                .missing_key(missing)
                .parse(text)
                .map_err(|e| template_error(file, text, original, &e))?;
            tmpl.execute_to_string(&data)
                .map_err(|e| template_error(file, text, original, &e))?
        }
    };
    if empty_missing {
        return Ok(out.replace(NO_VALUE, ""));
    }
    Ok(out)
}

/// What the engine prints for a missing value under `missingkey=zero`.
const NO_VALUE: &str = "<no value>";

/// Fast path for the common case where every action is a lone expression such as
/// `{{.Run.ID}}` or `{{ .Values.tag | upper }}`: each distinct action is rendered once and
/// pasted in. `None` (use the full engine) on any control structure, variable, comment,
/// whitespace trimming, multi-line action, or error.
fn render_simple(file: &str, text: &str, data: &Value, missing: MissingKey) -> Option<String> {
    const CONTROL: &[&str] = &[
        "if", "else", "end", "range", "with", "define", "block", "template", "break", "continue",
    ];
    let mut cache: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        let inner = &after[..close];
        let first = inner.split_whitespace().next().unwrap_or("");
        if inner.contains(['\n', '$', '{'])
            || inner.contains(":=")
            || inner.starts_with(['-', '/'])
            || inner.ends_with('-')
            || CONTROL.contains(&first)
        {
            return None;
        }
        if let Some(done) = cache.get(inner) {
            out.push_str(done);
        } else {
            let t = with_funcs(Template::new(file))
                .missing_key(missing)
                .parse(&format!("{{{{{inner}}}}}"))
                .ok()?;
            let v = t.execute_to_string(data).ok()?;
            out.push_str(&v);
            cache.insert(inner, v);
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Some(out)
}

/// `{{.Secrets.id}}` is resolved when the step runs (as in ACR), not when the file is
/// loaded: such actions are rewritten to print themselves.
fn protect_secrets(text: &str) -> String {
    if !text.contains(".Secrets.") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            return out;
        };
        let inner = after[..close].trim_matches(|c: char| c == '-' || c.is_whitespace());
        let is_secret = inner.strip_prefix(".Secrets.").is_some_and(|id| {
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        });
        if is_secret {
            out.push_str(&format!("{{{{\"{{{{{inner}}}}}\"}}}}"));
        } else {
            out.push_str(&rest[open..open + 2 + close + 2]);
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Ids used as `{{.Secrets.id}}` in a rendered string.
pub(crate) fn secret_refs(text: &str) -> Vec<&str> {
    let mut ids = Vec::new();
    let mut rest = text;
    while let Some(p) = rest.find("{{.Secrets.") {
        let after = &rest[p + "{{.Secrets.".len()..];
        let end = after.find("}}").unwrap_or(after.len());
        ids.push(&after[..end]);
        rest = &after[end..];
    }
    ids
}

/// The template data, shaped as acr-builder's: `.Run`, `.Build.ID`, `.Values`, and the
/// shell-quoted `.RunJSON` / `.ValuesJSON`. Run fields acr-task has no source for
/// (`Repository`, `GitTag`, `TriggeredBy`, `OSVersion`) are empty rather than missing.
fn data(run: &RunInfo, values: &Values) -> Value {
    let pairs: [(&str, &str); 14] = [
        ("ID", &run.id),
        ("Commit", &run.commit),
        ("Repository", ""),
        ("Branch", &run.branch),
        ("GitTag", ""),
        ("TriggeredBy", ""),
        ("Registry", &run.registry),
        ("RegistryName", &run.registry_name),
        ("Date", &run.date),
        ("SharedVolume", &run.shared_volume),
        ("OS", &run.os),
        ("OSVersion", ""),
        ("Architecture", &run.architecture),
        ("TaskName", &run.task_name),
    ];
    let s = |v: &str| Value::String(Arc::from(v));
    let r: BTreeMap<Arc<str>, Value> = pairs.iter().map(|(k, v)| (Arc::from(*k), s(v))).collect();
    let run_json: serde_json::Map<String, serde_json::Value> = pairs
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_string(),
                serde_json::Value::String((*v).to_string()),
            )
        })
        .collect();
    let values_json: serde_json::Map<String, serde_json::Value> = values
        .0
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let v: BTreeMap<Arc<str>, Value> = values
        .0
        .iter()
        .map(|(k, v)| (Arc::from(k.as_str()), json_to_value(v)))
        .collect();
    let mut top: BTreeMap<Arc<str>, Value> = BTreeMap::new();
    top.insert("Run".into(), Value::Map(Arc::new(r)));
    top.insert(
        "Build".into(),
        Value::Map(Arc::new(BTreeMap::from([(Arc::from("ID"), s(&run.id))]))),
    );
    top.insert("Values".into(), Value::Map(Arc::new(v)));
    top.insert(
        "RunJSON".into(),
        s(&shell_quote(
            &serde_json::Value::Object(run_json).to_string(),
        )),
    );
    top.insert(
        "ValuesJSON".into(),
        s(&shell_quote(
            &serde_json::Value::Object(values_json).to_string(),
        )),
    );
    Value::Map(Arc::new(top))
}

/// Single-quotes `s` for a shell when it holds anything beyond `[A-Za-z0-9_^@=+%,:./-]`.
fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    let plain = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_^@=+%,:./-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\"'\"'"))
    }
}

fn json_to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::Uint(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(0.0))
            }
        }
        J::String(s) => Value::String(Arc::from(s.as_str())),
        J::Array(a) => Value::List(a.iter().map(json_to_value).collect()),
        J::Object(o) => Value::Map(Arc::new(
            o.iter()
                .map(|(k, v)| (Arc::from(k.as_str()), json_to_value(v)))
                .collect(),
        )),
    }
}

fn template_error(file: &str, text: &str, original: &str, e: &TemplateError) -> Diagnostic {
    match e {
        TemplateError::Parse {
            line, col, message, ..
        }
        | TemplateError::Lex {
            line, col, message, ..
        } => {
            // An unclosed action is reported at the end of the text; point at its `{{`.
            let (line, col) = if message.contains("unclosed") {
                unclosed(text).unwrap_or((*line, *col))
            } else {
                (*line, *col)
            };
            // Alias expansion keeps lines; map the column back to the line as written.
            let column = map_column(text, original, line, col);
            Diagnostic::new(file, line, column, format!("template: {message}"))
        }
        TemplateError::MissingKey { key } => {
            let (line, column) = find_use(original, key).unwrap_or((0, 0));
            Diagnostic::new(
                file,
                line,
                column,
                format!("template: no value for `{key}` (give it in a values file or with --set {key}=...)"),
            )
        }
        other => {
            let msg = other.to_string();
            let (line, column) = first_action(original, &msg).unwrap_or((0, 0));
            Diagnostic::new(file, line, column, format!("template: {msg}"))
        }
    }
}

/// The column in `original` for a position in the alias-expanded `text` on the same line:
/// the same column when the lines agree up to it, else the start of the first action.
fn map_column(text: &str, original: &str, line: usize, col: usize) -> usize {
    let (Some(t), Some(o)) = (
        text.lines().nth(line.saturating_sub(1)),
        original.lines().nth(line.saturating_sub(1)),
    ) else {
        return col;
    };
    let prefix: String = t.chars().take(col.saturating_sub(1)).collect();
    if o.starts_with(&prefix) {
        return col;
    }
    o.find("{{").map_or(col, |b| o[..b].chars().count() + 1)
}

/// The last `{{` with no `}}` after it.
fn unclosed(text: &str) -> Option<(usize, usize)> {
    let open = text.rfind("{{")?;
    if text[open..].contains("}}") {
        return None;
    }
    let line = text[..open].matches('\n').count() + 1;
    let start = text[..open].rfind('\n').map_or(0, |p| p + 1);
    Some((line, text[start..open].chars().count() + 1))
}

/// Line and column of the first `{{ ... }}` action in `src` that mentions `.key`.
fn find_use(src: &str, key: &str) -> Option<(usize, usize)> {
    let needle = format!(".{key}");
    for (i, line) in src.lines().enumerate() {
        let mut from = 0;
        while let Some(open) = line[from..].find("{{").map(|p| p + from) {
            let close = line[open..].find("}}").map_or(line.len(), |p| p + open);
            let action = &line[open..close];
            if let Some(p) = action.find(&needle) {
                let end = p + needle.len();
                let boundary = action[end..]
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
                if boundary {
                    // Point at the start of the whole field chain, e.g. `.Values.x`.
                    let chain = action[..p]
                        .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                        .map_or(0, |b| b + 1);
                    return Some((i + 1, line[..open + chain].chars().count() + 1));
                }
            }
            from = close.max(open + 2).min(line.len());
        }
    }
    None
}

/// The first action whose text shares a word with the error message, else the first action.
fn first_action(src: &str, msg: &str) -> Option<(usize, usize)> {
    let mut first = None;
    for (i, line) in src.lines().enumerate() {
        if let Some(open) = line.find("{{") {
            let pos = (i + 1, line[..open].chars().count() + 1);
            first.get_or_insert(pos);
            let close = line[open..].find("}}").map_or(line.len(), |p| p + open);
            let action = &line[open + 2..close];
            let words = action
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| w.len() > 2);
            if words.into_iter().any(|w| msg.contains(w)) {
                return Some(pos);
            }
        }
    }
    first
}

type Func = fn(&[Value]) -> gotmpl::Result<Value>;

fn with_funcs(t: Template) -> Template {
    let funcs: &[(&str, Func)] = &[
        ("default", f_default),
        ("required", f_required),
        ("empty", |a| Ok(Value::Bool(!a.first().is_some_and(truthy)))),
        ("coalesce", |a| {
            Ok(a.iter().find(|v| truthy(v)).cloned().unwrap_or(Value::Nil))
        }),
        ("ternary", |a| match a {
            [x, y, c] => Ok(if truthy(c) { x.clone() } else { y.clone() }),
            _ => Err(arity("ternary", 3)),
        }),
        ("upper", |a| str1(a, "upper", |s| s.to_uppercase())),
        ("lower", |a| str1(a, "lower", |s| s.to_lowercase())),
        ("trim", |a| str1(a, "trim", |s| s.trim().to_string())),
        ("title", |a| str1(a, "title", title)),
        ("quote", |a| {
            Ok(sval(
                a.iter()
                    .map(|v| format!("{:?}", text(v)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ))
        }),
        ("squote", |a| {
            Ok(sval(
                a.iter()
                    .map(|v| format!("'{}'", text(v)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ))
        }),
        ("toString", |a| str1(a, "toString", |s| s.to_string())),
        ("trimPrefix", |a| {
            str2(a, "trimPrefix", |p, s| {
                s.strip_prefix(p).unwrap_or(s).to_string()
            })
        }),
        ("trimSuffix", |a| {
            str2(a, "trimSuffix", |p, s| {
                s.strip_suffix(p).unwrap_or(s).to_string()
            })
        }),
        ("contains", |a| {
            two(a, "contains").map(|(x, s)| Value::Bool(s.contains(x.as_str())))
        }),
        ("hasPrefix", |a| {
            two(a, "hasPrefix").map(|(x, s)| Value::Bool(s.starts_with(x.as_str())))
        }),
        ("hasSuffix", |a| {
            two(a, "hasSuffix").map(|(x, s)| Value::Bool(s.ends_with(x.as_str())))
        }),
        ("replace", |a| match a {
            [old, new, s] => Ok(sval(text(s).replace(&text(old), &text(new)))),
            _ => Err(arity("replace", 3)),
        }),
        ("repeat", |a| match a {
            [n, s] => {
                let n = n.as_int().unwrap_or(0).clamp(0, 10_000) as usize;
                Ok(sval(text(s).repeat(n)))
            }
            _ => Err(arity("repeat", 2)),
        }),
        ("trunc", |a| match a {
            [n, s] => {
                let n = n.as_int().unwrap_or(0).max(0) as usize;
                Ok(sval(text(s).chars().take(n).collect()))
            }
            _ => Err(arity("trunc", 2)),
        }),
        ("join", |a| match a {
            [sep, Value::List(items)] => Ok(sval(
                items.iter().map(text).collect::<Vec<_>>().join(&text(sep)),
            )),
            [_, other] => Ok(sval(text(other))),
            _ => Err(arity("join", 2)),
        }),
        ("splitList", |a| {
            two(a, "splitList").map(|(sep, s)| {
                Value::List(s.split(sep.as_str()).map(|p| sval(p.to_string())).collect())
            })
        }),
        ("list", |a| Ok(Value::List(a.iter().cloned().collect()))),
        ("b64enc", |a| str1(a, "b64enc", |s| b64enc(s.as_bytes()))),
        ("b64dec", |a| match a {
            [s] => b64dec(&text(s))
                .map(sval)
                .ok_or_else(|| TemplateError::Exec("b64dec: not valid base64 text".into())),
            _ => Err(arity("b64dec", 1)),
        }),
        ("sha256sum", |a| {
            str1(a, "sha256sum", |s| {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(s.as_bytes()))
            })
        }),
        ("nospace", |a| {
            str1(a, "nospace", |s| {
                s.chars().filter(|c| !c.is_whitespace()).collect()
            })
        }),
        ("trimAll", |a| {
            str2(a, "trimAll", |cut, s| {
                s.trim_matches(|c| cut.contains(c)).to_string()
            })
        }),
        ("indent", |a| match a {
            [n, s] => Ok(sval(indent(n, s))),
            _ => Err(arity("indent", 2)),
        }),
        ("nindent", |a| match a {
            [n, s] => Ok(sval(format!("\n{}", indent(n, s)))),
            _ => Err(arity("nindent", 2)),
        }),
        ("cat", |a| {
            Ok(sval(
                a.iter()
                    .filter(|v| !matches!(v, Value::Nil))
                    .map(text)
                    .collect::<Vec<_>>()
                    .join(" "),
            ))
        }),
        ("toJson", |a| match a {
            [v] => Ok(sval(value_to_json(v).to_string())),
            _ => Err(arity("toJson", 1)),
        }),
        ("int", |a| match a {
            [v] => Ok(Value::Int(to_int(v))),
            _ => Err(arity("int", 1)),
        }),
        ("atoi", |a| match a {
            [v] => Ok(Value::Int(to_int(v))),
            _ => Err(arity("atoi", 1)),
        }),
        ("add", |a| {
            Ok(Value::Int(
                a.iter().map(to_int).fold(0i64, i64::wrapping_add),
            ))
        }),
        ("mul", |a| {
            Ok(Value::Int(
                a.iter().map(to_int).fold(1i64, i64::wrapping_mul),
            ))
        }),
        ("sub", |a| match a {
            [x, y] => Ok(Value::Int(to_int(x).wrapping_sub(to_int(y)))),
            _ => Err(arity("sub", 2)),
        }),
        ("div", |a| match a {
            [x, y] => to_int(x)
                .checked_div(to_int(y))
                .map(Value::Int)
                .ok_or_else(|| TemplateError::Exec("div: division by zero".into())),
            _ => Err(arity("div", 2)),
        }),
        ("mod", |a| match a {
            [x, y] => to_int(x)
                .checked_rem(to_int(y))
                .map(Value::Int)
                .ok_or_else(|| TemplateError::Exec("mod: division by zero".into())),
            _ => Err(arity("mod", 2)),
        }),
        ("first", |a| match a {
            [Value::List(l)] => Ok(l.first().cloned().unwrap_or(Value::Nil)),
            [_] => Ok(Value::Nil),
            _ => Err(arity("first", 1)),
        }),
        ("last", |a| match a {
            [Value::List(l)] => Ok(l.last().cloned().unwrap_or(Value::Nil)),
            [_] => Ok(Value::Nil),
            _ => Err(arity("last", 1)),
        }),
        ("hasKey", |a| match a {
            [Value::Map(m), k] => Ok(Value::Bool(m.contains_key(text(k).as_str()))),
            [_, _] => Ok(Value::Bool(false)),
            _ => Err(arity("hasKey", 2)),
        }),
        ("substr", |a| match a {
            [start, end, s] => {
                let chars: Vec<char> = text(s).chars().collect();
                let len = chars.len() as i64;
                let b = to_int(start).clamp(0, len) as usize;
                let e = if to_int(end) < 0 {
                    len
                } else {
                    to_int(end).clamp(0, len)
                } as usize;
                Ok(sval(chars[b..e.max(b)].iter().collect()))
            }
            _ => Err(arity("substr", 3)),
        }),
    ];
    funcs.iter().fold(t, |t, (name, f)| t.func(name, *f))
}

fn truthy(v: &Value) -> bool {
    v.is_truthy()
}

fn sval(s: String) -> Value {
    Value::String(Arc::from(s))
}

fn text(v: &Value) -> String {
    match v {
        Value::Nil => String::new(),
        other => other.to_string(),
    }
}

fn arity(name: &str, n: usize) -> TemplateError {
    TemplateError::Exec(format!("{name} takes {n} arguments"))
}

fn str1(a: &[Value], name: &str, f: impl Fn(&str) -> String) -> gotmpl::Result<Value> {
    match a {
        [s] => Ok(sval(f(&text(s)))),
        _ => Err(arity(name, 1)),
    }
}

fn str2(a: &[Value], name: &str, f: impl Fn(&str, &str) -> String) -> gotmpl::Result<Value> {
    two(a, name).map(|(x, s)| sval(f(&x, &s)))
}

fn two(a: &[Value], name: &str) -> gotmpl::Result<(String, String)> {
    match a {
        [x, s] => Ok((text(x), text(s))),
        _ => Err(arity(name, 2)),
    }
}

fn f_default(a: &[Value]) -> gotmpl::Result<Value> {
    match a {
        [d] => Ok(d.clone()),
        [d, v] => Ok(if truthy(v) { v.clone() } else { d.clone() }),
        _ => Err(arity("default", 2)),
    }
}

fn f_required(a: &[Value]) -> gotmpl::Result<Value> {
    match a {
        [msg, v] if !truthy(v) => Err(TemplateError::Exec(text(msg))),
        [_, v] => Ok(v.clone()),
        _ => Err(arity("required", 2)),
    }
}

fn to_int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Uint(u) => i64::try_from(*u).unwrap_or(i64::MAX),
        Value::Float(f) => *f as i64,
        Value::Bool(b) => i64::from(*b),
        Value::String(s) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

fn indent(n: &Value, s: &Value) -> String {
    let pad = " ".repeat(to_int(n).clamp(0, 1000) as usize);
    text(s)
        .split('\n')
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn value_to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Nil => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Uint(u) => J::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::String(s) => J::String(s.to_string()),
        Value::List(l) => J::Array(l.iter().map(value_to_json).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| (k.to_string(), value_to_json(v)))
                .collect(),
        ),
        other => J::String(other.to_string()),
    }
}

fn b64dec(s: &str) -> Option<String> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).ok()
}

fn title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut start = true;
    for c in s.chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        start = c.is_whitespace();
    }
    out
}

fn b64enc(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunInfo {
        RunInfo {
            id: "ca1".into(),
            registry: "127.0.0.1:5000".into(),
            ..Default::default()
        }
    }

    #[test]
    fn renders_run_values_and_funcs() {
        let mut v = Values::default();
        v.set("tag=v2").unwrap();
        let out = render(
            "f",
            "{{.Run.Registry}}/app:{{.Values.tag | upper}}-{{.Run.ID}} {{ .Values.none | default \"x\" | quote }}",
            "",
            &run(),
            &{
                let mut v2 = v.clone();
                v2.0.insert("none".into(), serde_json::Value::Null);
                v2
            },
            false,
        )
        .unwrap();
        assert_eq!(out, "127.0.0.1:5000/app:V2-ca1 \"x\"");
        assert_eq!(b64enc(b"hello"), "aGVsbG8=");
        assert_eq!(b64dec("aGVsbG8=").as_deref(), Some("hello"));
    }

    #[test]
    fn missing_values_can_render_empty_as_in_acr() {
        let src = "a: {{ .Values.nope }}|{{ .Values.nope | default \"d\" }}|{{ if .Values.nope }}x{{ end }}";
        let out = render("f", src, src, &run(), &Values::default(), true).unwrap();
        assert_eq!(out, "a: |d|");
        assert!(render("f", src, src, &run(), &Values::default(), false).is_err());
    }

    #[test]
    fn sprig_subset() {
        let mut v = Values::default();
        v.set("n=7").unwrap();
        v.set("m.k=x").unwrap();
        let out = render(
            "f",
            "{{ add 1 2 .Values.n }} {{ sub 10 3 }} {{ div 9 2 }} {{ mod 9 2 }} {{ mul 2 3 }} {{ \"hi\" | sha256sum | trunc 8 }} {{ \"aGk=\" | b64dec }} {{ hasKey .Values.m \"k\" }} {{ \"a b\" | nospace }} {{ substr 1 3 \"abcd\" }} {{ .Values.m | toJson }} {{ list 1 2 | first }}{{ list 1 2 | last }} {{ trimAll \"-\" \"--x--\" }} {{ cat \"a\" \"b\" }}",
            "",
            &run(),
            &v,
            false,
        )
        .unwrap();
        assert_eq!(
            out,
            "10 7 4 1 6 8f434346 hi true ab bc {\"k\":\"x\"} 12 x a b"
        );
        let e = render(
            "f",
            "{{ div 1 0 }}",
            "{{ div 1 0 }}",
            &run(),
            &Values::default(),
            false,
        )
        .unwrap_err();
        assert!(e.message.contains("division by zero"), "{e}");
    }

    #[test]
    fn acr_data_shape() {
        let mut v = Values::default();
        v.set("a=it's").unwrap();
        let out = render(
            "f",
            "{{.Build.ID}} {{.Run.GitTag}}|{{.ValuesJSON}} {{.RunJSON | len}}",
            "",
            &run(),
            &v,
            false,
        )
        .unwrap();
        assert!(out.starts_with("ca1 |'{\"a\":\"it'\"'\"'s\"}' "), "{out}");
        assert_eq!(shell_quote("plain:1.0"), "plain:1.0");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn secrets_are_left_for_run_time() {
        let out = render(
            "f",
            "env: [\"P={{ .Secrets.pass }}\", \"U={{.Secrets.user}}\"] {{.Run.ID}}",
            "",
            &run(),
            &Values::default(),
            false,
        )
        .unwrap();
        assert_eq!(
            out,
            "env: [\"P={{.Secrets.pass}}\", \"U={{.Secrets.user}}\"] ca1"
        );
        assert_eq!(secret_refs(&out), vec!["pass", "user"]);
    }

    #[test]
    fn missing_value_points_at_use() {
        let src = "steps:\n  - cmd: busybox echo {{ .Values.greeting }}\n";
        let e = render("f", src, src, &run(), &Values::default(), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "f:2:26: template: no value for `greeting` (give it in a values file or with --set greeting=...)"
        );
    }

    #[test]
    fn parse_error_has_position() {
        let src = "steps:\n  - cmd: busybox echo {{ .Values.x \n";
        let e = render("f", src, src, &run(), &Values::default(), false).unwrap_err();
        assert_eq!((e.line, e.column), (2, 23), "{e}");
        assert!(e.message.starts_with("template: "), "{e}");
    }
}
