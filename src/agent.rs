//! `acr-task agent`: a worker on any machine with a Docker Engine. It registers with a
//! server's agent pool, long-polls it for runs, runs each with the server's own executor
//! ([`crate::server::runner::RunEnv`], under this machine's policy), streams the log and
//! step changes back, heartbeats the leases of the runs it holds, and reports how each
//! ended. It never reaches the server's database, only its API.
//!
//! Fencing: a run whose lease this agent can no longer renew (the server said it is
//! lost, or no heartbeat got through for a whole lease) is cancelled here, since the
//! server hands it to another agent. On a stop the agent drains: no new runs, the
//! running ones finish; after `drain_timeout` (or a second signal) they are cancelled
//! and handed back to the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::server::agents::{
    Assignment, Events, Finish, Heartbeat, Held, LoginAsk, RunEvent, TrustAsk,
};
use crate::server::db::AgentRecord;
use crate::server::runner::{Job, RunEnv, RunLogin, RunSink};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the server at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Client(#[from] crate::registry::client::ClientError),
}

/// Where an agent says what a person watching wants to know.
pub type Notify = Arc<dyn Fn(&str) + Send + Sync>;

/// How an agent is set up.
pub struct AgentConfig {
    /// The server's base URL (`http://127.0.0.1:5000`).
    pub server: String,
    /// `(user, password)`: a token with tasks/write, or the admin.
    pub login: Option<(String, String)>,
    pub ca_certs: Vec<std::path::PathBuf>,
    pub pool: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub concurrency: u32,
    /// Scratch space for runs (contexts, the runner image's build).
    pub work_dir: std::path::PathBuf,
    pub max_parallel: usize,
    pub policy: crate::policy::Policy,
    /// How long a drain waits for running runs before handing them back.
    pub drain_timeout: Duration,
    /// Told of what a person watching wants to know (registered, draining, stopped).
    pub notify: Option<Notify>,
}

/// What ends a held run early, in the order they win.
const GO_ON: u8 = 0;
const USER_CANCEL: u8 = 1;
const HAND_BACK: u8 = 2;
const LOST: u8 = 3;

struct HeldRun {
    lease: String,
    cancel: CancellationToken,
    why: Arc<AtomicU8>,
    /// When the last renewal the server confirmed was sent: the lease lasts at least a
    /// lease period from then.
    renewed: tokio::time::Instant,
}

/// The server's agent API, as this agent.
struct Api {
    http: reqwest::Client,
    base: String,
    login: Option<(String, String)>,
    /// A bearer token got with `login` once (a password check costs a hash; an agent
    /// calls often), renewed when refused.
    bearer: Mutex<Option<String>>,
    id: Mutex<String>,
}

/// An answer: its status and JSON body.
type Answer = (reqwest::StatusCode, Value);

impl Api {
    fn id(&self) -> String {
        self.id.lock().map(|i| i.clone()).unwrap_or_default()
    }

