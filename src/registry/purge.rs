//! `acr-task purge` (acr-cli's `acr purge`): tags older than `--ago` whose repository and
//! name match a `--filter REPO_REGEX:TAG_REGEX` go, except the newest `--keep`; with
//! `--untagged`, manifests no tag names any more go too. The plan is plain data made from
//! a repository's view; every delete is then made through [`super::service`] on the
//! condition the plan saw (the tag still names that digest; the manifest is still
//! unnamed), so a push racing the purge is never undone, and nothing still named by a
//! tag, an index or a referrer is deleted from under it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::store::RepoView;

/// A refused purge request, in the user's words.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error(
        "--filter {0:?}: give REPOSITORY_REGEX:TAG_REGEX, e.g. 'hello-world:^v1\\.' or '.*:.*'"
    )]
    Filter(String),
    #[error("--filter {filter:?}: {why}")]
    Regex { filter: String, why: String },
    #[error(
        "--ago {0:?}: give days and/or a duration, e.g. 30d, 1d12h, 90m, 45s (acr purge's format)"
    )]
    Ago(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Limit(#[from] crate::tier::LimitError),
}

/// What to purge (the JSON body of `POST /api/registry/purge`, too).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PurgeRequest {
    /// `REPO_REGEX:TAG_REGEX`, one or more.
    pub filters: Vec<String>,
    /// `[N]d[DURATION]`: tags (and untagged manifests) last pushed before this long ago.
    pub ago: String,
    /// The newest this many of the tags that would go stay.
    #[serde(default)]
    pub keep: usize,
    /// Also manifests no tag names (after the tags go), as old as `ago`.
    #[serde(default)]
    pub untagged: bool,
    /// Only manifests no tag names; no tag is deleted (acr purge's `--untagged-only`; a
    /// retention policy).
    #[serde(default)]
    pub untagged_only: bool,
    #[serde(default)]
    pub dry_run: bool,
    /// Repositories purged at once.
    #[serde(default)]
    pub concurrency: Option<usize>,
}

/// A repository filter: the repository pattern matches the whole name, the tag pattern
/// anywhere in the tag (as acr purge reads them).
#[derive(Debug, Clone)]
pub struct Filter {
    pub repo: regex::Regex,
    pub tag: regex::Regex,
}

/// Patterns are bounded: a filter from a request must not cost the server unbounded work.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub fn parse_filter(s: &str) -> Result<Filter, PurgeError> {
    let (repo, tag) = s
        .split_once(':')
        .filter(|(r, t)| !r.is_empty() && !t.is_empty())
        .ok_or_else(|| PurgeError::Filter(s.to_string()))?;
    let build = |p: &str| {
        regex::RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| PurgeError::Regex {
                filter: s.to_string(),
                why: e.to_string(),
            })
    };
    Ok(Filter {
        repo: build(&format!("^(?:{repo})$"))?,
        tag: build(tag)?,
    })
}

/// acr purge's `--ago`: `[N]d` followed by a Go-style duration of h, m, s (`2d3h6m`,
/// `30d`, `90m`), in seconds; capped at 150 years as acr purge caps it.
pub fn parse_ago(s: &str) -> Result<i64, PurgeError> {
    const CAP: i64 = 150 * 365 * 86_400;
    let bad = || PurgeError::Ago(s.to_string());
    let mut total: i64 = 0;
    let mut number = String::new();
    let mut units = 0;
    let mut seen_days = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: i64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let unit = match c {
            'd' if !seen_days && units == 0 => {
                seen_days = true;
                86_400
            }
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        units += 1;
        total = total.saturating_add(n.saturating_mul(unit));
    }
    if !number.is_empty() || units == 0 {
        return Err(bad());
    }
    Ok(total.min(CAP))
}

/// Something a purge left although it looked at it, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Kept {
    /// `repo:tag` or `repo@digest`.
    pub item: String,
    pub why: String,
}

/// One repository's purge, in the order its deletes must be made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoPlan {
    /// (tag, the digest it named when planned)
    pub tags: Vec<(String, String)>,
    /// Untagged manifests, each after every index that named it.
    pub manifests: Vec<String>,
    pub kept: Vec<Kept>,
}

/// What one repository's purge goes by.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The tag patterns of the filters that match the repository.
    pub patterns: &'a [&'a regex::Regex],
    pub ago_secs: i64,
    pub keep: usize,
    pub untagged: bool,
    /// Tags locked against deletes (write- or delete-enabled false): they stay.
    pub locked: &'a BTreeSet<String>,
}

