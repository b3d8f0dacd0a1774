//! `acr-task serve`: the registry alone (`--registry-only`) or with the task service,
//! its options (listening, TLS, limits, auth, the sandbox policy) and how it stops.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::registry::data_dir;
use crate::registry::{self, RegistryConfig};
use crate::server::{ServeConfig, Server};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  acr-task serve                                      127.0.0.1:5000, data in ~/.local/share/acr-task
  acr-task serve --listen 0.0.0.0:5000 --tls-cert cert.pem --tls-key key.pem --auth
  acr-task serve --registry-only --auth --data /srv/acr-task")]
pub struct ServeArgs {
    /// Serve only the OCI registry.
    #[arg(long)]
    pub registry_only: bool,
    /// Address to listen on; port 0 picks a free one. The bound address is printed on the
    /// first line of stdout as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    /// Data directory: the registry in its `registry/`, tasks, runs and logs beside it
    /// [default: $ACR_TASK_DATA, else ~/.local/share/acr-task].
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub auth: super::auth::ServeAuthArgs,
    /// Most runs at once (task service only).
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Seconds between digest checks of base images in other registries; 0 disables
    /// (task service only). Credentials for private ones come from `docker login`.
    #[arg(long, default_value_t = 300)]
    pub base_image_poll: u64,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also trust this CA certificate (PEM) for HTTPS webhook receivers, for the database's
    /// TLS and, in the task service, when polling base images in other registries;
    /// repeatable.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Vec<PathBuf>,
    /// Largest blob the registry accepts (e.g. 20GiB, 512MiB).
    #[arg(long, value_name = "SIZE", default_value = "20GiB", value_parser = super::parse_size)]
    pub max_blob_size: u64,
    /// Open upload sessions allowed per repository.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_uploads_per_repository: usize,
    /// Open upload sessions allowed per client address.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_uploads_per_client: usize,
    /// Connections held at once; more wait to be accepted.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,
    /// Connections held at once from one client address; more are closed.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections_per_client: usize,
    /// Another name clients reach this server by (DNS name of the machine, a proxy's);
    /// requests for names it does not know are refused (against DNS rebinding). IP
    /// addresses, `localhost` and the machine's host name always work. Repeatable.
    #[arg(long = "server-name", value_name = "NAME")]
    pub server_names: Vec<String>,
    /// Serve the task API without credentials: only on a loopback address, for a
    /// development server. By default the API needs the admin (created on first start)
    /// or a token with tasks/read or tasks/write.
    #[arg(long)]
    pub insecure_open_api: bool,
    /// Serve `GET /metrics` (Prometheus) without credentials. By default it asks for what
    /// the task API does (the admin, or a token with tasks/read).
    #[arg(long)]
    pub public_metrics: bool,
    /// How long an agent's hold on a run lasts without a heartbeat; a run whose agent
    /// stops heartbeating goes to another agent after it (agents heartbeat every third).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub agent_lease: u64,
    /// Keep tasks, runs, the run queue, run logs and credentials in PostgreSQL instead of
    /// the data directory, shared by every replica given the same URL:
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (the schema is made and migrated at
    /// start); add `?sslmode=require` for TLS, the server checked against the system's
    /// roots and --ca-cert. With --storage too, the registry itself (its metadata, keys
    /// and webhooks) is kept there, so every replica serves the same registry; without
    /// it the registry is this data directory's own.
    #[arg(long, value_name = "URL", env = "ACR_TASK_DATABASE")]
    pub database: Option<String>,
    /// With a shared registry (--database with --storage): the URL the other replicas
    /// reach this one at (`https://acr-a.internal:5000`), where they send the requests of
    /// upload sessions this one holds. Default: this server's own address.
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Print the policy these options make (YAML) and exit.
    #[arg(long)]
    pub print_policy: bool,
    /// The tier of a new registry: Basic, Standard, Premium (the default), or Classic with
    /// --classic-storage. A registry that has a tier keeps it (`registry update` changes it).
    #[arg(long, value_name = "TIER")]
    pub sku: Option<crate::tier::Sku>,
    /// A Classic registry's storage: a directory in the CNCF distribution layout (what
    /// `docker-registry` writes: `docker/registry/v2/...`), served as it is.
    #[arg(long, value_name = "DIR")]
    pub classic_storage: Option<PathBuf>,
    /// Keep a new registry's blobs in S3-compatible object storage: `s3://BUCKET/PREFIX`.
    /// The endpoint, region and login come as AWS tools take them (AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN). Metadata
    /// stays in the data directory (in --database, with it); later starts of a registry
    /// of its own find the blobs without the option.
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// Answer blob pulls with a redirect (307) to a presigned URL of the object storage,
    /// valid 10 minutes, so layers go from the bucket straight to the client (ACR's data
    /// endpoints do the same). The clients must reach AWS_ENDPOINT_URL; only for a
    /// registry on --storage that is not encrypted at rest (a redirect would hand out
    /// sealed bytes). Start is refused otherwise.
    #[arg(long)]
    pub redirect_pulls: bool,
    /// A customer-managed registry key (Premium): a file of base64 keys, one per line, the
    /// current first (`openssl rand -base64 32`). A new registry is encrypted with it; an
    /// encrypted one needs it to start. Without it, acr-task makes and keeps a key in the
    /// registry's directory.
    #[arg(long, value_name = "FILE", env = "ACR_TASK_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// For benchmarks and tests: a new registry stores its content unencrypted (as one
    /// made before encryption at rest; `registry encryption enable` seals it later).
    #[arg(long, hide = true)]
    pub unencrypted: bool,
    /// For tests: a pause after each object a long job handles.
    #[arg(long, hide = true, value_name = "MS", default_value_t = 0)]
    pub job_pace_ms: u64,
    /// For tests: timers read this RFC 3339 instant at start-up...
    #[arg(long, hide = true, value_name = "TIME")]
    pub clock_start: Option<chrono::DateTime<chrono::Utc>>,
    /// ...and a clock that runs this many times faster than real time.
    #[arg(long, hide = true, default_value_t = 1, requires = "clock_start")]
    pub clock_rate: u32,
    /// ...reading `--clock-start` at this real instant instead of at start-up (replicas
    /// started apart share one clock).
    #[arg(long, hide = true, value_name = "TIME", requires = "clock_start")]
    pub clock_epoch: Option<chrono::DateTime<chrono::Utc>>,
}

/// The sandbox policy's options, shared by `serve` and `agent` (each applies its own).
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// The sandbox policy for stored tasks (YAML; see `--print-policy` for its fields).
    /// Without one: nothing beyond an ordinary container (see the README).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Allow tasks something the policy refuses (repeatable).
    #[arg(long = "allow", value_enum, value_name = "RULE")]
    pub allow: Vec<AllowArg>,
    /// A directory local contexts may be in (repeatable; replaces the policy's list, by
    /// default the serving user's home). The data directory never is.
    #[arg(long = "context-root", value_name = "DIR")]
    pub context_roots: Vec<PathBuf>,
    /// A directory `file:` secrets may be read from (repeatable; by default none).
    #[arg(long = "secret-dir", value_name = "DIR")]
    pub secret_dirs: Vec<PathBuf>,
    /// An environment variable `env:` secrets may read, `*` at the end for any rest
    /// (repeatable; replaces the default `ACR_TASK_SECRET_*`).
    #[arg(long = "secret-env", value_name = "PATTERN")]
    pub secret_env: Vec<String>,
    /// CPUs one step may use (default: the host's).
    #[arg(long, value_name = "CPUS")]
    pub step_cpus: Option<f64>,
    /// Memory one step may use, swap included (default 4GiB).
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    pub step_memory: Option<u64>,
    /// Processes one step may run at once (default 4096).
    #[arg(long, value_name = "N")]
    pub step_pids: Option<i64>,
}

