//! `GET /metrics` in the Prometheus (OpenMetrics) text format: what the server counts as it
//! works (runs ending, trigger events, registry requests and bytes, latencies, webhook
//! deliveries) and what it reads when scraped (queue depth, stored runs, storage used).
//!
//! One `Metrics` per server, no global registry: the counters are cheap atomics shared by
//! handle; the gauges are set from the stores at each scrape, so they are right after a
//! restart too.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskStatus {
    pub task: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStatus {
    pub pool: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    pub pool: String,
    pub agent: String,
}

/// An agent pool as a scrape reads it.
#[derive(Debug, Default, Clone)]
pub struct PoolSnapshot {
    pub pool: String,
    pub queued: u64,
    pub running: u64,
    pub online: u64,
    /// (agent id, seconds since it was last heard from).
    pub agents: Vec<(String, f64)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    pub replica: String,
}

/// Another replica of this server's geo-replication group as a scrape reads it.
#[derive(Debug, Default, Clone)]
pub struct ReplicaSnapshot {
    pub replica: String,
    /// Its backfill is done.
    pub ready: bool,
    /// Events accepted here not yet applied there, and the oldest one's age.
    pub lag_events: u64,
    pub lag_seconds: u64,
    /// Manifests of its backfill not yet sent.
    pub backfill_remaining: u64,
    /// The last attempt to reach it failed (its reason: `replication show`).
    pub failing: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub kind: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Result_ {
    pub result: String,
}

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_buckets() -> Histogram {
    // 1 ms to about 9 minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

fn run_buckets() -> Histogram {
    // 0.1 s to about 7 hours.
    Histogram::new(exponential_buckets(0.1, 2.0, 18))
}

/// What scrape-time readers report (set just before encoding).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// (task, status, runs stored).
    pub runs: Vec<(String, String, u64)>,
    pub queued: u64,
    pub running: u64,
    pub concurrency: u64,
    /// This server leads the servers sharing its database (always, alone).
    pub leader: bool,
    pub storage_used: u64,
    pub storage_included: Option<u64>,
    pub pools: Vec<PoolSnapshot>,
    pub replicas: Vec<ReplicaSnapshot>,
}

pub struct Metrics {
    registry: Registry,
    runs: Family<TaskStatus, Gauge>,
    queue_depth: Gauge,
    running: Gauge,
    concurrency: Gauge,
    leader: Gauge,
    storage_used: Gauge,
    storage_included: Gauge,
    pool_runs: Family<PoolStatus, Gauge>,
    agents_online: Family<PoolLabel, Gauge>,
    agent_heartbeat_age: Family<AgentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    replica_ready: Family<ReplicaLabel, Gauge>,
    replica_lag_events: Family<ReplicaLabel, Gauge>,
    replica_lag_seconds: Family<ReplicaLabel, Gauge>,
    replica_backfill: Family<ReplicaLabel, Gauge>,
    replica_failing: Family<ReplicaLabel, Gauge>,
    run_duration: Hist<TaskStatus>,
    step_duration: Hist<StepLabels>,
    triggers: Family<Kind, Counter>,
    requests: Family<RequestLabels, Counter>,
    received: Counter,
    sent: Counter,
    upload_duration: Histogram,
    pull_duration: Histogram,
    webhooks: Family<Result_, Counter>,
    /// One scrape at a time (the gauges are set, then encoded).
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("acr_task");
        let runs = Family::<TaskStatus, Gauge>::default();
        registry.register("runs", "Runs stored, by task and status", runs.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Runs waiting in the queue",
            queue_depth.clone(),
        );
        let running = Gauge::default();
        registry.register("runs_running", "Runs running now", running.clone());
        let concurrency = Gauge::default();
        registry.register(
            "run_concurrency",
            "Most runs this server runs at once",
            concurrency.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this server leads the servers sharing its database (runs timers, pollers and lease expiry): 1 or 0",
            leader.clone(),
        );
        let storage_used = Gauge::default();
        registry.register(
            "storage_used_bytes",
            "Registry storage used (each blob counted once)",
            storage_used.clone(),
        );
        let storage_included = Gauge::default();
        registry.register(
            "storage_included_bytes",
            "Registry storage the tier includes (absent: no limit)",
            storage_included.clone(),
        );
        let pool_runs = Family::<PoolStatus, Gauge>::default();
        registry.register(
            "agent_pool_runs",
            "Runs of an agent pool, queued and running",
            pool_runs.clone(),
        );
        let agents_online = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "agents_online",
            "Agents of a pool heard from within three lease periods",
            agents_online.clone(),
        );
        let agent_heartbeat_age =
            Family::<AgentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "agent_heartbeat_age_seconds",
            "Seconds since each registered agent was last heard from",
            agent_heartbeat_age.clone(),
        );
        let mut replica = |name: &str, help: &str| {
            let f = Family::<ReplicaLabel, Gauge>::default();
            registry.register(name, help, f.clone());
            f
        };
        let replica_ready = replica(
            "replication_ready",
            "Whether each other replica's backfill is done: 1 or 0",
        );
        let replica_lag_events = replica(
            "replication_lag_events",
            "Events accepted here that each other replica has not applied yet",
        );
        let replica_lag_seconds = replica(
            "replication_lag_seconds",
            "Age of the oldest event accepted here that each other replica has not applied",
        );
        let replica_backfill = replica(
            "replication_backfill_remaining_manifests",
            "Manifests of each other replica's backfill not sent yet",
        );
        let replica_failing = replica(
            "replication_failing",
            "Whether the last attempt to reach each other replica failed: 1 or 0",
        );
        let run_duration: Hist<TaskStatus> = Family::new_with_constructor(run_buckets);
        registry.register(
            "run_duration_seconds",
            "How long runs took, by task and status",
            run_duration.clone(),
        );
        let step_duration: Hist<StepLabels> = Family::new_with_constructor(run_buckets);
        registry.register(
            "step_duration_seconds",
            "How long steps took, by kind and status",
            step_duration.clone(),
        );
        let triggers = Family::<Kind, Counter>::default();
        registry.register(
            "trigger_events",
            "Runs queued, by what queued them",
            triggers.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "registry_requests",
            "Registry requests, by route, method and status",
            requests.clone(),
        );
        let received = Counter::default();
        registry.register(
            "registry_received_bytes",
            "Bytes clients sent to the registry",
            received.clone(),
        );
        let sent = Counter::default();
        registry.register(
            "registry_sent_bytes",
            "Bytes the registry sent to clients",
            sent.clone(),
        );
        let upload_duration = seconds_buckets();
        registry.register(
            "registry_upload_duration_seconds",
            "Blob upload requests (PATCH, PUT, monolithic POST), body read included",
            upload_duration.clone(),
        );
        let pull_duration = seconds_buckets();
        registry.register(
            "registry_pull_duration_seconds",
            "Blob and manifest pulls, until the last byte was sent",
            pull_duration.clone(),
        );
        let webhooks = Family::<Result_, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts, by result (delivered, failed)",
            webhooks.clone(),
        );
        Metrics {
            registry,
            runs,
            queue_depth,
            running,
            concurrency,
            leader,
            storage_used,
            storage_included,
            pool_runs,
            agents_online,
            agent_heartbeat_age,
            replica_ready,
            replica_lag_events,
            replica_lag_seconds,
            replica_backfill,
            replica_failing,
            run_duration,
            step_duration,
            triggers,
            requests,
            received,
            sent,
            upload_duration,
            pull_duration,
            webhooks,
            scrape: Mutex::new(()),
        }
    }

    /// A run was queued by a trigger of this kind (`manual`, `commit`, `timer`...).
    pub fn trigger(&self, kind: &str) {
        self.triggers
            .get_or_create(&Kind { kind: kind.into() })
            .inc();
    }

    /// A run ended: its task, status and report.
    pub fn run_finished(&self, task: &str, status: &str, report: Option<&crate::exec::RunReport>) {
        let labels = TaskStatus {
            task: task.into(),
            status: status.into(),
        };
        if let Some(r) = report {
            self.run_duration
                .get_or_create(&labels)
                .observe(r.duration_ms as f64 / 1000.0);
            for s in &r.steps {
                if s.attempts == 0 {
                    continue;
                }
                self.step_duration
                    .get_or_create(&StepLabels {
                        kind: s.kind.clone(),
                        status: s.status.as_str().into(),
                    })
                    .observe(s.duration_ms as f64 / 1000.0);
            }
        }
    }

    /// A registry request was answered (the response head).
    pub fn request(&self, route: &str, method: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                method: method.into(),
                status,
            })
            .inc();
    }

    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }

    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }

    pub fn upload_took(&self, d: Duration) {
        self.upload_duration.observe(d.as_secs_f64());
    }

    pub fn pull_took(&self, d: Duration) {
        self.pull_duration.observe(d.as_secs_f64());
    }

    /// A webhook delivery attempt ended.
    pub fn webhook(&self, delivered: bool) {
        let result = if delivered { "delivered" } else { "failed" };
        self.webhooks
            .get_or_create(&Result_ {
                result: result.into(),
            })
            .inc();
    }

    /// The text a scrape gets, with the gauges set from `snap`.
    pub fn encode(&self, snap: &Snapshot) -> String {
        let _one = self.scrape.lock();
        self.runs.clear();
        for (task, status, n) in &snap.runs {
            self.runs
                .get_or_create(&TaskStatus {
                    task: task.clone(),
                    status: status.clone(),
                })
                .set(*n as i64);
        }
        self.queue_depth.set(snap.queued as i64);
        self.running.set(snap.running as i64);
        self.concurrency.set(snap.concurrency as i64);
        self.leader.set(i64::from(snap.leader));
        self.storage_used.set(snap.storage_used as i64);
        self.storage_included
            .set(snap.storage_included.map_or(-1, |v| v as i64));
        self.pool_runs.clear();
        self.agents_online.clear();
        self.agent_heartbeat_age.clear();
        for p in &snap.pools {
            for (status, n) in [("Queued", p.queued), ("Running", p.running)] {
                self.pool_runs
                    .get_or_create(&PoolStatus {
                        pool: p.pool.clone(),
                        status: status.into(),
                    })
                    .set(n as i64);
            }
            self.agents_online
                .get_or_create(&PoolLabel {
                    pool: p.pool.clone(),
                })
                .set(p.online as i64);
            for (agent, age) in &p.agents {
                self.agent_heartbeat_age
                    .get_or_create(&AgentLabels {
                        pool: p.pool.clone(),
                        agent: agent.clone(),
                    })
                    .set(*age);
            }
        }
        let replicas = [
            &self.replica_ready,
            &self.replica_lag_events,
            &self.replica_lag_seconds,
            &self.replica_backfill,
            &self.replica_failing,
        ];
        for f in replicas {
            f.clear();
        }
        for r in &snap.replicas {
            let l = ReplicaLabel {
                replica: r.replica.clone(),
            };
            let values = [
                i64::from(r.ready),
                r.lag_events as i64,
                r.lag_seconds as i64,
                r.backfill_remaining as i64,
                i64::from(r.failing),
            ];
            for (f, v) in replicas.iter().zip(values) {
                f.get_or_create(&l).set(v);
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// A response or request body that counts its bytes as they pass (and times a pull to
/// its last byte), keeping the inner body's size hint so `Content-Length` stays.
pub struct Counted<B> {
    inner: B,
    on_bytes: Box<dyn Fn(u64) + Send + Sync>,
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<B> Counted<B> {
    pub fn new(
        inner: B,
        on_bytes: impl Fn(u64) + Send + Sync + 'static,
        on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Counted<B> {
        Counted {
            inner,
            on_bytes: Box::new(on_bytes),
            on_end,
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f();
        }
    }
}

impl<B> axum::body::HttpBody for Counted<B>
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, B::Error>>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &p {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    (self.on_bytes)(d.len() as u64);
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(f) = self.on_end.take() {
                    f();
                }
            }
            _ => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: counts registry requests by route, method and status, the bytes in and
/// out, and times uploads (to the response) and pulls (to the last byte sent).
pub async fn track(
    axum::extract::State(m): axum::extract::State<std::sync::Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = req.uri().path();
    if !(path.starts_with("/v2") || path.starts_with("/acr/v1/")) {
        return next.run(req).await;
    }
    let route = crate::registry::route_label(path);
    let method = req.method().clone();
    let started = Instant::now();
    let req = {
        let m = m.clone();
        req.map(|b| axum::body::Body::new(Counted::new(b, move |n| m.received(n), None)))
    };
    let resp = next.run(req).await;
    m.request(route, method.as_str(), resp.status().as_u16());
    let upload = matches!(route, "upload" | "upload_start")
        && (method == axum::http::Method::PUT
            || method == axum::http::Method::PATCH
            || method == axum::http::Method::POST);
    if upload {
        m.upload_took(started.elapsed());
    }
    let pull = matches!(route, "blob" | "manifest")
        && method == axum::http::Method::GET
        && resp.status().is_success();
    let on_end: Option<Box<dyn FnOnce() + Send + Sync>> = if pull {
        let m = m.clone();
        Some(Box::new(move || m.pull_took(started.elapsed())))
    } else {
        None
    };
    let m2 = m.clone();
    resp.map(|b| axum::body::Body::new(Counted::new(b, move |n| m2.sent(n), on_end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_without_names() {
        use crate::registry::route_label;
        assert_eq!(route_label("/v2/"), "base");
        assert_eq!(route_label("/v2/a/b/blobs/sha256:00"), "blob");
        assert_eq!(route_label("/v2/a/manifests/latest"), "manifest");
        assert_eq!(route_label("/v2/a/blobs/uploads/"), "upload_start");
        assert_eq!(route_label("/v2/_catalog"), "catalog");
        assert_eq!(route_label("/acr/v1/a/_tags"), "acr_tags");
        assert_eq!(route_label("/v2/!!"), "unknown");
    }

    #[test]
    fn the_text_holds_counters_histograms_and_scrape_gauges() {
        let m = Metrics::new();
        m.request("blob", "GET", 200);
        m.request("blob", "GET", 200);
        m.sent(10);
        m.pull_took(Duration::from_millis(3));
        m.webhook(false);
        m.trigger("manual");
        let text = m.encode(&Snapshot {
            runs: vec![("build".into(), "Succeeded".into(), 7)],
            queued: 3,
            storage_used: 42,
            pools: vec![PoolSnapshot {
                pool: "builders".into(),
                queued: 4,
                running: 2,
                online: 1,
                agents: vec![("a1-x".into(), 1.5)],
            }],
            replicas: vec![ReplicaSnapshot {
                replica: "west".into(),
                ready: true,
                lag_events: 5,
                lag_seconds: 12,
                backfill_remaining: 0,
                failing: true,
            }],
            ..Default::default()
        });
        assert!(text.contains("acr_task_replication_ready{replica=\"west\"} 1"));
        assert!(text.contains("acr_task_replication_lag_events{replica=\"west\"} 5"));
        assert!(text.contains("acr_task_replication_lag_seconds{replica=\"west\"} 12"));
        assert!(
            text.contains("acr_task_replication_backfill_remaining_manifests{replica=\"west\"} 0")
        );
        assert!(text.contains("acr_task_replication_failing{replica=\"west\"} 1"));
        assert!(text.contains("acr_task_agents_online{pool=\"builders\"} 1"));
        assert!(text.contains("acr_task_agent_pool_runs{pool=\"builders\",status=\"Queued\"} 4"));
        assert!(text.contains(
            "acr_task_agent_heartbeat_age_seconds{pool=\"builders\",agent=\"a1-x\"} 1.5"
        ));
        assert!(text.contains(
            "acr_task_registry_requests_total{route=\"blob\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains("acr_task_registry_sent_bytes_total 10"));
        assert!(text.contains("acr_task_runs{task=\"build\",status=\"Succeeded\"} 7"));
        assert!(text.contains("acr_task_queue_depth 3"));
        assert!(text.contains("acr_task_storage_used_bytes 42"));
        assert!(text.contains("acr_task_webhook_deliveries_total{result=\"failed\"} 1"));
        assert!(text.contains("acr_task_trigger_events_total{kind=\"manual\"} 1"));
        assert!(text.contains("acr_task_registry_pull_duration_seconds_count 1"));
        // A second scrape replaces the stored-runs gauges rather than adding to them.
        let text = m.encode(&Snapshot::default());
        assert!(!text.contains("task=\"build\""));
        assert!(!text.contains("replica=\"west\""));
    }
}
