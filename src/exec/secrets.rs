//! Secret values in a run's output: every form a step may reasonably print them in is
//! replaced by `***`: the value itself; each line of a multi-line value (a key file printed
//! line by line arrives as separate log lines); its base64 (standard and URL-safe, with and
//! without the trailing newline `echo` adds, whole and as the 76-column lines `base64`
//! prints); and its JSON-escaped form. A multi-line value rendered into a quoted or plain
//! YAML scalar reaches the step folded (lines joined by spaces, as YAML reads it, and as in
//! ACR), so the folded form is masked in all those encodings too.

use base64::Engine;

/// Lines of a multi-line secret shorter than this are not masked on their own: masking
/// every `}` or `-----` would hide the log, not the secret.
const MIN_LINE: usize = 6;
/// Pieces of a wrapped base64 encoding shorter than this are not masked on their own.
const MIN_CHUNK: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Longest first, so a whole value is hidden before the lines inside it.
    needles: Vec<String>,
}

impl Masker {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a String>) -> Masker {
        let mut needles: Vec<String> = Vec::new();
        let mut all: Vec<String> = Vec::new();
        for v in values.into_iter().filter(|v| !v.is_empty()) {
            all.push(v.clone());
            if v.contains('\n') {
                let folded: Vec<&str> = v.lines().map(str::trim).collect();
                all.push(folded.join(" "));
            }
        }
        for v in &all {
            needles.push(v.clone());
            if v.contains('\n') {
                needles.extend(
                    v.lines()
                        .map(str::trim)
                        .filter(|l| l.len() >= MIN_LINE)
                        .map(str::to_string),
                );
            }
            let engines = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
            ];
            for raw in [v.clone(), format!("{v}\n")] {
                for e in engines {
                    let enc = e.encode(raw.as_bytes());
                    let bare = enc.trim_end_matches('=').to_string();
                    // What `base64` prints: lines of 76 characters.
                    if bare.len() > 76 {
                        needles.extend(
                            enc.as_bytes()
                                .chunks(76)
                                .filter_map(|c| std::str::from_utf8(c).ok())
                                .map(|c| c.trim_end_matches('=').to_string())
                                .filter(|c| c.len() >= MIN_CHUNK),
                        );
                    }
                    if bare.len() >= 4 {
                        needles.push(bare);
                    }
                }
            }
            if let Ok(json) = serde_json::to_string(v) {
                let inner = &json[1..json.len() - 1];
                if inner != v {
                    needles.push(inner.to_string());
                }
            }
        }
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Masker { needles }
    }

    /// `text` with every form of every secret replaced by `***`.
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), "***");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_lines_and_encodings_are_masked() {
        let key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END KEY-----".to_string();
        let m = Masker::new([&"hunter2".to_string(), &key]);
        assert_eq!(m.mask("pw is hunter2!"), "pw is ***!");
        // Printed line by line, each line arrives alone.
        assert_eq!(m.mask("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"), "***");
        assert_eq!(m.mask("prefix BKcwggSjAgEAAoIBAQC7"), "prefix ***");
        // `echo $S | base64`, `base64 -w0`, JSON.
        let b64 = base64::engine::general_purpose::STANDARD.encode("hunter2\n");
        assert!(
            !m.mask(&b64).contains(b64.trim_end_matches('=')),
            "{}",
            m.mask(&b64)
        );
        let wrapped = base64::engine::general_purpose::STANDARD.encode(format!("{key}\n"));
        for line in wrapped.as_bytes().chunks(76) {
            let line = std::str::from_utf8(line).unwrap();
            assert_eq!(m.mask(line).replace('=', ""), "***", "{line}");
        }
        assert!(!m
            .mask(&serde_json::to_string(&key).unwrap())
            .contains("MIIEvQ"));
        // Rendered into a quoted YAML scalar, a multi-line value arrives folded.
        let m = Masker::new([&"line-one-AAAA\n  line-two-BBBB".to_string()]);
        let folded =
            base64::engine::general_purpose::STANDARD.encode("line-one-AAAA line-two-BBBB");
        assert_eq!(m.mask(&folded), "***");
        assert_eq!(m.mask("line-one-AAAA line-two-BBBB"), "***");
        // Short lines of a secret do not hide ordinary text.
        let m = Masker::new([&"a\n}\nsecretline".to_string()]);
        assert_eq!(m.mask("a } b"), "a } b");
        assert_eq!(m.mask("secretline"), "***");
    }
}
