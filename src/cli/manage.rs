//! Where the registry management commands (`token`, `scope-map`, `credential`, `webhook`)
//! do their work: through a running server's API (`--server URL`, or the server that holds
//! `--data` now, found by its `serve.url`), else on the data directory's files. Both give
//! the same plain types, which the commands print one way.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::{json, Value};

use super::client::Client;
use crate::auth::{AuthStore, NewSecret, ScopeMap, ScopeRule, Slot, TokenInfo};
use crate::server::manage::RegistryInfo;
use crate::server::model::TaskSpec;
use crate::webhooks::{Delivery, DeliveryOptions, NewWebhook, WebhookInfo, WebhookStore};

/// One image as `repository show --image` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageSummary {
    pub digest: String,
    pub media_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// A Helm chart's name and version (from its config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<crate::registry::HelmChart>,
}

pub enum Backend {
    /// The registry directory's files.
    Files(PathBuf),
    /// A server's API.
    Server {
        client: Client,
        rt: tokio::runtime::Runtime,
    },
}

/// Refuses to read or change tasks and credentials in the files of a data directory whose
/// server keeps them in PostgreSQL: they are not there, and a change would be lost.
fn refuse_shared(registry_dir: &std::path::Path) -> anyhow::Result<()> {
    let top = registry_dir.parent().unwrap_or(registry_dir);
    if top.join(crate::server::SHARED_DATABASE_FILE).exists() {
        bail!(
            "the server of {} keeps its tasks and credentials in PostgreSQL (serve \
             --database), not in these files: start it and run this again (the command then \
             goes through it), or give --server with the address of any of its replicas",
            top.display()
        );
    }
    Ok(())
}

impl Backend {
    /// `--server` if given; else the server holding the data directory, if one does; else
    /// the files.
    pub fn choose(server: Option<&str>, data: Option<PathBuf>) -> anyhow::Result<Backend> {
        let top = data.clone().unwrap_or_else(super::default_data_dir);
        let client = match server {
            Some(s) => Client::with_data(s, &top),
            None => {
                let dir = super::registry::data_dir(data)?;
                match super::client::holding(&top) {
                    Some(c) => c,
                    None => return Ok(Backend::Files(dir)),
                }
            }
        };
        Ok(Backend::Server {
            client,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?,
        })
    }

    fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        match self {
            Backend::Server { client, rt } => {
                rt.block_on(client.call(method, &format!("/api/registry{path}"), body.as_ref()))
            }
            Backend::Files(_) => bail!("internal error: no server to call"),
        }
    }

    /// A call to the server's API outside `/api/registry`.
    fn api(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        match self {
            Backend::Server { client, rt } => rt.block_on(client.call(method, path, body.as_ref())),
            Backend::Files(_) => bail!("internal error: no server to call"),
        }
    }

    /// A call to a running server's geo-replication API (`/api/registry/replications...`):
    /// replicas are kept in step by servers, so there is nothing to do on the files.
    pub fn replications(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        match self {
            Backend::Server { .. } => self.call(method, &format!("/replications{path}"), body),
            Backend::Files(dir) => bail!(
                "replications are kept by a running server: start `acr-task serve` on {} \
                 (or give --server URL) and run this again",
                dir.parent().unwrap_or(dir).display()
            ),
        }
    }

    /// Stored tasks are changed only through a server, which checks them against its
    /// policy.
    pub fn keeps_tasks(&self) -> bool {
        matches!(self, Backend::Server { .. })
    }

    /// The stored tasks (commit-trigger secrets redacted): the server's, or on the files
    /// those of the data directory's `server.db`.
    pub fn tasks(&self) -> anyhow::Result<Vec<TaskSpec>> {
        match self {
            Backend::Files(dir) => {
                use crate::server::db::ServerStore;
                refuse_shared(dir)?;
                let Some(db) = dir.parent().map(|top| top.join("server.db")) else {
                    return Ok(Vec::new());
                };
                if !db.exists() {
                    return Ok(Vec::new());
                }
                let s = crate::server::sqlite::SqliteServer::open(&db)
                    .with_context(|| format!("opening {}", db.display()))?;
                Ok(s.tasks()?
                    .into_iter()
                    .map(crate::server::api::redacted)
                    .collect())
            }
            Backend::Server { .. } => {
                Ok(
                    serde_json::from_value(self.api(Method::GET, "/api/tasks", None)?)
                        .context("the server's tasks")?,
                )
            }
        }
    }

    /// Stores a task (new, or over the one of its name) through the server.
    pub fn put_task(&self, spec: &TaskSpec, create: bool) -> anyhow::Result<()> {
        let body = Some(serde_json::to_value(spec)?);
        if create {
            self.api(Method::POST, "/api/tasks", body)?;
        } else {
            self.api(Method::PUT, &format!("/api/tasks/{}", spec.name), body)?;
        }
        Ok(())
    }

    fn auth(&self) -> anyhow::Result<Option<AuthStore>> {
        match self {
            Backend::Files(dir) => {
                refuse_shared(dir)?;
                Ok(Some(AuthStore::open(dir).with_context(|| {
                    format!("opening registry auth data in {}", dir.display())
                })?))
            }
            Backend::Server { .. } => Ok(None),
        }
    }

    /// The registry's tier, on the files (a server checks its own).
    fn tier(&self) -> anyhow::Result<crate::tier::Properties> {
        match self {
            Backend::Files(dir) => Ok(crate::store::Store::open(dir, false)
                .and_then(|s| s.properties())
                .with_context(|| format!("reading the registry's tier in {}", dir.display()))?),
            Backend::Server { .. } => bail!("internal error: the server reads its own tier"),
        }
    }

    fn hooks(&self) -> anyhow::Result<Option<WebhookStore>> {
        match self {
            Backend::Files(dir) => {
                if dir.join(crate::store::SHARED_MARKER).exists() {
                    bail!(
                        "the registry of {} keeps its webhooks in the PostgreSQL database its \
                         servers share: start one and run this again, or give --server with \
                         the address of any of them",
                        dir.display()
                    );
                }
                Ok(Some(WebhookStore::open(dir).with_context(|| {
                    format!("opening webhook data in {}", dir.display())
                })?))
            }
            Backend::Server { .. } => Ok(None),
        }
    }

    pub fn create_token(
        &self,
        name: &str,
        scope_map: &str,
        expiry: Option<i64>,
        enabled: bool,
        no_passwords: bool,
    ) -> anyhow::Result<(TokenInfo, Vec<NewSecret>)> {
        if let Some(s) = self.auth()? {
            let tier = self.tier()?;
            return Ok(s.create_token(name, scope_map, expiry, enabled, no_passwords, &tier)?);
        }
        let v = self.call(
            Method::POST,
            "/tokens",
            Some(json!({
                "name": name, "scopeMap": scope_map, "expiry": expiry,
                "enabled": enabled, "noPasswords": no_passwords,
            })),
        )?;
        let secrets = secrets_of(&v["credentials"]["passwords"]);
        Ok((
            serde_json::from_value(v).context("the server's token")?,
            secrets,
        ))
    }

    pub fn tokens(&self) -> anyhow::Result<Vec<TokenInfo>> {
        if let Some(s) = self.auth()? {
            return Ok(s.tokens()?);
        }
        Ok(serde_json::from_value(self.call(
            Method::GET,
            "/tokens",
            None,
        )?)?)
    }

    pub fn token(&self, name: &str) -> anyhow::Result<TokenInfo> {
        if let Some(s) = self.auth()? {
            return s
                .token(name)?
                .with_context(|| format!("token {name:?} not found"));
        }
        Ok(serde_json::from_value(self.call(
            Method::GET,
            &format!("/tokens/{name}"),
            None,
        )?)?)
    }

    pub fn set_token_status(&self, name: &str, enabled: bool) -> anyhow::Result<TokenInfo> {
        if let Some(s) = self.auth()? {
            s.set_token_status(name, enabled)?;
            return s.token(name)?.context("token vanished");
        }
        let v = self.call(
            Method::PATCH,
            &format!("/tokens/{name}"),
            Some(json!({ "enabled": enabled })),
        )?;
        Ok(serde_json::from_value(v)?)
    }

    pub fn delete_token(&self, name: &str) -> anyhow::Result<()> {
        if let Some(s) = self.auth()? {
            return Ok(s.delete_token(name)?);
        }
        self.call(Method::DELETE, &format!("/tokens/{name}"), None)
            .map(|_| ())
    }

    pub fn renew_token(&self, name: &str, slot: Slot) -> anyhow::Result<NewSecret> {
        if let Some(s) = self.auth()? {
            return Ok(s.renew_token(name, slot)?);
        }
        let slot = match slot {
            Slot::Password1 => "password1",
            Slot::Password2 => "password2",
        };
        let v = self.call(
            Method::POST,
            &format!("/tokens/{name}/passwords"),
            Some(json!({ "slot": slot })),
        )?;
        one_secret(&v)
    }

    pub fn renew_admin(&self) -> anyhow::Result<NewSecret> {
        if let Some(s) = self.auth()? {
            return Ok(s.renew_admin()?);
        }
        one_secret(&self.call(Method::POST, "/admin", None)?)
    }

    pub fn disable_admin(&self) -> anyhow::Result<()> {
        if let Some(s) = self.auth()? {
            return Ok(s.disable_admin()?);
        }
        self.call(Method::DELETE, "/admin", None).map(|_| ())
    }

    pub fn create_scope_map(
        &self,
        name: &str,
        description: &str,
        rules: &[ScopeRule],
    ) -> anyhow::Result<ScopeMap> {
        if let Some(s) = self.auth()? {
            return Ok(s.create_scope_map(name, description, rules, &self.tier()?)?);
        }
        let v = self.call(
            Method::POST,
            "/scope-maps",
            Some(json!({ "name": name, "description": description, "rules": rules })),
        )?;
        Ok(serde_json::from_value(v)?)
    }

    pub fn scope_maps(&self) -> anyhow::Result<Vec<ScopeMap>> {
        if let Some(s) = self.auth()? {
            return Ok(s.scope_maps()?);
        }
        Ok(serde_json::from_value(self.call(
            Method::GET,
            "/scope-maps",
            None,
        )?)?)
    }

    pub fn scope_map(&self, name: &str) -> anyhow::Result<ScopeMap> {
        if let Some(s) = self.auth()? {
            return s
                .scope_map(name)?
                .with_context(|| format!("scope map {name:?} not found"));
        }
        Ok(serde_json::from_value(self.call(
            Method::GET,
            &format!("/scope-maps/{name}"),
            None,
        )?)?)
    }

    pub fn update_scope_map(
        &self,
        name: &str,
        add: &[ScopeRule],
        remove: &[ScopeRule],
        description: Option<&str>,
    ) -> anyhow::Result<ScopeMap> {
        if let Some(s) = self.auth()? {
            return Ok(s.update_scope_map(name, add, remove, description)?);
        }
        let v = self.call(
            Method::PATCH,
            &format!("/scope-maps/{name}"),
            Some(json!({ "add": add, "remove": remove, "description": description })),
        )?;
        Ok(serde_json::from_value(v)?)
    }

    pub fn delete_scope_map(&self, name: &str) -> anyhow::Result<()> {
        if let Some(s) = self.auth()? {
            return Ok(s.delete_scope_map(name)?);
        }
        self.call(Method::DELETE, &format!("/scope-maps/{name}"), None)
            .map(|_| ())
    }

    pub fn create_webhook(&self, h: &NewWebhook<'_>) -> anyhow::Result<WebhookInfo> {
        if let Some(s) = self.hooks()? {
            return Ok(s.create(h, &self.tier()?)?);
        }
        let v = self.call(
            Method::POST,
            "/webhooks",
            Some(json!({
                "name": h.name, "uri": h.uri, "actions": h.actions, "scope": h.scope,
                "headers": h.headers, "secret": h.secret,
                "allowPrivateDestination": h.allow_private,
            })),
        )?;
        Ok(serde_json::from_value(v)?)
    }

    pub fn webhooks(&self) -> anyhow::Result<Vec<WebhookInfo>> {
        if let Some(s) = self.hooks()? {
            return Ok(s.all()?.into_iter().map(|w| w.info).collect());
        }
        Ok(serde_json::from_value(self.call(
            Method::GET,
            "/webhooks",
            None,
        )?)?)
    }

    pub fn delete_webhook(&self, name: &str) -> anyhow::Result<()> {
        if let Some(s) = self.hooks()? {
            return Ok(s.delete(name)?);
        }
        self.call(Method::DELETE, &format!("/webhooks/{name}"), None)
            .map(|_| ())
    }

    pub fn webhook_events(&self, name: &str, limit: u32) -> anyhow::Result<Vec<Delivery>> {
        if let Some(s) = self.hooks()? {
            if s.get(name)?.is_none() {
                bail!("webhook {name:?} not found");
            }
            return Ok(s.history(name, limit)?);
        }
        Ok(serde_json::from_value(self.call(
            Method::GET,
            &format!("/webhooks/{name}/events?limit={limit}"),
            None,
        )?)?)
    }

    /// A ping, sent from here (files) or by the server (which delivers the webhooks).
    pub fn ping_webhook(&self, name: &str, ca_cert: &[PathBuf]) -> anyhow::Result<Delivery> {
        if let Some(s) = self.hooks()? {
            let store = Arc::new(s);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let delivery = DeliveryOptions::with_roots(ca_cert)?;
            return Ok(rt.block_on(crate::webhooks::ping(&store, name, &delivery))?);
        }
        Ok(serde_json::from_value(self.call(
            Method::POST,
            &format!("/webhooks/{name}/ping"),
            None,
        )?)?)
    }
}

