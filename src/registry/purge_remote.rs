//! A purge over the wire (the `acr` image's `acr purge`, inside a task): the repository's
//! view comes from ACR's `/acr/v1/{name}/_tags` and `_manifests`, the plan is the same
//! [`super::purge::plan_repo`] the server's purge makes, and each delete is conditional on
//! what the plan saw (a tag only while it names the planned digest, a manifest only while
//! nothing names it), so a push racing the purge is never undone. Each request carries the
//! caller's own rights: a repository it may not delete in is refused there, not here.

use std::collections::BTreeSet;

use serde_json::Value;

use super::client::{ClientError, RegistryClient};
use super::purge::{
    parse_ago, parse_filter, plan_repo, Kept, PurgeError, PurgeReport, PurgeRequest, Rules,
};
use crate::store::{ManifestBrief, RepoView, TagRow};

#[derive(Debug, thiserror::Error)]
pub enum RemotePurgeError {
    #[error(transparent)]
    Purge(#[from] PurgeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}: the registry's answer is not ACR's tag or manifest listing")]
    Malformed(String),
}

fn secs(v: &Value) -> i64 {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp())
        .unwrap_or(0)
}

fn locked(attrs: &Value) -> bool {
    attrs["deleteEnabled"] == false || attrs["writeEnabled"] == false
}

async fn get_json(
    client: &RegistryClient,
    path: &str,
    repo: &str,
) -> Result<Option<Value>, RemotePurgeError> {
    let r = client
        .request(reqwest::Method::GET, path, &super::client::pull(repo))
        .await?;
    if r.status == 404 {
        return Ok(None);
    }
    if !(200..300).contains(&r.status) {
        return Err(ClientError::Status {
            method: "GET".into(),
            path: path.to_string(),
            status: r.status,
            body: super::client::summary(&r.body),
        }
        .into());
    }
    serde_json::from_slice(&r.body)
        .map(Some)
        .map_err(|_| RemotePurgeError::Malformed(path.to_string()))
}

/// A repository as a purge plans it: its view, locked tags, and whether it is locked whole.
async fn view(
    client: &RegistryClient,
    repo: &str,
) -> Result<Option<(RepoView, BTreeSet<String>, bool)>, RemotePurgeError> {
    let Some(tags) = get_json(client, &format!("/acr/v1/{repo}/_tags"), repo).await? else {
        return Ok(None);
    };
    let Some(ms) = get_json(client, &format!("/acr/v1/{repo}/_manifests"), repo).await? else {
        return Ok(None);
    };
    let bad = || RemotePurgeError::Malformed(format!("/acr/v1/{repo}"));
    let mut view = RepoView::default();
    let mut locked_tags = BTreeSet::new();
    for t in tags["tags"].as_array().ok_or_else(bad)? {
        let (Some(name), Some(digest)) = (t["name"].as_str(), t["digest"].as_str()) else {
            return Err(bad());
        };
        if locked(&t["changeableAttributes"]) {
            locked_tags.insert(name.to_string());
        }
        view.tags.push(TagRow {
            tag: name.to_string(),
            digest: digest.to_string(),
            updated: secs(&t["lastUpdateTime"]),
        });
    }
    for m in ms["manifests"].as_array().ok_or_else(bad)? {
        let digest = m["digest"].as_str().ok_or_else(bad)?;
        view.manifests.push(ManifestBrief {
            digest: digest.to_string(),
            created: secs(&m["createdTime"]),
            subject: m["subject"].as_str().map(str::to_string),
            children: m["references"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    let whole = locked(&tags["changeableAttributes"]);
    Ok(Some((view, locked_tags, whole)))
}

/// A conditional delete: `true` when done, `false` when its condition no longer held
/// (412) or it is gone (404).
async fn delete(
    client: &RegistryClient,
    repo: &str,
    path: &str,
    headers: &[(&str, String)],
) -> Result<bool, RemotePurgeError> {
    let r = client
        .request_with_headers(
            reqwest::Method::DELETE,
            path,
            &format!("repository:{repo}:delete"),
            headers,
        )
        .await?;
    match r.status {
        202 => Ok(true),
        404 | 412 => Ok(false),
        status => Err(ClientError::Status {
            method: "DELETE".into(),
            path: path.to_string(),
            status,
            body: super::client::summary(&r.body),
        }
        .into()),
    }
}

/// Runs `req` against the registry `client` speaks to; `say` hears each line as it goes.
pub async fn run(
    client: &RegistryClient,
    req: &PurgeRequest,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<PurgeReport, RemotePurgeError> {
    let started = std::time::Instant::now();
    if req.filters.is_empty() {
        return Err(PurgeError::Filter(String::new()).into());
    }
    let filters = req
        .filters
        .iter()
        .map(|f| parse_filter(f))
        .collect::<Result<Vec<_>, _>>()?;
    let ago = parse_ago(&req.ago)?;
    let now = chrono::Utc::now().timestamp();
    let mut report = PurgeReport {
        dry_run: req.dry_run,
        ..PurgeReport::default()
    };
    for repo in client.repositories().await? {
        let patterns: Vec<&regex::Regex> = filters
            .iter()
            .filter(|f| f.repo.is_match(&repo))
            .map(|f| &f.tag)
            .collect();
        if patterns.is_empty() {
            continue;
        }
        report.repositories += 1;
        let Some((view, locked_tags, whole)) = view(client, &repo).await? else {
            continue;
        };
        if whole {
            report.kept.push(Kept {
                item: repo.clone(),
                why: "the repository is locked (write-enabled or delete-enabled false)".into(),
            });
            continue;
        }
        let rules = Rules {
            patterns: if req.untagged_only {
                &[]
            } else {
                &patterns[..]
            },
            ago_secs: ago,
            keep: if req.untagged_only { 0 } else { req.keep },
            untagged: req.untagged || req.untagged_only,
            locked: &locked_tags,
        };
        let plan = plan_repo(&repo, &view, rules, now);
        report.kept.extend(plan.kept);
        for (tag, digest) in &plan.tags {
            let item = format!("{repo}:{tag}");
            let path = format!("/acr/v1/{repo}/_tags/{tag}");
            let if_match = [("if-match", format!("\"{digest}\""))];
            if !req.dry_run && !delete(client, &repo, &path, &if_match).await? {
                report.kept.push(Kept {
                    item,
                    why: "pushed again or deleted since the plan".into(),
                });
                continue;
            }
            say(item.clone());
            report.tags_deleted.push(item);
        }
        for digest in &plan.manifests {
            let item = format!("{repo}@{digest}");
            let path = format!("/acr/v1/{repo}/_manifests/{digest}");
            if !req.dry_run && !delete(client, &repo, &path, &[]).await? {
                report.kept.push(Kept {
                    item,
                    why: "named again since the plan (a tag, index or referrer)".into(),
                });
                continue;
            }
            say(item.clone());
            report.manifests_deleted.push(item);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
