//! `acr-task agent` (a worker for a server's agent pool) and `acr-task agent-pool`
//! (pools on a running server, as `az acr agentpool`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::Client;
use super::registry::print_json;
use super::render::table;
use super::task::ClientOpts;
use super::Output;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    acr-task agent-pool create builders\n  \
    ACR_TASK_USERNAME=agent ACR_TASK_PASSWORD=... acr-task agent --server https://acr.example.com --pool builders --concurrency 2\n\n\
The agent authenticates as a token with tasks/write (runs hand it their secrets, as the \
server's own executor gets them). It pushes to the registry at the --server address.")]
pub struct AgentArgs {
    /// The `acr-task serve` whose pool to work for.
    #[arg(long, env = "ACR_TASK_SERVER", default_value = super::task::DEFAULT_SERVER)]
    server: String,
    /// The agent pool (it must exist: `acr-task agent-pool create NAME`).
    #[arg(long)]
    pool: String,
    /// Runs at once on this agent.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Labels `k=v,...` shown with the agent.
    #[arg(long, value_name = "K=V,...", value_delimiter = ',')]
    labels: Vec<String>,
    /// The agent's name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Scratch space for runs [default: DATA/agent-work].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Most steps of one run at once.
    #[arg(long, default_value_t = 8)]
    max_parallel: usize,
    /// On SIGTERM or Ctrl-C the agent takes no new runs and lets running ones finish;
    /// after this many seconds (or a second signal) it cancels them and hands them back.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    drain_timeout: u64,
    /// Extra trusted CA certificates (PEM) for the server's HTTPS.
    #[arg(long, value_name = "FILE")]
    ca_cert: Vec<PathBuf>,
    /// What runs may do on this machine: the same options as `serve`'s.
    #[command(flatten)]
    sandbox: super::serve::SandboxArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum AgentPoolCmd {
    /// Make a pool: tasks created with `--agent-pool NAME` run on its agents.
    #[command(after_help = "Example:\n  acr-task agent-pool create builders --max-runs 6")]
    Create {
        /// The pool's name: 3 to 20 letters, digits or '-'.
        name: String,
        /// Most runs of the pool at once across all its agents [default: no limit].
        #[arg(long, value_name = "N")]
        max_runs: Option<u32>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Every pool with its agents online, queued and running runs.
    #[command(after_help = "Example:\n  acr-task agent-pool list -o json")]
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// One pool: its agents (name, labels, last heartbeat), queue depth and running runs.
    #[command(after_help = "Example:\n  acr-task agent-pool show builders")]
    Show {
        /// The pool's name.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Change a pool's run limit.
    #[command(after_help = "Example:\n  acr-task agent-pool update builders --max-runs 10")]
    Update {
        /// The pool's name.
        name: String,
        /// Most runs of the pool at once across all its agents (0: no limit).
        #[arg(long, value_name = "N")]
        max_runs: Option<u32>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Delete a pool no task uses and with no queued or running runs.
    #[command(after_help = "Example:\n  acr-task agent-pool delete builders")]
    Delete {
        /// The pool's name.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label {l:?}: write it as key=value"))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    let data = super::default_data_dir();
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| data.join("agent-work"));
    let mut policy = args.sandbox.policy()?;
    policy.scratch.push(work_dir.clone());
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "agent".into()),
    };
    let client = Client::new(&args.server);
    let login = client.login().map(|c| (c.username, c.password));
    let cfg = crate::agent::AgentConfig {
        server: client.base.clone(),
        login,
        ca_certs: args.ca_cert.clone(),
        pool: args.pool.clone(),
        name,
        labels,
        concurrency: args.concurrency,
        work_dir,
        max_parallel: args.max_parallel.max(1),
        policy,
        drain_timeout: Duration::from_secs(args.drain_timeout),
        notify: Some(std::sync::Arc::new(|m: &str| eprintln!("{m}"))),
    };
    super::tokio_runtime()?.block_on(async move {
        let (stop, hard) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let (s, h) = (stop.clone(), hard.clone());
        tokio::spawn(async move {
            for token in [s, h] {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                token.cancel();
            }
        });
        crate::agent::run(cfg, stop, hard)
            .await
            .context("acr-task agent")?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn agent_pool(cmd: AgentPoolCmd) -> anyhow::Result<ExitCode> {
    super::tokio_runtime()?.block_on(async move {
        match cmd {
            AgentPoolCmd::Create {
                name,
                max_runs,
                opts,
            } => {
                let c = Client::new(&opts.server);
                let body = json!({ "name": name, "maxRuns": max_runs });
                let v = c.call(Method::POST, "/api/agentpools", Some(&body)).await?;
                print_pool(&v, opts.output)?;
            }
            AgentPoolCmd::List { opts } => {
                let c = Client::new(&opts.server);
                let v = c.call(Method::GET, "/api/agentpools", None).await?;
                if opts.output == Output::Json {
                    print_json(&v)?;
                } else {
                    let rows: Vec<Vec<String>> =
                        v.as_array().into_iter().flatten().map(pool_row).collect();
                    println!(
                        "{}",
                        table(
                            &["NAME", "MAX RUNS", "AGENTS ONLINE", "QUEUED", "RUNNING"],
                            &rows
                        )
                    );
                }
            }
            AgentPoolCmd::Show { name, opts } => {
                let c = Client::new(&opts.server);
                let v = c
                    .call(Method::GET, &format!("/api/agentpools/{name}"), None)
                    .await?;
                print_pool(&v, opts.output)?;
            }
            AgentPoolCmd::Update {
                name,
                max_runs,
                opts,
            } => {
                let c = Client::new(&opts.server);
                let body = json!({ "maxRuns": max_runs });
                let v = c
                    .call(
                        Method::PATCH,
                        &format!("/api/agentpools/{name}"),
                        Some(&body),
                    )
                    .await?;
                print_pool(&v, opts.output)?;
            }
            AgentPoolCmd::Delete { name, opts } => {
                let c = Client::new(&opts.server);
                c.call(Method::DELETE, &format!("/api/agentpools/{name}"), None)
                    .await?;
                eprintln!("deleted agent pool {name}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn pool_row(p: &Value) -> Vec<String> {
    vec![
        p["name"].as_str().unwrap_or_default().to_string(),
        p["maxRuns"]
            .as_u64()
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
        p["agentsOnline"].as_u64().unwrap_or(0).to_string(),
        p["queued"].as_u64().unwrap_or(0).to_string(),
        p["running"].as_u64().unwrap_or(0).to_string(),
    ]
}

fn print_pool(v: &Value, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(v);
    }
    println!(
        "{}",
        table(
            &["NAME", "MAX RUNS", "AGENTS ONLINE", "QUEUED", "RUNNING"],
            &[pool_row(v)]
        )
    );
    let agents: Vec<Vec<String>> = v["agents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let labels = a["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let state = match (a["online"].as_bool(), a["draining"].as_bool()) {
                (Some(true), Some(true)) => "draining",
                (Some(true), _) => "online",
                _ => "offline",
            };
            vec![
                a["id"].as_str().unwrap_or_default().to_string(),
                a["name"].as_str().unwrap_or_default().to_string(),
                state.to_string(),
                a["concurrency"].as_u64().unwrap_or(0).to_string(),
                labels,
                a["lastSeen"].as_str().unwrap_or_default().to_string(),
            ]
        })
        .collect();
    if !agents.is_empty() {
        println!();
        println!(
            "{}",
            table(
                &[
                    "AGENT",
                    "NAME",
                    "STATE",
                    "CONCURRENCY",
                    "LABELS",
                    "LAST SEEN"
                ],
                &agents
            )
        );
    }
    Ok(())
}
