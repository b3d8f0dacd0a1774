//! Purge over a registry of 10,000 tags in 100 repositories (one manifest per tag), in one
//! run:
//!
//! - `acr-task purge --dry-run` of every tag with `--untagged` (the plan alone; goal
//!   under 2 s), then the purge itself, done by the registry (tags and manifests deleted
//!   a second);
//! - beside it, what acr-cli's `acr purge` does against a registry: one HTTP DELETE per
//!   tag from the client, 32 at once (its largest pool), against `acr-task serve
//!   --registry-only` holding an identical copy with its write rate unlimited (ACR
//!   Premium's published 2,000 writes a minute would cap it at 33 a second).
//!
//!     cargo bench --bench purge

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use acr_task::registry::purge::{PurgeReport, PurgeRequest};
use acr_task::store::{admit_all, NewManifest, Store};
use futures_util::StreamExt;

const REPOS: usize = 100;
const TAGS: usize = 100;

fn fill(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, true).unwrap();
    for r in 0..REPOS {
        for t in 0..TAGS {
            let content = format!(
                "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
                 \"config\":{{\"mediaType\":\"application/vnd.oci.empty.v1+json\",\
                 \"digest\":\"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\",\
                 \"size\":2}},\"layers\":[],\"annotations\":{{\"n\":\"{r}-{t}\"}}}}"
            )
            .into_bytes();
            let m = NewManifest {
                repo: format!("team{r:03}/app"),
                digest: acr_task::digest::of_bytes(acr_task::digest::Algorithm::Sha256, &content),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                artifact_type: None,
                subject: None,
                content,
                blobs: vec![],
                children: vec![],
                tag: Some(format!("build-{t:03}")),
                sealed: None,
            };
            store.put_manifest(&m, &[], &admit_all).unwrap();
        }
    }
    store
}

fn purge(store: &Store, dry_run: bool) -> PurgeReport {
    let req = PurgeRequest {
        filters: vec![".*:.*".into()],
        ago: "0d".into(),
        untagged: true,
        dry_run,
        concurrency: Some(4),
        ..PurgeRequest::default()
    };
    let ctx =
        acr_task::registry::RequestContext::of_tool("PURGE", "bench", String::new(), String::new());
    acr_task::registry::purge::run(store, &req, &ctx, &|_| {}).unwrap()
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() {
    println!(
        "purge bench, {}; load {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        load()
    );
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t = Instant::now();
    let ours = fill(&a.path().join("registry"));
    // The HTTP copy without the tier's 2,000 writes a minute, to measure the way itself.
    let copy = fill(&b.path().join("registry"));
    let unlimited = acr_task::tier::Change {
        overrides: acr_task::tier::Overrides {
            write_ops_per_minute: Some(acr_task::tier::Override::Unlimited(
                acr_task::tier::Unlimited::Unlimited,
            )),
            ..Default::default()
        },
        ..Default::default()
    };
    acr_task::registry::service::change_settings(&copy, &unlimited, 0).unwrap();
    drop(copy);
    println!(
        "filled two registries of {} tags in {:.1} s",
        REPOS * TAGS,
        t.elapsed().as_secs_f64()
    );

    let dry = purge(&ours, true);
    assert_eq!(dry.tags_deleted.len(), REPOS * TAGS);
    println!(
        "acr-task purge --dry-run: {} tags and {} manifests planned in {:.2} s (goal < 2 s)",
        dry.tags_deleted.len(),
        dry.manifests_deleted.len(),
        dry.seconds
    );
    let done = purge(&ours, false);
    assert_eq!(done.tags_deleted.len(), REPOS * TAGS);
    assert_eq!(done.manifests_deleted.len(), REPOS * TAGS);
    let ours_rate = done.tags_deleted.len() as f64 / done.seconds;
    println!(
        "acr-task purge --untagged: {} tags + {} manifests in {:.2} s: {:.0} tags/s ({:.0} deletes/s)",
        done.tags_deleted.len(),
        done.manifests_deleted.len(),
        done.seconds,
        ours_rate,
        (done.tags_deleted.len() + done.manifests_deleted.len()) as f64 / done.seconds
    );

    // The client-side way: DELETE each tag over HTTP, 32 at once.
    let mut child = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args([
            "serve",
            "--registry-only",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(b.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().trim_start_matches("listening on ").to_string();
    let c = reqwest::Client::new();
    let urls: Vec<String> = (0..REPOS)
        .flat_map(|r| (0..TAGS).map(move |t| (r, t)))
        .map(|(r, t)| format!("http://{addr}/v2/team{r:03}/app/manifests/build-{t:03}"))
        .collect();
    let t = Instant::now();
    let ok = futures_util::stream::iter(urls)
        .map(|u| {
            let c = c.clone();
            async move {
                c.delete(u)
                    .send()
                    .await
                    .map(|r| r.status().as_u16() == 202)
                    .unwrap_or(false)
            }
        })
        .buffer_unordered(32)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let secs = t.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ok, REPOS * TAGS);
    let http_rate = ok as f64 / secs;
    println!(
        "HTTP DELETE per tag, 32 at once (acr purge's way, tags only): {ok} tags in {secs:.2} s: {http_rate:.0} tags/s"
    );
    println!(
        "acr-task purge deletes tags {:.1}x as fast (and the manifests too); ACR's Premium tier \
         publishes 2,000 write operations a minute, so a purge through its data plane deletes \
         at most 33 tags/s ({:.0}x below this purge); load {}",
        ours_rate / http_rate,
        ours_rate / (2000.0 / 60.0),
        load()
    );
}
