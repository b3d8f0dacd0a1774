//! The `acr` personality: what the `acr` image alias runs inside a step (ACR maps it to
//! acr-cli). The acr image (`runners/acr`) carries this binary as `/usr/local/bin/acr`;
//! invoked by that name it speaks acr-cli's command line (`-r/--registry`, `-u`, `-p`,
//! `tag list|delete`, `manifest list|delete`, `purge`, `version`), and the registry defaults to
//! `$ACR_DEFAULT_REGISTRY`, which the executor sets to the run's registry.
//!
//! A run's registry on the host's loopback is not reachable from a container; the executor
//! then sets `ACR_TASK_RELAY=LISTEN=TARGET`, and this process relays `LISTEN` (the
//! registry's own address, inside the container's network namespace) to `TARGET` (the
//! executor's relay on the run network's gateway), so names and `Host` headers stay those
//! of `.Run.Registry`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::credentials::{Credential, Credentials};
use crate::registry::client::{RegistryClient, Transport};

use crate::relay::{DEFAULT_REGISTRY_ENV, PASSWORD_ENV, RELAY_ENV, USERNAME_ENV};

#[derive(Debug, Parser)]
#[command(
    name = "acr",
    version,
    about = "The Azure Container Registry CLI, as acr-task's `acr` image provides it"
)]
struct AcrCli {
    /// Registry (`HOST:PORT`); default `$ACR_DEFAULT_REGISTRY`, the run's registry in a task.
    #[arg(short = 'r', long, global = true)]
    registry: Option<String>,
    /// Registry user name.
    #[arg(short = 'u', long, global = true)]
    username: Option<String>,
    /// Registry password.
    #[arg(short = 'p', long, global = true)]
    password: Option<String>,
    #[command(subcommand)]
    command: AcrCmd,
}

#[derive(Debug, Subcommand)]
enum AcrCmd {
    /// Manage tags inside a repository.
    #[command(subcommand)]
    Tag(Listing),
    /// Manage manifests inside a repository.
    #[command(subcommand)]
    Manifest(Listing),
    /// Print the version.
    Version,
    /// Delete tags older than --ago that match a filter (and, with --untagged, manifests
    /// no tag names), keeping the newest --keep; a digest an index or a referrer needs stays.
    Purge {
        /// `REPOSITORY_REGEX:TAG_REGEX` (repeatable).
        #[arg(long = "filter", required = true)]
        filters: Vec<String>,
        /// Only tags last updated longer ago than this: days and/or a duration (`30d`,
        /// `1d12h`, `0d`).
        #[arg(long)]
        ago: String,
        /// Keep the newest N matching tags.
        #[arg(long, default_value_t = 0)]
        keep: usize,
        /// Also delete manifests no tag, index or referrer names.
        #[arg(long)]
        untagged: bool,
        /// Only delete such manifests, no tags.
        #[arg(long)]
        untagged_only: bool,
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Accepted for acr-cli's command line; deletes go one at a time.
        #[arg(long, default_value_t = 5)]
        concurrency: usize,
    },
}

#[derive(Debug, Subcommand)]
enum Listing {
    /// List them.
    List {
        #[arg(long)]
        repository: String,
    },
    /// Delete the given tags (or digests).
    Delete {
        #[arg(long)]
        repository: String,
        #[arg(required = true)]
        references: Vec<String>,
    },
}

/// True when this process was started as `acr`.
pub fn invoked_as_acr() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|n| n == "acr"))
        .unwrap_or(false)
}

pub fn main() -> ExitCode {
    let cli = AcrCli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: AcrCli) -> anyhow::Result<()> {
    let registry = match (&cli.command, cli.registry.clone()) {
        (AcrCmd::Version, _) => {
            println!("acr-task {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        (_, Some(r)) => r,
        (_, None) => std::env::var(DEFAULT_REGISTRY_ENV).map_err(|_| {
            anyhow::anyhow!("unable to determine registry name, please use --registry flag")
        })?,
    };
    if let Ok(relay) = std::env::var(RELAY_ENV) {
        start_relay(&relay).await?;
    }
    let creds = match (cli.username, cli.password) {
        (Some(username), Some(password)) => {
            Credentials::single(&registry, Credential { username, password })
        }
        (None, None) => {
            let mut c = Credentials::from_docker_config()?;
            // The run's own login, for its own registry only.
            if let (Ok(username), Ok(password), Ok(default)) = (
                std::env::var(USERNAME_ENV),
                std::env::var(PASSWORD_ENV),
                std::env::var(DEFAULT_REGISTRY_ENV),
            ) {
                c.set(&default, Credential { username, password });
            }
            c
        }
        _ => bail!("give both --username and --password, or neither"),
    };
    let client = RegistryClient::new(registry.clone(), Transport::new(&[], creds)?);
    match cli.command {
        AcrCmd::Tag(Listing::List { repository }) => {
            let tags = client.tags(&repository).await?;
            println!("Listing tags for the {repository:?} repository:");
            for t in tags {
                println!("{registry}/{repository}:{t}");
            }
        }
        AcrCmd::Manifest(Listing::List { repository }) => {
            let ms = client.manifests(&repository).await?;
            println!("Listing manifests for the {repository:?} repository:");
            for m in ms {
                println!("{registry}/{repository}@{}", m.digest);
            }
        }
        AcrCmd::Tag(Listing::Delete {
            repository,
            references,
        })
        | AcrCmd::Manifest(Listing::Delete {
            repository,
            references,
        }) => {
            for r in references {
                client.delete_manifest(&repository, &r).await?;
                let sep = if r.contains(':') { '@' } else { ':' };
                println!("{registry}/{repository}{sep}{r}");
            }
        }
        AcrCmd::Purge {
            filters,
            ago,
            keep,
            untagged,
            untagged_only,
            dry_run,
            concurrency,
        } => {
            let req = crate::registry::purge::PurgeRequest {
                filters,
                ago,
                keep,
                untagged,
                untagged_only,
                dry_run,
                concurrency: Some(concurrency),
            };
            if dry_run {
                println!(
                    "DRY RUN: The following output shows what WOULD be deleted if the purge \
                     command was executed. Nothing is deleted."
                );
            }
            let host = registry.clone();
            let say = move |item: String| println!("{host}/{item}");
            let report = crate::registry::purge_remote::run(&client, &req, &say).await?;
            for k in &report.kept {
                println!("kept {}: {}", k.item, k.why);
            }
            println!("Number of deleted tags: {}", report.tags_deleted.len());
            println!(
                "Number of deleted manifests: {}",
                report.manifests_deleted.len()
            );
        }
        AcrCmd::Version => {}
    }
    Ok(())
}

/// Listens on `LISTEN` and forwards every connection to `TARGET` until the process ends.
async fn start_relay(spec: &str) -> anyhow::Result<()> {
    let Some((listen, target)) = spec.split_once('=') else {
        bail!("{RELAY_ENV} is not LISTEN=TARGET: {spec}");
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("relaying the run's registry: listening on {listen}"))?;
    let target: Vec<std::net::SocketAddr> = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("relaying the run's registry: resolving {target}"))?
        .collect();
    // Only this container's own processes reach its loopback.
    tokio::spawn(crate::relay::forward(listener, target, |_| true));
    Ok(())
}
