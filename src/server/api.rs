//! The JSON API under `/api`: tasks, runs, logs (followed live as a chunked stream) and
//! webhooks.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;

use super::db::NewRun;
use super::model::{TaskSpec, Trigger};
use super::queue::{Cancel, Queue};
use super::runner;
use crate::triggers::webhook::{self, Delivery, Provider, WebhookError};

pub struct ApiState {
    pub queue: Arc<Queue>,
    /// What stored tasks may do; checked when they are stored.
    pub policy: Arc<crate::policy::Policy>,
}

/// What a stored commit-trigger secret reads as in every answer: it is never shown, and
/// sending it back on an update keeps the stored one.
pub const REDACTED: &str = "***";

/// A task as every answer shows it: its commit-trigger secret as [`REDACTED`].
pub fn redacted(mut spec: TaskSpec) -> TaskSpec {
    if let Some(c) = spec.triggers.commit.as_mut() {
        if c.secret.is_some() {
            c.secret = Some(REDACTED.into());
        }
    }
    spec
}

type St = State<Arc<ApiState>>;

/// An API error: a status and a JSON body `{ "error": ..., ["diagnostics": [...]] }`.
pub struct ApiErr(StatusCode, serde_json::Value);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn err(status: StatusCode, msg: impl std::fmt::Display) -> ApiErr {
    ApiErr(status, json!({ "error": msg.to_string() }))
}

fn internal(e: impl std::fmt::Display) -> ApiErr {
    tracing::error!(error = %e, "api");
    err(StatusCode::INTERNAL_SERVER_ERROR, e)
}

/// The API. Everything but health and the (signature-checked) commit webhooks goes
/// through the guard: credentials (tasks/read to look, tasks/write to change) and the
/// browser checks (see `server::guard`).
/// `more` (the registry's management routes) sits behind the same guard.
pub fn router(state: Arc<ApiState>, guard: Arc<super::guard::ApiGuard>, more: Router) -> Router {
    let public = Router::new()
        .route(
            "/api/health",
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route("/api/webhooks/{provider}/{task}", post(webhook))
        .with_state(state.clone());
    let managed = Router::new()
        .route("/api/tasks", get(list_tasks).post(create_task))
        .route(
            "/api/tasks/{name}",
            get(show_task).put(update_task).delete(delete_task),
        )
        .route("/api/tasks/{name}/runs", get(task_runs).post(run_task))
        .route("/api/runs", get(list_runs).post(quick_run))
        .route("/api/runs/{id}", get(show_run))
        .route("/api/runs/{id}/logs", get(run_logs))
        .route("/api/runs/{id}/cancel", post(cancel_run))
        .with_state(state);
    let csrf = Router::new()
        .route("/api/csrf-token", get(super::guard::csrf_token))
        .with_state(guard.clone());
    let managed =
        managed
            .merge(csrf)
            .merge(more)
            .route_layer(axum::middleware::from_fn_with_state(
                guard,
                super::guard::api_guard,
            ));
    public.merge(managed)
}

/// Checks a definition before it is stored: name, triggers, and the task file itself.
/// Returns the task file's warnings (what ACR accepts but is likely a mistake).
async fn check_spec(
    spec: &TaskSpec,
    policy: &Arc<crate::policy::Policy>,
) -> Result<Vec<crate::task::Diagnostic>, ApiErr> {
    let name_ok = !spec.name.is_empty()
        && spec.name.len() <= 50
        && spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "task name {:?}: use 1 to 50 letters, digits, '-' or '_'",
                spec.name
            ),
        ));
    }
    if spec.context.is_empty() && spec.task_yaml.is_none() {
        return Err(err(StatusCode::BAD_REQUEST, "a task needs a context"));
    }
    if let Some(f) = &spec.file {
        let p = std::path::Path::new(f);
        if p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!("task file {f:?} must be a path inside the context (no leading / or ..)"),
            ));
        }
    }
    for (what, len) in [
        ("task file", spec.task_yaml.as_ref().map_or(0, String::len)),
        ("values", spec.values.as_ref().map_or(0, String::len)),
    ] {
        if len > runner::MAX_TASK_FILE_BYTES {
            return Err(err(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the {what} is larger than {} bytes",
                    runner::MAX_TASK_FILE_BYTES
                ),
            ));
        }
    }
    if !spec.context.is_empty()
        && !spec.is_git()
        && !std::path::Path::new(&spec.context).is_absolute()
    {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("local context {:?} must be an absolute path", spec.context),
        ));
    }
    if let Some(p) = &spec.platform {
        p.parse::<crate::task::Platform>()
            .map_err(|m| err(StatusCode::BAD_REQUEST, m))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for t in &spec.triggers.timers {
        if !names.insert(t.name.as_str()) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!("timer {:?} is defined twice", t.name),
            ));
        }
        crate::triggers::cron::parse(&t.schedule)
            .map_err(|m| err(StatusCode::BAD_REQUEST, format!("timer {:?}: {m}", t.name)))?;
    }
    let (s, policy) = (spec.clone(), policy.clone());
    match tokio::task::spawn_blocking(move || runner::validate_spec(&s, &policy)).await {
        Ok(Ok(warnings)) => Ok(warnings),
        Ok(Err(d)) => Err(ApiErr(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("the task file is invalid:\n{d}"), "diagnostics": d.0 }),
        )),
        Err(e) => Err(internal(e)),
    }
}

