//! `acr-task registry relocate`: every repository and tag of a source registry imported
//! into ours, in parallel, with progress, resumable (a tag the target already has at the
//! source's digest is not copied again, nor is any blob the target holds), and checked at
//! the end: every source tag must resolve to the same digest in the target.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;

use super::client::Client;
use super::manage::Backend;
use super::template::Deployed;
use super::Output;
use crate::credentials::Credentials;
use crate::registry::client::{RegistryClient, Transport};
use crate::registry::import::{ImportRequest, Imported};
use crate::template::Template;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  acr-task registry relocate --source old.example.com:5000 --dry-run
  acr-task registry relocate --source old.example.com:5000 --target https://acr.example.com --concurrency 16
  acr-task registry relocate --source 127.0.0.1:5000 --filter '^team/' -o json")]
pub struct RelocateArgs {
    /// The source registry: URL or HOST:PORT.
    #[arg(long)]
    source: String,
    /// The target: a running `acr-task serve` (URL or HOST:PORT), as its admin. Without
    /// it, a server holding --data does the imports, else this command on --data's files.
    #[arg(long, visible_alias = "server", env = "ACR_TASK_SERVER")]
    target: Option<String>,
    /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
    /// ~/.local/share/acr-task].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tags imported at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Only repositories whose name matches this regular expression.
    #[arg(long)]
    filter: Option<String>,
    /// List what would be copied; copy nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace target tags that name other content (else they are listed as failures).
    #[arg(long)]
    force: bool,
    /// Deploy this template (from `registry export`) before the copy, instead of the
    /// source's own settings.
    #[arg(long, value_name = "FILE", conflicts_with = "content_only")]
    template: Option<PathBuf>,
    /// PATH=VALUE over the settings deployed (as `registry deploy --set`).
    #[arg(long, value_name = "PATH=VALUE", conflicts_with = "content_only")]
    set: Vec<String>,
    /// Copy content only. Otherwise the settings of a source that is an acr-task server
    /// (read as its admin) are deployed first, as `registry deploy` would.
    #[arg(long)]
    content_only: bool,
    #[command(flatten)]
    login: super::import::SourceLogin,
    /// PEM certificates to trust beside the system's roots (for the source, and the target
    /// when it is a server).
    #[arg(long)]
    ca_cert: Vec<PathBuf>,
    /// Output format: table or json.
    #[arg(long, short = 'o', value_parser = super::table_or_json, default_value = "table")]
    output: Output,
}

/// One source tag and what became of it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    pub repository: String,
    pub tag: String,
    /// The source's digest when listed (None: it could not be read).
    pub digest: Option<String>,
    /// `copy`, `replace` or `present` (planned); then `copied`, `failed`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub source: String,
    pub repositories: usize,
    pub tags: usize,
    pub copied: usize,
    pub already_there: usize,
    pub failed: usize,
    pub bytes_copied: u64,
    pub blobs_copied: u64,
    pub seconds: f64,
    /// Source tags checked against the target after the copy.
    pub verified: usize,
    /// Source tags the target does not hold at the source's digest.
    pub differences: Vec<Difference>,
    /// The settings deployed before the copy (none: content only).
    pub settings: Option<Deployed>,
    pub items: Vec<Item>,
}

/// `--dry-run`'s answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRun<'a> {
    pub settings: Option<&'a Deployed>,
    pub items: &'a [Item],
}

