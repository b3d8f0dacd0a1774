//! A YAML document as a tree of nodes that remember their line and column. Used to find
//! unknown fields (serde's own error has no suggestion) and to point diagnostics found
//! after parsing (duplicate ids, unknown `when` entries, ...) at the right place.

use std::collections::HashMap;

/// A node's value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Raw {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// A node with its 1-based position in the (rendered) text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub line: usize,
    pub column: usize,
    pub raw: Raw,
    /// A plain scalar's text as written, when it was typed as something else (`0777`,
    /// `1.50`, `yes`): a text field takes it as written, as go-yaml v2 does.
    pub plain: Option<Box<str>>,
}

/// A mapping key (always read as text) with its position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Key {
    pub name: String,
    pub line: usize,
    pub column: usize,
}

impl Node {
    /// The value under `key` when this is a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key and value under `key` when this is a mapping.
    pub fn entry(&self, key: &str) -> Option<(&Key, &Node)> {
        match &self.raw {
            Raw::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.name == key)
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    /// Element `i` when this is a sequence.
    pub fn at(&self, i: usize) -> Option<&Node> {
        match &self.raw {
            Raw::Seq(items) => items.get(i),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.raw {
            Raw::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A scalar as a text field reads it: as written (`0777` stays `0777`); `None` for
    /// null, sequences and mappings.
    pub fn text(&self) -> Option<String> {
        if let Some(p) = &self.plain {
            return Some(p.to_string());
        }
        match &self.raw {
            Raw::Str(s) => Some(s.clone()),
            Raw::Bool(b) => Some(b.to_string()),
            Raw::Int(i) => Some(i.to_string()),
            Raw::UInt(u) => Some(u.to_string()),
            Raw::Float(f) => Some(f.to_string()),
            Raw::Null | Raw::Seq(_) | Raw::Map(_) => None,
        }
    }

    /// Converts to JSON so that serde can build the model without a second YAML parse.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.raw {
            Raw::Null => J::Null,
            Raw::Bool(b) => J::Bool(*b),
            Raw::Int(i) => J::from(*i),
            Raw::UInt(u) => J::from(*u),
            Raw::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Raw::Str(s) => J::String(s.clone()),
            Raw::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Raw::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// A YAML syntax (or structure) problem with its 1-based position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Something the parser accepted that is likely a mistake (a key given twice: the last
/// one wins, as in ACR).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct YamlWarning {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Most nodes a document may expand to through YAML aliases (`*a`), so that a "billion
/// laughs" file fails quickly instead of exhausting memory.
const MAX_NODES: usize = 2_000_000;

enum Frame {
    Seq(Node, Vec<Node>, Option<String>),
    Map(Node, Vec<(Key, Node)>, Option<Key>, Option<String>),
}

/// Parses YAML text into a located tree. The grammar is libyaml's (through
/// `libyaml-safer`, a line-by-line Rust port), which is what ACR's runner reads task files
/// with: go-yaml v2 is itself a port of libyaml, so a file one accepts the other does
/// (`when: [-]`, say, which a YAML 1.2 parser refuses). Plain scalars are typed as YAML 1.1
/// does (`yes`/`on` are booleans, `0x1f` and `010` integers), as go-yaml v2 types them.
/// A key given twice keeps the last value and is reported as a warning. An empty document
/// is `Null`.
pub(crate) fn parse(text: &str) -> Result<(Node, Vec<YamlWarning>), YamlError> {
    use libyaml_safer::{EventData, Parser, ScalarStyle};

    // libyaml-safer 0.3 panics on a quoted scalar whose escaping backslash is the input's
    // last byte (an unterminated quote: an error either way); a newline after it keeps
    // the parser in bounds.
    let owned;
    let text = if text.ends_with('\\') {
        owned = format!("{text}\n");
        owned.as_str()
    } else {
        text
    };
    let mut input = text.as_bytes();
    let mut parser = Parser::new();
    parser.set_input_string(&mut input);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<String, (Node, usize)> = HashMap::new();
    let mut warnings = Vec::new();
    let mut root: Option<Node> = None;
    let mut total = 0usize;
    let mut documents = 0usize;
    loop {
        // Input is hostile: a parser bug must be an error here, never a panic.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parser.parse()))
            .map_err(|_| YamlError {
                line: 1,
                column: 1,
                message: "the YAML could not be read (the parser failed on it)".into(),
            })?;
        let event = parsed.map_err(|e| {
            let mark = e.problem_mark().unwrap_or_default();
            YamlError {
                line: mark.line as usize + 1,
                column: mark.column as usize + 1,
                message: explain_problem(e.problem(), e.context()),
            }
        })?;
        let (line, column) = (
            event.start_mark.line as usize + 1,
            event.start_mark.column as usize + 1,
        );
        let at = |raw| Node {
            line,
            column,
            raw,
            plain: None,
        };
        let (node, anchor, size) = match event.data {
            EventData::StreamEnd => break,
            EventData::StreamStart { .. } | EventData::DocumentEnd { .. } => continue,
            EventData::DocumentStart { .. } => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError {
                        line,
                        column,
                        message: "expected a single YAML document (found `---` starting another)"
                            .into(),
                    });
                }
                continue;
            }
            EventData::SequenceStart { anchor, .. } => {
                stack.push(Frame::Seq(at(Raw::Null), Vec::new(), anchor));
                continue;
            }
            EventData::MappingStart { anchor, .. } => {
                stack.push(Frame::Map(at(Raw::Null), Vec::new(), None, anchor));
                continue;
            }
            EventData::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(mut n, items, anchor)) => {
                    let size = 1 + items.iter().map(count).sum::<usize>();
                    n.raw = Raw::Seq(items);
                    (n, anchor, size)
                }
                _ => return Err(structure(line, column)),
            },
            EventData::MappingEnd => match stack.pop() {
                Some(Frame::Map(mut n, entries, _, anchor)) => {
                    let entries = merge_keys(entries)?;
                    let entries = last_wins(entries, &mut warnings);
                    let size = 1 + entries.iter().map(|(_, v)| count(v)).sum::<usize>();
                    n.raw = Raw::Map(entries);
                    (n, anchor, size)
                }
                _ => return Err(structure(line, column)),
            },
            EventData::Scalar {
                value,
                style,
                anchor,
                tag,
                ..
            } => {
                let is_str_tag = tag.as_deref().is_some_and(|t| t.ends_with(":str"));
                let node = if style == ScalarStyle::Plain && !is_str_tag {
                    match resolve(&value) {
                        Raw::Str(s) => at(Raw::Str(s)),
                        raw => Node {
                            plain: Some(value.into_boxed_str()),
                            ..at(raw)
                        },
                    }
                } else {
                    at(Raw::Str(value))
                };
                (node, anchor, 1)
            }
            EventData::Alias { anchor } => match anchors.get(&anchor) {
                Some((n, size)) => {
                    let mut n = n.clone();
                    n.line = line;
                    n.column = column;
                    (n, None, *size)
                }
                None => {
                    return Err(YamlError {
                        line,
                        column,
                        message: format!("alias `*{anchor}` names no anchor defined before it"),
                    })
                }
            },
        };
        total += size;
        if total > MAX_NODES {
            return Err(YamlError {
                line,
                column,
                message: "the document is too large (YAML aliases expand to too many values)"
                    .into(),
            });
        }
        if let Some(a) = anchor {
            anchors.insert(a, (node.clone(), size));
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq(_, items, _)) => items.push(node),
            Some(Frame::Map(_, entries, pending, _)) => match pending.take() {
                Some(key) => entries.push((key, node)),
                None => {
                    // A key is its text as written (`n`, `on`, `1.0`), not what it would
                    // type as.
                    let name = match (node.plain, node.raw) {
                        (Some(p), _) => p.into_string(),
                        (None, Raw::Str(s)) => s,
                        (None, Raw::Null) => String::from("null"),
                        (None, Raw::Bool(b)) => b.to_string(),
                        (None, Raw::Int(i)) => i.to_string(),
                        (None, Raw::UInt(u)) => u.to_string(),
                        (None, Raw::Float(f)) => f.to_string(),
                        (None, Raw::Seq(_) | Raw::Map(_)) => {
                            return Err(YamlError {
                                line: node.line,
                                column: node.column,
                                message: "a mapping key must be a plain value".into(),
                            })
                        }
                    };
                    *pending = Some(Key {
                        name,
                        line: node.line,
                        column: node.column,
                    });
                }
            },
        }
    }
    let root = root.unwrap_or(Node {
        line: 1,
        column: 1,
        raw: Raw::Null,
        plain: None,
    });
    Ok((root, warnings))
}

