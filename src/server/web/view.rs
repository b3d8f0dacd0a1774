//! What the pages show, as plain data made from the stores' records (no I/O here): rows of
//! the runs list, a run's steps laid out as a graph, image sizes and platforms read from a
//! manifest. The templates (`pages`) only draw these.

use serde::Serialize;

use crate::exec::Status;
use crate::server::live::StepState;
use crate::server::model::{RunRecord, Trigger};

/// A trigger in a few words, with what it points at (a commit, a base image's digest).
pub fn trigger_text(t: &Trigger) -> (String, Option<String>) {
    match t {
        Trigger::Manual => ("manual".into(), None),
        Trigger::Quick => ("quick run".into(), None),
        Trigger::Commit {
            source,
            commit,
            branch,
            ..
        } => (
            format!("commit ({source}) on {branch}"),
            Some(short_hash(commit).to_string()),
        ),
        Trigger::BaseImage {
            image, new_digest, ..
        } => (
            format!("base image {image}"),
            Some(short_hash(new_digest).to_string()),
        ),
        Trigger::Timer { name, schedule, .. } => (format!("timer {name} ({schedule})"), None),
    }
}

/// The first 12 hex digits of a commit or digest.
pub fn short_hash(s: &str) -> &str {
    let hex = s.split_once(':').map_or(s, |(_, h)| h);
    // By characters: a commit given to the API is not checked to be hex.
    let end = hex.char_indices().nth(12).map_or(hex.len(), |(i, _)| i);
    &hex[..end]
}

/// Milliseconds as people read a duration.
pub fn duration_text(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms} ms"),
        1..=59 => format!("{:.1} s", ms as f64 / 1000.0),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s / 60) % 60),
    }
}

/// How long a run took (or has run so far), from its record's times.
pub fn run_duration(r: &RunRecord, now: chrono::DateTime<chrono::Utc>) -> Option<u64> {
    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
    let start = parse(r.started_at.as_deref()?)?;
    let end = match r.finished_at.as_deref() {
        Some(f) => parse(f)?.with_timezone(&chrono::Utc),
        None => now,
    };
    Some(
        (end - start.with_timezone(&chrono::Utc))
            .num_milliseconds()
            .max(0) as u64,
    )
}

