//! Build contexts: a local directory tarred for the Docker Engine, honouring `.dockerignore`
//! with Docker's rules (not gitignore's: patterns are anchored at the context root, `**`
//! matches any number of directories, `!` re-includes, the last matching rule wins).

use std::io::Write;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("build context {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(".dockerignore line {line}: bad pattern `{pattern}`: {reason}")]
    Pattern {
        line: usize,
        pattern: String,
        reason: String,
    },
    #[error("git context {url}: {reason}")]
    Git { url: String, reason: String },
    #[error("build context {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("tarball context {url}: {reason}")]
    Tarball { url: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The rules of one `.dockerignore` file.
#[derive(Debug, Default)]
pub struct DockerIgnore {
    rules: Vec<(GlobMatcher, bool)>,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Result<DockerIgnore, SourceError> {
        let mut rules = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negate, pat) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            // Docker cleans patterns with filepath.Clean and treats them as root-relative.
            let pat = pat.trim_start_matches("./").trim_start_matches('/');
            let pat = pat.trim_end_matches('/');
            if pat.is_empty() {
                continue;
            }
            let glob = GlobBuilder::new(pat)
                .literal_separator(true)
                .build()
                .map_err(|e| SourceError::Pattern {
                    line: i + 1,
                    pattern: line.to_string(),
                    reason: e.kind().to_string(),
                })?;
            rules.push((glob.compile_matcher(), negate));
        }
        Ok(DockerIgnore { rules })
    }

    /// Reads `<dir>/.dockerignore` if present.
    pub fn load(dir: &Path) -> Result<DockerIgnore, SourceError> {
        let path = dir.join(".dockerignore");
        match std::fs::read_to_string(&path) {
            Ok(text) => DockerIgnore::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DockerIgnore::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Whether `rel` (a `/`-separated path relative to the context root) is excluded.
    /// A path is also excluded when one of its parent directories is (Docker's rule).
    pub fn is_excluded(&self, rel: &str) -> bool {
        let mut excluded = false;
        for (glob, negate) in &self.rules {
            let hit = glob.is_match(rel) || parents(rel).any(|p| glob.is_match(p));
            if hit {
                excluded = !negate;
            }
        }
        excluded
    }
}

fn parents(rel: &str) -> impl Iterator<Item = &str> {
    rel.char_indices()
        .filter(|(_, c)| *c == '/')
        .map(move |(i, _)| &rel[..i])
}

/// Writes a tar of `dir` (without what `.dockerignore` excludes) to `out`.
/// The Dockerfile and `.dockerignore` are always sent, as Docker does.
pub fn tar_context<W: Write>(dir: &Path, dockerfile: &str, out: W) -> Result<W, SourceError> {
    if !dir.is_dir() {
        return Err(SourceError::NotADirectory(dir.to_path_buf()));
    }
    let ignore = DockerIgnore::load(dir)?;
    tar_filtered(dir, out, |rel| {
        rel == dockerfile || rel == ".dockerignore" || !ignore.is_excluded(rel)
    })
}

/// Writes a tar of the whole tree under `dir` to `out` (no `.dockerignore`: this is the
/// source a run's workspace starts from, as ACR clones it).
/// Symbolic links stay links; a relative one that leads out of `dir` is written as the
/// absolute path it resolves to where the tree is mounted (`mounted_at`), since the engine
/// refuses links that escape the directory it extracts into.
pub fn tar_tree<W: Write>(dir: &Path, mounted_at: &str, out: W) -> Result<W, SourceError> {
    if !dir.is_dir() {
        return Err(SourceError::NotADirectory(dir.to_path_buf()));
    }
    tar_filtered_links(dir, out, |_| true, Some(mounted_at))
}

/// Where a relative link at `rel` (a path in the tree) pointing to `target` leads, as an
/// absolute path with the tree at `mounted_at`; `None` when it stays inside the tree.
pub fn escaping_link(rel: &str, target: &str, mounted_at: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut inside: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    inside.pop(); // the link itself
    let mut escapes = false;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if inside.pop().is_none() {
                    escapes = true;
                    break;
                }
            }
            c => inside.push(c),
        }
    }
    if !escapes {
        return None;
    }
    // Resolve from the mount point, as the container would.
    let mut abs: Vec<&str> = mounted_at.split('/').filter(|c| !c.is_empty()).collect();
    abs.extend(rel.split('/').filter(|c| !c.is_empty()));
    abs.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                abs.pop();
            }
            c => abs.push(c),
        }
    }
    Some(format!("/{}", abs.join("/")))
}

