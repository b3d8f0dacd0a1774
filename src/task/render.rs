//! Go text/template rendering over `.Run` and `.Values`, with the sprig functions task
//! files commonly use. A missing value is an error (not `<no value>`), pointed at the line
//! and column of its first use.

use std::collections::BTreeMap;
use std::sync::Arc;

use gotmpl::{MissingKey, Template, TemplateError, Value};

use super::budget::{self, RenderBudget};
use super::funcs::with_funcs;

use super::{Diagnostic, RunInfo, Values};

/// Renders `text` (already alias-expanded). `original` is the file as written, used to
/// point execution errors at a place.
/// With `empty_missing`, a missing value renders as nothing, as ACR does (Go's
/// `missingkey=zero` with `<no value>` removed); otherwise it is an error.
/// Within `budget`: exceeding it is an error naming the budget, at the first loop (or
/// action) of the file.
pub(crate) fn render(
    file: &str,
    text: &str,
    original: &str,
    run: &RunInfo,
    values: &Values,
    empty_missing: bool,
    budget: RenderBudget,
) -> Result<String, Diagnostic> {
    if !text.contains("{{") {
        return Ok(text.to_string());
    }
    let (out, exceeded) = budget::within(budget, || {
        render_unbounded(file, text, original, run, values, empty_missing)
    });
    match (out, exceeded) {
        (Ok(o), None) if o.len() <= budget.max_output => Ok(o),
        (Ok(_), None) => Err(over_budget(
            file,
            original,
            format!(
                "the templates make a text of more than {} bytes (the render budget)",
                budget.max_output
            ),
        )),
        (_, Some(why)) => Err(over_budget(file, original, why)),
        (Err(d), None) => Err(d),
    }
}

/// A budget error, at the first `range` of the file (the usual culprit), else its first
/// action.
fn over_budget(file: &str, original: &str, why: String) -> Diagnostic {
    let at = |needle: &str| {
        original
            .lines()
            .enumerate()
            .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, l[..c].chars().count() + 1)))
    };
    let (line, column) = ["{{range", "{{- range", "{{ range", "{{"]
        .iter()
        .find_map(|n| at(n))
        .unwrap_or((0, 0));
    Diagnostic::new(file, line, column, format!("template: {why}"))
}

fn render_unbounded(
    file: &str,
    text: &str,
    original: &str,
    run: &RunInfo,
    values: &Values,
    empty_missing: bool,
) -> Result<String, Diagnostic> {
    let protected = protect_secrets(text);
    let text = protected.as_str();
    let data = data(run, values);
    let render_with = |missing: MissingKey| -> Result<String, Diagnostic> {
        match render_simple(file, text, &data, missing) {
            Some(out) => Ok(out),
            None => {
                let tmpl = with_funcs(Template::new(file))
                    .missing_key(missing)
                    .parse(text)
                    .map_err(|e| template_error(file, text, original, &e))?;
                let mut out = budget::Bounded::default();
                tmpl.execute_fmt(&mut out, &data)
                    .map_err(|e| template_error(file, text, original, &e))?;
                Ok(out.out)
            }
        }
    };
    // ACR renders with missingkey=zero, so `{{.Values.x | default "y"}}` works; a missing
    // value is an error only when it would be printed. Then a strict render names the key
    // and its place.
    let out = render_with(MissingKey::ZeroValue)?;
    if empty_missing {
        return Ok(out.replace(NO_VALUE, ""));
    }
    if !out.contains(NO_VALUE) {
        return Ok(out);
    }
    render_with(MissingKey::Error)
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
            let mut v = budget::Bounded::default();
            t.execute_fmt(&mut v, data).ok()?;
            out.push_str(&v.out);
            cache.insert(inner, v.out);
        }
        // A file of many cheap actions still has an output budget.
        budget::room_for(out.len()).ok()?;
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
        TemplateError::RangeIterLimit => over_budget(
            file,
            original,
            format!(
                "the templates' loops run more than {} times in all (the render budget)",
                budget::range_iters()
            ),
        ),
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

#[cfg(test)]
mod tests {
    use super::super::funcs::{b64dec, b64enc};
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
            false, RenderBudget::default(),
        )
        .unwrap();
        assert_eq!(out, "127.0.0.1:5000/app:V2-ca1 \"x\"");
        assert_eq!(b64enc(b"hello"), "aGVsbG8=");
        assert_eq!(b64dec("aGVsbG8=").as_deref(), Some("hello"));
    }

    #[test]
    fn missing_values_can_render_empty_as_in_acr() {
        let src = "a: {{ .Values.nope }}|{{ .Values.nope | default \"d\" }}|{{ if .Values.nope }}x{{ end }}";
        let out = render(
            "f",
            src,
            src,
            &run(),
            &Values::default(),
            true,
            RenderBudget::default(),
        )
        .unwrap();
        assert_eq!(out, "a: |d|");
        assert!(render(
            "f",
            src,
            src,
            &run(),
            &Values::default(),
            false,
            RenderBudget::default()
        )
        .is_err());
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
            false, RenderBudget::default(),
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
            RenderBudget::default(),
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
            RenderBudget::default(),
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
            RenderBudget::default(),
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
        let e = render(
            "f",
            src,
            src,
            &run(),
            &Values::default(),
            false,
            RenderBudget::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f:2:26: template: no value for `greeting` (give it in a values file or with --set greeting=...)"
        );
    }

    #[test]
    fn parse_error_has_position() {
        let src = "steps:\n  - cmd: busybox echo {{ .Values.x \n";
        let e = render(
            "f",
            src,
            src,
            &run(),
            &Values::default(),
            false,
            RenderBudget::default(),
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (2, 23), "{e}");
        assert!(e.message.starts_with("template: "), "{e}");
    }
}
