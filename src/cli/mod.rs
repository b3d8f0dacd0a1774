//! The command line: argument parsing and terminal rendering only. Each subcommand family
//! lives in its own file and owns its argument struct.

pub mod acr;
mod agent;
mod auth;
mod client;
mod encryption;
mod import;
mod manage;
mod progress;
mod purge;
mod registry;
mod relocate;
mod render;
mod replication;
mod run;
mod serve;
pub(crate) mod sign;
mod task;
mod template;
mod upgrade;
pub mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "acr-task",
    version,
    about = "Run ACR Tasks (acb.yaml) locally on Docker, with an integrated OCI registry",
    after_help = "Exit status: 0 success, 1 failure (a failed run, an invalid file, an error), 2 usage error.
Output: -o json|table|tsv where a command supports it; no colour when not on a terminal or with NO_COLOR set."
)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `debug` or `acr_task=trace`.
    #[arg(long, global = true, env = "ACR_TASK_LOG", default_value = "warn")]
    pub log: String,
    /// How log lines are written to stderr: `text` for people, `json` (one object a line,
    /// with the run and step ids of the spans it is in) for log collectors.
    #[arg(long, global = true, env = "ACR_TASK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a task file: render templates, parse, plan. Exit 1 with diagnostics when invalid.
    Validate(validate::ValidateArgs),
    /// Run a multi-step task file on the local Docker Engine.
    Run(run::RunArgs),
    /// Quick task: build one image from a context and push it (like `az acr build`).
    Build(run::BuildArgs),
    /// Runner images made locally from Debian's busybox-static (no outside registry needed).
    #[command(subcommand)]
    Runner(run::RunnerCmd),
    /// The integrated registry: its tier and limits (show, show-usage, update), gc, fsck.
    #[command(subcommand)]
    Registry(registry::RegistryCmd),
    /// Copy an image from another registry into this one (like `az acr import`).
    Import(import::ImportArgs),
    /// Delete old tags (and, with --untagged, manifests no tag names) by filter and age
    /// (like acr-cli's `acr purge`).
    Purge(purge::PurgeArgs),
    /// Sign an image (cosign's key-pair format, stored as an OCI 1.1 referrer).
    Sign(sign::SignArgs),
    /// Check an image's signatures against public keys; exit 1 when none is valid.
    Verify(sign::VerifyArgs),
    /// Make a signing key pair (PREFIX.key, PREFIX.pub) for sign, verify and policies.
    GenerateKeyPair(sign::GenerateArgs),
    /// Repositories in the registry (like `az acr repository`).
    #[command(subcommand)]
    Repository(registry::RepositoryCmd),
    /// Serve the registry and the task service (stored tasks, run queue, triggers).
    Serve(serve::ServeArgs),
    /// Registry tokens: named credentials bound to a scope map.
    #[command(subcommand)]
    Token(auth::TokenCmd),
    /// Scope maps: which repositories a token may read, write or delete.
    #[command(subcommand)]
    ScopeMap(auth::ScopeMapCmd),
    /// Passwords of the admin user and of tokens.
    #[command(subcommand)]
    Credential(auth::CredentialCmd),
    /// Outgoing webhooks on registry pushes and deletes.
    #[command(subcommand)]
    Webhook(auth::WebhookCmd),
    /// Geo-replicas of the registry: other `serve` instances kept in step, each taking
    /// pushes (like `az acr replication`).
    #[command(subcommand)]
    Replication(replication::ReplicationCmd),
    /// Stored tasks and their runs on a running `serve` (like `az acr task`).
    #[command(subcommand)]
    Task(task::TaskCmd),
    /// Work for a server's agent pool: take its queued runs and run them on this
    /// machine's Docker Engine.
    Agent(agent::AgentArgs),
    /// Agent pools on a running `serve` (like `az acr agentpool`).
    #[command(subcommand)]
    AgentPool(agent::AgentPoolCmd),
    /// Print a shell completion script: `acr-task completion bash > /etc/bash_completion.d/acr-task`,
    /// `acr-task completion zsh > "${fpath[1]}/_acr-task"`, `acr-task completion fish > ~/.config/fish/completions/acr-task.fish`.
    #[command(
        after_help = "Example:\n  acr-task completion bash > ~/.local/share/bash-completion/completions/acr-task"
    )]
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `--output` formats; each command accepts the subset that makes sense for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Tsv,
    Dot,
}

