//! The web page `acr-task serve` serves at `/`: runs (live list, a run's graph, timeline
//! and live log, cancel and run again), tasks (definition, triggers, run now) and the
//! registry (repositories, tags, manifests with sizes, platforms and referrers, pull
//! commands, deleting a tag, usage against the tier). HTML is rendered here (`pages`)
//! from plain views (`view`) over the same stores and checks the JSON API uses; a little
//! plain JavaScript (`assets/app.js`) follows server-sent events for the live parts.
//!
//! Who may look: the admin or a token, signed in through `session` (or anyone on an
//! `--insecure-open-api` loopback server). Pages show only what that identity may see —
//! runs and tasks with tasks/read, changing them with tasks/write, repositories by the
//! token's scope map, deleting with content/delete — and every form carries the session's
//! CSRF token. Every answer has strict security headers (no framing, own scripts only).

pub mod pages;
pub mod session;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest as _, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::Markup;
use serde::Deserialize;

use crate::auth::{Auth, Grants};
use crate::exec::Status;
use crate::registry::Registry;
use crate::server::db::{NewRun, RunFilter};
use crate::server::model::Trigger;
use crate::server::queue::Queue;
use pages::Chrome;

pub struct WebState {
    pub queue: Arc<Queue>,
    pub registry: Registry,
    pub auth: Arc<Auth>,
    /// `--insecure-open-api`: no sign-in (loopback only).
    pub open: bool,
    /// Served over TLS: cookies are `Secure`.
    pub tls: bool,
    /// `HOST:PORT` for the pull commands.
    pub host: String,
    pub sessions: session::Sessions,
    /// Agents heard from within this count as online.
    pub agent_online_within: std::time::Duration,
    /// Geo-replication, for a registry of the server's own.
    pub replication: Option<Arc<crate::replication::service::Replication>>,
}

type St = State<Arc<WebState>>;

/// Runs shown per page of the list.
const PAGE: usize = 50;
/// Repositories per page.
const REPO_PAGE: usize = 100;
/// The log a run page starts with (the rest streams or is in the raw log).
const LOG_HEAD: u64 = 1 << 20;

pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(runs_page))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/runs/rows", get(run_rows))
        .route("/ui/runs/events", get(runs_events))
        .route("/ui/runs/{id}", get(run_page))
        .route("/ui/runs/{id}/graph", get(run_graph))
        .route("/ui/runs/{id}/events", get(run_events))
        .route("/ui/runs/{id}/cancel", post(cancel))
        .route("/ui/runs/{id}/rerun", post(rerun))
        .route("/ui/tasks", get(tasks_page))
        .route("/ui/tasks/{name}", get(task_page))
        .route("/ui/tasks/{name}/run", post(run_now))
        .route("/ui/pools", get(pools_page))
        .route("/ui/registry", get(registry_page))
        .route("/ui/registry/{*repo}", get(repo_page).post(delete_tag))
        .route("/ui/assets/app.js", get(js))
        .route("/ui/assets/app.css", get(css))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// No framing, no scripts or styles but our own, no referrer leaks, nothing cached.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    r
}

fn html(m: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.into_string(),
    )
        .into_response()
}

/// Who is looking.
struct Viewer {
    user: String,
    csrf: String,
    grants: Grants,
}

impl Viewer {
    fn chrome(&self) -> Chrome {
        Chrome {
            user: self.user.clone(),
            csrf: self.csrf.clone(),
            tasks: self.grants.tasks().is_some(),
            registry: self.may_see_registry(),
        }
    }
    fn may_see_registry(&self) -> bool {
        match &self.grants {
            Grants::All => true,
            Grants::Rules(r) => r
                .iter()
                .any(|(_, p)| p.iter().any(|p| p.token_action().is_some())),
            Grants::Anonymous { .. } => false,
        }
    }
    fn may_read_repo(&self, repo: &str) -> bool {
        let a = self.grants.repo_actions(repo);
        a.contains(&"pull") || a.contains(&"metadata_read")
    }
}

