//! Paths a task names on the server's disk: local contexts and `file:` secrets. Each is
//! resolved (symlinks followed) before it is compared, so a link cannot lead a task into
//! the server's data directory or out of an allowed root.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::Policy;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{what} {path}: {reason}")]
    Unreadable {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} is the server's own data (or holds it); no task may read it")]
    Protected { what: &'static str, path: String },
    #[error("{what} {path} is outside the directories this server allows ({allowed}); the operator can allow more with `serve {flag} DIR`")]
    Outside {
        what: &'static str,
        path: String,
        allowed: String,
        flag: &'static str,
    },
    #[error("secret file {path} is larger than this server's limit of {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("environment variable {var} may not be used as a secret on this server (allowed: {allowed})")]
    EnvNotAllowed { var: String, allowed: String },
}

fn resolve(what: &'static str, p: &Path) -> Result<PathBuf, PathError> {
    std::fs::canonicalize(p).map_err(|e| PathError::Unreadable {
        what,
        path: p.display().to_string(),
        reason: e.to_string(),
    })
}

fn list(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "none".into();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Policy {
    /// Like [`Policy::touches_protected`], but the server's own scratch directories (where
    /// it clones contexts) are fine: for what the runtime is handed, not what tasks name.
    pub(super) fn touches_protected_data(&self, p: &Path) -> bool {
        let in_scratch = self.scratch.iter().any(|d| {
            let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
            p.starts_with(&d)
        });
        !in_scratch && self.touches_protected(p)
    }

    /// True when `p` (resolved) is inside a protected path or holds one.
    pub(super) fn touches_protected(&self, p: &Path) -> bool {
        self.protected.iter().any(|d| {
            let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
            p.starts_with(&d) || d.starts_with(p)
        })
    }

    fn confine(
        &self,
        what: &'static str,
        path: &Path,
        roots: Option<&Vec<PathBuf>>,
        flag: &'static str,
    ) -> Result<PathBuf, PathError> {
        let real = resolve(what, path)?;
        if self.touches_protected(&real) {
            return Err(PathError::Protected {
                what,
                path: path.display().to_string(),
            });
        }
        if let Some(roots) = roots {
            let inside = roots.iter().any(|r| {
                let r = std::fs::canonicalize(r).unwrap_or_else(|_| r.clone());
                real.starts_with(r)
            });
            if !inside {
                return Err(PathError::Outside {
                    what,
                    path: path.display().to_string(),
                    allowed: list(roots),
                    flag,
                });
            }
        }
        Ok(real)
    }

    /// A local context directory, resolved, if the policy lets tasks use it.
    pub fn context_dir(&self, dir: &Path) -> Result<PathBuf, PathError> {
        self.confine(
            "context",
            dir,
            self.context_roots.as_ref(),
            "--context-root",
        )
    }

    /// A context given as a URL: `file://` ones are local directories under the same
    /// rules; others (https, ssh) are fetched from elsewhere and fine.
    pub fn context_url(&self, url: &str) -> Result<(), PathError> {
        let Some(path) = url.strip_prefix("file://") else {
            return Ok(());
        };
        let path = path.split('#').next().unwrap_or(path);
        self.context_dir(Path::new(path)).map(|_| ())
    }

    /// Checks a `file:` secret reference without reading it (when a task is stored).
    pub fn secret_file_allowed(&self, path: &str) -> Result<PathBuf, PathError> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(PathError::Unreadable {
                what: "secret file",
                path: path.into(),
                reason: "the path must be absolute".into(),
            });
        }
        self.confine("secret file", p, self.secret_dirs.as_ref(), "--secret-dir")
    }

    /// Reads a `file:` secret: allowed place, size limit, text.
    pub fn read_secret_file(&self, path: &str) -> Result<String, PathError> {
        let real = self.secret_file_allowed(path)?;
        let unreadable = |reason: String| PathError::Unreadable {
            what: "secret file",
            path: path.into(),
            reason,
        };
        let f = std::fs::File::open(&real).map_err(|e| unreadable(e.to_string()))?;
        let mut buf = Vec::new();
        f.take(self.secret_max_bytes + 1)
            .read_to_end(&mut buf)
            .map_err(|e| unreadable(e.to_string()))?;
        if buf.len() as u64 > self.secret_max_bytes {
            return Err(PathError::TooLarge {
                path: path.into(),
                limit: self.secret_max_bytes,
            });
        }
        String::from_utf8(buf).map_err(|_| unreadable("not UTF-8 text".into()))
    }

    /// Whether an `env:` secret may read this variable of the server's environment.
    pub fn secret_env_allowed(&self, var: &str) -> Result<(), PathError> {
        let Some(pats) = &self.secret_env else {
            return Ok(());
        };
        let ok = pats.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => var.starts_with(prefix),
            None => p == var,
        });
        if ok {
            Ok(())
        } else {
            Err(PathError::EnvNotAllowed {
                var: var.into(),
                allowed: if pats.is_empty() {
                    "none".into()
                } else {
                    pats.join(", ")
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_stay_inside_roots_and_out_of_protected_data() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("src");
        let data = top.path().join("data");
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::create_dir_all(data.join("registry")).unwrap();
        std::os::unix::fs::symlink(&data, root.join("sneaky")).unwrap();
        let p = Policy {
            context_roots: Some(vec![root.clone()]),
            protected: vec![data.clone()],
            ..Policy::server_default()
        };
        assert!(p.context_dir(&root.join("app")).is_ok());
        assert!(matches!(
            p.context_dir(&root.join("sneaky")),
            Err(PathError::Protected { .. })
        ));
        assert!(matches!(
            p.context_dir(&data.join("registry")),
            Err(PathError::Protected { .. })
        ));
        // A directory that holds the data directory would copy it into the workspace.
        let wide = Policy {
            context_roots: None,
            ..p.clone()
        };
        assert!(matches!(
            wide.context_dir(top.path()),
            Err(PathError::Protected { .. })
        ));
        assert!(matches!(
            p.context_dir(Path::new("/")),
            Err(PathError::Protected { .. }) | Err(PathError::Outside { .. })
        ));
        assert!(matches!(
            p.context_url(&format!("file://{}", data.display())),
            Err(PathError::Protected { .. })
        ));
        assert!(p.context_url("https://example.com/r.git#main").is_ok());
    }

    #[test]
    fn secret_files_need_an_allowed_directory_and_a_small_size() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("secrets");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ok"), "s3cret\n").unwrap();
        std::fs::write(dir.join("big"), vec![b'x'; 100]).unwrap();
        std::fs::write(top.path().join("elsewhere"), "x").unwrap();
        let p = Policy {
            secret_dirs: Some(vec![dir.clone()]),
            secret_max_bytes: 50,
            ..Policy::server_default()
        };
        let path = |n: &str| dir.join(n).display().to_string();
        assert_eq!(p.read_secret_file(&path("ok")).unwrap(), "s3cret\n");
        assert!(matches!(
            p.read_secret_file(&path("big")),
            Err(PathError::TooLarge { limit: 50, .. })
        ));
        let outside = top.path().join("elsewhere").display().to_string();
        assert!(matches!(
            p.read_secret_file(&outside),
            Err(PathError::Outside { .. })
        ));
        assert!(p.read_secret_file("relative/path").is_err());
        let none = Policy::server_default();
        assert!(matches!(
            none.read_secret_file(&path("ok")),
            Err(PathError::Outside { .. })
        ));
        assert!(none.secret_env_allowed("ACR_TASK_SECRET_TOKEN").is_ok());
        assert!(none.secret_env_allowed("AWS_SECRET_ACCESS_KEY").is_err());
        assert!(Policy::permissive().secret_env_allowed("ANYTHING").is_ok());
    }
}
