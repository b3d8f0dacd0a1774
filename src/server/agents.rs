//! Agent pools and the agents that run their queued runs (`acr-task agent`), over the
//! task API: registration, long-polled claims that lease a run, heartbeats that renew
//! leases (and carry cancels), the run's log and step changes, its registry login and
//! content-trust answers, and its end. A run whose lease runs out (its agent stopped
//! heartbeating) goes back to the queue as its next attempt; a report under a lease that
//! is no longer the run's changes nothing, so a run never counts twice.
//!
//! Agents never reach the database: every call here goes through the API's guard
//! (`tasks/write` to act as an agent: it is handed tasks' secrets, as the server's own
//! executor is).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::db::{AgentPool, AgentRecord, Expired, LeaseState};
use super::model::{RunRecord, TaskSpec};
use super::queue::Queue;
use super::runner::{log_line, Outcome, Provisions};

/// How long a claim waits for a run before answering "none" (the agent asks again).
const CLAIM_WAIT: Duration = Duration::from_secs(20);
/// An agent counts as online while it was heard from within this many lease periods.
const ONLINE_LEASES: u32 = 3;
/// Longest name or label an agent may register with, and most labels.
const MAX_NAME: usize = 128;
const MAX_LABELS: usize = 32;
/// Largest request an agent sends (a run's report with its steps, a batch of log lines).
const MAX_BODY: usize = 32 * 1024 * 1024;

/// What the server keeps about agents and their leased runs.
pub struct AgentHub {
    pub queue: Arc<Queue>,
    /// How long a lease lasts without a heartbeat.
    pub lease: Duration,
    /// Attempts a run gets before a lost lease fails it.
    pub max_attempts: u32,
    /// What stored tasks may name (secrets are resolved under it before a run is handed
    /// out).
    pub policy: Arc<crate::policy::Policy>,
    /// The registry's gate, for the runs' own logins (none: an open registry).
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Content-trust answers for agents' runs.
    pub trust: Arc<dyn crate::setup::TrustCheck>,
}

/// A run handed to an agent: everything it needs to run it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub run: RunRecord,
    pub lease: String,
    /// The definition, its commit-trigger secret redacted.
    pub spec: TaskSpec,
    pub provisions: Provisions,
    /// Heartbeat at least this often (seconds); the lease lasts three times as long.
    pub heartbeat_secs: u64,
}

/// What an agent says about a run it holds, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum RunEvent {
    Line {
        who: String,
        text: String,
    },
    Steps {
        steps: Vec<(String, String, Vec<String>)>,
    },
    StepStarted {
        step: usize,
        attempt: u32,
    },
    StepFinished {
        step: usize,
        report: crate::exec::StepReport,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub pool: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub concurrency: u32,
    #[serde(default)]
    pub version: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    pub run: String,
    pub lease: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub runs: Vec<Held>,
}

/// A held run's state in a heartbeat's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    pub run: String,
    /// Still this agent's.
    pub held: bool,
    /// Someone asked to cancel it.
    pub cancel: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Events {
    pub lease: String,
    pub events: Vec<RunEvent>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finish {
    pub lease: String,
    pub outcome: Outcome,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginAsk {
    pub lease: String,
    /// (repository pattern, permissions) as [`super::runner::run_grants`] computes them.
    pub rules: Vec<(String, Vec<crate::auth::Permission>)>,
    pub ttl_secs: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustAsk {
    pub repository: String,
    pub reference: String,
}

/// A pool as `agent-pool show|list` prints it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    #[serde(flatten)]
    pub pool: AgentPool,
    pub queued: u64,
    pub running: u64,
    pub agents_online: usize,
    pub agents: Vec<AgentView>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    #[serde(flatten)]
    pub agent: AgentRecord,
    pub online: bool,
}

type St = State<Arc<AgentHub>>;

fn err(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": msg.to_string() }))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "agents api");
    err(StatusCode::INTERNAL_SERVER_ERROR, e)
}

/// Runs a store call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, super::db::DbError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e)),
    }
}

