//! `acr-task validate` and the `--dry-run` plan printer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::Output;
use crate::plan::Plan;
use crate::policy::Policy;
use crate::task::{self, Diagnostics, LoadOptions, RunInfo, StepKind, Task, Values};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  acr-task validate acb.yaml
  acr-task validate acb.yaml --values values.yaml --set env=prod -o json
  acr-task validate acb.yaml --policy /etc/acr-task/policy.yaml --strict")]
pub struct ValidateArgs {
    /// The task file.
    pub file: PathBuf,
    /// A YAML values file for `{{.Values.x}}`.
    #[arg(long)]
    pub values: Option<PathBuf>,
    /// Override a value: `--set key=value` (repeatable; later wins).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A secret's value: `--secret ID=VALUE`, or `--secret ID` to read the environment
    /// variable ID. Declared secrets without one render as `<secret:ID>`.
    #[arg(long = "secret", value_name = "ID[=VALUE]")]
    pub secrets: Vec<String>,
    /// Warnings (what ACR accepts but is likely a mistake: unknown fields, keys given
    /// twice, values that render empty) are errors.
    #[arg(long)]
    pub strict: bool,
    /// Also check the file against this sandbox policy (as `serve --policy` takes it),
    /// reporting what a server with it would refuse.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Output format: table (diagnostics as `file:line:column: message`) or json.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

/// The policy of `--policy FILE`, or the permissive one of a user's own machine.
pub fn policy_arg(path: Option<&Path>) -> Result<Policy, Diagnostics> {
    match path {
        Some(p) => Policy::from_file(p).map_err(|d| Diagnostics(vec![d])),
        None => Ok(Policy::permissive()),
    }
}

/// `--secret ID=VALUE` or `--secret ID` (the value from the environment variable ID).
pub fn parse_secrets(
    args: &[String],
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for a in args {
        let (id, value) = match a.split_once('=') {
            Some((id, v)) => (id.to_string(), v.to_string()),
            None => {
                let v = std::env::var(a)
                    .map_err(|_| format!("--secret {a}: environment variable {a} is not set"))?;
                (a.clone(), v)
            }
        };
        out.insert(id, value);
    }
    Ok(out)
}

pub fn validate(args: ValidateArgs) -> ExitCode {
    let run = RunInfo::placeholder(&args.file);
    let secrets = match parse_secrets(&args.secrets) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let options = LoadOptions {
        strict: args.strict,
        secrets,
        ..LoadOptions::default()
    };
    let policy = match policy_arg(args.policy.as_deref()) {
        Ok(p) => p,
        Err(d) => {
            print_diagnostics(&d, args.output);
            return ExitCode::from(2);
        }
    };
    match load(
        &args.file,
        args.values.as_deref(),
        &args.set,
        &run,
        &options,
        &policy,
    ) {
        Ok((loaded, plan)) => {
            if args.output == Output::Json {
                print_report(true, &loaded.warnings);
            } else {
                print_warnings(&loaded.warnings);
                let n = loaded.warnings.len();
                println!(
                    "valid: {} steps, {} levels{}",
                    loaded.task.steps.len(),
                    plan.levels().len(),
                    match n {
                        0 => String::new(),
                        1 => ", 1 warning".into(),
                        n => format!(", {n} warnings"),
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(d) => {
            if args.output == Output::Json {
                print_report(false, &d.0);
            } else {
                print_diagnostics(&d, args.output);
            }
            ExitCode::FAILURE
        }
    }
}

/// `validate -o json`: `{"valid": .., "errors": [..], "warnings": [..]}`.
fn print_report(valid: bool, diags: &[task::Diagnostic]) {
    let (warnings, errors): (Vec<_>, Vec<_>) = diags.iter().partition(|d| d.is_warning());
    let v = serde_json::json!({"valid": valid, "errors": errors, "warnings": warnings});
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// Warnings on stderr, one `file:line:column: warning: message` per line.
pub fn print_warnings(warnings: &[task::Diagnostic]) {
    for w in warnings {
        eprintln!("{w}");
    }
}

/// Reads values (file, then each `--set` in order), then loads and plans the task file and
/// checks it against `policy` (also what would only fail when it runs: docker flags in
/// `cmd` that acr-task does not know, and what the policy forbids).
pub fn load(
    file: &Path,
    values: Option<&Path>,
    set: &[String],
    run: &RunInfo,
    options: &LoadOptions,
    policy: &Policy,
) -> Result<(task::Loaded, Plan), Diagnostics> {
    let mut vals = match values {
        Some(p) => Values::from_file(p)?,
        None => Values::default(),
    };
    for s in set {
        vals.set(s)
            .map_err(|m| Diagnostics(vec![task::Diagnostic::new("--set", 0, 0, m)]))?;
    }
    let text = task::read_text(file)?;
    let loaded = task::load_str_checked(
        &file.display().to_string(),
        &text,
        run,
        &vals,
        options,
        &|t| crate::policy::check_task(policy, t),
    )?;
    // load_file has already reported every plan problem, so this cannot fail; keep the
    // error path anyway rather than trusting that.
    let plan = Plan::new(&loaded.task).map_err(|e| {
        Diagnostics(vec![task::Diagnostic::new(
            &file.display().to_string(),
            0,
            0,
            e.to_string(),
        )])
    })?;
    Ok((loaded, plan))
}

/// Diagnostics: one `file:line:column: message` per line on stderr, or a JSON array on
/// stdout with `--output json`.
pub fn print_diagnostics(d: &Diagnostics, output: Output) {
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&d.0).unwrap_or_else(|_| "[]".into())
        );
    } else {
        for diag in &d.0 {
            eprintln!("{diag}");
        }
    }
}

/// `acr-task run FILE --dry-run`: loads, plans and prints the plan without Docker.
pub fn dry_run(
    file: &Path,
    values: Option<&Path>,
    set: &[String],
    run: &RunInfo,
    options: &LoadOptions,
    policy: &Policy,
    output: Output,
) -> ExitCode {
    match load(file, values, set, run, options, policy) {
        Ok((loaded, plan)) => {
            print_warnings(&loaded.warnings);
            print_plan(&loaded.task, &plan, output)
        }
        Err(d) => {
            print_diagnostics(&d, output);
            ExitCode::FAILURE
        }
    }
}

/// Prints the plan: levels with each step's dependencies and the critical path (weighted
/// by step timeouts) as a table, as JSON, or as Graphviz (`dot`).
pub fn print_plan(task: &Task, plan: &Plan, output: Output) -> ExitCode {
    let text = match output {
        Output::Json => {
            let mut v = plan_json(task, plan);
            if let Some(o) = v.as_object_mut() {
                o.insert("version".into(), task.version.clone().into());
            }
            serde_json::to_string_pretty(&v).unwrap_or_default()
        }
        Output::Dot => plan_dot(task, plan),
        Output::Table | Output::Tsv => plan_table(task, plan),
    };
    println!("{}", text.trim_end());
    ExitCode::SUCCESS
}

fn kind(task: &Task, i: usize) -> (&'static str, String) {
    match task.steps[i].kind() {
        Some(StepKind::Build(b)) => ("build", b.to_string()),
        Some(StepKind::Cmd(c)) => ("cmd", c.to_string()),
        Some(StepKind::Push(p)) => ("push", p.join(" ")),
        None => ("?", String::new()),
    }
}

fn ids(task: &Task, steps: &[usize]) -> Vec<String> {
    steps.iter().map(|&i| task.steps[i].id.clone()).collect()
}

fn critical(task: &Task, plan: &Plan) -> (Vec<usize>, u64) {
    plan.critical_path(|i| task.steps[i].effective_timeout(task))
}

/// The plan as JSON (steps in file order, levels and critical path by id).
pub fn plan_json(task: &Task, plan: &Plan) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = (0..plan.len())
        .map(|i| {
            let s = &task.steps[i];
            let (k, what) = kind(task, i);
            serde_json::json!({
                "id": s.id,
                "kind": k,
                "what": what,
                "level": plan.level_of(i),
                "waitsFor": ids(task, plan.deps(i)),
                "timeout": s.effective_timeout(task),
                "detach": s.detach,
            })
        })
        .collect();
    let levels: Vec<Vec<String>> = plan.levels().iter().map(|l| ids(task, l)).collect();
    let (path, total) = critical(task, plan);
    serde_json::json!({
        "steps": steps,
        "levels": levels,
        "criticalPath": { "steps": ids(task, &path), "timeoutSeconds": total },
    })
}

/// The plan as a human-readable table: levels, each step's action and what it waits for,
/// and the critical path.
pub fn plan_table(task: &Task, plan: &Plan) -> String {
    let mut out = String::new();
    let width = task
        .steps
        .iter()
        .map(|s| s.id.len())
        .max()
        .unwrap_or(2)
        .max(2);
    let _ = writeln!(
        out,
        "{} steps, {} levels, version {}",
        plan.len(),
        plan.levels().len(),
        task.version
    );
    for (l, level) in plan.levels().iter().enumerate() {
        let _ = writeln!(out, "level {l}:");
        for &i in level {
            let (k, what) = kind(task, i);
            let deps = ids(task, plan.deps(i));
            let waits = if deps.is_empty() {
                "-".to_string()
            } else {
                deps.join(", ")
            };
            let detach = if task.steps[i].detach {
                " (detached)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:width$}  {:5}  {}{}  [waits for: {}]",
                task.steps[i].id, k, what, detach, waits,
            );
        }
    }
    let (path, total) = critical(task, plan);
    let _ = writeln!(
        out,
        "critical path (by timeout, {total} s): {}",
        ids(task, &path).join(" -> ")
    );
    out
}

fn dot_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The plan as a Graphviz digraph: an edge `a -> b` means `b` waits for `a`; the
/// critical path is drawn bold.
pub fn plan_dot(task: &Task, plan: &Plan) -> String {
    let (path, _) = critical(task, plan);
    let on_path = |i: usize| path.contains(&i);
    let mut out = String::from("digraph acb {\n  rankdir=LR;\n  node [shape=box];\n");
    for i in 0..plan.len() {
        let (k, _) = kind(task, i);
        let label = format!("{}\n{}", task.steps[i].id, k);
        let style = if on_path(i) { ", style=bold" } else { "" };
        let _ = writeln!(
            out,
            "  {} [label={}{}];",
            dot_quote(&task.steps[i].id),
            dot_quote(&label),
            style
        );
    }
    for i in 0..plan.len() {
        for &d in plan.deps(i) {
            let bold = on_path(i) && on_path(d) && path.windows(2).any(|w| w == [d, i]);
            let _ = writeln!(
                out,
                "  {} -> {}{};",
                dot_quote(&task.steps[d].id),
                dot_quote(&task.steps[i].id),
                if bold { " [style=bold]" } else { "" }
            );
        }
    }
    out.push_str("}\n");
    out
}