/// Not signed in (or the session's identity is disabled): to the login page.
enum Refusal {
    Login(String),
    Status(StatusCode, String, Option<Chrome>),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Login(next) => {
                Redirect::to(&format!("/ui/login?next={}", pages::urlenc(&next))).into_response()
            }
            Refusal::Status(code, text, chrome) => {
                let c = chrome.unwrap_or(Chrome {
                    user: String::new(),
                    csrf: String::new(),
                    tasks: false,
                    registry: false,
                });
                let title = code.canonical_reason().unwrap_or("Error");
                (code, html(pages::message(&c, title, &text))).into_response()
            }
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "web page");
    Refusal::Status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong on the server; its log says what.".into(),
        None,
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f).await.map_err(internal)
}

async fn viewer(s: &WebState, headers: &HeaderMap, path: &str) -> Result<Viewer, Refusal> {
    if s.open {
        return Ok(Viewer {
            user: String::new(),
            csrf: s.auth.csrf_token(""),
            grants: Grants::All,
        });
    }
    let Some(sess) = s.sessions.get(headers) else {
        return Err(Refusal::Login(path.to_string()));
    };
    let auth = s.auth.clone();
    let user = sess.user.clone();
    match blocking(move || auth.store().subject_grants(&user)).await? {
        Ok(Some(grants)) => Ok(Viewer {
            user: sess.user,
            csrf: sess.csrf,
            grants,
        }),
        Ok(None) => {
            s.sessions.remove(headers);
            Err(Refusal::Login(path.to_string()))
        }
        Err(e) => Err(internal(e)),
    }
}

fn need_tasks(v: &Viewer, write: bool) -> Result<(), Refusal> {
    match v.grants.tasks() {
        Some(true) => Ok(()),
        Some(false) if !write => Ok(()),
        _ => Err(Refusal::Status(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not {} tasks and runs (needs tasks/{}).",
                v.user,
                if write { "change" } else { "see" },
                if write { "write" } else { "read" }
            ),
            Some(v.chrome()),
        )),
    }
}

/// A form post must carry the session's CSRF token (and come from this origin).
fn check_form(v: &Viewer, headers: &HeaderMap, token: &str) -> Result<(), Refusal> {
    if !crate::server::guard::same_origin(headers) || !session::csrf_matches(&v.csrf, token) {
        return Err(Refusal::Status(
            StatusCode::FORBIDDEN,
            "This form is stale or came from another site; reload the page and try again.".into(),
            Some(v.chrome()),
        ));
    }
    Ok(())
}

// ---- sign in and out

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn login_form(Query(q): Query<NextQuery>) -> Response {
    html(pages::login(None, &session::safe_next(q.next.as_deref())))
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    next: Option<String>,
}

async fn login(State(s): St, req: Request) -> Response {
    let ip = crate::auth::http::client_ip(&req);
    let headers = req.headers().clone();
    let Ok(Form(f)) = Form::<LoginForm>::from_request(req, &()).await else {
        return (
            StatusCode::BAD_REQUEST,
            html(pages::login(Some("Fill in both fields."), "/")),
        )
            .into_response();
    };
    let next = session::safe_next(f.next.as_deref());
    if !crate::server::guard::same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            html(pages::login(
                Some("Sign in from this server's own page."),
                &next,
            )),
        )
            .into_response();
    }
    match s.auth.login(ip, &f.username, &f.password).await {
        Ok(Some(_)) => {
            let id = s.sessions.create(&f.username);
            tracing::info!(user = %f.username, "signed in to the web page");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, session::set_cookie(Some(&id), s.tls)),
                    (header::LOCATION, next),
                ],
            )
                .into_response()
        }
        Ok(None) => (
            StatusCode::UNAUTHORIZED,
            html(pages::login(Some("Wrong user name or password."), &next)),
        )
            .into_response(),
        Err(crate::auth::http::AuthFailure::TooMany(secs)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            html(pages::login(
                Some(&format!("Too many failed sign-ins; try again in {secs} s.")),
                &next,
            )),
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            html(pages::login(
                Some("Signing in failed on the server."),
                &next,
            )),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(s): St, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if let Ok(v) = viewer(&s, &headers, "/").await {
        if check_form(&v, &headers, &f.csrf).is_ok() {
            s.sessions.remove(&headers);
        }
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, session::set_cookie(None, s.tls)),
            (header::LOCATION, "/ui/login".to_string()),
        ],
    )
        .into_response()
}

