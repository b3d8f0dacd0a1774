//! What every run is set up with, whoever starts it (`acr-task run` and the server): the
//! context (a directory, `GIT_URL#ref:folder`, a tarball URL) and the `.Run` values.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::exec::RunConfig;
use crate::registry::reference::ImageRef;
use crate::source::{GitCheckout, SourceError};
use crate::task::RunInfo;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("context {0} is not a directory")]
    NotADirectory(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("context {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The context directory: the task file's directory when none is given, a local path, or
/// `GIT_URL#ref` cloned into `scratch/context`.
pub fn resolve_context(
    context: Option<&str>,
    task_file: &Path,
    scratch: &Path,
) -> Result<(PathBuf, Option<GitCheckout>), SetupError> {
    match context {
        None => Ok((
            task_file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            None,
        )),
        Some(c) if crate::source::is_tarball_url(c) => {
            let dest = scratch.join("context");
            crate::source::fetch_tarball(c, &dest)?;
            Ok((dest, None))
        }
        Some(c) if crate::source::is_git_url(c) => {
            // `URL#ref:folder`, as az takes it: the folder of the checkout is the context.
            let (url, fragment) = c.split_once('#').unwrap_or((c, ""));
            let (reference, folder) = fragment.split_once(':').unwrap_or((fragment, ""));
            let dest = scratch.join("context");
            let checkout = crate::source::fetch_git(url, reference, &dest)?;
            if folder.is_empty() {
                return Ok((dest, Some(checkout)));
            }
            let dir = dest.join(folder);
            let inside = match (std::fs::canonicalize(&dir), std::fs::canonicalize(&dest)) {
                (Ok(d), Ok(root)) => d.starts_with(root) && d.is_dir(),
                _ => false,
            };
            if !inside {
                return Err(SetupError::NotADirectory(format!(
                    "{folder} (in {url} at {})",
                    if reference.is_empty() {
                        "its default branch"
                    } else {
                        reference
                    }
                )));
            }
            Ok((dir, Some(checkout)))
        }
        Some(dir) => {
            let p = PathBuf::from(dir);
            if !p.is_dir() {
                return Err(SetupError::NotADirectory(dir.to_string()));
            }
            Ok((p, None))
        }
    }
}

/// `.Run` for a run: its id, registry, shared volume, and the commit and branch the
/// context was fetched at (`git`), or of the checkout holding it.
pub fn run_info(
    run_id: &str,
    task_file: &Path,
    registry: &str,
    context: &Path,
    git: Option<&GitCheckout>,
    cfg: &RunConfig,
) -> RunInfo {
    let mut info = RunInfo::placeholder(task_file);
    info.id = run_id.to_string();
    info.registry = registry.to_string();
    info.registry_name = registry.split(':').next().unwrap_or(registry).to_string();
    info.shared_volume = cfg.shared_volume.clone();
    if let Some(p) = &cfg.platform {
        info.set_platform(p);
    }
    let head = match git {
        Some(g) => Some((g.commit.clone(), g.branch.clone())),
        None => crate::source::git_head(context),
    };
    if let Some((commit, branch)) = head {
        info.commit = commit;
        info.branch = branch;
    }
    info
}

/// Where a run asks whether an image of its registry may be used (its content-trust
/// policies): the registry's store when the run is beside it, the server's API on an agent.
pub trait TrustCheck: Send + Sync {
    /// Why `repository@reference` may not be used, if it may not.
    fn denial<'a>(
        &'a self,
        repository: &'a str,
        reference: &'a str,
    ) -> crate::exec::BoxFut<'a, Result<Option<String>, String>>;
}

/// [`TrustCheck`] against a registry's store at hand.
pub struct StoreTrust(pub Arc<crate::store::Store>);

impl TrustCheck for StoreTrust {
    fn denial<'a>(
        &'a self,
        repository: &'a str,
        reference: &'a str,
    ) -> crate::exec::BoxFut<'a, Result<Option<String>, String>> {
        let (store, repo, reference) = (
            self.0.clone(),
            repository.to_string(),
            reference.to_string(),
        );
        Box::pin(async move {
            let denial = tokio::task::spawn_blocking(move || {
                crate::registry::trust::check_reference(&store, &repo, &reference)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(denial.map(|d| d.to_string()))
        })
    }
}

/// A run's content trust and signing: images of `registry` (the run's own) are checked
/// against its content-trust policies through `check`; pushed images are signed with
/// `key`, when there is one.
pub struct RunTrust {
    pub registry: String,
    pub check: Option<Arc<dyn TrustCheck>>,
    pub key: Option<Arc<crate::signature::SigningKey>>,
}

impl std::fmt::Debug for RunTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunTrust")
            .field("registry", &self.registry)
            .field("check", &self.check.is_some())
            .field("key", &self.key.is_some())
            .finish()
    }
}

impl RunTrust {
    /// Whether it would do anything.
    pub fn is_useful(&self) -> bool {
        self.check.is_some() || self.key.is_some()
    }
}

impl crate::exec::ImageTrust for RunTrust {
    fn check<'a>(&'a self, image: &'a str) -> crate::exec::BoxFut<'a, Result<(), String>> {
        Box::pin(async move {
            let Some(check) = &self.check else {
                return Ok(());
            };
            let Some(r) = ImageRef::parse(image) else {
                return Ok(());
            };
            if r.registry != self.registry {
                return Ok(());
            }
            match check.denial(&r.repository, &r.reference).await? {
                Some(d) => Err(format!("{image}: {d}")),
                None => Ok(()),
            }
        })
    }

    fn sign<'a>(
        &'a self,
        image: &'a str,
        digest: &'a str,
        login: Option<crate::credentials::Credential>,
    ) -> crate::exec::BoxFut<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            let Some(key) = &self.key else {
                return Ok(None);
            };
            let r = ImageRef::parse(image).ok_or_else(|| format!("{image:?} is no image"))?;
            let host = r.api_host().to_string();
            let creds = match login {
                Some(c) => crate::credentials::Credentials::single(&host, c),
                None => crate::credentials::Credentials::default(),
            };
            let client = crate::registry::client::RegistryClient::new(
                host,
                crate::registry::client::Transport::new(&[], creds).map_err(|e| e.to_string())?,
            );
            let by_digest = ImageRef {
                reference: digest.to_string(),
                ..r
            };
            let s = crate::registry::signing::sign(&client, &by_digest, key)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some(format!(
                "signature {} by key {}",
                s.signature, s.key_id
            )))
        })
    }
}
