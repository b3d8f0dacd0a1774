//! `acr-task registry|repository`: on the data directory's files (SQLite in WAL mode is
//! safe beside a running server), through a server that holds them, or over any
//! registry's API (`--registry`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

use super::Output;
use crate::credentials::Credentials;
use crate::registry::client::{RegistryClient, Transport};
use crate::server::manage::RegistryInfo;
use crate::store::{ManifestInfo, Store};
use crate::tier::{Change, Override, Overrides, Sku, Unlimited};
use serde_json::Value;

/// Where a registry command works: the files of `--data`, or a server.
#[derive(Debug, Clone, clap::Args)]
pub struct TierOpts {
    /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
    /// ~/.local/share/acr-task].
    #[arg(long)]
    data: Option<PathBuf>,
    /// A running `acr-task serve` (URL or HOST:PORT), as its admin. Without it, a server
    /// holding --data is asked.
    #[arg(long, env = "ACR_TASK_SERVER")]
    server: Option<String>,
    /// Output format: table, json or tsv.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub(super) output: Output,
}

impl TierOpts {
    pub(super) fn check_output(&self) -> anyhow::Result<()> {
        no_dot(self.output)
    }

    /// The files of --data or the server that serves them (or --server).
    pub(super) fn backend(&self) -> anyhow::Result<super::manage::Backend> {
        super::manage::Backend::choose(self.server.as_deref(), self.data.clone())
    }
}

/// A limit as given: a number, or `unlimited`.
fn parse_count(s: &str) -> Result<Override, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(Override::Unlimited(Unlimited::Unlimited));
    }
    s.parse::<u64>()
        .map(Override::Count)
        .map_err(|_| format!("{s:?} is not a count: give a number or `unlimited`"))
}

/// A storage limit as given: a size (`200GiB`), or `unlimited`.
fn parse_storage(s: &str) -> Result<Override, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(Override::Unlimited(Unlimited::Unlimited));
    }
    super::parse_size(s).map(Override::Count)
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCmd {
    /// The retention policy for untagged manifests (Premium): `serve` deletes manifests
    /// no tag, index or referrer names once they are older than --days, hourly.
    #[command(subcommand)]
    Retention(RetentionCmd),
    /// Content-trust policies (Premium): which repositories need images signed, by which
    /// public keys; `registry update --content-trust enabled` turns them on.
    #[command(subcommand)]
    ContentTrust(ContentTrustCmd),
}

