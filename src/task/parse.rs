//! From rendered text to the model: YAML errors as diagnostics, and mapping positions in
//! the rendered text back to the file as written.

use super::Diagnostic;

/// A YAML (or serde) error as a diagnostic; `map` translates rendered positions and
/// `rendered` (the text that was parsed) lets the message name the field.
pub(crate) fn yaml_error(
    file: &str,
    e: &serde_saphyr::Error,
    map: Option<&LineMap>,
    rendered: Option<&str>,
) -> Diagnostic {
    let (rline, rcolumn) = e
        .location()
        .map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
    let (line, column) = match map {
        Some(m) => m.locate(rline, rcolumn, None),
        None => (rline, rcolumn),
    };
    let mut message = clean_message(&e.without_snippet().to_string());
    if let Some(text) = rendered {
        message = explain(&message, text, rline, rcolumn);
    }
    Diagnostic::new(file, line, column, message)
}

/// A YAML syntax error from the tree parser as a diagnostic.
pub(crate) fn syntax_error(
    file: &str,
    e: &super::tree::YamlError,
    map: Option<&LineMap>,
) -> Diagnostic {
    let (line, column) = match map {
        Some(m) => m.locate(e.line, e.column, None),
        None => (e.line, e.column),
    };
    Diagnostic::new(file, line, column, e.message.clone())
}

/// Rephrases serde-saphyr's terse type errors in plain English, naming the field.
fn explain(message: &str, text: &str, line: usize, column: usize) -> String {
    let Some(src) = text.lines().nth(line.saturating_sub(1)) else {
        return message.to_string();
    };
    let body = src.trim_start().trim_start_matches("- ").trim_start();
    let field = body
        .split_once(':')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map_or_else(|| "this value".to_string(), |k| format!("`{k}`"));
    let value: String = src
        .chars()
        .skip(column.saturating_sub(1))
        .take_while(|c| !matches!(c, ',' | ']' | '}' | '#'))
        .collect();
    let value = value.trim();
    match message {
        "invalid boolean" => format!("{field} must be true or false, not `{value}`"),
        m if m.starts_with("invalid u") => {
            format!("{field} must be a whole number of 0 or more, not `{value}`")
        }
        m if m.starts_with("invalid i") => format!("{field} must be a whole number, not `{value}`"),
        "expected sequence start" => format!("{field} must be a list"),
        "expected mapping start" => format!("{field} must be a mapping"),
        "expected string scalar" => format!("{field} must be text, not a list or mapping"),
        m => {
            if let Some(rest) = m.strip_prefix("missing field ") {
                format!("missing required field {rest}")
            } else if let Some(rest) = m.strip_prefix("duplicate mapping key: ") {
                let key = rest.split(',').next().unwrap_or(rest).trim();
                format!("duplicate key `{key}`")
            } else {
                m.to_string()
            }
        }
    }
}

/// serde-saphyr appends " at line X, column Y" to messages; the diagnostic carries those.
fn clean_message(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg).trim();
    let cut = first.find(" at line ").map_or(first, |i| &first[..i]);
    let cut = cut.strip_prefix("error: ").unwrap_or(cut);
    cut.to_string()
}

/// Maps lines of the rendered text to lines of the file as written (templates such as
/// `{{if}}` blocks can add or remove lines).
pub(crate) struct LineMap {
    original: Vec<String>,
    rendered: Vec<String>,
    /// For each rendered line (0-based), the 0-based original line.
    to_original: Option<Vec<usize>>,
    /// For each line of the original (1-based), its line in the file, when lines were
    /// removed from the file to make the original (comment lines).
    outer: Option<Vec<usize>>,
}

impl LineMap {
    pub(crate) fn new(original: &str, rendered: &str) -> LineMap {
        if original == rendered {
            return LineMap {
                original: Vec::new(),
                rendered: Vec::new(),
                to_original: None,
                outer: None,
            };
        }
        let o: Vec<String> = original.lines().map(str::to_string).collect();
        let r: Vec<String> = rendered.lines().map(str::to_string).collect();
        let to_original = if o.len() == r.len() {
            (0..r.len()).collect()
        } else {
            align(&o, &r)
        };
        LineMap {
            original: o,
            rendered: r,
            to_original: Some(to_original),
            outer: None,
        }
    }

    /// The original's lines are these lines of the file (1-based, in order).
    pub(crate) fn with_lines(mut self, lines: Vec<usize>) -> LineMap {
        let identity = lines.iter().enumerate().all(|(i, l)| *l == i + 1);
        self.outer = (!identity).then_some(lines);
        self
    }

    /// The position in the file as written for a 1-based position in the rendered text.
    /// `token` (text at that position) helps find the column on a changed line.
    pub(crate) fn locate(&self, line: usize, column: usize, token: Option<&str>) -> (usize, usize) {
        let (l, c) = self.locate_original(line, column, token);
        match &self.outer {
            Some(lines) if l > 0 => (lines.get(l - 1).copied().unwrap_or(l), c),
            _ => (l, c),
        }
    }

    fn locate_original(&self, line: usize, column: usize, token: Option<&str>) -> (usize, usize) {
        let Some(map) = &self.to_original else {
            return (line, column);
        };
        if line == 0 {
            return (line, column);
        }
        let Some(&o) = map.get(line - 1) else {
            return (line, column);
        };
        let (Some(ol), Some(rl)) = (self.original.get(o), self.rendered.get(line - 1)) else {
            return (o + 1, column);
        };
        if ol == rl {
            return (o + 1, column);
        }
        let prefix: String = rl.chars().take(column.saturating_sub(1)).collect();
        if ol.starts_with(&prefix) {
            return (o + 1, column);
        }
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            if let Some(p) = ol.find(t) {
                return (o + 1, ol[..p].chars().count() + 1);
            }
        }
        (o + 1, column)
    }
}

/// Greedy alignment: each rendered line maps to the next identical original line when one
/// exists within a short window, else to the line after the previous match.
fn align(o: &[String], r: &[String]) -> Vec<usize> {
    const WINDOW: usize = 200;
    let mut out = Vec::with_capacity(r.len());
    let mut next = 0usize;
    for line in r {
        let end = (next + WINDOW).min(o.len());
        match o[next.min(o.len())..end].iter().position(|l| l == line) {
            Some(p) => {
                out.push(next + p);
                next = next + p + 1;
            }
            None => {
                out.push(next.min(o.len().saturating_sub(1)));
                next = (next + 1).min(o.len());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_skips_removed_lines() {
        let orig = "a: 1\n{{if .X}}\nb: 2\n{{end}}\nc: 3\n";
        let rendered = "a: 1\n\nc: 3\n";
        let m = LineMap::new(orig, rendered);
        assert_eq!(m.locate(1, 1, None), (1, 1));
        assert_eq!(m.locate(3, 4, None), (5, 4));
    }

    #[test]
    fn token_finds_column_on_changed_line() {
        let orig = "  - cmd: {{.Values.image}} run\n";
        let rendered = "  - cmd: busybox:latest run\n";
        let m = LineMap::new(orig, rendered);
        assert_eq!(m.locate(1, 5, Some("cmd")), (1, 5));
        assert_eq!(m.locate(1, 24, Some("run")), (1, 28));
    }
}
