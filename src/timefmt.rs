//! Times in JSON answers as RFC 3339 (UTC), whatever a store keeps (Unix seconds or
//! milliseconds): one format for every `-o json` and API answer. Reading accepts the
//! RFC 3339 text and, from older answers, the number. Also the one way a duration is
//! read from the environment (whole seconds).

use serde::{Deserialize, Deserializer, Serializer};

/// The whole seconds in environment variable `var`, or `default` when it is unset, not a
/// number or 0: the operator's override of an interval.
pub fn env_secs(var: &str, default: std::time::Duration) -> std::time::Duration {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(default, std::time::Duration::from_secs)
}

fn text(secs: i64, millis: u32) -> String {
    let t = chrono::DateTime::from_timestamp(secs, millis * 1_000_000).unwrap_or_default();
    let format = if millis == 0 {
        chrono::SecondsFormat::Secs
    } else {
        chrono::SecondsFormat::Millis
    };
    t.to_rfc3339_opts(format, true)
}

/// Unix seconds as RFC 3339 UTC text, for tables.
pub fn rfc3339(secs: i64) -> String {
    text(secs, 0)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Given {
    Text(String),
    Number(i64),
}

/// Milliseconds since the epoch of an RFC 3339 text (a number is taken as it is).
fn parse_ms<E: serde::de::Error>(g: Given) -> Result<i64, E> {
    match g {
        Given::Number(n) => Ok(n),
        Given::Text(t) => chrono::DateTime::parse_from_rfc3339(&t)
            .map(|d| d.timestamp_millis())
            .map_err(|_| E::custom(format!("{t:?} is not an RFC 3339 time"))),
    }
}

/// Unix seconds.
pub mod secs {
    use super::*;

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(*v, 0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Given::deserialize(d)? {
            Given::Number(n) => Ok(n),
            g => parse_ms(g).map(|ms: i64| ms.div_euclid(1000)),
        }
    }
}

/// Unix seconds, or none.
pub mod opt_secs {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&text(*v, 0)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Option::<Given>::deserialize(d)? {
            None => Ok(None),
            Some(Given::Number(n)) => Ok(Some(n)),
            Some(g) => parse_ms(g).map(|ms: i64| Some(ms.div_euclid(1000))),
        }
    }
}

/// Unix milliseconds.
pub mod millis {
    use super::*;

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(v.div_euclid(1000), v.rem_euclid(1000) as u32))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Given::deserialize(d)? {
            Given::Number(n) => Ok(n),
            g => parse_ms(g),
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct T {
        #[serde(with = "super::secs")]
        a: i64,
        #[serde(with = "super::opt_secs")]
        b: Option<i64>,
        #[serde(with = "super::millis")]
        c: i64,
    }

    #[test]
    fn times_are_rfc3339_and_read_back() {
        let t = T {
            a: 1_800_000_000,
            b: None,
            c: 1_800_000_000_123,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": "2027-01-15T08:00:00Z", "b": null, "c": "2027-01-15T08:00:00.123Z"})
        );
        assert_eq!(serde_json::from_value::<T>(v).unwrap(), t);
        let old: T = serde_json::from_value(serde_json::json!({"a": 5, "b": 6, "c": 7})).unwrap();
        assert_eq!((old.a, old.b, old.c), (5, Some(6), 7));
    }
}