/// Rules `serve --allow` can relax (the policy file's `allow` fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AllowArg {
    Privileged,
    HostNetwork,
    Mounts,
    DockerSocket,
    ExtraPrivileges,
    JoinNetworks,
    PublishPorts,
}

impl SandboxArgs {
    /// The policy of `--policy` and the options that adjust it.
    pub fn policy(&self) -> anyhow::Result<crate::policy::Policy> {
        let mut p = match &self.policy {
            Some(f) => crate::policy::Policy::from_file(f).map_err(|d| anyhow::anyhow!("{d}"))?,
            None => crate::policy::Policy::server_default(),
        };
        for a in &self.allow {
            let flag = match a {
                AllowArg::Privileged => &mut p.allow.privileged,
                AllowArg::HostNetwork => &mut p.allow.host_network,
                AllowArg::Mounts => &mut p.allow.mounts,
                AllowArg::DockerSocket => &mut p.allow.docker_socket,
                AllowArg::ExtraPrivileges => &mut p.allow.extra_privileges,
                AllowArg::JoinNetworks => &mut p.allow.join_networks,
                AllowArg::PublishPorts => &mut p.allow.publish_ports,
            };
            *flag = true;
        }
        if !self.context_roots.is_empty() {
            p.context_roots = Some(self.context_roots.clone());
        }
        if !self.secret_dirs.is_empty() {
            p.secret_dirs = Some(self.secret_dirs.clone());
        }
        if !self.secret_env.is_empty() {
            p.secret_env = Some(self.secret_env.clone());
        }
        if let Some(c) = self.step_cpus {
            p.step_limits.cpus = Some(c);
        }
        if let Some(m) = self.step_memory {
            p.step_limits.memory = Some(m);
        }
        if let Some(n) = self.step_pids {
            p.step_limits.pids = Some(n);
        }
        Ok(p)
    }
}

