//! Templates someone else wrote cannot exhaust the machine: text, function calls and loop
//! iterations are budgeted, and exceeding a budget is a clear error at a line, quickly.

use std::time::{Duration, Instant};

use acr_task::task::{self, LoadOptions, RunInfo, Values};

fn load(text: &str) -> (Result<task::Task, task::Diagnostics>, Duration) {
    let run = RunInfo::placeholder(std::path::Path::new("acb.yaml"));
    let t0 = Instant::now();
    let r = task::load_str_with(
        "acb.yaml",
        text,
        &run,
        &Values::default(),
        &LoadOptions::default(),
    );
    (r, t0.elapsed())
}

fn refused(text: &str, want: &str, line: usize) {
    let (r, took) = load(text);
    let d = r.expect_err("a template over its budget was accepted");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let msg = d.to_string();
    assert!(msg.contains(want) && msg.contains("render budget"), "{msg}");
    assert_eq!(d.0[0].line, line, "{msg}");
}

#[test]
fn a_text_bomb_is_stopped_before_it_is_built() {
    // 100 KB, then 10,000 times that: a gigabyte if built.
    refused(
        "version: v1.1.0\nsteps:\n  - cmd: {{ $a := repeat 10000 \"xxxxxxxxxx\" }}{{ $b := repeat 10000 $a }}busybox echo {{ $b }}\n",
        "bytes",
        3,
    );
    // indent multiplies lines too.
    refused(
        "steps:\n  - cmd: busybox echo {{ repeat 10000 \"a\\n\" | repeat 300 | indent 1000 }}\n",
        "bytes",
        2,
    );
}

#[test]
fn nested_loops_are_stopped() {
    refused(
        "steps:\n{{- range splitList \",\" (repeat 1000 \"a,\") }}{{ range splitList \",\" (repeat 1000 \"b,\") }}{{ end }}{{ end }}\n  - cmd: busybox true\n",
        "loops run more than",
        2,
    );
}

#[test]
fn a_loop_that_prints_too_much_is_stopped() {
    refused(
        "steps:\n  - cmd: busybox echo {{ range splitList \",\" (repeat 9000 \"a,\") }}{{ repeat 1000 \"x\" }}{{ end }}\n",
        "bytes",
        2,
    );
}

#[test]
fn too_many_calls_are_stopped() {
    let calls = "{{ upper \"x\" }}".repeat(20);
    refused(
        &format!(
            "steps:\n  - cmd: busybox echo {{{{ range splitList \",\" (repeat 9000 \"a,\") }}}}{calls}{{{{ end }}}}\n"
        ),
        "call functions more than",
        2,
    );
}

#[test]
fn ordinary_templates_are_untouched() {
    let (r, _) = load(
        "steps:\n{{- range $i, $x := splitList \",\" \"a,b,c\" }}\n  - id: s{{ $i }}\n    cmd: busybox echo {{ $x | upper }}\n    when: [\"-\"]\n{{- end }}\n",
    );
    let t = r.unwrap();
    assert_eq!(t.steps.len(), 3);
    assert_eq!(t.steps[2].cmd.as_deref(), Some("busybox echo C"));
}
