//! PostgreSQL for the stores that can live there (`serve --database postgres://...`): a
//! few connections on a runtime of their own (the stores' traits block, so every call
//! runs there and the caller's thread waits for it, as it would for SQLite's file),
//! connections made again when one breaks, versioned migrations, and the database's
//! errors as sentences.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

pub use tls::Target;

/// What the database (or reaching it) said, as a sentence.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PgError(pub String);

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError(match e.as_db_error() {
            Some(d) => format!("{} ({})", d.message(), d.code().code()),
            // With its causes: "error performing TLS handshake" alone does not say why.
            None => {
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                text
            }
        })
    }
}

/// A statement's arguments (see [`args!`]).
pub type Args = Vec<Box<dyn ToSql + Sync + Send>>;

/// Boxes statement arguments.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        vec![$(Box::new($a) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>),*]
    };
}
pub(crate) use args;

/// Connections kept (each call takes one for its transaction): as many as agents and
/// clients keep a replica busy with on two cores, well under PostgreSQL's default 100
/// for a few replicas.
const CONNECTIONS: usize = 8;

/// One connection, held for a call.
pub struct Conn(OwnedMutexGuard<Option<Client>>);

impl Conn {
    pub fn client(&mut self) -> Result<&mut Client, PgError> {
        self.0
            .as_mut()
            .ok_or_else(|| PgError("not connected".into()))
    }
}

/// A few connections, each used by one call at a time.
struct Pool {
    target: Target,
    conns: Vec<Arc<Mutex<Option<Client>>>>,
    next: AtomicUsize,
}

impl Pool {
    async fn get(&self) -> Result<Conn, PgError> {
        // An idle connection if there is one; else wait for the next in turn.
        let idle = self
            .conns
            .iter()
            .find_map(|c| c.clone().try_lock_owned().ok());
        let mut guard = match idle {
            Some(g) => g,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
                self.conns[i].clone().lock_owned().await
            }
        };
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.target).await?);
        }
        Ok(Conn(guard))
    }
}

/// A connection with its driver spawned on the current runtime.
pub async fn connect(target: &Target) -> Result<Client, PgError> {
    let (client, connection) = target.connect().await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// A database: its connections and the runtime they live on, shared by every store of
/// this process that uses the same database (a replica's connections stay a handful,
/// however many of its stores live there).
pub struct Database {
    inner: Arc<Shared>,
}

struct Shared {
    rt: crate::background::OwnRuntime,
    pool: Arc<Pool>,
}

/// The databases this process has open, by where they are.
static OPEN: std::sync::Mutex<Vec<(String, std::sync::Weak<Shared>)>> =
    std::sync::Mutex::new(Vec::new());

impl Database {
    /// For `target`; connects lazily. Calls fail, rather than hang, when the database
    /// stops answering.
    pub fn new(target: &Target, name: &str) -> Result<Database, PgError> {
        let key = target.identity();
        let mut open = OPEN
            .lock()
            .map_err(|_| PgError("the database table is poisoned".into()))?;
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(inner) = open
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(Database { inner });
        }
        let mut target = target.clone();
        target
            .config
            .options("-c statement_timeout=30000 -c lock_timeout=30000");
        let rt = crate::background::OwnRuntime::new(name, 2)
            .map_err(|e| PgError(format!("starting the database client: {e}")))?;
        let inner = Arc::new(Shared {
            rt,
            pool: Arc::new(Pool {
                target,
                conns: (0..CONNECTIONS)
                    .map(|_| Arc::new(Mutex::new(None)))
                    .collect(),
                next: AtomicUsize::new(0),
            }),
        });
        open.push((key, Arc::downgrade(&inner)));
        Ok(Database { inner })
    }

    /// How to connect (for connections of a caller's own: a lock holder, a listener).
    pub fn target(&self) -> &Target {
        &self.inner.pool.target
    }

    /// Runs `f` with a connection on this database's runtime and waits for it.
    pub fn call<T, E, F, Fut>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<PgError> + Send + 'static,
        F: FnOnce(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send,
    {
        let pool = self.inner.pool.clone();
        self.inner
            .rt
            .wait(async move { f(pool.get().await?).await })
            .ok_or_else(|| PgError("the database client stopped".into()))?
    }

    /// Runs `f` on this database's runtime and waits for it (no connection taken).
    pub fn wait<T: Send + 'static>(
        &self,
        f: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, PgError> {
        self.inner
            .rt
            .wait(f)
            .ok_or_else(|| PgError("the database client stopped".into()))
    }

    /// Runs `f` on this database's runtime until it ends or the database is dropped.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.inner.rt.spawn(f);
    }

    /// Runs one statement; the rows it returns.
    pub fn query(&self, sql: &str, args: Args) -> Result<Vec<Row>, PgError> {
        let sql = sql.to_string();
        self.call(move |mut c| async move {
            let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as _).collect();
            Ok(c.client()?.query(sql.as_str(), &refs).await?)
        })
    }

    /// Runs one statement; how many rows it changed.
    pub fn execute(&self, sql: &str, args: Args) -> Result<u64, PgError> {
        let sql = sql.to_string();
        self.call(move |mut c| async move {
            let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as _).collect();
            Ok(c.client()?.execute(sql.as_str(), &refs).await?)
        })
    }
}