    fn unreachable(&self) -> impl Fn(reqwest::Error) -> AgentError + '_ {
        |source| AgentError::Unreachable {
            url: self.base.clone(),
            source,
        }
    }

    /// A bearer token for the task API from the server's token endpoint.
    async fn fetch_token(&self) -> Result<(), AgentError> {
        let Some((u, p)) = &self.login else {
            return Ok(());
        };
        use crate::auth::http::{fetch_api_token, ApiToken};
        match fetch_api_token(&self.http, &self.base, u, p)
            .await
            .map_err(self.unreachable())?
        {
            ApiToken::Token(t) => {
                if let Ok(mut b) = self.bearer.lock() {
                    *b = Some(t);
                }
                Ok(())
            }
            ApiToken::Refused(status) => Err(AgentError::Refused(format!(
                "the server refused the login of {u} (HTTP {status}): give a token with \
                 tasks/write in ACR_TASK_USERNAME and ACR_TASK_PASSWORD"
            ))),
            ApiToken::NoEndpoint => Err(AgentError::Refused(format!(
                "{} has no token endpoint ({}): is it an acr-task serve of this version?",
                self.base,
                crate::auth::http::TOKEN_PATH
            ))),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, AgentError> {
        let url = format!("{}{path}", self.base);
        let mut renewed = false;
        loop {
            let mut bearer = self.bearer.lock().ok().and_then(|b| b.clone());
            if bearer.is_none() && self.login.is_some() {
                self.fetch_token().await?;
                bearer = self.bearer.lock().ok().and_then(|b| b.clone());
            }
            let mut req = self.http.request(method.clone(), &url).timeout(timeout);
            if let Some(t) = bearer {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(self.unreachable())?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && !renewed && self.login.is_some() {
                // The token expired: another, once.
                self.fetch_token().await?;
                renewed = true;
                continue;
            }
            let text = resp.text().await.unwrap_or_default();
            let v = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Ok((status, v));
        }
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Answer, AgentError> {
        self.send(
            reqwest::Method::POST,
            path,
            Some(body),
            Duration::from_secs(30),
        )
        .await
    }

    /// POSTs `body` and returns the answer's JSON; a refusal as the server's sentence.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, String> {
        let ans = self.post(path, body).await.map_err(|e| e.to_string())?;
        if !ans.0.is_success() {
            return Err(Api::refusal(&ans));
        }
        Ok(ans.1)
    }

    /// The server's sentence for a refusal.
    fn refusal((status, v): &Answer) -> String {
        v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the server answered {status}"))
    }
}

/// The agent's shared state.
struct Agent {
    api: Api,
    cfg: AgentConfig,
    held: Mutex<HashMap<String, HeldRun>>,
    /// Heartbeat period, as the server's last assignment asked.
    heartbeat_secs: AtomicU64,
    draining: std::sync::atomic::AtomicBool,
    /// Wakes the heartbeat loop (a run was just taken: its lease needs renewing from now).
    beat_now: tokio::sync::Notify,
    registry: String,
}

/// Runs the agent until `stop` fires (then drains) or a second stop (`hard_stop`) hands
/// its runs back.
pub async fn run(
    cfg: AgentConfig,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) -> Result<(), AgentError> {
    let base = cfg.server.trim_end_matches('/').to_string();
    let registry = reqwest::Url::parse(&base)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .ok_or_else(|| AgentError::Refused(format!("{base} is not a server URL")))?;
    let api = Api {
        http: crate::registry::client::http_client(&cfg.ca_certs)?,
        base,
        login: cfg.login.clone(),
        bearer: Mutex::new(None),
        id: Mutex::new(String::new()),
    };
    let agent = Arc::new(Agent {
        api,
        cfg,
        held: Mutex::new(HashMap::new()),
        heartbeat_secs: AtomicU64::new(5),
        draining: Default::default(),
        beat_now: tokio::sync::Notify::new(),
        registry,
    });
    agent.register().await?;
    let env = Arc::new(
        RunEnv::connect(
            agent.cfg.work_dir.clone(),
            agent.cfg.max_parallel,
            Arc::new(agent.cfg.policy.clone()),
            Arc::new(AgentLogin(agent.clone())),
            Some(Arc::new(AgentTrust(agent.clone()))),
        )
        .await,
    );
    let beats = tokio::spawn(agent.clone().heartbeat_loop());
    let fence = tokio::spawn(agent.clone().fence_loop());
    let slots = Arc::new(tokio::sync::Semaphore::new(agent.cfg.concurrency as usize));
    let mut runs = tokio::task::JoinSet::new();
    while !stop.is_cancelled() {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.cancelled() => break,
            Some(_) = runs.join_next(), if !runs.is_empty() => continue,
        };
        let a = match agent.claim().await {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "asking for work; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.cancelled() => {}
                }
                continue;
            }
        };
        if stop.is_cancelled() {
            // Came in as the drain began: back to the queue untouched.
            agent.release(&a.run.id, &a.lease).await;
            break;
        }
        let (agent2, env2) = (agent.clone(), env.clone());
        runs.spawn(async move {
            agent2.run_one(env2, a).await;
            drop(permit);
        });
    }
    agent.draining.store(true, Ordering::SeqCst);
    agent.say("stopping: no new runs (a second signal hands running runs back)");
    let n = runs.len();
    if n > 0 {
        tracing::info!(runs = n, "draining: waiting for running runs to finish");
        agent.say(&format!(
            "draining: waiting for {n} running run(s) to finish (at most {} s)",
            agent.cfg.drain_timeout.as_secs()
        ));
        let drained = async { while runs.join_next().await.is_some() {} };
        tokio::select! {
            _ = drained => {}
            _ = tokio::time::sleep(agent.cfg.drain_timeout) => agent.hand_back_all(),
            _ = hard_stop.cancelled() => agent.hand_back_all(),
        }
        while runs.join_next().await.is_some() {}
    }
    beats.abort();
    fence.abort();
    let id = agent.api.id();
    let _ = agent
        .api
        .send(
            reqwest::Method::DELETE,
            &format!("/api/agents/{id}"),
            None,
            Duration::from_secs(10),
        )
        .await;
    tracing::info!(agent = %id, "agent stopped");
    agent.say(&format!("agent {id} stopped"));
    Ok(())
}

