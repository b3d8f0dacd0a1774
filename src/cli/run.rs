//! `acr-task run`, `acr-task build`, `acr-task runner`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::Output;

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
    /// Registry to push to (`HOST:PORT`). Default: the integrated registry, started in-process.
    #[arg(long)]
    pub registry: Option<String>,
    /// Print the rendered plan (levels, dependencies, critical path) without touching Docker.
    #[arg(long)]
    pub dry_run: bool,
    /// Most steps running at once.
    #[arg(long, default_value_t = 8)]
    pub max_parallel: usize,
    /// Data directory of the integrated registry.
    #[arg(long)]
    pub data: Option<PathBuf>,
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
    Build,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not yet")
}
pub fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not yet")
}
pub fn runner(cmd: RunnerCmd) -> anyhow::Result<ExitCode> {
    let _ = cmd;
    anyhow::bail!("not yet")
}