// ---- runs

#[derive(Deserialize, Default)]
struct RunsQuery {
    task: Option<String>,
    status: Option<String>,
    before: Option<i64>,
}

impl RunsQuery {
    fn filter(&self) -> RunFilter {
        RunFilter {
            task: self.task.clone().filter(|t| !t.is_empty()),
            status: self
                .status
                .as_deref()
                .and_then(|s| s.parse::<Status>().ok()),
            before: self.before,
            limit: PAGE,
        }
    }
}

async fn runs_page(
    State(s): St,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, "/").await?;
    if v.grants.tasks().is_none() {
        // A token for the registry alone starts at the registry.
        if v.may_see_registry() {
            return Ok(Redirect::to("/ui/registry").into_response());
        }
        need_tasks(&v, false)?;
    }
    let f = q.filter();
    let db = s.queue.db().clone();
    let (runs, tasks, queued) = blocking(move || {
        let runs = db.runs_page(&f)?;
        let tasks: Vec<String> = db.tasks()?.into_iter().map(|t| t.name).collect();
        let queued = db.count_with_status(Status::Queued)?;
        Ok::<_, crate::server::db::DbError>((runs, tasks, queued))
    })
    .await?
    .map_err(internal)?;
    let (concurrency, running) = s.queue.concurrency();
    let next = (runs.len() == PAGE)
        .then(|| runs.last().map(|r| r.seq))
        .flatten();
    let f = q.filter();
    let page = pages::RunsPage {
        runs,
        tasks,
        task: f.task,
        status: f.status,
        next,
        queued,
        running,
        concurrency,
    };
    Ok(html(pages::runs(&v.chrome(), &page, chrono::Utc::now())))
}

/// The list's rows alone (the live list swaps them in).
async fn run_rows(
    State(s): St,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, "/").await?;
    need_tasks(&v, false)?;
    let f = q.filter();
    let db = s.queue.db().clone();
    let runs = blocking(move || db.runs_page(&f))
        .await?
        .map_err(internal)?;
    Ok(html(pages::run_rows(&runs, chrono::Utc::now())))
}

/// How often a long-lived event stream checks that its viewer may still see it.
const RECHECK: Duration = Duration::from_secs(30);

/// The session behind `headers` is still signed in and may still see runs.
async fn still_allowed(s: &WebState, headers: &HeaderMap) -> bool {
    match viewer(s, headers, "/").await {
        Ok(v) => need_tasks(&v, false).is_ok(),
        Err(_) => false,
    }
}