/// A step as the run page draws it: from the live state while the run runs, from the
/// stored report after.
pub fn steps_of(r: &RunRecord, live: Option<Vec<StepState>>) -> Vec<StepState> {
    if let Some(l) = live {
        return l;
    }
    r.report
        .as_ref()
        .map(|rep| {
            rep.steps
                .iter()
                .map(|s| StepState {
                    id: s.id.clone(),
                    kind: s.kind.clone(),
                    needs: s.needs.clone(),
                    status: s.status,
                    attempts: s.attempts,
                    started_ms: s.started_ms,
                    duration_ms: s.duration_ms,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One node of the drawn graph.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub index: usize,
    pub id: String,
    pub status: Status,
    pub x: u32,
    pub y: u32,
}

/// One edge: from the step waited for to the step that waits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub width: u32,
    pub height: u32,
}

pub const NODE_W: u32 = 150;
pub const NODE_H: u32 = 36;
const GAP_X: u32 = 60;
const GAP_Y: u32 = 18;
const MARGIN: u32 = 10;

/// Lays the steps out left to right: a step's column is one more than the deepest step it
/// waits for; within a column, steps keep their order in the task file.
pub fn layout(steps: &[StepState]) -> Graph {
    let index = |id: &str| steps.iter().position(|s| s.id == id);
    let mut edges = Vec::new();
    for (to, s) in steps.iter().enumerate() {
        for n in &s.needs {
            if let Some(from) = index(n) {
                edges.push(Edge { from, to });
            }
        }
    }
    // Depths by repeated relaxation (the plan has no cycles; the bound guards bad input).
    let mut depth = vec![0u32; steps.len()];
    for _ in 0..steps.len() {
        let mut moved = false;
        for e in &edges {
            if depth[e.to] < depth[e.from] + 1 {
                depth[e.to] = depth[e.from] + 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let mut rows = vec![0u32; steps.len() + 1];
    let mut nodes = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let col = depth[i] as usize;
        let row = rows[col];
        rows[col] += 1;
        nodes.push(Node {
            index: i,
            id: s.id.clone(),
            status: s.status,
            x: MARGIN + depth[i] * (NODE_W + GAP_X),
            y: MARGIN + row * (NODE_H + GAP_Y),
        });
    }
    let cols = depth.iter().max().map_or(0, |d| d + 1);
    let tallest = rows.iter().max().copied().unwrap_or(0);
    Graph {
        nodes,
        edges,
        width: 2 * MARGIN + cols * NODE_W + cols.saturating_sub(1) * GAP_X,
        height: 2 * MARGIN + tallest * NODE_H + tallest.saturating_sub(1) * GAP_Y,
    }
}

/// What a manifest says of the image: its size (the manifest, config and layers) and, for
/// an index, its platforms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageFacts {
    pub size: u64,
    pub platforms: Vec<String>,
}

pub fn image_facts(content: &[u8]) -> ImageFacts {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(content) else {
        return ImageFacts {
            size: content.len() as u64,
            platforms: vec![],
        };
    };
    let size_of = |d: &serde_json::Value| d.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
    let mut size = content.len() as u64;
    if let Some(c) = v.get("config") {
        size += size_of(c);
    }
    for l in v
        .get("layers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        size += size_of(l);
    }
    let platforms = v
        .get("manifests")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let p = m.get("platform")?;
            let os = p.get("os")?.as_str()?;
            let arch = p.get("architecture")?.as_str()?;
            Some(match p.get("variant").and_then(|v| v.as_str()) {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            })
        })
        .collect();
    ImageFacts { size, platforms }
}

/// What a manifest is, as people say it: `image`, `index`, else its artifact type.
pub fn manifest_kind(artifact_type: Option<&str>, media_type: &str) -> String {
    const IMAGE: [&str; 2] = [
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    ];
    const INDEX: [&str; 2] = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ];
    match artifact_type {
        Some(a) if IMAGE.contains(&a) => "image".into(),
        Some(a) => a.into(),
        None if INDEX.contains(&media_type) => "index".into(),
        None if media_type.contains("manifest") => "image".into(),
        None => media_type.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str, needs: &[&str]) -> StepState {
        StepState {
            id: id.into(),
            kind: "cmd".into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            status: Status::Queued,
            attempts: 0,
            started_ms: 0,
            duration_ms: 0,
        }
    }

    #[test]
    fn a_diamond_takes_three_columns_and_four_edges() {
        let g = layout(&[
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]),
        ]);
        assert_eq!(g.edges.len(), 4);
        let xs: Vec<u32> = g.nodes.iter().map(|n| n.x).collect();
        assert_eq!(xs[1], xs[2]);
        assert!(xs[0] < xs[1] && xs[1] < xs[3]);
        assert_ne!(g.nodes[1].y, g.nodes[2].y);
        assert_eq!(g.width, 2 * MARGIN + 3 * NODE_W + 2 * GAP_X);
    }

    #[test]
    fn unknown_needs_draw_no_edge() {
        let g = layout(&[step("a", &["gone"])]);
        assert!(g.edges.is_empty());
        assert_eq!(g.nodes[0].x, MARGIN);
    }

    #[test]
    fn manifests_are_named_as_people_say() {
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let cfg = "application/vnd.oci.image.config.v1+json";
        assert_eq!(manifest_kind(Some(cfg), oci), "image");
        assert_eq!(manifest_kind(None, oci), "image");
        assert_eq!(
            manifest_kind(None, "application/vnd.oci.image.index.v1+json"),
            "index"
        );
        let sig = "application/vnd.dev.cosign.artifact.sig.v1+json";
        assert_eq!(manifest_kind(Some(sig), oci), sig);
    }

    #[test]
    fn sizes_and_platforms_come_from_the_manifest() {
        let m = br#"{"config":{"size":10},"layers":[{"size":100},{"size":1000}]}"#;
        assert_eq!(image_facts(m).size, m.len() as u64 + 1110);
        let i =
            br#"{"manifests":[{"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"platform":{"os":"linux","architecture":"amd64"}}]}"#;
        assert_eq!(
            image_facts(i).platforms,
            vec!["linux/arm64/v8", "linux/amd64"]
        );
        assert_eq!(duration_text(61_000), "1m 01s");
        assert_eq!(short_hash("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_hash("a€€€€€€€€€€€€€€"), "a€€€€€€€€€€€");
    }
}
