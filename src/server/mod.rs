//! `acr-task serve`: the registry (`/v2/...`) and the task service (`/api/...`) on one
//! listener, with the persistent run queue and the triggers that feed it.
//!
//! Data directory layout: `registry/` (the registry's store), `server.db` (tasks, runs,
//! deliveries, base-image index), `logs/<run>.log`, `work/` (per-run scratch).

pub mod api;
pub mod db;
pub mod model;
pub mod queue;
pub mod runner;
#[cfg(test)]
mod tests;
mod watchers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

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
    Credentials(#[from] crate::registry::credentials::CredentialsError),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

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
    /// Registry access control; it also guards the management API. `None`: open.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Outgoing registry webhooks (`None`: not delivered).
    pub webhooks: Option<crate::webhooks::DeliveryOptions>,
    /// Serve HTTPS with this certificate (`None`: plain HTTP).
    pub tls: Option<crate::listen::TlsConfig>,
    /// Extra trusted CA certificates (PEM files) for polling other registries.
    pub ca_certs: Vec<PathBuf>,
    /// What one registry client may hold and send.
    pub limits: crate::registry::RegistryLimits,
    pub connections: crate::listen::ConnectionLimits,
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
            auth: None,
            webhooks: None,
            tls: None,
            ca_certs: Vec::new(),
            limits: Default::default(),
            connections: Default::default(),
        }
    }
}

/// A bound server, not yet serving: its address is known (print it, then [`Server::run`]).
pub struct Server {
    cfg: ServeConfig,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    registry: Registry,
    db: Arc<db::Db>,
    /// For polling base images in other registries.
    remote: crate::registry::client::Transport,
}

impl Server {
    pub async fn bind(cfg: ServeConfig) -> Result<Server, ServerError> {
        for d in ["logs", "work"] {
            let p = cfg.data_dir.join(d);
            std::fs::create_dir_all(&p).map_err(|source| ServerError::Data { path: p, source })?;
        }
        let reg_dir = cfg.data_dir.join("registry");
        let limits = cfg.limits.clone();
        let registry =
            tokio::task::spawn_blocking(move || Registry::open_with(&reg_dir, limits)).await??;
        let db_path = cfg.data_dir.join("server.db");
        let db = Arc::new(tokio::task::spawn_blocking(move || db::Db::open(&db_path)).await??);
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr()?;
        let remote = crate::registry::client::Transport::new(
            &cfg.ca_certs,
            crate::registry::credentials::Credentials::from_docker_config()?,
        )?;
        Ok(Server {
            cfg,
            listener,
            addr,
            registry,
            db,
            remote,
        })
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
        let queue = Arc::new(queue::Queue::new(
            self.db.clone(),
            self.cfg.concurrency,
            self.cfg.data_dir.join("logs"),
            registry_host.clone(),
        ));
        let exec: Arc<dyn runner::Executor> = Arc::new(
            runner::DockerExecutor::connect(self.cfg.data_dir.join("work"), self.cfg.max_parallel)
                .await,
        );
        queue.recover(exec.as_ref()).await?;
        let halt = CancellationToken::new();
        let queue_task = tokio::spawn(queue.clone().run_loop(exec, halt.clone()));
        watchers::spawn_all(watchers::Watchers {
            queue: queue.clone(),
            registry: self.registry.clone(),
            registry_host,
            clock: self.cfg.clock.clone(),
            halt: halt.clone(),
            remote_poll: self.cfg.remote_poll,
            remote: self.remote.clone(),
        });
        // Kept alive while serving: deliveries run off the request path.
        let _webhooks = match &self.cfg.webhooks {
            Some(opts) => Some(crate::webhooks::Dispatcher::start(
                &self.registry,
                &self.cfg.data_dir.join("registry"),
                opts.clone(),
            )?),
            None => None,
        };
        let app =
            crate::registry::router_with_auth(self.registry.clone(), self.cfg.auth.clone()).merge(
                api::router(Arc::new(api::ApiState { queue }), self.cfg.auth.clone()),
            );
        let h = halt.clone();
        let (tls, connections) = (self.cfg.tls.clone(), self.cfg.connections);
        crate::listen::serve_with(self.listener, app, tls, connections, async move {
            stop.await;
            h.cancel();
        })
        .await?;
        halt.cancel();
        queue_task.await?;
        Ok(())
    }
}