/// Agents not heard from for this long are forgotten (their registration removed).
const AGENT_FORGET: Duration = Duration::from_secs(3600);
/// How often the leader looks for them.
const AGENT_SWEEP: Duration = Duration::from_secs(60);

/// The agents of `agents` last seen longer than `after` before `now` (or never readably).
pub fn long_gone(
    agents: &[AgentRecord],
    now: chrono::DateTime<chrono::Utc>,
    after: Duration,
) -> Vec<String> {
    let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
    agents
        .iter()
        .filter(|a| {
            chrono::DateTime::parse_from_rfc3339(&a.last_seen)
                .map(|t| now.signed_duration_since(t) > after)
                .unwrap_or(true)
        })
        .map(|a| a.id.clone())
        .collect()
}

/// A pool's name as `az acr agentpool` takes it: 3 to 20 letters, digits and '-'.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    let ok = (3..=20).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent pool name {name:?}: use 3 to 20 letters, digits or '-', not starting with '-'"
        ))
    }
}

impl AgentHub {
    pub fn new(
        queue: Arc<Queue>,
        lease: Duration,
        policy: Arc<crate::policy::Policy>,
        auth: Option<Arc<crate::auth::Auth>>,
        trust: Arc<dyn crate::setup::TrustCheck>,
    ) -> AgentHub {
        AgentHub {
            queue,
            lease,
            max_attempts: 3,
            policy,
            auth,
            trust,
        }
    }

    /// Agents heard from within this count as online.
    pub fn online_within(&self) -> Duration {
        self.lease * ONLINE_LEASES
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// The routes, for behind the API's guard.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/api/agentpools", get(list_pools).post(create_pool))
            .route(
                "/api/agentpools/{name}",
                get(show_pool).patch(update_pool).delete(delete_pool),
            )
            .route("/api/agents", post(register))
            .route("/api/agents/{id}", axum::routing::delete(deregister))
            .route("/api/agents/{id}/claim", post(claim))
            .route("/api/agents/{id}/heartbeat", post(heartbeat))
            .route("/api/agents/{id}/trust", post(trust))
            .route("/api/agents/{id}/runs/{run}/events", post(events))
            .route("/api/agents/{id}/runs/{run}/login", post(login))
            .route("/api/agents/{id}/runs/{run}/finish", post(finish))
            .route("/api/agents/{id}/runs/{run}/release", post(release))
            // A run's report and log batches may be larger than axum's 2 MB default.
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(self)
    }

