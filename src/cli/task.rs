//! `acr-task serve` (the task service) and `acr-task task ...`, a client of its HTTP API
//! in the style of `az acr task`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::Value;

use super::client::{api_message, Client};
use super::registry::{print_deleted, print_json};
use super::Output;
use crate::server::model::{CommitTrigger, TaskSpec, TimerTrigger};

pub(super) const DEFAULT_SERVER: &str = "http://127.0.0.1:5000";

#[derive(Debug, clap::Args)]
pub struct ClientOpts {
    /// The `acr-task serve` to talk to.
    #[arg(long, global = true, env = "ACR_TASK_SERVER", default_value = DEFAULT_SERVER)]
    pub(super) server: String,
    /// Output format: table or json.
    #[arg(long, short = 'o', global = true, default_value = "table", value_parser = super::table_or_json)]
    pub(super) output: Output,
}

#[derive(Debug, clap::Args)]
pub struct TaskDef {
    /// Build context: a local directory, a git URL, or `/dev/null` for none (a task of
    /// `--cmd`, or an inline file that needs no files).
    #[arg(long, short = 'c')]
    context: Option<String>,
    /// A quick task of one command, `IMAGE [ARGS...]`, instead of a task file.
    #[arg(long, value_name = "'IMAGE ARGS'", conflicts_with_all = ["file", "inline", "image"])]
    cmd: Option<String>,
    /// A quick task that builds the context's Dockerfile and pushes it as this image
    /// (repeatable; relative to the registry; `{{.Run.ID}}` is rendered), as `az acr task
    /// create --image`.
    #[arg(long, value_name = "NAME:TAG", conflicts_with_all = ["file", "inline"])]
    image: Vec<String>,
    /// With --image: the Dockerfile, relative to the context [default: Dockerfile].
    #[arg(long, requires = "image")]
    dockerfile: Option<String>,
    /// Task file path inside the context [default: acb.yaml].
    #[arg(long, short = 'f')]
    file: Option<String>,
    /// A local task file whose text is stored with the task (instead of --file).
    #[arg(long, conflicts_with = "file")]
    inline: Option<PathBuf>,
    /// Branch of a git context, and the branch commit triggers follow [default: main].
    #[arg(long)]
    branch: Option<String>,
    /// A local values file (YAML), stored with the task.
    #[arg(long)]
    values: Option<PathBuf>,
    /// Value override `key=value` (repeatable; replaces the stored list).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Secret reference `NAME=env:VAR` or `NAME=file:/path`, resolved on the server when a run
    /// starts and given to `{{.Secrets.NAME}}` (repeatable).
    #[arg(long = "secret", value_name = "NAME=REF")]
    secrets: Vec<String>,
    /// Webhook secret; enables the commit trigger.
    #[arg(long)]
    commit_secret: Option<String>,
    /// Poll the git context's branch every N seconds (commit trigger).
    #[arg(long, value_name = "SECONDS")]
    poll_interval: Option<u64>,
    /// Watch the local context's branch for commits (commit trigger).
    #[arg(long)]
    watch: bool,
    /// Cron timer `NAME=MIN HOUR DOM MON DOW` or just the expression (repeatable).
    #[arg(long = "timer", value_name = "[NAME=]CRON")]
    timers: Vec<String>,
    /// Do not rebuild when a base image changes in the registry (as
    /// `--base-image-trigger-enabled false`).
    #[arg(long)]
    no_base_image_trigger: bool,
    /// Rebuild when a base image changes in the registry [default: true].
    #[arg(long, value_name = "BOOL")]
    base_image_trigger_enabled: Option<bool>,
    /// `false` removes the commit trigger (webhooks, polling, watching); `true` needs
    /// --commit-secret, --poll-interval or --watch.
    #[arg(long, value_name = "BOOL")]
    commit_trigger_enabled: Option<bool>,
    /// Whole-run timeout in seconds [default: 3600].
    #[arg(long)]
    timeout: Option<u64>,
    /// Target platform `os/arch[/variant]` of every build and container (e.g. linux/arm64);
    /// sets `.Run.OS` and `.Run.Architecture` [default: the engine's].
    #[arg(long)]
    platform: Option<crate::task::Platform>,
    /// Sign what push steps push with the PEM private key this secret reference names
    /// (`env:VAR` or `file:/path`, resolved on the server when a run starts).
    #[arg(long, value_name = "REF")]
    signing_key: Option<String>,
    /// Run on the agents of this pool (`acr-task agent --pool NAME`) instead of on the
    /// server; `""` runs on the server again (as `az acr task create --agent-pool`).
    #[arg(long, value_name = "NAME")]
    agent_pool: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum TaskCmd {
    /// Store a task (refused, with the validation messages, if its file is invalid).
    #[command(
        after_help = "Examples:\n  acr-task task create hello --context \"$PWD/examples/build-and-push\" --timer '0 3 * * *'\n  acr-task task create lint --cmd 'busybox echo {{.Run.ID}}' --context /dev/null\n  acr-task task create app --context https://github.com/org/app.git --branch main --commit-secret \"$S\""
    )]
    Create {
        /// The task's name.
        name: String,
        #[command(flatten)]
        def: TaskDef,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Change a stored task: the options given replace the stored ones.
    #[command(
        after_help = "Example:\n  acr-task task update hello --base-image-trigger-enabled false"
    )]
    Update {
        /// The task's name.
        name: String,
        #[command(flatten)]
        def: TaskDef,
        #[command(flatten)]
        opts: ClientOpts,
    },
    #[command(after_help = "Example:\n  acr-task task list -o json")]
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
    #[command(after_help = "Example:\n  acr-task task show hello")]
    Show {
        /// The task's name.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    #[command(after_help = "Example:\n  acr-task task delete hello")]
    Delete {
        /// The task's name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Queue a run; with --follow, stream its log and exit non-zero if it fails.
    #[command(after_help = "Example:\n  acr-task task run hello --follow")]
    Run {
        /// The task's name.
        name: String,
        /// Build this commit of a git context.
        #[arg(long)]
        commit: Option<String>,
        /// Keep printing the log as the run goes, until it ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Print a run's log, or a task's latest run's (`task logs NAME`); --follow streams it
    /// until the run ends.
    #[command(
        after_help = "Examples:\n  acr-task task logs hello          # its latest run\n  acr-task task logs cab12 --follow"
    )]
    Logs {
        /// A run id or a task name.
        #[arg(value_name = "RUN|TASK")]
        run: String,
        /// Keep printing the log as the run goes, until it ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    #[command(after_help = "Example:\n  acr-task task list-runs --task hello --top 5")]
    ListRuns {
        /// Only this task's runs.
        #[arg(long)]
        task: Option<String>,
        /// Most runs listed (newest first).
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[command(flatten)]
        opts: ClientOpts,
    },
    #[command(after_help = "Example:\n  acr-task task show-run cab12 -o json")]
    ShowRun {
        /// The run's id.
        run: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    #[command(after_help = "Example:\n  acr-task task cancel-run cab12")]
    CancelRun {
        /// The run's id.
        run: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Logins for other registries a task's runs pull from or push to (`az acr task
    /// credential`).
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// A task's timer triggers (`az acr task timer`).
    #[command(subcommand)]
    Timer(TimerCmd),
}

#[derive(Debug, clap::Subcommand)]
pub enum TimerCmd {
    /// Add a timer.
    #[command(
        after_help = "Example:\n  acr-task task timer add app --timer-name nightly --schedule '0 3 * * *'"
    )]
    Add {
        /// The task.
        name: String,
        /// The timer's name.
        #[arg(long)]
        timer_name: String,
        /// 5-field cron expression, UTC.
        #[arg(long)]
        schedule: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Change a timer's schedule.
    #[command(
        after_help = "Example:\n  acr-task task timer update app --timer-name nightly --schedule '30 4 * * *'"
    )]
    Update {
        /// The task.
        name: String,
        /// The timer's name.
        #[arg(long)]
        timer_name: String,
        /// 5-field cron expression, UTC.
        #[arg(long)]
        schedule: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Remove a timer.
    #[command(after_help = "Example:\n  acr-task task timer remove app --timer-name nightly")]
    Remove {
        /// The task.
        name: String,
        /// The timer's name.
        #[arg(long)]
        timer_name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List a task's timers.
    #[command(after_help = "Example:\n  acr-task task timer list app")]
    List {
        /// The task.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum CredentialCmd {
    /// Add a login for a registry.
    #[command(
        after_help = "Example:\n  acr-task task credential add app --login-server \
        other.example.com --username builder --password env:OTHER_PASSWORD"
    )]
    Add {
        /// The task.
        name: String,
        #[command(flatten)]
        login: CredentialLogin,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Change a registry's login.
    #[command(
        after_help = "Example:\n  acr-task task credential update app --login-server other.example.com -u builder -p file:/etc/acr-task/secrets/other"
    )]
    Update {
        /// The task.
        name: String,
        #[command(flatten)]
        login: CredentialLogin,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List a task's logins (login servers and user names; passwords are references).
    #[command(after_help = "Example:\n  acr-task task credential list app")]
    List {
        /// The task.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Remove a registry's login.
    #[command(
        after_help = "Example:\n  acr-task task credential remove app --login-server other.example.com"
    )]
    Remove {
        /// The task.
        name: String,
        /// The registry host (`HOST[:PORT]`).
        #[arg(long)]
        login_server: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Debug, clap::Args)]
