//! A YAML document as a tree of nodes that remember their line and column. Used to find
//! unknown fields (serde's own error has no suggestion) and to point diagnostics found
//! after parsing (duplicate ids, unknown `when` entries, ...) at the right place.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

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

fn pos(s: &serde_saphyr::Location) -> (usize, usize) {
    (s.line() as usize, s.column() as usize)
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: Spanned<Raw> = Spanned::deserialize(d)?;
        let (line, column) = pos(&s.referenced);
        Ok(Node {
            line,
            column,
            raw: s.value,
        })
    }
}

/// Mapping keys are read as text whatever their YAML type (`1: x` has key `1`).
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Raw::deserialize(d)?;
        Ok(KeyText(match raw {
            Raw::Null => String::from("null"),
            Raw::Bool(b) => b.to_string(),
            Raw::Int(i) => i.to_string(),
            Raw::UInt(u) => u.to_string(),
            Raw::Float(f) => f.to_string(),
            Raw::Str(s) => s,
            Raw::Seq(_) | Raw::Map(_) => {
                return Err(de::Error::custom("a mapping key must be a plain value"))
            }
        }))
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::UInt(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        Ok(Raw::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<Spanned<KeyText>>()? {
            let (line, column) = pos(&k.referenced);
            let v = map.next_value::<Node>()?;
            entries.push((
                Key {
                    name: k.value.0,
                    line,
                    column,
                },
                v,
            ));
        }
        Ok(Raw::Map(entries))
    }
}

/// Parses YAML text into a located tree. An empty document is `Null`.
pub(crate) fn parse(text: &str) -> Result<Node, serde_saphyr::Error> {
    if text.trim().is_empty() {
        return Ok(Node {
            line: 1,
            column: 1,
            raw: Raw::Null,
        });
    }
    serde_saphyr::from_str::<Node>(text)
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
}