    /// Hands back the runs whose leases ran out, every second until `stop`, while this
    /// server leads (one server looks for everyone). Leases are first extended by one
    /// period: agents that ran on while this server was away get the time to reach it.
    pub async fn expiry_loop(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
        leading: super::leader::Leadership,
    ) {
        let (db, ms) = (self.queue.db().clone(), self.lease_ms());
        if blocking(move || db.extend_leases(ms)).await.is_err() {
            tracing::error!("extending agents' leases at start");
        }
        let every = (self.lease / 4).clamp(Duration::from_millis(200), Duration::from_secs(2));
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if !*leading.borrow() {
                continue;
            }
            if last_sweep.elapsed() >= AGENT_SWEEP {
                last_sweep = tokio::time::Instant::now();
                self.forget_gone_agents().await;
            }
            let (db, max) = (self.queue.db().clone(), self.max_attempts);
            match blocking(move || db.expire_leases(max)).await {
                Ok(expired) => {
                    for e in expired {
                        self.handed_back(&e, super::db::lapsed(e.agent.as_deref()))
                            .await;
                    }
                }
                Err(_) => tracing::error!("checking agents' leases"),
            }
        }
    }

    /// Removes the registrations of agents not heard from for [`AGENT_FORGET`] (killed,
    /// or their machine gone): until then the pool lists them as offline.
    async fn forget_gone_agents(&self) {
        let db = self.queue.db().clone();
        let gone = blocking(move || {
            let agents = db.agents(None)?;
            let gone = long_gone(&agents, chrono::Utc::now(), AGENT_FORGET);
            for id in &gone {
                db.remove_agent(id)?;
            }
            Ok(gone)
        })
        .await;
        match gone {
            Ok(gone) => {
                for id in gone {
                    tracing::info!(agent = %id, "forgot an agent not heard from for an hour");
                }
            }
            Err(_) => tracing::error!("forgetting agents that are gone"),
        }
    }

    /// A run left its agent: said in its log, its login ended, the queue told.
    async fn handed_back(&self, e: &Expired, why: &str) {
        let holder = match e.agent.as_deref() {
            Some(a) => format!("agent {a}"),
            None => "a server replica".to_string(),
        };
        let msg = if e.requeued {
            format!(
                "attempt {} on {holder} ended: {why}; queued again as attempt {}",
                e.attempt,
                e.attempt + 1
            )
        } else {
            format!(
                "attempt {} on {holder} ended: {why}; no attempts left, the run failed",
                e.attempt
            )
        };
        tracing::warn!(run = %e.run, requeued = e.requeued, "{msg}");
        if let Err(r) = self.append(&e.run, log_line("acr-task", &msg)).await {
            tracing::warn!(status = %r.status(), "writing a run log");
        }
        if let Some(a) = &self.auth {
            a.end_run(&e.run);
        }
        if e.requeued {
            self.queue.live_runs().end(&e.run);
            self.queue.changed();
        } else {
            self.queue.ended(&e.run);
        }
    }

    /// Appends lines to a run's log, stored before this returns (an agent's batch is
    /// acknowledged only once it is), and wakes the run's followers.
    async fn append(&self, run: &str, text: String) -> Result<(), Response> {
        if text.is_empty() {
            return Ok(());
        }
        let (db, id) = (self.queue.db().clone(), run.to_string());
        blocking(move || db.append_log(&id, text.as_bytes())).await?;
        if let Some(l) = self.queue.live(run) {
            l.touch();
        }
        Ok(())
    }

    /// The run's live state (steps, change counter), started if this server has none yet
    /// (the agent's earlier batches went to another replica, or to this one before a
    /// restart).
    fn live(&self, run: &str) -> Arc<super::live::LiveRun> {
        self.queue
            .live(run)
            .unwrap_or_else(|| self.queue.live_runs().start(run))
    }

    /// The run's definition and what it needs resolved; a run that cannot get them ends
    /// here, failed, saying why.
    async fn assign(
        self: &Arc<Self>,
        run: RunRecord,
        lease: String,
        agent: &AgentRecord,
    ) -> Result<Option<Assignment>, Response> {
        let (db, id, task) = (self.queue.db().clone(), run.id.clone(), run.task.clone());
        let spec = blocking(move || match db.quick_spec(&id)? {
            Some(q) => Ok(Some(q)),
            None => db.task(&task),
        })
        .await?;
        self.live(&run.id);
        self.append(
            &run.id,
            log_line(
                "acr-task",
                &format!(
                    "attempt {} on agent {} ({}, pool {})",
                    run.attempt, agent.id, agent.name, agent.pool
                ),
            ),
        )
        .await?;
        let fail = |why: String| Outcome::failed(why);
        let outcome = match spec {
            None => fail(format!("task {} no longer exists", run.task)),
            Some(spec) => match Provisions::resolve(&spec, &self.policy) {
                Ok(provisions) => {
                    self.queue.changed();
                    return Ok(Some(Assignment {
                        run,
                        lease,
                        spec: super::api::redacted(spec),
                        provisions,
                        heartbeat_secs: (self.lease.as_secs() / 3).max(1),
                    }));
                }
                Err(e) => fail(e),
            },
        };
        if let Some(e) = &outcome.error {
            self.append(&run.id, log_line("acr-task", e)).await?;
        }
        let (q, l) = (self.queue.clone(), lease.clone());
        blocking(move || q.complete(&run, &outcome, Some(&l))).await?;
        Ok(None)
    }
}