impl Backend {
    /// Collects garbage in the registry (by the server when one is used).
    pub fn gc(&self, grace: i64, dry_run: bool) -> anyhow::Result<crate::store::GcReport> {
        if let Backend::Files(dir) = self {
            let store = super::registry::open_dir(dir)?;
            return Ok(crate::registry::service::gc(&store, grace, dry_run)?);
        }
        let v = self.call(
            Method::POST,
            "/gc",
            Some(json!({ "grace": grace, "dryRun": dry_run })),
        )?;
        Ok(serde_json::from_value(v)?)
    }

    /// One tagged image: its manifest's digest and types, and a Helm chart's name and
    /// version (read from its config).
    pub fn image(&self, repo: &str, tag: &str) -> anyhow::Result<ImageSummary> {
        const MAX_CONFIG: u64 = 1 << 20;
        let (digest, content, config) = match self {
            Backend::Files(dir) => {
                use std::io::Read;
                let store = super::registry::open_dir(dir)?;
                let row = store
                    .get_manifest(repo, &crate::store::Reference::Tag(tag.to_string()))?
                    .with_context(|| format!("no tag {repo}:{tag}"))?;
                let v: Value = serde_json::from_slice(&row.content).unwrap_or_default();
                let config = match v["config"]["digest"].as_str() {
                    Some(d) if crate::digest::parse(d).is_ok() => {
                        let mut bytes = Vec::new();
                        store
                            .blob_reader(d, 0)?
                            .take(MAX_CONFIG)
                            .read_to_end(&mut bytes)?;
                        bytes
                    }
                    _ => Vec::new(),
                };
                (row.digest, row.content, config)
            }
            Backend::Server { client, rt } => {
                let addr = client.host_port()?;
                let creds = match client.login() {
                    Some(c) => crate::credentials::Credentials::single(&addr, c),
                    None => Default::default(),
                };
                let rc = crate::registry::client::RegistryClient::new(
                    addr,
                    crate::registry::client::Transport::new(&[], creds)?,
                );
                let scope = crate::registry::client::pull(repo);
                rt.block_on(async {
                    let m = rc
                        .request(
                            reqwest::Method::GET,
                            &format!("/v2/{repo}/manifests/{tag}"),
                            &scope,
                        )
                        .await?;
                    if m.status == 404 {
                        bail!("no tag {repo}:{tag}");
                    }
                    let digest = m
                        .header("docker-content-digest")
                        .unwrap_or_default()
                        .to_string();
                    let v: Value = serde_json::from_slice(&m.body).unwrap_or_default();
                    let config = match v["config"]["digest"].as_str() {
                        Some(d) if crate::digest::parse(d).is_ok() => {
                            let b = rc
                                .request(
                                    reqwest::Method::GET,
                                    &format!("/v2/{repo}/blobs/{d}"),
                                    &scope,
                                )
                                .await?;
                            if b.body.len() as u64 > MAX_CONFIG {
                                Vec::new()
                            } else {
                                b.body
                            }
                        }
                        _ => Vec::new(),
                    };
                    Ok((digest, m.body, config))
                })?
            }
        };
        let v: Value = serde_json::from_slice(&content).unwrap_or_default();
        Ok(ImageSummary {
            digest,
            media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
            artifact_type: crate::registry::artifact_type_of(&v),
            chart: crate::registry::helm_chart_of(
                v["config"]["mediaType"].as_str().unwrap_or_default(),
                &config,
            ),
        })
    }

