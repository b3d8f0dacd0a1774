//! `.Values`: a YAML values file plus `--set key=value` overrides.

use std::path::Path;

use super::{tree, Diagnostic, Diagnostics, Values};

impl Values {
    /// Reads a YAML values file (a mapping at the top level).
    pub fn from_file(path: &Path) -> Result<Values, Diagnostics> {
        let file = path.display().to_string();
        let text = super::read_text(path)?;
        Values::from_yaml_str(&file, &text)
    }

    /// Parses YAML values text; `file` names it in diagnostics.
    pub fn from_yaml_str(file: &str, text: &str) -> Result<Values, Diagnostics> {
        let (node, _) = tree::parse(text)
            .map_err(|e| Diagnostics(vec![super::parse::syntax_error(file, &e, None)]))?;
        match node.to_json() {
            serde_json::Value::Null => Ok(Values::default()),
            serde_json::Value::Object(map) => Ok(Values(map.into_iter().collect())),
            _ => Err(Diagnostics(vec![Diagnostic::new(
                file,
                node.line,
                node.column,
                "a values file must be a mapping of names to values".to_string(),
            )])),
        }
    }

    /// Applies one `key=value` override, as acb's `--set` does: the key is used as
    /// written (`a.b=c` sets the key `a.b`, reached with `index .Values "a.b"`), the value
    /// is text (`007` stays `007`), and nothing is split at commas. Later calls win.
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("`{assignment}` is not of the form key=value (no `=` found)"))?;
        if key.trim().is_empty() {
            return Err(format!("`{assignment}` has an empty key"));
        }
        self.0.insert(
            key.to_string(),
            serde_json::Value::String(value.to_string()),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_is_literal_as_in_acb_and_later_wins() {
        let mut v = Values::from_yaml_str("v.yaml", "image:\n  tag: one\n").unwrap();
        v.set("image.tag=two").unwrap();
        v.set("n=007").unwrap();
        v.set("n=008").unwrap();
        v.set("list=1,y=2").unwrap();
        v.set("plain=x=y").unwrap();
        // The dotted key is a key of its own; the file's nested value is untouched.
        assert_eq!(v.0["image.tag"], "two");
        assert_eq!(v.0["image"]["tag"], "one");
        assert_eq!(v.0["n"], "008");
        assert_eq!(v.0["list"], "1,y=2");
        assert_eq!(v.0["plain"], "x=y");
        assert!(v.set("novalue").is_err());
        assert!(v.set("=c").is_err());
    }

    #[test]
    fn values_file_must_be_a_mapping() {
        let e = Values::from_yaml_str("v.yaml", "- a\n- b\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "v.yaml:1:1: a values file must be a mapping of names to values"
        );
    }
}