#[derive(Debug, clap::Subcommand)]
pub enum ContentTrustCmd {
    /// Whether content trust is on, and its policies.
    #[command(after_help = "Example:\n  acr-task registry config content-trust show -o json")]
    Show {
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Protect repositories: their images must be signed by one of these keys (a policy
    /// for the same pattern is replaced).
    #[command(after_help = "Examples:
  acr-task generate-key-pair                       # cosign.key, cosign.pub
  acr-task registry config content-trust add --repository 'prod/*' --key cosign.pub
  acr-task registry update --content-trust enabled")]
    Add {
        /// A repository, `prefix/*` or `*`.
        #[arg(long)]
        repository: String,
        /// A PEM public key file (cosign's `.pub`); repeat for several keys.
        #[arg(long = "key", value_name = "PUB", required = true)]
        keys: Vec<PathBuf>,
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Remove the policy of a repository pattern.
    #[command(
        after_help = "Example:\n  acr-task registry config content-trust remove --repository 'prod/*'"
    )]
    Remove {
        /// The pattern as added.
        #[arg(long)]
        repository: String,
        #[command(flatten)]
        opts: TierOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum RetentionCmd {
    /// The policy now.
    #[command(after_help = "Example:\n  acr-task registry config retention show -o json")]
    Show {
        #[command(flatten)]
        opts: TierOpts,
    },
    #[command(after_help = "Examples:
  acr-task registry config retention update --status enabled --days 30
  acr-task registry config retention update --status disabled")]
    /// Enable or disable it, and how many days.
    Update {
        /// enabled or disabled.
        #[arg(long, value_enum)]
        status: crate::tier::PolicyStatus,
        /// Days an untagged manifest is kept, 0 to 365 [default: the policy's, else 7].
        #[arg(long)]
        days: Option<u32>,
        #[command(flatten)]
        opts: TierOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum RegistryCmd {
    /// The registry's name, tier, storage used and limit, and the tier's limits (as
    /// `az acr show`).
    #[command(after_help = "Example:\n  acr-task registry show -o json")]
    Show {
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Each limit of the tier against its current use (as `az acr show-usage`).
    #[command(after_help = "Example:\n  acr-task registry show-usage")]
    ShowUsage {
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Change the tier (Basic, Standard, Premium) or override one of its limits; on a
    /// Classic registry, upgrade it to a managed tier.
    #[command(after_help = "Examples:
  acr-task registry update --sku Standard
  acr-task registry update --storage-limit 200GiB --write-ops-limit unlimited
  acr-task registry update --sku Basic          # on Classic: upgrades it, with progress
A tier whose storage limit is below what is stored is refused, with the sizes;
an override stays across tier changes until set again (a number or `unlimited`).
On a Classic registry --sku copies every blob and manifest into managed storage,
verified, while pulls go on (pushes are refused until it completes); it is one-way,
and resumes where it was if stopped.")]
    Update {
        /// The new tier: Basic, Standard or Premium (a managed registry never becomes Classic).
        #[arg(long)]
        sku: Option<Sku>,
        /// On Classic: start the upgrade and return; `registry show` shows its progress.
        #[arg(long)]
        no_wait: bool,
        /// Storage limit (e.g. 200GiB, or `unlimited`).
        #[arg(long, value_name = "SIZE", value_parser = parse_storage)]
        storage_limit: Option<Override>,
        /// Read operations (GET, HEAD) a minute, or `unlimited`.
        #[arg(long, value_name = "N", value_parser = parse_count)]
        read_ops_limit: Option<Override>,
        /// Write operations (PUT, POST, PATCH, DELETE) a minute, or `unlimited`.
        #[arg(long, value_name = "N", value_parser = parse_count)]
        write_ops_limit: Option<Override>,
        /// Webhooks, or `unlimited`.
        #[arg(long, value_name = "N", value_parser = parse_count)]
        webhook_limit: Option<Override>,
        /// Tokens, or `unlimited`.
        #[arg(long, value_name = "N", value_parser = parse_count)]
        token_limit: Option<Override>,
        /// Scope maps, or `unlimited`.
        #[arg(long, value_name = "N", value_parser = parse_count)]
        scope_map_limit: Option<Override>,
        /// Pulls without credentials (Standard and Premium, as `az acr update`).
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
        anonymous_pull_enabled: Option<bool>,
        /// Content trust (Premium): enabled refuses pulls by tag, and runs, of unsigned
        /// images in the repositories its policies name (`registry config content-trust`).
        #[arg(long, value_enum)]
        content_trust: Option<crate::tier::PolicyStatus>,
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Encryption at rest: show, enable (in place, online), rotate-key.
    #[command(subcommand)]
    Encryption(super::encryption::EncryptionCmd),
    /// Remove unreferenced blobs and manifests (safe while pushes continue).
    #[command(
        after_help = "Examples:\n  acr-task registry gc --dry-run\n  acr-task registry gc --grace 0     # nothing is pushing"
    )]
    Gc {
        /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
        /// ~/.local/share/acr-task].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Report what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
        /// Only remove content older than this many seconds, so that a push in progress
        /// (blobs first, manifest last) is never cut short.
        #[arg(long, default_value_t = 600)]
        grace: i64,
        /// A running `acr-task serve` (URL or HOST:PORT) to collect in, as its admin.
        /// Without it, a server holding --data does the work.
        #[arg(long, env = "ACR_TASK_SERVER")]
        server: Option<String>,
        /// Output format: table, json or tsv.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
    /// Import every repository and tag of another registry, in parallel, resumable,
    /// verified at the end (exit 1 on any failure or difference).
    Relocate(super::relocate::RelocateArgs),
    /// Registry policies (like `az acr config`).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Write the registry's settings as a template (JSON): tier, anonymous pull,
    /// encryption (by key id), scope maps, tokens (no passwords), webhooks (secrets as
    /// ***), stored tasks. Its schema: schemas/registry-template.schema.json.
    #[command(after_help = "Examples:
  acr-task registry export --file registry.json
  acr-task registry export --server https://acr.example.com > registry.json")]
    Export {
        /// Write here instead of standard output.
        #[arg(long, short = 'f', value_name = "FILE")]
        file: Option<PathBuf>,
        /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
        /// ~/.local/share/acr-task].
        #[arg(long)]
        data: Option<PathBuf>,
        /// A running `acr-task serve` (URL or HOST:PORT), as its admin. Without it, a server
        /// holding --data is asked.
        #[arg(long, env = "ACR_TASK_SERVER")]
        server: Option<String>,
    },
    /// Apply a template to this registry: adds and changes, never deletes; idempotent (a
    /// second deploy changes nothing and says so); refused whole, before any change, when
    /// the registry cannot honour it.
    #[command(after_help = "Examples:
  acr-task registry deploy --template registry.json --dry-run
  acr-task registry deploy --template registry.json --set name=newregistry \\
      --set webhooks.ci.secret=\"$HOOK_SECRET\" --server https://acr2.example.com")]
    Deploy {
        /// The template (from `registry export`).
        #[arg(long, value_name = "FILE")]
        template: PathBuf,
        /// PATH=VALUE over the template: `name=x`, `tier=Premium`,
        /// `webhooks.NAME.secret=S`, `tasks.NAME.triggers.commit.secret=S`.
        #[arg(long, value_name = "PATH=VALUE")]
        set: Vec<String>,
        /// Print the differences; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Re-verify every blob digest and manifest reference. Exit 1 if anything is wrong.
    #[command(after_help = "Example:\n  acr-task registry fsck -o json")]
    Fsck {
        /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else ~/.local/share/acr-task].
        #[arg(long)]
        data: Option<PathBuf>,
        /// A running `acr-task serve` to check, as its admin.
        #[arg(long, env = "ACR_TASK_SERVER")]
        server: Option<String>,
        /// Output format: table, json or tsv.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
pub struct RepoOpts {
    /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
    /// ~/.local/share/acr-task].
    #[arg(long, conflicts_with = "registry")]
    data: Option<PathBuf>,
    /// Talk to a running registry at HOST:PORT over the API instead of opening --data
    /// (deletes then raise push/delete events; show-manifests sees tagged manifests only).
    /// HTTPS, or plain HTTP for loopback; credentials come from `docker login`.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "server")]
    registry: Option<String>,
    /// A running `acr-task serve` (URL or HOST:PORT): its registry, over the API, as the
    /// admin (`ACR_TASK_USERNAME`/`ACR_TASK_PASSWORD`, or the password a server on this
    /// machine keeps in --data). Without it, a server holding --data is used this way.
    #[arg(long)]
    server: Option<String>,
    /// With --registry or --server: also trust this CA certificate (PEM); repeatable.
    #[arg(long, value_name = "FILE")]
    ca_cert: Vec<PathBuf>,
    /// Output format: table, json or tsv.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, clap::Subcommand)]
pub enum RepositoryCmd {
    /// List repositories.
    #[command(
        after_help = "Examples:\n  acr-task repository list\n  acr-task repository list --registry myregistry.example.com"
    )]
    List {
        #[command(flatten)]
        opts: RepoOpts,
    },
    /// List the tags of a repository.
    #[command(after_help = "Example:\n  acr-task repository show-tags samples/hello -o tsv")]
    ShowTags {
        /// The repository.
        repository: String,
        #[command(flatten)]
        opts: RepoOpts,
    },
    /// List the manifests of a repository with their tags.
    #[command(after_help = "Examples:
  acr-task repository show-manifests samples/hello -o json
  acr-task repository show-manifests samples/hello --referrers   # signatures, SBOMs")]
    ShowManifests {
        /// The repository.
        repository: String,
        /// Under each manifest, the manifests that refer to it (OCI 1.1 referrers:
        /// signatures, SBOMs, attestations), with their artifact types.
        #[arg(long)]
        referrers: bool,
        #[command(flatten)]
        opts: RepoOpts,
    },
    /// Delete a repository, or (`--image`) a manifest with every tag that points to it, as
    /// `az acr repository delete` does.
    #[command(after_help = "Examples:
  acr-task repository delete app/web --yes              the repository, everything in it
  acr-task repository delete --image app/web:v1 --yes   v1's manifest and all its tags
  acr-task repository untag --image app/web:v1          only the tag v1")]
    Delete {
        /// The repository to delete whole.
        #[arg(required_unless_present = "image", conflicts_with = "image")]
        repository: Option<String>,
        /// `REPO:TAG` or `REPO@DIGEST`: delete that manifest and all its tags.
        #[arg(long)]
        image: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        opts: RepoOpts,
    },
    /// Lock or unlock a repository or (`--image`) a tag, as `az acr repository update`:
    /// write-enabled false refuses pushes over it and deletes; delete-enabled false
    /// refuses deletes. Purges keep what is locked.
    #[command(after_help = "Examples:
  acr-task repository update --name app/web --image app/web:v1 --write-enabled false
  acr-task repository update --name app/web --delete-enabled false
  acr-task repository show --name app/web -o json")]
    Update {
        /// The repository.
        #[arg(long)]
        name: String,
        /// `REPO:TAG`: the tag's attributes instead of the repository's.
        #[arg(long)]
        image: Option<String>,
        /// Pushes (over the tag, or to the repository) and deletes allowed.
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
        write_enabled: Option<bool>,
        /// Deletes allowed.
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
        delete_enabled: Option<bool>,
        #[command(flatten)]
        opts: RepoOpts,
    },
    /// A repository's (or `--image` tag's) attributes (its locks); for a tag also its
    /// manifest's digest and types, and a Helm chart's name and version.
    #[command(
        after_help = "Example:\n  acr-task repository show --name app/web --image app/web:v1"
    )]
    Show {
        /// The repository.
        #[arg(long)]
        name: String,
        /// `REPO:TAG`: that tag's attributes.
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        opts: RepoOpts,
    },
    /// Remove one tag; the manifest stays (reachable by digest, other tags kept).
    #[command(after_help = "Example:\n  acr-task repository untag --image samples/hello:v1")]
    Untag {
        /// `REPO:TAG`.
        #[arg(long)]
        image: String,
        #[command(flatten)]
        opts: RepoOpts,
    },
}

/// What `repository delete` removes.
enum DeleteTarget {
    Repository(String),
    /// A manifest (by tag or digest) with all its tags.
    Manifest {
        repo: String,
        reference: String,
    },
}

impl DeleteTarget {
    fn of(repository: Option<String>, image: Option<String>) -> anyhow::Result<DeleteTarget> {
        match (repository, image) {
            (Some(r), None) if r.contains([':', '@']) => bail!(
                "{r} names an image, not a repository: `repository delete --image {r}` deletes \
                 its manifest and all its tags; `repository untag --image {r}` removes one tag"
            ),
            (Some(r), None) => Ok(DeleteTarget::Repository(r)),
            (None, Some(i)) => {
                let (repo, reference) = split_image(&i)?;
                Ok(DeleteTarget::Manifest { repo, reference })
            }
            _ => bail!("give a repository or --image REPO:TAG|REPO@DIGEST"),
        }
    }

    fn describe(&self) -> String {
        match self {
            DeleteTarget::Repository(r) => format!("repository {r} and every image in it"),
            DeleteTarget::Manifest { repo, reference } => {
                let sep = if reference.contains(':') { '@' } else { ':' };
                format!("{repo}{sep}{reference}: its manifest and all tags that point to it")
            }
        }
    }
}

/// `REPO:TAG` or `REPO@DIGEST` into (repository, tag or digest).
fn split_image(image: &str) -> anyhow::Result<(String, String)> {
    if let Some((r, d)) = image.split_once('@') {
        return Ok((r.to_string(), d.to_string()));
    }
    match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') && !r.is_empty() && !t.is_empty() => {
            Ok((r.to_string(), t.to_string()))
        }
        _ => bail!("{image:?} is not REPO:TAG or REPO@DIGEST"),
    }
}

/// Asks before destroying: `--yes`, or an answer on the terminal; refuses when no one
/// can answer.
pub(super) fn confirm(what: &str, yes: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("this deletes {what}; add --yes to confirm (there is no terminal to ask)");
    }
    eprint!("This deletes {what}.\nAre you sure you want to continue? (y/N): ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "Yes") {
        Ok(())
    } else {
        bail!("nothing deleted")
    }
}

/// The registry inside the data directory (`--data`, the same top directory for every
/// command): `DATA/registry`. A registry directory given where its parent belongs (what
/// older versions took here) is refused with the path to give instead.
pub(super) fn data_dir(d: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let top = d.unwrap_or_else(super::default_data_dir);
    let looks_like_registry = ["meta.db", "auth.db", "webhooks.db"]
        .iter()
        .any(|f| top.join(f).exists());
    if looks_like_registry && !top.join("registry").exists() {
        let parent = top
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new(".."));
        bail!(
            "{} is a registry directory, not a data directory: --data takes the directory \
             that holds `registry/` (here: --data {})",
            top.display(),
            parent.display()
        );
    }
    Ok(top.join("registry"))
}