/// Where acr-task keeps its data when `--data` is not given:
/// `$ACR_TASK_DATA`, else `$XDG_DATA_HOME/acr-task`, else `~/.local/share/acr-task`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ACR_TASK_DATA") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("acr-task");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/acr-task")
}

/// `--output` for commands that print tables or JSON only: anything else is refused by
/// the parser, naming the two.
pub fn table_or_json(s: &str) -> Result<Output, String> {
    match s {
        "table" => Ok(Output::Table),
        "json" => Ok(Output::Json),
        other => Err(format!(
            "{other:?} is not an output this command gives: use table or json"
        )),
    }
}

/// The multi-threaded async runtime a command runs its work on.
fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Sizes on the command line (`--max-blob-size 20GiB`), as in task files.
pub use crate::task::args::parse_size;

pub fn main() -> ExitCode {
    if acr::invoked_as_acr() {
        return acr::main();
    }
    let cli = Cli::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // The TLS verifier logs every refused certificate as an ERROR of its own; our error
    // for the request already says it. Asking for its target by name shows it again.
    if !cli.log.contains("rustls_platform_verifier") {
        if let Ok(d) = "rustls_platform_verifier=off".parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colour only for a person at a terminal who has not asked for none.
    let colour = {
        use std::io::IsTerminal;
        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
    };
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(colour)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    // Commands that only print behave like Unix filters: `| head` ends them quietly.
    // Not those that talk over the network: a peer closing a socket would kill them.
    let prints_only = match &cli.command {
        Command::Validate(_) | Command::Completion { .. } => true,
        Command::Repository(c) => !c.uses_network(),
        Command::Token(_) | Command::ScopeMap(_) | Command::Credential(_) => true,
        Command::Webhook(c) => !matches!(c, auth::WebhookCmd::Ping { .. }),
        Command::Run(a) => a.dry_run,
        _ => false,
    };
    if prints_only {
        // SAFETY: called before any thread starts; restores the default action of SIGPIPE,
        // which the Rust runtime sets to ignore.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Validate(a) => return validate::validate(a),
        Command::Run(a) => run::run(a),
        Command::Build(a) => run::build(a),
        Command::Runner(c) => run::runner(c),
        Command::Registry(c) => registry::registry(c),
        Command::Repository(c) => registry::repository(c),
        Command::Import(a) => import::import(a),
        Command::Purge(a) => purge::purge(a),
        Command::Sign(a) => sign::sign(a),
        Command::Verify(a) => sign::verify(a),
        Command::GenerateKeyPair(a) => sign::generate(a),
        Command::Serve(a) => serve::serve(a),
        Command::Token(c) => auth::token(c),
        Command::ScopeMap(c) => auth::scope_map(c),
        Command::Credential(c) => auth::credential(c),
        Command::Webhook(c) => auth::webhook(c),
        Command::Replication(c) => replication::replication(c),
        Command::Task(c) => task::task(c),
        Command::Agent(a) => agent::agent(a),
        Command::AgentPool(c) => agent::agent_pool(c),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "acr-task",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod help_audit {
    use clap::CommandFactory;

    fn walk(cmd: &clap::Command, path: String, out: &mut Vec<String>) {
        let subs: Vec<_> = cmd.get_subcommands().collect();
        for a in cmd.get_arguments() {
            if a.is_hide_set() || a.get_id() == "help" || a.get_id() == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} --{}: no help", a.get_id()));
            }
        }
        if subs.is_empty() && cmd.get_after_help().is_none() {
            out.push(format!("{path}: no examples"));
        }
        for s in subs {
            walk(s, format!("{path} {}", s.get_name()), out);
        }
    }

    /// Every option says what it is, and every command shows how it is used.
    #[test]
    fn every_option_has_help_and_every_command_examples() {
        super::Cli::command().debug_assert();
        let mut out = Vec::new();
        walk(&super::Cli::command(), "acr-task".into(), &mut out);
        assert!(out.is_empty(), "{}", out.join("\n"));
    }
}