pub struct CredentialLogin {
    /// The registry host (`HOST[:PORT]`).
    #[arg(long)]
    login_server: String,
    /// The user name: plain text, or a secret reference (`env:VAR`, `file:/path`).
    #[arg(long, short = 'u')]
    username: String,
    /// A secret reference (`env:VAR` or `file:/path`) resolved on the server when a run
    /// starts; the password itself is never stored.
    #[arg(long, short = 'p')]
    password: String,
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn pairs(items: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for i in items {
        let (k, v) = i
            .split_once('=')
            .with_context(|| format!("{what} {i:?}: expected NAME=VALUE"))?;
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

/// Applies the options given to `spec` (all of them for create).
fn apply(spec: &mut TaskSpec, def: TaskDef) -> anyhow::Result<()> {
    if let Some(p) = &def.agent_pool {
        spec.agent_pool = (!p.is_empty()).then(|| p.clone());
    }
    if let Some(c) = def.context {
        // A relative local directory is made absolute here: the server resolves nothing
        // against the client's working directory.
        spec.context = if c == "/dev/null" {
            String::new()
        } else if crate::source::is_git_url(&c) {
            c
        } else {
            std::fs::canonicalize(&c)
                .with_context(|| format!("context {c}"))?
                .display()
                .to_string()
        };
    }
    if let Some(f) = def.file {
        spec.file = Some(f);
        spec.task_yaml = None;
    }
    if let Some(p) = def.inline {
        spec.task_yaml = Some(read(&p)?);
        spec.file = None;
    }
    if let Some(cmd) = &def.cmd {
        spec.task_yaml = Some(super::run::cmd_task(cmd)?);
        spec.file = None;
    }
    if !def.image.is_empty() {
        spec.task_yaml = Some(super::run::quick_build_yaml(
            &def.image,
            def.dockerfile.as_deref(),
        )?);
        spec.file = None;
    }
    if def.branch.is_some() {
        spec.branch = def.branch;
    }
    if let Some(v) = def.values {
        spec.values = Some(read(&v)?);
    }
    if !def.set.is_empty() {
        spec.set = def.set;
    }
    if !def.secrets.is_empty() {
        spec.secrets = pairs(&def.secrets, "--secret")?;
    }
    if def.commit_secret.is_some() || def.poll_interval.is_some() || def.watch {
        let c = spec
            .triggers
            .commit
            .get_or_insert_with(CommitTrigger::default);
        if def.commit_secret.is_some() {
            c.secret = def.commit_secret;
        }
        if def.poll_interval.is_some() {
            c.poll_interval = def.poll_interval;
        }
        c.watch |= def.watch;
    }
    if !def.timers.is_empty() {
        spec.triggers.timers = def
            .timers
            .iter()
            .enumerate()
            .map(|(i, t)| match t.split_once('=') {
                Some((n, c)) => TimerTrigger {
                    name: n.trim().to_string(),
                    schedule: c.trim().to_string(),
                },
                None => TimerTrigger {
                    name: format!("t{}", i + 1),
                    schedule: t.trim().to_string(),
                },
            })
            .collect();
    }
    if def.no_base_image_trigger {
        spec.triggers.base_image = false;
    }
    if let Some(on) = def.base_image_trigger_enabled {
        spec.triggers.base_image = on;
    }
    match def.commit_trigger_enabled {
        Some(false) => spec.triggers.commit = None,
        Some(true) if spec.triggers.commit.is_none() => bail!(
            "--commit-trigger-enabled true needs a way to hear of commits: --commit-secret \
             (webhooks), --poll-interval or --watch"
        ),
        _ => {}
    }
    if spec.task_yaml.is_none() && spec.context.is_empty() {
        bail!(
            "a task without a context needs its task file inline (--inline FILE) or a quick \
             task (--cmd, --image)"
        );
    }
    if def.timeout.is_some() {
        spec.timeout = def.timeout;
    }
    if let Some(p) = def.platform {
        spec.platform = Some(p.to_string());
    }
    if def.signing_key.is_some() {
        spec.signing_key = def.signing_key;
    }
    Ok(())
}

/// A stored task's definition, as the server has it.
async fn stored_task(c: &Client, name: &str) -> anyhow::Result<TaskSpec> {
    let current = c
        .call(reqwest::Method::GET, &format!("/api/tasks/{name}"), None)
        .await?;
    serde_json::from_value(current).context("the stored task")
}

/// Stores a changed definition back; the server's answer (with the file's warnings).
async fn store_task(c: &Client, spec: &TaskSpec) -> anyhow::Result<Value> {
    c.call(
        reqwest::Method::PUT,
        &format!("/api/tasks/{}", spec.name),
        Some(&serde_json::to_value(spec)?),
    )
    .await
}

/// `task timer ...`: read the task, change its timers, store it back (the server checks
/// the schedule).
async fn timer(cmd: TimerCmd) -> anyhow::Result<()> {
    let (name, opts) = match &cmd {
        TimerCmd::Add { name, opts, .. }
        | TimerCmd::Update { name, opts, .. }
        | TimerCmd::Remove { name, opts, .. }
        | TimerCmd::List { name, opts } => (name.clone(), opts),
    };
    let output = opts.output;
    let c = Client::new(&opts.server);
    let mut spec = stored_task(&c, &name).await?;
    let timers = &mut spec.triggers.timers;
    let (timer, message) = match cmd {
        TimerCmd::List { .. } => {
            if output == Output::Json {
                return print_json(&serde_json::to_value(&*timers)?);
            }
            let rows: Vec<Vec<String>> = timers
                .iter()
                .map(|t| vec![t.name.clone(), t.schedule.clone()])
                .collect();
            table(&["TIMER", "SCHEDULE (UTC)"], &rows);
            return Ok(());
        }
        TimerCmd::Add {
            timer_name,
            schedule,
            ..
        } => {
            if timers.iter().any(|t| t.name == timer_name) {
                bail!("task {name} already has a timer {timer_name}; change it with `acr-task task timer update`");
            }
            timers.push(TimerTrigger {
                name: timer_name.clone(),
                schedule,
            });
            (timer_name, "added")
        }
        TimerCmd::Update {
            timer_name,
            schedule,
            ..
        } => {
            let Some(t) = timers.iter_mut().find(|t| t.name == timer_name) else {
                bail!(
                    "task {name} has no timer {timer_name}; add it with `acr-task task timer add`"
                );
            };
            t.schedule = schedule;
            (timer_name, "updated")
        }
        TimerCmd::Remove { timer_name, .. } => {
            let before = timers.len();
            timers.retain(|t| t.name != timer_name);
            if timers.len() == before {
                bail!("task {name} has no timer {timer_name}");
            }
            (timer_name, "removed")
        }
    };
    store_task(&c, &spec).await?;
    if output == Output::Json {
        print_json(&serde_json::json!({"task": name, "timer": timer, "result": message}))
    } else {
        println!("{message} timer {timer} on task {name}");
        Ok(())
    }
}

/// `task credential ...`: read the task, change its logins, store it back.
async fn credential(cmd: CredentialCmd) -> anyhow::Result<()> {
    use crate::server::model::TaskCredential;
    let (name, opts) = match &cmd {
        CredentialCmd::Add { name, opts, .. }
        | CredentialCmd::Update { name, opts, .. }
        | CredentialCmd::List { name, opts }
        | CredentialCmd::Remove { name, opts, .. } => (name.clone(), opts),
    };
    let output = opts.output;
    let c = Client::new(&opts.server);
    let mut spec = stored_task(&c, &name).await?;
    let (server, message) = match cmd {
        CredentialCmd::List { .. } => {
            let list: Vec<Value> = spec
                .credentials
                .iter()
                .map(|(server, c)| {
                    serde_json::json!({
                        "loginServer": server,
                        "username": c.username,
                        "password": c.password,
                    })
                })
                .collect();
            if output == Output::Json {
                return print_json(&Value::Array(list));
            }
            let rows: Vec<Vec<String>> = spec
                .credentials
                .iter()
                .map(|(server, c)| vec![server.clone(), c.username.clone(), c.password.clone()])
                .collect();
            table(&["LOGIN SERVER", "USERNAME", "PASSWORD REFERENCE"], &rows);
            return Ok(());
        }
        CredentialCmd::Add { login, .. } => {
            if spec.credentials.contains_key(&login.login_server) {
                bail!(
                    "task {name} already has a login for {}; change it with `acr-task task \
                     credential update`",
                    login.login_server
                );
            }
            let server = login.login_server.clone();
            spec.credentials.insert(
                login.login_server,
                TaskCredential {
                    username: login.username,
                    password: login.password,
                },
            );
            (server, "added")
        }
        CredentialCmd::Update { login, .. } => {
            let Some(entry) = spec.credentials.get_mut(&login.login_server) else {
                bail!(
                    "task {name} has no login for {}; add one with `acr-task task credential add`",
                    login.login_server
                );
            };
            *entry = TaskCredential {
                username: login.username,
                password: login.password,
            };
            (login.login_server, "updated")
        }
        CredentialCmd::Remove { login_server, .. } => {
            if spec.credentials.remove(&login_server).is_none() {
                bail!("task {name} has no login for {login_server}");
            }
            (login_server, "removed")
        }
    };
    store_task(&c, &spec).await?;
    if output == Output::Json {
        print_json(&serde_json::json!({"task": name, "loginServer": server, "result": message}))
    } else {
        println!("{message} the login for {server} on task {name}");
        Ok(())
    }
}

/// Where to point the git host's webhook, for a task with a commit secret.
fn webhook_hint(c: &Client, task: &Value) {
    if task["triggers"]["commit"]["secret"].is_null() {
        return;
    }
    let name = s(&task["name"]);
    eprintln!(
        "commit trigger: add a webhook for push events to your repository, with the secret \
         you gave:\n  GitHub  {b}/api/webhooks/github/{name}   (content type application/json)\n  \
         GitLab  {b}/api/webhooks/gitlab/{name}\n  Gitea   {b}/api/webhooks/gitea/{name}\n  \
         other   {b}/api/webhooks/generic/{name}",
        b = c.base
    );
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    println!("{}", super::render::table(header, rows));
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn trigger_text(t: &Value) -> String {
    match t["kind"].as_str() {
        Some("commit") => format!("commit ({}) {}", s(&t["source"]), short(&s(&t["commit"]))),
        Some("base_image") => format!("base image {}", s(&t["image"])),
        Some("timer") => format!("timer {}", s(&t["name"])),
        Some(k) => k.to_string(),
        None => "-".into(),
    }
}

fn short(c: &str) -> String {
    c.chars().take(10).collect()
}

fn print_task(v: &Value, output: Output) -> anyhow::Result<()> {
    // What the task file gets away with in ACR but is likely a mistake.
    for w in v["warnings"].as_array().into_iter().flatten() {
        eprintln!(
            "{}:{}:{}: warning: {}",
            s(&w["file"]),
            s(&w["line"]),
            s(&w["column"]),
            s(&w["message"])
        );
    }
    if output == Output::Json {
        return print_json(v);
    }
    let source = if v["taskYaml"].is_string() {
        "(inline)".to_string()
    } else {
        v["file"].as_str().unwrap_or("acb.yaml").to_string()
    };
    table(
        &[
            "NAME",
            "CONTEXT",
            "BRANCH",
            "FILE",
            "TIMERS",
            "COMMIT",
            "BASE IMAGE",
        ],
        &[task_row(v, source)],
    );
    Ok(())
}

fn task_row(v: &Value, source: String) -> Vec<String> {
    let timers = v["triggers"]["timers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| format!("{}={}", s(&t["name"]), s(&t["schedule"])))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "-".into());
    vec![
        s(&v["name"]),
        s(&v["context"]),
        v["branch"].as_str().unwrap_or("main").to_string(),
        source,
        timers,
        if v["triggers"]["commit"].is_object() {
            "on"
        } else {
            "off"
        }
        .into(),
        if v["triggers"]["baseImage"] == Value::Bool(false) {
            "off"
        } else {
            "on"
        }
        .into(),
    ]
}

fn run_rows(runs: &[Value]) -> Vec<Vec<String>> {
    runs.iter()
        .map(|r| {
            vec![
                s(&r["id"]),
                s(&r["task"]),
                s(&r["status"]),
                trigger_text(&r["trigger"]),
                r["commit"]
                    .as_str()
                    .map(short)
                    .unwrap_or_else(|| "-".into()),
                s(&r["queuedAt"]),
                s(&r["finishedAt"]),
            ]
        })
        .collect()
}

const RUN_HEADER: [&str; 7] = [
    "RUN", "TASK", "STATUS", "TRIGGER", "COMMIT", "QUEUED", "FINISHED",
];

/// `RUN|TASK` as `task logs` takes it: a run id, else the newest run of the task so named.
async fn run_or_latest(c: &Client, word: &str) -> anyhow::Result<String> {
    use reqwest::Method;
    let url = format!("{}/api/runs/{word}", c.base);
    let resp = c
        .request(Method::GET, &url)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", c.base))?;
    if resp.status().is_success() {
        return Ok(word.to_string());
    }
    if resp.status() != reqwest::StatusCode::NOT_FOUND {
        let text = resp.text().await.unwrap_or_default();
        bail!("{}", api_message(&text));
    }
    let runs = c
        .call(Method::GET, &format!("/api/runs?task={word}&limit=1"), None)
        .await?;
    match runs.as_array().and_then(|a| a.first()) {
        Some(r) => Ok(s(&r["id"])),
        None => bail!("no run and no task with runs is named {word}"),
    }
}

/// Streams a run's log; to stderr when stdout holds JSON.
async fn follow_logs(c: &Client, run: &str, to_stderr: bool) -> anyhow::Result<()> {
    let url = format!("{}/api/runs/{run}/logs?follow=true", c.base);
    let resp = c
        .request(reqwest::Method::GET, &url)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", c.base))?;
    if !resp.status().is_success() {
        bail!("{}", api_message(&resp.text().await.unwrap_or_default()));
    }
    let mut stream = resp.bytes_stream();
    let mut out: Box<dyn Write> = if to_stderr {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk.context("reading the log stream")?)?;
        out.flush()?;
    }
    Ok(())
}

pub fn task(cmd: TaskCmd) -> anyhow::Result<ExitCode> {
    super::tokio_runtime()?.block_on(task_async(cmd))
}

async fn task_async(cmd: TaskCmd) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    match cmd {
        TaskCmd::Create { name, def, opts } => {
            let c = Client::new(&opts.server);
            let mut spec = TaskSpec {
                name,
                ..Default::default()
            };
            apply(&mut spec, def)?;
            let v = c
                .call(
                    Method::POST,
                    "/api/tasks",
                    Some(&serde_json::to_value(&spec)?),
                )
                .await?;
            print_task(&v, opts.output)?;
            webhook_hint(&c, &v);
        }
        TaskCmd::Update { name, def, opts } => {
            let c = Client::new(&opts.server);
            let mut spec = stored_task(&c, &name).await?;
            apply(&mut spec, def)?;
            let v = store_task(&c, &spec).await?;
            print_task(&v, opts.output)?;
            webhook_hint(&c, &v);
        }
        TaskCmd::List { opts } => {
            let v = Client::new(&opts.server)
                .call(Method::GET, "/api/tasks", None)
                .await?;
            if opts.output == Output::Json {
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|t| {
                                let src = if t["taskYaml"].is_string() {
                                    "(inline)".into()
                                } else {
                                    t["file"].as_str().unwrap_or("acb.yaml").to_string()
                                };
                                task_row(t, src)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(
                    &[
                        "NAME",
                        "CONTEXT",
                        "BRANCH",
                        "FILE",
                        "TIMERS",
                        "COMMIT",
                        "BASE IMAGE",
                    ],
                    &rows,
                );
            }
        }
        TaskCmd::Credential(cmd) => credential(cmd).await?,
        TaskCmd::Timer(cmd) => timer(cmd).await?,
        TaskCmd::Show { name, opts } => {
            let v = Client::new(&opts.server)
                .call(Method::GET, &format!("/api/tasks/{name}"), None)
                .await?;
            print_task(&v, opts.output)?;
        }
        TaskCmd::Delete { name, yes, opts } => {
            super::registry::confirm(&format!("task {name} and its triggers"), yes)?;
            Client::new(&opts.server)
                .call(Method::DELETE, &format!("/api/tasks/{name}"), None)
                .await?;
            print_deleted(opts.output, &name, &format!("deleted task {name}"))?;
        }
        TaskCmd::Run {
            name,
            commit,
            follow,
            opts,
        } => {
            let c = Client::new(&opts.server);
            let body = serde_json::json!({ "commit": commit });
            let v = c
                .call(
                    Method::POST,
                    &format!("/api/tasks/{name}/runs"),
                    Some(&body),
                )
                .await?;
            let id = s(&v["id"]);
            if !follow {
                if opts.output == Output::Json {
                    print_json(&v)?;
                } else {
                    println!("queued run {id}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("queued run {id}");
            follow_logs(&c, &id, opts.output == Output::Json).await?;
            let done = c
                .call(Method::GET, &format!("/api/runs/{id}"), None)
                .await?;
            if opts.output == Output::Json {
                print_json(&done)?;
            } else {
                // Why it failed, setup failures (context, credentials, the file) included.
                match done["error"].as_str() {
                    Some(e) => println!("Run {id} {}: {e}", s(&done["status"])),
                    None => println!("Run {id} {}", s(&done["status"])),
                }
            }
            return Ok(if done["status"] == "Succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        TaskCmd::Logs { run, follow, opts } => {
            let c = Client::new(&opts.server);
            let run = run_or_latest(&c, &run).await?;
            if follow {
                follow_logs(&c, &run, false).await?;
            } else {
                let url = format!("{}/api/runs/{run}/logs", c.base);
                let resp = c
                    .request(reqwest::Method::GET, &url)
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {}", c.base))?;
                let ok = resp.status().is_success();
                let text = resp.text().await?;
                if !ok {
                    bail!("{}", api_message(&text));
                }
                print!("{text}");
            }
        }
        TaskCmd::ListRuns { task, top, opts } => {
            let q = match &task {
                Some(t) => format!("/api/runs?task={t}&limit={top}"),
                None => format!("/api/runs?limit={top}"),
            };
            let v = Client::new(&opts.server)
                .call(Method::GET, &q, None)
                .await?;
            if opts.output == Output::Json {
                print_json(&v)?;
            } else {
                table(
                    &RUN_HEADER,
                    &run_rows(v.as_array().map(Vec::as_slice).unwrap_or(&[])),
                );
            }
        }
        TaskCmd::ShowRun { run, opts } => {
            let v = Client::new(&opts.server)
                .call(Method::GET, &format!("/api/runs/{run}"), None)
                .await?;
            if opts.output == Output::Json {
                print_json(&v)?;
            } else {
                table(&RUN_HEADER, &run_rows(std::slice::from_ref(&v)));
                if let Some(e) = v["error"].as_str() {
                    println!("\nerror: {e}");
                }
            }
        }
        TaskCmd::CancelRun { run, opts } => {
            let v = Client::new(&opts.server)
                .call(Method::POST, &format!("/api/runs/{run}/cancel"), None)
                .await?;
            if opts.output == Output::Json {
                print_json(&v)?;
            } else {
                println!("run {run}: {}", s(&v["status"]));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
