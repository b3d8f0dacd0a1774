//! Every probe file gives ACR's own runner's verdict (`tests/data/acb-probes/PROBES.tsv`,
//! from acr-builder's parser run on each): valid files load, with the steps acb made of
//! them (id, kind, rendered command, and the attributes acb printed); invalid ones are
//! refused. Where acr-task deliberately differs, [`DELIBERATE`] says so and why.

use std::path::{Path, PathBuf};

use acr_task::cli::validate;
use acr_task::plan::Plan;
use acr_task::policy::Policy;
use acr_task::task::{LoadOptions, RunInfo, StepKind, Task};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/acb-probes")
}

/// Probes where acr-task gives another answer than acb on purpose.
const DELIBERATE: &[(&str, &str)] = &[
    (
        "nets_noname.yaml",
        "a network without a name fails when acb runs it (`docker network create` needs one); \
         acr-task says so when the file is checked",
    ),
    (
        "setv.yaml",
        "acb fails every render of a values file with a nested map (a bug in its .ValuesJSON); \
         acr-task renders it",
    ),
    (
        "cache_upper.yaml",
        "acb turns `cache: enabled` into a buildx build with a registry cache; acr-task builds \
         with the engine's own cache and leaves the command as written",
    ),
    (
        "nets_nodefault.yaml",
        "with networks declared and none the default, acb leaves steps on Docker's shared \
         bridge; acr-task gives them the run's own network",
    ),
    (
        "dupwhen.yaml",
        "acb counts `when: [a, a]` twice and the step never starts (the run hangs); acr-task \
         waits for `a` once",
    ),
    (
        "alias_cases.yaml",
        "the `acr` image alias is an image carrying acr-task itself (acb's acr-cli image cannot \
         be pulled here and would not know this registry)",
    ),
];

/// What acb printed for one step: `ID[KIND attrs] TEXT attrs`.
#[derive(Debug)]
struct AcbStep {
    id: String,
    kind: String,
    attrs: Vec<(String, String)>,
    text: String,
}

