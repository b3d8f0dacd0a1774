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

/// Most nodes a document may expand to through YAML aliases (`*a`), so that a "billion
/// laughs" file fails quickly instead of exhausting memory.
const MAX_NODES: usize = 2_000_000;

enum Frame {
    Seq(Node, Vec<Node>, usize),
    Map(Node, Vec<(Key, Node)>, Option<Key>, usize),
}

/// Parses YAML text into a located tree, straight from the parser's events (several times
/// faster than going through serde). An empty document is `Null`.
pub(crate) fn parse(text: &str) -> Result<Node, YamlError> {
    use serde_saphyr::granit_parser::{Event, Parser};

    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, (Node, usize)> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut total = 0usize;
    let mut documents = 0usize;
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| YamlError {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info(),
        })?;
        let (line, column) = (span.start.line(), span.start.col() + 1);
        let at = |raw| Node { line, column, raw };
        let (node, anchor, size) = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => continue,
            Event::DocumentStart(..) => {
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
            Event::SequenceStart(_, anchor, _) => {
                stack.push(Frame::Seq(at(Raw::Null), Vec::new(), anchor));
                continue;
            }
            Event::MappingStart(_, anchor, _) => {
                stack.push(Frame::Map(at(Raw::Null), Vec::new(), None, anchor));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(mut n, items, anchor)) => {
                    let size = 1 + items.iter().map(count).sum::<usize>();
                    n.raw = Raw::Seq(items);
                    (n, anchor, size)
                }
                _ => return Err(structure(line, column)),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(mut n, entries, _, anchor)) => {
                    let entries = merge_keys(entries)?;
                    check_duplicates(&entries)?;
                    let size = 1 + entries.iter().map(|(_, v)| count(v)).sum::<usize>();
                    n.raw = Raw::Map(entries);
                    (n, anchor, size)
                }
                _ => return Err(structure(line, column)),
            },
            Event::Scalar(value, style, anchor, tag) => {
                let is_str_tag = tag.as_ref().is_some_and(|t| t.suffix() == "str");
                let raw = if style == serde_saphyr::granit_parser::ScalarStyle::Plain && !is_str_tag
                {
                    resolve(&value)
                } else {
                    Raw::Str(value.into_owned())
                };
                (at(raw), anchor, 1)
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((n, size)) => {
                    let mut n = n.clone();
                    n.line = line;
                    n.column = column;
                    (n, 0, *size)
                }
                None => {
                    return Err(YamlError {
                        line,
                        column,
                        message: "alias to an unknown anchor".into(),
                    })
                }
            },
            _ => continue,
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
        if anchor != 0 {
            anchors.insert(anchor, (node.clone(), size));
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq(_, items, _)) => items.push(node),
            Some(Frame::Map(_, entries, pending, _)) => match pending.take() {
                Some(key) => entries.push((key, node)),
                None => {
                    let name = match node.raw {
                        Raw::Str(s) => s,
                        Raw::Null => String::from("null"),
                        Raw::Bool(b) => b.to_string(),
                        Raw::Int(i) => i.to_string(),
                        Raw::UInt(u) => u.to_string(),
                        Raw::Float(f) => f.to_string(),
                        Raw::Seq(_) | Raw::Map(_) => {
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
    Ok(root.unwrap_or(Node {
        line: 1,
        column: 1,
        raw: Raw::Null,
    }))
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

fn check_duplicates(entries: &[(Key, Node)]) -> Result<(), YamlError> {
    let dup = |k: &Key| YamlError {
        line: k.line,
        column: k.column,
        message: format!("duplicate key `{}`", k.name),
    };
    if entries.len() <= 32 {
        for (i, (k, _)) in entries.iter().enumerate() {
            if entries[..i].iter().any(|(x, _)| x.name == k.name) {
                return Err(dup(k));
            }
        }
    } else {
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        for (k, _) in entries {
            if !seen.insert(k.name.as_str()) {
                return Err(dup(k));
            }
        }
    }
    Ok(())
}

/// YAML 1.2 core-schema typing of a plain scalar.
fn resolve(v: &str) -> Raw {
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Raw::Null,
        "true" | "True" | "TRUE" => return Raw::Bool(true),
        "false" | "False" | "FALSE" => return Raw::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Raw::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Raw::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Raw::Float(f64::NAN),
        _ => {}
    }
    let first = v.as_bytes()[0];
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return Raw::Str(v.to_string());
    }
    let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = v.parse::<i64>() {
            return Raw::Int(i);
        }
        if let Ok(u) = v.strip_prefix('+').unwrap_or(v).parse::<u64>() {
            return Raw::UInt(u);
        }
    }
    if let Some(h) = v.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(h, 16) {
            return Raw::Int(i);
        }
    }
    if let Some(o) = v.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(o, 8) {
            return Raw::Int(i);
        }
    }
    let float_chars = digits
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if float_chars && digits.bytes().any(|b| b.is_ascii_digit()) {
        if let Ok(f) = v.parse::<f64>() {
            return Raw::Float(f);
        }
    }
    Raw::Str(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_and_values() {
        let n = parse("version: v1.1.0\nsteps:\n  - cmd: busybox\n    when: [\"-\"]\n").unwrap();
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
    fn scalars_anchors_merges_and_errors() {
        let n = parse("a: 1\nb: '1'\nc: ~\nd: true\ne: 1.5\nf: v1.0\ng: -7\nh: &x {k: 1}\ni:\n  <<: *x\n  j: 2\n").unwrap();
        assert_eq!(n.get("a").unwrap().raw, Raw::Int(1));
        assert_eq!(n.get("b").unwrap().raw, Raw::Str("1".into()));
        assert_eq!(n.get("c").unwrap().raw, Raw::Null);
        assert_eq!(n.get("d").unwrap().raw, Raw::Bool(true));
        assert_eq!(n.get("e").unwrap().raw, Raw::Float(1.5));
        assert_eq!(n.get("f").unwrap().raw, Raw::Str("v1.0".into()));
        assert_eq!(n.get("g").unwrap().raw, Raw::Int(-7));
        let i = n.get("i").unwrap();
        assert_eq!(i.get("k").unwrap().raw, Raw::Int(1));
        assert_eq!(i.get("j").unwrap().raw, Raw::Int(2));
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(
            (e.line, e.column, e.message.as_str()),
            (3, 1, "duplicate key `a`")
        );
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        assert_eq!(parse("").unwrap().raw, Raw::Null);
        assert_eq!(parse("# only a comment\n").unwrap().raw, Raw::Null);
    }

    fn yaml11_bools(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value as J;
        match v {
            J::String(s) => match s.as_str() {
                "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => J::Bool(true),
                "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => J::Bool(false),
                _ => J::String(s),
            },
            J::Array(a) => J::Array(a.into_iter().map(yaml11_bools).collect()),
            J::Object(o) => J::Object(o.into_iter().map(|(k, v)| (k, yaml11_bools(v))).collect()),
            other => other,
        }
    }

    /// The event-built tree reads every corpus file exactly as serde-saphyr does.
    #[test]
    fn agrees_with_serde_saphyr_on_the_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tasks");
        let mut compared = 0;
        for dir in ["valid", "invalid"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "yaml") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let theirs = serde_saphyr::from_str::<serde_json::Value>(&text);
                let ours = parse(&text);
                match (theirs, ours) {
                    (Ok(t), Ok(o)) => {
                        // serde-saphyr also reads YAML 1.1 booleans (`y`, `on`); the tree
                        // keeps them as text and the model's bool fields fall back to it.
                        assert_eq!(yaml11_bools(o.to_json()), t, "{}", path.display());
                        compared += 1;
                    }
                    (Err(_), Err(_)) => {}
                    (t, o) => panic!(
                        "{}: saphyr {:?} vs tree {:?}",
                        path.display(),
                        t.is_ok(),
                        o.is_ok()
                    ),
                }
            }
        }
        assert!(compared > 40, "{compared}");
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