/// Server-sent `changed` events whenever a run is queued, starts or ends.
async fn runs_events(State(s): St, headers: HeaderMap) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, "/").await?;
    need_tasks(&v, false)?;
    let rx = s.queue.watch_changes();
    let stream =
        futures_util::stream::unfold((rx, s, headers), |(mut rx, s, headers)| async move {
            // Woken at least every RECHECK, to end the stream once the viewer may no longer see.
            loop {
                match tokio::time::timeout(RECHECK, rx.changed()).await {
                    Ok(r) => {
                        r.ok()?;
                        break;
                    }
                    Err(_) if still_allowed(&s, &headers).await => continue,
                    Err(_) => return None,
                }
            }
            // Bursts (many runs queued at once) make one refresh.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let n = *rx.borrow_and_update();
            // Not empty: a browser drops an event whose data is empty.
            Some((
                Ok::<_, std::convert::Infallible>(
                    SseEvent::default().event("changed").data(n.to_string()),
                ),
                (rx, s, headers),
            ))
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn load_run(
    s: &WebState,
    id: &str,
    v: &Viewer,
) -> Result<crate::server::model::RunRecord, Refusal> {
    let db = s.queue.db().clone();
    let id2 = id.to_string();
    blocking(move || db.run(&id2))
        .await?
        .map_err(internal)?
        .ok_or_else(|| {
            Refusal::Status(
                StatusCode::NOT_FOUND,
                format!("There is no run {id}."),
                Some(v.chrome()),
            )
        })
}

async fn run_page(
    State(s): St,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/runs/{id}")).await?;
    need_tasks(&v, false)?;
    let run = load_run(&s, &id, &v).await?;
    let live = s.queue.live(&id).map(|l| l.steps());
    let steps = view::steps_of(&run, live);
    let log = s.queue.read_log(&id, 0, LOG_HEAD, false).await;
    let db = s.queue.db().clone();
    let task = run.task.clone();
    let stored_task = blocking(move || db.task(&task))
        .await?
        .map_err(internal)?
        .is_some();
    let page = pages::RunPage {
        log_bytes: log.len() as u64,
        log: String::from_utf8_lossy(&log).into_owned(),
        run,
        steps,
        can_write: v.grants.tasks() == Some(true),
        stored_task,
    };
    Ok(html(pages::run(&v.chrome(), &page, chrono::Utc::now())))
}

/// The graph alone (the run page fetches it when the steps first become known).
async fn run_graph(
    State(s): St,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/runs/{id}")).await?;
    need_tasks(&v, false)?;
    let run = load_run(&s, &id, &v).await?;
    let steps = view::steps_of(&run, s.queue.live(&id).map(|l| l.steps()));
    Ok(html(maud::html! {
        (pages::graph(&view::layout(&steps)))
        (pages::timeline(&steps))
    }))
}

/// Up to `max` bytes of a log from `offset`, cut at the last whole line.
#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    offset: u64,
}

/// Server-sent events of one run: `log` (new whole lines, from `offset`), `steps` (the
/// steps' states as JSON), `status` (the run's), and `end` once the run has finished and
/// its log is all sent. Wakes on the run's own changes, not on a timer.
async fn run_events(
    State(s): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/runs/{id}")).await?;
    need_tasks(&v, false)?;
    load_run(&s, &id, &v).await?;
    struct Follow {
        s: Arc<WebState>,
        headers: HeaderMap,
        checked: std::time::Instant,
        id: String,
        offset: u64,
        last_steps: String,
        last_status: String,
        pending: std::collections::VecDeque<SseEvent>,
        done: bool,
    }
    let start = Follow {
        s: s.clone(),
        headers,
        checked: std::time::Instant::now(),
        id,
        offset: q.offset,
        last_steps: String::new(),
        last_status: String::new(),
        pending: Default::default(),
        done: false,
    };
    let stream = futures_util::stream::unfold(start, |mut f| async move {
        loop {
            if let Some(e) = f.pending.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(e), f));
            }
            if f.done {
                return None;
            }
            // A signed-out session or a withdrawn grant ends the stream too.
            if f.checked.elapsed() >= RECHECK {
                if !still_allowed(&f.s, &f.headers).await {
                    return None;
                }
                f.checked = std::time::Instant::now();
            }
            // Watch before reading, so a change between the read and the wait still wakes.
            let live = f.s.queue.live(&f.id);
            let mut changes = f.s.queue.watch_changes();
            let mut live_rx = live.as_ref().map(|l| l.watch());
            if let Some(rx) = live_rx.as_mut() {
                rx.borrow_and_update();
            }
            changes.borrow_and_update();
            let run = {
                let db = f.s.queue.db().clone();
                let id = f.id.clone();
                match tokio::task::spawn_blocking(move || db.run(&id)).await {
                    Ok(Ok(Some(r))) => r,
                    _ => return None,
                }
            };
            let chunk =
                f.s.queue
                    .read_log(&f.id, f.offset, 256 * 1024, run.is_finished())
                    .await;
            if !chunk.is_empty() {
                f.offset += chunk.len() as u64;
                let text = String::from_utf8_lossy(&chunk);
                let data = text.strip_suffix('\n').unwrap_or(&text).to_string();
                f.pending.push_back(
                    SseEvent::default()
                        .event("log")
                        .id(f.offset.to_string())
                        .data(data),
                );
                continue;
            }
            let steps = view::steps_of(&run, live.as_ref().map(|l| l.steps()));
            let steps_json = serde_json::to_string(&steps).unwrap_or_default();
            if steps_json != f.last_steps {
                f.pending
                    .push_back(SseEvent::default().event("steps").data(steps_json.clone()));
                f.last_steps = steps_json;
            }
            // The duration only once it is final (the page shows a running one's steps).
            let status = serde_json::json!({
                "status": run.status.as_str(),
                "duration": run
                    .is_finished()
                    .then(|| view::run_duration(&run, chrono::Utc::now()).map(view::duration_text))
                    .flatten(),
            })
            .to_string();
            if status != f.last_status {
                f.pending
                    .push_back(SseEvent::default().event("status").data(status.clone()));
                f.last_status = status;
            }
            // Finished and no live state left: what is on disk is all of it.
            if run.is_finished() && live.is_none() {
                f.pending
                    .push_back(SseEvent::default().event("end").data("end"));
                f.done = true;
                continue;
            }
            if !f.pending.is_empty() {
                continue;
            }
            let wait = async {
                match live_rx.as_mut() {
                    Some(rx) => {
                        let _ = rx.changed().await;
                    }
                    None => {
                        let _ = changes.changed().await;
                    }
                }
            };
            // The timeout refreshes a running step's duration now and then.
            let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn cancel(
    State(s): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/runs/{id}")).await?;
    need_tasks(&v, true)?;
    check_form(&v, &headers, &f.csrf)?;
    let q = s.queue.clone();
    let id2 = id.clone();
    blocking(move || q.cancel(&id2)).await?.map_err(internal)?;
    tracing::info!(run = %id, user = %v.user, "run canceled from the web page");
    Ok(Redirect::to(&format!("/ui/runs/{id}")).into_response())
}

async fn rerun(
    State(s): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/runs/{id}")).await?;
    need_tasks(&v, true)?;
    check_form(&v, &headers, &f.csrf)?;
    let run = load_run(&s, &id, &v).await?;
    let q = s.queue.clone();
    let chrome = v.chrome();
    let rec = blocking(move || {
        let quick = q.db().quick_spec(&run.id)?;
        let (trigger, quick) = match quick {
            Some(spec) => (Trigger::Quick, Some(spec)),
            None if q.db().task(&run.task)?.is_some() => (Trigger::Manual, None),
            None => return Ok(None),
        };
        q.enqueue_with(
            NewRun {
                task: run.task.clone(),
                trigger,
                commit: None,
                branch: run.branch.clone(),
            },
            quick.as_ref(),
        )
        .map(Some)
    })
    .await?
    .map_err(internal)?;
    match rec {
        Some(r) => Ok(Redirect::to(&format!("/ui/runs/{}", r.id)).into_response()),
        None => Err(Refusal::Status(
            StatusCode::CONFLICT,
            "The task of this run no longer exists.".into(),
            Some(chrome),
        )),
    }
}

// ---- tasks

async fn tasks_page(State(s): St, headers: HeaderMap) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, "/ui/tasks").await?;
    need_tasks(&v, false)?;
    let db = s.queue.db().clone();
    let list = blocking(move || {
        let mut out = Vec::new();
        for t in db.tasks()? {
            let last = db
                .runs_page(&RunFilter {
                    task: Some(t.name.clone()),
                    limit: 1,
                    ..Default::default()
                })?
                .pop();
            out.push((crate::server::api::redacted(t), last));
        }
        Ok::<_, crate::server::db::DbError>(out)
    })
    .await?
    .map_err(internal)?;
    Ok(html(pages::tasks(&v.chrome(), &list)))
}