/// The settings to deploy before the copy: `--template`'s, else the source's own when it
/// is an acr-task server (None: a registry of another kind, or `--content-only`).
fn settings_of(
    a: &RelocateArgs,
    login: Option<crate::credentials::Credential>,
) -> anyhow::Result<Option<Template>> {
    if a.content_only {
        return Ok(None);
    }
    if let Some(f) = &a.template {
        return super::template::read(f, &a.set).map(Some);
    }
    let client = Client::with_login(&a.source, login, &a.ca_cert)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let status = match rt.block_on(client.probe("/api/registry")) {
        Ok(s) => s,
        // Unreachable: the listing says so, in its words.
        Err(_) => return Ok(None),
    };
    match status.as_u16() {
        200 => {}
        401 | 403 => anyhow::bail!(
            "{} is an acr-task server, and its settings are read by its admin only: give the \
             admin's login (--username admin --password ...), or --content-only to copy the \
             content alone, or --template FILE",
            a.source
        ),
        _ => {
            if !a.set.is_empty() {
                anyhow::bail!(
                    "--set changes the settings deployed, and {} is not an acr-task server: \
                     give --template FILE",
                    a.source
                );
            }
            return Ok(None);
        }
    }
    let source = Backend::Server {
        client: client.with_tokens(),
        rt,
    };
    let t = super::template::export(&source)
        .with_context(|| format!("reading the settings of {}", a.source))?;
    if a.set.is_empty() {
        return Ok(Some(t));
    }
    let mut v = serde_json::to_value(&t)?;
    for s in &a.set {
        crate::template::apply_set(&mut v, s)?;
    }
    Ok(Some(serde_json::from_value(v).map_err(|e| {
        anyhow::anyhow!("the source's settings with --set: {e}")
    })?))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Difference {
    pub repository: String,
    pub tag: String,
    pub source: Option<String>,
    pub target: Option<String>,
}

/// Where the imports happen.
enum Target {
    Files(crate::registry::Registry),
    Server(Client),
}

impl Target {
    async fn import(&self, req: &ImportRequest, ca: &[PathBuf]) -> Result<Imported, String> {
        match self {
            Target::Files(reg) => {
                let ctx = crate::registry::import::context(
                    "acr-task-relocate",
                    String::new(),
                    String::new(),
                );
                crate::registry::import::run(reg, ca, req, ctx)
                    .await
                    .map_err(|e| e.to_string())
            }
            Target::Server(api) => {
                let body = serde_json::to_value(req).map_err(|e| e.to_string())?;
                let v = api
                    .call(reqwest::Method::POST, "/api/registry/import", Some(&body))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                serde_json::from_value(v).map_err(|e| format!("the server's import report: {e}"))
            }
        }
    }

    /// What each `(repo, tag)` names in the target now.
    async fn digests(&self, tags: &[(String, String)]) -> anyhow::Result<Vec<Option<String>>> {
        match self {
            Target::Files(reg) => {
                let mut out = Vec::with_capacity(tags.len());
                for (repo, tag) in tags {
                    out.push(reg.resolve(repo, tag).await?.map(|(d, _)| d));
                }
                Ok(out)
            }
            Target::Server(api) => {
                let images: Vec<String> = tags.iter().map(|(r, t)| format!("{r}:{t}")).collect();
                let v = api
                    .call(
                        reqwest::Method::POST,
                        "/api/registry/resolve",
                        Some(&serde_json::json!({ "images": images })),
                    )
                    .await?;
                Ok(images
                    .iter()
                    .map(|i| v[i].as_str().map(str::to_string))
                    .collect())
            }
        }
    }
}

/// `HOST[:PORT]` of a registry given as a URL or as `HOST[:PORT]`.
fn host_of(s: &str) -> String {
    let s = s.trim().trim_end_matches('/');
    let s = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
    s.split('/').next().unwrap_or(s).to_string()
}

pub fn relocate(a: RelocateArgs) -> anyhow::Result<ExitCode> {
    let filter = a
        .filter
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("--filter is not a regular expression")?;
    let host = host_of(&a.source);
    let login = a.login.credential(&host)?;
    let source = RegistryClient::new(
        host.clone(),
        Transport::new(
            &a.ca_cert,
            login
                .clone()
                .map(|c| Credentials::single(&host, c))
                .unwrap_or_default(),
        )?,
    );
    // Settings first, so the content arrives into a registry that has them (its webhooks
    // see the pushes, its tasks' base-image triggers fire).
    let settings = match settings_of(&a, login.clone())? {
        None => None,
        Some(want) => {
            let b = Backend::choose(a.target.as_deref(), a.data.clone())?;
            let d = super::template::deploy(&b, &want, a.dry_run)
                .context("deploying the settings before the copy")?;
            if a.output != Output::Json && !a.dry_run {
                println!("Settings deployed from {}:", a.source);
                super::template::print(&d, a.output)?;
            }
            Some(d)
        }
    };
    // Chosen before the runtime starts: a server backend's own runtime is dropped here.
    let backend = match Backend::choose(a.target.as_deref(), a.data.clone())? {
        Backend::Files(dir) => Err(dir),
        Backend::Server { client, rt } => {
            drop(rt);
            Ok(client)
        }
    };
    let rt = super::tokio_runtime()?;
    rt.block_on(async move {
        let target = match backend {
            Err(dir) => Target::Files(
                crate::registry::Registry::open(&dir)
                    .with_context(|| format!("opening the registry in {}", dir.display()))?,
            ),
            Ok(client) => Target::Server(client.with_tokens()),
        };
        let started = Instant::now();
        let n = a.concurrency as usize;
        let repos: Vec<String> = source
            .repositories()
            .await
            .with_context(|| format!("listing the repositories of {host}"))?
            .into_iter()
            .filter(|r| filter.as_ref().is_none_or(|f| f.is_match(r)))
            .collect();
        let mut items = list(&source, &target, &repos, n).await?;
        if a.dry_run {
            print_plan(&items, settings.as_ref(), a.output)?;
            return Ok(ExitCode::SUCCESS);
        }
        let meter = Meter::new(repos.len(), &items);
        let blobs = AtomicU64::new(0);
        let req_of = |it: &Item| ImportRequest {
            source: format!("{host}/{}:{}", it.repository, it.tag),
            images: Vec::new(),
            force: a.force,
            username: login.as_ref().map(|c| c.username.clone()),
            password: login.as_ref().map(|c| c.password.clone()),
        };
        let results: Vec<(usize, Result<Imported, String>)> = futures_util::stream::iter(
            items
                .iter()
                .enumerate()
                .filter(|(_, it)| it.state != "present"),
        )
        .map(|(i, it)| {
            let (req, target, meter, blobs, ca) = (req_of(it), &target, &meter, &blobs, &a.ca_cert);
            async move {
                let r = target.import(&req, ca).await;
                if let Ok(done) = &r {
                    blobs.fetch_add(done.blobs_copied, Ordering::Relaxed);
                }
                meter.done(i, r.as_ref().map(|d| d.bytes_copied).unwrap_or(0));
                (i, r)
            }
        })
        .buffer_unordered(n)
        .collect()
        .await;
        meter.finish();
        let mut bytes = 0;
        for (i, r) in results {
            match r {
                Ok(d) => {
                    bytes += d.bytes_copied;
                    items[i].state = "copied".into();
                }
                Err(e) => {
                    items[i].state = "failed".into();
                    items[i].error = Some(e);
                }
            }
        }
        // Every source tag, read again, against the target.
        let differences = verify(&source, &target, &items, n)
            .await
            .context("checking the target")?;
        let report = Report {
            source: host.clone(),
            repositories: repos.len(),
            tags: items.len(),
            copied: items.iter().filter(|i| i.state == "copied").count(),
            already_there: items.iter().filter(|i| i.state == "present").count(),
            failed: items.iter().filter(|i| i.state == "failed").count(),
            bytes_copied: bytes,
            blobs_copied: blobs.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs_f64(),
            verified: items.len(),
            differences,
            settings,
            items,
        };
        print_report(&report, a.output)?;
        Ok(if report.failed == 0 && report.differences.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

/// Every tag of `repos` with the source's digest and the plan for it.
async fn list(
    source: &RegistryClient,
    target: &Target,
    repos: &[String],
    n: usize,
) -> anyhow::Result<Vec<Item>> {
    let tags: Vec<anyhow::Result<Vec<(String, String)>>> = futures_util::stream::iter(repos)
        .map(|r| async move {
            let tags = source
                .tags(r)
                .await
                .with_context(|| format!("listing the tags of {r}"))?;
            Ok(tags.into_iter().map(|t| (r.clone(), t)).collect())
        })
        .buffered(n)
        .collect()
        .await;
    let mut pairs = Vec::new();
    for t in tags {
        pairs.extend(t?);
    }
    let there = target.digests(&pairs).await?;
    let digests = source_digests(source, &pairs, n).await;
    Ok(pairs
        .into_iter()
        .zip(digests)
        .zip(there)
        .map(|(((repository, tag), (digest, error)), there)| {
            let state = match (&digest, &there) {
                (Some(d), Some(t)) if d == t => "present",
                (_, Some(_)) => "replace",
                _ => "copy",
            };
            Item {
                repository,
                tag,
                digest,
                state: state.into(),
                error,
            }
        })
        .collect())
}

/// What each `(repo, tag)` names at the source now (or why it could not be read).
async fn source_digests(
    source: &RegistryClient,
    pairs: &[(String, String)],
    n: usize,
) -> Vec<(Option<String>, Option<String>)> {
    futures_util::stream::iter(pairs)
        .map(|(repository, tag)| async move {
            let image = crate::registry::reference::ImageRef {
                registry: source.addr().to_string(),
                repository: repository.clone(),
                reference: tag.clone(),
            };
            match source.manifest_digest(&image).await {
                Ok(d) => (d, None),
                Err(e) => (None, Some(e.to_string())),
            }
        })
        .buffered(n)
        .collect()
        .await
}

async fn verify(
    source: &RegistryClient,
    target: &Target,
    items: &[Item],
    n: usize,
) -> anyhow::Result<Vec<Difference>> {
    let pairs: Vec<(String, String)> = items
        .iter()
        .map(|i| (i.repository.clone(), i.tag.clone()))
        .collect();
    let there = target.digests(&pairs).await?;
    let here = source_digests(source, &pairs, n).await;
    Ok(pairs
        .into_iter()
        .zip(here)
        .zip(there)
        .filter(|((_, (s, _)), t)| s.is_none() || s != t)
        .map(|(((repository, tag), (source, _)), target)| Difference {
            repository,
            tag,
            source,
            target,
        })
        .collect())
}

/// Progress: a bar on a terminal (repositories, tags, bytes, rate, ETA), else a line every
/// few seconds.
struct Meter {
    bar: Option<indicatif::ProgressBar>,
    repos_total: usize,
    /// Per repository: tags left to import.
    left: Mutex<std::collections::HashMap<String, usize>>,
    repo_of: Vec<String>,
    tags_total: u64,
    tags_done: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    last_line: Mutex<Instant>,
}

impl Meter {
    fn new(repos_total: usize, items: &[Item]) -> Meter {
        let mut left = std::collections::HashMap::new();
        for it in items.iter().filter(|i| i.state != "present") {
            *left.entry(it.repository.clone()).or_insert(0) += 1;
        }
        let tags_total = items.iter().filter(|i| i.state != "present").count() as u64;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(tags_total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} relocating [{bar:30}] {pos}/{len} tags, {msg} ({eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Meter {
            bar,
            repos_total,
            left: Mutex::new(left),
            repo_of: items.iter().map(|i| i.repository.clone()).collect(),
            tags_total,
            tags_done: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            last_line: Mutex::new(Instant::now()),
        }
    }

    fn done(&self, item: usize, bytes: u64) {
        let tags = self.tags_done.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let repos_left = self
            .left
            .lock()
            .map(|mut l| {
                if let Some(n) = self.repo_of.get(item).and_then(|r| l.get_mut(r)) {
                    *n = n.saturating_sub(1);
                }
                l.values().filter(|n| **n > 0).count()
            })
            .unwrap_or(0);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let msg = format!(
            "{}/{} repositories, {} at {}/s",
            self.repos_total.saturating_sub(repos_left),
            self.repos_total,
            crate::tier::human(bytes),
            crate::tier::human((bytes as f64 / secs) as u64)
        );
        match &self.bar {
            Some(b) => {
                b.set_position(tags);
                b.set_message(msg);
            }
            None => {
                let Ok(mut at) = self.last_line.lock() else {
                    return;
                };
                if at.elapsed() >= Duration::from_secs(2) || tags == self.tags_total {
                    *at = Instant::now();
                    eprintln!("relocating: {tags}/{} tags, {msg}", self.tags_total);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn print_plan(items: &[Item], settings: Option<&Deployed>, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        let plan = DryRun { settings, items };
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }
    if let Some(d) = settings {
        println!("Settings:");
        super::template::print(d, output)?;
        println!();
    }
    let todo: Vec<&Item> = items.iter().filter(|i| i.state != "present").collect();
    println!("{:<8}  {:<40}  DIGEST", "ACTION", "TAG");
    for i in &todo {
        println!(
            "{:<8}  {:<40}  {}",
            i.state,
            format!("{}:{}", i.repository, i.tag),
            i.digest.as_deref().unwrap_or("(unreadable)")
        );
    }
    println!(
        "{} of {} tags would be copied ({} already there)",
        todo.len(),
        items.len(),
        items.len() - todo.len()
    );
    Ok(())
}

fn print_report(r: &Report, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    for i in r.items.iter().filter(|i| i.state == "failed") {
        println!(
            "FAILED  {}:{}: {}",
            i.repository,
            i.tag,
            i.error.as_deref().unwrap_or("")
        );
    }
    for d in &r.differences {
        println!(
            "DIFFERS {}:{}: source {}, target {}",
            d.repository,
            d.tag,
            d.source.as_deref().unwrap_or("(none)"),
            d.target.as_deref().unwrap_or("(none)")
        );
    }
    println!(
        "Relocated {} repositories from {}: {} tags copied, {} already there, {} failed; \
         {} blobs ({}) in {:.1} s; {} tags verified, {} differ",
        r.repositories,
        r.source,
        r.copied,
        r.already_there,
        r.failed,
        r.blobs_copied,
        crate::tier::human(r.bytes_copied),
        r.seconds,
        r.verified,
        r.differences.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_source_is_a_url_or_a_host() {
        assert_eq!(super::host_of("http://127.0.0.1:5000/"), "127.0.0.1:5000");
        assert_eq!(super::host_of("https://r.example.com/v2/"), "r.example.com");
        assert_eq!(super::host_of("r.example.com:443"), "r.example.com:443");
    }
}