/// The plan for `repo` as `view` shows it at `now` (Unix seconds).
pub fn plan_repo(repo: &str, view: &RepoView, rules: Rules<'_>, now: i64) -> RepoPlan {
    let Rules {
        patterns,
        ago_secs,
        keep,
        untagged,
        locked,
    } = rules;
    let cutoff = now.saturating_sub(ago_secs);
    let mut plan = RepoPlan::default();
    let candidates = view
        .tags
        .iter()
        .filter(|t| t.updated <= cutoff && patterns.iter().any(|p| p.is_match(&t.tag)));
    // Newest first, so --keep keeps the newest.
    let mut eligible = Vec::new();
    for t in candidates {
        if locked.contains(&t.tag) {
            plan.kept.push(Kept {
                item: format!("{repo}:{}", t.tag),
                why: "locked (write-enabled or delete-enabled false)".into(),
            });
        } else {
            eligible.push(t);
        }
    }
    eligible.sort_by(|a, b| b.updated.cmp(&a.updated).then(a.tag.cmp(&b.tag)));
    for (i, t) in eligible.iter().enumerate() {
        if i < keep {
            plan.kept.push(Kept {
                item: format!("{repo}:{}", t.tag),
                why: format!("--keep {keep}: one of the newest that match"),
            });
        } else {
            plan.tags.push((t.tag.clone(), t.digest.clone()));
        }
    }
    if !untagged {
        return plan;
    }
    let going: BTreeSet<&str> = plan.tags.iter().map(|(t, _)| t.as_str()).collect();
    let mut tags_left: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in &view.tags {
        if !going.contains(t.tag.as_str()) {
            tags_left.entry(&t.digest).or_default().push(&t.tag);
        }
    }
    let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut referrers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for m in &view.manifests {
        for c in &m.children {
            parents.entry(c).or_default().push(&m.digest);
        }
        if let Some(s) = &m.subject {
            referrers.entry(s).or_default().push(&m.digest);
        }
    }
    // Manifests whose tags all go (or had none), old enough, and not referrers.
    let candidates: Vec<&crate::store::ManifestBrief> = view
        .manifests
        .iter()
        .filter(|m| m.created <= cutoff && m.subject.is_none())
        .filter(|m| !tags_left.contains_key(m.digest.as_str()))
        .collect();
    // An index goes before the manifests it names: repeat until nothing more can go.
    let mut gone: BTreeSet<&str> = BTreeSet::new();
    loop {
        let before = gone.len();
        for m in &candidates {
            let d = m.digest.as_str();
            if gone.contains(d) || referrers.contains_key(d) {
                continue;
            }
            let named = parents
                .get(d)
                .is_some_and(|ps| ps.iter().any(|p| !gone.contains(p)));
            if !named {
                gone.insert(d);
                plan.manifests.push(m.digest.clone());
            }
        }
        if gone.len() == before {
            break;
        }
    }
    // Say why the rest of what the purge touched stays.
    let touched: BTreeSet<&str> = plan.tags.iter().map(|(_, d)| d.as_str()).collect();
    for m in &view.manifests {
        let d = m.digest.as_str();
        if gone.contains(d) {
            continue;
        }
        let why = if let Some(tags) = tags_left.get(d) {
            // Only worth saying for a manifest that lost a tag here.
            if !touched.contains(d) {
                continue;
            }
            format!("still tagged {}", tags.join(", "))
        } else if let Some(rs) = referrers.get(d) {
            format!(
                "has {} referrer(s) (signatures, SBOMs) that name it",
                rs.len()
            )
        } else if let Some(s) = &m.subject {
            format!("a referrer of {s}")
        } else if let Some(ps) = parents.get(d) {
            format!("named by index {}", ps.join(", "))
        } else {
            format!("newer than --ago ({} s old)", now.saturating_sub(m.created))
        };
        plan.kept.push(Kept {
            item: format!("{repo}@{d}"),
            why,
        });
    }
    plan
}

/// What a purge did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PurgeReport {
    pub dry_run: bool,
    pub repositories: usize,
    /// `repo:tag`
    pub tags_deleted: Vec<String>,
    /// `repo@digest`
    pub manifests_deleted: Vec<String>,
    pub kept: Vec<Kept>,
    pub seconds: f64,
}