fn tar_filtered<W: Write>(
    dir: &Path,
    out: W,
    keep: impl Fn(&str) -> bool,
) -> Result<W, SourceError> {
    tar_filtered_links(dir, out, keep, None)
}

fn tar_filtered_links<W: Write>(
    dir: &Path,
    out: W,
    keep: impl Fn(&str) -> bool,
    mounted_at: Option<&str>,
) -> Result<W, SourceError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => return Err(io_err(&d)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&d))?;
            let path = entry.path();
            let rel = match path.strip_prefix(dir) {
                Ok(r) => r.to_string_lossy().replace('\\', "/"),
                Err(_) => continue,
            };
            let ft = match entry.file_type() {
                Ok(ft) => ft,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            // Excluded directories are still walked: a `!` rule may re-include a child.
            if ft.is_dir() {
                stack.push(path.clone());
            }
            if keep(&rel) {
                files.push((path, rel));
            }
        }
    }
    // Sorted so the same context always gives the same tar (and build cache hits).
    files.sort_by(|a, b| a.1.cmp(&b.1));
    for (path, rel) in files {
        if let Some(at) = mounted_at {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(io_err(&path))?;
                let target = target.to_string_lossy();
                if let Some(abs) = escaping_link(&rel, &target, at) {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    if let Ok(t) = meta.modified() {
                        let secs = t
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        h.set_mtime(secs);
                    }
                    builder
                        .append_link(&mut h, &rel, &abs)
                        .map_err(io_err(&path))?;
                    continue;
                }
            }
        }
        match builder.append_path_with_name(&path, &rel) {
            Ok(()) => {}
            // A file deleted while the context is read is simply not part of it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    builder.into_inner().map_err(io_err(dir))
}

/// Turns a tar of a directory as the Docker Engine's archive API returns it (every entry
/// under one top-level name) into a build context: entries re-rooted, `.dockerignore`
/// (found at the new root) applied, Dockerfile and `.dockerignore` always kept.
pub fn rebase_context_tar(input: &[u8], dockerfile: &str) -> Result<Vec<u8>, SourceError> {
    let tar_err = |e: std::io::Error| SourceError::Io {
        path: PathBuf::from("<context archive>"),
        source: e,
    };
    let strip = |p: &Path| -> Option<String> {
        let mut comps = p.components();
        comps.next()?;
        let rest = comps.as_path().to_string_lossy().replace('\\', "/");
        (!rest.is_empty()).then_some(rest)
    };
    let mut ignore = DockerIgnore::default();
    for entry in tar::Archive::new(input).entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let path = entry.path().map_err(tar_err)?.into_owned();
        if strip(&path).as_deref() == Some(".dockerignore") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).map_err(tar_err)?;
            ignore = DockerIgnore::parse(&text)?;
        }
    }
    let mut out = tar::Builder::new(Vec::new());
    for entry in tar::Archive::new(input).entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        let path = entry.path().map_err(tar_err)?.into_owned();
        let Some(rel) = strip(&path) else { continue };
        if rel != dockerfile && rel != ".dockerignore" && ignore.is_excluded(&rel) {
            continue;
        }
        let mut header = entry.header().clone();
        if header.entry_type().is_symlink() || header.entry_type().is_hard_link() {
            let target = entry.link_name().map_err(tar_err)?.map(|t| t.into_owned());
            if let Some(t) = target {
                let t = if header.entry_type().is_hard_link() {
                    strip(&t).map(PathBuf::from).unwrap_or(t)
                } else {
                    t
                };
                out.append_link(&mut header, &rel, &t).map_err(tar_err)?;
            }
            continue;
        }
        out.append_data(&mut header, &rel, &mut entry)
            .map_err(tar_err)?;
    }
    out.into_inner().map_err(tar_err)
}

