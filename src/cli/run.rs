//! `acr-task run`, `acr-task build`, `acr-task runner`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use super::render::{summary, Renderer};
use super::{validate, Output};
use crate::exec::{self, RunConfig, RunReport};
use crate::plan::Plan;
use crate::policy::{Policed, Policy};
use crate::registry::{RegistryConfig, RunningRegistry};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::runner;
use crate::setup::{resolve_context, run_info};
use crate::task::{self, LoadOptions, Task};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  acr-task run acb.yaml                       the task file; its directory is the context
  acr-task run -f acb.yaml .                  as `az acr run`: the context is positional
  acr-task run -f ci/acb.yaml https://github.com/org/app.git#main:src
  acr-task run --cmd '{{.Run.Registry}}/tools/lint:1 --fix' /dev/null
  acr-task run acb.yaml --registry myregistry.example.com   pushes with your docker login
  acr-task run --no-wait --agent-pool builders -f acb.yaml https://git.example.com/app.git")]
pub struct RunArgs {
    /// `FILE [CONTEXT]`; with `-f FILE` or `--cmd`, just `[CONTEXT]`. A context is a local
    /// directory, `GIT_URL[#REF[:FOLDER]]`, or `/dev/null` for none. Default: the task
    /// file's directory.
    #[arg(value_name = "FILE|CONTEXT", num_args = 0..=2)]
    pub positional: Vec<String>,
    /// The task file (as `az acr run -f`).
    #[arg(long = "file", short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A quick run of one command, `IMAGE [ARGS...]`, instead of a task file (templates such
    /// as `{{.Run.Registry}}` are rendered).
    #[arg(long, value_name = "'IMAGE ARGS'", conflicts_with = "file")]
    pub cmd: Option<String>,
    /// The build context (the same as the positional CONTEXT).
    #[arg(long)]
    pub context: Option<String>,
    /// Whole-run timeout in seconds [default: the task file's, else 3600].
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Do not show the steps' output; only which steps start and how they end.
    #[arg(long)]
    pub no_logs: bool,
    /// Queue the run on a running `acr-task serve` (--server) and return at once with its
    /// id, as `az acr run --no-wait`; follow it with `acr-task task logs RUN --follow`. The
    /// context must be one the server can fetch: a git URL or /dev/null.
    #[arg(long)]
    pub no_wait: bool,
    /// With --no-wait: the server [default: http://127.0.0.1:5000].
    #[arg(long, env = "ACR_TASK_SERVER", requires = "no_wait")]
    pub server: Option<String>,
    /// With --no-wait: run it on an agent of this pool instead of the server's engine
    /// (`az acr run --agent-pool`).
    #[arg(long, value_name = "NAME", requires = "no_wait")]
    pub agent_pool: Option<String>,
    /// A YAML values file for `{{.Values.x}}`.
    #[arg(long)]
    pub values: Option<PathBuf>,
    /// Override a value: `--set key=value` (repeatable; later wins).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Value of a task secret: `--secret ID=VALUE`, or `--secret ID` to read the environment
    /// variable ID. Substituted for `{{.Secrets.ID}}` when steps run; masked in all output.
    #[arg(long = "secret", value_name = "ID[=VALUE]")]
    pub secrets: Vec<String>,
    /// Sign every image a push step pushes with this private key (a PEM file or
    /// env://VAR; cosign's format, stored as the image's referrer).
    #[arg(long, value_name = "KEY")]
    pub signing_key: Option<super::sign::KeyRef>,
    /// Registry to push to (`HOST:PORT`). Default: the integrated registry, started in-process.
    #[arg(long)]
    pub registry: Option<String>,
    /// Warnings (what ACR accepts but is likely a mistake) are errors.
    #[arg(long)]
    pub strict: bool,
    /// Print the rendered plan (levels, dependencies, critical path) without touching Docker.
    #[arg(long)]
    pub dry_run: bool,
    /// Most steps running at once.
    #[arg(long, default_value_t = 8)]
    pub max_parallel: usize,
    /// Target platform of every build and container, `os/arch[/variant]` (e.g.
    /// `linux/arm64`); sets `.Run.OS` and `.Run.Architecture`. Default: the engine's.
    #[arg(long)]
    pub platform: Option<crate::task::Platform>,
    /// Data directory of the integrated registry.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run under this sandbox policy (as `serve --policy` takes it). Without one, a run on
    /// your own machine may do anything the Docker Engine allows.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Output format: table or json; with --dry-run also dot (Graphviz).
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  acr-task build -t app:{{.Run.ID}} .          tags render as in az; the registry is prefixed
  acr-task build -t app:v1 --no-push --target test .
  acr-task build -t myregistry.example.com/app:v1 https://github.com/org/app.git#main:src")]
pub struct BuildArgs {
    /// Build context: a local directory, `GIT_URL[#REF[:FOLDER]]`, or `/dev/null`.
    pub context: String,
    /// Image name and tag, relative to the registry (repeatable); `{{.Run.ID}}`,
    /// `{{.Run.Registry}}`... are rendered. A name with a registry host is pushed there.
    #[arg(long = "image", short = 't', required = true)]
    pub tags: Vec<String>,
    /// Dockerfile, relative to the context.
    #[arg(long = "file", short = 'f')]
    pub dockerfile: Option<String>,
    /// A build argument, as `docker build --build-arg` (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// A build argument whose value is a secret: masked in all output.
    #[arg(long = "secret-build-arg", value_name = "KEY=VALUE")]
    pub secret_build_args: Vec<String>,
    /// The Dockerfile stage to build.
    #[arg(long)]
    pub target: Option<String>,
    /// Build only; push nothing.
    #[arg(long)]
    pub no_push: bool,
    /// Target platform `os/arch[/variant]` of the build, as `az acr build --platform`.
    #[arg(long)]
    pub platform: Option<crate::task::Platform>,
    /// Registry to push to (`HOST:PORT`). Default: the integrated registry.
    #[arg(long)]
    pub registry: Option<String>,
    /// Whole-build timeout in seconds [default: 3600].
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Do not show the build's output.
    #[arg(long)]
    pub no_logs: bool,
    /// Data directory of the integrated registry [default: $ACR_TASK_DATA, else
    /// ~/.local/share/acr-task].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output format: table or json.
    #[arg(long, short = 'o', default_value = "table", value_parser = super::table_or_json)]
    pub output: Output,
}

#[derive(Debug, clap::Subcommand)]
pub enum RunnerCmd {
    /// Build the busybox runner image from the host's busybox-static.
    #[command(
        after_help = "Examples:\n  acr-task runner build\n  acr-task runner build --registry 127.0.0.1:5000"
    )]
    Build {
        /// Also push it to this registry (`HOST:PORT`) as `HOST:PORT/runner:latest`.
        #[arg(long)]
        registry: Option<String>,
    },
}

