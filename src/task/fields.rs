//! The parts of a task file (their fields come from the model's JSON Schema, see
//! `convert`), and "did you mean" suggestions for unknown field names.

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
    pub(crate) fn describe(self) -> &'static str {
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
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of `part`'s fields.
    fn known(part: Part) -> Vec<String> {
        super::super::convert::fields(part)
            .fields
            .iter()
            .map(|(f, _)| f.clone())
            .collect()
    }

    #[test]
    fn known_fields_come_from_the_model() {
        assert!(known(Part::Step).iter().any(|f| f == "ignoreErrors"));
        assert!(known(Part::Step)
            .iter()
            .any(|f| f == "cmdDownloadRetryDelay"));
        assert!(known(Part::Secret).iter().any(|f| f == "clientID"));
        assert!(known(Part::Task).iter().any(|f| f == "stepTimeout"));
        assert!(known(Part::VolumeMount).iter().any(|f| f == "mountPath"));
        assert_eq!(known(Part::Step).len(), 32);
    }

    #[test]
    fn suggestions() {
        let step = &known(Part::Step);
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