async fn pools_page(State(s): St, headers: HeaderMap) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, "/ui/pools").await?;
    need_tasks(&v, false)?;
    let (db, within) = (s.queue.db().clone(), s.agent_online_within);
    let pools = blocking(move || {
        let mut out = Vec::new();
        for p in db.pools()? {
            out.push(crate::server::agents::pool_view(db.as_ref(), p, within)?);
        }
        Ok::<_, crate::server::db::DbError>(out)
    })
    .await?
    .map_err(internal)?;
    Ok(html(pages::pools(&v.chrome(), &pools)))
}

async fn task_page(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/tasks/{name}")).await?;
    need_tasks(&v, false)?;
    let db = s.queue.db().clone();
    let n = name.clone();
    let found = blocking(move || {
        let Some(spec) = db.task(&n)? else {
            return Ok(None);
        };
        let bases = db
            .base_images()?
            .into_iter()
            .filter(|(t, _, _)| *t == n)
            .map(|(_, b, d)| (b, d))
            .collect();
        let outputs = db.outputs(&n)?;
        let runs = db.runs_page(&RunFilter {
            task: Some(n.clone()),
            limit: 20,
            ..Default::default()
        })?;
        Ok::<_, crate::server::db::DbError>(Some((spec, bases, outputs, runs)))
    })
    .await?
    .map_err(internal)?;
    let Some((spec, bases, outputs, runs)) = found else {
        return Err(Refusal::Status(
            StatusCode::NOT_FOUND,
            format!("There is no task {name}."),
            Some(v.chrome()),
        ));
    };
    let page = pages::TaskPage {
        spec: crate::server::api::redacted(spec),
        bases,
        outputs,
        runs,
        can_write: v.grants.tasks() == Some(true),
    };
    Ok(html(pages::task(&v.chrome(), &page, chrono::Utc::now())))
}