/// A short, sortable, unique run id: seconds since 2020 in base 36 plus 3 random chars.
fn new_run_id() -> String {
    const B36: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut secs = chrono::Utc::now().timestamp().saturating_sub(1_577_836_800) as u64;
    let mut s = Vec::new();
    while secs > 0 {
        s.push(B36[(secs % 36) as usize]);
        secs /= 36;
    }
    s.reverse();
    let r = uuid::Uuid::new_v4().as_u128();
    for i in 0..3 {
        s.push(B36[((r >> (i * 8)) % 36) as usize]);
    }
    format!("r{}", String::from_utf8_lossy(&s))
}

/// The registry to push to: the one named, or the integrated one started in-process.
async fn registry_for(
    named: Option<String>,
    data: Option<PathBuf>,
) -> anyhow::Result<(String, Option<RunningRegistry>)> {
    match named {
        Some(r) => Ok((r, None)),
        None => {
            let data_dir = data
                .unwrap_or_else(super::default_data_dir)
                .join("registry");
            let reg = crate::registry::start(RegistryConfig::new(
                data_dir.clone(),
                "127.0.0.1:0".parse().context("loopback address")?,
            ))
            .await
            .with_context(|| {
                format!("starting the integrated registry in {}", data_dir.display())
            })?;
            Ok((reg.addr().to_string(), Some(reg)))
        }
    }
}

