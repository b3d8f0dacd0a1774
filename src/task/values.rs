//! `.Values`: a YAML values file plus `--set key=value` overrides.

use std::collections::BTreeMap;
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
        let node = tree::parse(text)
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

    /// Applies one `key=value` override; `a.b=c` sets a nested value. Later calls win.
    /// The value is kept as text, as with `az acr run --set`.
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("`{assignment}` is not of the form key=value"))?;
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.trim().is_empty()) {
            return Err(format!("`{key}` is not a valid value name"));
        }
        let value = serde_json::Value::String(value.to_string());
        set_path(&mut self.0, &parts, value);
        Ok(())
    }

    /// Overlays `other` on `self` (nested mappings merge; other values replace).
    pub fn merge(&mut self, other: Values) {
        for (k, v) in other.0 {
            match (self.0.get_mut(&k), v) {
                (Some(serde_json::Value::Object(mine)), serde_json::Value::Object(theirs)) => {
                    merge_objects(mine, theirs)
                }
                (_, v) => {
                    self.0.insert(k, v);
                }
            }
        }
    }
}

fn merge_objects(
    mine: &mut serde_json::Map<String, serde_json::Value>,
    theirs: serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in theirs {
        match (mine.get_mut(&k), v) {
            (Some(serde_json::Value::Object(m)), serde_json::Value::Object(t)) => {
                merge_objects(m, t)
            }
            (_, v) => {
                mine.insert(k, v);
            }
        }
    }
}

fn set_path(
    map: &mut BTreeMap<String, serde_json::Value>,
    parts: &[&str],
    value: serde_json::Value,
) {
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    if rest.is_empty() {
        map.insert((*first).to_string(), value);
        return;
    }
    let entry = map
        .entry((*first).to_string())
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !entry.is_object() {
        *entry = serde_json::Value::Object(Default::default());
    }
    if let serde_json::Value::Object(inner) = entry {
        let mut tmp: BTreeMap<String, serde_json::Value> =
            std::mem::take(inner).into_iter().collect();
        set_path(&mut tmp, rest, value);
        *inner = tmp.into_iter().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_nested_and_later_wins() {
        let mut v = Values::from_yaml_str("v.yaml", "image:\n  tag: one\n  repo: app\n").unwrap();
        v.set("image.tag=two").unwrap();
        v.set("image.tag=three").unwrap();
        v.set("plain=x=y").unwrap();
        assert_eq!(v.0["image"]["tag"], "three");
        assert_eq!(v.0["image"]["repo"], "app");
        assert_eq!(v.0["plain"], "x=y");
        assert!(v.set("novalue").is_err());
        assert!(v.set("a..b=c").is_err());
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
