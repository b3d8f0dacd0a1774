//! Commit triggers without webhooks: the commit at the tip of a remote branch (polled),
//! and the commit a local checkout's branch points at (watched).

use std::path::Path;

/// The commit `refs/heads/<branch>` points at in the remote `url` (like `git ls-remote`).
pub fn remote_branch_head(url: &str, branch: &str) -> Result<Option<String>, git2::Error> {
    let mut remote = git2::Remote::create_detached(url)?;
    remote.connect(git2::Direction::Fetch)?;
    let want = format!("refs/heads/{branch}");
    let found = remote
        .list()?
        .iter()
        .find(|h| h.name() == want)
        .map(|h| h.oid().to_string());
    let _ = remote.disconnect();
    Ok(found)
}

/// The commit `branch` points at in the local repository holding `dir`.
pub fn local_branch_head(dir: &Path, branch: &str) -> Result<Option<String>, git2::Error> {
    let repo = git2::Repository::discover(dir)?;
    let found = match repo.find_branch(branch, git2::BranchType::Local) {
        Ok(b) => b.get().peel_to_commit().ok().map(|c| c.id().to_string()),
        Err(e) if e.code() == git2::ErrorCode::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(repo: &git2::Repository, msg: &str) -> String {
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let mut idx = repo.index().unwrap();
        let tree = repo.find_tree(idx.write_tree().unwrap()).unwrap();
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, msg, &tree, &parents)
            .unwrap()
            .to_string()
    }

    #[test]
    fn heads_of_local_and_remote_branches() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = git2::Repository::init_opts(dir.path(), &opts).unwrap();
        let c1 = commit(&repo, "one");
        assert_eq!(
            local_branch_head(dir.path(), "main").unwrap(),
            Some(c1.clone())
        );
        let url = format!("file://{}", dir.path().display());
        assert_eq!(remote_branch_head(&url, "main").unwrap(), Some(c1));
        let c2 = commit(&repo, "two");
        assert_eq!(remote_branch_head(&url, "main").unwrap(), Some(c2));
        assert_eq!(remote_branch_head(&url, "nope").unwrap(), None);
    }
}
