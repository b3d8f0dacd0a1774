//! `acr-task run`, `acr-task build`, `acr-task runner`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::render::{summary, Renderer};
use super::{validate, Output};
use crate::exec::{self, RunConfig, RunReport};
use crate::plan::Plan;
use crate::policy::{Policed, Policy};
use crate::registry::{RegistryConfig, RunningRegistry};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::runner;
use crate::server::runner::{resolve_context, run_info};
use crate::task::{self, LoadOptions, Step, Task};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The task file.
    pub file: PathBuf,
    /// Build context: a local directory or `GIT_URL#ref`. Default: the task file's directory.
    #[arg(long)]
    pub context: Option<String>,
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
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Build context directory.
    pub context: PathBuf,
    /// Image name and tag, relative to the registry (repeatable).
    #[arg(long = "image", short = 't', required = true)]
    pub tags: Vec<String>,
    /// Dockerfile, relative to the context.
    #[arg(long = "file", short = 'f')]
    pub dockerfile: Option<String>,
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Target platform `os/arch[/variant]` of the build, as `az acr build --platform`.
    #[arg(long)]
    pub platform: Option<crate::task::Platform>,
    #[arg(long)]
    pub registry: Option<String>,
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, clap::Subcommand)]
pub enum RunnerCmd {
    /// Build the busybox runner image from the host's busybox-static.
    Build {
        /// Also push it to this registry (`HOST:PORT`) as `HOST:PORT/runner:latest`.
        #[arg(long)]
        registry: Option<String>,
    },
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
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
fn docker_logins() -> anyhow::Result<Arc<crate::registry::credentials::Credentials>> {
    Ok(Arc::new(
        crate::registry::credentials::Credentials::from_docker_config()
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
) -> anyhow::Result<RunReport> {
    let rt = Arc::new(Policed::new(
        Arc::new(DockerRuntime::connect().await?),
        Arc::new(policy),
    ));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let renderer = Renderer::new(&task, output != Output::Json);
    let render = tokio::spawn(renderer.drive(rx));
    let cancel = cancel_on_signals();
    let report = exec::execute(rt, Arc::new(task), Arc::new(plan), cfg, tx, cancel).await;
    let _ = render.await;
    Ok(report)
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

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::tempdir().context("creating a temp dir")?;
    let (context, git) = resolve_context(args.context.as_deref(), &args.file, scratch.path())?;
    let context = std::fs::canonicalize(&context)
        .with_context(|| format!("context {}", context.display()))?;
    // With a git context, a task file that is not on disk is looked up inside it, as ACR does.
    let file = if !args.file.exists() && args.context.is_some() {
        context.join(&args.file)
    } else {
        args.file.clone()
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
    tokio_runtime()?.block_on(async {
        let (registry, integrated) = registry_for(args.registry.clone(), args.data.clone()).await?;
        let info = run_info(&run_id, &file, &registry, &context, git.as_ref(), &cfg);
        cfg.registry = Some(registry.clone());
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
                execute(loaded.task, plan, cfg, policy, args.output)
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

/// The quick task as a two-step task: build with every tag, then push them.
pub fn quick_task(registry: &str, args: &BuildArgs) -> Task {
    let images: Vec<String> = args
        .tags
        .iter()
        .map(|t| format!("{registry}/{t}"))
        .collect();
    let mut build: Vec<String> = Vec::new();
    for i in &images {
        build.push(format!("-t {}", quote(i)));
    }
    if let Some(f) = &args.dockerfile {
        build.push(format!("-f {}", quote(f)));
    }
    for a in &args.build_args {
        build.push(format!("--build-arg {}", quote(a)));
    }
    build.push(".".into());
    let steps = vec![
        Step {
            id: "build".into(),
            build: Some(build.join(" ")),
            ..Default::default()
        },
        Step {
            id: "push".into(),
            push: Some(images),
            ..Default::default()
        },
    ];
    Task {
        version: crate::task::DEFAULT_VERSION.into(),
        alias: None,
        step_timeout: crate::task::DEFAULT_STEP_TIMEOUT,
        total_timeout: crate::task::DEFAULT_TOTAL_TIMEOUT,
        working_directory: None,
        env: Vec::new(),
        secrets: Vec::new(),
        networks: Vec::new(),
        volumes: Vec::new(),
        steps,
    }
}

pub fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let context = std::fs::canonicalize(&args.context)
        .with_context(|| format!("context {}", args.context.display()))?;
    let run_id = new_run_id();
    let mut cfg = RunConfig::for_run(&run_id, context, 1);
    cfg.platform = args.platform.clone();
    cfg.credentials = docker_logins()?;
    tokio_runtime()?.block_on(async {
        let (registry, integrated) = registry_for(args.registry.clone(), args.data.clone()).await?;
        let task = quick_task(&registry, &args);
        cfg.registry = Some(registry.clone());
        let plan = Plan::new(&task)?;
        let result = execute(task, plan, cfg, Policy::permissive(), args.output)
            .await
            .and_then(|r| print_report(&r, args.output));
        if let Some(reg) = integrated {
            reg.shutdown().await;
        }
        result
    })
}

pub fn runner(cmd: RunnerCmd) -> anyhow::Result<ExitCode> {
    let RunnerCmd::Build { registry } = cmd;
    tokio_runtime()?.block_on(async {
        let rt = DockerRuntime::connect().await?;
        let log: crate::runtime::LogSink = Arc::new(|l: String| eprintln!("{l}"));
        let id = runner::build_runner(&rt, &log).await?;
        println!("{} {id}", runner::RUNNER_IMAGE);
        if let Some(r) = registry {
            let target = format!("{r}/runner:latest");
            rt.tag(&id, &target).await?;
            let login = crate::registry::credentials::Credentials::from_docker_config()?.get(&r);
            let digest = crate::runtime::Runtime::push(&rt, &target, login.as_ref(), &log).await?;
            println!("{target} {digest}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