fn parse_steps(result: &str) -> (Vec<String>, Vec<AcbStep>) {
    let (head, steps) = result.split_once(" | ").unwrap_or((result, ""));
    let roots = head
        .split_whitespace()
        .find_map(|w| w.strip_prefix("roots="))
        .map(|r| {
            r.split(',')
                .filter(|r| *r != "-")
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if steps == "(no steps)" {
        return (roots, Vec::new());
    }
    let steps = steps
        .split("; ")
        .map(|s| {
            let (id, rest) = s.split_once('[').unwrap();
            let (inside, text) = rest
                .split_once("] ")
                .unwrap_or((rest.trim_end_matches(']'), ""));
            let mut words = inside.split(' ');
            let kind = words.next().unwrap().to_string();
            let mut attrs: Vec<(String, String)> = words
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            // `env=`, `timeout=`, `retryDelay=`, `workdir=` come after the text.
            let mut text = text.to_string();
            while let Some((before, last)) = text.rsplit_once(' ') {
                match last.split_once('=') {
                    Some((k, v)) if ["env", "timeout", "retryDelay", "workdir"].contains(&k) => {
                        attrs.push((k.to_string(), v.to_string()));
                        text = before.to_string();
                    }
                    _ => break,
                }
            }
            AcbStep {
                id: id.to_string(),
                kind,
                attrs,
                text,
            }
        })
        .collect();
    (roots, steps)
}

/// What acb would print of our step: its command as one line (`\n` for newlines).
fn our_text(task: &Task, i: usize) -> String {
    let s = &task.steps[i];
    let t = match s.kind() {
        Some(StepKind::Cmd(c)) => c.to_string(),
        Some(StepKind::Build(b)) => b.to_string(),
        Some(StepKind::Push(p)) => p.join(" "),
        None => String::new(),
    };
    t.replace('\n', "\\n")
}

fn our_attr(task: &Task, i: usize, key: &str) -> String {
    let s = &task.steps[i];
    match key {
        "when" => s.when.clone().unwrap_or_default().join(","),
        "timeout" => s.effective_timeout(task).to_string(),
        "retryDelay" => s.retry_delay.to_string(),
        "workdir" => s.working_directory.clone().unwrap_or_default(),
        "env" => {
            // Step entries first, then the task's it does not override (acb's merge).
            let keys: Vec<&str> = s.env.iter().map(|e| e.split('=').next().unwrap()).collect();
            let mut env = s.env.clone();
            env.extend(
                task.env
                    .iter()
                    .filter(|e| !keys.contains(&e.split('=').next().unwrap()))
                    .cloned(),
            );
            env.join(",")
        }
        "net" => match &s.network {
            Some(n) => n.clone(),
            None => task
                .networks
                .iter()
                .rev()
                .find(|n| n.is_default)
                .map(|n| n.name.clone())
                .unwrap_or_default(),
        },
        other => panic!("unknown acb attribute {other}"),
    }
}

fn run_info() -> RunInfo {
    RunInfo {
        id: "cf1".into(),
        registry: "myregistry.azurecr.io".into(),
        registry_name: "myregistry".into(),
        date: "20240102-030405z".into(),
        os: "linux".into(),
        architecture: "amd64".into(),
        commit: "0123456789abcdef".into(),
        branch: "main".into(),
        task_name: String::new(),
        shared_volume: "acb_shared_volume".into(),
    }
}

#[test]
fn every_probe_gets_acbs_verdict() {
    let table = std::fs::read_to_string(dir().join("PROBES.tsv")).unwrap();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for row in table.lines().skip(1) {
        let cols: Vec<&str> = row.splitn(4, '\t').collect();
        let (file, flags, verdict, result) = (cols[0], cols[1], cols[2], cols[3]);
        if DELIBERATE.iter().any(|(f, _)| *f == file) {
            continue;
        }
        checked += 1;
        let mut values = None;
        let mut set = Vec::new();
        let mut words = flags.split_whitespace();
        while let Some(w) = words.next() {
            match w {
                "--set" => set.push(words.next().unwrap().to_string()),
                "--values" => values = Some(dir().join(words.next().unwrap())),
                _ => {}
            }
        }
        let loaded = validate::load(
            &dir().join(file),
            values.as_deref(),
            &set,
            &run_info(),
            &LoadOptions::default(),
            &Policy::permissive(),
        );
        match (verdict, loaded) {
            ("invalid", Ok(_)) => wrong.push(format!(
                "{file}: acb refuses it ({result}); acr-task accepts it"
            )),
            ("invalid", Err(_)) => {}
            (_, Err(d)) => wrong.push(format!("{file}: acb accepts it; acr-task says:\n{d}")),
            (_, Ok((task, plan))) => {
                let (roots, steps) = parse_steps(result);
                compare(file, &task.task, &plan, &roots, &steps, &mut wrong);
            }
        }
    }
    assert!(checked > 50, "{checked} probes");
    assert!(
        wrong.is_empty(),
        "{} of {checked} probes differ from acb:\n\n{}",
        wrong.len(),
        wrong.join("\n\n")
    );
}

fn compare(
    file: &str,
    task: &Task,
    plan: &Plan,
    roots: &[String],
    steps: &[AcbStep],
    wrong: &mut Vec<String>,
) {
    if task.steps.len() != steps.len() {
        wrong.push(format!(
            "{file}: acb made {} steps, acr-task {}",
            steps.len(),
            task.steps.len()
        ));
        return;
    }
    let ours: Vec<String> = plan
        .roots()
        .iter()
        .map(|&i| task.steps[i].id.clone())
        .collect();
    if ours != roots {
        wrong.push(format!("{file}: roots {ours:?}, acb {roots:?}"));
    }
    for (i, want) in steps.iter().enumerate() {
        let s = &task.steps[i];
        let kind = match s.kind() {
            Some(StepKind::Cmd(_)) => "cmd",
            Some(StepKind::Build(_)) => "build",
            Some(StepKind::Push(_)) => "push",
            None => "none",
        };
        let text = our_text(task, i);
        // acb's printout is cut short on long lines: compare what it shows.
        let same_text = if want.text.len() >= 100 {
            text.starts_with(&want.text)
        } else {
            text == want.text
        };
        if s.id != want.id || kind != want.kind || !same_text {
            wrong.push(format!(
                "{file}: step {i} is {}[{kind}] {text:?}; acb: {}[{}] {:?}",
                s.id, want.id, want.kind, want.text
            ));
        }
        for (k, v) in &want.attrs {
            let got = our_attr(task, i, k);
            if &got != v {
                wrong.push(format!("{file}: step {} {k}={got:?}; acb {k}={v:?}", s.id));
            }
        }
    }
}

#[test]
fn the_deliberate_differences_are_still_differences() {
    // If acr-task came to agree with acb on one of them, it belongs in the main test.
    for (file, why) in DELIBERATE {
        assert!(dir().join(file).exists(), "{file}: {why}");
    }
}