async fn run_now(
    State(s): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/tasks/{name}")).await?;
    need_tasks(&v, true)?;
    check_form(&v, &headers, &f.csrf)?;
    let q = s.queue.clone();
    let n = name.clone();
    let rec = blocking(move || {
        let Some(spec) = q.db().task(&n)? else {
            return Ok(None);
        };
        q.enqueue(NewRun {
            task: n,
            trigger: Trigger::Manual,
            commit: None,
            branch: spec.branch.clone(),
        })
        .map(Some)
    })
    .await?
    .map_err(internal)?;
    match rec {
        Some(r) => {
            tracing::info!(run = %r.id, task = %name, user = %v.user, "run started from the web page");
            Ok(Redirect::to(&format!("/ui/runs/{}", r.id)).into_response())
        }
        None => Err(Refusal::Status(
            StatusCode::NOT_FOUND,
            format!("There is no task {name}."),
            Some(v.chrome()),
        )),
    }
}

// ---- registry

#[derive(Deserialize)]
struct ReposQuery {
    last: Option<String>,
}

async fn registry_page(
    State(s): St,
    headers: HeaderMap,
    Query(q): Query<ReposQuery>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, "/ui/registry").await?;
    if !v.may_see_registry() {
        return Err(Refusal::Status(
            StatusCode::FORBIDDEN,
            format!("{} may not see the registry's repositories.", v.user),
            Some(v.chrome()),
        ));
    }
    let store = s.registry.store().clone();
    let grants = v.grants.clone();
    let (repos, next, props, used) = blocking(move || {
        let mut repos = Vec::new();
        let mut last = q.last.clone();
        let mut next = None;
        // Pages of names, filtered by what this identity may read, until a page is full.
        'outer: loop {
            let names = store.list_repositories(Some(REPO_PAGE), last.as_deref())?;
            let full = names.len() == REPO_PAGE;
            for n in names {
                last = Some(n.clone());
                let a = grants.repo_actions(&n);
                if !(a.contains(&"pull") || a.contains(&"metadata_read")) {
                    continue;
                }
                let tags = store.list_tags(&n, None, None)?.map_or(0, |t| t.len());
                repos.push(pages::RepoLine { name: n, tags });
                if repos.len() == REPO_PAGE {
                    next = last.clone();
                    break 'outer;
                }
            }
            if !full {
                break;
            }
        }
        let props = store.properties()?;
        let used = store.storage_used()?;
        Ok::<_, crate::store::StoreError>((repos, next, props, used))
    })
    .await?
    .map_err(internal)?;
    // The replicas and how far behind each is: the admin's, as `replication list` is.
    let replicas = match &s.replication {
        Some(r) if s.open || v.user == crate::auth::ADMIN_USER => {
            // The repositories still show when the group's own store cannot be read.
            r.list().await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "web page: the replications");
                Vec::new()
            })
        }
        _ => Vec::new(),
    };
    let page = pages::RegistryPage {
        tier: props.sku.to_string(),
        used,
        included: props.limits().storage_bytes,
        repos,
        next,
        replicas,
    };
    Ok(html(pages::registry(&v.chrome(), &page)))
}