impl Database {
    /// A transaction driven from the calling (blocking) thread one statement at a time,
    /// so the caller's own code — a store's callbacks, which are neither `Send` nor
    /// `'static` — runs between statements, inside it. Rolled back unless committed.
    pub fn begin(&self) -> Result<SyncTx<'_>, PgError> {
        let pool = self.inner.pool.clone();
        let conn = self.wait(async move {
            let mut c = pool.get().await?;
            c.client()?.batch_execute("BEGIN").await?;
            Ok::<_, PgError>(c)
        })??;
        Ok(SyncTx {
            db: self,
            conn: Some(conn),
        })
    }
}

/// See [`Database::begin`].
pub struct SyncTx<'a> {
    db: &'a Database,
    conn: Option<Conn>,
}

impl SyncTx<'_> {
    /// Runs `f` with the transaction's connection on the database's runtime.
    fn with<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(
                Conn,
            )
                -> std::pin::Pin<Box<dyn Future<Output = (Conn, Result<T, PgError>)> + Send>>
            + Send
            + 'static,
    ) -> Result<T, PgError> {
        let conn = self
            .conn
            .take()
            .ok_or_else(|| PgError("the transaction ended".into()))?;
        let (conn, r) = self.db.wait(f(conn))?;
        self.conn = Some(conn);
        r
    }

    /// Runs one statement: its rows, or (`count`) how many rows it changed.
    fn statement(
        &mut self,
        sql: &str,
        args: Args,
        count: bool,
    ) -> Result<(Vec<Row>, u64), PgError> {
        let sql = sql.to_string();
        self.with(move |mut c| {
            Box::pin(async move {
                let r = match c.client() {
                    Ok(client) => {
                        let refs: Vec<&(dyn ToSql + Sync)> =
                            args.iter().map(|a| a.as_ref() as _).collect();
                        if count {
                            client
                                .execute(sql.as_str(), &refs)
                                .await
                                .map(|n| (Vec::new(), n))
                        } else {
                            client.query(sql.as_str(), &refs).await.map(|r| (r, 0))
                        }
                        .map_err(Into::into)
                    }
                    Err(e) => Err(e),
                };
                (c, r)
            })
        })
    }

    /// Runs one statement; the rows it returns.
    pub fn query(&mut self, sql: &str, args: Args) -> Result<Vec<Row>, PgError> {
        Ok(self.statement(sql, args, false)?.0)
    }

    /// Runs one statement; the first row it returns, if any.
    pub fn query_opt(&mut self, sql: &str, args: Args) -> Result<Option<Row>, PgError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// Runs one statement; how many rows it changed.
    pub fn execute(&mut self, sql: &str, args: Args) -> Result<u64, PgError> {
        Ok(self.statement(sql, args, true)?.1)
    }

    fn end(&mut self, sql: &'static str) -> Result<(), PgError> {
        self.with(move |mut c| {
            Box::pin(async move {
                let r = match c.client() {
                    Ok(client) => client.batch_execute(sql).await.map_err(Into::into),
                    Err(e) => Err(e),
                };
                (c, r)
            })
        })?;
        self.conn = None;
        Ok(())
    }

    /// Commits; the changes are durable when this returns.
    pub fn commit(mut self) -> Result<(), PgError> {
        self.end("COMMIT")
    }

    /// Rolls back (what dropping does too).
    pub fn rollback(mut self) -> Result<(), PgError> {
        self.end("ROLLBACK")
    }
}

impl Drop for SyncTx<'_> {
    fn drop(&mut self) {
        if self.conn.is_some() && self.end("ROLLBACK").is_err() {
            // A connection in an unknown state is not given to the next caller.
            if let Some(mut c) = self.conn.take() {
                *c.0 = None;
            }
        }
    }
}

/// An advisory lock id only acr-task's migrations take ("acrtask" in ASCII).
const MIGRATION_LOCK: i64 = 0x0061_6372_7461_736b;

