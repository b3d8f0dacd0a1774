//! `acr-task token|scope-map|credential|webhook`: registry identities and outgoing
//! webhooks, stored beside the registry data (`auth.db`, `webhooks.db`). Generated secrets
//! are shown once: in table output on stdout, with `--output json` on stderr only, so that
//! JSON can be kept or logged without leaking them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};

use super::manage::Backend;
use super::registry::{print_deleted, print_json, print_rows};
use super::Output;
use crate::auth::{
    Auth, AuthSettings, NewSecret, Permission, ScopeMap, ScopeRule, Slot, TokenInfo, TokenStatus,
};
use crate::server::manage::passwords_json;
use crate::webhooks::{DeliveryOptions, NewWebhook};

/// Auth switches of `acr-task serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeAuthArgs {
    /// Require credentials (tokens, or the admin user) for the registry; Docker's token
    /// flow is served at /oauth2/token.
    #[arg(long, env = "ACR_TASK_AUTH")]
    pub auth: bool,
    /// With --auth: allow pulls without credentials.
    #[arg(long, requires = "auth")]
    pub anonymous_pull: bool,
    /// With --auth: lifetime of issued registry tokens, in seconds.
    #[arg(long, requires = "auth", default_value_t = 300, value_name = "SECONDS")]
    pub token_ttl: u64,
    /// First retry delay of a failed webhook delivery (doubles per attempt, up to 10 min).
    #[arg(long, default_value_t = 2000, value_name = "MILLISECONDS")]
    pub webhook_backoff_ms: u64,
    /// Delivery attempts before a webhook event is marked failed.
    #[arg(long, default_value_t = 10)]
    pub webhook_max_attempts: u32,
}

impl ServeAuthArgs {
    /// Delivery settings; HTTPS receivers are checked against the system's roots plus
    /// `ca_certs` (`serve --ca-cert`).
    pub fn webhook_options(&self, ca_certs: &[PathBuf]) -> anyhow::Result<DeliveryOptions> {
        Ok(DeliveryOptions {
            backoff: std::time::Duration::from_millis(self.webhook_backoff_ms.max(1)),
            max_attempts: self.webhook_max_attempts.max(1),
            ..DeliveryOptions::with_roots(ca_certs)?
        })
    }

    /// How logins and tokens behave. `tls`: the listener serves HTTPS.
    pub fn settings(&self, tls: bool) -> AuthSettings {
        AuthSettings {
            anonymous_pull: self.anonymous_pull,
            token_ttl: std::time::Duration::from_secs(self.token_ttl.max(1)),
            tls,
            ..AuthSettings::default()
        }
    }

    /// The gate for `dir`, or None when auth is off. `tls`: the listener serves HTTPS.
    pub fn open(&self, dir: &Path, tls: bool) -> anyhow::Result<Option<Arc<Auth>>> {
        if !self.auth {
            return Ok(None);
        }
        let settings = self.settings(tls);
        Ok(Some(Auth::open(dir, settings).with_context(|| {
            format!("opening registry auth data in {}", dir.display())
        })?))
    }
}