/// How long a pull's presigned URL may be followed (the client follows it at once; a
/// short life keeps a leaked URL from reading for long).
const PRESIGNED_FOR: std::time::Duration = std::time::Duration::from_secs(600);

impl ServeArgs {
    /// What one client may hold and send.
    pub fn limits(&self) -> (registry::RegistryLimits, crate::listen::ConnectionLimits) {
        (
            registry::RegistryLimits {
                max_blob_bytes: self.max_blob_size,
                max_uploads_per_repository: self.max_uploads_per_repository.max(1),
                max_uploads_per_client: self.max_uploads_per_client.max(1),
                job_pace: std::time::Duration::from_millis(self.job_pace_ms),
                redirect_pulls: self.redirect_pulls.then_some(PRESIGNED_FOR),
                ..registry::RegistryLimits::default()
            },
            crate::listen::ConnectionLimits {
                total: self.max_connections.max(1),
                per_client: self.max_connections_per_client.max(1),
                ..Default::default()
            },
        )
    }

    /// Where the registry's metadata lives: with `--database` and `--storage`, in that
    /// database, so every replica serves the same registry from the shared bucket.
    fn registry_meta(&self) -> anyhow::Result<crate::store::MetaPlace> {
        let (Some(url), false) = (&self.database, self.registry_only) else {
            return Ok(crate::store::MetaPlace::Directory);
        };
        let target = crate::pg::Target::parse(url, &self.ca_cert).context("--database")?;
        if self.storage.is_none() {
            // Replicas of one database serve one registry: never one of their own beside it.
            if let Some(there) = crate::store::shared_registry_storage(&target)
                .context("reading the shared registry's settings from --database")?
            {
                anyhow::bail!(
                    "the replicas of this database share a registry whose blobs are in \
                     {there}: give this one --storage {there} too"
                );
            }
            return Ok(crate::store::MetaPlace::Directory);
        }
        Ok(crate::store::MetaPlace::Shared(Box::new(target)))
    }

    /// A first start's tier (and Classic storage), set before the registry opens.
    fn first_start(
        &self,
        registry_dir: &std::path::Path,
        place: &crate::store::MetaPlace,
    ) -> anyhow::Result<()> {
        let classic = self.classic_storage.as_deref();
        let sku = match (self.sku, classic) {
            (Some(s), Some(_)) if s != crate::tier::Sku::Classic => {
                anyhow::bail!("--classic-storage is for --sku Classic, not {s}")
            }
            (None, Some(_)) => Some(crate::tier::Sku::Classic),
            (s, _) => s,
        };
        if let Some(f) = &self.encryption_key_file {
            crate::store::encryption::set_customer_key_file(f.clone());
        }
        if let Some(url) = &self.storage {
            if classic.is_some() {
                anyhow::bail!(
                    "--storage is for managed tiers; a Classic registry serves --classic-storage"
                );
            }
            crate::store::choose_object_storage(registry_dir, place, url, sku, !self.unencrypted)
                .with_context(|| format!("setting up the registry in {}", registry_dir.display()))?;
        }
        let note = crate::store::first_start(registry_dir, place, sku, classic, !self.unencrypted)
            .with_context(|| format!("setting up the registry in {}", registry_dir.display()))?;
        if let Some(n) = note {
            eprintln!("note: {n}");
        }
        Ok(())
    }