    /// The locks of a repository.
    pub fn locks(&self, repo: &str) -> anyhow::Result<Vec<crate::store::Lock>> {
        if let Backend::Files(dir) = self {
            return Ok(super::registry::open_dir(dir)?.locks(repo)?);
        }
        let q = format!("/locks?repository={}", repo);
        serde_json::from_value(self.call(Method::GET, &q, None)?).context("the server's locks")
    }

    /// Sets a repository's (tag `None`) or a tag's attributes.
    pub fn set_lock(
        &self,
        repo: &str,
        tag: Option<&str>,
        a: crate::store::Attributes,
    ) -> anyhow::Result<()> {
        let missing = || match tag {
            Some(t) => format!("no tag {repo}:{t}"),
            None => format!("no repository {repo}"),
        };
        if let Backend::Files(dir) = self {
            let store = super::registry::open_dir(dir)?;
            if !crate::registry::service::set_lock(&store, repo, tag, a)? {
                bail!("{}", missing());
            }
            return Ok(());
        }
        let body = crate::server::manage::LockChange {
            repository: repo.to_string(),
            tag: tag.map(str::to_string),
            attributes: a,
        };
        self.call(Method::PUT, "/locks", Some(serde_json::to_value(body)?))
            .map_err(|e| {
                if e.to_string().contains("no such repository or tag") {
                    anyhow::anyhow!("{}", missing())
                } else {
                    e
                }
            })?;
        Ok(())
    }

