//! Known field names of each part of a task file, read from the model's JSON Schema so
//! they can never drift from the serde model, and the unknown-field check with a
//! "did you mean" suggestion.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use super::tree::{Node, Raw};
use super::{Diagnostic, Task};

/// Where in a task file a mapping sits; selects its known fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Part {
    Task,
    Alias,
    Secret,
    Network,
    Volume,
    Step,
    VolumeMount,
}

impl Part {
    fn describe(self) -> &'static str {
        match self {
            Part::Task => "the task",
            Part::Alias => "`alias`",
            Part::Secret => "a secret",
            Part::Network => "a network",
            Part::Volume => "a volume",
            Part::Step => "a step",
            Part::VolumeMount => "a volume mount",
        }
    }
    fn def_name(self) -> Option<&'static str> {
        match self {
            Part::Task => None,
            Part::Alias => Some("Alias"),
            Part::Secret => Some("Secret"),
            Part::Network => Some("Network"),
            Part::Volume => Some("Volume"),
            Part::Step => Some("Step"),
            Part::VolumeMount => Some("VolumeMount"),
        }
    }
}

static KNOWN: LazyLock<BTreeMap<Part, Vec<String>>> = LazyLock::new(|| {
    let schema = serde_json::to_value(schemars::schema_for!(Task)).unwrap_or_default();
    let props = |v: &serde_json::Value| -> Vec<String> {
        v.get("properties")
            .and_then(|p| p.as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let parts = [
        Part::Task,
        Part::Alias,
        Part::Secret,
        Part::Network,
        Part::Volume,
        Part::Step,
        Part::VolumeMount,
    ];
    parts
        .into_iter()
        .map(|p| {
            let fields = match p.def_name() {
                None => props(&schema),
                Some(d) => schema
                    .get("$defs")
                    .and_then(|defs| defs.get(d))
                    .map(props)
                    .unwrap_or_default(),
            };
            (p, fields)
        })
        .collect()
});

/// The field names `part` accepts.
pub(crate) fn known(part: Part) -> &'static [String] {
    KNOWN.get(&part).map_or(&[], Vec::as_slice)
}

/// Fields read before the model is built and so absent from it: `alias.src` (alias
/// files, merged into `alias.values` while loading).
static EXTRA_ALIAS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut v = known(Part::Alias).to_vec();
    v.push("src".into());
    v
});

/// The known field closest to `name`, when one is close enough to be a likely typo.
pub(crate) fn suggest(name: &str, candidates: &[String]) -> Option<String> {
    // Jaro-Winkler favours a shared prefix, which is how field names get mistyped
    // (`retry` for `retries`, `ignoreError` for `ignoreErrors`).
    // The edit distance breaks near-ties (`retry` is closer to `retries` than to
    // `retryDelay`).
    let lower = name.to_lowercase();
    let mut best: Option<(f64, f64, &String)> = None;
    for c in candidates {
        let c_lower = c.to_lowercase();
        let jw = strsim::jaro_winkler(&lower, &c_lower);
        let rank = jw - 0.02 * strsim::levenshtein(&lower, &c_lower) as f64;
        if best.is_none_or(|(r, _, _)| rank > r) {
            best = Some((rank, jw, c));
        }
    }
    let (_, jw, c) = best?;
    (jw >= 0.85).then(|| c.clone())
}

/// Reports unknown keys under `node` (a mapping of kind `part`) and its children, and
/// removes them from `json` so that serde can still check the rest.
pub(crate) fn check(
    file: &str,
    node: &Node,
    part: Part,
    json: &mut serde_json::Value,
    out: &mut Vec<Diagnostic>,
) {
    let Raw::Map(entries) = &node.raw else {
        return;
    };
    let fields = if part == Part::Alias {
        EXTRA_ALIAS.as_slice()
    } else {
        known(part)
    };
    for (k, v) in entries {
        if !fields.iter().any(|f| f == &k.name) {
            let mut message = format!("unknown field `{}` in {}", k.name, part.describe());
            match suggest(&k.name, fields) {
                Some(s) => message.push_str(&format!("; did you mean `{s}`?")),
                None => message.push_str(&format!("; expected one of {}", list(fields))),
            }
            out.push(Diagnostic::new(file, k.line, k.column, message));
            if let Some(o) = json.as_object_mut() {
                o.remove(&k.name);
            }
            continue;
        }
        let child = match (part, k.name.as_str()) {
            (Part::Task, "steps") => Some(Part::Step),
            (Part::Task, "secrets") => Some(Part::Secret),
            (Part::Task, "networks") => Some(Part::Network),
            (Part::Task, "volumes") => Some(Part::Volume),
            (Part::Step, "volumeMounts") => Some(Part::VolumeMount),
            _ => None,
        };
        if let (Some(child), Raw::Seq(items)) = (child, &v.raw) {
            if let Some(arr) = json.get_mut(k.name.as_str()).and_then(|j| j.as_array_mut()) {
                for (item, j) in items.iter().zip(arr.iter_mut()) {
                    check(file, item, child, j, out);
                }
            }
        }
    }
}

fn list(fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_fields_come_from_the_model() {
        assert!(known(Part::Step).iter().any(|f| f == "ignoreErrors"));
        assert!(known(Part::Step).iter().any(|f| f == "downloadRetryDelay"));
        assert!(known(Part::Secret).iter().any(|f| f == "clientID"));
        assert!(known(Part::Task).iter().any(|f| f == "stepTimeout"));
        assert!(known(Part::VolumeMount).iter().any(|f| f == "mountPath"));
        assert_eq!(known(Part::Step).len(), 30);
    }

    #[test]
    fn suggestions() {
        let step = known(Part::Step);
        assert_eq!(
            suggest("ignoreError", step).as_deref(),
            Some("ignoreErrors")
        );
        assert_eq!(suggest("entrypoint", step).as_deref(), Some("entryPoint"));
        assert_eq!(suggest("timout", step).as_deref(), Some("timeout"));
        assert_eq!(suggest("retry", step).as_deref(), Some("retries"));
        assert_eq!(suggest("colour", step), None);
        assert_eq!(suggest("completelyunrelated", step), None);
    }
}
