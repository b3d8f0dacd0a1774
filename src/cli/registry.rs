//! `acr-task registry|repository|serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use super::Output;

#[derive(Debug, clap::Subcommand)]
pub enum RegistryCmd {
    /// Remove unreferenced blobs and manifests.
    Gc {
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Re-verify every blob digest and manifest reference.
    Fsck {
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum RepositoryCmd {
    List,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub registry_only: bool,
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    #[arg(long)]
    pub data: Option<PathBuf>,
}

pub fn registry(cmd: RegistryCmd) -> anyhow::Result<ExitCode> {
    let _ = cmd;
    anyhow::bail!("not yet")
}
pub fn repository(cmd: RepositoryCmd) -> anyhow::Result<ExitCode> {
    let _ = cmd;
    anyhow::bail!("not yet")
}
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not yet")
}