fn open(d: Option<PathBuf>) -> anyhow::Result<Store> {
    open_dir(&data_dir(d)?)
}

/// The registry in `dir` (the registry directory itself), which must exist.
pub(super) fn open_dir(dir: &std::path::Path) -> anyhow::Result<Store> {
    // Don't create an empty store as a side effect of a typo in --data.
    if !dir.join("meta.db").exists() && !dir.join(crate::store::SHARED_MARKER).exists() {
        bail!(
            "no registry data in {} (start one with `acr-task serve --registry-only --data {}`)",
            dir.display(),
            dir.display()
        );
    }
    Store::open(dir, false).with_context(|| format!("opening registry data in {}", dir.display()))
}

/// Print rows as an aligned table or TSV; JSON is handled by callers.
pub(super) fn print_rows(
    output: Output,
    header: &[&str],
    rows: &[Vec<String>],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Tsv => {
            for r in rows {
                writeln!(out, "{}", r.join("\t"))?;
            }
        }
        Output::Table => writeln!(out, "{}", super::render::table(header, rows))?,
        Output::Json | Output::Dot => bail!("internal: print_rows called for {output:?}"),
    }
    Ok(())
}

fn no_dot(output: Output) -> anyhow::Result<()> {
    if output == Output::Dot {
        bail!("--output dot is not supported by this command");
    }
    Ok(())
}