async fn list_tasks(State(s): St) -> Result<Json<Vec<TaskSpec>>, ApiErr> {
    let tasks = s.queue.db().tasks().map_err(internal)?;
    Ok(Json(tasks.into_iter().map(redacted).collect()))
}

/// A stored task as answered, with its task file's warnings (if any).
fn with_warnings(spec: TaskSpec, warnings: Vec<crate::task::Diagnostic>) -> serde_json::Value {
    let mut v = serde_json::to_value(redacted(spec)).unwrap_or_default();
    if !warnings.is_empty() {
        v["warnings"] = json!(warnings);
    }
    v
}

/// A task's agent pool must exist when it is stored.
fn check_pool(s: &ApiState, spec: &TaskSpec) -> Result<(), ApiErr> {
    let Some(p) = &spec.agent_pool else {
        return Ok(());
    };
    if s.queue.db().pool(p).map_err(internal)?.is_none() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("agent pool {p} does not exist (acr-task agent-pool create {p} makes it)"),
        ));
    }
    Ok(())
}

async fn create_task(State(s): St, Json(spec): Json<TaskSpec>) -> Result<Response, ApiErr> {
    check_pool(&s, &spec)?;
    let warnings = check_spec(&spec, &s.policy).await?;
    if !s.queue.db().put_task(&spec, true).map_err(internal)? {
        return Err(err(
            StatusCode::CONFLICT,
            format!("task {} already exists", spec.name),
        ));
    }
    Ok((StatusCode::CREATED, Json(with_warnings(spec, warnings))).into_response())
}

async fn update_task(
    State(s): St,
    Path(name): Path<String>,
    Json(mut spec): Json<TaskSpec>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    if spec.name.is_empty() {
        spec.name = name.clone();
    }
    if spec.name != name {
        return Err(err(StatusCode::BAD_REQUEST, "a task cannot be renamed"));
    }
    // The redacted secret sent back unchanged keeps the stored one.
    if let Some(c) = spec.triggers.commit.as_mut() {
        if c.secret.as_deref() == Some(REDACTED) {
            let stored = s.queue.db().task(&name).map_err(internal)?;
            c.secret = stored
                .and_then(|t| t.triggers.commit)
                .and_then(|c| c.secret);
        }
    }
    check_pool(&s, &spec)?;
    let warnings = check_spec(&spec, &s.policy).await?;
    if !s.queue.db().put_task(&spec, false).map_err(internal)? {
        return Err(err(StatusCode::NOT_FOUND, format!("no task {name}")));
    }
    Ok(Json(with_warnings(spec, warnings)))
}

