//! `registry update --sku` on a Classic registry: the upgrade's progress (objects, bytes,
//! rate, ETA) until it completes. Where a server serves the registry the upgrade runs in
//! it and this follows its progress; on the files alone it runs here.

use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::manage::Backend;
use crate::server::manage::RegistryInfo;
use crate::tier::{human, Progress, Upgrade};

/// The upgrade under way in `info`, if one is.
pub fn pending(info: &RegistryInfo) -> Option<&Upgrade> {
    info.classic
        .as_ref()
        .and_then(|c| c.upgrade.as_ref())
        .filter(|u| u.finished.is_none())
}

/// A progress line: `120/500 objects, 1.2 GiB of 4 GiB, 150 MiB/s, ETA 20 s`.
pub fn describe(p: &Progress) -> String {
    let eta = match p.eta_seconds {
        Some(s) => format!(", ETA {s} s"),
        None => String::new(),
    };
    if p.bytes_total == 0 {
        return format!("{}/{} objects{eta}", p.objects_done, p.objects_total);
    }
    format!(
        "{}/{} objects, {} of {}, {}/s{eta}",
        p.objects_done,
        p.objects_total,
        human(p.bytes_done),
        human(p.bytes_total),
        human(p.bytes_per_second),
    )
}

/// Draws progress on a terminal (a bar), or a line every few seconds elsewhere.
pub(super) struct Meter {
    bar: Option<indicatif::ProgressBar>,
    last_line: std::sync::Mutex<Instant>,
    to: String,
}

impl Meter {
    /// A meter labelled `what` (`upgrading to Basic`, `encrypting`).
    pub(super) fn new(what: &str) -> Meter {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: [{bar:30}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Meter {
            bar,
            last_line: std::sync::Mutex::new(Instant::now() - Duration::from_secs(60)),
            to: what.to_string(),
        }
    }

    pub(super) fn show(&self, p: &Progress) {
        match &self.bar {
            Some(b) => {
                b.set_length(p.bytes_total.max(1));
                b.set_position(p.bytes_done);
                b.set_message(describe(p));
            }
            None => {
                let Ok(mut at) = self.last_line.lock() else {
                    return;
                };
                if at.elapsed() >= Duration::from_secs(2) {
                    *at = Instant::now();
                    eprintln!("{}: {}", self.to, describe(p));
                }
            }
        }
    }

    pub(super) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Follows (or runs) the upgrade `info` shows until it completes; the registry then.
pub fn follow(b: &Backend, info: RegistryInfo) -> anyhow::Result<RegistryInfo> {
    let Some(u) = pending(&info) else {
        return Ok(info);
    };
    let meter = Meter::new(&format!("upgrading to {}", u.to));
    let started = Instant::now();
    if let Backend::Files(dir) = b {
        if !crate::store::held_by_a_server(dir) {
            // Nobody serves it: the upgrade runs here, holding the registry as a server would.
            let store = crate::store::Store::open(dir, true)
                .with_context(|| format!("opening the registry in {}", dir.display()))?;
            let stop = AtomicBool::new(false);
            let r =
                crate::registry::upgrade::run(&store, Duration::ZERO, &stop, &|p| meter.show(p));
            meter.finish();
            let report = match r {
                Ok(r) => r,
                Err(e) => {
                    crate::registry::upgrade::record_failure(&store, &e);
                    return Err(e).context(
                        "upgrading the Classic registry (run the command again to resume)",
                    );
                }
            };
            drop(store);
            if let Some(r) = report {
                eprintln!(
                    "Upgraded to {}: {} objects ({} copied, {} already there), {} copied, \
                     {} tags verified, in {:.1} s",
                    u.to,
                    r.progress.objects_total,
                    r.objects_copied,
                    r.objects_already_there,
                    human(r.progress.bytes_copied),
                    r.tags_verified,
                    r.elapsed.as_secs_f64()
                );
                for d in &r.dangling_links {
                    eprintln!("  note: {d} was linked but never stored (not pullable; not copied)");
                }
            }
            return b.registry_info();
        }
    }
    // A server runs it: follow its progress.
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = b.registry_info()?;
        let Some(c) = now.classic.as_ref().and_then(|c| c.upgrade.as_ref()) else {
            meter.finish();
            return Ok(now);
        };
        meter.show(&c.progress);
        if c.finished.is_some() {
            meter.finish();
            eprintln!(
                "Upgraded to {}: {} objects, {} copied, in {:.1} s",
                c.to,
                c.progress.objects_total,
                human(c.progress.bytes_copied),
                started.elapsed().as_secs_f64()
            );
            return Ok(now);
        }
        if let Some(e) = &c.error {
            meter.finish();
            bail!(
                "the upgrade to {} stopped: {e}\nThe server retries it every minute; it \
                 resumes where it was.",
                c.to
            );
        }
    }
}
