//! `acr-task replication create|list|show|update|delete` (as `az acr replication`): the
//! registry's geo-replicas, through a running server's API.

use std::process::ExitCode;

use anyhow::bail;
use reqwest::Method;
use serde_json::json;

use super::manage::Backend;
use super::registry::{print_deleted, print_json, print_rows};
use super::Output;
use crate::replication::ReplicationInfo;

#[derive(Debug, clap::Args)]
pub struct ReplicationOpts {
    /// Data directory of the server to manage (it goes through that server's API)
    /// [default: $ACR_TASK_DATA, else ~/.local/share/acr-task].
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Manage this running `acr-task serve` (URL or HOST:PORT), as the admin
    /// (`ACR_TASK_USERNAME`/`ACR_TASK_PASSWORD`, or the password a server on this machine
    /// keeps in --data).
    #[arg(long, env = "ACR_TASK_SERVER")]
    server: Option<String>,
    /// Output format: table or json.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReplicationCmd {
    /// Make another `acr-task serve` (its own data directory, anywhere it can be reached)
    /// a replica of this registry: it is joined once with its admin login, backfilled
    /// with everything held here, then kept in step both ways. Premium only.
    #[command(
        after_help = "Example:\n  acr-task replication create westeurope --url https://acr-west.internal:5000 --password-stdin <<<\"$WEST_ADMIN_PASSWORD\""
    )]
    Create {
        /// The replica's region name (letters, digits, inner hyphens).
        name: String,
        /// Where this server and the other replicas reach it.
        #[arg(long)]
        url: String,
        /// The new replica's admin user (or a token allowed everything), used to join it.
        #[arg(long, default_value = "admin")]
        username: String,
        /// Its password (better: --password-stdin, or the environment variable).
        #[arg(
            long,
            env = "ACR_TASK_REPLICA_PASSWORD",
            hide_env_values = true,
            allow_hyphen_values = true,
            required_unless_present = "password_stdin"
        )]
        password: Option<String>,
        /// Read the password from stdin (as `docker login --password-stdin`).
        #[arg(long, conflicts_with = "password")]
        password_stdin: bool,
        /// This server's own region name, when this is its first replication [default:
        /// home].
        #[arg(long)]
        home_name: Option<String>,
        /// The URL the replicas reach this server at, when this is its first replication
        /// [default: this server's own address].
        #[arg(long)]
        home_url: Option<String>,
        #[command(flatten)]
        opts: ReplicationOpts,
    },
    /// Every replica with its status, backfill, lag (events and seconds) and last error.
    #[command(after_help = "Example:\n  acr-task replication list -o json")]
    List {
        #[command(flatten)]
        opts: ReplicationOpts,
    },
    #[command(after_help = "Example:\n  acr-task replication show westeurope")]
    Show {
        /// The replica's region name.
        name: String,
        #[command(flatten)]
        opts: ReplicationOpts,
    },
    /// Turn a replica's endpoint off (it stays in step, clients are not served) or on.
    #[command(
        after_help = "Example:\n  acr-task replication update westeurope --region-endpoint-enabled false"
    )]
    Update {
        /// The replica's region name.
        name: String,
        /// true or false: whether it serves clients.
        #[arg(long, action = clap::ArgAction::Set)]
        region_endpoint_enabled: bool,
        #[command(flatten)]
        opts: ReplicationOpts,
    },
    /// Remove a replica from the group (its content stays where it is).
    #[command(after_help = "Example:\n  acr-task replication delete westeurope -y")]
    Delete {
        /// The replica's region name.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        opts: ReplicationOpts,
    },
}

fn backend(o: &ReplicationOpts) -> anyhow::Result<Backend> {
    if matches!(o.output, Output::Tsv | Output::Dot) {
        bail!(
            "--output {:?} is not supported by this command (json or table)",
            o.output
        );
    }
    Backend::choose(o.server.as_deref(), o.data.clone())
}

/// One replica: an object in JSON, a one-row table otherwise.
fn print_one(output: Output, v: serde_json::Value) -> anyhow::Result<()> {
    let r: ReplicationInfo = serde_json::from_value(v)?;
    if output == Output::Json {
        return print_json(&r);
    }
    print(output, &[r])
}

fn print(output: Output, rs: &[ReplicationInfo]) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&rs);
    }
    let rows: Vec<Vec<String>> = rs
        .iter()
        .map(|r| {
            let status = match r.backfill {
                Some((done, total)) => format!("{} {done}/{total}", r.status),
                None => r.status.clone(),
            };
            vec![
                if r.this_server {
                    format!("{} (this server)", r.name)
                } else {
                    r.name.clone()
                },
                r.url.clone(),
                status,
                if r.region_endpoint_enabled {
                    "yes"
                } else {
                    "no"
                }
                .into(),
                if r.this_server {
                    "-".into()
                } else {
                    format!("{} events, {} s", r.lag_events, r.lag_seconds)
                },
                r.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_rows(
        Output::Table,
        &["NAME", "URL", "STATUS", "ENDPOINT", "LAG", "LAST ERROR"],
        &rows,
    )
}

pub fn replication(cmd: ReplicationCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ReplicationCmd::Create {
            name,
            url,
            username,
            password,
            password_stdin,
            home_name,
            home_url,
            opts,
        } => {
            let password = match password {
                Some(p) if !password_stdin => p,
                _ => {
                    let mut p = String::new();
                    std::io::stdin().read_line(&mut p)?;
                    let p = p.trim_end_matches(['\r', '\n']).to_string();
                    if p.is_empty() {
                        bail!("--password-stdin: no password on stdin");
                    }
                    p
                }
            };
            let body = json!({
                "name": name, "url": url, "username": username, "password": password,
                "homeName": home_name, "homeUrl": home_url,
            });
            let v = backend(&opts)?.replications(Method::POST, "", Some(body))?;
            print_one(opts.output, v)?;
        }
        ReplicationCmd::List { opts } => {
            let v = backend(&opts)?.replications(Method::GET, "", None)?;
            let rs: Vec<ReplicationInfo> = serde_json::from_value(v)?;
            if rs.is_empty() && opts.output == Output::Table {
                println!("no replications: `acr-task replication create` makes one");
                return Ok(ExitCode::SUCCESS);
            }
            print(opts.output, &rs)?;
        }
        ReplicationCmd::Show { name, opts } => {
            let v = backend(&opts)?.replications(Method::GET, &format!("/{name}"), None)?;
            print_one(opts.output, v)?;
        }
        ReplicationCmd::Update {
            name,
            region_endpoint_enabled,
            opts,
        } => {
            let body = json!({ "regionEndpointEnabled": region_endpoint_enabled });
            let v = backend(&opts)?.replications(Method::PATCH, &format!("/{name}"), Some(body))?;
            print_one(opts.output, v)?;
        }
        ReplicationCmd::Delete { name, yes, opts } => {
            super::registry::confirm(&format!("replication {name}"), yes)?;
            backend(&opts)?.replications(Method::DELETE, &format!("/{name}"), None)?;
            print_deleted(opts.output, &name, &format!("deleted replication {name}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
