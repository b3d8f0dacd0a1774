//! From the YAML tree to the model's JSON, field by field, the way go-yaml v2 decodes a
//! task file into acr-builder's structs: each field's type (read from the model's JSON
//! Schema, so it cannot drift) decides how a scalar is read. Any scalar goes into a text
//! field as written (`id: 123`, `ports: [8080]`); YAML 1.1 booleans into bool fields; a
//! float into an integer field is truncated; null is the zero value. Unknown keys are
//! warnings with a "did you mean", as ACR ignores them; a value of the wrong shape is an
//! error in the field's own words, with the fix when there is one.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde_json::{json, Value};

use super::fields::{suggest, Part};
use super::tree::{Key, Node, Raw};
use super::Task;

/// What a field holds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Shape {
    Text,
    Bool,
    /// The largest and smallest values the field's Rust type holds.
    Int {
        min: i128,
        max: i128,
    },
    List(Box<Shape>),
    Map(Box<Shape>),
    Part(Part),
}

/// A part's fields, their shapes, and which are required.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    pub fields: Vec<(String, Shape)>,
    pub required: Vec<String>,
}

fn part_of(def: &str) -> Option<Part> {
    Some(match def {
        "Alias" => Part::Alias,
        "Secret" => Part::Secret,
        "Network" => Part::Network,
        "Volume" => Part::Volume,
        "Step" => Part::Step,
        "VolumeMount" => Part::VolumeMount,
        _ => return None,
    })
}

fn shape_of(v: &Value) -> Option<Shape> {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        return part_of(r.rsplit('/').next()?).map(Shape::Part);
    }
    if let Some(any) = v.get("anyOf").and_then(Value::as_array) {
        return any.iter().find_map(shape_of);
    }
    let ty = match v.get("type")? {
        Value::String(t) => t.as_str(),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null")?,
        _ => return None,
    };
    Some(match ty {
        "string" => Shape::Text,
        "boolean" => Shape::Bool,
        "integer" => {
            let (min, max): (i128, i128) = match v.get("format").and_then(Value::as_str) {
                Some("uint32") => (0, u32::MAX.into()),
                Some("uint64") | Some("uint") => (0, u64::MAX.into()),
                Some("int32") => (i32::MIN.into(), i32::MAX.into()),
                _ => (i64::MIN.into(), i64::MAX.into()),
            };
            Shape::Int { min, max }
        }
        "array" => Shape::List(Box::new(shape_of(v.get("items")?)?)),
        "object" => Shape::Map(Box::new(
            v.get("additionalProperties")
                .and_then(shape_of)
                .unwrap_or(Shape::Text),
        )),
        _ => return None,
    })
}

static SHAPES: LazyLock<BTreeMap<Part, Fields>> = LazyLock::new(|| {
    let schema = serde_json::to_value(schemars::schema_for!(Task)).unwrap_or_default();
    let fields_of = |def: &Value| Fields {
        fields: def
            .get("properties")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), shape_of(v)?)))
                    .collect()
            })
            .unwrap_or_default(),
        required: def
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut out = BTreeMap::new();
    out.insert(Part::Task, fields_of(&schema));
    if let Some(defs) = schema.get("$defs").and_then(Value::as_object) {
        for (name, def) in defs {
            if let Some(p) = part_of(name) {
                out.insert(p, fields_of(def));
            }
        }
    }
    out
});

/// The fields of `part`.
pub(crate) fn fields(part: Part) -> &'static Fields {
    static EMPTY: Fields = Fields {
        fields: Vec::new(),
        required: Vec::new(),
    };
    SHAPES.get(&part).unwrap_or(&EMPTY)
}

/// Names acr-builder's documentation uses for a field whose real name differs: read as
/// the real one, with a note.
const RENAMED: &[(&str, &str)] = &[
    ("downloadRetries", "cmdDownloadRetries"),
    ("downloadRetryDelay", "cmdDownloadRetryDelay"),
];

/// Fields of integer type whose negative values ACR refuses (the others mean "the
/// default" when 0 or less).
const NOT_NEGATIVE: &[&str] = &["retries", "repeat"];