#[derive(Debug, clap::Args)]
pub struct AuthOpts {
    /// Data directory; the registry is its `registry/` [default: $ACR_TASK_DATA, else
    /// ~/.local/share/acr-task]. While a server holds it, the command goes through that
    /// server's API.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Manage this running `acr-task serve` (URL or HOST:PORT) through its API, as the
    /// admin (`ACR_TASK_USERNAME`/`ACR_TASK_PASSWORD`, or the password a server on this
    /// machine keeps in --data).
    #[arg(long, env = "ACR_TASK_SERVER")]
    server: Option<String>,
    /// Output format: table or json.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    Enabled,
    Disabled,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Create a token bound to a scope map; prints its two generated passwords once.
    #[command(
        after_help = "Example:\n  acr-task token create ci-push --scope-map ci -o json   # the passwords are in the JSON, once"
    )]
    Create {
        /// The token's name (its user name for `docker login`).
        name: String,
        /// The scope map that says what the token may do.
        #[arg(long)]
        scope_map: String,
        /// Expiry as RFC 3339 (2027-01-31T00:00:00Z).
        #[arg(long, conflicts_with = "expiration_in_days")]
        expiration: Option<String>,
        /// Expire this many days from now [default: never].
        #[arg(long)]
        expiration_in_days: Option<u32>,
        /// enabled or disabled.
        #[arg(long, value_enum, default_value = "enabled")]
        status: StatusArg,
        /// Create without passwords (generate them later with `credential renew`).
        #[arg(long)]
        no_passwords: bool,
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task token list -o json")]
    List {
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task token show ci-push")]
    Show {
        /// The token's name (its user name for `docker login`).
        name: String,
        #[command(flatten)]
        opts: AuthOpts,
    },
    /// Enable or disable a token.
    #[command(after_help = "Example:\n  acr-task token update ci-push --status disabled")]
    Update {
        /// The token's name (its user name for `docker login`).
        name: String,
        /// enabled or disabled.
        #[arg(long, value_enum)]
        status: StatusArg,
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task token delete ci-push")]
    Delete {
        /// The token's name (its user name for `docker login`).
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        opts: AuthOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ScopeMapCmd {
    /// Create a scope map: `--repository 'samples/*' content/read content/write` (repeatable;
    /// actions: content/read|write|delete, metadata/read|write; patterns: NAME, PREFIX/*, *).
    #[command(
        after_help = "Example:\n  acr-task scope-map create ci --repository 'samples/*' content/read content/write"
    )]
    Create {
        /// The scope map's name.
        name: String,
        /// REPO ACTION...: a repository pattern and the actions allowed there (repeatable).
        #[arg(long = "repository", num_args = 2.., value_names = ["REPO", "ACTION"], required = true)]
        repository: Vec<String>,
        /// What the scope map is for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task scope-map list")]
    List {
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task scope-map show ci -o json")]
    Show {
        /// The scope map's name.
        name: String,
        #[command(flatten)]
        opts: AuthOpts,
    },
    /// Add or remove repository actions.
    #[command(
        after_help = "Example:\n  acr-task scope-map update ci --add-repository 'tools/*' content/read --remove-repository 'samples/*' content/write"
    )]
    Update {
        /// The scope map's name.
        name: String,
        /// REPO ACTION...: actions to allow on a repository pattern (repeatable).
        #[arg(long = "add-repository", num_args = 2.., value_names = ["REPO", "ACTION"])]
        add: Vec<String>,
        /// REPO ACTION...: actions to take away (repeatable).
        #[arg(long = "remove-repository", num_args = 2.., value_names = ["REPO", "ACTION"])]
        remove: Vec<String>,
        /// What the scope map is for.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task scope-map delete ci")]
    Delete {
        /// The scope map's name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        opts: AuthOpts,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum CredentialCmd {
    /// Generate a new password: `--admin` enables the admin user (name `admin`);
    /// `--token NAME` renews password1 (or `--password2`).
    #[command(
        after_help = "Examples:\n  acr-task credential renew --admin\n  acr-task credential renew --token ci-push --password2 -o json"
    )]
    Renew {
        /// The admin user: enables it and gives it a new password.
        #[arg(long, conflicts_with = "token", required_unless_present = "token")]
        admin: bool,
        /// A token: a new password1 (or --password2).
        #[arg(long)]
        token: Option<String>,
        /// Renew the token's password2, keeping password1 valid.
        #[arg(long, requires = "token")]
        password2: bool,
        #[command(flatten)]
        opts: AuthOpts,
    },
    /// Disable the admin user.
    #[command(after_help = "Example:\n  acr-task credential disable-admin")]
    DisableAdmin {
        #[command(flatten)]
        opts: AuthOpts,
    },
}

fn backend(opts: &AuthOpts) -> anyhow::Result<Backend> {
    Backend::choose(opts.server.as_deref(), opts.data.clone())
}

fn check_output(o: Output) -> anyhow::Result<()> {
    if matches!(o, Output::Tsv | Output::Dot) {
        bail!("--output {o:?} is not supported by this command (json or table)");
    }
    Ok(())
}

/// New passwords as table rows on stdout, shown once (JSON output carries them inside).
fn print_secrets(who: &str, secrets: &[NewSecret]) -> anyhow::Result<()> {
    if secrets.is_empty() {
        return Ok(());
    }
    println!();
    let rows: Vec<Vec<String>> = secrets
        .iter()
        .map(|s| vec![who.to_string(), s.slot.clone(), s.value.clone()])
        .collect();
    print_rows(
        Output::Table,
        &["USERNAME", "PASSWORD NAME", "PASSWORD (shown once)"],
        &rows,
    )
}

fn time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| t.to_string())
}

