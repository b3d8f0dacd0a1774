//! Property-based fuzzing (proptest, on stable; more cases with `PROPTEST_CASES=20000
//! cargo test --release --test fuzz_inputs`) of what reaches the server from outside:
//! templates under their budgets, git webhook payloads, Dockerfiles, and the docker flags
//! of a `cmd`. Any input gives a result or an error: never a panic, never a hang, never
//! more than the budget of text. (The manifest parser is fuzzed beside its code in
//! `registry::manifests`.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use acr_task::task::{self, LoadOptions, RenderBudget, RunInfo, Values};
use acr_task::triggers::webhook::{self, Provider};
use proptest::prelude::*;

/// Pieces templates are made of, the expensive ones included.
const FRAGMENTS: &[&str] = &[
    "{{",
    "}}",
    "{{-",
    "-}}",
    " range ",
    " end ",
    " if ",
    " else ",
    " with ",
    "$x := ",
    "$x",
    ".Values.a",
    ".Values.list",
    ".Run.ID",
    " | ",
    "repeat 10000 ",
    "repeat 300 ",
    "\"ab,\"",
    "splitList \",\" ",
    "indent 1000 ",
    "nindent 9 ",
    "upper ",
    "default \"d\" ",
    "printf \"%999999d\" 1",
    "(",
    ")",
    " ",
    "\n",
    "steps:\n  - cmd: busybox echo ",
    "define \"t\"",
    "template \"t\" .",
    "toJson ",
    "b64enc ",
    "b64dec ",
    "join \",\" ",
    "list 1 2 3",
    "index .Values \"a\"",
];

fn template() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40).prop_map(|v| v.concat())
}

proptest! {

    #[test]
    fn templates_stay_within_their_budget(text in template()) {
        let mut values = Values::default();
        values.set("a=1").unwrap();
        let run = RunInfo::placeholder(std::path::Path::new("f.yaml"));
        let budget = RenderBudget {
            max_output: 256 * 1024,
            max_time: Duration::from_secs(2),
            ..RenderBudget::default()
        };
        let options = LoadOptions { budget, ..LoadOptions::default() };
        let t0 = Instant::now();
        let r = task::load_str_with("f.yaml", &text, &run, &values, &options);
        prop_assert!(t0.elapsed() < Duration::from_secs(4), "took {:?}", t0.elapsed());
        if let Ok(t) = r {
            let size: usize = t.steps.iter().map(|s| s.cmd.as_deref().map_or(0, str::len)).sum();
            prop_assert!(size <= budget.max_output);
        }
    }

    #[test]
    fn webhook_payloads_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..400),
        json_ref in "(refs/heads/)?[a-z/]{0,12}",
        after in "[0-9a-fA-F]{0,44}",
        event in prop::sample::select(vec!["push", "Push Hook", "ping", ""]),
    ) {
        let mut h = axum::http::HeaderMap::new();
        for name in ["x-github-event", "x-gitlab-event", "x-gitea-event"] {
            if let Ok(v) = event.parse() {
                h.insert(name, v);
            }
        }
        let shaped = serde_json::json!({"ref": json_ref, "after": after, "checkout_sha": after}).to_string();
        for p in [Provider::GitHub, Provider::GitLab, Provider::Gitea, Provider::Generic] {
            let _ = webhook::verify(p, &h, &body, "secret");
            let _ = webhook::parse(p, &h, &body);
            let _ = webhook::parse(p, &h, shaped.as_bytes());
            let _ = webhook::delivery_id(p, &h);
        }
    }

    #[test]
    fn dockerfiles_never_panic(
        lines in prop::collection::vec(
            prop::sample::select(vec![
                "FROM ", "FROM --platform=$BUILDPLATFORM ", "ARG ", "AS ", "${", "}", "$", "base",
                "busybox:1", "=", " ", "\\\n", "\n", "# comment\n", "RUN <<EOF\n", "EOF\n",
                "scratch", "${A:-x}", "${A:+y}", "stage", "\t",
            ]),
            0..40,
        ),
    ) {
        let text = lines.concat();
        let args = BTreeMap::from([("A".to_string(), "x".to_string())]);
        let bases = acr_task::dockerfile::base_images(&text, &args);
        prop_assert!(bases.len() <= text.matches("FROM").count());
    }

    #[test]
    fn cmd_lines_never_panic(words in prop::collection::vec(
        prop::sample::select(vec![
            "-e", "A=B", "-it", "-eX=1", "--cpus", "1.5", "lots", "-m", "512m", "--memory=1g",
            "-v", "/:/host", "--privileged", "--privileged=false", "--network", "host", "--pid",
            "-p", "80:80", "--frobnicate", "-d", "--name", "x", "busybox", "echo", "'", "\"", "\\",
        ]),
        0..12,
    )) {
        let line = words.join(" ");
        if let Ok(c) = acr_task::task::args::parse_cmd_line(&line) {
            prop_assert!(!c.image.is_empty() || line.trim().is_empty());
        }
    }
}