async fn show_task(State(s): St, Path(name): Path<String>) -> Result<Json<TaskSpec>, ApiErr> {
    match s.queue.db().task(&name).map_err(internal)? {
        Some(t) => Ok(Json(redacted(t))),
        None => Err(err(StatusCode::NOT_FOUND, format!("no task {name}"))),
    }
}

async fn delete_task(State(s): St, Path(name): Path<String>) -> Result<StatusCode, ApiErr> {
    if s.queue.db().delete_task(&name).map_err(internal)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(err(StatusCode::NOT_FOUND, format!("no task {name}")))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RunRequest {
    /// Build this commit (git contexts) instead of the branch tip.
    commit: Option<String>,
}

async fn run_task(State(s): St, Path(name): Path<String>, body: Bytes) -> Result<Response, ApiErr> {
    let req: RunRequest = if body.is_empty() {
        RunRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| err(StatusCode::BAD_REQUEST, format!("run request: {e}")))?
    };
    let Some(spec) = s.queue.db().task(&name).map_err(internal)? else {
        return Err(err(StatusCode::NOT_FOUND, format!("no task {name}")));
    };
    let rec = s
        .queue
        .enqueue(NewRun {
            task: name,
            trigger: Trigger::Manual,
            commit: req.commit,
            branch: spec.is_git().then(|| spec.branch().to_string()),
        })
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

/// `POST /api/runs`: a run of a definition that is not stored (`acr-task run --no-wait`,
/// as `az acr run` queues one), checked as a stored task is.
async fn quick_run(State(s): St, Json(mut spec): Json<TaskSpec>) -> Result<Response, ApiErr> {
    check_pool(&s, &spec)?;
    if spec.name.is_empty() {
        spec.name = QUICK_RUN_TASK.into();
    }
    if spec.triggers.commit.is_some() || !spec.triggers.timers.is_empty() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "a quick run has no triggers: store a task (`acr-task task create`) for those",
        ));
    }
    spec.triggers.base_image = false;
    check_spec(&spec, &s.policy).await?;
    let branch = spec.is_git().then(|| spec.branch().to_string());
    let rec = s
        .queue
        .enqueue_with(
            NewRun {
                task: spec.name.clone(),
                trigger: Trigger::Quick,
                commit: None,
                branch,
            },
            Some(&spec),
        )
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

/// The task name quick runs are listed under unless they are given one.
pub const QUICK_RUN_TASK: &str = "quick-run";