/// The logins `docker login` stored: what a run on your own machine pulls and pushes with.
fn docker_logins() -> anyhow::Result<Arc<crate::credentials::Credentials>> {
    Ok(Arc::new(
        crate::credentials::Credentials::from_docker_config()
            .context("reading the docker CLI's logins")?,
    ))
}

/// Cancels on Ctrl-C or SIGTERM, so a run always tears down what it made.
fn cancel_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
        eprintln!(
            "interrupted: canceling the run and removing its containers, networks and volumes"
        );
        t.cancel();
    });
    token
}

/// Runs a loaded task on Docker, rendering events; returns the report.
async fn execute(
    task: Task,
    plan: Plan,
    cfg: RunConfig,
    policy: Policy,
    output: Output,
    no_logs: bool,
    integrated: Option<&str>,
) -> anyhow::Result<RunReport> {
    let docker = Arc::new(DockerRuntime::connect().await?);
    let rt = Arc::new(Policed::new(docker.clone(), Arc::new(policy)));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut renderer = Renderer::new(&task, output != Output::Json);
    renderer.no_logs = no_logs;
    let render = tokio::spawn(renderer.drive(rx));
    let cancel = cancel_on_signals();
    let report = exec::execute(rt, Arc::new(task), Arc::new(plan), cfg, tx, cancel).await;
    let _ = render.await;
    if let Some(addr) = integrated {
        untag_integrated(&docker, &report, addr).await;
    }
    Ok(report)
}

/// The integrated registry's port dies with the run: the engine's tags naming it would
/// only pile up (the images stay in the registry, under the data directory).
async fn untag_integrated(docker: &DockerRuntime, report: &RunReport, addr: &str) {
    let prefix = format!("{addr}/");
    let mut tags: Vec<&str> = Vec::new();
    for step in &report.steps {
        let built = step.built.iter().flat_map(|b| b.tags.iter());
        let pushed = step.pushed.iter().map(|p| &p.image);
        for t in built.chain(pushed) {
            if t.starts_with(&prefix) && !tags.contains(&t.as_str()) {
                tags.push(t);
            }
        }
    }
    for t in tags {
        if let Err(e) = docker.untag(t).await {
            tracing::debug!(tag = %t, error = %e, "untagging a run's image");
        }
    }
}

fn print_report(report: &RunReport, output: Output) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(report)?),
        _ => println!("\n{}", summary(report)),
    }
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// No context at all (`az acr run ... /dev/null`).
const NO_CONTEXT: &str = "/dev/null";

impl RunArgs {
    /// The task file (`None` with `--cmd`) and the context, from the positional words and
    /// the options, however they were given.
    fn file_and_context(&self) -> anyhow::Result<(Option<PathBuf>, Option<String>)> {
        let mut words = self.positional.iter().cloned();
        let file = match (&self.file, &self.cmd) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(_)) => None,
            (None, None) => Some(PathBuf::from(words.next().ok_or_else(|| {
                anyhow::anyhow!(
                    "give a task file (`acr-task run FILE [CONTEXT]` or `-f FILE`) or --cmd"
                )
            })?)),
        };
        let context = match (words.next(), &self.context) {
            (Some(_), Some(_)) => bail!("give the context once: positionally or with --context"),
            (a, b) => a.or_else(|| b.clone()),
        };
        if let Some(extra) = words.next() {
            bail!("unexpected argument {extra:?}: the run takes a task file and one context");
        }
        Ok((file, context))
    }
}

