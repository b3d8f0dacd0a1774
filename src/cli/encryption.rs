//! `acr-task registry encryption show|enable|rotate-key`: encryption at rest of the
//! managed store, its key, and the jobs that seal a store in place or re-wrap its data
//! keys, with their progress until they complete.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::manage::Backend;
use super::registry::{print_json, print_rows, TierOpts};
use super::upgrade::{describe, Meter};
use super::Output;
use crate::server::manage::EncryptionInfo;

#[derive(Debug, clap::Subcommand)]
pub enum EncryptionCmd {
    /// Whether the registry is encrypted at rest, and which key is in use (its
    /// fingerprint and where it is kept; never the key).
    #[command(after_help = "Example:\n  acr-task registry encryption show -o json")]
    Show {
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Encrypt a registry stored unencrypted (one made before encryption at rest), in
    /// place and online: pulls go on, new content is sealed at once, what is stored is
    /// sealed blob by blob; resumable.
    #[command(after_help = "Example:\n  acr-task registry encryption enable")]
    Enable {
        /// Return once it has started; `encryption show` shows its progress.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        opts: TierOpts,
    },
    /// Re-wrap every data key with a new registry key, without rewriting content. A
    /// managed key: a new one is made. A customer-managed key: put the new key first in
    /// the key file, keeping the old one below it until the rotation completes.
    #[command(after_help = "Example:\n  acr-task registry encryption rotate-key")]
    RotateKey {
        /// Return once it has started; `encryption show` shows its progress.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        opts: TierOpts,
    },
}

fn print(info: &EncryptionInfo, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(info);
    }
    let mut rows = vec![vec!["state".to_string(), info.state.clone()]];
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            rows.push(vec![k.to_string(), v]);
        }
    };
    add(
        "keySource",
        info.key_source.map(|s| match s {
            crate::tier::KeySource::Managed => "managed by acr-task".to_string(),
            crate::tier::KeySource::CustomerManaged => "customer-managed".to_string(),
        }),
    );
    add("keyId", info.key_id.clone());
    add("keyFile", info.key_file.clone());
    add("rotatingFrom", info.rotating_from.clone());
    add("progress", info.progress.as_ref().map(describe));
    add("error", info.error.clone());
    add("algorithm", Some(info.algorithm.clone()));
    print_rows(output, &["PROPERTY", "VALUE"], &rows)
}

fn pending(info: &EncryptionInfo) -> bool {
    info.state == "encrypting" || info.state == "rotating"
}

/// Runs (on the files alone) or follows (a server runs it) the job until it completes.
fn follow(b: &Backend, info: EncryptionInfo) -> anyhow::Result<EncryptionInfo> {
    if !pending(&info) {
        return Ok(info);
    }
    let what = if info.state == "encrypting" {
        "encrypting"
    } else {
        "re-wrapping data keys"
    };
    let meter = Meter::new(what);
    let started = Instant::now();
    if let Backend::Files(dir) = b {
        if !crate::store::held_by_a_server(dir) {
            let store = crate::store::Store::open(dir, true)
                .with_context(|| format!("opening the registry in {}", dir.display()))?;
            let stop = AtomicBool::new(false);
            let show = |p: &crate::tier::Progress| meter.show(p);
            let r = if info.state == "encrypting" {
                store.seal_in_place(Duration::ZERO, &stop, &show)
            } else {
                store.rewrap_keys(Duration::ZERO, &stop, &show)
            };
            meter.finish();
            let report = match r {
                Ok(r) => r,
                Err(e) => {
                    store.record_encryption_failure(&e);
                    return Err(e).context("the job stopped (run the command again to resume)");
                }
            };
            if let Some(r) = report {
                eprintln!(
                    "Done: {} objects, {} changed, in {:.1} s",
                    r.progress.objects_total,
                    r.changed,
                    r.elapsed.as_secs_f64()
                );
            }
            drop(store);
            return b.encryption();
        }
    }
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = b.encryption()?;
        if let Some(p) = &now.progress {
            meter.show(p);
        }
        if !pending(&now) {
            meter.finish();
            eprintln!("Done in {:.1} s", started.elapsed().as_secs_f64());
            return Ok(now);
        }
        if let Some(e) = &now.error {
            meter.finish();
            bail!("the job stopped: {e}\nThe server retries it every minute; it resumes where it was.");
        }
    }
}

pub fn encryption(cmd: EncryptionCmd) -> anyhow::Result<ExitCode> {
    let (opts, job, no_wait) = match cmd {
        EncryptionCmd::Show { opts } => (opts, None, false),
        EncryptionCmd::Enable { no_wait, opts } => (opts, Some("enable"), no_wait),
        EncryptionCmd::RotateKey { no_wait, opts } => (opts, Some("rotate-key"), no_wait),
    };
    opts.check_output()?;
    let b = opts.backend()?;
    let info = match job {
        None => b.encryption()?,
        Some(job) => {
            let info = b.encryption_job(job)?;
            if no_wait {
                info
            } else {
                follow(&b, info)?
            }
        }
    };
    print(&info, opts.output)?;
    Ok(ExitCode::SUCCESS)
}