#[derive(Debug, Deserialize)]
struct RunsQuery {
    task: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(State(s): St, Query(q): Query<RunsQuery>) -> Result<Response, ApiErr> {
    let runs = s
        .queue
        .db()
        .runs(q.task.as_deref(), q.limit.unwrap_or(100))
        .map_err(internal)?;
    Ok(Json(runs).into_response())
}

async fn task_runs(
    State(s): St,
    Path(name): Path<String>,
    Query(q): Query<RunsQuery>,
) -> Result<Response, ApiErr> {
    if s.queue.db().task(&name).map_err(internal)?.is_none() {
        return Err(err(StatusCode::NOT_FOUND, format!("no task {name}")));
    }
    let runs = s
        .queue
        .db()
        .runs(Some(&name), q.limit.unwrap_or(100))
        .map_err(internal)?;
    Ok(Json(runs).into_response())
}

async fn show_run(State(s): St, Path(id): Path<String>) -> Result<Response, ApiErr> {
    match s.queue.db().run(&id).map_err(internal)? {
        Some(r) => Ok(Json(r).into_response()),
        None => Err(err(StatusCode::NOT_FOUND, format!("no run {id}"))),
    }
}

async fn cancel_run(State(s): St, Path(id): Path<String>) -> Result<Response, ApiErr> {
    let what = match s.queue.cancel(&id).map_err(internal)? {
        Cancel::NotFound => return Err(err(StatusCode::NOT_FOUND, format!("no run {id}"))),
        Cancel::AlreadyFinished => {
            return Err(err(
                StatusCode::CONFLICT,
                format!("run {id} has already finished"),
            ))
        }
        Cancel::Dequeued => "canceled",
        Cancel::Signalled => "canceling",
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": what})),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

/// The run's log; with `follow=true` a chunked stream that ends when the run does.
async fn run_logs(
    State(s): St,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiErr> {
    if s.queue.db().run(&id).map_err(internal)?.is_none() {
        return Err(err(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    struct Follow {
        queue: Arc<Queue>,
        id: String,
        offset: u64,
        follow: bool,
    }
    let start = Follow {
        queue: s.queue.clone(),
        id,
        offset: 0,
        follow: q.follow,
    };
    // Sent in chunks as it is read (a long log is never held whole); without `follow`,
    // what is stored now.
    let stream = futures_util::stream::unfold(start, |mut f| async move {
        loop {
            // Watch before reading, so a line written between the read and the wait wakes it.
            let mut live = f.queue.live(&f.id).map(|l| l.watch());
            if let Some(rx) = live.as_mut() {
                rx.borrow_and_update();
            }
            // Read the status first: if the run had finished, what is stored now is all.
            let finished = !f.follow || {
                let (db, id) = (f.queue.db().clone(), f.id.clone());
                match tokio::task::spawn_blocking(move || db.run(&id)).await {
                    Ok(Ok(Some(r))) => r.is_finished(),
                    _ => true,
                }
            };
            let chunk = f.queue.read_log(&f.id, f.offset, 1 << 20, finished).await;
            if !chunk.is_empty() {
                f.offset += chunk.len() as u64;
                return Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), f));
            }
            if finished {
                return None;
            }
            // Woken by the run's log writer; polled while the run waits in the queue (or
            // runs on another replica).
            match live.as_mut() {
                Some(rx) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                }
                None => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    });
    Ok((
        [("content-type", "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn webhook(
    State(s): St,
    Path((provider, task)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let Some(p) = Provider::parse(&provider) else {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("unknown webhook provider {provider}; use github, gitlab, gitea or generic"),
        ));
    };
    let Some(spec) = s.queue.db().task(&task).map_err(internal)? else {
        return Err(err(StatusCode::NOT_FOUND, format!("no task {task}")));
    };
    let Some(secret) = spec.triggers.commit.as_ref().and_then(|c| c.secret.clone()) else {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("task {task} has no commit trigger with a webhook secret"),
        ));
    };
    let as_api = |e: WebhookError| match e {
        WebhookError::Unauthorized(m) => err(StatusCode::UNAUTHORIZED, m),
        WebhookError::Malformed(m) => err(StatusCode::BAD_REQUEST, m),
    };
    webhook::verify(p, &headers, &body, &secret).map_err(as_api)?;
    let delivery = webhook::parse(p, &headers, &body).map_err(as_api)?;
    let push = match delivery {
        Delivery::Ignored(why) => {
            return Ok(Json(json!({"queued": false, "reason": why})).into_response())
        }
        Delivery::Push(push) => push,
    };
    // Replays are recognised from what the signature covers (the payload) and from the
    // commit itself, never from a delivery header an attacker could change freely.
    let id = webhook::delivery_id(p, &headers);
    let payload = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    let commit_key = format!("{}@{}", push.branch, push.commit);
    let db = s.queue.db();
    for (kind, key, what) in [
        ("payload", payload.as_str(), "this payload"),
        ("commit", commit_key.as_str(), "this commit"),
    ] {
        if !db.record_delivery(kind, key, &task).map_err(internal)? {
            return Ok(Json(json!({
                "queued": false,
                "reason": format!("{what} was already received ({key})")
            }))
            .into_response());
        }
    }
    if push.branch != spec.branch() {
        return Ok(Json(json!({
            "queued": false,
            "reason": format!("push to {} but the task follows {}", push.branch, spec.branch())
        }))
        .into_response());
    }
    let rec = s
        .queue
        .enqueue(NewRun {
            task,
            trigger: Trigger::Commit {
                source: p.name().into(),
                delivery: id,
                commit: push.commit.clone(),
                branch: push.branch.clone(),
            },
            commit: Some(push.commit),
            branch: Some(push.branch),
        })
        .map_err(internal)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"queued": true, "run": rec})),
    )
        .into_response())
}
