//! `acr-task purge`: acr-cli's `acr purge` against this registry (a server through its
//! API, else `--data`'s files), with the kept items and their reasons in the report.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::manage::Backend;
use super::Output;
use crate::registry::purge::{PurgeReport, PurgeRequest};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  acr-task purge --filter 'hello-world:.*' --ago 30d --dry-run
  acr-task purge --filter 'team/.*:^dev-' --ago 7d --keep 5 --untagged
  acr-task purge --filter '.*:.*' --ago 0d --untagged -o json")]
pub struct PurgeArgs {
    /// REPOSITORY_REGEX:TAG_REGEX (repeatable): the repository pattern matches whole
    /// names, the tag pattern anywhere in a tag, as acr purge reads them.
    #[arg(
        long,
        short = 'f',
        required = true,
        value_name = "REPO_REGEX:TAG_REGEX"
    )]
    filter: Vec<String>,
    /// Tags last pushed before this long ago: `[N]d[DURATION]`, e.g. 30d, 1d12h, 90m.
    #[arg(long, required = true)]
    ago: String,
    /// The newest this many of the tags that would go stay (per repository).
    #[arg(long, default_value_t = 0)]
    keep: usize,
    /// Also delete manifests no tag names any more (not one an index or a referrer names).
    #[arg(long, conflicts_with = "untagged_only")]
    untagged: bool,
    /// Only delete manifests no tag names (old enough, not named by an index or a
    /// referrer); no tag is deleted.
    #[arg(long)]
    untagged_only: bool,
    /// Print what would go; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Repositories purged at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    concurrency: u16,
    /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
    /// ~/.local/share/acr-task]. While a server holds it, the purge goes through that server.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A running `acr-task serve` (URL or HOST:PORT), as its admin.
    #[arg(long, env = "ACR_TASK_SERVER")]
    server: Option<String>,
    /// Output format: table or json.
    #[arg(long, short = 'o', value_parser = super::table_or_json, default_value = "table")]
    output: Output,
}

pub fn purge(a: PurgeArgs) -> anyhow::Result<ExitCode> {
    let req = PurgeRequest {
        filters: a.filter,
        ago: a.ago,
        keep: a.keep,
        untagged: a.untagged,
        untagged_only: a.untagged_only,
        dry_run: a.dry_run,
        concurrency: Some(a.concurrency as usize),
    };
    // Checked here too, so a typo is refused before any server is asked.
    for f in &req.filters {
        crate::registry::purge::parse_filter(f)?;
    }
    crate::registry::purge::parse_ago(&req.ago)?;
    let b = Backend::choose(a.server.as_deref(), a.data)?;
    let report = {
        let _shown = super::progress::Activity::start(
            if req.dry_run {
                "planning the purge"
            } else {
                "purging"
            },
            String::new,
        );
        b.purge(&req)?
    };
    print(&report, a.output)?;
    Ok(ExitCode::SUCCESS)
}

fn print(r: &PurgeReport, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let verb = if r.dry_run {
        println!("DRY RUN: what would be deleted; nothing is.");
        "Would delete"
    } else {
        "Deleted"
    };
    for t in &r.tags_deleted {
        println!("{verb}: {t}");
    }
    for m in &r.manifests_deleted {
        println!("{verb}: {m}");
    }
    for k in &r.kept {
        println!("Kept: {} ({})", k.item, k.why);
    }
    let (tags, manifests) = if r.dry_run {
        (
            "Number of tags to be deleted",
            "Number of manifests to be deleted",
        )
    } else {
        ("Number of deleted tags", "Number of deleted manifests")
    };
    println!();
    println!("{tags}: {}", r.tags_deleted.len());
    println!("{manifests}: {}", r.manifests_deleted.len());
    println!(
        "{} repositories matched; {} kept; {:.2} s",
        r.repositories,
        r.kept.len(),
        r.seconds
    );
    Ok(())
}
