//! `registry export` and `registry deploy`: a registry's settings read into a
//! [`Template`] through the management paths (a server's API, or the files), and a
//! template's plan carried out the same way, so every limit and check of the ordinary
//! commands applies to a deploy too.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use super::manage::Backend;
use super::Output;
use crate::template::{
    EncryptionRef, Retention, ScopeMapSpec, Step, Target, Template, TokenSpec, WebhookSpec,
};
use crate::tier::{Encryption, KeySource, Properties};

/// The registry behind `b` as a template: no password, secret or key in it.
pub fn export(b: &Backend) -> anyhow::Result<Template> {
    let info = b.registry_info()?;
    let enc = b.encryption()?;
    let encryption = if matches!(enc.state.as_str(), "unencrypted" | "classic") {
        EncryptionRef::default()
    } else {
        EncryptionRef {
            enabled: true,
            key_source: enc.key_source,
            key_id: enc.key_id,
        }
    };
    let hidden = crate::server::api::REDACTED.to_string();
    Ok(Template {
        schema: None,
        template_version: crate::template::VERSION,
        name: info.name,
        tier: info.sku,
        anonymous_pull: info.anonymous_pull_enabled,
        encryption,
        retention: Retention {
            untagged_manifests: info.retention.unwrap_or_default(),
        },
        scope_maps: b
            .scope_maps()?
            .into_iter()
            .map(|m| ScopeMapSpec {
                name: m.name,
                description: m.description,
                rules: m.rules,
            })
            .collect(),
        tokens: b
            .tokens()?
            .into_iter()
            .map(|t| TokenSpec {
                name: t.name,
                scope_map: t.scope_map,
                status: t.status,
                expiry: t.expiry,
            })
            .collect(),
        webhooks: b
            .webhooks()?
            .into_iter()
            .map(|w| WebhookSpec {
                headers: w
                    .header_names
                    .into_iter()
                    .map(|h| (h, hidden.clone()))
                    .collect(),
                secret: w.signed.then(|| hidden.clone()),
                name: w.name,
                uri: crate::template::redact_url(&w.uri),
                actions: w.actions,
                scope: w.scope,
                allow_private_destination: w.allow_private,
            })
            .collect(),
        replications: Vec::new(),
        tasks: b
            .tasks()?
            .into_iter()
            .map(|mut t| {
                t.context = crate::template::redact_url(&t.context);
                t
            })
            .collect(),
    })
}

/// What a deploy needs to know of `b`.
pub fn target(b: &Backend) -> anyhow::Result<Target> {
    let info = b.registry_info()?;
    let enc = b.encryption()?;
    let encryption =
        (!matches!(enc.state.as_str(), "unencrypted" | "classic")).then(|| Encryption {
            key_source: enc.key_source.unwrap_or(KeySource::Managed),
            key_id: enc.key_id.clone().unwrap_or_default(),
            complete: enc.state == "encrypted",
            rotating_from: enc.rotating_from.clone(),
            progress: None,
            error: None,
        });
    let properties = Properties {
        sku: info.sku,
        overrides: info.overrides.clone(),
        classic: info.classic.clone(),
        encryption,
        name: Some(info.name.clone()),
        anonymous_pull: info.anonymous_pull_enabled,
        retention: info.retention,
        content_trust: info.content_trust.clone(),
        object_storage: None,
    };
    Ok(Target {
        storage_used: info.storage_used_bytes,
        now: export(b)?,
        properties,
        keeps_tasks: b.keeps_tasks(),
    })
}

/// What a deploy did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployed {
    pub dry_run: bool,
    /// Every change, in the order made.
    pub changes: Vec<String>,
    /// Items of the target the template does not name, left as they are.
    pub kept: Vec<String>,
    pub notes: Vec<String>,
}

/// Plans `want` against `b` (refused whole when the target cannot honour it), then makes
/// each change unless `dry_run`. A change that fails stops the deploy: those before it
/// stay made, and deploying again continues from there.
pub fn deploy(b: &Backend, want: &Template, dry_run: bool) -> anyhow::Result<Deployed> {
    let target = target(b)?;
    let plan = crate::template::plan(want, &target)?;
    let changes: Vec<String> = plan.steps.iter().map(|s| s.describe(&target.now)).collect();
    if !dry_run {
        for (i, step) in plan.steps.iter().enumerate() {
            apply(b, step).with_context(|| {
                format!(
                    "deploying `{}` ({} of {} changes made before it; deploying again goes on \
                     from there)",
                    changes[i],
                    i,
                    changes.len()
                )
            })?;
        }
    }
    Ok(Deployed {
        dry_run,
        changes,
        kept: plan.kept,
        notes: plan.notes,
    })
}

fn apply(b: &Backend, step: &Step) -> anyhow::Result<()> {
    match step {
        Step::Settings(c) => {
            b.change_settings(c)?;
        }
        Step::EnableEncryption => {
            b.encryption_job("enable")?;
        }
        Step::CreateScopeMap(m) => {
            b.create_scope_map(&m.name, &m.description, &m.rules)?;
        }
        Step::UpdateScopeMap {
            name,
            add,
            remove,
            description,
        } => {
            b.update_scope_map(name, add, remove, description.as_deref())?;
        }
        Step::CreateToken(t) => {
            let on = t.status == crate::auth::TokenStatus::Enabled;
            b.create_token(&t.name, &t.scope_map, t.expiry, on, true)?;
        }
        Step::SetTokenStatus { name, enabled } => {
            b.set_token_status(name, *enabled)?;
        }
        Step::CreateWebhook(w) => {
            b.create_webhook(&crate::webhooks::NewWebhook {
                name: &w.name,
                uri: &w.uri,
                actions: &w.actions,
                scope: w.scope.as_deref(),
                headers: &w.headers,
                secret: w.secret.as_deref(),
                allow_private: w.allow_private_destination,
            })?;
        }
        Step::CreateTask(t) => b.put_task(t, true)?,
        Step::UpdateTask(t, _) => b.put_task(t, false)?,
    }
    Ok(())
}

/// Reads a template file with `--set`s applied.
pub fn read(path: &std::path::Path, sets: &[String]) -> anyhow::Result<Template> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the template {}", path.display()))?;
    Ok(Template::parse(&text, &path.display().to_string(), sets)?)
}

pub fn print(d: &Deployed, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(d)?);
        return Ok(());
    }
    for c in &d.changes {
        println!("{c}");
    }
    for k in &d.kept {
        println!("= {k} (on the target, not in the template: kept)");
    }
    for n in &d.notes {
        println!("note: {n}");
    }
    let n = d.changes.len();
    if n == 0 {
        println!("No changes: the registry already matches the template.");
    } else if d.dry_run {
        println!("{n} change(s) would be made (dry run: nothing changed).");
    } else {
        println!("{n} change(s) made.");
    }
    Ok(())
}

/// `registry export`.
pub fn run_export(b: &Backend, file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let t = export(b)?;
    let text = t.to_json();
    match file {
        Some(f) => {
            std::fs::write(&f, text).with_context(|| format!("writing {}", f.display()))?;
            eprintln!(
                "Wrote the template of {} to {}: {} scope map(s), {} token(s), {} webhook(s), \
                 {} task(s); no passwords, secrets or keys.",
                t.name,
                f.display(),
                t.scope_maps.len(),
                t.tokens.len(),
                t.webhooks.len(),
                t.tasks.len()
            );
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
