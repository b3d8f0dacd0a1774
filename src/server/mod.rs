//! `acr-task serve`: the registry (`/v2/...`) and the task service (`/api/...`) on one
//! listener, with the persistent run queue and the triggers that feed it.
//!
//! Data directory layout: `registry/` (the registry's store), `server.db` (tasks, runs,
//! deliveries, base-image index) and `logs/<run>.log` unless `--database` holds them,
//! `replica.id` (who holds this server's runs), `work/` (per-run scratch).

pub mod agents;
pub mod api;
pub mod db;
pub mod guard;
pub mod leader;
pub mod live;
pub mod manage;
pub mod model;
pub mod postgres;
pub mod queue;
pub mod runner;
pub mod sqlite;
#[cfg(test)]
mod tests;
mod watchers;
pub mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::registry::{Registry, RegistryError};
use crate::triggers::cron::{Clock, SystemClock};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    Data {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("webhooks: {0}")]
    Webhooks(#[from] crate::webhooks::WebhookError),
    #[error(transparent)]
    RemoteRegistry(#[from] crate::registry::client::ClientError),
    #[error(transparent)]
    Credentials(#[from] crate::credentials::CredentialsError),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("geo-replication: {0}")]
    Replication(#[from] crate::replication::ReplicationError),
    #[error("the database: {0}")]
    Pg(#[from] crate::pg::PgError),
    #[error("--insecure-open-api serves the task API without credentials, so only on a loopback address; {0} is not one (drop the flag, or listen on 127.0.0.1)")]
    OpenApiNotLoopback(SocketAddr),
}

/// How long a stopping server waits for its queue (which cancels running runs and waits
/// for their teardown) and loops to end.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Most runs at once (the agent pool).
    pub concurrency: usize,
    /// Most steps of one run at once.
    pub max_parallel: usize,
    pub clock: Arc<dyn Clock>,
    /// Seconds between digest checks of base images in other registries (0: never).
    pub remote_poll: u64,
    /// How logins and tokens behave (the registry's gate and the task API's credentials).
    pub auth: crate::auth::AuthSettings,
    /// The registry needs credentials (`--auth`); without, it is open (the task API never).
    pub registry_auth: bool,
    /// The task API asks for no credentials (`--insecure-open-api`, loopback only).
    pub open_api: bool,
    /// Host names the server answers to beyond IP literals, `localhost` and its own.
    pub server_names: Vec<String>,
    /// What stored tasks may do.
    pub policy: crate::policy::Policy,
    /// Outgoing registry webhooks (`None`: not delivered).
    pub webhooks: Option<crate::webhooks::DeliveryOptions>,
    /// Serve HTTPS with this certificate (`None`: plain HTTP).
    pub tls: Option<crate::listen::TlsConfig>,
    /// Extra trusted CA certificates (PEM files) for polling other registries.
    pub ca_certs: Vec<PathBuf>,
    /// What one registry client may hold and send.
    pub limits: crate::registry::RegistryLimits,
    pub connections: crate::listen::ConnectionLimits,
    /// `GET /metrics` without credentials (`--public-metrics`); else as the task API.
    pub public_metrics: bool,
    /// How long an agent's lease on a run lasts without a heartbeat.
    pub agent_lease: std::time::Duration,
    /// Tasks, runs and the queue in this PostgreSQL database instead of `server.db`.
    pub database: Option<String>,
    /// Where the registry's metadata is: its directory, or (`--database` with
    /// `--storage`) the database the replicas share.
    pub registry_meta: crate::store::MetaPlace,
    /// How the other replicas reach this one (a shared registry's upload sessions);
    /// `None`: this server's own address.
    pub advertise_url: Option<String>,
}

impl ServeConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf, concurrency: usize) -> ServeConfig {
        ServeConfig {
            listen,
            data_dir,
            concurrency,
            max_parallel: 8,
            clock: Arc::new(SystemClock),
            remote_poll: 300,
            auth: Default::default(),
            registry_auth: false,
            open_api: false,
            server_names: Vec::new(),
            policy: crate::policy::Policy::server_default(),
            webhooks: None,
            tls: None,
            ca_certs: Vec::new(),
            limits: Default::default(),
            connections: Default::default(),
            public_metrics: false,
            agent_lease: std::time::Duration::from_secs(30),
            database: None,
            registry_meta: Default::default(),
            advertise_url: None,
        }
    }
}

/// A bound server, not yet serving: its address is known (print it, then [`Server::run`]).
pub struct Server {
    cfg: ServeConfig,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    registry: Registry,
    db: Arc<dyn db::ServerStore>,
    /// For polling base images in other registries.
    remote: crate::registry::client::Transport,
    auth: Arc<crate::auth::Auth>,
    policy: Arc<crate::policy::Policy>,
    initial_admin: Option<String>,
}

/// Where the admin password made on first start is kept (mode 0600), in the data dir.
pub const ADMIN_PASSWORD_FILE: &str = "admin.password";
/// The API's URL while `serve` runs on a data directory (removed when it stops).
pub const SERVE_URL_FILE: &str = "serve.url";

/// On the first start, the task API gets its credential: the admin user, with a password
/// shown once and kept in `DATA/admin.password` (0600) for the CLI on this machine. An
/// admin the operator already enabled is left alone, as is one disabled since.
fn bootstrap_admin(
    auth: &crate::auth::Auth,
    data_dir: &std::path::Path,
) -> Result<Option<String>, ServerError> {
    const FLAG: &str = "api_admin_bootstrapped";
    let store = auth.store();
    if store.flag(FLAG)? {
        return Ok(None);
    }
    let made = if store.admin_enabled()? {
        None
    } else {
        let secret = store.renew_admin()?;
        let path = data_dir.join(ADMIN_PASSWORD_FILE);
        write_private(&path, &secret.value)?;
        Some(secret.value)
    };
    store.set_flag(FLAG)?;
    Ok(made)
}

/// Says, in a data directory, that its server keeps tasks, runs, logs and credentials in
/// a database (`serve --database`): commands on the directory's files refuse those.
pub const SHARED_DATABASE_FILE: &str = "database.shared";

/// Where a server keeps its id: one per data directory, kept across restarts.
const REPLICA_ID_FILE: &str = "replica.id";

/// This data directory's id, made on its first start: the holder of the server's own
/// runs in a database replicas share (a restart fails exactly its own cut-off runs).
fn replica_id(data_dir: &std::path::Path) -> Result<String, ServerError> {
    let path = data_dir.join(REPLICA_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            write_private(&path, &id)?;
            Ok(id)
        }
    }
}