/// Plans and (unless dry) makes a purge of `reg`'s store. Blocking: run it off the async
/// threads.
pub fn run(
    store: &crate::store::Store,
    req: &PurgeRequest,
    ctx: &super::RequestContext,
    announce: Announce<'_>,
) -> Result<PurgeReport, PurgeError> {
    let started = std::time::Instant::now();
    if req.filters.is_empty() {
        return Err(PurgeError::Filter(String::new()));
    }
    let filters: Vec<Filter> = req
        .filters
        .iter()
        .map(|f| parse_filter(f))
        .collect::<Result<_, _>>()?;
    let ago = parse_ago(&req.ago)?;
    store.properties()?.check_managed("purges")?;
    let now = chrono::Utc::now().timestamp();
    let mut repos: Vec<(String, Vec<&regex::Regex>)> = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = store.list_repositories(Some(1000), last.as_deref())?;
        let Some(end) = page.last().cloned() else {
            break;
        };
        for r in page {
            let tags: Vec<&regex::Regex> = filters
                .iter()
                .filter(|f| f.repo.is_match(&r))
                .map(|f| &f.tag)
                .collect();
            if !tags.is_empty() {
                repos.push((r, tags));
            }
        }
        last = Some(end);
    }
    let workers = req.concurrency.unwrap_or(4).clamp(1, 32);
    let pass = Pass {
        store,
        req,
        ago,
        now,
        ctx,
        announce,
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers.min(repos.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((repo, tags)) = repos.get(i) else {
                    break;
                };
                let r = purge_repo(&pass, repo, tags);
                if let Ok(mut all) = results.lock() {
                    all.push((i, r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);
    let mut report = PurgeReport {
        dry_run: req.dry_run,
        repositories: repos.len(),
        ..PurgeReport::default()
    };
    for (_, r) in results {
        let (tags, manifests, kept) = r?;
        report.tags_deleted.extend(tags);
        report.manifests_deleted.extend(manifests);
        report.kept.extend(kept);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// One pass of the registry's retention policy, when it is enabled: manifests no tag,
/// index or referrer names, older than its days, go (`None`: no policy to apply).
pub fn retention_pass(
    store: &crate::store::Store,
    announce: Announce<'_>,
) -> Result<Option<PurgeReport>, PurgeError> {
    let Some(policy) = store.properties()?.retention.filter(|r| r.enabled()) else {
        return Ok(None);
    };
    let req = PurgeRequest {
        filters: vec![".*:.*".into()],
        ago: format!("{}d", policy.days),
        untagged_only: true,
        concurrency: Some(2),
        ..PurgeRequest::default()
    };
    let ctx = super::RequestContext::of_tool(
        "RETENTION",
        "acr-task-retention",
        String::new(),
        String::new(),
    );
    let report = run(store, &req, &ctx, announce)?;
    if !report.manifests_deleted.is_empty() {
        tracing::info!(
            manifests = report.manifests_deleted.len(),
            days = policy.days,
            "retention policy: untagged manifests deleted"
        );
    }
    Ok(Some(report))
}

type Done = (Vec<String>, Vec<String>, Vec<Kept>);

/// The repository was locked after the plan read it: what was deleted stays deleted, the
/// rest stays, with the reason.
fn locked_since(
    repo: &str,
    e: &crate::tier::LimitError,
    tags: Vec<String>,
    manifests: Vec<String>,
    mut kept: Vec<Kept>,
) -> Done {
    kept.push(Kept {
        item: repo.to_string(),
        why: format!("stopped: {e}"),
    });
    (tags, manifests, kept)
}

/// Deletes made in one transaction.
const BATCH: usize = 256;

/// Wakes the registry's event consumers for events a purge committed (they read the
/// outbox; this only saves them waiting for their next look).
pub type Announce<'a> = &'a (dyn Fn(Vec<super::StoredEvent>) + Sync);

/// What every repository of one purge shares.
struct Pass<'a> {
    store: &'a crate::store::Store,
    req: &'a PurgeRequest,
    ago: i64,
    now: i64,
    ctx: &'a super::RequestContext,
    announce: Announce<'a>,
}

fn purge_repo(pass: &Pass<'_>, repo: &str, tags: &[&regex::Regex]) -> Result<Done, PurgeError> {
    let Pass {
        store,
        req,
        ago,
        now,
        ctx,
        announce,
    } = *pass;
    let Some(view) = store.repo_view(repo)? else {
        return Ok(Default::default());
    };
    let locks = store.locks(repo)?;
    let denies = |a: &crate::store::Attributes| !a.write_enabled || !a.delete_enabled;
    if locks
        .iter()
        .any(|l| l.tag.is_none() && denies(&l.attributes))
    {
        let kept = vec![Kept {
            item: repo.to_string(),
            why: "the repository is locked (write-enabled or delete-enabled false)".into(),
        }];
        return Ok((Vec::new(), Vec::new(), kept));
    }
    let locked: BTreeSet<String> = locks
        .into_iter()
        .filter(|l| denies(&l.attributes))
        .filter_map(|l| l.tag)
        .collect();
    let rules = if req.untagged_only {
        Rules {
            patterns: &[],
            ago_secs: ago,
            keep: 0,
            untagged: true,
            locked: &locked,
        }
    } else {
        Rules {
            patterns: tags,
            ago_secs: ago,
            keep: req.keep,
            untagged: req.untagged,
            locked: &locked,
        }
    };
    let plan = plan_repo(repo, &view, rules, now);
    let mut kept = plan.kept;
    if req.dry_run {
        return Ok((
            plan.tags
                .iter()
                .map(|(t, _)| format!("{repo}:{t}"))
                .collect(),
            plan.manifests
                .iter()
                .map(|d| format!("{repo}@{d}"))
                .collect(),
            kept,
        ));
    }
    // In batches: one transaction (one sync to disk) for many deletes, short enough not
    // to hold pushes back.
    let mut tags_done = Vec::new();
    for batch in plan.tags.chunks(BATCH) {
        let (done, events) = match super::service::delete_tags_if(store, repo, batch, ctx) {
            Err(crate::store::StoreError::Limit(e)) => {
                return Ok(locked_since(repo, &e, tags_done, Vec::new(), kept))
            }
            r => r?,
        };
        announce(events);
        for (tag, _) in batch {
            if done.contains(tag) {
                tags_done.push(format!("{repo}:{tag}"));
            } else {
                kept.push(Kept {
                    item: format!("{repo}:{tag}"),
                    why: "pushed again (or deleted) since the purge read it".into(),
                });
            }
        }
    }
    let mut manifests_done = Vec::new();
    for batch in plan.manifests.chunks(BATCH) {
        let (done, events) = match super::service::delete_unreferenced(store, repo, batch, ctx) {
            Err(crate::store::StoreError::Limit(e)) => {
                return Ok(locked_since(repo, &e, tags_done, manifests_done, kept))
            }
            r => r?,
        };
        announce(events);
        for d in batch {
            if done.contains(d) {
                manifests_done.push(format!("{repo}@{d}"));
            } else {
                kept.push(Kept {
                    item: format!("{repo}@{d}"),
                    why: "tagged or named again (or deleted) since the purge read it".into(),
                });
            }
        }
    }
    Ok((tags_done, manifests_done, kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ManifestBrief, TagRow};

    fn rules<'a>(
        patterns: &'a [&'a regex::Regex],
        ago_secs: i64,
        keep: usize,
        untagged: bool,
        locked: &'a BTreeSet<String>,
    ) -> Rules<'a> {
        Rules {
            patterns,
            ago_secs,
            keep,
            untagged,
            locked,
        }
    }

    fn tag(t: &str, d: &str, updated: i64) -> TagRow {
        TagRow {
            tag: t.into(),
            digest: d.into(),
            updated,
        }
    }

    fn man(d: &str, created: i64, children: &[&str], subject: Option<&str>) -> ManifestBrief {
        ManifestBrief {
            digest: d.into(),
            created,
            subject: subject.map(str::to_string),
            children: children.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn ago_reads_as_acr_purge_reads_it() {
        assert_eq!(parse_ago("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_ago("2d3h6m").unwrap(), 2 * 86_400 + 3 * 3600 + 6 * 60);
        assert_eq!(parse_ago("1h15m").unwrap(), 4500);
        assert_eq!(parse_ago("0d").unwrap(), 0);
        assert_eq!(parse_ago("45s").unwrap(), 45);
        assert_eq!(parse_ago("99999999d").unwrap(), 150 * 365 * 86_400);
        for bad in ["", "d", "3", "1w", "1h2d", "1d1d", "-1d", "1.5h"] {
            assert!(parse_ago(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn filters_match_whole_repositories_and_tags_anywhere() {
        let f = parse_filter("app/.*:^v1").unwrap();
        assert!(f.repo.is_match("app/web") && !f.repo.is_match("xapp/web"));
        assert!(f.tag.is_match("v1.2") && !f.tag.is_match("2v1"));
        let f = parse_filter("hello:world").unwrap();
        assert!(!f.repo.is_match("hello-x") && f.tag.is_match("big-world-1"));
        assert!(parse_filter("no-colon").is_err());
        assert!(parse_filter(":tag").is_err());
        let e = parse_filter("app:(").unwrap_err().to_string();
        assert!(e.contains("--filter \"app:(\""), "{e}");
    }

    #[test]
    fn old_matching_tags_go_but_the_newest_keep() {
        let view = RepoView {
            tags: vec![
                tag("v1", "sha256:a", 100),
                tag("v2", "sha256:b", 200),
                tag("v3", "sha256:c", 300),
                tag("latest", "sha256:c", 300),
                tag("v4", "sha256:d", 990),
            ],
            manifests: vec![],
        };
        let any = regex::Regex::new("^v").unwrap();
        let locked = BTreeSet::from(["v1".to_string()]);
        let p = plan_repo("app", &view, rules(&[&any], 500, 1, false, &locked), 1000);
        assert_eq!(p.tags, [("v2".to_string(), "sha256:b".to_string())]);
        assert_eq!(p.kept[0].item, "app:v1");
        assert!(p.kept[0].why.starts_with("locked"));
        assert_eq!(p.kept[1].item, "app:v3");
        assert!(p.kept[1].why.contains("--keep 1"));
        assert!(p.manifests.is_empty());
    }

    #[test]
    fn untagged_manifests_go_unless_something_still_names_them() {
        // idx (tagged "multi", which goes) names p1 and p2; sig is a referrer of "b";
        // "b" keeps tag "stable"; "c" loses "old" but is too new; "d" is plain untagged.
        let view = RepoView {
            tags: vec![
                tag("multi", "sha256:idx", 10),
                tag("old", "sha256:b", 10),
                tag("stable", "sha256:b", 10),
                tag("old2", "sha256:c", 10),
            ],
            manifests: vec![
                man("sha256:idx", 10, &["sha256:p1", "sha256:p2"], None),
                man("sha256:p1", 10, &[], None),
                man("sha256:p2", 10, &[], None),
                man("sha256:b", 10, &[], None),
                man("sha256:sig", 10, &[], Some("sha256:b")),
                man("sha256:c", 990, &[], None),
                man("sha256:d", 10, &[], None),
            ],
        };
        let f = regex::Regex::new("^(multi|old2?)$").unwrap();
        let p = plan_repo(
            "app",
            &view,
            rules(&[&f], 100, 0, true, &BTreeSet::new()),
            1000,
        );
        let tags: Vec<&str> = p.tags.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, ["multi", "old", "old2"]);
        // The index goes first, then what it named.
        assert_eq!(
            p.manifests,
            ["sha256:idx", "sha256:p1", "sha256:p2", "sha256:d"]
        );
        let why = |item: &str| {
            p.kept
                .iter()
                .find(|k| k.item == item)
                .map(|k| k.why.clone())
                .unwrap_or_default()
        };
        assert_eq!(why("app@sha256:b"), "still tagged stable");
        assert_eq!(why("app@sha256:sig"), "a referrer of sha256:b");
        assert!(
            why("app@sha256:c").starts_with("newer than --ago"),
            "{:?}",
            p.kept
        );
    }

    #[test]
    fn an_index_that_stays_keeps_what_it_names() {
        let view = RepoView {
            tags: vec![tag("multi", "sha256:idx", 10)],
            manifests: vec![
                man("sha256:idx", 10, &["sha256:p1"], None),
                man("sha256:p1", 10, &[], None),
            ],
        };
        let none = regex::Regex::new("^nothing$").unwrap();
        let p = plan_repo(
            "app",
            &view,
            rules(&[&none], 0, 0, true, &BTreeSet::new()),
            1000,
        );
        assert!(p.manifests.is_empty());
        assert_eq!(p.kept[0].item, "app@sha256:p1");
        assert_eq!(p.kept[0].why, "named by index sha256:idx");
    }
}