/// `run --no-wait`: the run's definition handed to a server, which queues it.
fn queue_on_server(
    args: &RunArgs,
    file: Option<PathBuf>,
    context: Option<String>,
) -> anyhow::Result<ExitCode> {
    use crate::server::model::TaskSpec;
    if !args.secrets.is_empty() {
        bail!(
            "a queued run cannot carry secret values; store a task whose secrets are \
             references the server resolves (`acr-task task create NAME --secret ID=env:VAR`)"
        );
    }
    let context = match context.as_deref() {
        None | Some(NO_CONTEXT) => String::new(),
        // Stored and queued runs fetch git contexts only; a tarball is for runs here.
        Some(c) if crate::source::is_tarball_url(c) => bail!(
            "a queued run cannot use a tarball context ({c}): give --no-wait a git URL or \
             /dev/null, or run without --no-wait"
        ),
        Some(c) if crate::source::is_git_url(c) => c.to_string(),
        Some(c) => bail!(
            "the server cannot read {c} from this machine: give --no-wait a context it can \
             fetch (a git URL, or /dev/null), or run without --no-wait"
        ),
    };
    let mut spec = TaskSpec {
        context: context.clone(),
        timeout: args.timeout,
        platform: args.platform.as_ref().map(ToString::to_string),
        set: args.set.clone(),
        agent_pool: args.agent_pool.clone(),
        ..Default::default()
    };
    if let Some(v) = &args.values {
        spec.values =
            Some(std::fs::read_to_string(v).with_context(|| format!("reading {}", v.display()))?);
    }
    match (&args.cmd, file) {
        (Some(cmd), _) => spec.task_yaml = Some(cmd_task(cmd)?),
        (None, Some(f)) if f.exists() => {
            spec.task_yaml = Some(
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
            )
        }
        // A file that is not here is looked up in the (git or tarball) context.
        (None, Some(f)) if !context.is_empty() => spec.file = Some(f.display().to_string()),
        (None, Some(f)) => bail!("task file {} not found", f.display()),
        (None, None) => bail!("give a task file or --cmd"),
    }
    let server = args
        .server
        .clone()
        .unwrap_or_else(|| super::task::DEFAULT_SERVER.to_string());
    let client = super::client::Client::new(&server);
    let rec = super::tokio_runtime()?.block_on(client.call(
        reqwest::Method::POST,
        "/api/runs",
        Some(&serde_json::to_value(&spec)?),
    ))?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
    } else {
        let id = rec["id"].as_str().unwrap_or_default();
        println!(
            "queued run {id} on {}; follow it with `acr-task task logs {id} --follow`",
            client.base
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The one-step task of `run --cmd`, as YAML (so it is rendered and checked like a file).
pub fn cmd_task(cmd: &str) -> anyhow::Result<String> {
    Ok(format!(
        "version: v1.1.0\nsteps:\n  - cmd: {}\n",
        serde_json::to_string(cmd)?
    ))
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    match args.output {
        Output::Tsv => bail!("--output tsv is not an output `run` gives: use table or json"),
        Output::Dot if !args.dry_run => {
            bail!("--output dot draws the plan: it goes with --dry-run")
        }
        _ => {}
    }
    let scratch = tempfile::tempdir().context("creating a temp dir")?;
    let (file_arg, context_arg) = args.file_and_context()?;
    if args.no_wait {
        return queue_on_server(&args, file_arg, context_arg);
    }
    let file_arg = match (file_arg, &args.cmd) {
        (Some(f), _) => f,
        (None, Some(cmd)) => {
            let f = scratch.path().join("cmd.yaml");
            std::fs::write(&f, cmd_task(cmd)?).context("writing the --cmd task")?;
            f
        }
        (None, None) => bail!("give a task file or --cmd"),
    };
    let empty = scratch.path().join("empty-context");
    let context_arg = match context_arg {
        Some(c) if c == NO_CONTEXT => {
            std::fs::create_dir_all(&empty).context("creating an empty context")?;
            Some(empty.display().to_string())
        }
        // A quick command has no context unless one is given.
        None if args.cmd.is_some() => {
            std::fs::create_dir_all(&empty).context("creating an empty context")?;
            Some(empty.display().to_string())
        }
        other => other,
    };
    let (context, git) = resolve_context(context_arg.as_deref(), &file_arg, scratch.path())?;
    let context = std::fs::canonicalize(&context)
        .with_context(|| format!("context {}", context.display()))?;
    // A task file that is not on disk is looked up inside the context, as ACR does.
    let file = if !file_arg.exists() && context_arg.is_some() {
        context.join(&file_arg)
    } else {
        file_arg.clone()
    };
    let run_id = new_run_id();
    let mut cfg = RunConfig::for_run(&run_id, context.clone(), args.max_parallel);
    cfg.secrets = validate::parse_secrets(&args.secrets).map_err(anyhow::Error::msg)?;
    cfg.platform = args.platform.clone();
    cfg.credentials = docker_logins()?;
    // Alias files are read from the context, as ACR reads them from where it runs.
    let options = LoadOptions {
        strict: args.strict,
        alias_dir: Some(context.clone()),
        secrets: cfg.secrets.clone(),
        secrets_required: !args.dry_run,
        ..LoadOptions::default()
    };
    let policy = match validate::policy_arg(args.policy.as_deref()) {
        Ok(p) => p,
        Err(d) => {
            validate::print_diagnostics(&d, args.output);
            return Ok(ExitCode::from(2));
        }
    };
    if args.dry_run {
        let registry = args
            .registry
            .clone()
            .unwrap_or_else(|| "localhost:5000".into());
        let info = run_info(&run_id, &file, &registry, &context, git.as_ref(), &cfg);
        return Ok(validate::dry_run(
            &file,
            args.values.as_deref(),
            &args.set,
            &info,
            &options,
            &policy,
            args.output,
        ));
    }
    super::tokio_runtime()?.block_on(async {
        let (registry, integrated) = registry_for(args.registry.clone(), args.data.clone()).await?;
        let info = run_info(&run_id, &file, &registry, &context, git.as_ref(), &cfg);
        cfg.registry = Some(registry.clone());
        let trust = crate::setup::RunTrust {
            registry: registry.clone(),
            // The integrated registry's content-trust policies hold for the run's images.
            check: integrated.as_ref().map(|r| {
                Arc::new(crate::setup::StoreTrust(r.registry().store().clone()))
                    as Arc<dyn crate::setup::TrustCheck>
            }),
            key: match &args.signing_key {
                Some(k) => Some(Arc::new(k.signing_key()?)),
                None => None,
            },
        };
        cfg.trust = Some(Arc::new(trust));
        let loaded = validate::load(
            &file,
            args.values.as_deref(),
            &args.set,
            &info,
            &options,
            &policy,
        );
        let masker = crate::exec::secrets::Masker::new(cfg.secrets.values());
        // Diagnostics quote the rendered file, which holds the secrets' values.
        let mask = |d: Vec<task::Diagnostic>| -> Vec<task::Diagnostic> {
            d.into_iter()
                .map(|mut x| {
                    x.message = masker.mask(&x.message);
                    x
                })
                .collect()
        };
        let result = match loaded {
            Err(d) => {
                validate::print_diagnostics(&task::Diagnostics(mask(d.0)), args.output);
                Ok(ExitCode::FAILURE)
            }
            Ok((loaded, plan)) => {
                validate::print_warnings(&mask(loaded.warnings));
                let mut task = loaded.task;
                if let Some(t) = args.timeout {
                    task.total_timeout = t;
                }
                let addr = integrated.as_ref().map(|r| r.addr().to_string());
                execute(
                    task,
                    plan,
                    cfg,
                    policy,
                    args.output,
                    args.no_logs,
                    addr.as_deref(),
                )
                .await
                .and_then(|report| print_report(&report, args.output))
            }
        };
        if let Some(reg) = integrated {
            reg.shutdown().await;
        }
        result
    })
}

/// Quotes a word for the step command line (parsed back by `task::args::split_words`).
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// An image name of `build -t`: relative to the run's registry unless it names one.
fn tag_in_registry(tag: &str) -> String {
    let names_registry = tag.split_once('/').is_some_and(|(first, _)| {
        crate::registry::reference::names_registry(first) && !first.contains("{{")
    });
    if names_registry || tag.starts_with("{{.Run.Registry}}") {
        tag.to_string()
    } else {
        format!("{{{{.Run.Registry}}}}/{tag}")
    }
}

/// The quick task of `build`, as a task file: build with every tag, then push them, so
/// its templates render and it is checked like any file.
pub fn quick_task(args: &BuildArgs) -> anyhow::Result<String> {
    let images: Vec<String> = args.tags.iter().map(|t| tag_in_registry(t)).collect();
    let mut build: Vec<String> = Vec::new();
    for i in &images {
        build.push(format!("-t {}", quote(i)));
    }
    if let Some(f) = &args.dockerfile {
        build.push(format!("-f {}", quote(f)));
    }
    if let Some(t) = &args.target {
        build.push(format!("--target {}", quote(t)));
    }
    for a in &args.build_args {
        build.push(format!("--build-arg {}", quote(a)));
    }
    for a in &args.secret_build_args {
        let (k, _) = a
            .split_once('=')
            .with_context(|| format!("--secret-build-arg {a:?}: expected KEY=VALUE"))?;
        build.push(format!(
            "--build-arg {}",
            quote(&format!("{k}={{{{.Secrets.{}}}}}", secret_id(k)))
        ));
    }
    build.push(".".into());
    let mut yaml = String::from("version: v1.1.0\n");
    yaml.push_str(&format!(
        "steps:\n  - id: build\n    build: {}\n",
        serde_json::to_string(&build.join(" "))?
    ));
    if !args.no_push {
        yaml.push_str(&format!(
            "  - id: push\n    push: {}\n",
            serde_json::to_string(&images)?
        ));
    }
    Ok(yaml)
}

/// A stored quick build task (`task create --image`): build the context's Dockerfile
/// with these tags and push them.
pub fn quick_build_yaml(tags: &[String], dockerfile: Option<&str>) -> anyhow::Result<String> {
    quick_task(&BuildArgs {
        context: String::new(),
        tags: tags.to_vec(),
        dockerfile: dockerfile.map(str::to_string),
        build_args: Vec::new(),
        secret_build_args: Vec::new(),
        target: None,
        no_push: false,
        platform: None,
        registry: None,
        timeout: None,
        no_logs: false,
        data: None,
        output: Output::Table,
    })
}

/// The secret holding a `--secret-build-arg`'s value.
fn secret_id(key: &str) -> String {
    let k: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("build_arg_{k}")
}

pub fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::tempdir().context("creating a temp dir")?;
    let file = scratch.path().join("build.yaml");
    std::fs::write(&file, quick_task(&args)?).context("writing the build task")?;
    let secrets = args
        .secret_build_args
        .iter()
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| format!("{}={v}", secret_id(k)))
        .collect();
    run(RunArgs {
        positional: vec![args.context],
        file: Some(file),
        cmd: None,
        context: None,
        timeout: args.timeout,
        no_logs: args.no_logs,
        no_wait: false,
        agent_pool: None,
        server: None,
        values: None,
        set: Vec::new(),
        secrets,
        signing_key: None,
        registry: args.registry,
        strict: false,
        dry_run: false,
        max_parallel: 1,
        platform: args.platform,
        data: args.data,
        policy: None,
        output: args.output,
    })
}

pub fn runner(cmd: RunnerCmd) -> anyhow::Result<ExitCode> {
    let RunnerCmd::Build { registry } = cmd;
    super::tokio_runtime()?.block_on(async {
        let rt = DockerRuntime::connect().await?;
        let log: crate::runtime::LogSink = Arc::new(|l: String| eprintln!("{l}"));
        let id = runner::build_runner(&rt, &log).await?;
        println!("{} {id}", runner::RUNNER_IMAGE);
        if let Some(r) = registry {
            let target = format!("{r}/runner:latest");
            rt.tag(&id, &target).await?;
            let login = crate::credentials::Credentials::from_docker_config()?.get(&r);
            let digest = crate::runtime::Runtime::push(&rt, &target, login.as_ref(), &log).await?;
            println!("{target} {digest}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