/// Writes `text` to `path` readable by this user only, atomically.
fn write_private(path: &std::path::Path, text: &str) -> Result<(), ServerError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl Server {
    pub async fn bind(mut cfg: ServeConfig) -> Result<Server, ServerError> {
        if cfg.open_api && !cfg.listen.ip().is_loopback() {
            return Err(ServerError::OpenApiNotLoopback(cfg.listen));
        }
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ServerError::Data {
            path: cfg.data_dir.clone(),
            source,
        })?;
        // Tasks never read the server's own data, whatever the policy file says.
        let data = std::fs::canonicalize(&cfg.data_dir)?;
        cfg.policy.scratch.push(data.join("work"));
        cfg.policy.protected.push(data);
        for d in ["logs", "work"] {
            let p = cfg.data_dir.join(d);
            std::fs::create_dir_all(&p).map_err(|source| ServerError::Data { path: p, source })?;
        }
        let reg_dir = cfg.data_dir.join("registry");
        let (limits, place) = (cfg.limits.clone(), cfg.registry_meta.clone());
        let registry =
            tokio::task::spawn_blocking(move || Registry::open_at(&reg_dir, limits, &place))
                .await??;
        let db_path = cfg.data_dir.join("server.db");
        let marker = cfg.data_dir.join(SHARED_DATABASE_FILE);
        if cfg.database.is_some() {
            write_private(
                &marker,
                "tasks, runs, logs and credentials of this server live in PostgreSQL \
                 (serve --database), not in this directory",
            )?;
        } else if marker.exists() {
            std::fs::remove_file(&marker)?;
        }
        // The shared database, reached over TLS when its URL says sslmode=require (the
        // server's certificate checked against the system's roots and --ca-cert).
        let target = cfg
            .database
            .as_deref()
            .map(|url| crate::pg::Target::parse(url, &cfg.ca_certs))
            .transpose()?;
        let server_target = target.clone();
        let db: Arc<dyn db::ServerStore> = tokio::task::spawn_blocking(move || {
            Ok::<Arc<dyn db::ServerStore>, db::DbError>(match server_target {
                Some(t) => Arc::new(postgres::PgServer::open(&t)?),
                None => Arc::new(sqlite::SqliteServer::open(&db_path)?),
            })
        })
        .await??;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr()?;
        let remote = crate::registry::client::Transport::new(
            &cfg.ca_certs,
            crate::credentials::Credentials::from_docker_config()?,
        )?;
        let (reg_dir, settings, data_dir) = (
            cfg.data_dir.join("registry"),
            cfg.auth.clone(),
            cfg.data_dir.clone(),
        );
        let (auth, initial_admin) = tokio::task::spawn_blocking(move || {
            // Replicas sharing a database share tokens, scope maps, the admin and the
            // signing key: a credential works on any of them.
            let auth = match target {
                Some(t) => crate::auth::Auth::open_shared(
                    Box::new(crate::auth::postgres::PgAuth::open(&t)?),
                    settings,
                )?,
                None => crate::auth::Auth::open(&reg_dir, settings)?,
            };
            let made = bootstrap_admin(&auth, &data_dir)?;
            Ok::<_, ServerError>((auth, made))
        })
        .await??;
        let policy = Arc::new(cfg.policy.clone());
        let server = Server {
            cfg,
            listener,
            addr,
            registry,
            db,
            remote,
            auth,
            policy,
            initial_admin,
        };
        // Where `acr-task token|scope-map|registry ...` on this machine find this server:
        // written before the address is announced, so a command run once `serve` has
        // printed it never goes around the server (connections wait in the backlog).
        let url_file = server.cfg.data_dir.join(SERVE_URL_FILE);
        let scheme = if server.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        };
        if let Err(e) = write_private(&url_file, &format!("{scheme}://{}", server.registry_host()))
        {
            tracing::warn!(error = %e, "writing {}", url_file.display());
        }
        Ok(server)
    }

    /// The admin password made on this first start (to show once), if one was.
    pub fn take_initial_admin(&mut self) -> Option<String> {
        self.initial_admin.take()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `HOST:PORT` that the Docker Engine pushes to (loopback when listening on all
    /// interfaces: the engine treats loopback registries as insecure-allowed).
    pub fn registry_host(&self) -> String {
        if self.addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", self.addr.port())
        } else {
            self.addr.to_string()
        }
    }

    /// Serves until `stop` resolves; then stops taking runs and cancels running ones.
    pub async fn run(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let registry_host = self.registry_host();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let queue = Arc::new(
            queue::Queue::new(self.db.clone(), self.cfg.concurrency, registry_host.clone())
                .with_metrics(metrics.clone())
                .with_lease(self.cfg.agent_lease)
                .with_holder(replica_id(&self.cfg.data_dir)?),
        );
        let exec: Arc<dyn runner::Executor> = Arc::new(
            runner::DockerExecutor::connect(
                self.cfg.data_dir.join("work"),
                self.cfg.max_parallel,
                self.policy.clone(),
                self.cfg.registry_auth.then(|| self.auth.clone()),
                self.registry.store().clone(),
            )
            .await,
        );
        queue.recover(exec.as_ref()).await?;
        let hub = Arc::new(agents::AgentHub::new(
            queue.clone(),
            self.cfg.agent_lease,
            self.policy.clone(),
            self.cfg.registry_auth.then(|| self.auth.clone()),
            Arc::new(crate::setup::StoreTrust(self.registry.store().clone())),
        ));
        // Everything that runs beside the listener, stopped together at the end.
        let background = crate::background::Background::new();
        let halt = background.token();
        let leading = leader::start(self.db.clone(), &background).await;
        if matches!(self.cfg.registry_meta, crate::store::MetaPlace::Shared(_)) {
            // A client may send an upload's next request to any replica.
            let scheme = if self.cfg.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let url = self
                .cfg
                .advertise_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{registry_host}"));
            let http = crate::registry::client::http_client(&self.cfg.ca_certs)?;
            self.registry
                .share_as(url.trim_end_matches('/').to_string(), http, leading.clone());
        }
        {
            // Another server sharing the database queued, handed back or ended a run.
            let q = queue.clone();
            self.db.listen(Arc::new(move |change| q.wake(change)))?;
        }
        background.spawn_graceful(queue.clone().run_loop(exec, halt.clone()));
        background.spawn_graceful(hub.clone().expiry_loop(halt.clone(), leading.clone()));
        watchers::spawn_all(
            watchers::Watchers {
                queue: queue.clone(),
                registry: self.registry.clone(),
                registry_host,
                clock: self.cfg.clock.clone(),
                halt: halt.clone(),
                remote_poll: self.cfg.remote_poll,
                remote: self.remote.clone(),
                leading: leading.clone(),
            },
            &background,
        );
        // Webhooks live with the registry: in the shared database when it is shared, where
        // only the leader takes events in and delivers them (once for all replicas).
        let place = self.cfg.registry_meta.clone();
        let shared = matches!(place, crate::store::MetaPlace::Shared(_));
        let hooks = {
            let dir = self.cfg.data_dir.join("registry");
            Arc::new(
                tokio::task::spawn_blocking(move || match place {
                    crate::store::MetaPlace::Shared(t) => Ok(crate::webhooks::WebhookStore::new(
                        Box::new(crate::webhooks::postgres::PgWebhooks::open(&t)?),
                    )),
                    crate::store::MetaPlace::Directory => crate::webhooks::WebhookStore::open(&dir),
                })
                .await??,
            )
        };
        // Kept alive while serving: deliveries run off the request path.
        let webhooks = self.cfg.webhooks.as_ref().map(|opts| {
            let mut opts = opts.clone();
            let m = metrics.clone();
            opts.observer = Some(crate::webhooks::Observer(Arc::new(move |ok| m.webhook(ok))));
            crate::webhooks::Dispatcher::start_with(
                hooks.clone(),
                &self.registry,
                opts,
                shared.then(|| leading.clone()),
            )
        });
        // Geo-replication, for a registry of this server's own (see `replication`).
        let home_url = format!(
            "{}://{}",
            if self.cfg.tls.is_some() {
                "https"
            } else {
                "http"
            },
            self.registry_host()
        );
        let replication = if shared {
            None
        } else {
            Some(
                crate::replication::service::Replication::start(
                    self.registry.clone(),
                    self.auth.clone(),
                    hooks.clone(),
                    self.cfg.ca_certs.clone(),
                    halt.clone(),
                )
                .await?,
            )
        };
        let gate = self.cfg.registry_auth.then(|| self.auth.clone());
        let guard = Arc::new(guard::ApiGuard {
            auth: self.auth.clone(),
            open: self.cfg.open_api,
        });
        let state = Arc::new(api::ApiState {
            queue: queue.clone(),
            policy: self.policy.clone(),
        });
        let page = web::router(Arc::new(web::WebState {
            queue: queue.clone(),
            registry: self.registry.clone(),
            auth: self.auth.clone(),
            open: self.cfg.open_api,
            tls: self.cfg.tls.is_some(),
            host: self.registry_host(),
            sessions: Default::default(),
            agent_online_within: hub.online_within(),
            replication: replication.clone(),
        }));
        let scrape = metrics_router(
            Arc::new(MetricsState {
                metrics: metrics.clone(),
                queue,
                store: self.registry.store().clone(),
                agent_online_within: hub.online_within(),
                leading,
                replication: replication.clone(),
            }),
            (!self.cfg.public_metrics).then(|| guard.clone()),
        );
        let manage = manage::router(Arc::new(manage::ManageState {
            auth: self.auth.clone(),
            store: self.registry.store().clone(),
            hooks,
            delivery: self.cfg.webhooks.clone(),
            open: self.cfg.open_api,
            queue: Some(state.queue.clone()),
            login_server: Some(self.registry_host()),
            registry: self.registry.clone(),
            ca_certs: self.cfg.ca_certs.clone(),
            replication: replication.clone(),
            home_url,
        }))
        .merge(hub.router());
        let names = Arc::new(crate::listen::HostNames::new(&self.cfg.server_names));
        let open_registry = gate.is_none();
        let mut registry = crate::registry::router_with_auth(self.registry.clone(), gate);
        if let Some(r) = &replication {
            registry = registry.layer(axum::middleware::from_fn_with_state(
                r.clone(),
                crate::replication::service::endpoint_gate,
            ));
        }
        let mut app = registry
            .merge(api::router(state, guard, manage))
            .merge(page)
            .merge(scrape);
        if let Some(r) = replication {
            app = app.merge(crate::replication::service::peer_router(r));
        }
        if open_registry {
            // The token endpoint still serves the API: a client making many calls logs in
            // once for a bearer token instead of once per call (each a password hash).
            app = app.merge(crate::auth::http::token_router(self.auth.clone()));
        }
        let app = app
            .layer(axum::middleware::from_fn_with_state(
                metrics,
                crate::metrics::track,
            ))
            .layer(axum::middleware::from_fn_with_state(
                names,
                crate::listen::check_host,
            ));
        let (tls, connections) = (self.cfg.tls.clone(), self.cfg.connections);
        let served = crate::listen::serve_with(self.listener, app, tls, connections, stop).await;
        // The queue cancels its running runs and waits for their clean-up (a run's teardown
        // sweep takes seconds), so it gets longer than the other loops need.
        background.shutdown(STOP_GRACE).await;
        if let Some(w) = webhooks {
            w.shutdown().await;
        }
        served?;
        let _ = std::fs::remove_file(self.cfg.data_dir.join(SERVE_URL_FILE));
        Ok(())
    }
}