fn print_tokens(output: Output, tokens: &[TokenInfo]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&tokens);
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.scope_map.clone(),
                match t.status {
                    TokenStatus::Enabled => "enabled".into(),
                    TokenStatus::Disabled => "disabled".into(),
                },
                t.expiry.map(time).unwrap_or_else(|| "never".into()),
                t.passwords
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                time(t.created),
            ]
        })
        .collect();
    print_rows(
        Output::Table,
        &[
            "NAME",
            "SCOPE MAP",
            "STATUS",
            "EXPIRES",
            "PASSWORDS",
            "CREATED",
        ],
        &rows,
    )
}

fn print_maps(output: Output, maps: &[ScopeMap]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&maps);
    }
    let mut rows = Vec::new();
    for m in maps {
        for r in &m.rules {
            rows.push(vec![
                m.name.clone(),
                r.repository.clone(),
                r.actions
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                m.description.clone(),
            ]);
        }
    }
    print_rows(
        Output::Table,
        &["NAME", "REPOSITORY", "ACTIONS", "DESCRIPTION"],
        &rows,
    )
}

/// `REPO ACTION... REPO ACTION...` into rules: a value that is an action name belongs to the
/// repository before it; anything else starts a new repository. (clap flattens repeated
/// multi-value options, and action names are never repository patterns we hand out.)
fn rules(values: &[String]) -> anyhow::Result<Vec<ScopeRule>> {
    let mut out: Vec<ScopeRule> = Vec::new();
    for v in values {
        match (v.parse::<Permission>(), out.last_mut()) {
            (Ok(p), Some(r)) => {
                if !r.actions.contains(&p) {
                    r.actions.push(p);
                }
            }
            (Ok(_), None) => bail!("action {v:?} given before any repository"),
            (Err(_), _) => {
                if v.contains('/')
                    && v.split('/')
                        .next()
                        .is_some_and(|h| h == "content" || h == "metadata")
                {
                    // Probably a mistyped action rather than a repository.
                    v.parse::<Permission>()?;
                }
                out.push(ScopeRule {
                    repository: v.clone(),
                    actions: Vec::new(),
                })
            }
        }
    }
    Ok(out)
}

fn expiry(expiration: Option<String>, days: Option<u32>) -> anyhow::Result<Option<i64>> {
    if let Some(e) = expiration {
        let t = chrono::DateTime::parse_from_rfc3339(&e)
            .with_context(|| format!("--expiration {e:?} is not an RFC 3339 time"))?;
        return Ok(Some(t.timestamp()));
    }
    Ok(days.map(|d| chrono::Utc::now().timestamp() + i64::from(d) * 86_400))
}

