//! `acr-task import`, as `az acr import`: the target registry copies an image from another
//! registry's API (a running server does it itself; otherwise this process opens the
//! registry's files and does it the same way).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::Output;
use crate::credentials::Credential;
use crate::registry::import::{ImportRequest, Imported};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  acr-task import --source registry.example.com:5000/team/app:1.0
  acr-task import --source 127.0.0.1:5000/app@sha256:3f2... --image mirror/app:stable --image mirror/app:1.0
  acr-task import --source other.example.com/app:1.0 --username puller --password \"$PW\" --force
  acr-task import --source 127.0.0.1:5000/app:1.0 --registry https://acr.example.com -o json")]
pub struct ImportArgs {
    /// The image to import: REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@DIGEST.
    #[arg(long)]
    source: String,
    /// Where it goes: REPOSITORY:TAG, REPOSITORY (the source's tag) or REPOSITORY@DIGEST;
    /// repeat for several tags. Default: the source's repository and tag.
    #[arg(long = "image", short = 't')]
    images: Vec<String>,
    #[command(flatten)]
    login: SourceLogin,
    /// Replace a target tag that names other content.
    #[arg(long)]
    force: bool,
    /// The target: a running `acr-task serve` (URL or HOST:PORT), as its admin. Without
    /// it, a server holding --data does the import, else this command on --data's files.
    #[arg(long, visible_alias = "server", env = "ACR_TASK_SERVER")]
    registry: Option<String>,
    /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
    /// ~/.local/share/acr-task].
    #[arg(long)]
    data: Option<PathBuf>,
    /// PEM certificates to trust for the source, beside the system's roots (on the files;
    /// a server trusts what `serve --ca-cert` gave it).
    #[arg(long)]
    ca_cert: Vec<PathBuf>,
    /// Output format: table or json.
    #[arg(long, short = 'o', value_parser = super::table_or_json, default_value = "table")]
    output: Output,
}

/// The source registry's login, as `import` and `registry relocate` take it.
#[derive(Debug, Args)]
pub(super) struct SourceLogin {
    /// The source registry's user name (default: `docker login`'s credentials for it).
    #[arg(long, short = 'u')]
    username: Option<String>,
    /// The source registry's password or token (or ACR_TASK_SOURCE_PASSWORD).
    #[arg(
        long,
        short = 'p',
        env = "ACR_TASK_SOURCE_PASSWORD",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    password: Option<String>,
}

impl SourceLogin {
    /// The login given, else `docker login`'s for `host` (read here: a server never uses
    /// its own for a caller), else none.
    pub(super) fn credential(&self, host: &str) -> anyhow::Result<Option<Credential>> {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Ok(Some(Credential {
                username: u.clone(),
                password: p.clone(),
            })),
            (None, None) if host.is_empty() => Ok(None),
            (None, None) => Ok(crate::credentials::Credentials::from_docker_config()
                .context("reading docker login's credentials")?
                .get(host)),
            _ => anyhow::bail!("--username and --password go together"),
        }
    }
}

use super::progress::Activity;

pub fn import(a: ImportArgs) -> anyhow::Result<ExitCode> {
    let host = crate::registry::reference::ImageRef::parse(&a.source)
        .map(|s| s.api_host().to_string())
        .unwrap_or_default();
    let login = a.login.credential(&host)?;
    let req = ImportRequest {
        source: a.source.clone(),
        images: a.images.clone(),
        force: a.force,
        username: login.as_ref().map(|c| c.username.clone()),
        password: login.map(|c| c.password),
    };
    let done = match super::manage::Backend::choose(a.registry.as_deref(), a.data.clone())? {
        super::manage::Backend::Files(dir) => {
            let rt = super::tokio_runtime()?;
            rt.block_on(async {
                let reg = crate::registry::Registry::open(&dir)
                    .with_context(|| format!("opening the registry in {}", dir.display()))?;
                let ctx = crate::registry::import::context(
                    "acr-task-import",
                    String::new(),
                    String::new(),
                );
                let job = std::sync::Arc::new(crate::registry::import::prepare(
                    &reg, &a.ca_cert, &req, ctx,
                )?);
                let seen = job.clone();
                let _shown = Activity::start("importing", move || {
                    let t = &seen.importer.total;
                    let n = |a: &std::sync::atomic::AtomicU64| {
                        a.load(std::sync::atomic::Ordering::Relaxed)
                    };
                    format!(
                        "{} manifests, {} blobs copied ({}), {} already here",
                        n(&t.manifests),
                        n(&t.blobs_copied),
                        crate::tier::human(n(&t.bytes_copied)),
                        n(&t.blobs_present)
                    )
                });
                job.run().await.map_err(anyhow::Error::from)
            })?
        }
        server => {
            // The server copies; only the time can be shown.
            let _shown = Activity::start("importing", String::new);
            server.import(&req)?
        }
    };
    print(&done, a.output)?;
    Ok(ExitCode::SUCCESS)
}

fn print(d: &Imported, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(d)?);
        return Ok(());
    }
    println!(
        "Imported {} ({}) as {}",
        d.source,
        d.digest,
        d.targets.join(", ")
    );
    println!(
        "  manifests: {} stored, {} already there; referrers: {}",
        d.manifests, d.manifests_present, d.referrers
    );
    println!(
        "  blobs: {} copied ({}), {} already there; {:.1} s",
        d.blobs_copied,
        crate::tier::human(d.bytes_copied),
        d.blobs_present,
        d.seconds
    );
    Ok(())
}