/// Fields where 0 (or less) means a default other than 0, which surprises: (field, what).
const ZERO_MEANS: &[(&str, &str)] = &[
    ("stepTimeout", "the default of 600 s"),
    ("timeout", "the task's `stepTimeout`"),
    ("retryDelay", "5 s"),
];

/// A problem found while converting, at a node (rendered-text position).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub warning: bool,
}

pub(crate) struct Converter {
    pub problems: Vec<Problem>,
}

fn describe(n: &Node) -> String {
    match &n.raw {
        Raw::Seq(_) => "a list".into(),
        Raw::Map(_) => "a mapping".into(),
        Raw::Null => "nothing".into(),
        _ => format!("`{}`", n.text().unwrap_or_default()),
    }
}

impl Converter {
    pub(crate) fn new() -> Converter {
        Converter {
            problems: Vec::new(),
        }
    }

    fn error(&mut self, at: &Node, message: String) {
        self.problems.push(Problem {
            line: at.line,
            column: at.column,
            message,
            warning: false,
        });
    }

    fn warn(&mut self, line: usize, column: usize, message: String) {
        self.problems.push(Problem {
            line,
            column,
            message,
            warning: true,
        });
    }

    /// The JSON for a mapping of kind `part`; `None` when it is not a mapping (reported).
    pub(crate) fn part(&mut self, node: &Node, part: Part) -> Option<Value> {
        let entries = match &node.raw {
            Raw::Map(e) => e,
            Raw::Null => return Some(json!({})),
            _ => {
                let msg = match part {
                    Part::Step => {
                        let text = node.text().unwrap_or_else(|| "IMAGE ARGS".into());
                        let fix = match text.split_once(' ') {
                            Some((k @ ("cmd" | "build" | "push"), rest)) => {
                                format!("- {k}: {rest}")
                            }
                            _ => format!("- cmd: {text}"),
                        };
                        format!(
                            "a step must be a mapping with one of `cmd`, `build` or `push`, not {} \
                             (write `{fix}`)",
                            describe(node)
                        )
                    }
                    _ => format!(
                        "{} must be a mapping, not {}",
                        part.describe(),
                        describe(node)
                    ),
                };
                self.error(node, msg);
                return None;
            }
        };
        let spec = fields(part);
        let mut out = serde_json::Map::new();
        for (k, v) in entries {
            let name = match RENAMED.iter().find(|(from, _)| *from == k.name) {
                Some((from, to)) if part == Part::Step => {
                    self.warn(
                        k.line,
                        k.column,
                        format!(
                            "`{from}` is read as `{to}`, its name in ACR's runner (which ignores \
                             `{from}`)"
                        ),
                    );
                    (*to).to_string()
                }
                _ => k.name.clone(),
            };
            let Some((_, shape)) = spec.fields.iter().find(|(f, _)| *f == name) else {
                self.unknown(k, part, spec);
                continue;
            };
            if let Some(j) = self.value(k, v, shape) {
                out.insert(name, j);
            }
        }
        for r in &spec.required {
            if !out.contains_key(r) {
                self.error(node, format!("{} needs `{r}`", part.describe()));
            }
        }
        Some(Value::Object(out))
    }

    fn unknown(&mut self, k: &Key, part: Part, spec: &Fields) {
        let names: Vec<String> = spec.fields.iter().map(|(f, _)| f.clone()).collect();
        let mut message = format!(
            "unknown field `{}` in {} is ignored, as ACR ignores it",
            k.name,
            part.describe()
        );
        match suggest(&k.name, &names) {
            Some(s) => message.push_str(&format!("; did you mean `{s}`?")),
            None if part == Part::Task && k.name == "alias" => {
                message = "`alias` applies from `version: v1.1.0` on; with this version it is \
                           ignored, as ACR ignores it"
                    .into()
            }
            None => {}
        }
        self.warn(k.line, k.column, message);
    }