impl Agent {
    fn say(&self, what: &str) {
        if let Some(n) = &self.cfg.notify {
            n(what);
        }
    }

    async fn register(&self) -> Result<(), AgentError> {
        let body = json!({
            "pool": self.cfg.pool,
            "name": self.cfg.name,
            "labels": self.cfg.labels,
            "concurrency": self.cfg.concurrency,
            "version": env!("CARGO_PKG_VERSION"),
        });
        let ans = self.api.post("/api/agents", &body).await?;
        if !ans.0.is_success() {
            return Err(AgentError::Refused(Api::refusal(&ans)));
        }
        let rec: AgentRecord = serde_json::from_value(ans.1)
            .map_err(|e| AgentError::Refused(format!("the server's answer: {e}")))?;
        tracing::info!(agent = %rec.id, pool = %rec.pool, "registered");
        self.say(&format!(
            "agent {} working for pool {} of {} ({} runs at once)",
            rec.id, rec.pool, self.api.base, rec.concurrency
        ));
        if let Ok(mut id) = self.api.id.lock() {
            *id = rec.id;
        }
        Ok(())
    }

    /// One long poll: a run, or none within the wait.
    async fn claim(&self) -> Result<Option<Assignment>, AgentError> {
        let path = format!("/api/agents/{}/claim?wait=10", self.api.id());
        let ans = self
            .api
            .send(
                reqwest::Method::POST,
                &path,
                Some(&json!({})),
                Duration::from_secs(40),
            )
            .await?;
        match ans.0 {
            reqwest::StatusCode::NO_CONTENT => Ok(None),
            reqwest::StatusCode::NOT_FOUND => {
                // The server forgot this agent (its pool was re-made, say): again.
                self.register().await?;
                Ok(None)
            }
            s if s.is_success() => serde_json::from_value(ans.1)
                .map(Some)
                .map_err(|e| AgentError::Refused(format!("the server's assignment: {e}"))),
            _ => Err(AgentError::Refused(Api::refusal(&ans))),
        }
    }

    async fn release(&self, run: &str, lease: &str) {
        let path = format!("/api/agents/{}/runs/{run}/release", self.api.id());
        let body = json!(Held {
            run: run.to_string(),
            lease: lease.to_string()
        });
        if let Err(e) = self.api.post(&path, &body).await {
            tracing::warn!(run, error = %e, "handing a run back; its lease will run out instead");
        }
    }

    fn hand_back_all(&self) {
        if let Ok(held) = self.held.lock() {
            for h in held.values() {
                let _ =
                    h.why
                        .compare_exchange(GO_ON, HAND_BACK, Ordering::SeqCst, Ordering::SeqCst);
                h.cancel.cancel();
            }
        }
    }

    fn lease_of(&self, run: &str) -> Option<String> {
        self.held.lock().ok()?.get(run).map(|h| h.lease.clone())
    }