/// Brings one component's schema up to date: `migrations` in order, those applied
/// recorded in `table` (its own per component), all under an advisory lock so servers
/// starting together migrate once. A schema newer than this acr-task knows is refused.
pub async fn migrate(
    c: &mut Client,
    table: &'static str,
    migrations: &[&str],
) -> Result<(), PgError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table}(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    ))
    .await?;
    let applied: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {table}"),
            &[],
        )
        .await?
        .get(0);
    let known = migrations.len() as i32;
    if applied > known {
        return Err(PgError(format!(
            "the database has schema version {applied} in {table}, newer than this acr-task \
             knows ({known}): use the acr-task that made it, or a newer one"
        )));
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for (i, sql) in migrations.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            &format!("INSERT INTO {table}(version, applied_at) VALUES($1, $2)"),
            &[&(i as i32 + 1), &now],
        )
        .await?;
    }
    Ok(tx.commit().await?)
}

/// For tests: a new, empty database beside the one `url` names.
#[doc(hidden)]
pub fn fresh_database(url: &str) -> Result<Target, PgError> {
    let target = Target::parse(url, &[])?;
    let name = format!("t{}", uuid::Uuid::new_v4().simple());
    let rt = crate::background::OwnRuntime::new("acr-task-pg-test", 1)
        .map_err(|e| PgError(e.to_string()))?;
    let n = name.clone();
    rt.wait(async move {
        let c = connect(&target).await?;
        Ok::<_, PgError>(c.batch_execute(&format!("CREATE DATABASE {n}")).await?)
    })
    .ok_or_else(|| PgError("stopped".into()))??;
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    Target::parse(&format!("{base}/{name}"), &[])
}

/// TLS to the database, with rustls (aws-lc-rs, the one crypto backend): used when the URL
/// asks for it (`sslmode=require`), the server's certificate checked against the system's
/// roots and `--ca-cert`, and against the host name (or IP address) the URL gives, as
/// libpq's `verify-full` does. Without `sslmode=require` the connection is plain TCP: no
/// TLS that checks nothing is ever pretended.
mod tls {
    use std::future::Future;
    use std::io;
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::config::SslMode;
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
    use tokio_postgres::Socket;
    use tokio_rustls::rustls;

    use super::PgError;

    /// Where a database is and how to reach it.
    #[derive(Clone)]
    pub struct Target {
        pub config: tokio_postgres::Config,
        tls: MakeRustls,
        /// The CA files TLS trusts besides the system's (part of which target this is).
        ca_certs: Vec<PathBuf>,
    }