pub fn token(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCmd::Create {
            name,
            scope_map,
            expiration,
            expiration_in_days,
            status,
            no_passwords,
            opts,
        } => {
            check_output(opts.output)?;
            let exp = expiry(expiration, expiration_in_days)?;
            let s = backend(&opts)?;
            let (info, secrets) = s.create_token(
                &name,
                &scope_map,
                exp,
                status == StatusArg::Enabled,
                no_passwords,
            )?;
            if opts.output == Output::Json {
                // As `az acr token create`: the passwords inside the JSON, shown this once.
                let mut v = serde_json::to_value(&info)?;
                v["credentials"] = serde_json::json!({ "passwords": passwords_json(&secrets) });
                print_json(&v)?;
            } else {
                print_tokens(opts.output, std::slice::from_ref(&info))?;
                print_secrets(&name, &secrets)?;
            }
        }
        TokenCmd::List { opts } => {
            check_output(opts.output)?;
            print_tokens(opts.output, &backend(&opts)?.tokens()?)?;
        }
        TokenCmd::Show { name, opts } => {
            check_output(opts.output)?;
            let t = backend(&opts)?.token(&name)?;
            if opts.output == Output::Json {
                print_json(&t)?;
            } else {
                print_tokens(opts.output, &[t])?;
            }
        }
        TokenCmd::Update { name, status, opts } => {
            check_output(opts.output)?;
            let s = backend(&opts)?;
            let t = s.set_token_status(&name, status == StatusArg::Enabled)?;
            print_tokens(opts.output, &[t])?;
        }
        TokenCmd::Delete { name, yes, opts } => {
            check_output(opts.output)?;
            super::registry::confirm(&format!("token {name}: its passwords stop working"), yes)?;
            backend(&opts)?.delete_token(&name)?;
            print_deleted(opts.output, &name, &format!("deleted token {name}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn scope_map(cmd: ScopeMapCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ScopeMapCmd::Create {
            name,
            repository,
            description,
            opts,
        } => {
            check_output(opts.output)?;
            let m = backend(&opts)?.create_scope_map(&name, &description, &rules(&repository)?)?;
            print_maps(opts.output, &[m])?;
        }
        ScopeMapCmd::List { opts } => {
            check_output(opts.output)?;
            print_maps(opts.output, &backend(&opts)?.scope_maps()?)?;
        }
        ScopeMapCmd::Show { name, opts } => {
            check_output(opts.output)?;
            let m = backend(&opts)?.scope_map(&name)?;
            if opts.output == Output::Json {
                print_json(&m)?;
            } else {
                print_maps(opts.output, &[m])?;
            }
        }
        ScopeMapCmd::Update {
            name,
            add,
            remove,
            description,
            opts,
        } => {
            check_output(opts.output)?;
            let m = backend(&opts)?.update_scope_map(
                &name,
                &rules(&add)?,
                &rules(&remove)?,
                description.as_deref(),
            )?;
            print_maps(opts.output, &[m])?;
        }
        ScopeMapCmd::Delete { name, yes, opts } => {
            check_output(opts.output)?;
            super::registry::confirm(&format!("scope map {name}"), yes)?;
            backend(&opts)?.delete_scope_map(&name)?;
            print_deleted(opts.output, &name, &format!("deleted scope map {name}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn credential(cmd: CredentialCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CredentialCmd::Renew {
            admin,
            token,
            password2,
            opts,
        } => {
            check_output(opts.output)?;
            let s = backend(&opts)?;
            let (who, secret) = match token {
                Some(t) if !admin => {
                    let slot = if password2 {
                        Slot::Password2
                    } else {
                        Slot::Password1
                    };
                    let sec = s.renew_token(&t, slot)?;
                    (t, sec)
                }
                _ => (crate::auth::ADMIN_USER.to_string(), s.renew_admin()?),
            };
            if opts.output == Output::Json {
                // As `az acr credential renew` / `token credential generate`.
                print_json(&serde_json::json!({
                    "username": who,
                    "passwords": passwords_json(std::slice::from_ref(&secret)),
                }))?;
            } else {
                print_secrets(&who, std::slice::from_ref(&secret))?;
            }
        }
        CredentialCmd::DisableAdmin { opts } => {
            check_output(opts.output)?;
            backend(&opts)?.disable_admin()?;
            if opts.output == Output::Json {
                print_json(&serde_json::json!({ "adminEnabled": false }))?;
            } else {
                println!("admin user disabled");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Subcommand)]
pub enum WebhookCmd {
    /// Create a webhook: each matching push/delete is POSTed as JSON to --uri (http://),
    /// with `X-Acr-Task-Signature: sha256=<HMAC>` when --secret is given.
    #[command(
        after_help = "Example:\n  acr-task webhook create ci --uri https://ci.example.com/hook --actions push --scope 'samples/*:v*' --secret \"$SECRET\""
    )]
    Create {
        /// The webhook's name.
        name: String,
        /// Where events are POSTed (http:// or https://).
        #[arg(long)]
        uri: String,
        /// Comma-separated: push, delete.
        #[arg(long, value_delimiter = ',', required = true)]
        actions: Vec<String>,
        /// Only events for REPO[:TAG] ('*' wildcards), e.g. `samples/*:v*`.
        #[arg(long)]
        scope: Option<String>,
        /// Extra request header K=V (repeatable).
        #[arg(long = "header", value_name = "K=V")]
        headers: Vec<String>,
        /// HMAC-SHA256 signing secret.
        #[arg(long, env = "ACR_TASK_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Allow a receiver on a loopback, link-local or private address (refused by
        /// default: a webhook must not reach into the server's own network).
        #[arg(long)]
        allow_private_destination: bool,
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task webhook list -o json")]
    List {
        #[command(flatten)]
        opts: AuthOpts,
    },
    #[command(after_help = "Example:\n  acr-task webhook delete ci")]
    Delete {
        /// The webhook's name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        opts: AuthOpts,
    },
    /// Send a ping event now and show the result. Exit 1 if it was not delivered.
    #[command(after_help = "Example:\n  acr-task webhook ping ci")]
    Ping {
        /// The webhook's name.
        name: String,
        /// Also trust this CA certificate (PEM) for an HTTPS receiver; repeatable.
        #[arg(long, value_name = "FILE")]
        ca_cert: Vec<PathBuf>,
        #[command(flatten)]
        opts: AuthOpts,
    },
    /// Delivery history, newest first.
    #[command(after_help = "Example:\n  acr-task webhook list-events ci --limit 10")]
    ListEvents {
        /// The webhook's name.
        name: String,
        /// Most deliveries listed.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        opts: AuthOpts,
    },
}

fn print_hooks(output: Output, hooks: &[crate::webhooks::WebhookInfo]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&hooks);
    }
    let rows: Vec<Vec<String>> = hooks
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                h.uri.clone(),
                h.actions.join(","),
                h.scope.clone().unwrap_or_default(),
                if h.signed { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    print_rows(
        Output::Table,
        &["NAME", "URI", "ACTIONS", "SCOPE", "SIGNED"],
        &rows,
    )
}

fn print_deliveries(output: Output, ds: &[crate::webhooks::Delivery]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&ds);
    }
    let rows: Vec<Vec<String>> = ds
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.action.clone(),
                d.state.clone(),
                d.attempts.to_string(),
                d.last_status.map(|s| s.to_string()).unwrap_or_default(),
                d.last_error.clone().unwrap_or_default(),
                time(d.created / 1000),
            ]
        })
        .collect();
    print_rows(
        Output::Table,
        &[
            "ID", "ACTION", "STATE", "ATTEMPTS", "STATUS", "ERROR", "CREATED",
        ],
        &rows,
    )
}