    /// Renews every held lease; cancels what the server says is no longer this agent's.
    async fn heartbeat_loop(self: Arc<Self>) {
        loop {
            let every = Duration::from_secs(self.heartbeat_secs.load(Ordering::Relaxed).max(1));
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.beat_now.notified() => {}
            }
            let runs: Vec<Held> = match self.held.lock() {
                Ok(h) => h
                    .iter()
                    .map(|(run, h)| Held {
                        run: run.clone(),
                        lease: h.lease.clone(),
                    })
                    .collect(),
                Err(_) => continue,
            };
            let body = json!(Heartbeat {
                draining: self.draining.load(Ordering::SeqCst),
                runs,
            });
            let path = format!("/api/agents/{}/heartbeat", self.api.id());
            let sent = tokio::time::Instant::now();
            // No longer than a period: a stuck call must not hold back the next one.
            let answer = self
                .api
                .send(reqwest::Method::POST, &path, Some(&body), every)
                .await;
            match answer {
                Ok((s, v)) if s.is_success() => {
                    for st in v["runs"].as_array().into_iter().flatten() {
                        let run = st["run"].as_str().unwrap_or_default();
                        let held = st["held"].as_bool().unwrap_or(false);
                        let cancel = st["cancel"].as_bool().unwrap_or(false);
                        if !held {
                            self.stop_run(run, LOST);
                            continue;
                        }
                        self.renewed(run, sent);
                        if cancel {
                            self.stop_run(run, USER_CANCEL);
                        }
                    }
                }
                Ok((reqwest::StatusCode::NOT_FOUND, _)) => {
                    if let Err(e) = self.register().await {
                        tracing::warn!(error = %e, "registering again");
                    }
                }
                Ok(ans) => tracing::warn!(error = %Api::refusal(&ans), "heartbeat refused"),
                Err(e) => tracing::warn!(error = %e, "heartbeat"),
            }
        }
    }

    fn renewed(&self, run: &str, sent: tokio::time::Instant) {
        if let Ok(mut held) = self.held.lock() {
            if let Some(h) = held.get_mut(run) {
                h.renewed = h.renewed.max(sent);
            }
        }
    }

    /// Stops every run whose lease was last renewed two heartbeat periods ago: the server
    /// hands it on at three, and the run must be stopped here before another agent starts
    /// it.
    async fn fence_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let every = Duration::from_secs(self.heartbeat_secs.load(Ordering::Relaxed).max(1));
            let stale: Vec<String> = match self.held.lock() {
                Ok(h) => h
                    .iter()
                    .filter(|(_, h)| h.renewed.elapsed() > every * 2)
                    .map(|(id, _)| id.clone())
                    .collect(),
                Err(_) => continue,
            };
            for id in stale {
                tracing::warn!(run = %id, "its lease could not be renewed: stopping the run before the server hands it on");
                self.stop_run(&id, LOST);
            }
        }
    }

    fn stop_run(&self, run: &str, why: u8) {
        if let Ok(held) = self.held.lock() {
            if let Some(h) = held.get(run) {
                let _ = h
                    .why
                    .compare_exchange(GO_ON, why, Ordering::SeqCst, Ordering::SeqCst);
                if h.why.load(Ordering::SeqCst) < why {
                    h.why.store(why, Ordering::SeqCst);
                }
                h.cancel.cancel();
            }
        }
    }

    async fn run_one(self: Arc<Self>, env: Arc<RunEnv>, a: Assignment) {
        let Assignment {
            run,
            lease,
            spec,
            provisions,
            heartbeat_secs,
        } = a;
        self.heartbeat_secs
            .store(heartbeat_secs.clamp(1, 600), Ordering::Relaxed);
        let id = run.id.clone();
        tracing::info!(run = %id, task = %run.task, attempt = run.attempt, "running");
        let cancel = CancellationToken::new();
        let why = Arc::new(AtomicU8::new(GO_ON));
        if let Ok(mut held) = self.held.lock() {
            held.insert(
                id.clone(),
                HeldRun {
                    lease: lease.clone(),
                    cancel: cancel.clone(),
                    why: why.clone(),
                    renewed: tokio::time::Instant::now(),
                },
            );
        }
        self.beat_now.notify_one();
        let sink = RemoteSink::start(self.clone(), id.clone(), lease.clone());
        let job = Job {
            run,
            spec,
            registry: self.registry.clone(),
            log: sink.clone(),
            cancel,
        };
        // On a task of its own, so a panic ends this run as failed instead of leaving its
        // lease renewed for ever.
        let outcome = match tokio::spawn(env.clone().execute(job, Ok(provisions))).await {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("the agent's executor failed: {e}");
                sink.line("acr-task", &msg);
                crate::server::runner::Outcome::failed(msg)
            }
        };
        sink.close().await;
        // The lease stays renewed until the server has the report.
        match why.load(Ordering::SeqCst) {
            LOST => {
                tracing::warn!(run = %id, "the run was handed to another agent; its end here is not reported");
            }
            HAND_BACK => self.release(&id, &lease).await,
            _ => self.report(&id, &lease, outcome, &why).await,
        }
        if let Ok(mut held) = self.held.lock() {
            held.remove(&id);
        }
    }

    /// Reports a run's end, trying until the server answers or the lease is gone (its
    /// heartbeats go on meanwhile, so a server that is away for a while loses nothing).
    async fn report(
        &self,
        run: &str,
        lease: &str,
        mut outcome: crate::server::runner::Outcome,
        why: &AtomicU8,
    ) {
        if let Some(e) = outcome.error.as_mut() {
            truncate(e, MAX_TEXT);
        }
        let path = format!("/api/agents/{}/runs/{run}/finish", self.api.id());
        let body = json!(Finish {
            lease: lease.to_string(),
            outcome,
        });
        loop {
            match self.api.post(&path, &body).await {
                Ok((s, _)) if s.is_success() => {
                    tracing::info!(run, "reported");
                    return;
                }
                Ok(ans) if ans.0.is_client_error() => {
                    tracing::warn!(run, error = %Api::refusal(&ans), "report refused");
                    return;
                }
                Ok(ans) => tracing::warn!(run, error = %Api::refusal(&ans), "reporting"),
                Err(e) => tracing::warn!(run, error = %e, "reporting"),
            }
            if why.load(Ordering::SeqCst) == LOST {
                tracing::error!(
                    run,
                    "could not report the run's end before its lease ran out; it runs again"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Longest log line or error text sent (a longer one is cut, saying so).
const MAX_TEXT: usize = 16 * 1024;

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [cut]");
    }
}

/// A run's log and step changes, sent to the server in batches (every 200 ms, or sooner
/// when many lines wait). A refused batch (the lease is gone) stops the run.
struct RemoteSink {
    agent: Arc<Agent>,
    run: String,
    lease: String,
    pending: Mutex<Vec<RunEvent>>,
    wake: tokio::sync::Notify,
    done: CancellationToken,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Lines that make a batch go at once; and most events one batch carries.
const BATCH: usize = 256;

impl RemoteSink {
    fn start(agent: Arc<Agent>, run: String, lease: String) -> Arc<RemoteSink> {
        let sink = Arc::new(RemoteSink {
            agent,
            run,
            lease,
            pending: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            done: CancellationToken::new(),
            flusher: Mutex::new(None),
        });
        let s = sink.clone();
        let handle = tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = s.done.cancelled() => true,
                    _ = s.wake.notified() => false,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => false,
                };
                s.flush().await;
                if stopping {
                    s.flush().await;
                    return;
                }
            }
        });
        if let Ok(mut f) = sink.flusher.lock() {
            *f = Some(handle);
        }
        sink
    }

    fn push(&self, ev: RunEvent) {
        let n = match self.pending.lock() {
            Ok(mut p) => {
                p.push(ev);
                p.len()
            }
            Err(_) => return,
        };
        if n >= BATCH {
            self.wake.notify_one();
        }
    }

    async fn flush(&self) {
        loop {
            let batch: Vec<RunEvent> = match self.pending.lock() {
                Ok(mut p) => {
                    let n = p.len().min(BATCH);
                    p.drain(..n).collect()
                }
                Err(_) => return,
            };
            if batch.is_empty() {
                return;
            }
            let path = format!(
                "/api/agents/{}/runs/{}/events",
                self.agent.api.id(),
                self.run
            );
            let body = json!(Events {
                lease: self.lease.clone(),
                events: batch,
            });
            // A few tries: the log is worth a short wait, not a stuck run.
            for i in 0..3 {
                match self.agent.api.post(&path, &body).await {
                    Ok((s, v)) if s.is_success() => {
                        if v["cancel"].as_bool() == Some(true) {
                            self.agent.stop_run(&self.run, USER_CANCEL);
                        }
                        break;
                    }
                    Ok((reqwest::StatusCode::CONFLICT, _)) => {
                        self.agent.stop_run(&self.run, LOST);
                        break;
                    }
                    Ok(ans) => {
                        tracing::warn!(run = %self.run, error = %Api::refusal(&ans), "sending the log")
                    }
                    Err(e) => tracing::warn!(run = %self.run, error = %e, "sending the log"),
                }
                tokio::time::sleep(Duration::from_millis(300 * (i + 1))).await;
            }
        }
    }

    /// Sends what is left and stops.
    async fn close(&self) {
        self.done.cancel();
        let h = self.flusher.lock().ok().and_then(|mut f| f.take());
        if let Some(h) = h {
            let _ = h.await;
        }
    }
}

