//! Running one run of a stored task: its context (local directory or git at a commit),
//! secrets and logins, loading the task file under the policy, executing it on Docker and
//! recording its log. The setup `acr-task run` shares is in [`crate::setup`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::db::ServerStore;
use super::model::{RunRecord, TaskSpec, DEFAULT_FILE};
use crate::exec::{self, Event, RunConfig, RunReport, Status};
use crate::plan::Plan;
use crate::policy::{Policed, Policy};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::Runtime;
use crate::setup::run_info;
use crate::task::{self, Diagnostics, LoadOptions, RunInfo, Values};

/// A stored task's secret references resolved on the server, when a run starts:
/// `env:VAR` (the server's environment) or `file:/path` (a file's content, trailing
/// newline trimmed). Values never reach the database, and runs mask them in logs.
/// The policy decides which variables and files may be read, and how large a file may be.
pub fn resolve_secrets(
    refs: &BTreeMap<String, String>,
    policy: &Policy,
) -> Result<BTreeMap<String, String>, String> {
    check_secret_refs(refs, policy)?;
    let mut out = BTreeMap::new();
    for (name, reference) in refs {
        let value = if let Some(var) = reference.strip_prefix("env:") {
            std::env::var(var).map_err(|_| {
                format!("secret {name}: environment variable {var} is not set on the server")
            })?
        } else if let Some(path) = reference.strip_prefix("file:") {
            policy
                .read_secret_file(path)
                .map_err(|e| format!("secret {name}: {e}"))?
                .trim_end_matches(['\n', '\r'])
                .to_string()
        } else {
            return Err(format!(
                "secret {name}: reference {reference:?} must be env:VAR or file:/path"
            ));
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// Checks secret references against the policy without reading them (when a task is
/// stored).
pub fn check_secret_refs(refs: &BTreeMap<String, String>, policy: &Policy) -> Result<(), String> {
    for (name, reference) in refs {
        if let Some(var) = reference.strip_prefix("env:") {
            policy
                .secret_env_allowed(var)
                .map_err(|e| format!("secret {name}: {e}"))?;
        } else if let Some(path) = reference.strip_prefix("file:") {
            policy
                .secret_file_allowed(path)
                .map_err(|e| format!("secret {name}: {e}"))?;
        } else {
            return Err(format!(
                "secret {name}: reference {reference:?} must be env:VAR or file:/path"
            ));
        }
    }
    Ok(())
}

/// The secret references of a task's registry credentials, named for messages.
fn credential_refs(spec: &TaskSpec) -> BTreeMap<String, String> {
    let mut refs = BTreeMap::new();
    for (server, c) in &spec.credentials {
        refs.insert(
            format!("password of credential {server}"),
            c.password.clone(),
        );
        if is_secret_ref(&c.username) {
            refs.insert(
                format!("username of credential {server}"),
                c.username.clone(),
            );
        }
    }
    refs
}

fn is_secret_ref(s: &str) -> bool {
    s.starts_with("env:") || s.starts_with("file:")
}

/// Checks a task's registry credentials when it is stored: a login server that is a
/// registry host, a user name, and a password that is a secret reference the policy allows.
pub fn check_credentials(spec: &TaskSpec, policy: &Policy) -> Result<(), String> {
    for (server, c) in &spec.credentials {
        let host_ok = !server.is_empty()
            && !server.contains(['/', ' ', '@'])
            && crate::registry::reference::ImageRef::parse(&format!("{server}/x"))
                .is_some_and(|r| r.registry == *server);
        if !host_ok {
            return Err(format!(
                "credential {server:?}: the login server must be a registry host such as \
                 myregistry.example.com or 127.0.0.1:5000 (with a '.' or a port)"
            ));
        }
        if c.username.is_empty() {
            return Err(format!("credential {server}: give a user name"));
        }
        if !is_secret_ref(&c.password) {
            return Err(format!(
                "credential {server}: the password must be a secret reference, env:VAR or \
                 file:/path, resolved on the server when a run starts (never stored)"
            ));
        }
    }
    check_secret_refs(&credential_refs(spec), policy)
}

/// The logins a stored task's runs use for other registries, resolved now.
pub fn resolve_credentials(
    spec: &TaskSpec,
    policy: &Policy,
) -> Result<BTreeMap<String, crate::credentials::Credential>, String> {
    check_credentials(spec, policy)?;
    let values = resolve_secrets(&credential_refs(spec), policy)?;
    let mut out = BTreeMap::new();
    for (server, c) in &spec.credentials {
        let username = values
            .get(&format!("username of credential {server}"))
            .cloned()
            .unwrap_or_else(|| c.username.clone());
        let password = values
            .get(&format!("password of credential {server}"))
            .cloned()
            .unwrap_or_default();
        out.insert(
            server.clone(),
            crate::credentials::Credential { username, password },
        );
    }
    Ok(out)
}

/// What a run may do in its own registry: pull anything (a task may build `FROM` or run
/// any image there, as in ACR), and push (with metadata and, for `acr` steps, deletes) only
/// to the repositories the task pushes or tags in it; a task with an `acr purge` step may
/// delete anywhere in it (its filters are regular expressions over every repository).
pub fn run_grants(task: &task::Task, registry: &str) -> crate::auth::Grants {
    use crate::auth::Permission;
    let mut repos = std::collections::BTreeSet::new();
    let mut acr_steps = false;
    let mut acr_purge = false;
    for step in &task.steps {
        let images: Vec<String> = match step.kind() {
            Some(task::StepKind::Push(images)) => images.to_vec(),
            Some(task::StepKind::Build(b)) => {
                let mut tags = task::args::parse_build(b)
                    .map(|b| b.tags)
                    .unwrap_or_default();
                // `cache: enabled` pushes the step's cache image too (any task name: the
                // repository is what is granted).
                if step
                    .cache
                    .as_deref()
                    .is_some_and(|c| c.eq_ignore_ascii_case("enabled"))
                {
                    tags.extend(exec::cache_ref(&tags, Some(registry), "t", &step.id));
                }
                tags
            }
            Some(task::StepKind::Cmd(c)) => {
                if let Ok(l) = task::args::parse_cmd_line(c) {
                    if crate::runtime::runner::is_acr_image(&l.image) {
                        acr_steps = true;
                        // `acr purge` goes over the whole registry, as in ACR.
                        acr_purge |= l.args.iter().any(|a| a == "purge");
                    }
                }
                Vec::new()
            }
            None => Vec::new(),
        };
        for image in images {
            if let Some(r) = crate::registry::reference::ImageRef::parse(&image) {
                if r.registry == registry {
                    repos.insert(r.repository);
                }
            }
        }
    }
    let mut everywhere = vec![Permission::ContentRead, Permission::MetadataRead];
    if acr_purge {
        everywhere.push(Permission::ContentDelete);
    }
    let mut rules = vec![("*".to_string(), everywhere)];
    for repo in repos {
        let mut p = vec![
            Permission::ContentRead,
            Permission::ContentWrite,
            Permission::MetadataRead,
            Permission::MetadataWrite,
        ];
        if acr_steps {
            p.push(Permission::ContentDelete);
        }
        rules.push((repo, p));
    }
    crate::auth::Grants::Rules(rules)
}

/// Largest task file or values text a stored task may have.
pub const MAX_TASK_FILE_BYTES: usize = 1024 * 1024;

/// The values of a stored task: its values text, then its `set` overrides.
pub fn task_values(spec: &TaskSpec) -> Result<Values, Diagnostics> {
    let mut vals = match &spec.values {
        Some(text) => Values::from_yaml_str("values", text)?,
        None => Values::default(),
    };
    for s in &spec.set {
        vals.set(s)
            .map_err(|m| Diagnostics(vec![task::Diagnostic::new("set", 0, 0, m)]))?;
    }
    Ok(vals)
}

/// The task file's name (for diagnostics) and text: inline, or read from the context. The
/// file must be inside the context (no `..`, no link out of it) and at most
/// [`MAX_TASK_FILE_BYTES`].
pub fn task_text(spec: &TaskSpec, context: &Path) -> Result<(String, String), Diagnostics> {
    let rel = spec.file.as_deref().unwrap_or(DEFAULT_FILE);
    let one = |m: String| Diagnostics(vec![task::Diagnostic::new(rel, 0, 0, m)]);
    if let Some(t) = &spec.task_yaml {
        if t.len() > MAX_TASK_FILE_BYTES {
            return Err(one(format!(
                "the task file is larger than {MAX_TASK_FILE_BYTES} bytes"
            )));
        }
        return Ok(("task.yaml".into(), t.clone()));
    }
    let path = context.join(rel);
    let inside = match (std::fs::canonicalize(&path), std::fs::canonicalize(context)) {
        (Ok(p), Ok(c)) => p.starts_with(c),
        (Err(e), _) | (_, Err(e)) => {
            return Err(one(format!(
                "cannot read task file {rel} in the context: {e}"
            )))
        }
    };
    if !inside {
        return Err(one(format!(
            "task file {rel} is outside the context; name a file inside it"
        )));
    }
    let bytes = std::fs::read(&path)
        .map_err(|e| one(format!("cannot read task file {rel} in the context: {e}")))?;
    if bytes.len() > MAX_TASK_FILE_BYTES {
        return Err(one(format!(
            "task file {rel} is larger than {MAX_TASK_FILE_BYTES} bytes"
        )));
    }
    let text = task::text_of(&path.display().to_string(), bytes)?;
    Ok((path.display().to_string(), text))
}

/// Loads and plans a stored task's file for `info`, under `policy`: alias files only from
/// the context (or public URLs), and what the policy refuses reported at its place in the
/// file. With `secrets` (a run), they are rendered in and all declared ones must have a
/// value; without (checking a definition), declared ones render as placeholders.
pub fn load_task(
    spec: &TaskSpec,
    context: &Path,
    info: &RunInfo,
    policy: &Policy,
    secrets: Option<&BTreeMap<String, String>>,
) -> Result<(task::Loaded, Plan), Diagnostics> {
    let vals = task_values(spec)?;
    let (name, text) = task_text(spec, context)?;
    let options = LoadOptions {
        alias_dir: Some(context.to_path_buf()),
        files_root: Some(context.to_path_buf()),
        remote_alias: task::RemoteAlias::PublicOnly,
        secrets: secrets.cloned().unwrap_or_default(),
        secrets_required: secrets.is_some(),
        ..LoadOptions::default()
    };
    let loaded = task::load_str_checked(&name, &text, info, &vals, &options, &|t| {
        crate::policy::check_task(policy, t)
    })?;
    let plan = Plan::new(&loaded.task)
        .map_err(|e| Diagnostics(vec![task::Diagnostic::new(&name, 0, 0, e.to_string())]))?;
    Ok((loaded, plan))
}

/// Checks a task definition the way a run would load it (with placeholder run values)
/// and against the policy; a git context is cloned at the task's branch to read its file.
/// Returns the file's warnings.
pub fn validate_spec(
    spec: &TaskSpec,
    policy: &Policy,
) -> Result<Vec<task::Diagnostic>, Diagnostics> {
    let one = |m: String| Diagnostics(vec![task::Diagnostic::new("task", 0, 0, m)]);
    check_spec_paths(spec, policy).map_err(one)?;
    let scratch = tempfile::tempdir().map_err(|e| one(format!("temp dir: {e}")))?;
    let context = if spec.task_yaml.is_some() && spec.context.is_empty() {
        scratch.path().to_path_buf()
    } else if spec.is_git() {
        let dest = scratch.path().join("context");
        crate::source::fetch_git(&spec.context, spec.branch(), &dest)
            .map_err(|e| one(e.to_string()))?;
        dest
    } else {
        PathBuf::from(&spec.context)
    };
    let mut info = RunInfo::placeholder(Path::new("acb.yaml"));
    info.task_name = spec.name.clone();
    if let Some(p) = &spec.target_platform() {
        info.set_platform(p);
    }
    load_task(spec, &context, &info, policy, None).map(|(l, _)| l.warnings)
}

/// What a definition names on the server's disk, against the policy: the local context
/// (or `file://` git URL) and secret references.
pub fn check_spec_paths(spec: &TaskSpec, policy: &Policy) -> Result<(), String> {
    check_context(spec, policy)?;
    check_secret_refs(&spec.secrets, policy)?;
    check_signing_key(spec, policy)?;
    check_credentials(spec, policy)
}

/// The local context (or `file://` git URL) against the policy.
fn check_context(spec: &TaskSpec, policy: &Policy) -> Result<(), String> {
    if spec.context.is_empty() {
        return Ok(());
    }
    if spec.is_git() {
        policy
            .context_url(&spec.context)
            .map_err(|e| e.to_string())?;
    } else {
        policy
            .context_dir(Path::new(&spec.context))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The signing key's reference, as one secret named `signing-key`.
fn signing_key_ref(spec: &TaskSpec) -> BTreeMap<String, String> {
    spec.signing_key
        .iter()
        .map(|r| ("signing-key".to_string(), r.clone()))
        .collect()
}

fn check_signing_key(spec: &TaskSpec, policy: &Policy) -> Result<(), String> {
    if let Some(r) = &spec.signing_key {
        if !is_secret_ref(r) {
            return Err(
                "the signing key must be a secret reference, env:VAR or file:/path, resolved \
                 on the server when a run starts (never stored)"
                    .into(),
            );
        }
    }
    check_secret_refs(&signing_key_ref(spec), policy)
}

/// Where a run's log lines and step changes go: the server's log file and live state,
/// or, on an agent, the server over HTTP.
pub trait RunSink: Send + Sync {
    fn line(&self, who: &str, text: &str);
    /// The run's steps once its file is loaded: (id, kind, the ids it waits for).
    fn steps(&self, _steps: Vec<(String, String, Vec<String>)>) {}
    fn step_started(&self, _step: usize, _attempt: u32) {}
    fn step_finished(&self, _step: usize, _report: &crate::exec::StepReport) {}
}

/// One line of a run's log as it is stored: who wrote it, then the text.
pub fn log_line(who: &str, text: &str) -> String {
    format!("{who} | {text}\n")
}

/// A run's log as it is written: lines go to the server's store ([`ServerStore::append_log`])
/// in order, by a writer task that appends what has gathered since its last append (a
/// chatty step costs one store call per batch, not per line); each append wakes the run's
/// live state. [`RunLog::close`] waits until every line is stored.
pub struct RunLog {
    tx: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    live: Arc<super::live::LiveRun>,
}

/// The most one append carries.
const LOG_BATCH: usize = 1 << 20;

impl RunLog {
    /// Appends to `run`'s log in `db` (a writer on the current runtime), waking `live`'s
    /// watchers as lines are stored. Lines sent before a drop are still written.
    pub fn new(db: Arc<dyn ServerStore>, run: &str, live: Arc<super::live::LiveRun>) -> RunLog {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let (run, woken) = (run.to_string(), live.clone());
        let writer = tokio::spawn(async move {
            while let Some(mut batch) = rx.recv().await {
                while batch.len() < LOG_BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                let (db, id) = (db.clone(), run.clone());
                match tokio::task::spawn_blocking(move || db.append_log(&id, &batch)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(run = %run, error = %e, "writing a run log"),
                    Err(e) => tracing::warn!(run = %run, error = %e, "writing a run log"),
                }
                woken.touch();
            }
        });
        RunLog {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            live,
        }
    }

    /// Takes no more lines and waits until those written are stored.
    pub async fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.await;
        }
    }
}

impl RunSink for RunLog {
    fn line(&self, who: &str, text: &str) {
        if let Ok(tx) = self.tx.lock() {
            if let Some(tx) = tx.as_ref() {
                let _ = tx.send(log_line(who, text).into_bytes());
            }
        }
    }

    fn steps(&self, steps: Vec<(String, String, Vec<String>)>) {
        self.live.set_steps(steps);
    }

    fn step_started(&self, step: usize, attempt: u32) {
        self.live.step_started(step, attempt);
    }

    fn step_finished(&self, step: usize, report: &crate::exec::StepReport) {
        self.live.step_finished(step, report);
    }
}

/// One run handed to an executor.
pub struct Job {
    pub run: RunRecord,
    pub spec: TaskSpec,
    /// `HOST:PORT` of the integrated registry.
    pub registry: String,
    pub log: Arc<dyn RunSink>,
    pub cancel: CancellationToken,
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub status: Status,
    pub error: Option<String>,
    pub commit: Option<String>,
    pub report: Option<RunReport>,
}

impl Outcome {
    pub fn failed(error: String) -> Outcome {
        Outcome {
            status: Status::Failed,
            error: Some(error),
            commit: None,
            report: None,
        }
    }
}

/// What runs queued runs: Docker in the server, a fake in queue-order tests.
pub trait Executor: Send + Sync + 'static {
    fn run(&self, job: Job) -> BoxFuture<'static, Outcome>;
    /// Removes whatever a run that was cut off by a crash left in the engine.
    fn cleanup(&self, run_id: &str) -> BoxFuture<'static, ()>;
}

/// What a run gets that its definition only names: secret values, logins for other
/// registries and the signing key. Resolved on the server (its environment and files,
/// under its policy) when the run starts, and sent to the agent that takes it.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provisions {
    pub secrets: BTreeMap<String, String>,
    /// Login server → (user name, password).
    pub logins: BTreeMap<String, (String, String)>,
    /// The signing key's PEM text.
    pub signing_key: Option<String>,
}

impl Provisions {
    /// Resolves a stored task's references now, under `policy`.
    pub fn resolve(spec: &TaskSpec, policy: &Policy) -> Result<Provisions, String> {
        check_spec_paths(spec, policy)?;
        let secrets = resolve_secrets(&spec.secrets, policy)?;
        let logins = resolve_credentials(spec, policy)?
            .into_iter()
            .map(|(server, c)| (server, (c.username, c.password)))
            .collect();
        check_signing_key(spec, policy)?;
        let signing_key = resolve_secrets(&signing_key_ref(spec), policy)?.remove("signing-key");
        Ok(Provisions {
            secrets,
            logins,
            signing_key,
        })
    }
}

/// The run's own login to its registry, scoped to what its task pushes (see
/// [`run_grants`]): made by the server's gate beside it, asked of the server on an agent.
pub trait RunLogin: Send + Sync {
    /// A login for `run` with `grants` for `ttl`; none when the registry checks no
    /// credentials.
    fn start(
        &self,
        run: &str,
        grants: crate::auth::Grants,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Option<crate::credentials::Credential>, String>>;
    /// Ends the login (the run is over).
    fn end(&self, run: &str);
}

/// [`RunLogin`] by the server's own gate (none when the registry is open).
pub struct GateLogin(pub Option<Arc<crate::auth::Auth>>);

impl RunLogin for GateLogin {
    fn start(
        &self,
        run: &str,
        grants: crate::auth::Grants,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Option<crate::credentials::Credential>, String>> {
        let login = self.0.as_ref().map(|a| a.start_run(run, grants, ttl));
        Box::pin(async move { Ok(login) })
    }

    fn end(&self, run: &str) {
        if let Some(a) = &self.0 {
            a.end_run(run);
        }
    }
}

/// Where and how runs execute: the engine (through the policy), scratch space, and how a
/// run gets its registry login and content-trust answers. The server has one; so has
/// every agent.
pub struct RunEnv {
    pub rt: Option<Arc<Policed<DockerRuntime>>>,
    pub work_dir: PathBuf,
    pub max_parallel: usize,
    pub policy: Arc<Policy>,
    pub login: Arc<dyn RunLogin>,
    pub trust: Option<Arc<dyn crate::setup::TrustCheck>>,
}

impl RunEnv {
    /// Connects to the engine; without one, every run fails saying why.
    pub async fn connect(
        work_dir: PathBuf,
        max_parallel: usize,
        policy: Arc<Policy>,
        login: Arc<dyn RunLogin>,
        trust: Option<Arc<dyn crate::setup::TrustCheck>>,
    ) -> RunEnv {
        let rt = match DockerRuntime::connect().await {
            Ok(rt) => Some(Arc::new(Policed::new(Arc::new(rt), policy.clone()))),
            Err(e) => {
                tracing::error!(error = %e, "no Docker Engine: runs will fail");
                None
            }
        };
        RunEnv {
            rt,
            work_dir,
            max_parallel,
            policy,
            login,
            trust,
        }
    }

    /// Runs `job` with what was resolved for it (or fails saying why it could not be).
    pub async fn execute(
        self: Arc<Self>,
        job: Job,
        provisions: Result<Provisions, String>,
    ) -> Outcome {
        if self.rt.is_none() {
            return Outcome::failed("no Docker Engine is reachable".into());
        }
        // Every line logged for the run carries its id and task.
        let span = tracing::info_span!("run", run = %job.run.id, task = %job.run.task);
        if job.run.attempt > 1 {
            // An earlier attempt on this engine (an agent or a server replica that died)
            // may have left containers and networks of the same names behind.
            self.cleanup(&job.run.id).await;
        }
        use tracing::Instrument as _;
        run_on_docker(self, job, provisions).instrument(span).await
    }

    /// Removes whatever a run that was cut off left in the engine.
    pub async fn cleanup(&self, run_id: &str) {
        if let Some(rt) = &self.rt {
            if let Err(e) = rt.remove_run_resources(run_id).await {
                tracing::warn!(run = %run_id, error = %e, "removing an interrupted run's resources");
            }
        }
    }
}

/// Runs jobs on the Docker Engine beside the server, with the server's own secrets,
/// gate and store.
pub struct DockerExecutor(pub Arc<RunEnv>);

impl DockerExecutor {
    /// Connects to the engine; without one, every run fails saying why.
    pub async fn connect(
        work_dir: PathBuf,
        max_parallel: usize,
        policy: Arc<Policy>,
        auth: Option<Arc<crate::auth::Auth>>,
        store: Arc<crate::store::Store>,
    ) -> DockerExecutor {
        let trust: Arc<dyn crate::setup::TrustCheck> = Arc::new(crate::setup::StoreTrust(store));
        DockerExecutor(Arc::new(
            RunEnv::connect(
                work_dir,
                max_parallel,
                policy,
                Arc::new(GateLogin(auth)),
                Some(trust),
            )
            .await,
        ))
    }
}

impl Executor for DockerExecutor {
    fn run(&self, job: Job) -> BoxFuture<'static, Outcome> {
        let env = self.0.clone();
        Box::pin(async move {
            let provisions = Provisions::resolve(&job.spec, &env.policy);
            env.execute(job, provisions).await
        })
    }

    fn cleanup(&self, run_id: &str) -> BoxFuture<'static, ()> {
        let (env, id) = (self.0.clone(), run_id.to_string());
        Box::pin(async move { env.cleanup(&id).await })
    }
}

/// Prepares the context (blocking: git clone) and returns it with the commit built. The
/// policy is asked again: what was allowed when the task was stored may have moved.
fn prepare_context(
    spec: &TaskSpec,
    run: &RunRecord,
    scratch: &Path,
    policy: &Policy,
) -> Result<(PathBuf, Option<String>), String> {
    // Only the context: secret references were resolved (and checked) where the run's
    // provisions were made, which for an agent's run is the server.
    check_context(spec, policy)?;
    if spec.task_yaml.is_some() && spec.context.is_empty() {
        let dest = scratch.join("context");
        std::fs::create_dir_all(&dest).map_err(|e| format!("scratch dir: {e}"))?;
        return Ok((dest, None));
    }
    if spec.is_git() {
        let reference = run.commit.as_deref().unwrap_or(spec.branch());
        let dest = scratch.join("context");
        let commit = crate::source::fetch_git(&spec.context, reference, &dest)
            .map_err(|e| format!("fetching the context: {e}"))?
            .commit;
        Ok((dest, Some(commit)))
    } else {
        let dir = std::fs::canonicalize(&spec.context)
            .map_err(|e| format!("context {}: {e}", spec.context))?;
        if let Some(want) = &run.commit {
            // A commit trigger on a local checkout builds exactly that commit, not the
            // working tree as it is now.
            let dest = scratch.join("context");
            let commit = crate::source::fetch_git(&dir.display().to_string(), want, &dest)
                .map_err(|e| format!("checking out {want}: {e}"))?
                .commit;
            return Ok((dest, Some(commit)));
        }
        let commit = crate::source::git_head(&dir).map(|(c, _)| c);
        Ok((dir, commit))
    }
}

/// Ends a run's registry login however the run ends.
struct RunLoginGuard(Arc<dyn RunLogin>, String);

impl Drop for RunLoginGuard {
    fn drop(&mut self) {
        self.0.end(&self.1);
    }
}

async fn run_on_docker(
    env: Arc<RunEnv>,
    job: Job,
    provisions: Result<Provisions, String>,
) -> Outcome {
    let Some(rt) = env.rt.clone() else {
        return Outcome::failed("no Docker Engine is reachable".into());
    };
    let (work, max_parallel, policy) = (&env.work_dir, env.max_parallel, env.policy.clone());
    let Job {
        run,
        spec,
        registry,
        log,
        cancel,
    } = job;
    let provisions = match provisions {
        Ok(p) => p,
        Err(e) => {
            log.line("acr-task", &e);
            return Outcome::failed(e);
        }
    };
    if let Err(e) = std::fs::create_dir_all(work) {
        return Outcome::failed(format!("work dir {}: {e}", work.display()));
    }
    let scratch = match tempfile::tempdir_in(work) {
        Ok(s) => s,
        Err(e) => return Outcome::failed(format!("scratch dir: {e}")),
    };
    let scratch_path = scratch.path().to_path_buf();
    let (spec2, run2, policy2) = (spec.clone(), run.clone(), policy.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        prepare_context(&spec2, &run2, &scratch_path, &policy2)
    })
    .await;
    let (context, commit) = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            log.line("acr-task", &e);
            return Outcome::failed(e);
        }
        Err(e) => return Outcome::failed(format!("preparing the context: {e}")),
    };
    let mut cfg = RunConfig::for_run(&run.id, context.clone(), max_parallel);
    cfg.platform = spec.target_platform();
    // A stored task's name names its build cache; a quick run's is acb's `quickrun`.
    cfg.task_name =
        (!matches!(run.trigger, super::model::Trigger::Quick)).then(|| spec.name.clone());
    cfg.registry = Some(registry.to_string());
    let key = match &provisions.signing_key {
        None => None,
        Some(pem) => match crate::signature::SigningKey::from_pem("signing key", pem.as_bytes()) {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                let e = e.to_string();
                log.line("acr-task", &e);
                return Outcome::failed(e);
            }
        },
    };
    cfg.trust = Some(Arc::new(crate::setup::RunTrust {
        registry: registry.to_string(),
        check: env.trust.clone(),
        key,
    }));
    cfg.secrets = provisions.secrets;
    // The server's own `docker login`s are not lent to tasks: a task names its logins.
    let mut credentials = crate::credentials::Credentials::default();
    for (server, (username, password)) in provisions.logins {
        credentials.set(
            &server,
            crate::credentials::Credential { username, password },
        );
    }
    let mut info = run_info(
        &run.id,
        Path::new("acb.yaml"),
        &registry,
        &context,
        None,
        &cfg,
    );
    info.task_name = spec.name.clone();
    if let Some(c) = &commit {
        info.commit = c.clone();
    }
    info.branch = run.branch.clone().unwrap_or_else(|| {
        if spec.is_git() {
            spec.branch().to_string()
        } else {
            info.branch.clone()
        }
    });
    // Rendering untrusted templates runs off the async threads (and within its budgets).
    let loaded = {
        let (spec, context, policy) = (spec.clone(), context.clone(), policy.clone());
        let secrets = cfg.secrets.clone();
        tokio::task::spawn_blocking(move || {
            load_task(&spec, &context, &info, &policy, Some(&secrets))
        })
        .await
    };
    let masker = exec::secrets::Masker::new(cfg.secrets.values());
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => return Outcome::failed(format!("loading the task file: {e}")),
    };
    let (task, plan) = match loaded {
        Ok((l, plan)) => {
            for w in &l.warnings {
                log.line("acr-task", &masker.mask(&w.to_string()));
            }
            (l.task, plan)
        }
        Err(d) => {
            for diag in &d.0 {
                log.line("acr-task", &masker.mask(&diag.to_string()));
            }
            let mut o = Outcome::failed(masker.mask(&format!("the task file is invalid: {d}")));
            o.commit = commit;
            return o;
        }
    };
    // The run's own login to the registry, scoped to what the task pushes; it ends with
    // the run (and cannot outlive its timeout).
    let ttl = Duration::from_secs(spec.timeout_secs().saturating_add(60));
    let _login = RunLoginGuard(env.login.clone(), run.id.clone());
    match env
        .login
        .start(&run.id, run_grants(&task, &registry), ttl)
        .await
    {
        Ok(Some(login)) => credentials.set(&registry, login),
        Ok(None) => {}
        Err(e) => {
            let e = format!("the run's registry login: {e}");
            log.line("acr-task", &e);
            return Outcome::failed(e);
        }
    }
    cfg.credentials = Arc::new(credentials);
    let names: Vec<String> = task.steps.iter().map(|s| s.id.clone()).collect();
    log.steps(
        task.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let kind = exec::kind_name(s).to_string();
                (s.id.clone(), kind, exec::step_needs(&task, &plan, i))
            })
            .collect(),
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Log { step, line } => {
                        log.line(names.get(step).map(String::as_str).unwrap_or("?"), &line)
                    }
                    Event::StepStarted { step, attempt } => log.step_started(step, attempt),
                    Event::StepFinished { step, report } => {
                        log.step_finished(step, &report);
                        let who = names.get(step).map(String::as_str).unwrap_or("?");
                        // The error (already masked) says why, as `acr-task run` prints it.
                        let why = report
                            .error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default();
                        log.line(
                            "acr-task",
                            &format!("step {who}: {}{why}", report.status.as_str()),
                        );
                    }
                    Event::RunFinished { .. } => break,
                    _ => {}
                }
            }
        })
    };
    // The task timeout cancels the run; the flag tells a timeout from a user's cancel.
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timer = {
        let (cancel, flag) = (cancel.clone(), timed_out.clone());
        let secs = spec.timeout_secs();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            cancel.cancel();
        })
    };
    let report = exec::execute(rt, Arc::new(task), Arc::new(plan), cfg, tx, cancel).await;
    timer.abort();
    let _ = writer.await;
    drop(scratch);
    let mut status = report.status;
    let mut error = report.error.clone();
    if timed_out.load(std::sync::atomic::Ordering::SeqCst) && status == Status::Canceled {
        status = Status::TimedOut;
        error = Some(format!("the run timed out after {} s", spec.timeout_secs()));
    }
    log.line("acr-task", &format!("run {}: {}", run.id, status.as_str()));
    Outcome {
        status,
        error,
        commit,
        report: Some(report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_may_push_only_where_its_task_pushes() {
        let yaml = "version: v1.1.0\nsteps:\n  - build: -t reg:5000/app:1 -t other.io/x:1 .\n  - push: [\"reg:5000/app:1\", \"reg:5000/lib/tool:2\"]\n  - cmd: busybox true\n";
        let t = task::load_str("t.yaml", yaml, &RunInfo::default(), &Values::default()).unwrap();
        let crate::auth::Grants::Rules(rules) = run_grants(&t, "reg:5000") else {
            panic!("rules expected");
        };
        let repos: Vec<&str> = rules.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(repos, ["*", "app", "lib/tool"]);
        use crate::auth::Permission;
        assert!(!rules[0].1.contains(&Permission::ContentWrite));
        assert!(rules[1].1.contains(&Permission::ContentWrite));
        assert!(!rules[1].1.contains(&Permission::ContentDelete));
        // An `acr` step may untag, in those repositories only.
        let yaml = format!("{yaml}  - cmd: acr tag list --repository app\n");
        let t = task::load_str("t.yaml", &yaml, &RunInfo::default(), &Values::default()).unwrap();
        let crate::auth::Grants::Rules(rules) = run_grants(&t, "reg:5000") else {
            panic!("rules expected");
        };
        assert!(rules[1].1.contains(&Permission::ContentDelete));
        assert!(!rules[0].1.contains(&Permission::ContentDelete));
    }

    #[test]
    fn task_credentials_need_a_host_and_a_password_reference() {
        use crate::server::model::TaskCredential;
        let mut spec = TaskSpec::default();
        let open = Policy::permissive();
        spec.credentials.insert(
            "reg.example.com".into(),
            TaskCredential {
                username: "u".into(),
                password: "plain".into(),
            },
        );
        let e = check_credentials(&spec, &open).unwrap_err();
        assert!(e.contains("secret reference"), "{e}");
        std::env::set_var("ACR_TASK_TEST_CRED", "pw");
        spec.credentials
            .get_mut("reg.example.com")
            .unwrap()
            .password = "env:ACR_TASK_TEST_CRED".into();
        let got = resolve_credentials(&spec, &open).unwrap();
        assert_eq!(got["reg.example.com"].password, "pw");
        assert_eq!(got["reg.example.com"].username, "u");
        spec.credentials.insert(
            "not a host".into(),
            TaskCredential {
                username: "u".into(),
                password: "env:X".into(),
            },
        );
        let e = check_credentials(&spec, &open).unwrap_err();
        assert!(e.contains("login server"), "{e}");
    }

    #[test]
    fn secret_references_resolve_from_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").unwrap();
        std::env::set_var("ACR_TASK_TEST_SECRET", "from-env");
        let refs = BTreeMap::from([
            ("a".to_string(), "env:ACR_TASK_TEST_SECRET".to_string()),
            ("b".to_string(), format!("file:{}", f.display())),
        ]);
        let open = Policy::permissive();
        let got = resolve_secrets(&refs, &open).unwrap();
        assert_eq!(got["a"], "from-env");
        assert_eq!(got["b"], "from-file");
        let bad = BTreeMap::from([("c".to_string(), "vault://x".to_string())]);
        assert!(resolve_secrets(&bad, &open)
            .unwrap_err()
            .contains("env:VAR or file:/path"));
        // A server's policy: neither this variable nor this directory is allowed.
        let strict = Policy::server_default();
        let e = resolve_secrets(&refs, &strict).unwrap_err();
        assert!(e.contains("may not be used as a secret"), "{e}");
    }
}