/// libyaml's terse problems, in words that say what to change.
fn explain_problem(problem: &str, context: Option<&str>) -> String {
    match problem {
        "mapping values are not allowed in this context" => "a `: ` inside a plain value \
             (often a template that rendered empty at the end of a line, like `app:{{.Values.tag}}`); \
             quote the value"
            .into(),
        "found character that cannot start any token" => {
            "a character that cannot start a YAML value here (a tab used for indenting, or `@` or \
             a backtick at the start of a value); indent with spaces or quote the value"
                .into()
        }
        "did not find expected key" | "did not find expected '-' indicator" => {
            "the indentation does not line up with the lines above".into()
        }
        "found undefined tag handle" => "an unknown `!tag`; quote the value".into(),
        p => match context {
            Some(c) => format!("{p} ({c})"),
            None => p.to_string(),
        },
    }
}

/// A key given twice keeps its last value (as go-yaml v2 decodes it); each earlier one is
/// reported.
fn last_wins(entries: Vec<(Key, Node)>, warnings: &mut Vec<YamlWarning>) -> Vec<(Key, Node)> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(Key, Node)> = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        match seen.get(&k.name) {
            Some(&i) => {
                warnings.push(YamlWarning {
                    line: k.line,
                    column: k.column,
                    message: format!(
                        "key `{}` is given twice (first on line {}); the last one is used, as in ACR",
                        k.name, out[i].0.line
                    ),
                });
                out[i] = (k, v);
            }
            None => {
                seen.insert(k.name.clone(), out.len());
                out.push((k, v));
            }
        }
    }
    out
}