impl RunSink for RemoteSink {
    fn line(&self, who: &str, text: &str) {
        let mut text = text.to_string();
        truncate(&mut text, MAX_TEXT);
        self.push(RunEvent::Line {
            who: who.chars().take(256).collect(),
            text,
        });
    }

    fn steps(&self, steps: Vec<(String, String, Vec<String>)>) {
        self.push(RunEvent::Steps { steps });
    }

    fn step_started(&self, step: usize, attempt: u32) {
        self.push(RunEvent::StepStarted { step, attempt });
    }

    fn step_finished(&self, step: usize, report: &crate::exec::StepReport) {
        self.push(RunEvent::StepFinished {
            step,
            report: report.clone(),
        });
    }
}

/// A run's registry login, asked of the server (which ends it with the run).
struct AgentLogin(Arc<Agent>);

impl RunLogin for AgentLogin {
    fn start(
        &self,
        run: &str,
        grants: crate::auth::Grants,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Option<crate::credentials::Credential>, String>> {
        let (agent, run) = (self.0.clone(), run.to_string());
        Box::pin(async move {
            let rules = match grants {
                crate::auth::Grants::Rules(r) => r,
                _ => return Err("a run's login is always a list of rules".into()),
            };
            let lease = agent
                .lease_of(&run)
                .ok_or_else(|| "the run is no longer held".to_string())?;
            let path = format!("/api/agents/{}/runs/{run}/login", agent.api.id());
            let body = json!(LoginAsk {
                lease,
                rules,
                ttl_secs: ttl.as_secs(),
            });
            let v = agent.api.call(&path, &body).await?;
            match (v["username"].as_str(), v["password"].as_str()) {
                (Some(u), Some(p)) => Ok(Some(crate::credentials::Credential {
                    username: u.to_string(),
                    password: p.to_string(),
                })),
                _ => Ok(None),
            }
        })
    }

    /// The server ends the login when the run's end is reported.
    fn end(&self, _run: &str) {}
}

/// Content-trust answers from the server (it holds the registry's policies).
struct AgentTrust(Arc<Agent>);

impl crate::setup::TrustCheck for AgentTrust {
    fn denial<'a>(
        &'a self,
        repository: &'a str,
        reference: &'a str,
    ) -> crate::exec::BoxFut<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            let path = format!("/api/agents/{}/trust", self.0.api.id());
            let body = json!(TrustAsk {
                repository: repository.to_string(),
                reference: reference.to_string(),
            });
            let v = self.0.api.call(&path, &body).await?;
            Ok(v["denial"].as_str().map(str::to_string))
        })
    }
}