/// The commit and branch of the git checkout holding `dir`, when there is one.
pub fn git_head(dir: &Path) -> Option<(String, String)> {
    // Starting libgit2 loads OpenSSL's whole CA store (tens of ms); a directory outside
    // any checkout, the common case for `run`/`validate`, does not need it.
    if !dir.ancestors().any(|d| d.join(".git").exists()) {
        return None;
    }
    let repo = git2::Repository::discover(dir).ok()?;
    let head = repo.head().ok()?;
    let commit = head.peel_to_commit().ok()?.id().to_string();
    let branch = if head.is_branch() {
        head.shorthand().unwrap_or_default().to_string()
    } else {
        String::new()
    };
    Some((commit, branch))
}

/// What a git context was checked out at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitCheckout {
    pub commit: String,
    /// The branch, when the reference named one (or was empty: the remote's default).
    pub branch: String,
}

/// Whether a context is a git URL (else a local directory, or a tarball URL when
/// [`is_tarball_url`]).
pub fn is_git_url(s: &str) -> bool {
    s.contains("://") || s.starts_with("git@")
}

/// Whether a context names a tarball to download (`https://host/ctx.tar.gz`, `.tgz`, `.tar`),
/// as `az acr build` takes them.
pub fn is_tarball_url(s: &str) -> bool {
    let path = s.split(['?', '#']).next().unwrap_or(s);
    (s.starts_with("https://") || s.starts_with("http://"))
        && [".tar.gz", ".tgz", ".tar"]
            .iter()
            .any(|e| path.ends_with(e))
}

/// Largest tarball context downloaded, and the longest the download may take.
pub const MAX_TARBALL_BYTES: u64 = 1 << 30;
const TARBALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Downloads a tarball context (gzip-compressed or not) and unpacks it into `dest`; no
/// entry may land outside it. Blocking: call it off async threads.
pub fn fetch_tarball(url: &str, dest: &Path) -> Result<(), SourceError> {
    let fail = |reason: String| SourceError::Tarball {
        url: url.to_string(),
        reason,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let file = tempfile::tempfile().map_err(|e| fail(format!("temp file: {e}")))?;
    let mut file = rt.block_on(async {
        use futures_util::StreamExt;
        let client = reqwest::Client::builder()
            .timeout(TARBALL_TIMEOUT)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("the server answered {}", resp.status())));
        }
        let mut file = file;
        let mut got: u64 = 0;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| fail(e.to_string()))?;
            got += chunk.len() as u64;
            if got > MAX_TARBALL_BYTES {
                return Err(fail(format!("larger than {MAX_TARBALL_BYTES} bytes")));
            }
            file.write_all(&chunk)
                .map_err(|e| fail(format!("temp file: {e}")))?;
        }
        Ok(file)
    })?;
    use std::io::{Read, Seek};
    file.rewind().map_err(|e| fail(e.to_string()))?;
    let mut magic = [0u8; 2];
    let gz = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    file.rewind().map_err(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(dest).map_err(io_err(dest))?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    // `unpack` keeps every entry inside `dest` (no absolute paths, no `..`, no writing
    // through a link that leads out).
    tar::Archive::new(reader)
        .unpack(dest)
        .map_err(|e| fail(format!("not a tar archive, or a bad one: {e}")))
}