fn structure(line: usize, column: usize) -> YamlError {
    YamlError {
        line,
        column,
        message: "unbalanced YAML structure".into(),
    }
}

fn count(n: &Node) -> usize {
    match &n.raw {
        Raw::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        Raw::Map(entries) => 1 + entries.iter().map(|(_, v)| count(v)).sum::<usize>(),
        _ => 1,
    }
}

/// `<<: *base` (or a list of them) merges mappings in; keys written out win.
fn merge_keys(entries: Vec<(Key, Node)>) -> Result<Vec<(Key, Node)>, YamlError> {
    if !entries.iter().any(|(k, _)| k.name == "<<") {
        return Ok(entries);
    }
    let mut own = Vec::with_capacity(entries.len());
    let mut merged: Vec<(Key, Node)> = Vec::new();
    for (k, v) in entries {
        if k.name != "<<" {
            own.push((k, v));
            continue;
        }
        let sources = match v.raw {
            Raw::Map(m) => vec![m],
            Raw::Seq(items) => {
                let mut maps = Vec::new();
                for item in items {
                    match item.raw {
                        Raw::Map(m) => maps.push(m),
                        _ => return Err(merge_error(&k)),
                    }
                }
                maps
            }
            _ => return Err(merge_error(&k)),
        };
        for m in sources {
            for (mk, mv) in m {
                if !merged.iter().any(|(x, _)| x.name == mk.name) {
                    merged.push((mk, mv));
                }
            }
        }
    }
    for (mk, mv) in merged {
        if !own.iter().any(|(x, _)| x.name == mk.name) {
            own.push((mk, mv));
        }
    }
    Ok(own)
}

fn merge_error(k: &Key) -> YamlError {
    YamlError {
        line: k.line,
        column: k.column,
        message: "`<<` must merge a mapping or a list of mappings".into(),
    }
}

/// YAML 1.1 typing of a plain scalar, as go-yaml v2's resolver types it: `~`/`null`
/// (and nothing) are null; `y`, `yes`, `on`, `true` (and their `n`/`no`/`off`/`false`) in
/// three spellings each are booleans; integers may be signed, have `_` separators, and be
/// hex (`0x`), binary (`0b`) or octal (a leading `0`); floats have a digit and `.inf`/`.nan`
/// forms. Anything else is text.
fn resolve(v: &str) -> Raw {
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Raw::Null,
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
            return Raw::Bool(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            return Raw::Bool(false)
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Raw::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Raw::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Raw::Float(f64::NAN),
        _ => {}
    }
    let first = v.as_bytes()[0];
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return Raw::Str(v.to_string());
    }
    let plain = v.replace('_', "");
    let (neg, digits) = match plain.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, plain.strip_prefix('+').unwrap_or(&plain)),
    };
    let radix = |s: &str, r: u32| {
        (!s.is_empty())
            .then(|| i64::from_str_radix(s, r).ok())
            .flatten()
            .map(|i| Raw::Int(if neg { -i } else { i }))
    };
    let int = if let Some(h) = digits.strip_prefix("0x") {
        radix(h, 16)
    } else if let Some(b) = digits.strip_prefix("0b") {
        radix(b, 2)
    } else if digits.len() > 1
        && digits.starts_with('0')
        && digits.bytes().all(|c| c.is_ascii_digit())
    {
        radix(&digits[1..], 8)
    } else if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
        match plain.parse::<i64>() {
            Ok(i) => Some(Raw::Int(i)),
            Err(_) => digits.parse::<u64>().ok().filter(|_| !neg).map(Raw::UInt),
        }
    } else {
        None
    };
    if let Some(i) = int {
        return i;
    }
    if is_float(digits) {
        if let Ok(f) = plain.parse::<f64>() {
            return Raw::Float(f);
        }
    }
    Raw::Str(v.to_string())
}

