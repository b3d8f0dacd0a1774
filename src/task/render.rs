//! Go text/template rendering over `.Run`, `.Values` and `.Secrets`, with the sprig
//! functions task files commonly use, as ACR renders: `missingkey=zero`, and every
//! `<no value>` removed from the output, so a missing value renders empty (with a
//! warning naming it and its first use); a missing intermediate key (`.Values.a.b` with
//! no `a`) is an error.

use std::collections::BTreeMap;
use std::sync::Arc;

use gotmpl::{MissingKey, Template, TemplateError, Value};

use super::budget::{self, RenderBudget};
use super::funcs::with_funcs;

use super::{Diagnostic, RunInfo, Values};

/// What to render with.
pub(crate) struct Data<'a> {
    pub run: &'a RunInfo,
    pub values: &'a Values,
    pub secrets: &'a BTreeMap<String, String>,
}

/// Renders `text` (already alias-expanded) with its warnings (values that rendered
/// empty). `original` is the text as written (same lines), used to point errors at a
/// place. Within `budget`: exceeding it is an error naming the budget, at the first loop
/// (or action) of the file.
pub(crate) fn render(
    file: &str,
    text: &str,
    original: &str,
    d: &Data<'_>,
    budget: RenderBudget,
) -> Result<(String, Vec<Diagnostic>), Diagnostic> {
    if !text.contains("{{") {
        // `<no value>` goes even from text with no template in it, as in ACR.
        return Ok((text.replace(NO_VALUE, ""), Vec::new()));
    }
    let (out, exceeded) = budget::within(budget, || render_unbounded(file, text, original, d));
    match (out, exceeded) {
        (Ok(o), None) if o.0.len() <= budget.max_output => Ok(o),
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
    d: &Data<'_>,
) -> Result<(String, Vec<Diagnostic>), Diagnostic> {
    let data = data(d.run, d.values, d.secrets);
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
    // ACR renders with missingkey=zero, so `{{.Values.x | default "y"}}` works, and removes
    // every `<no value>`. When one was printed, a strict render names the first missing
    // key for the warning.
    let out = render_with(MissingKey::ZeroValue)?;
    if !out.contains(NO_VALUE) {
        return Ok((out, Vec::new()));
    }
    let mut warnings = Vec::new();
    if let Err(mut w) = render_with(MissingKey::Error) {
        if let Some(key) = w.message.strip_prefix(MISSING) {
            let key = key.to_string();
            // The engine names the last key only; the use it was found at says more.
            let chain = original
                .lines()
                .nth(w.line.saturating_sub(1))
                .map(|l| {
                    l.chars()
                        .skip(w.column.saturating_sub(1))
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                        .collect::<String>()
                })
                .unwrap_or_default();
            // A missing key in the middle of a path (`.Values.a.b` without `a`) is an error in
            // ACR (Go's "nil pointer evaluating interface {}.b").
            let last = chain.rsplit('.').next().unwrap_or("");
            if !chain.is_empty() && last != key {
                let parent = chain
                    .find(&format!(".{key}."))
                    .map_or(chain.as_str(), |p| &chain[..p]);
                w.message = format!(
                    "template: `{parent}` has no `{key}`, so `{chain}` cannot be read (give `{key}` \
                     in a values file, or use `index`/`default`)"
                );
                w.severity = super::Severity::Error;
                return Err(w);
            }
            w.message = if chain.starts_with(".Secrets.") {
                let id = &key;
                format!(
                    "secret `{id}` has no value and is not declared under `secrets`; it renders \
                     empty, as in ACR (declare it, or give it with --secret {id}=VALUE)"
                )
            } else {
                let shown = if chain.is_empty() {
                    format!(".{key}")
                } else {
                    chain
                };
                format!(
                    "no value for `{shown}`; it renders empty, as in ACR (give it in a values \
                     file or with --set {key}=...)"
                )
            };
            w.severity = super::Severity::Warning;
            warnings.push(w);
        }
    }
    Ok((out.replace(NO_VALUE, ""), warnings))
}

/// How `template_error` words a missing key (for the warning to find it).
const MISSING: &str = "template: missing ";

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

/// The template data, shaped as acr-builder's: `.Run`, `.Build.ID`, `.Values`, and the
/// shell-quoted `.RunJSON` / `.ValuesJSON`. Run fields acr-task has no source for
/// (`Repository`, `GitTag`, `TriggeredBy`, `OSVersion`) are empty rather than missing.
fn data(run: &RunInfo, values: &Values, secrets: &BTreeMap<String, String>) -> Value {
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
        "Secrets".into(),
        Value::Map(Arc::new(
            secrets
                .iter()
                .map(|(k, v)| (Arc::from(k.as_str()), s(v)))
                .collect(),
        )),
    );
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
            Diagnostic::new(file, line, column, format!("{MISSING}{key}"))
        }
        // `fail`, `required` and our functions say what is wrong in the user's words.
        TemplateError::Exec(why) => {
            let (line, column) = first_action(original, why).unwrap_or((0, 0));
            Diagnostic::new(file, line, column, format!("template: {why}"))
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

    /// Renders `text` (written as `original`) with these values and secrets.
    fn rend(
        text: &str,
        original: &str,
        values: &Values,
        secrets: &[(&str, &str)],
    ) -> Result<(String, Vec<Diagnostic>), Diagnostic> {
        let secrets: BTreeMap<String, String> = secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let run = run();
        let d = Data {
            run: &run,
            values,
            secrets: &secrets,
        };
        render("f", text, original, &d, RenderBudget::default())
    }

    #[test]
    fn renders_run_values_and_funcs() {
        let mut v = Values::default();
        v.set("tag=v2").unwrap();
        v.0.insert("none".into(), serde_json::Value::Null);
        let (out, warnings) = rend(
            "{{.Run.Registry}}/app:{{.Values.tag | upper}}-{{.Run.ID}} {{ .Values.none | default \"x\" | quote }}",
            "",
            &v,
            &[],
        )
        .unwrap();
        assert_eq!(out, "127.0.0.1:5000/app:V2-ca1 \"x\"");
        assert!(warnings.is_empty());
        assert_eq!(b64enc(b"hello"), "aGVsbG8=");
        assert_eq!(b64dec("aGVsbG8=").as_deref(), Some("hello"));
    }

    #[test]
    fn missing_values_render_empty_as_in_acr_with_a_warning() {
        let src = "a: {{ .Values.nope }}|{{ .Values.nope | default \"d\" }}|{{ if .Values.nope }}x{{ end }}|<no value>";
        let (out, warnings) = rend(src, src, &Values::default(), &[]).unwrap();
        assert_eq!(out, "a: |d||");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].is_warning());
        assert!(
            warnings[0].message.contains("no value for `.Values.nope`"),
            "{}",
            warnings[0]
        );
        assert_eq!((warnings[0].line, warnings[0].column), (1, 7));
        // `default` and `if` are fine with a missing value: no warning.
        let src = "{{ .Values.nope | default \"d\" }}";
        assert!(rend(src, src, &Values::default(), &[])
            .unwrap()
            .1
            .is_empty());
        // A missing key in the middle of a path is an error, as in ACR.
        let src = "{{ .Values.a.b }}";
        assert!(rend(src, src, &Values::default(), &[]).is_err());
    }

    #[test]
    fn sprig_subset() {
        let mut v = Values::default();
        v.set("n=7").unwrap();
        v.0.insert("m".into(), serde_json::json!({"k": "x"}));
        let (out, _) = rend(
            "{{ add 1 2 .Values.n }} {{ sub 10 3 }} {{ div 9 2 }} {{ mod 9 2 }} {{ mul 2 3 }} {{ \"hi\" | sha256sum | trunc 8 }} {{ \"aGk=\" | b64dec }} {{ hasKey .Values.m \"k\" }} {{ \"a b\" | nospace }} {{ substr 1 3 \"abcd\" }} {{ .Values.m | toJson }} {{ list 1 2 | first }}{{ list 1 2 | last }} {{ trimAll \"-\" \"--x--\" }} {{ cat \"a\" \"b\" }}",
            "",
            &v,
            &[],
        )
        .unwrap();
        assert_eq!(
            out,
            "10 7 4 1 6 8f434346 hi true ab bc {\"k\":\"x\"} 12 x a b"
        );
        let e = rend("{{ div 1 0 }}", "{{ div 1 0 }}", &Values::default(), &[]).unwrap_err();
        assert!(e.message.contains("division by zero"), "{e}");
    }

    #[test]
    fn acr_data_shape() {
        let mut v = Values::default();
        v.set("a=it's").unwrap();
        let (out, _) = rend(
            "{{.Build.ID}} {{.Run.GitTag}}|{{.ValuesJSON}} {{.RunJSON | len}}",
            "",
            &v,
            &[],
        )
        .unwrap();
        assert!(out.starts_with("ca1 |'{\"a\":\"it'\"'\"'s\"}' "), "{out}");
        assert_eq!(shell_quote("plain:1.0"), "plain:1.0");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn secrets_render_in_and_an_unknown_one_renders_empty() {
        let src = "env: [\"P={{ .Secrets.pass }}\", \"B={{ .Secrets.pass | b64enc }}\", \"U={{.Secrets.user}}\"] {{.Run.ID}}";
        let (out, warnings) = rend(src, src, &Values::default(), &[("pass", "pw")]).unwrap();
        assert_eq!(out, "env: [\"P=pw\", \"B=cHc=\", \"U=\"] ca1");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].message.contains("secret `user`"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn parse_error_has_position() {
        let src = "steps:\n  - cmd: busybox echo {{ .Values.x \n";
        let e = rend(src, src, &Values::default(), &[]).unwrap_err();
        assert_eq!((e.line, e.column), (2, 23), "{e}");
        assert!(e.message.starts_with("template: "), "{e}");
    }
}
