//! Helpers for `acr-task serve` tests: the real binary on a private data dir, real git
//! repositories in temp dirs, and the real Docker Engine.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../registry_common/mod.rs"]
pub mod registry_common;
#[allow(unused_imports)]
pub use registry_common::{make_busybox_image, remove_images_of};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_acr-task")
}

/// Docker tests never skip: without an engine they fail and say so.
pub fn require_docker() {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "these tests need a running Docker Engine (`docker info` failed)"
    );
}

pub struct Serve {
    child: Option<Child>,
    /// `127.0.0.1:PORT`: the registry host and the API.
    pub addr: String,
    pub url: String,
    pub data: PathBuf,
    /// The admin password the server made on its first start (the API's credential).
    pub password: String,
}

/// A PostgreSQL database for the server of `data` beside the one `url` names (made with
/// `createdb` the first time; its name kept next to the data directory).
pub fn postgres_for(url: &str, data: &Path) -> String {
    let marker = data.with_extension("pgdb");
    let (base, _) = url.rsplit_once('/').unwrap();
    if let Ok(name) = std::fs::read_to_string(&marker) {
        return format!("{base}/{}", name.trim());
    }
    let name = format!("t{:x}", rand_u64());
    let hostport = base.rsplit_once('@').map(|(_, h)| h).unwrap_or(base);
    let user = base
        .trim_start_matches("postgres://")
        .split_once('@')
        .map(|(u, _)| u)
        .unwrap_or("postgres");
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let ok = Command::new("createdb")
        .args(["-h", host, "-p", port, "-U", user, &name])
        .status()
        .unwrap()
        .success();
    assert!(ok, "createdb {name} failed");
    std::fs::write(&marker, &name).unwrap();
    format!("{base}/{name}")
}

/// A random number (std's hasher keys are random per process and per instance).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// The admin password `serve` keeps in its data dir after the first start.
pub fn admin_password(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.password"))
        .map(|p| p.trim().to_string())
        .unwrap_or_default()
}

impl Serve {
    pub fn start(data: &Path, concurrency: usize) -> Serve {
        Self::start_with(data, concurrency, &[])
    }

    /// `acr-task serve` on a free loopback port with `extra` arguments.
    pub fn start_with(data: &Path, concurrency: usize, extra: &[&str]) -> Serve {
        Self::start_with_env(data, concurrency, extra, &[])
    }

    /// [`Serve::start_with`], with these environment variables set for the server.
    pub fn start_with_env(
        data: &Path,
        concurrency: usize,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Serve {
        Self::start_at("127.0.0.1:0", data, concurrency, extra, env)
    }

    /// `acr-task serve --listen LISTEN ...` (a fixed address, e.g. to come back on it).
    pub fn start_at(
        listen: &str,
        data: &Path,
        concurrency: usize,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Serve {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("stderr.log"))
            .unwrap();
        // Test contexts live in the temp dir and the source tree, outside the serving
        // user's home (the policy's default context root).
        let temp = std::env::temp_dir();
        let tree = env!("CARGO_MANIFEST_DIR");
        // Under `scripts/with-postgres`, the server keeps its state in PostgreSQL: a
        // database of its own, made once per data directory (a restart finds it again).
        // (Unless the test names the database itself.)
        let database: Vec<String> = match std::env::var("ACR_TASK_TEST_POSTGRES") {
            Ok(url) if !extra.contains(&"--database") => {
                vec!["--database".into(), postgres_for(&url, data)]
            }
            _ => Vec::new(),
        };
        let mut child = Command::new(bin())
            .args(["serve", "--listen", listen, "--data"])
            .arg(data)
            .args([
                "--concurrency",
                &concurrency.to_string(),
                "--log",
                "acr_task=info",
                "--context-root",
            ])
            .arg(&temp)
            .args(["--context-root", tree])
            .args(&database)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line was {first:?}"))
            .to_string();
        Serve {
            child: Some(child),
            url: format!("http://{addr}"),
            addr,
            data: data.to_path_buf(),
            password: admin_password(data),
        }
    }

    /// `acr-task ARGS...` with the admin's credentials for this server's task API.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("ACR_TASK_USERNAME", "admin")
            .env("ACR_TASK_PASSWORD", &self.password);
        c
    }