    /// The TLS set-up of --tls-cert/--tls-key, if given.
    pub fn tls(&self) -> anyhow::Result<Option<crate::listen::TlsConfig>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some(crate::listen::TlsConfig::load(c, k)?)),
            _ => Ok(None),
        }
    }
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.print_policy {
        print!("{}", args.sandbox.policy()?.to_yaml());
        return Ok(ExitCode::SUCCESS);
    }
    if !args.registry_only {
        return serve_tasks(&args);
    }
    if args.database.is_some() {
        eprintln!(
            "note: --database is for `serve` with tasks (replicas share it); this \
             --registry-only server keeps its registry in its data directory"
        );
    }
    let tls = args.tls()?;
    let dir = data_dir(args.data.clone())?;
    args.first_start(&dir, &Default::default())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let auth = args.auth.open(&dir, tls.is_some())?;
    let hooks = args.auth.webhook_options(&args.ca_cert)?;
    let (limits, connections) = args.limits();
    let cfg = RegistryConfig {
        data_dir: dir,
        listen: args.listen,
        tls,
        limits,
        connections,
        server_names: args.server_names.clone(),
        meta: Default::default(),
    };
    rt.block_on(serve_registry(cfg, auth, hooks))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve_registry(
    cfg: RegistryConfig,
    auth: Option<std::sync::Arc<crate::auth::Auth>>,
    hooks: crate::webhooks::DeliveryOptions,
) -> anyhow::Result<()> {
    // Handlers first: a supervisor may send SIGTERM as soon as it reads the address.
    let stop = stop_signal()?;
    let (dir, listen) = (cfg.data_dir.clone(), cfg.listen);
    let running = registry::start_with_auth(cfg, auth)
        .await
        .with_context(|| {
            format!(
                "starting the registry on {listen} with data in {}",
                dir.display()
            )
        })?;
    // Deliveries run off the request path; pending ones from a previous run resume here.
    let webhooks = crate::webhooks::Dispatcher::start(running.registry(), &dir, hooks)
        .with_context(|| format!("starting webhook delivery for {}", dir.display()))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", running.addr())?;
        out.flush()?;
    }
    stop.await;
    running.shutdown().await;
    webhooks.shutdown().await;
    Ok(())
}

/// Installs Ctrl-C and SIGTERM handlers now (a supervisor may signal as soon as it reads
/// the address) and returns a future that completes on either.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "waiting for Ctrl-C");
                }
            }
            _ = term.recv() => {}
        }
    })
}

/// `acr-task serve` without `--registry-only`.
fn serve_tasks(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let dir = args.data.clone().unwrap_or_else(super::default_data_dir);
    // Where the registry's rows are, decided once (it may ask the database).
    let place = args.registry_meta()?;
    args.first_start(&dir.join("registry"), &place)?;
    let mut cfg = ServeConfig::new(args.listen, dir.clone(), args.concurrency);
    cfg.remote_poll = args.base_image_poll;
    cfg.tls = args.tls()?;
    cfg.ca_certs = args.ca_cert.clone();
    (cfg.limits, cfg.connections) = args.limits();
    if let Some(start) = args.clock_start {
        cfg.clock = std::sync::Arc::new(crate::triggers::cron::ShiftedClock::anchored(
            start,
            args.clock_rate,
            args.clock_epoch.unwrap_or_else(chrono::Utc::now),
        ));
    }
    cfg.auth = args.auth.settings(cfg.tls.is_some());
    cfg.registry_auth = args.auth.auth;
    cfg.open_api = args.insecure_open_api;
    cfg.public_metrics = args.public_metrics;
    cfg.agent_lease = std::time::Duration::from_secs(args.agent_lease);
    cfg.database = args.database.clone();
    cfg.registry_meta = place;
    cfg.advertise_url = args.advertise_url.clone();
    cfg.server_names = args.server_names.clone();
    cfg.policy = args.sandbox.policy()?;
    cfg.webhooks = Some(args.auth.webhook_options(&args.ca_cert)?);
    super::tokio_runtime()?.block_on(async {
        let stop = stop_signal()?;
        let mut server = Server::bind(cfg)
            .await
            .with_context(|| format!("starting the server with data in {}", dir.display()))?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {}", server.addr())?;
            out.flush()?;
        }
        if let Some(password) = server.take_initial_admin() {
            let file = dir.join(crate::server::ADMIN_PASSWORD_FILE);
            eprintln!(
                "The task API needs credentials. Created the admin user (shown once):\n  \
                 username: {}\n  password: {password}\nIt is kept in {} (mode 0600), where \
                 `acr-task task ...` on this machine finds it; elsewhere set \
                 ACR_TASK_USERNAME and ACR_TASK_PASSWORD.",
                crate::auth::ADMIN_USER,
                file.display()
            );
        }
        server.run(stop).await?;
        Ok(ExitCode::SUCCESS)
    })
}