/// `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, go-yaml v2's float syntax (sign
/// removed).
fn is_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.first() == Some(&b'.') {
        i = 1;
        if digits(&mut i) == 0 {
            return false;
        }
    } else {
        if digits(&mut i) == 0 {
            return false;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            digits(&mut i);
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(text: &str) -> Node {
        parse(text).unwrap().0
    }

    #[test]
    fn a_quote_cut_at_an_escape_is_an_error_not_a_panic() {
        for text in ["\"\\", "a: \"x\\", "- \"\\\\\\"] {
            let e = parse(text).unwrap_err();
            assert!(e.message.contains("quoted"), "{text:?}: {}", e.message);
        }
    }

    #[test]
    fn positions_of_keys_and_values() {
        let n = tree("version: v1.1.0\nsteps:\n  - cmd: busybox\n    when: [\"-\"]\n");
        let (k, v) = n.entry("steps").unwrap();
        assert_eq!((k.line, k.column), (2, 1));
        let step = v.at(0).unwrap();
        let (wk, wv) = step.entry("when").unwrap();
        assert_eq!((wk.line, wk.column), (4, 5));
        assert_eq!(wv.at(0).unwrap().as_str(), Some("-"));
        assert_eq!(wv.at(0).unwrap().line, 4);
        assert_eq!(n.get("version").unwrap().column, 10);
    }

    #[test]
    fn scalars_are_typed_as_yaml_1_1_and_keep_their_text() {
        let n = tree(
            "a: 1\nb: '1'\nc: ~\nd: yes\ne: 1.50\nf: v1.0\ng: -7\nh: &x {k: 1}\ni:\n  <<: *x\n  j: 2\nk: 0777\nl: 0x1F\nm: 1_000\nn: off\no: 2019-01-01\n",
        );
        assert_eq!(n.get("a").unwrap().raw, Raw::Int(1));
        assert_eq!(n.get("b").unwrap().raw, Raw::Str("1".into()));
        assert_eq!(n.get("c").unwrap().raw, Raw::Null);
        assert_eq!(n.get("d").unwrap().raw, Raw::Bool(true));
        assert_eq!(n.get("d").unwrap().text().as_deref(), Some("yes"));
        assert_eq!(n.get("e").unwrap().raw, Raw::Float(1.5));
        assert_eq!(n.get("e").unwrap().text().as_deref(), Some("1.50"));
        assert_eq!(n.get("f").unwrap().raw, Raw::Str("v1.0".into()));
        assert_eq!(n.get("g").unwrap().raw, Raw::Int(-7));
        let i = n.get("i").unwrap();
        assert_eq!(i.get("k").unwrap().raw, Raw::Int(1));
        assert_eq!(i.get("j").unwrap().raw, Raw::Int(2));
        assert_eq!(n.get("k").unwrap().raw, Raw::Int(0o777));
        assert_eq!(n.get("k").unwrap().text().as_deref(), Some("0777"));
        assert_eq!(n.get("l").unwrap().raw, Raw::Int(31));
        assert_eq!(n.get("m").unwrap().raw, Raw::Int(1000));
        assert_eq!(n.get("n").unwrap().raw, Raw::Bool(false));
        assert_eq!(n.get("o").unwrap().raw, Raw::Str("2019-01-01".into()));
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        assert_eq!(tree("").raw, Raw::Null);
        assert_eq!(tree("# only a comment\n").raw, Raw::Null);
    }

    #[test]
    fn a_key_given_twice_keeps_the_last_value_with_a_warning() {
        let (n, w) = parse("a: 1\nb: 2\na: 3\n").unwrap();
        assert_eq!(n.get("a").unwrap().raw, Raw::Int(3));
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].line, w[0].column), (3, 1));
        assert!(w[0].message.contains("first on line 1"), "{}", w[0].message);
    }

    /// What go-yaml v2 (libyaml's grammar) reads and a YAML 1.2 parser refuses.
    #[test]
    fn libyamls_grammar() {
        let n = tree("when: [-]\nw2: [a, -]\nbuild: -t {x}/app .\ncmd: -e A=B image\n");
        assert_eq!(n.get("when").unwrap().at(0).unwrap().as_str(), Some("-"));
        assert_eq!(n.get("w2").unwrap().at(1).unwrap().as_str(), Some("-"));
        assert_eq!(n.get("build").unwrap().as_str(), Some("-t {x}/app ."));
        assert_eq!(n.get("cmd").unwrap().as_str(), Some("-e A=B image"));
        // And what it refuses, it refuses in plain words.
        let e = parse("steps:\n  - build: -t app: .\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("quote the value"), "{}", e.message);
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            s.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let e = parse(&s).unwrap_err();
        assert!(e.message.contains("too large"), "{}", e.message);
    }
}