    /// The JSON for the value `v` of field `k` of shape `shape`; `None` to leave the field
    /// out (null, or an error reported).
    fn value(&mut self, k: &Key, v: &Node, shape: &Shape) -> Option<Value> {
        let field = &k.name;
        if matches!(v.raw, Raw::Null) {
            return None;
        }
        match shape {
            Shape::Text => match v.text() {
                Some(t) => Some(Value::String(t)),
                None => {
                    self.error(v, format!("`{field}` must be text, not {}", describe(v)));
                    None
                }
            },
            Shape::Bool => match v.raw {
                Raw::Bool(b) => Some(Value::Bool(b)),
                _ => {
                    self.error(
                        v,
                        format!("`{field}` must be true or false, not {}", describe(v)),
                    );
                    None
                }
            },
            Shape::Int { min, max } => {
                let n: Option<i128> = match v.raw {
                    Raw::Int(i) => Some(i.into()),
                    Raw::UInt(u) => Some(u.into()),
                    // A float is truncated, as go-yaml v2 does into an int field.
                    Raw::Float(f) if f.is_finite() => Some(f.trunc() as i128),
                    _ => None,
                };
                let Some(n) = n else {
                    self.error(
                        v,
                        format!("`{field}` must be a whole number, not {}", describe(v)),
                    );
                    return None;
                };
                if *min == 0 && n < 0 {
                    if NOT_NEGATIVE.contains(&field.as_str()) {
                        self.error(v, format!("`{field}` must be 0 or more, not {n}"));
                        return None;
                    }
                    self.warn(
                        v.line,
                        v.column,
                        format!("`{field}: {n}` is not positive: it counts as 0, as in ACR"),
                    );
                    return Some(json!(0));
                }
                if n <= 0 {
                    if let Some((_, means)) = ZERO_MEANS.iter().find(|(f, _)| *f == field.as_str())
                    {
                        self.warn(
                            v.line,
                            v.column,
                            format!("`{field}: {n}` means {means}, as in ACR"),
                        );
                        return Some(json!(0));
                    }
                }
                let n = n.clamp(*min, *max);
                Some(if n < 0 {
                    json!(n as i64)
                } else {
                    json!(n as u64)
                })
            }
            Shape::List(inner) => match &v.raw {
                Raw::Seq(items) => Some(Value::Array(
                    items
                        .iter()
                        .filter_map(|item| match inner.as_ref() {
                            Shape::Part(p) => self.part(item, *p),
                            s => {
                                if matches!(item.raw, Raw::Null) {
                                    self.error(item, format!("an entry of `{field}` is empty"));
                                    return None;
                                }
                                self.value(k, item, s)
                            }
                        })
                        .collect(),
                )),
                Raw::Map(_) => {
                    self.error(v, format!("`{field}` takes a list, not a mapping"));
                    None
                }
                _ => {
                    let t = v.text().unwrap_or_default();
                    self.error(v, format!("`{field}` takes a list: `{field}: [\"{t}\"]`"));
                    None
                }
            },
            Shape::Map(inner) => match &v.raw {
                Raw::Map(entries) => {
                    let mut out = serde_json::Map::new();
                    for (ek, ev) in entries {
                        if let Some(j) = self.value(ek, ev, inner) {
                            out.insert(ek.name.clone(), j);
                        }
                    }
                    Some(Value::Object(out))
                }
                _ => {
                    self.error(
                        v,
                        format!(
                            "`{field}` must be a mapping of names to values, not {}",
                            describe(v)
                        ),
                    );
                    None
                }
            },
            Shape::Part(p) => self.part(v, *p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_come_from_the_model() {
        let step = fields(Part::Step);
        let shape = |n: &str| {
            step.fields
                .iter()
                .find(|(f, _)| f == n)
                .map(|(_, s)| s.clone())
        };
        assert_eq!(shape("cmd"), Some(Shape::Text));
        assert_eq!(shape("detach"), Some(Shape::Bool));
        assert_eq!(
            shape("retries"),
            Some(Shape::Int {
                min: 0,
                max: u32::MAX.into()
            })
        );
        assert_eq!(
            shape("exitedWith"),
            Some(Shape::List(Box::new(Shape::Int {
                min: i64::MIN.into(),
                max: i64::MAX.into()
            })))
        );
        assert_eq!(
            shape("volumeMounts"),
            Some(Shape::List(Box::new(Shape::Part(Part::VolumeMount))))
        );
        assert_eq!(fields(Part::Network).required, vec!["name"]);
    }
}