#[derive(Deserialize)]
struct DeleteQuery {
    tag: Option<String>,
}

/// `/ui/registry/{repo}` (a repository), `/ui/registry/{repo}/_delete?tag=` (the
/// confirmation of a tag's delete).
async fn repo_page(
    State(s): St,
    headers: HeaderMap,
    Path(path): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/registry/{path}")).await?;
    let (repo, confirm) = match path.strip_suffix("/_delete") {
        Some(r) => (r.to_string(), true),
        None => (path.clone(), false),
    };
    let missing = || {
        Refusal::Status(
            StatusCode::NOT_FOUND,
            format!("There is no repository {repo} you may see."),
            Some(v.chrome()),
        )
    };
    if !crate::names::valid_name(&repo) || !v.may_read_repo(&repo) {
        return Err(missing());
    }
    let can_delete = v.grants.repo_actions(&repo).contains(&"delete");
    let store = s.registry.store().clone();
    let r = repo.clone();
    let data = blocking(move || {
        let Some(view) = store.repo_view(&r)? else {
            return Ok(None);
        };
        let list = store.list_manifests(&r)?.unwrap_or_default();
        let mut manifests = Vec::new();
        for m in list {
            let facts =
                match store.get_manifest(&r, &crate::store::Reference::Digest(m.digest.clone()))? {
                    Some(row) => view::image_facts(&row.content),
                    None => Default::default(),
                };
            let referrers = list_referrers(&view, &m.digest, &store, &r)?;
            manifests.push(pages::ManifestLine {
                kind: view::manifest_kind(m.artifact_type.as_deref(), &m.media_type),
                size: facts.size,
                platforms: facts.platforms,
                created: crate::timefmt::rfc3339(m.created),
                tags: m.tags.clone(),
                referrers,
                digest: m.digest,
            });
        }
        manifests.sort_by(|a, b| b.created.cmp(&a.created));
        let mut tags: Vec<pages::TagLine> = view
            .tags
            .iter()
            .map(|t| pages::TagLine {
                tag: t.tag.clone(),
                digest: t.digest.clone(),
                updated: crate::timefmt::rfc3339(t.updated),
            })
            .collect();
        tags.sort_by(|a, b| a.tag.cmp(&b.tag));
        Ok::<_, crate::store::StoreError>(Some((tags, manifests)))
    })
    .await?
    .map_err(internal)?;
    let Some((tags, manifests)) = data else {
        return Err(missing());
    };
    if confirm {
        let tag = q.tag.unwrap_or_default();
        let Some(t) = tags.iter().find(|t| t.tag == tag) else {
            return Err(Refusal::Status(
                StatusCode::NOT_FOUND,
                format!("{repo} has no tag {tag}."),
                Some(v.chrome()),
            ));
        };
        if !can_delete {
            return Err(Refusal::Status(
                StatusCode::FORBIDDEN,
                format!(
                    "{} may not delete in {repo} (needs content/delete).",
                    v.user
                ),
                Some(v.chrome()),
            ));
        }
        return Ok(html(pages::confirm_delete(
            &v.chrome(),
            &repo,
            &tag,
            &t.digest,
        )));
    }
    let page = pages::RepoPage {
        repo,
        host: s.host.clone(),
        tags,
        manifests,
        can_delete,
    };
    Ok(html(pages::repo(&v.chrome(), &page)))
}