    impl Target {
        /// `url` (`postgres://USER:PASSWORD@HOST:PORT/DATABASE[?sslmode=require]`), with
        /// `ca_certs` (PEM files) trusted beside the system's roots when TLS is asked for.
        pub fn parse(url: &str, ca_certs: &[PathBuf]) -> Result<Target, PgError> {
            let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
                PgError(format!(
                    "--database: {e} (write it as \
                     postgres://USER:PASSWORD@HOST:PORT/DATABASE[?sslmode=require])"
                ))
            })?;
            config.connect_timeout(std::time::Duration::from_secs(10));
            let tls = match config.get_ssl_mode() {
                SslMode::Require => Some(client_config(ca_certs)?),
                // `prefer` (the default) would take TLS without checking who answers.
                _ => {
                    config.ssl_mode(SslMode::Disable);
                    None
                }
            };
            Ok(Target {
                config,
                tls: MakeRustls(tls),
                ca_certs: ca_certs.to_vec(),
            })
        }

        /// What tells targets apart: the same one makes the same connections.
        pub fn identity(&self) -> String {
            format!(
                "{:?} tls={} ca={:?}",
                self.config,
                self.tls(),
                self.ca_certs
            )
        }

        /// Whether connections use TLS.
        pub fn tls(&self) -> bool {
            self.tls.0.is_some()
        }

        /// One connection and its driver.
        pub async fn connect(
            &self,
        ) -> Result<
            (
                tokio_postgres::Client,
                tokio_postgres::Connection<Socket, RustlsStream>,
            ),
            tokio_postgres::Error,
        > {
            self.config.connect(self.tls.clone()).await
        }
    }

    fn client_config(ca_certs: &[PathBuf]) -> Result<Arc<rustls::ClientConfig>, PgError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = Vec::new();
        for path in ca_certs {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| PgError(format!("--ca-cert {}: {e}", path.display())))?;
            roots.extend(certs);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
                .map_err(|e| PgError(format!("the trusted certificates: {e}")))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PgError(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// Makes a TLS session per connection (none configured: connections stay plain,
    /// and tokio-postgres never asks for one with `sslmode=disable`).
    #[derive(Clone)]
    pub struct MakeRustls(Option<Arc<rustls::ClientConfig>>);

    pub struct RustlsConnect {
        config: Option<Arc<rustls::ClientConfig>>,
        host: String,
    }

    impl MakeTlsConnect<Socket> for MakeRustls {
        type Stream = RustlsStream;
        type TlsConnect = RustlsConnect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, host: &str) -> io::Result<RustlsConnect> {
            Ok(RustlsConnect {
                config: self.0.clone(),
                host: host.to_string(),
            })
        }
    }

    impl TlsConnect<Socket> for RustlsConnect {
        type Stream = RustlsStream;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

        fn connect(self, stream: Socket) -> Self::Future {
            Box::pin(async move {
                let config = self
                    .config
                    .ok_or_else(|| io::Error::other("TLS was not asked for (sslmode=require)"))?;
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await?;
                Ok(RustlsStream(Box::new(tls)))
            })
        }
    }

    pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

    impl AsyncRead for RustlsStream {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut *self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for RustlsStream {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut *self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut *self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut *self.0).poll_shutdown(cx)
        }
    }

    impl TlsStream for RustlsStream {
        fn channel_binding(&self) -> ChannelBinding {
            // SCRAM-SHA-256-PLUS (`tls-server-end-point`): the password proof is bound to
            // the certificate this session was made with, so it cannot be relayed to the
            // server through another TLS session. None where RFC 5929 gives no hash.
            let cert = self
                .0
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first());
            match cert.and_then(|c| end_point_hash(c)) {
                Some(h) => ChannelBinding::tls_server_end_point(h),
                None => ChannelBinding::none(),
            }
        }
    }

    /// RFC 5929's `tls-server-end-point` value of a certificate (DER): its hash by the
    /// hash of its signature algorithm, SHA-256 for MD5 and SHA-1 (as PostgreSQL
    /// computes it), for RSA PKCS#1 and ECDSA signatures; None for others (RSA-PSS, whose
    /// hash sits in its parameters; Ed25519) or what is not DER: such a login goes
    /// unbound, and `channel_binding=require` refuses it.
    pub(super) fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
        use sha2::Digest as _;
        // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm
        // SEQUENCE { algorithm OID, parameters }, signatureValue BIT STRING }
        let (cert_body, _) = der(cert, 0x30)?;
        let (_, after_tbs) = der(cert_body, 0x30)?;
        let (alg, _) = der(after_tbs, 0x30)?;
        let (oid, _) = der(alg, 0x06)?;
        const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
        const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
        const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
        let bits = match oid {
            [p @ .., 0x04 | 0x05] if p == RSA => 256, // MD5, SHA-1: SHA-256
            [p @ .., 0x0b] if p == RSA => 256,
            [p @ .., 0x0c] if p == RSA => 384,
            [p @ .., 0x0d] if p == RSA => 512,
            _ if oid == ECDSA_SHA1 => 256,
            [p @ .., 0x02] if p == ECDSA_SHA2 => 256,
            [p @ .., 0x03] if p == ECDSA_SHA2 => 384,
            [p @ .., 0x04] if p == ECDSA_SHA2 => 512,
            _ => return None,
        };
        Some(match bits {
            256 => sha2::Sha256::digest(cert).to_vec(),
            384 => sha2::Sha384::digest(cert).to_vec(),
            _ => sha2::Sha512::digest(cert).to_vec(),
        })
    }

    /// One DER item of type `tag` at the start of `b`: (its content, what follows).
    fn der(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, b) = b.split_first()?;
        let (&first, b) = b.split_first()?;
        if t != tag {
            return None;
        }
        let (len, b) = if first < 0x80 {
            (usize::from(first), b)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n].iter().fold(0usize, |a, &x| a << 8 | usize::from(x));
            (len, &b[n..])
        };
        (b.len() >= len).then(|| b.split_at(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the connection `target` makes is encrypted, as the server sees it.
    fn encrypted(target: &Target) -> Result<bool, PgError> {
        let db = Database::new(target, "acr-task-pg-test")?;
        let rows = db.query(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            Vec::new(),
        )?;
        Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
    }

    #[test]
    fn the_stores_of_one_process_share_its_connections_to_a_database() {
        let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") else {
            return;
        };
        let t = Target::parse(&url, &[]).unwrap();
        let a = Database::new(&t, "a").unwrap();
        let b = Database::new(&Target::parse(&url, &[]).unwrap(), "b").unwrap();
        assert!(Arc::ptr_eq(&a.inner, &b.inner), "one pool for one database");
        let tls = Target::parse(&format!("{url}?sslmode=require"), &[]).unwrap();
        let c = Database::new(&tls, "c").unwrap();
        assert!(
            !Arc::ptr_eq(&a.inner, &c.inner),
            "another way there, another pool"
        );
        drop((a, b));
        let d = Database::new(&t, "d").unwrap();
        assert!(!Arc::ptr_eq(&d.inner, &c.inner));
    }

    #[test]
    fn tls_is_used_when_asked_for_and_checks_who_answers() {
        let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") else {
            return;
        };
        let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/ca.pem");
        // Plain unless asked (the server offers TLS: `prefer` would take it unchecked).
        let plain = Target::parse(&url, std::slice::from_ref(&ca)).unwrap();
        assert!(!plain.tls());
        assert!(!encrypted(&plain).unwrap());
        let tls_url = format!("{url}?sslmode=require");
        let tls = Target::parse(&tls_url, std::slice::from_ref(&ca)).unwrap();
        assert!(tls.tls());
        assert!(encrypted(&tls).unwrap(), "sslmode=require with the CA");
        // A server whose certificate nothing trusted signed is refused.
        let untrusted = Target::parse(&tls_url, &[]).unwrap();
        let err = encrypted(&untrusted).unwrap_err().to_string();
        assert!(err.contains("certificate"), "{err}");
        // So is one answering for a name its certificate does not carry.
        let other_name = tls_url.replace("127.0.0.1", "127.0.0.2");
        if let Ok(t) = Target::parse(&other_name, std::slice::from_ref(&ca)) {
            let e = encrypted(&t).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("certificate") || e.contains("connect"), "{e}");
        }
        // A CA file that is not one says which.
        let bad = Target::parse(&tls_url, &[std::path::PathBuf::from("/nonexistent/ca.pem")]);
        assert!(bad.is_err_and(|e| e.0.contains("/nonexistent/ca.pem")));
    }

    /// `scripts/with-postgres` makes `acr_scram` log in with SCRAM over TLS only: asking
    /// for channel binding (`channel_binding=require`) works, so the password proof is
    /// bound to the server's certificate (the server checks the value we compute).
    #[test]
    fn scram_over_tls_is_bound_to_the_servers_certificate() {
        let Ok(url) = std::env::var("ACR_TASK_TEST_POSTGRES") else {
            return;
        };
        let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/ca.pem");
        let setup = Database::new(&Target::parse(&url, &[]).unwrap(), "scram-setup").unwrap();
        setup
            .execute(
                "DO $$ BEGIN CREATE ROLE acr_scram LOGIN;
                 EXCEPTION WHEN duplicate_object THEN NULL; END $$",
                Vec::new(),
            )
            .unwrap();
        setup
            .execute(
                // Hashed for SCRAM (PostgreSQL's default since 14).
                "ALTER ROLE acr_scram PASSWORD 'bound-secret'",
                Vec::new(),
            )
            .unwrap();
        let (_, at) = url.split_once('@').unwrap();
        let login = |password: &str| {
            format!("postgres://acr_scram:{password}@{at}?sslmode=require&channel_binding=require")
        };
        let bound = Target::parse(&login("bound-secret"), std::slice::from_ref(&ca)).unwrap();
        assert!(encrypted(&bound).unwrap(), "SCRAM-SHA-256-PLUS over TLS");
        // It is the password that let it in.
        let wrong = Target::parse(&login("not-it"), std::slice::from_ref(&ca)).unwrap();
        let e = encrypted(&wrong).unwrap_err().to_string();
        assert!(e.contains("password") || e.contains("auth"), "{e}");
    }

    #[test]
    fn the_end_point_hash_follows_the_certificates_signature() {
        use rustls_pki_types::pem::PemObject;
        use sha2::Digest as _;
        let pem =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls/server.pem");
        let der = rustls_pki_types::CertificateDer::from_pem_file(pem).unwrap();
        // The test certificate is signed ecdsa-with-SHA256.
        assert_eq!(
            tls::end_point_hash(&der).unwrap(),
            sha2::Sha256::digest(&der).to_vec()
        );
        // What is not a whole certificate gives none, without a panic.
        for cut in [0, 1, 2, 4, 16, der.len() / 2] {
            assert_eq!(tls::end_point_hash(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(
            tls::end_point_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(tls::end_point_hash(b"not DER at all"), None);
    }
}