struct MetricsState {
    metrics: Arc<crate::metrics::Metrics>,
    queue: Arc<queue::Queue>,
    store: Arc<crate::store::Store>,
    /// Agents heard from within this count as online.
    agent_online_within: std::time::Duration,
    leading: leader::Leadership,
    replication: Option<Arc<crate::replication::service::Replication>>,
}

fn replica(r: crate::replication::ReplicationInfo) -> crate::metrics::ReplicaSnapshot {
    crate::metrics::ReplicaSnapshot {
        ready: r.status == "Ready",
        lag_events: r.lag_events,
        lag_seconds: r.lag_seconds,
        backfill_remaining: r.backfill.map_or(0, |(done, all)| all.saturating_sub(done)),
        failing: r.last_error.is_some(),
        replica: r.name,
    }
}

/// `GET /metrics`: behind the task API's guard (tasks/read) unless `--public-metrics`.
fn metrics_router(state: Arc<MetricsState>, guard: Option<Arc<guard::ApiGuard>>) -> axum::Router {
    let r = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(state);
    match guard {
        Some(g) => r.route_layer(axum::middleware::from_fn_with_state(g, guard::api_guard)),
        None => r,
    }
}

async fn scrape(
    axum::extract::State(s): axum::extract::State<Arc<MetricsState>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (db, store) = (s.queue.db().clone(), s.store.clone());
    let online_within = s.agent_online_within;
    let read = tokio::task::spawn_blocking(move || {
        let runs = db.run_counts().map_err(|e| e.to_string())?;
        let queued = db
            .count_with_status(crate::exec::Status::Queued)
            .map_err(|e| e.to_string())?;
        let mut pools = Vec::new();
        for p in db.pools().map_err(|e| e.to_string())? {
            let view =
                agents::pool_view(db.as_ref(), p, online_within).map_err(|e| e.to_string())?;
            let now = chrono::Utc::now();
            pools.push(crate::metrics::PoolSnapshot {
                pool: view.pool.name.clone(),
                queued: view.queued,
                running: view.running,
                online: view.agents_online as u64,
                agents: view
                    .agents
                    .iter()
                    .map(|a| {
                        let age = chrono::DateTime::parse_from_rfc3339(&a.agent.last_seen)
                            .map(|t| {
                                now.signed_duration_since(t).num_milliseconds() as f64 / 1000.0
                            })
                            .unwrap_or(f64::NAN);
                        (a.agent.id.clone(), age.max(0.0))
                    })
                    .collect(),
            });
        }
        let used = store.storage_used().map_err(|e| e.to_string())?;
        let included = store
            .properties()
            .map_err(|e| e.to_string())?
            .limits()
            .storage_bytes;
        Ok::<_, String>((runs, queued, used, included, pools))
    })
    .await;
    let (runs, queued, used, included, pools) = match read {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading metrics");
            return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Err(e) => {
            tracing::error!(error = %e, "reading metrics");
            return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let replicas = match &s.replication {
        // The other series still go out when the group's own store cannot be read.
        Some(r) => match r.list().await {
            Ok(list) => list
                .into_iter()
                .filter(|r| !r.this_server)
                .map(replica)
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "reading metrics: the replications");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let (concurrency, running) = s.queue.concurrency();
    let snap = crate::metrics::Snapshot {
        runs: runs
            .into_iter()
            .map(|(t, st, n)| (t, st.as_str().to_string(), n))
            .collect(),
        queued,
        running: running as u64,
        concurrency: concurrency as u64,
        leader: *s.leading.borrow(),
        storage_used: used,
        storage_included: included,
        pools,
        replicas,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(&snap),
    )
        .into_response()
}