fn list_referrers(
    view: &crate::store::RepoView,
    digest: &str,
    store: &crate::store::Store,
    repo: &str,
) -> Result<Vec<(String, String)>, crate::store::StoreError> {
    if !view
        .manifests
        .iter()
        .any(|m| m.subject.as_deref() == Some(digest))
    {
        return Ok(Vec::new());
    }
    Ok(store
        .referrers(repo, digest)?
        .into_iter()
        .map(|m| {
            let kind = view::manifest_kind(m.artifact_type.as_deref(), &m.media_type);
            (m.digest, kind)
        })
        .collect())
}

#[derive(Deserialize)]
struct DeleteForm {
    #[serde(default)]
    csrf: String,
    tag: String,
    digest: String,
}

/// `POST /ui/registry/{repo}/_delete`: deletes the tag while it still names the digest
/// the confirmation showed (through the registry's service, with its event).
async fn delete_tag(
    State(s): St,
    headers: HeaderMap,
    Path(path): Path<String>,
    Form(f): Form<DeleteForm>,
) -> Result<Response, Refusal> {
    let v = viewer(&s, &headers, &format!("/ui/registry/{path}")).await?;
    check_form(&v, &headers, &f.csrf)?;
    let Some(repo) = path.strip_suffix("/_delete").map(str::to_string) else {
        return Err(Refusal::Status(
            StatusCode::METHOD_NOT_ALLOWED,
            "Nothing to post here.".into(),
            Some(v.chrome()),
        ));
    };
    if !crate::names::valid_name(&repo) || !v.grants.repo_actions(&repo).contains(&"delete") {
        return Err(Refusal::Status(
            StatusCode::FORBIDDEN,
            format!(
                "{} may not delete in {repo} (needs content/delete).",
                v.user
            ),
            Some(v.chrome()),
        ));
    }
    let store = s.registry.store().clone();
    let ctx = crate::registry::RequestContext::of_tool(
        "DELETE",
        "acr-task-web",
        v.user.clone(),
        s.host.clone(),
    );
    let (r, pair) = (repo.clone(), vec![(f.tag.clone(), f.digest.clone())]);
    let (done, events) =
        blocking(move || crate::registry::service::delete_tags_if(&store, &r, &pair, &ctx))
            .await?
            .map_err(|e| Refusal::Status(StatusCode::CONFLICT, e.to_string(), Some(v.chrome())))?;
    s.registry.announce(events);
    if done.is_empty() {
        return Err(Refusal::Status(
            StatusCode::CONFLICT,
            format!(
                "{repo}:{} was pushed again (or deleted) since you looked; it was kept.",
                f.tag
            ),
            Some(v.chrome()),
        ));
    }
    tracing::info!(repo = %repo, tag = %f.tag, user = %v.user, "tag deleted from the web page");
    Ok(Redirect::to(&format!("/ui/registry/{repo}")).into_response())
}

// ---- assets

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("assets/app.js"),
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("assets/app.css"),
    )
        .into_response()
}