    /// `acr-task ARGS --data DATA` as the admin: (success, stdout, stderr).
    pub fn acr(&self, args: &[&str]) -> (bool, String, String) {
        let out = self
            .cli()
            .args(args)
            .arg("--data")
            .arg(&self.data)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("stderr.log")).unwrap_or_default()
    }

    /// An API client with the admin's credentials.
    pub fn client(&self) -> Api {
        let mut h = reqwest::header::HeaderMap::new();
        let basic = base64_basic("admin", &self.password);
        h.insert("authorization", basic.parse().unwrap());
        Api {
            base: self.url.clone(),
            http: reqwest::Client::builder()
                .default_headers(h)
                .build()
                .unwrap(),
        }
    }

    /// An API client with the admin's bearer token (one password check for many calls,
    /// as `acr-task` makes them, so no login limit is met).
    pub async fn token_client(&self) -> Api {
        Api {
            base: self.url.clone(),
            http: self.bearer_client("registry:tasks:read,write").await,
        }
    }

    /// A client with the admin's bearer token for `scope`.
    async fn bearer_client(&self, scope: &str) -> reqwest::Client {
        let r = reqwest::Client::new()
            .get(format!(
                "{}/oauth2/token?service=acr-task&scope={scope}",
                self.url
            ))
            .basic_auth("admin", Some(&self.password))
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        let token = v["token"].as_str().or(v["access_token"].as_str()).unwrap();
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        reqwest::Client::builder()
            .default_headers(h)
            .build()
            .unwrap()
    }

    /// A web page (`/ui/...`) as the admin sees it, signed in through the page's form.
    pub async fn page(&self, path: &str) -> String {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let enc = |s: &str| {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect::<String>()
        };
        let r = http
            .post(format!("{}/ui/login", self.url))
            .header("origin", &self.url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "username=admin&password={}&next={}",
                enc(&self.password),
                enc(path)
            ))
            .send()
            .await
            .unwrap();
        let cookie = r
            .headers()
            .get("set-cookie")
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.split(';').next())
            .unwrap_or_else(|| panic!("no session cookie: {}", r.status()))
            .to_string();
        http.get(format!("{}{path}", self.url))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A registry client with the admin's bearer token for `repo` (pull, push, delete).
    pub async fn registry_client(&self, repo: &str) -> reqwest::Client {
        self.bearer_client(&format!("repository:{repo}:pull,push,delete"))
            .await
    }

    /// An API client without credentials.
    pub fn anonymous(&self) -> Api {
        Api {
            base: self.url.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A failing test shows what each of its servers logged last (CI keeps nothing else).
        if std::thread::panicking() {
            eprintln!(
                "---- the end of the log of the server at {} ----\n{}",
                self.addr,
                tail(&self.stderr())
            );
        }
        if let Some(c) = self.child.take() {
            // SIGTERM so that running runs are canceled and their containers removed.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let mut c = c;
            let _ = c.wait();
        }
        // The registry (a temp dir) is gone: so are the engine's tags that name it.
        remove_images_of(&self.addr);
    }
}

/// The end of a server's log, for a failure's message.
pub fn tail(log: &str) -> &str {
    let start = log.len().saturating_sub(4000);
    let start = (start..log.len())
        .find(|i| log.is_char_boundary(*i))
        .unwrap_or(0);
    &log[start..]
}

/// `Basic base64(user:password)`.
pub fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }
    pub async fn send(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, body).await
    }
    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
    pub async fn runs(&self, task: &str) -> Vec<Value> {
        let (st, v) = self.get(&format!("/api/runs?task={task}")).await;
        assert_eq!(st, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }
    /// Polls until the run's status is one of `want`.
    pub async fn wait_status(&self, id: &str, want: &[&str], timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (_, v) = self.get(&format!("/api/runs/{id}")).await;
            if want.iter().any(|w| v["status"] == *w) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "run {id} did not reach {want:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Containers, networks and volumes still labelled with this run id.
pub fn leftovers(run_id: &str) -> Vec<String> {
    let label = format!("label=io.acr-task.run={run_id}");
    let mut out = Vec::new();
    for args in [
        vec!["ps", "-aq", "--filter", &label],
        vec!["network", "ls", "-q", "--filter", &label],
        vec!["volume", "ls", "-q", "--filter", &label],
    ] {
        let o = Command::new("docker").args(&args).output().unwrap();
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| format!("{} {l}", args[0])),
        );
    }
    out
}

/// A git repository with a `main` branch.
pub struct Repo {
    pub dir: tempfile::TempDir,
    pub repo: git2::Repository,
}

impl Repo {
    pub fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = git2::Repository::init_opts(dir.path(), &opts).unwrap();
        Repo { dir, repo }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// Writes the files, commits them all on the current branch, returns the commit id.
    pub fn commit(&self, files: &[(&str, &str)], msg: &str) -> String {
        for (p, text) in files {
            let full = self.dir.path().join(p);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, text).unwrap();
        }
        let mut idx = self.repo.index().unwrap();
        idx.add_all(["*"], git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        idx.write().unwrap();
        let tree = self.repo.find_tree(idx.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("test", "test@example.com").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo
            .commit(Some("HEAD"), &sig, &sig, msg, &tree, &parents)
            .unwrap()
            .to_string()
    }
}

/// HMAC-SHA256 hex, exactly as GitHub computes `X-Hub-Signature-256` (after `sha256=`).
pub fn github_signature(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

pub fn data_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/serve")
        .join(name)
}

/// A file of the test-only TLS material in `tests/data/tls`.
pub fn tls(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
        .display()
        .to_string()
}

/// `docker login REGISTRY -u USER --password-stdin` into the docker CLI config `config`.
pub fn docker_login(config: &Path, registry: &str, user: &str, password: &str) {
    std::fs::create_dir_all(config).unwrap();
    let mut login = Command::new("docker")
        .env("DOCKER_CONFIG", config)
        .args(["login", registry, "-u", user, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        login
            .stdin
            .take()
            .unwrap()
            .write_all(password.as_bytes())
            .unwrap();
    }
    let out = login.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker login {registry}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample named exactly `series` in a `/metrics` text (name and labels
/// as printed).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// A webhook receiver on a loopback port: every request's body, answered 200.
pub fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let b = bodies.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            b.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).to_string());
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, bodies)
}