    /// A purge: by the server when one is used, else on the files.
    pub fn purge(
        &self,
        req: &crate::registry::purge::PurgeRequest,
    ) -> anyhow::Result<crate::registry::purge::PurgeReport> {
        if let Backend::Files(dir) = self {
            let store = super::registry::open_dir(dir)?;
            let ctx = crate::registry::RequestContext::of_tool(
                "PURGE",
                "acr-task-purge",
                String::new(),
                String::new(),
            );
            // No server runs on these files: its consumers read the outbox when one starts.
            return Ok(crate::registry::purge::run(&store, req, &ctx, &|_| {})?);
        }
        let v = self.call(Method::POST, "/purge", Some(serde_json::to_value(req)?))?;
        serde_json::from_value(v).context("the server's purge report")
    }

    /// An import done by the server.
    pub fn import(
        &self,
        req: &crate::registry::import::ImportRequest,
    ) -> anyhow::Result<crate::registry::import::Imported> {
        let v = self.call(Method::POST, "/import", Some(serde_json::to_value(req)?))?;
        serde_json::from_value(v).context("the server's import report")
    }

    /// The registry's tier, limits and use.
    pub fn registry_info(&self) -> anyhow::Result<RegistryInfo> {
        if let Backend::Files(dir) = self {
            let store = super::registry::open_dir(dir)?;
            return self.info_on_files(dir, &store);
        }
        serde_json::from_value(self.call(Method::GET, "", None)?).context("the server's registry")
    }

