//! The sprig functions task files commonly use (ACR renders with Go text/template plus
//! sprig), written against gotmpl's function interface.

use std::sync::Arc;

use gotmpl::{Template, TemplateError, Value};

use super::budget;

type Func = fn(&[Value]) -> gotmpl::Result<Value>;

/// `t` with the sprig subset registered.
pub(crate) fn with_funcs(t: Template) -> Template {
    let funcs: &[(&str, Func)] = &[
        ("default", f_default),
        ("required", f_required),
        ("empty", |a| Ok(Value::Bool(!a.first().is_some_and(truthy)))),
        ("coalesce", |a| {
            Ok(a.iter().find(|v| truthy(v)).cloned().unwrap_or(Value::Nil))
        }),
        ("ternary", |a| match a {
            [x, y, c] => Ok(if truthy(c) { x.clone() } else { y.clone() }),
            _ => Err(arity("ternary", 3)),
        }),
        ("upper", |a| str1(a, "upper", |s| s.to_uppercase())),
        ("lower", |a| str1(a, "lower", |s| s.to_lowercase())),
        ("trim", |a| str1(a, "trim", |s| s.trim().to_string())),
        ("title", |a| str1(a, "title", title)),
        ("quote", |a| {
            Ok(sval(
                a.iter()
                    .map(|v| format!("{:?}", text(v)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ))
        }),
        ("squote", |a| {
            Ok(sval(
                a.iter()
                    .map(|v| format!("'{}'", text(v)))
                    .collect::<Vec<_>>()
                    .join(" "),
            ))
        }),
        ("toString", |a| match a {
            [v] => Ok(sval(text(v))),
            _ => Err(arity("toString", 1)),
        }),
        ("trimPrefix", |a| {
            str2(a, "trimPrefix", |p, s| {
                s.strip_prefix(p).unwrap_or(s).to_string()
            })
        }),
        ("trimSuffix", |a| {
            str2(a, "trimSuffix", |p, s| {
                s.strip_suffix(p).unwrap_or(s).to_string()
            })
        }),
        ("contains", |a| {
            two(a, "contains").map(|(x, s)| Value::Bool(s.contains(x.as_str())))
        }),
        ("hasPrefix", |a| {
            two(a, "hasPrefix").map(|(x, s)| Value::Bool(s.starts_with(x.as_str())))
        }),
        ("hasSuffix", |a| {
            two(a, "hasSuffix").map(|(x, s)| Value::Bool(s.ends_with(x.as_str())))
        }),
        ("replace", |a| match a {
            [old, new, s] => Ok(sval(text(s).replace(&text(old), &text(new)))),
            _ => Err(arity("replace", 3)),
        }),
        ("repeat", |a| match a {
            [n, s] => {
                let n = n.as_int().unwrap_or(0).clamp(0, 10_000) as usize;
                let s = text(s);
                budget::room_for(n.saturating_mul(s.len()))?;
                Ok(sval(s.repeat(n)))
            }
            _ => Err(arity("repeat", 2)),
        }),
        ("trunc", |a| match a {
            [n, s] => {
                let n = n.as_int().unwrap_or(0).max(0) as usize;
                Ok(sval(text(s).chars().take(n).collect()))
            }
            _ => Err(arity("trunc", 2)),
        }),
        ("join", |a| match a {
            [sep, Value::List(items)] => Ok(sval(
                items.iter().map(text).collect::<Vec<_>>().join(&text(sep)),
            )),
            [_, other] => Ok(sval(text(other))),
            _ => Err(arity("join", 2)),
        }),
        ("splitList", |a| {
            two(a, "splitList").map(|(sep, s)| {
                Value::List(s.split(sep.as_str()).map(|p| sval(p.to_string())).collect())
            })
        }),
        ("list", |a| Ok(Value::List(a.iter().cloned().collect()))),
        // acb's own b64enc takes a missing value as empty (sprig's would fail).
        ("b64enc", |a| match a {
            [v] => Ok(sval(b64enc(text(v).as_bytes()))),
            _ => Err(arity("b64enc", 1)),
        }),
        ("b64dec", |a| match a {
            [s] => b64dec(&text(s))
                .map(sval)
                .ok_or_else(|| TemplateError::Exec("b64dec: not valid base64 text".into())),
            _ => Err(arity("b64dec", 1)),
        }),
        ("sha256sum", |a| {
            str1(a, "sha256sum", |s| {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(s.as_bytes()))
            })
        }),
        ("nospace", |a| {
            str1(a, "nospace", |s| {
                s.chars().filter(|c| !c.is_whitespace()).collect()
            })
        }),
        ("trimAll", |a| {
            str2(a, "trimAll", |cut, s| {
                s.trim_matches(|c| cut.contains(c)).to_string()
            })
        }),
        ("indent", |a| match a {
            [n, s] => Ok(sval(indent(n, &string_arg(s, "indent")?)?)),
            _ => Err(arity("indent", 2)),
        }),
        ("nindent", |a| match a {
            [n, s] => Ok(sval(format!(
                "\n{}",
                indent(n, &string_arg(s, "nindent")?)?
            ))),
            _ => Err(arity("nindent", 2)),
        }),
        ("cat", |a| {
            Ok(sval(
                a.iter()
                    .filter(|v| !matches!(v, Value::Nil))
                    .map(text)
                    .collect::<Vec<_>>()
                    .join(" "),
            ))
        }),
        ("toJson", |a| match a {
            [v] => Ok(sval(value_to_json(v).to_string())),
            _ => Err(arity("toJson", 1)),
        }),
        ("int", |a| match a {
            [v] => Ok(Value::Int(to_int(v))),
            _ => Err(arity("int", 1)),
        }),
        ("atoi", |a| match a {
            [v] => Ok(Value::Int(to_int(v))),
            _ => Err(arity("atoi", 1)),
        }),
        ("add", |a| {
            Ok(Value::Int(
                a.iter().map(to_int).fold(0i64, i64::wrapping_add),
            ))
        }),
        ("mul", |a| {
            Ok(Value::Int(
                a.iter().map(to_int).fold(1i64, i64::wrapping_mul),
            ))
        }),
        ("sub", |a| match a {
            [x, y] => Ok(Value::Int(to_int(x).wrapping_sub(to_int(y)))),
            _ => Err(arity("sub", 2)),
        }),
        ("div", |a| match a {
            [x, y] => to_int(x)
                .checked_div(to_int(y))
                .map(Value::Int)
                .ok_or_else(|| TemplateError::Exec("div: division by zero".into())),
            _ => Err(arity("div", 2)),
        }),
        ("mod", |a| match a {
            [x, y] => to_int(x)
                .checked_rem(to_int(y))
                .map(Value::Int)
                .ok_or_else(|| TemplateError::Exec("mod: division by zero".into())),
            _ => Err(arity("mod", 2)),
        }),
        ("first", |a| match a {
            [Value::List(l)] => Ok(l.first().cloned().unwrap_or(Value::Nil)),
            [_] => Ok(Value::Nil),
            _ => Err(arity("first", 1)),
        }),
        ("last", |a| match a {
            [Value::List(l)] => Ok(l.last().cloned().unwrap_or(Value::Nil)),
            [_] => Ok(Value::Nil),
            _ => Err(arity("last", 1)),
        }),
        ("hasKey", |a| match a {
            [Value::Map(m), k] => Ok(Value::Bool(m.contains_key(text(k).as_str()))),
            [_, _] => Ok(Value::Bool(false)),
            _ => Err(arity("hasKey", 2)),
        }),
        ("substr", |a| match a {
            [start, end, s] => {
                let chars: Vec<char> = text(s).chars().collect();
                let len = chars.len() as i64;
                let b = to_int(start).clamp(0, len) as usize;
                let e = if to_int(end) < 0 {
                    len
                } else {
                    to_int(end).clamp(0, len)
                } as usize;
                Ok(sval(chars[b..e.max(b)].iter().collect()))
            }
            _ => Err(arity("substr", 3)),
        }),
    ];
    // Every call is charged to the render's budget, and no value may outgrow it.
    funcs
        .iter()
        .fold(t, |t, (name, f)| {
            let f = *f;
            t.func(name, move |a| {
                budget::charge()?;
                let v = f(a)?;
                match &v {
                    Value::String(s) => budget::room_for(s.len())?,
                    Value::List(l) => budget::room_for(l.len())?,
                    _ => {}
                }
                Ok(v)
            })
        })
        .max_range_iters(budget::range_iters())
}

fn truthy(v: &Value) -> bool {
    v.is_truthy()
}

fn sval(s: String) -> Value {
    Value::String(Arc::from(s))
}

fn text(v: &Value) -> String {
    match v {
        Value::Nil => String::new(),
        other => other.to_string(),
    }
}

fn arity(name: &str, n: usize) -> TemplateError {
    TemplateError::Exec(format!("{name} takes {n} arguments"))
}

/// A string argument of a sprig function: Go refuses to pass a missing value (nil) where
/// a string is expected ("invalid value; expected string"), so ACR fails the render.
fn string_arg(v: &Value, name: &str) -> gotmpl::Result<String> {
    match v {
        Value::Nil => Err(TemplateError::Exec(format!(
            "`{name}` is given no value (a missing key?), which ACR refuses too (\"invalid \
             value; expected string\"); give the value, or put `default \"\"` before `{name}`"
        ))),
        other => Ok(other.to_string()),
    }
}

fn str1(a: &[Value], name: &str, f: impl Fn(&str) -> String) -> gotmpl::Result<Value> {
    match a {
        [s] => Ok(sval(f(&string_arg(s, name)?))),
        _ => Err(arity(name, 1)),
    }
}

fn str2(a: &[Value], name: &str, f: impl Fn(&str, &str) -> String) -> gotmpl::Result<Value> {
    two(a, name).map(|(x, s)| sval(f(&x, &s)))
}

fn two(a: &[Value], name: &str) -> gotmpl::Result<(String, String)> {
    match a {
        [x, s] => Ok((string_arg(x, name)?, string_arg(s, name)?)),
        _ => Err(arity(name, 2)),
    }
}

fn f_default(a: &[Value]) -> gotmpl::Result<Value> {
    match a {
        [d] => Ok(d.clone()),
        [d, v] => Ok(if truthy(v) { v.clone() } else { d.clone() }),
        _ => Err(arity("default", 2)),
    }
}

fn f_required(a: &[Value]) -> gotmpl::Result<Value> {
    match a {
        [msg, v] if !truthy(v) => Err(TemplateError::Exec(text(msg))),
        [_, v] => Ok(v.clone()),
        _ => Err(arity("required", 2)),
    }
}

fn to_int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Uint(u) => i64::try_from(*u).unwrap_or(i64::MAX),
        Value::Float(f) => *f as i64,
        Value::Bool(b) => i64::from(*b),
        Value::String(s) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

fn indent(n: &Value, s: &str) -> gotmpl::Result<String> {
    let width = to_int(n).clamp(0, 1000) as usize;
    let lines = s.matches('\n').count() + 1;
    budget::room_for(lines.saturating_mul(width).saturating_add(s.len()))?;
    let pad = " ".repeat(width);
    Ok(s.split('\n')
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn value_to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Nil => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Uint(u) => J::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::String(s) => J::String(s.to_string()),
        Value::List(l) => J::Array(l.iter().map(value_to_json).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| (k.to_string(), value_to_json(v)))
                .collect(),
        ),
        other => J::String(other.to_string()),
    }
}

pub(crate) fn b64dec(s: &str) -> Option<String> {
    String::from_utf8(super::b64decode(s)?).ok()
}

fn title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut start = true;
    for c in s.chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        start = c.is_whitespace();
    }
    out
}

pub(crate) fn b64enc(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
