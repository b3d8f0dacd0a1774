//! Credentials for other registries, read from Docker's `config.json` (what `docker login`
//! writes): `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. As the docker CLI
//! does: a `credHelpers` entry for the host, else `credsStore`, runs
//! `docker-credential-<name> get`; otherwise the inline `auths` entry is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;

/// A user name and password (or token) for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, ***)", self.username)
    }
}

#[derive(Debug, Default)]
pub struct Credentials {
    /// Given for this use (a run's own registry, a task's credentials): they win over
    /// `docker login`'s entries and helpers.
    given: BTreeMap<String, Credential>,
    by_host: BTreeMap<String, Credential>,
    /// Host → credential helper name (`credHelpers`).
    helpers: BTreeMap<String, String>,
    /// The helper for every other host (`credsStore`).
    store: Option<String>,
    /// What helpers answered, per host (they are asked once).
    asked: std::sync::Mutex<BTreeMap<String, Option<Credential>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CredentialsError {
    pub path: PathBuf,
    pub message: String,
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl Credentials {
    /// Docker's config file of this environment; empty when there is none.
    pub fn from_docker_config() -> Result<Credentials, CredentialsError> {
        let dir = match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".docker"),
                None => return Ok(Credentials::default()),
            },
        };
        Credentials::from_file(&dir.join("config.json"))
    }

    /// A Docker `config.json`; empty when the file does not exist.
    pub fn from_file(path: &Path) -> Result<Credentials, CredentialsError> {
        let err = |message: String| CredentialsError {
            path: path.to_path_buf(),
            message,
        };
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        let cfg: DockerConfig =
            serde_json::from_slice(&text).map_err(|e| err(format!("not a Docker config: {e}")))?;
        let mut by_host = BTreeMap::new();
        for (key, entry) in cfg.auths {
            let cred = match (entry.auth, entry.username, entry.password) {
                (Some(a), _, _) if !a.is_empty() => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(a.trim())
                        .map_err(|_| err(format!("auths[{key:?}].auth is not base64")))?;
                    let s = String::from_utf8(raw)
                        .map_err(|_| err(format!("auths[{key:?}].auth is not UTF-8")))?;
                    let Some((u, p)) = s.split_once(':') else {
                        return Err(err(format!("auths[{key:?}].auth is not user:password")));
                    };
                    Credential {
                        username: u.to_string(),
                        password: p.to_string(),
                    }
                }
                (_, Some(u), Some(p)) => Credential {
                    username: u,
                    password: p,
                },
                _ => continue,
            };
            by_host.insert(host_key(&key), cred);
        }
        Ok(Credentials {
            given: BTreeMap::new(),
            by_host,
            helpers: cfg
                .cred_helpers
                .into_iter()
                .map(|(k, v)| (host_key(&k), v))
                .collect(),
            store: cfg.creds_store.filter(|s| !s.is_empty()),
            asked: Default::default(),
        })
    }

    /// Only `cred`, for `host` (credentials given on a command line).
    pub fn single(host: &str, cred: Credential) -> Credentials {
        Credentials {
            by_host: BTreeMap::from([(host_key(host), cred)]),
            ..Default::default()
        }
    }

    /// Uses `cred` for `host`, whatever `docker login` stored for it.
    pub fn set(&mut self, host: &str, cred: Credential) {
        self.given.insert(host_key(host), cred);
    }

    /// The passwords given with [`Credentials::set`] (so a run can mask them).
    pub fn given_secrets(&self) -> impl Iterator<Item = &str> {
        self.given.values().map(|c| c.password.as_str())
    }

    /// The credential for an API host (`registry-1.docker.io` finds Docker Hub's entry).
    /// May run a credential helper (a process, up to 10 s): call it off async threads.
    pub fn get(&self, host: &str) -> Option<Credential> {
        let key = host_key(host);
        if let Some(c) = self.given.get(&key) {
            return Some(c.clone());
        }
        let helper = self.helpers.get(&key).or(self.store.as_ref());
        let Some(helper) = helper else {
            return self.by_host.get(&key).cloned();
        };
        if let Some(c) = self.asked.lock().ok().and_then(|a| a.get(&key).cloned()) {
            return c;
        }
        let answer = run_helper(helper, &key);
        if let Ok(mut a) = self.asked.lock() {
            a.insert(key, answer.clone());
        }
        answer
    }
}

/// `docker-credential-<helper> get`, given the server on stdin (Docker Hub's is its v1
/// URL, as `docker login` stored it). None when it has nothing, fails or hangs.
fn run_helper(helper: &str, key: &str) -> Option<Credential> {
    use std::io::Write;
    let server = if key == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        key
    };
    let program = format!("docker-credential-{helper}");
    let mut child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!(%program, error = %e, "credential helper"))
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    // A helper that waits for a desktop prompt must not stall polling forever.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(%program, "credential helper did not answer in 10 s");
                return None;
            }
        }
    }
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        tracing::debug!(%program, %server, "credential helper has no credentials");
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out.stdout).ok()?;
    // `<token>` marks an identity token for an OAuth flow that is not supported here.
    (a.username != "<token>").then_some(Credential {
        username: a.username,
        password: a.secret,
    })
}

/// `https://index.docker.io/v1/`, `docker.io`, `registry-1.docker.io` → `docker.io`;
/// `https://host:5000/path` → `host:5000`.
fn host_key(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_login_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // "alice:s3cret" and "bob:pw:with:colons"
        std::fs::write(
            &path,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"},
                "127.0.0.1:5001":{"auth":"Ym9iOnB3OndpdGg6Y29sb25z"},
                "https://reg.example.com/v2/":{"username":"u","password":"p"},
                "empty.example.com":{}
            }}"#,
        )
        .unwrap();
        let c = Credentials::from_file(&path).unwrap();
        assert_eq!(c.get("registry-1.docker.io").unwrap().username, "alice");
        assert_eq!(c.get("registry-1.docker.io").unwrap().password, "s3cret");
        assert_eq!(c.get("127.0.0.1:5001").unwrap().password, "pw:with:colons");
        assert_eq!(c.get("reg.example.com").unwrap().username, "u");
        assert!(c.get("empty.example.com").is_none());
        let mut c = c;
        let run = Credential {
            username: "run".into(),
            password: "given".into(),
        };
        c.set("http://127.0.0.1:5001/", run.clone());
        assert_eq!(c.get("127.0.0.1:5001"), Some(run));
        assert_eq!(c.given_secrets().collect::<Vec<_>>(), ["given"]);
        assert!(!format!("{:?}", c).contains("s3cret"));
        assert!(Credentials::from_file(&dir.path().join("none.json"))
            .unwrap()
            .get("docker.io")
            .is_none());
        // A credHelpers entry for the host wins over inline auths; a helper that is not
        // installed gives nothing (and does not fall back to the stale inline entry).
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5001":{"auth":"Ym9iOnB3OndpdGg6Y29sb25z"}},
                "credHelpers":{"127.0.0.1:5001":"acr-task-test-missing-helper"}}"#,
        )
        .unwrap();
        let c = Credentials::from_file(&path).unwrap();
        assert!(c.get("127.0.0.1:5001").is_none());
        std::fs::write(&path, "{not json").unwrap();
        let e = Credentials::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("not a Docker config"),
            "{e}"
        );
    }
}