async fn list_pools(State(h): St) -> Response {
    let db = h.queue.db().clone();
    let online_within = h.online_within();
    match blocking(move || {
        let mut out = Vec::new();
        for p in db.pools()? {
            out.push(pool_view(db.as_ref(), p, online_within)?);
        }
        Ok(out)
    })
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

pub fn pool_view(
    db: &dyn super::db::ServerStore,
    pool: AgentPool,
    online_within: Duration,
) -> Result<PoolView, super::db::DbError> {
    let (queued, running) = db.pool_counts(&pool.name)?;
    let now = chrono::Utc::now();
    let agents: Vec<AgentView> = db
        .agents(Some(&pool.name))?
        .into_iter()
        .map(|a| {
            let online = chrono::DateTime::parse_from_rfc3339(&a.last_seen)
                .map(|t| {
                    now.signed_duration_since(t)
                        .to_std()
                        .map(|d| d <= online_within)
                        .unwrap_or(true)
                })
                .unwrap_or(false);
            AgentView { agent: a, online }
        })
        .collect();
    Ok(PoolView {
        pool,
        queued,
        running,
        agents_online: agents.iter().filter(|a| a.online).count(),
        agents,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PoolBody {
    name: Option<String>,
    /// 0 or absent: no limit.
    max_runs: Option<u32>,
}

async fn create_pool(State(h): St, Json(b): Json<PoolBody>) -> Response {
    let Some(name) = b.name else {
        return err(StatusCode::BAD_REQUEST, "give the pool's name");
    };
    if let Err(e) = check_pool_name(&name) {
        return err(StatusCode::BAD_REQUEST, e);
    }
    let pool = AgentPool {
        name: name.clone(),
        max_runs: b.max_runs.filter(|n| *n > 0),
        created_at: super::db::now(),
    };
    let db = h.queue.db().clone();
    let online_within = h.online_within();
    match blocking(move || {
        if !db.put_pool(&pool, true)? {
            return Ok(None);
        }
        pool_view(db.as_ref(), pool, online_within).map(Some)
    })
    .await
    {
        Ok(Some(v)) => (StatusCode::CREATED, Json(v)).into_response(),
        Ok(None) => err(
            StatusCode::CONFLICT,
            format!("agent pool {name} already exists (agent-pool update changes it)"),
        ),
        Err(r) => r,
    }
}

async fn show_pool(State(h): St, Path(name): Path<String>) -> Response {
    let db = h.queue.db().clone();
    let online_within = h.online_within();
    let n = name.clone();
    match blocking(move || match db.pool(&n)? {
        Some(p) => pool_view(db.as_ref(), p, online_within).map(Some),
        None => Ok(None),
    })
    .await
    {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => no_pool(&name),
        Err(r) => r,
    }
}

fn no_pool(name: &str) -> Response {
    err(
        StatusCode::NOT_FOUND,
        format!("agent pool {name} does not exist (agent-pool create {name} makes it)"),
    )
}

async fn update_pool(State(h): St, Path(name): Path<String>, Json(b): Json<PoolBody>) -> Response {
    if b.name.as_ref().is_some_and(|n| *n != name) {
        return err(StatusCode::BAD_REQUEST, "a pool cannot be renamed");
    }
    let db = h.queue.db().clone();
    let online_within = h.online_within();
    let n = name.clone();
    let r = blocking(move || {
        let Some(mut p) = db.pool(&n)? else {
            return Ok(None);
        };
        if let Some(m) = b.max_runs {
            p.max_runs = (m > 0).then_some(m);
        }
        db.put_pool(&p, false)?;
        pool_view(db.as_ref(), p, online_within).map(Some)
    })
    .await;
    // A higher limit may let waiting agents claim.
    h.queue.changed();
    match r {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => no_pool(&name),
        Err(r) => r,
    }
}

async fn delete_pool(State(h): St, Path(name): Path<String>) -> Response {
    let db = h.queue.db().clone();
    let n = name.clone();
    let r = blocking(move || {
        let users: Vec<String> = db
            .tasks()?
            .into_iter()
            .filter(|t| t.agent_pool.as_deref() == Some(n.as_str()))
            .map(|t| t.name)
            .collect();
        if !users.is_empty() {
            return Ok(Err(users));
        }
        let (queued, running) = db.pool_counts(&n)?;
        if queued + running > 0 {
            return Ok(Err(vec![format!(
                "{queued} queued and {running} running runs"
            )]));
        }
        Ok(Ok(db.delete_pool(&n)?))
    })
    .await;
    match r {
        Ok(Ok(true)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(false)) => no_pool(&name),
        Ok(Err(users)) => err(
            StatusCode::CONFLICT,
            format!(
                "agent pool {name} is in use ({}): move those tasks to another pool \
                 (task update --agent-pool) and let its runs end first",
                users.join(", ")
            ),
        ),
        Err(r) => r,
    }
}

async fn register(State(h): St, Json(r): Json<Registration>) -> Response {
    if r.name.is_empty() || r.name.len() > MAX_NAME || r.name.chars().any(char::is_control) {
        return err(
            StatusCode::BAD_REQUEST,
            "an agent's name: 1 to 128 printable characters",
        );
    }
    let bad_label = r.labels.len() > MAX_LABELS
        || r.labels.iter().any(|(k, v)| {
            k.is_empty()
                || k.len() > MAX_NAME
                || v.len() > MAX_NAME
                || k.chars().chain(v.chars()).any(char::is_control)
        });
    if bad_label {
        return err(
            StatusCode::BAD_REQUEST,
            format!("labels: at most {MAX_LABELS}, each key=value of up to {MAX_NAME} characters"),
        );
    }
    if r.concurrency == 0 || r.concurrency > 256 {
        return err(StatusCode::BAD_REQUEST, "concurrency: 1 to 256");
    }
    let db = h.queue.db().clone();
    let pool = r.pool.clone();
    let agent = AgentRecord {
        id: format!(
            "{}-{}",
            r.name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40)
                .collect::<String>(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        pool: r.pool,
        name: r.name,
        labels: r.labels,
        concurrency: r.concurrency,
        version: r.version.chars().take(MAX_NAME).collect(),
        registered_at: super::db::now(),
        last_seen: String::new(),
        draining: false,
    };
    match blocking(move || {
        if db.pool(&agent.pool)?.is_none() {
            return Ok(None);
        }
        db.put_agent(&agent)?;
        db.agent(&agent.id)
    })
    .await
    {
        Ok(Some(a)) => {
            tracing::info!(agent = %a.id, pool = %a.pool, "agent registered");
            (StatusCode::CREATED, Json(a)).into_response()
        }
        Ok(None) => no_pool(&pool),
        Err(r) => r,
    }
}

async fn deregister(State(h): St, Path(id): Path<String>) -> Response {
    let db = h.queue.db().clone();
    let i = id.clone();
    match blocking(move || db.remove_agent(&i)).await {
        Ok(()) => {
            tracing::info!(agent = %id, "agent left");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r,
    }
}

/// The agent's registration, or 404 (it re-registers).
async fn known_agent(h: &AgentHub, id: &str) -> Result<AgentRecord, Response> {
    let (db, i) = (h.queue.db().clone(), id.to_string());
    match blocking(move || db.agent(&i)).await? {
        Some(a) => Ok(a),
        None => Err(err(
            StatusCode::NOT_FOUND,
            format!("agent {id} is not registered (register again)"),
        )),
    }
}

#[derive(Deserialize)]
struct ClaimQuery {
    /// Seconds to wait for a run (at most 20).
    wait: Option<u64>,
}

/// Leases the pool's oldest queued run to the agent, waiting up to `wait` seconds for one;
/// 204 when none came.
async fn claim(State(h): St, Path(id): Path<String>, Query(q): Query<ClaimQuery>) -> Response {
    let agent = match known_agent(&h, &id).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let wait = q
        .wait
        .map(Duration::from_secs)
        .unwrap_or(CLAIM_WAIT)
        .min(CLAIM_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = h.queue.watch_changes();
    loop {
        changes.borrow_and_update();
        let (db, pool, aid, lease_ms) = (
            h.queue.db().clone(),
            agent.pool.clone(),
            agent.id.clone(),
            h.lease_ms(),
        );
        // (Its signs of life are its heartbeats, which it sends busy or idle.)
        let claimed = match blocking(move || db.claim_leased(&pool, &aid, lease_ms)).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        if let Some(c) = claimed {
            tracing::info!(run = %c.run.id, agent = %agent.id, attempt = c.run.attempt, "leased");
            match h.assign(c.run, c.lease, &agent).await {
                Ok(Some(a)) => return Json(a).into_response(),
                Ok(None) => continue,
                Err(r) => return r,
            }
        }
        // Woken by any change of the queue (a run queued, a limit raised, a lease
        // expired), or at the latest each second (another replica's change).
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        let nap = (deadline - now).min(Duration::from_secs(1));
        let _ = tokio::time::timeout(nap, changes.changed()).await;
    }
}

async fn heartbeat(State(h): St, Path(id): Path<String>, Json(b): Json<Heartbeat>) -> Response {
    if b.runs.len() > 1024 {
        return err(StatusCode::BAD_REQUEST, "too many runs in one heartbeat");
    }
    let (db, lease_ms) = (h.queue.db().clone(), h.lease_ms());
    let r = blocking(move || {
        if !db.agent_seen(&id, b.draining)? {
            return Ok(None);
        }
        let mut out = Vec::new();
        for held in b.runs {
            let state = db.renew_lease(&held.run, &held.lease, lease_ms)?;
            out.push(RunState {
                run: held.run,
                held: state != LeaseState::Lost,
                cancel: matches!(state, LeaseState::Held { cancel: true }),
            });
        }
        Ok(Some(out))
    })
    .await;
    match r {
        Ok(Some(states)) => Json(json!({ "runs": states })).into_response(),
        Ok(None) => err(
            StatusCode::NOT_FOUND,
            "agent is not registered (register again)",
        ),
        Err(r) => r,
    }
}

/// Renews the lease as a side effect: a run that streams output is alive.
async fn held(h: &AgentHub, run: &str, lease: &str) -> Result<bool, Response> {
    let (db, r, l, ms) = (
        h.queue.db().clone(),
        run.to_string(),
        lease.to_string(),
        h.lease_ms(),
    );
    match blocking(move || db.renew_lease(&r, &l, ms)).await? {
        LeaseState::Lost => Err(lost(run)),
        LeaseState::Held { cancel } => Ok(cancel),
    }
}

fn lost(run: &str) -> Response {
    err(
        StatusCode::CONFLICT,
        format!("run {run} is no longer leased to this agent (its lease ran out or it ended)"),
    )
}

async fn events(
    State(h): St,
    Path((_, run)): Path<(String, String)>,
    Json(b): Json<Events>,
) -> Response {
    let cancel = match held(&h, &run, &b.lease).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let live = h.live(&run);
    // The batch's lines in one append, stored before the batch is acknowledged.
    let mut text = String::new();
    for ev in &b.events {
        if let RunEvent::Line { who, text: line } = ev {
            text.push_str(&log_line(who, line));
        }
    }
    if let Err(r) = h.append(&run, text).await {
        return r;
    }
    for ev in b.events {
        match ev {
            RunEvent::Line { .. } => {}
            RunEvent::Steps { steps } => live.set_steps(steps),
            RunEvent::StepStarted { step, attempt } => live.step_started(step, attempt),
            RunEvent::StepFinished { step, report } => live.step_finished(step, &report),
        }
    }
    Json(json!({ "cancel": cancel })).into_response()
}

async fn login(
    State(h): St,
    Path((_, run)): Path<(String, String)>,
    Json(b): Json<LoginAsk>,
) -> Response {
    if let Err(r) = held(&h, &run, &b.lease).await {
        return r;
    }
    let Some(auth) = &h.auth else {
        return Json(json!({})).into_response();
    };
    // Never longer than the run may last.
    let (db, r) = (h.queue.db().clone(), run.clone());
    let timeout = match blocking(move || {
        let spec = match db.quick_spec(&r)? {
            Some(q) => Some(q),
            None => match db.run(&r)? {
                Some(rec) => db.task(&rec.task)?,
                None => None,
            },
        };
        Ok(spec.map(|s| s.timeout_secs()))
    })
    .await
    {
        Ok(Some(t)) => t,
        Ok(None) => return err(StatusCode::NOT_FOUND, format!("no task for run {run}")),
        Err(r) => return r,
    };
    use crate::auth::Permission;
    // Registry rights only, whatever was asked: a run's login never manages tasks.
    let rules = b
        .rules
        .into_iter()
        .take(1024)
        .map(|(repo, perms)| {
            let perms = perms
                .into_iter()
                .filter(|p| !matches!(p, Permission::TasksRead | Permission::TasksWrite))
                .collect();
            (repo, perms)
        })
        .collect();
    let ttl = Duration::from_secs(b.ttl_secs.clamp(60, timeout.saturating_add(60)));
    let c = auth.start_run(&run, crate::auth::Grants::Rules(rules), ttl);
    Json(json!({ "username": c.username, "password": c.password })).into_response()
}

async fn trust(State(h): St, Json(b): Json<TrustAsk>) -> Response {
    match h.trust.denial(&b.repository, &b.reference).await {
        Ok(d) => Json(json!({ "denial": d })).into_response(),
        Err(e) => internal(e),
    }
}

async fn finish(
    State(h): St,
    Path((_, run)): Path<(String, String)>,
    Json(b): Json<Finish>,
) -> Response {
    let (db, r) = (h.queue.db().clone(), run.clone());
    let rec = match blocking(move || db.run(&r)).await {
        Ok(Some(rec)) => rec,
        Ok(None) => return err(StatusCode::NOT_FOUND, format!("no run {run}")),
        Err(r) => return r,
    };
    let (q, rec2, lease) = (h.queue.clone(), rec.clone(), b.lease.clone());
    let outcome = b.outcome;
    let status = outcome.status;
    if !status.is_final() {
        return err(
            StatusCode::BAD_REQUEST,
            format!(
                "a run ends Succeeded, Failed, Canceled or TimedOut, not {}",
                status.as_str()
            ),
        );
    }
    let done = blocking(move || q.complete(&rec2, &outcome, Some(&lease))).await;
    if !matches!(done, Ok(false)) {
        // Recorded (or it failed after the lease was let go): nothing more comes for it.
        if let Some(a) = &h.auth {
            a.end_run(&run);
        }
    }
    match done {
        Ok(true) => {
            tracing::info!(run = %run, status = status.as_str(), "finished on an agent");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => lost(&run),
        Err(r) => r,
    }
}

async fn release(
    State(h): St,
    Path((_, run)): Path<(String, String)>,
    Json(b): Json<Held>,
) -> Response {
    // A run an agent gives back (it is stopping) was not a failure: it does not use up
    // the run's attempts, however often its agents stop.
    let (db, r, lease, max) = (h.queue.db().clone(), run.clone(), b.lease, u32::MAX);
    match blocking(move || db.release_lease(&r, &lease, max)).await {
        Ok(Some(e)) => {
            h.handed_back(&e, "its agent is stopping").await;
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(None) => lost(&run),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, last_seen: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            pool: "p".into(),
            name: id.into(),
            labels: Default::default(),
            concurrency: 1,
            version: String::new(),
            registered_at: String::new(),
            last_seen: last_seen.into(),
            draining: false,
        }
    }

    #[test]
    fn agents_are_forgotten_only_long_after_they_were_last_heard_from() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-06T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let agents = [
            agent("fresh", "2026-12-06T11:59:50Z"),
            agent("offline", "2026-12-06T11:30:00Z"),
            agent("gone", "2026-12-06T10:59:59Z"),
            agent("unreadable", "yesterday"),
        ];
        assert_eq!(
            long_gone(&agents, now, Duration::from_secs(3600)),
            ["gone", "unreadable"]
        );
    }
}
