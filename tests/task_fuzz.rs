//! Fuzzing render + parse + plan with proptest (runs in CI; `cargo fuzz` needs nightly).
//! Any input must give a task or diagnostics, never a panic. More cases:
//! `PROPTEST_CASES=20000 cargo test --release --test task_fuzz`.

use acr_task::plan::Plan;
use acr_task::task::{self, RunInfo, Values};
use proptest::prelude::*;

fn check(text: &str) {
    let mut values = Values::default();
    values.set("tag=v1").unwrap();
    let run = RunInfo {
        id: "ca1".into(),
        registry: "r:5000".into(),
        ..Default::default()
    };
    if let Ok(t) = task::load_str("fuzz.yaml", text, &run, &values) {
        // A task that loads must plan.
        let p = Plan::new(&t).unwrap();
        let _ = p.critical_path(|i| t.steps[i].effective_timeout(&t));
    }
}

const KEYS: &[&str] = &[
    "version",
    "alias",
    "values",
    "directive",
    "stepTimeout",
    "totalTimeout",
    "env",
    "secrets",
    "networks",
    "volumes",
    "steps",
    "id",
    "build",
    "cmd",
    "push",
    "when",
    "detach",
    "timeout",
    "retries",
    "volumeMounts",
    "name",
    "mountPath",
    "network",
    "cache",
    "ignoreErrors",
    "keep",
    "isDefault",
    "ignoreError",
    "<<",
    "-",
];
const VALUES: &[&str] = &[
    "v1.1.0",
    "v1.0.0",
    "busybox echo hi",
    "\"-\"",
    "[a, b]",
    "[\"-\"]",
    "0",
    "-1",
    "600",
    "true",
    "maybe",
    "$Registry/app:$ID",
    "{{.Run.ID}}",
    "{{.Values.tag}}",
    "{{.Values.nope}}",
    "{{ if",
    "{{end}}",
    "$$",
    "&a",
    "*a",
    "~",
    "{}",
    "[]",
    "'",
    "\"",
    "a: b",
    "- x",
    "\t",
    "{{ range .Values.tag }}",
    "{{ substr 5 1 \"ab\" }}",
    "{{ div 1 0 }}",
    "{{ repeat 99999999 \"x\" | len }}",
    "{{ b64dec \"%%%\" }}",
    "{{ indent -3 .Values.tag }}",
    "{{ .Secrets.s0 }}",
    "$$ID",
    "{{ printf \"%d\" 1 }}",
    "enabled",
    "host",
    "/mnt",
    "s0",
    "s1",
];

fn structured() -> impl Strategy<Value = String> {
    let line = (
        0usize..4,
        prop::sample::select(KEYS),
        prop::sample::select(VALUES),
        any::<bool>(),
    )
        .prop_map(|(indent, k, v, dash)| {
            format!(
                "{}{}{}: {}\n",
                "  ".repeat(indent),
                if dash { "- " } else { "" },
                k,
                v
            )
        });
    proptest::collection::vec(line, 0..30).prop_map(|l| l.concat())
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(s in any::<String>()) {
        check(&s);
    }

    #[test]
    fn yaml_like_text_never_panics(s in "[a-zA-Z0-9 :\\-\\[\\]{}$\"'#&*|>\n.]{0,200}") {
        check(&s);
    }

    #[test]
    fn structured_task_files_never_panic(s in structured()) {
        check(&s);
    }

    #[test]
    fn mutated_corpus_files_never_panic(idx in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), ins in "[ \n:\\-\\[{}$\"]{0,4}", cut in 0usize..10) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tasks/valid");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let text = std::fs::read_to_string(&files[idx.index(files.len())]).unwrap();
        let mut chars: Vec<char> = text.chars().collect();
        let p = at.index(chars.len().max(1)).min(chars.len());
        let end = (p + cut).min(chars.len());
        chars.splice(p..end, ins.chars());
        check(&chars.into_iter().collect::<String>());
    }
}