/// What a delete command prints: `{"deleted": WHAT}` as JSON, else `message`.
pub(super) fn print_deleted(output: Output, what: &str, message: &str) -> anyhow::Result<()> {
    if output == Output::Json {
        print_json(&serde_json::json!({ "deleted": what }))
    } else {
        println!("{message}");
        Ok(())
    }
}

pub(super) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A limit for people: a number, a size, or `unlimited`.
fn limit_text(limit: Option<u64>, size: bool) -> String {
    match limit {
        None => "unlimited".into(),
        Some(n) if size => crate::tier::human(n),
        Some(n) => n.to_string(),
    }
}

fn print_show(info: &RegistryInfo, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(info);
    }
    let l = &info.limits;
    let yes = |b: bool| if b { "yes" } else { "no (Premium)" }.to_string();
    let mut rows = vec![
        vec!["name".into(), info.name.clone()],
        vec!["sku".into(), info.sku.to_string()],
    ];
    if let Some(s) = &info.login_server {
        rows.push(vec!["loginServer".into(), s.clone()]);
    }
    if let Some(c) = &info.classic {
        rows.push(vec![
            "classicStorage".into(),
            c.storage.display().to_string(),
        ]);
        if let Some(u) = &c.upgrade {
            let state = match u.finished {
                Some(t) => format!("to {}: completed {}", u.to, crate::timefmt::rfc3339(t)),
                None => format!("to {}: {}", u.to, super::upgrade::describe(&u.progress)),
            };
            rows.push(vec!["upgrade".into(), state]);
            if let Some(e) = &u.error {
                rows.push(vec!["upgradeError".into(), e.clone()]);
            }
        }
    }
    rows.extend([
        vec![
            "storageUsed".into(),
            crate::tier::human(info.storage_used_bytes),
        ],
        vec!["storageLimit".into(), limit_text(l.storage_bytes, true)],
        vec![
            "readOpsPerMinute".into(),
            limit_text(l.read_ops_per_minute, false),
        ],
        vec![
            "writeOpsPerMinute".into(),
            limit_text(l.write_ops_per_minute, false),
        ],
        vec!["webhooks".into(), limit_text(l.webhooks, false)],
        vec!["tokens".into(), limit_text(l.tokens, false)],
        vec!["scopeMaps".into(), limit_text(l.scope_maps, false)],
        vec!["replications".into(), limit_text(l.replications, false)],
        vec!["geoReplication".into(), yes(l.geo_replication)],
        vec!["contentTrust".into(), yes(l.content_trust)],
        vec!["customerManagedKeys".into(), yes(l.customer_managed_keys)],
        vec![
            "anonymousPull".into(),
            if l.anonymous_pull {
                "yes"
            } else {
                "no (Standard, Premium)"
            }
            .into(),
        ],
    ]);
    print_rows(output, &["PROPERTY", "VALUE"], &rows)
}

fn print_usage(info: &RegistryInfo, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        // As `az acr show-usage`.
        return print_json(&serde_json::json!({ "value": info.usage }));
    }
    let rows: Vec<Vec<String>> = info
        .usage
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.limit.to_string(),
                u.current_value.to_string(),
                u.unit.clone(),
            ]
        })
        .collect();
    print_rows(output, &["NAME", "LIMIT", "CURRENT VALUE", "UNIT"], &rows)
}