pub fn webhook(cmd: WebhookCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        WebhookCmd::Create {
            name,
            uri,
            actions,
            scope,
            headers,
            secret,
            allow_private_destination,
            opts,
        } => {
            check_output(opts.output)?;
            let mut h = std::collections::BTreeMap::new();
            for kv in &headers {
                let Some((k, v)) = kv.split_once('=') else {
                    bail!("--header {kv:?}: expected K=V");
                };
                h.insert(k.trim().to_string(), v.trim().to_string());
            }
            let info = backend(&opts)?.create_webhook(&NewWebhook {
                name: &name,
                uri: &uri,
                actions: &actions,
                scope: scope.as_deref(),
                headers: &h,
                secret: secret.as_deref(),
                allow_private: allow_private_destination,
            })?;
            print_hooks(opts.output, &[info])?;
        }
        WebhookCmd::List { opts } => {
            check_output(opts.output)?;
            let hooks = backend(&opts)?.webhooks()?;
            print_hooks(opts.output, &hooks)?;
        }
        WebhookCmd::Delete { name, yes, opts } => {
            check_output(opts.output)?;
            super::registry::confirm(&format!("webhook {name} and its delivery history"), yes)?;
            backend(&opts)?.delete_webhook(&name)?;
            print_deleted(opts.output, &name, &format!("deleted webhook {name}"))?;
        }
        WebhookCmd::Ping {
            name,
            ca_cert,
            opts,
        } => {
            check_output(opts.output)?;
            let d = backend(&opts)?.ping_webhook(&name, &ca_cert)?;
            let ok = d.state == "delivered";
            print_deliveries(opts.output, &[d])?;
            if !ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        WebhookCmd::ListEvents { name, limit, opts } => {
            check_output(opts.output)?;
            print_deliveries(opts.output, &backend(&opts)?.webhook_events(&name, limit)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