    /// Changes the tier, the limits or the settings; the registry as it is afterwards.
    pub fn change_settings(&self, change: &crate::tier::Change) -> anyhow::Result<RegistryInfo> {
        if let Backend::Files(dir) = self {
            // A registry may be given its tier before it first serves.
            let store = crate::store::Store::open(dir, false)
                .with_context(|| format!("opening registry data in {}", dir.display()))?;
            let replications = crate::replication::store::ReplicationStore::members_in(dir)?;
            crate::registry::service::change_settings(&store, change, replications)?;
            return self.info_on_files(dir, &store);
        }
        let body = serde_json::to_value(change)?;
        serde_json::from_value(self.call(Method::PATCH, "", Some(body))?)
            .context("the server's registry")
    }

    fn info_on_files(
        &self,
        dir: &std::path::Path,
        store: &crate::store::Store,
    ) -> anyhow::Result<RegistryInfo> {
        refuse_shared(dir)?;
        let auth = AuthStore::open(dir)?;
        let hooks = WebhookStore::open(dir)?;
        Ok(crate::server::manage::registry_info(
            store, &auth, &hooks, None, None,
        )?)
    }

    /// The registry's encryption at rest.
    pub fn encryption(&self) -> anyhow::Result<crate::server::manage::EncryptionInfo> {
        if let Backend::Files(dir) = self {
            let store = super::registry::open_dir(dir)?;
            return Ok(crate::server::manage::encryption_info(&store)?);
        }
        serde_json::from_value(self.call(Method::GET, "/encryption", None)?)
            .context("the server's encryption")
    }

    /// Asks for encryption (`enable`) or a key rotation (`rotate-key`); the state then.
    /// On the files the job itself is left to whoever runs it (the server holding them,
    /// or the caller).
    pub fn encryption_job(
        &self,
        job: &str,
    ) -> anyhow::Result<crate::server::manage::EncryptionInfo> {
        if let Backend::Files(dir) = self {
            let store = crate::store::Store::open(dir, false)
                .with_context(|| format!("opening registry data in {}", dir.display()))?;
            match job {
                "enable" => store.enable_encryption()?,
                _ => store.rotate_key()?,
            };
            return Ok(crate::server::manage::encryption_info(&store)?);
        }
        serde_json::from_value(self.call(
            Method::POST,
            &format!("/encryption/{job}"),
            Some(json!({})),
        )?)
        .context("the server's encryption")
    }

    /// Re-verifies the registry's content.
    pub fn fsck(&self) -> anyhow::Result<crate::store::FsckReport> {
        if let Backend::Files(dir) = self {
            return Ok(super::registry::open_dir(dir)?.fsck()?);
        }
        Ok(serde_json::from_value(self.call(
            Method::POST,
            "/fsck",
            None,
        )?)?)
    }
}

/// `[{"name": "password1", "value": ...}]` back into secrets.
fn secrets_of(v: &Value) -> Vec<NewSecret> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(NewSecret {
                slot: p["name"].as_str()?.to_string(),
                value: p["value"].as_str()?.to_string(),
            })
        })
        .collect()
}

fn one_secret(v: &Value) -> anyhow::Result<NewSecret> {
    secrets_of(&v["passwords"])
        .into_iter()
        .next()
        .context("the server sent no password")
}