/// Clones `url` into `dest` and checks out `reference` (a branch, tag or commit; the remote
/// HEAD when empty).
pub fn fetch_git(url: &str, reference: &str, dest: &Path) -> Result<GitCheckout, SourceError> {
    let git = |e: git2::Error| SourceError::Git {
        url: url.to_string(),
        reason: e.message().to_string(),
    };
    let repo = git2::Repository::clone(url, dest).map_err(git)?;
    let mut branch = String::new();
    if reference.is_empty() {
        if let Ok(head) = repo.head() {
            if head.is_branch() {
                branch = head.shorthand().unwrap_or_default().to_string();
            }
        }
    } else {
        let (object, is_branch) = match repo.revparse_single(&format!("origin/{reference}")) {
            Ok(o) => (o, true),
            Err(_) => (repo.revparse_single(reference).map_err(git)?, false),
        };
        if is_branch {
            branch = reference.to_string();
        }
        repo.checkout_tree(&object, Some(git2::build::CheckoutBuilder::new().force()))
            .map_err(git)?;
        repo.set_head_detached(object.peel_to_commit().map_err(git)?.id())
            .map_err(git)?;
    }
    let commit = repo.head().and_then(|h| h.peel_to_commit()).map_err(git)?;
    Ok(GitCheckout {
        commit: commit.id().to_string(),
        branch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_links_resolve_from_the_mount_point() {
        assert_eq!(
            escaping_link("a", "../x", "/workspace").as_deref(),
            Some("/x")
        );
        assert_eq!(
            escaping_link("d/e/l", "../../../etc/passwd", "/workspace").as_deref(),
            Some("/etc/passwd")
        );
        assert_eq!(escaping_link("d/l", "../f", "/workspace"), None);
        assert_eq!(escaping_link("l", "/etc/passwd", "/workspace"), None);
        assert_eq!(escaping_link("l", "sub/./f", "/workspace"), None);
        assert_eq!(
            escaping_link("l", "../../../../x", "/workspace").as_deref(),
            Some("/x")
        );
    }

    #[test]
    fn dockerignore_follows_docker_rules() {
        let ig = DockerIgnore::parse(
            "# comment\n*.log\n/target\n**/secret.txt\nnode_modules\n!keep.log\n",
        )
        .unwrap();
        assert!(ig.is_excluded("a.log"));
        assert!(
            !ig.is_excluded("sub/a.log"),
            "patterns are anchored at the root"
        );
        assert!(!ig.is_excluded("keep.log"), "! re-includes");
        assert!(
            ig.is_excluded("target/debug/x"),
            "children of excluded dirs"
        );
        assert!(ig.is_excluded("deep/er/secret.txt"));
        assert!(ig.is_excluded("secret.txt"));
        assert!(ig.is_excluded("node_modules"));
        assert!(!ig.is_excluded("src/main.rs"));
    }

    #[test]
    fn tar_context_skips_ignored_files_but_keeps_dockerfile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM x\n").unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "*\n!app\n").unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::write(dir.path().join("app/main.sh"), "echo").unwrap();
        std::fs::write(dir.path().join("junk"), "x").unwrap();
        let bytes = tar_context(dir.path(), "Dockerfile", Vec::new()).unwrap();
        let mut names: Vec<String> = tar::Archive::new(&bytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![".dockerignore", "Dockerfile", "app", "app/main.sh"]
        );
    }

    #[test]
    fn rebased_archive_becomes_a_filtered_context() {
        // As the engine's archive API returns `/workspace/app`: everything under `app/`.
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        };
        add("app/.dockerignore", b"*.log\n");
        add("app/Dockerfile", b"FROM busybox\n");
        add("app/bin/tool", b"built by an earlier step");
        add("app/debug.log", b"noise");
        let input = b.into_inner().unwrap();
        let out = rebase_context_tar(&input, "Dockerfile").unwrap();
        let mut names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![".dockerignore", "Dockerfile", "bin/tool"]);
    }

    #[test]
    fn fetch_git_checks_out_the_named_ref() {
        let origin = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init(origin.path()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let commit_file = |content: &str, parents: &[&git2::Commit]| {
            std::fs::write(origin.path().join("f.txt"), content).unwrap();
            let mut idx = repo.index().unwrap();
            idx.add_path(Path::new("f.txt")).unwrap();
            let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
            let id = repo
                .commit(Some("HEAD"), &sig, &sig, content, &tree, parents)
                .unwrap();
            repo.find_commit(id).unwrap()
        };
        let first = commit_file("one", &[]);
        let _second = commit_file("two", &[&first]);
        let dest = tempfile::tempdir().unwrap();
        let url = format!("file://{}", origin.path().display());
        let got = fetch_git(&url, &first.id().to_string(), &dest.path().join("c")).unwrap();
        assert_eq!(got.commit, first.id().to_string());
        assert_eq!(got.branch, "", "a commit is not a branch");
        assert_eq!(
            std::fs::read_to_string(dest.path().join("c/f.txt")).unwrap(),
            "one"
        );
        assert_eq!(
            git_head(&dest.path().join("c")).unwrap().0,
            first.id().to_string()
        );
    }
}