fn content_trust(cmd: ContentTrustCmd) -> anyhow::Result<ExitCode> {
    let opts = match &cmd {
        ContentTrustCmd::Show { opts }
        | ContentTrustCmd::Add { opts, .. }
        | ContentTrustCmd::Remove { opts, .. } => opts.clone(),
    };
    opts.check_output()?;
    let b = opts.backend()?;
    let mut ct = b.registry_info()?.content_trust.unwrap_or_default();
    let changed = match cmd {
        ContentTrustCmd::Show { .. } => false,
        ContentTrustCmd::Add {
            repository, keys, ..
        } => {
            let mut pems = Vec::new();
            for k in &keys {
                let text = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
                let key = crate::signature::PublicKey::from_pem(&k.display().to_string(), &text)?;
                pems.push(key.to_pem());
            }
            ct.policies.retain(|p| p.repository != repository);
            ct.policies.push(crate::tier::TrustPolicy {
                repository,
                keys: pems,
            });
            true
        }
        ContentTrustCmd::Remove { repository, .. } => {
            let before = ct.policies.len();
            ct.policies.retain(|p| p.repository != repository);
            if ct.policies.len() == before {
                bail!("no content-trust policy for {repository:?} (see `registry config content-trust show`)");
            }
            true
        }
    };
    if changed {
        let info = b.change_settings(&Change {
            content_trust: Some(ct),
            ..Change::default()
        })?;
        ct = info.content_trust.unwrap_or_default();
    }
    if opts.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&ct)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Content trust: {}",
        if ct.enabled() {
            "enabled: pulls by tag and runs of unsigned images in these repositories are refused"
        } else {
            "disabled (`registry update --content-trust enabled` turns these policies on)"
        }
    );
    let rows: Vec<Vec<String>> = ct
        .policies
        .iter()
        .map(|p| {
            let ids: Vec<String> = crate::tier::ContentTrust::keys(p)
                .iter()
                .map(|k| k.id())
                .collect();
            vec![p.repository.clone(), ids.join(",")]
        })
        .collect();
    print_rows(opts.output, &["REPOSITORY", "KEYS"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

pub fn registry(cmd: RegistryCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        RegistryCmd::Show { opts } => {
            no_dot(opts.output)?;
            let b = super::manage::Backend::choose(opts.server.as_deref(), opts.data)?;
            print_show(&b.registry_info()?, opts.output)?;
            Ok(ExitCode::SUCCESS)
        }
        RegistryCmd::ShowUsage { opts } => {
            no_dot(opts.output)?;
            let b = super::manage::Backend::choose(opts.server.as_deref(), opts.data)?;
            print_usage(&b.registry_info()?, opts.output)?;
            Ok(ExitCode::SUCCESS)
        }
        RegistryCmd::Update {
            sku,
            storage_limit,
            read_ops_limit,
            write_ops_limit,
            webhook_limit,
            token_limit,
            scope_map_limit,
            anonymous_pull_enabled,
            content_trust,
            no_wait,
            opts,
        } => {
            no_dot(opts.output)?;
            let b = super::manage::Backend::choose(opts.server.as_deref(), opts.data)?;
            let content_trust = match content_trust {
                None => None,
                Some(status) => Some(crate::tier::ContentTrust {
                    status,
                    ..b.registry_info()?.content_trust.unwrap_or_default()
                }),
            };
            let change = Change {
                sku,
                anonymous_pull: anonymous_pull_enabled,
                name: None,
                retention: None,
                content_trust,
                overrides: Overrides {
                    storage_bytes: storage_limit,
                    read_ops_per_minute: read_ops_limit,
                    write_ops_per_minute: write_ops_limit,
                    webhooks: webhook_limit,
                    tokens: token_limit,
                    scope_maps: scope_map_limit,
                },
            };
            if change.is_empty() {
                bail!(
                    "nothing to change: give --sku TIER, a --*-limit, \
                     --anonymous-pull-enabled or --content-trust (see --help)"
                );
            }
            let mut info = b.change_settings(&change)?;
            if !no_wait && change.sku.is_some() {
                info = super::upgrade::follow(&b, info)?;
            }
            print_show(&info, opts.output)?;
            Ok(ExitCode::SUCCESS)
        }
        RegistryCmd::Encryption(cmd) => super::encryption::encryption(cmd),
        RegistryCmd::Gc {
            data,
            dry_run,
            grace,
            server,
            output,
        } => {
            no_dot(output)?;
            let backend = super::manage::Backend::choose(server.as_deref(), data)?;
            let r = {
                let _shown = super::progress::Activity::start("collecting garbage", String::new);
                backend.gc(grace, dry_run)?
            };
            if output == Output::Json {
                print_json(&r)?;
            } else {
                let mut rows = Vec::new();
                for m in &r.manifests {
                    rows.push(vec!["manifest".into(), m.clone()]);
                }
                for b in &r.blobs {
                    rows.push(vec!["blob".into(), b.clone()]);
                }
                for b in &r.orphan_files {
                    rows.push(vec!["orphan-file".into(), b.clone()]);
                }
                print_rows(output, &["REMOVED", "WHAT"], &rows)?;
                if output == Output::Table {
                    println!(
                        "{}{} manifests, {} blobs, {} orphan files, {} bytes freed",
                        if dry_run {
                            "(dry run) would remove "
                        } else {
                            "removed "
                        },
                        r.manifests.len(),
                        r.blobs.len(),
                        r.orphan_files.len(),
                        r.bytes_freed
                    );
                    let k = &r.kept_by_grace;
                    if k.manifests + k.blob_links + k.blobs > 0 {
                        println!(
                            "kept {} untagged manifests, {} blob links and {} blobs ({} bytes) \
                             that are unreferenced but younger than the {} s grace period (a \
                             push may still be going); the next gc removes them, or \
                             `--grace 0` now if nothing is pushing",
                            k.manifests, k.blob_links, k.blobs, k.bytes, r.grace_seconds
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RegistryCmd::Relocate(a) => super::relocate::relocate(a),
        RegistryCmd::Config(ConfigCmd::ContentTrust(cmd)) => content_trust(cmd),
        RegistryCmd::Config(ConfigCmd::Retention(cmd)) => {
            let (opts, change) = match cmd {
                RetentionCmd::Show { opts } => (opts, None),
                RetentionCmd::Update { status, days, opts } => (opts, Some((status, days))),
            };
            opts.check_output()?;
            let b = opts.backend()?;
            let info = match change {
                None => b.registry_info()?,
                Some((status, days)) => {
                    let was = b.registry_info()?.retention.unwrap_or_default();
                    let policy = crate::tier::RetentionPolicy {
                        status,
                        days: days.unwrap_or(was.days),
                    };
                    b.change_settings(&Change {
                        retention: Some(policy),
                        ..Change::default()
                    })?
                }
            };
            let p = info.retention.unwrap_or_default();
            match opts.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "type": "UntaggedManifests", "status": p.status, "days": p.days,
                    }))?
                ),
                _ => println!(
                    "Untagged manifests: {}",
                    if p.enabled() {
                        format!("kept {} day(s), then deleted (hourly)", p.days)
                    } else {
                        "kept (the policy is disabled)".to_string()
                    }
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        RegistryCmd::Export { file, data, server } => {
            let b = super::manage::Backend::choose(server.as_deref(), data)?;
            super::template::run_export(&b, file)
        }
        RegistryCmd::Deploy {
            template,
            set,
            dry_run,
            opts,
        } => {
            if opts.output == Output::Tsv {
                bail!("registry deploy prints table or json");
            }
            opts.check_output()?;
            let want = super::template::read(&template, &set)?;
            let done = super::template::deploy(&opts.backend()?, &want, dry_run)?;
            super::template::print(&done, opts.output)?;
            Ok(ExitCode::SUCCESS)
        }
        RegistryCmd::Fsck {
            data,
            server,
            output,
        } => {
            no_dot(output)?;
            let r = super::manage::Backend::choose(server.as_deref(), data)?.fsck()?;
            if output == Output::Json {
                print_json(&r)?;
            } else {
                let rows: Vec<Vec<String>> = r
                    .issues
                    .iter()
                    .map(|i| {
                        vec![
                            i.kind.clone(),
                            i.repo.clone().unwrap_or_default(),
                            i.digest.clone(),
                            i.detail.clone(),
                        ]
                    })
                    .collect();
                if !rows.is_empty() || output == Output::Tsv {
                    print_rows(output, &["ISSUE", "REPOSITORY", "DIGEST", "DETAIL"], &rows)?;
                }
                if output == Output::Table {
                    println!(
                        "checked {} blobs, {} manifests, {} tags: {}",
                        r.blobs_checked,
                        r.manifests_checked,
                        r.tags_checked,
                        if r.is_clean() {
                            "clean".to_string()
                        } else {
                            format!("{} issues", r.issues.len())
                        }
                    );
                }
            }
            Ok(if r.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A list of names (repositories, tags): a JSON array, or one column under `header`.
fn print_names(output: Output, header: &str, names: Vec<String>) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&names);
    }
    let rows: Vec<Vec<String>> = names.into_iter().map(|n| vec![n]).collect();
    print_rows(output, &[header], &rows)
}

fn manifest_rows(ms: &[ManifestInfo]) -> Vec<Vec<String>> {
    ms.iter()
        .map(|m| {
            let created = chrono::DateTime::from_timestamp(m.created, 0)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            vec![
                m.digest.clone(),
                m.tags.join(","),
                m.media_type.clone(),
                artifact_column(m.artifact_type.as_deref()),
                m.size.to_string(),
                created,
            ]
        })
        .collect()
}

/// A manifest that refers to another (its `subject`), as `show-manifests --referrers` lists.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Referrer {
    digest: String,
    media_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    size: u64,
}

/// Manifests (their table row and JSON) each followed by its referrers; a manifest listed
/// as another's referrer is shown only there. `created`: the rows have a CREATED column.
fn print_with_referrers(
    output: Output,
    created: bool,
    listed: Vec<(Vec<String>, Value)>,
    referrers: Vec<Vec<Referrer>>,
) -> anyhow::Result<()> {
    let nested: std::collections::HashSet<String> = referrers
        .iter()
        .flatten()
        .map(|r| r.digest.clone())
        .collect();
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for ((row, mut v), refs) in listed.into_iter().zip(referrers) {
        if nested.contains(&row[0]) {
            continue;
        }
        rows.push(row);
        for r in &refs {
            let mut line = vec![
                format!("  \u{2514} {}", r.digest),
                "(referrer)".to_string(),
                r.media_type.clone(),
                r.artifact_type.clone().unwrap_or_default(),
                r.size.to_string(),
            ];
            if created {
                line.push(String::new());
            }
            rows.push(line);
        }
        v["referrers"] = serde_json::to_value(&refs)?;
        json.push(v);
    }
    if output == Output::Json {
        return print_json(&json);
    }
    let mut header = vec!["DIGEST", "TAGS", "MEDIA TYPE", "ARTIFACT TYPE", "SIZE"];
    if created {
        header.push("CREATED");
    }
    print_rows(output, &header, &rows)
}

/// The artifact type column: empty for container images, whose config type says nothing
/// a reader needs.
fn artifact_column(artifact_type: Option<&str>) -> String {
    artifact_type
        .filter(|a| !crate::registry::IMAGE_CONFIG_TYPES.contains(a))
        .unwrap_or_default()
        .to_string()
}

impl RepositoryCmd {
    /// Whether it talks to a registry over its API (`--registry`).
    pub fn uses_network(&self) -> bool {
        let o = self.opts();
        o.registry.is_some() || o.server.is_some()
    }

    fn opts(&self) -> &RepoOpts {
        match self {
            RepositoryCmd::List { opts }
            | RepositoryCmd::ShowTags { opts, .. }
            | RepositoryCmd::ShowManifests { opts, .. }
            | RepositoryCmd::Delete { opts, .. }
            | RepositoryCmd::Update { opts, .. }
            | RepositoryCmd::Show { opts, .. }
            | RepositoryCmd::Untag { opts, .. } => opts,
        }
    }
}

/// `repository update` and `repository show`: locks are acr-task's own, kept by the
/// server (or on the files), not in the distribution API.
fn attributes(cmd: RepositoryCmd) -> anyhow::Result<ExitCode> {
    let (name, image, change, opts) = match cmd {
        RepositoryCmd::Update {
            name,
            image,
            write_enabled,
            delete_enabled,
            opts,
        } => (name, image, Some((write_enabled, delete_enabled)), opts),
        RepositoryCmd::Show { name, image, opts } => (name, image, None, opts),
        _ => bail!("internal error: not an attributes command"),
    };
    if opts.registry.is_some() {
        bail!("locks are kept by acr-task: give --server URL or --data DIR, not --registry");
    }
    let tag = match &image {
        None => None,
        Some(i) => {
            let (repo, tag) = split_image(i)?;
            if repo != name || tag.starts_with("sha256:") || tag.starts_with("sha512:") {
                bail!("--image {i}: give a tag of {name}, as {name}:TAG");
            }
            Some(tag)
        }
    };
    let b = super::manage::Backend::choose(opts.server.as_deref(), opts.data.clone())?;
    let current = |b: &super::manage::Backend| -> anyhow::Result<crate::store::Attributes> {
        Ok(b.locks(&name)?
            .into_iter()
            .find(|l| l.tag == tag)
            .map(|l| l.attributes)
            .unwrap_or_default())
    };
    let mut a = current(&b)?;
    if let Some((w, d)) = change {
        if w.is_none() && d.is_none() {
            bail!("nothing to change: give --write-enabled BOOL and/or --delete-enabled BOOL");
        }
        a.write_enabled = w.unwrap_or(a.write_enabled);
        a.delete_enabled = d.unwrap_or(a.delete_enabled);
        b.set_lock(&name, tag.as_deref(), a)?;
        a = current(&b)?;
    }
    // A tag's image: its manifest, and a Helm chart's name and version.
    let summary = match &tag {
        Some(t) => Some(b.image(&name, t)?),
        None => None,
    };
    let item = image.unwrap_or(name);
    match opts.output {
        Output::Json => {
            let mut v = serde_json::json!({ "name": item, "changeableAttributes": a });
            if let Some(s) = &summary {
                if let (Some(o), serde_json::Value::Object(more)) =
                    (v.as_object_mut(), serde_json::to_value(s)?)
                {
                    o.extend(more);
                }
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        _ => {
            println!(
                "{item}: write-enabled {}, delete-enabled {}",
                a.write_enabled, a.delete_enabled
            );
            if let Some(s) = &summary {
                println!("digest: {}", s.digest);
                println!("media type: {}", s.media_type);
                if let Some(t) = &s.artifact_type {
                    println!("artifact type: {t}");
                }
                if let Some(c) = &s.chart {
                    println!("Helm chart: {} {}", c.name, c.version);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The server to go through: `--server`, or the one holding `--data` now (its deletes
/// then raise events and webhooks, as any other client's).
fn server_of(opts: &RepoOpts) -> anyhow::Result<Option<super::client::Client>> {
    let top = opts.data.clone().unwrap_or_else(super::default_data_dir);
    if let Some(s) = &opts.server {
        return Ok(Some(super::client::Client::with_data(s, &top)));
    }
    if opts.registry.is_some() {
        return Ok(None);
    }
    data_dir(opts.data.clone())?;
    Ok(super::client::holding(&top))
}

pub fn repository(cmd: RepositoryCmd) -> anyhow::Result<ExitCode> {
    let opts = cmd.opts();
    no_dot(opts.output)?;
    if let RepositoryCmd::Update { .. } | RepositoryCmd::Show { .. } = &cmd {
        return attributes(cmd);
    }
    let remote = match (&opts.registry, server_of(opts)?) {
        (Some(addr), _) => Some((addr.clone(), Credentials::from_docker_config()?)),
        (None, Some(client)) => {
            // The registry API deletes a repository manifest by manifest: refuse a locked
            // one whole, before the first delete, as on the files.
            if let RepositoryCmd::Delete {
                repository: Some(repo),
                image: None,
                ..
            } = &cmd
            {
                let b = super::manage::Backend::choose(opts.server.as_deref(), opts.data.clone())?;
                let denies = |a: &crate::store::Attributes| !(a.write_enabled && a.delete_enabled);
                if let Some(l) = b.locks(repo)?.into_iter().find(|l| denies(&l.attributes)) {
                    let item = match &l.tag {
                        Some(t) => format!("{repo}:{t}"),
                        None => repo.clone(),
                    };
                    bail!(
                        "{item} is locked (write-enabled {}, delete-enabled {}): nothing was \
                         deleted; unlock it first with `acr-task repository update`",
                        l.attributes.write_enabled,
                        l.attributes.delete_enabled
                    );
                }
            }
            let addr = client.host_port()?;
            let creds = match client.login() {
                Some(c) => Credentials::single(&addr, c),
                None => Credentials::default(),
            };
            Some((addr, creds))
        }
        (None, None) => None,
    };
    if let Some((addr, creds)) = remote {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let transport = Transport::new(&opts.ca_cert, creds)?;
        return rt.block_on(repository_http(cmd, RegistryClient::new(addr, transport)));
    }
    match cmd {
        c @ (RepositoryCmd::Update { .. } | RepositoryCmd::Show { .. }) => return attributes(c),
        RepositoryCmd::List { opts } => {
            no_dot(opts.output)?;
            let repos = open(opts.data)?.list_repositories(None, None)?;
            print_names(opts.output, "REPOSITORY", repos)?;
        }
        RepositoryCmd::ShowTags { repository, opts } => {
            no_dot(opts.output)?;
            let Some(tags) = open(opts.data)?.list_tags(&repository, None, None)? else {
                bail!("repository {repository} not found");
            };
            print_names(opts.output, "TAG", tags)?;
        }
        RepositoryCmd::ShowManifests {
            repository,
            referrers,
            opts,
        } => {
            no_dot(opts.output)?;
            let store = open(opts.data)?;
            let Some(ms) = store.list_manifests(&repository)? else {
                bail!("repository {repository} not found");
            };
            if referrers {
                let mut found = Vec::new();
                for m in &ms {
                    let rs = store.referrers(&repository, &m.digest)?;
                    found.push(
                        rs.into_iter()
                            .map(|r| Referrer {
                                digest: r.digest,
                                media_type: r.media_type,
                                artifact_type: r.artifact_type,
                                size: r.size,
                            })
                            .collect(),
                    );
                }
                let listed: Vec<(Vec<String>, Value)> = ms
                    .iter()
                    .map(|m| {
                        let row = manifest_rows(std::slice::from_ref(m)).remove(0);
                        (row, serde_json::to_value(m).unwrap_or_default())
                    })
                    .collect();
                print_with_referrers(opts.output, true, listed, found)?;
            } else if opts.output == Output::Json {
                print_json(&ms)?;
            } else {
                print_rows(
                    opts.output,
                    &[
                        "DIGEST",
                        "TAGS",
                        "MEDIA TYPE",
                        "ARTIFACT TYPE",
                        "SIZE",
                        "CREATED",
                    ],
                    &manifest_rows(&ms),
                )?;
            }
        }
        RepositoryCmd::Delete {
            repository,
            image,
            yes,
            opts,
        } => {
            let target = DeleteTarget::of(repository, image)?;
            let store = open(opts.data)?;
            confirm(&target.describe(), yes)?;
            let (name, msg) = delete(&store, &target)?;
            print_deleted(opts.output, &name, &msg)?;
        }
        RepositoryCmd::Untag { image, opts } => {
            let (repo, tag) = split_image(&image)?;
            if tag.contains(':') {
                bail!("untag takes REPO:TAG; to delete a manifest by digest use `repository delete --image {image}`");
            }
            let store = open(opts.data)?;
            let ctx = crate::registry::service::cli_context();
            let Some(ev) = crate::registry::service::delete_tag(&store, &repo, &tag, &ctx)? else {
                bail!("tag {image} not found");
            };
            let d = ev.event.digest;
            print_deleted(
                opts.output,
                &image,
                &format!("untagged {image} (its manifest {d} stays)"),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn repository_http(cmd: RepositoryCmd, client: RegistryClient) -> anyhow::Result<ExitCode> {
    match cmd {
        c @ (RepositoryCmd::Update { .. } | RepositoryCmd::Show { .. }) => return attributes(c),
        RepositoryCmd::List { opts } => {
            let repos = client.repositories().await?;
            print_names(opts.output, "REPOSITORY", repos)?;
        }
        RepositoryCmd::ShowTags { repository, opts } => {
            let tags = client.tags(&repository).await?;
            print_names(opts.output, "TAG", tags)?;
        }
        RepositoryCmd::ShowManifests {
            repository,
            referrers,
            opts,
        } => {
            let ms = client.manifests(&repository).await?;
            if referrers {
                let mut found = Vec::new();
                for m in &ms {
                    let ds = client.referrers(&repository, &m.digest, None).await?;
                    found.push(
                        ds.iter()
                            .map(|d| Referrer {
                                digest: d["digest"].as_str().unwrap_or_default().to_string(),
                                media_type: d["mediaType"].as_str().unwrap_or_default().to_string(),
                                artifact_type: d["artifactType"].as_str().map(str::to_string),
                                size: d["size"].as_u64().unwrap_or_default(),
                            })
                            .collect(),
                    );
                }
                let listed: Vec<(Vec<String>, Value)> = ms
                    .iter()
                    .map(|m| {
                        let row = vec![
                            m.digest.clone(),
                            m.tags.join(","),
                            m.media_type.clone(),
                            artifact_column(m.artifact_type.as_deref()),
                            m.size.to_string(),
                        ];
                        (row, serde_json::to_value(m).unwrap_or_default())
                    })
                    .collect();
                print_with_referrers(opts.output, false, listed, found)?;
            } else if opts.output == Output::Json {
                print_json(&ms)?;
            } else {
                let rows: Vec<Vec<String>> = ms
                    .iter()
                    .map(|m| {
                        vec![
                            m.digest.clone(),
                            m.tags.join(","),
                            m.media_type.clone(),
                            artifact_column(m.artifact_type.as_deref()),
                            m.size.to_string(),
                        ]
                    })
                    .collect();
                print_rows(
                    opts.output,
                    &["DIGEST", "TAGS", "MEDIA TYPE", "ARTIFACT TYPE", "SIZE"],
                    &rows,
                )?;
            }
        }
        RepositoryCmd::Delete {
            repository,
            image,
            yes,
            opts,
        } => {
            let target = DeleteTarget::of(repository, image)?;
            confirm(&target.describe(), yes)?;
            let (name, msg) = match target {
                DeleteTarget::Manifest { repo, reference } => {
                    let digest = if reference.contains(':') {
                        reference.clone()
                    } else {
                        let image = crate::registry::reference::ImageRef {
                            registry: client.addr().to_string(),
                            repository: repo.clone(),
                            reference: reference.clone(),
                        };
                        client
                            .manifest_digest(&image)
                            .await?
                            .ok_or_else(|| anyhow::anyhow!("tag {repo}:{reference} not found"))?
                    };
                    client.delete_manifest(&repo, &digest).await?;
                    (
                        format!("{repo}@{digest}"),
                        format!("deleted {repo}@{digest} with all its tags"),
                    )
                }
                DeleteTarget::Repository(repo) => {
                    // The API has no repository delete: remove every tagged manifest.
                    let ms = client.manifests(&repo).await?;
                    for m in &ms {
                        client.delete_manifest(&repo, &m.digest).await?;
                    }
                    let msg = format!(
                        "deleted {} manifests of {repo} (untagged manifests remain until gc)",
                        ms.len()
                    );
                    (repo, msg)
                }
            };
            print_deleted(opts.output, &name, &msg)?;
        }
        RepositoryCmd::Untag { image, opts } => {
            let (repo, tag) = split_image(&image)?;
            // Distribution's DELETE by tag removes only the tag.
            client.delete_manifest(&repo, &tag).await?;
            print_deleted(opts.output, &image, &format!("untagged {image}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Deletes in the store; returns what was deleted (its name) and a sentence saying so.
fn delete(store: &Store, target: &DeleteTarget) -> anyhow::Result<(String, String)> {
    match target {
        DeleteTarget::Manifest { repo, reference } => {
            let digest = if reference.contains(':') {
                reference.clone()
            } else {
                store
                    .get_manifest(repo, &crate::store::Reference::Tag(reference.clone()))?
                    .map(|m| m.digest)
                    .ok_or_else(|| anyhow::anyhow!("tag {repo}:{reference} not found"))?
            };
            let name = format!("{repo}@{digest}");
            // Through the registry's service: the delete events reach webhooks and the
            // base-image trigger as an API delete's do.
            let ctx = crate::registry::service::cli_context();
            match crate::registry::service::delete_manifest(store, repo, &digest, &ctx)? {
                Some(events) => {
                    let tags: Vec<String> =
                        events.iter().filter_map(|e| e.event.tag.clone()).collect();
                    if tags.is_empty() {
                        Ok((name.clone(), format!("deleted {name}")))
                    } else {
                        Ok((
                            name.clone(),
                            format!("deleted {name} and its tags {}", tags.join(", ")),
                        ))
                    }
                }
                None => bail!("manifest {name} not found"),
            }
        }
        DeleteTarget::Repository(repo) => {
            let ctx = crate::registry::service::cli_context();
            if crate::registry::service::delete_repository(store, repo, &ctx)?.is_some() {
                Ok((
                    repo.clone(),
                    format!("deleted repository {repo} (run `acr-task registry gc` to free space)"),
                ))
            } else {
                bail!("repository {repo} not found")
            }
        }
    }
}
