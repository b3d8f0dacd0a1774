//! Side-by-side benchmark: acr-task's registry vs Debian's `docker-registry` (CNCF
//! distribution 2.8), both on loopback with filesystem storage in temp dirs, measured by the
//! same client in one run.
//!
//!     cargo bench --bench registry
//!
//! Needs `/usr/bin/docker-registry` (apt-get install -y docker-registry). Set
//! `REGISTRY_BENCH_ONLY=ours` to skip distribution, `REGISTRY_BENCH_SKIP_GIB=1` to skip the
//! 1 GiB blob.
//!
//! Then, ours against ours in the same run: encrypted at rest (the default) against an
//! unencrypted registry, and pushes with the tier's quota and rate checks made against
//! the same server with its limits lifted, by turns; and the upgrade of a Classic directory of 1 GiB in many
//! blobs beside `cp -r` of it (`REGISTRY_BENCH_ONLY=extra` runs these alone,
//! `REGISTRY_BENCH_SKIP_EXTRA=1` skips them).
//!
//! Last, a relocation: 50 repositories × 5 tags (one shared base layer, small layers of
//! their own) from distribution into a fresh `acr-task serve` by `acr-task registry
//! relocate`, beside `skopeo sync` of the same into another fresh one, three rounds by
//! turns (`REGISTRY_BENCH_ONLY=relocate` runs it alone; it needs skopeo).
//!
//! `REGISTRY_BENCH_ONLY=s3`: the registry with its blobs in S3 (SeaweedFS from `.venv`,
//! `make setup`) beside the same on its file system, push and pull of 200 × 1 MiB and one
//! 256 MiB blob, in one run, and the same with pulls redirected to presigned URLs of the
//! bucket (`--redirect-pulls`, unencrypted); under `scripts/with-postgres`, also the
//! registry replicas share (metadata in PostgreSQL, blobs in S3).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;
const SMALL_COUNT: usize = 200;
const HEADS: usize = 2000;

struct Server {
    name: &'static str,
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|k| k / 1024.0)
            .unwrap_or(f64::NAN)
    }
}

fn start_ours() -> Server {
    start_ours_with("acr-task", &["--registry-only"])
}

fn start_ours_with(name: &'static str, extra: &[&str]) -> Server {
    start_ours_env(name, extra, &[])
}

fn start_ours_env(name: &'static str, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting acr-task serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().trim_start_matches("listening on ").to_string();
    Server {
        name,
        child,
        base: format!("http://{addr}"),
        _dir: dir,
    }
}

/// `acr-task registry ARGS --data DIR` on a server's files.
fn on_files(s: &Server, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .arg("registry")
        .args(args)
        .arg("--data")
        .arg(s._dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_distribution() -> Server {
    let bin = Path::new("/usr/bin/docker-registry");
    assert!(
        bin.exists(),
        "/usr/bin/docker-registry is needed: apt-get install -y docker-registry"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting docker-registry");
    Server {
        name: "distribution 2.8",
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

async fn wait_ready(c: &reqwest::Client, s: &Server) {
    for _ in 0..100 {
        if let Ok(r) = c.get(format!("{}/v2/", s.base)).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} did not become ready at {}", s.name, s.base);
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn absolute(base: &str, loc: &str) -> String {
    if loc.starts_with("http") {
        loc.to_string()
    } else {
        format!("{base}{loc}")
    }
}

fn with_digest(url: &str, d: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}digest={d}")
}

/// POST to open a session, then PUT the whole body with the digest (works on both servers).
async fn push(c: &reqwest::Client, base: &str, repo: &str, data: bytes::Bytes, d: &str) {
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "POST upload");
    let loc = absolute(base, r.headers()["location"].to_str().unwrap());
    let r = c
        .put(with_digest(&loc, d))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "PUT upload: {}",
        r.text().await.unwrap_or_default()
    );
}

async fn pull(c: &reqwest::Client, base: &str, repo: &str, d: &str) -> u64 {
    let r = c
        .get(format!("{base}/v2/{repo}/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "GET blob");
    let mut s = r.bytes_stream();
    let mut n = 0u64;
    while let Some(b) = s.next().await {
        n += b.unwrap().len() as u64;
    }
    n
}

struct Row {
    what: String,
    ours: String,
    theirs: String,
    ratio: String,
}

#[derive(Default, Clone)]
struct Figures {
    /// (label, value, unit)
    values: Vec<(String, f64, &'static str)>,
}

fn small_blobs(seed: u64) -> Vec<(bytes::Bytes, String)> {
    let mut x = seed | 1;
    let base: Vec<u8> = (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    (0..SMALL_COUNT)
        .map(|i| {
            let mut b = base.clone();
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            b[8..16].copy_from_slice(&seed.to_le_bytes());
            let d = digest(&b);
            (bytes::Bytes::from(b), d)
        })
        .collect()
}

fn big_chunk(base: &[u8], i: u64, seed: u64) -> bytes::Bytes {
    let mut c = base.to_vec();
    c[..8].copy_from_slice(&i.to_le_bytes());
    c[8..16].copy_from_slice(&seed.to_le_bytes());
    bytes::Bytes::from(c)
}

async fn big_round_trip(c: &reqwest::Client, base_url: &str, mib: u64, seed: u64) -> (f64, f64) {
    let base: Vec<u8> = (0..MIB).map(|i| (i * 31 % 251) as u8).collect();
    let mut h = Sha256::new();
    for i in 0..mib {
        h.update(big_chunk(&base, i, seed));
    }
    let d = format!("sha256:{}", hex::encode(h.finalize()));
    let repo = "bench/big";
    let t = Instant::now();
    let r = c
        .post(format!("{base_url}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = absolute(base_url, r.headers()["location"].to_str().unwrap());
    let b2 = base.clone();
    let body = futures_util::stream::iter(0..mib)
        .map(move |i| Ok::<_, std::io::Error>(big_chunk(&b2, i, seed)));
    let r = c
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "PATCH big");
    let loc = absolute(base_url, r.headers()["location"].to_str().unwrap());
    let r = c.put(with_digest(&loc, &d)).send().await.unwrap();
    assert_eq!(r.status(), 201, "PUT big");
    let up = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let n = pull(c, base_url, repo, &d).await;
    let down = t.elapsed().as_secs_f64();
    assert_eq!(n, mib * MIB as u64);
    let mb = (mib * MIB as u64) as f64 / 1e6;
    (mb / up, mb / down)
}

/// Run every phase on each server in turn (phase by phase, so that load from elsewhere on
/// the machine hits both alike).
async fn measure(servers: &[Server], seed: u64, skip_gib: bool) -> Vec<Figures> {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()
        .unwrap();
    for s in servers {
        wait_ready(&c, s).await;
    }
    let mut figs = vec![Figures::default(); servers.len()];
    let mb_small = (SMALL_COUNT * MIB) as f64 / 1e6;
    for conc in [1usize, 4] {
        for (k, s) in servers.iter().enumerate() {
            let f = &mut figs[k];
            let blobs = small_blobs(seed * 10 + conc as u64 + 100 * k as u64);
            let repo = format!("bench/small{conc}");
            let t = Instant::now();
            futures_util::stream::iter(blobs.iter())
                .map(|(b, d)| push(&c, &s.base, &repo, b.clone(), d))
                .buffer_unordered(conc)
                .collect::<Vec<_>>()
                .await;
            let secs = t.elapsed().as_secs_f64();
            f.values.push((
                format!("push 200×1 MiB, c={conc}"),
                SMALL_COUNT as f64 / secs,
                "req/s",
            ));
            f.values
                .push((format!("push 200×1 MiB, c={conc}"), mb_small / secs, "MB/s"));
            let t = Instant::now();
            futures_util::stream::iter(blobs.iter())
                .map(|(_, d)| pull(&c, &s.base, &repo, d))
                .buffer_unordered(conc)
                .collect::<Vec<_>>()
                .await;
            let secs = t.elapsed().as_secs_f64();
            f.values.push((
                format!("pull 200×1 MiB, c={conc}"),
                SMALL_COUNT as f64 / secs,
                "req/s",
            ));
            f.values
                .push((format!("pull 200×1 MiB, c={conc}"), mb_small / secs, "MB/s"));
            if conc == 1 {
                for hc in [1usize, 4] {
                    let t = Instant::now();
                    futures_util::stream::iter(0..HEADS)
                        .map(|i| {
                            let d = &blobs[i % blobs.len()].1;
                            let url = format!("{}/v2/{repo}/blobs/{d}", s.base);
                            let c = &c;
                            async move {
                                let r = c.head(url).send().await.unwrap();
                                assert_eq!(r.status(), 200);
                            }
                        })
                        .buffer_unordered(hc)
                        .collect::<Vec<_>>()
                        .await;
                    let secs = t.elapsed().as_secs_f64();
                    f.values.push((
                        format!("2000 blob HEADs, c={hc}"),
                        HEADS as f64 / secs,
                        "req/s",
                    ));
                }
            }
        }
    }
    let sizes: &[u64] = if skip_gib { &[256] } else { &[256, 1024] };
    for &mib in sizes {
        for (k, s) in servers.iter().enumerate() {
            let (up, down) = big_round_trip(&c, &s.base, mib, seed + k as u64).await;
            let label = if mib == 1024 {
                "1 GiB".to_string()
            } else {
                format!("{mib} MiB")
            };
            figs[k]
                .values
                .push((format!("push one {label} blob"), up, "MB/s"));
            figs[k]
                .values
                .push((format!("pull one {label} blob"), down, "MB/s"));
        }
    }
    for (k, s) in servers.iter().enumerate() {
        figs[k]
            .values
            .push(("peak RSS (whole run)".into(), s.peak_rss_mib(), "MiB"));
    }
    figs
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let only_ours = std::env::var("REGISTRY_BENCH_ONLY").as_deref() == Ok("ours");
    let skip_gib = std::env::var_os("REGISTRY_BENCH_SKIP_GIB").is_some();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    if std::env::var("REGISTRY_BENCH_ONLY").as_deref() == Ok("extra") {
        return extra(seed).await;
    }
    if std::env::var("REGISTRY_BENCH_ONLY").as_deref() == Ok("relocate") {
        return relocate_bench(seed).await;
    }
    if std::env::var("REGISTRY_BENCH_ONLY").as_deref() == Ok("s3") {
        return s3_bench(seed).await;
    }
    let mut servers = vec![start_ours()];
    if !only_ours {
        servers.push(start_distribution());
    }
    eprintln!("measuring {} server(s), phase by phase ...", servers.len());
    let mut figs = measure(&servers, seed, skip_gib).await.into_iter();
    let disk = disk_write_rate(servers[0]._dir.path(), 256);
    let ours = figs.next().unwrap_or_default();
    let theirs = figs.next();
    drop(servers);
    let mut rows = Vec::new();
    for (i, (label, v, unit)) in ours.values.iter().enumerate() {
        let t = theirs.as_ref().map(|t| t.values[i].1);
        rows.push(Row {
            what: format!("{label} ({unit})"),
            ours: format!("{v:.1}"),
            theirs: t.map(|t| format!("{t:.1}")).unwrap_or_else(|| "-".into()),
            ratio: t
                .map(|t| {
                    // For memory lower is better: show theirs/ours so > 1 means we win.
                    if *unit == "MiB" {
                        format!("{:.2}× less", t / v)
                    } else {
                        format!("{:.2}×", v / t)
                    }
                })
                .unwrap_or_else(|| "-".into()),
        });
    }
    let w0 = rows.iter().map(|r| r.what.len()).max().unwrap_or(10).max(6);
    println!(
        "| {:<w0$} | {:>10} | {:>16} | {:>10} |",
        "figure", "acr-task", "distribution 2.8", "ratio"
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(w0 + 2),
        "-".repeat(12),
        "-".repeat(18),
        "-".repeat(12)
    );
    for r in rows {
        println!(
            "| {:<w0$} | {:>10} | {:>16} | {:>10} |",
            r.what, r.ours, r.theirs, r.ratio
        );
    }
    let push = ours
        .values
        .iter()
        .find(|(l, _, _)| l == "push one 256 MiB blob")
        .map(|v| v.1)
        .unwrap_or(f64::NAN);
    println!(
        "\ndisk: fsync'd sequential write of 256 MiB in the data dir's file system: {disk:.1} MB/s; \
         acr-task's 256 MiB push (SHA-256 verified, fsync'd): {push:.1} MB/s = {:.2}× of the disk (goal >= 0.9)",
        push / disk
    );
    if std::env::var_os("REGISTRY_BENCH_SKIP_EXTRA").is_some() {
        return;
    }
    extra(seed).await;
}

/// Ours against ours (encryption's cost, the tier checks' cost), then the Classic upgrade.
async fn extra(seed: u64) {
    // Ours against ours: encryption's cost.
    let encrypted = start_ours_with("encrypted", &["--registry-only"]);
    let plain = start_ours_with("unencrypted", &["--registry-only", "--unencrypted"]);
    let figs = measure_core(&[&encrypted, &plain], seed + 99).await;
    print_pair(
        "Encryption at rest (same run; medians of 3 rounds)",
        ("encrypted", &figs[0]),
        ("unencrypted", &figs[1]),
        "goal: encrypted >= 0.8× unencrypted",
    );
    drop(encrypted);
    // The tier's checks on the push path: one server, its limits set (every check made)
    // and lifted (none made) by turns.
    let (with, without) = measure_checks(&plain, seed + 77).await;
    print_pair(
        "Tier checks on the push path (same server, limits set and lifted by turns; medians of 3 rounds each)",
        ("limits set", &with),
        ("no limits", &without),
        "goal: with limits >= 0.95× without",
    );
    drop(plain);
    check_cost(&with);
    migration_bench(seed);
    relocate_bench(seed).await;
}

/// What the storage checks of one blob push cost, in-process: the check before the upload
/// (`check_room`: the settings, the bytes stored) and the one before the commit, each a
/// small read of the metadata; against the time a 1 MiB push took above.
fn check_cost(with: &Figures) {
    let dir = tempfile::tempdir().unwrap();
    let store = acr_task::store::Store::open(dir.path(), true).unwrap();
    let limit = acr_task::tier::Overrides {
        storage_bytes: Some(acr_task::tier::Override::Count(500 << 30)),
        ..Default::default()
    };
    let change = acr_task::tier::Change {
        overrides: limit,
        ..Default::default()
    };
    acr_task::registry::service::change_settings(&store, &change, 0).unwrap();
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        acr_task::registry::service::check_room(&store, 1 << 20).unwrap();
    }
    let per = t.elapsed().as_secs_f64() / n as f64;
    let rate = with
        .values
        .iter()
        .find(|(l, _, _)| l.starts_with("push 200×1 MiB, c=1"))
        .map(|v| v.1)
        .unwrap_or(f64::NAN);
    let push = MIB as f64 / 1e6 / rate;
    println!(
        "\nstorage check, in-process: {:.1} µs each; a blob push makes two (before the upload, \
         before the commit) and one more inside the commit's transaction: ≈ {:.1} µs of a 1 MiB \
         push's {:.1} ms = {:.2}%",
        per * 1e6,
        3.0 * per * 1e6,
        push * 1e3,
        300.0 * per / push
    );
}

/// Pushes with the storage and rate limits set (high enough never to refuse: the
/// checks run, nothing waits) and lifted, by turns on one server.
async fn measure_checks(s: &Server, seed: u64) -> (Figures, Figures) {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()
        .unwrap();
    wait_ready(&c, s).await;
    let mut rounds: [Vec<(String, Vec<f64>)>; 2] = [Vec::new(), Vec::new()];
    let mb_small = (SMALL_COUNT * MIB) as f64 / 1e6;
    for round in 0..2 * ROUNDS {
        let limited = round % 2 == 0;
        let (storage, ops) = if limited {
            ("500GiB", "1000000")
        } else {
            ("unlimited", "unlimited")
        };
        on_files(
            s,
            &[
                "update",
                "--storage-limit",
                storage,
                "--read-ops-limit",
                ops,
                "--write-ops-limit",
                ops,
            ],
        );
        // The server reads its settings again within a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut record = |label: String, v: f64| {
            let r = &mut rounds[usize::from(!limited)];
            match r.iter_mut().find(|(l, _)| *l == label) {
                Some((_, vs)) => vs.push(v),
                None => r.push((label, vec![v])),
            }
        };
        for conc in [1usize, 4] {
            let blobs = small_blobs(seed * 10 + conc as u64 + 1000 * round);
            let t = Instant::now();
            futures_util::stream::iter(blobs.iter())
                .map(|(b, d)| push(&c, &s.base, "checks/small", b.clone(), d))
                .buffer_unordered(conc)
                .collect::<Vec<_>>()
                .await;
            record(
                format!("push 200×1 MiB, c={conc}"),
                mb_small / t.elapsed().as_secs_f64(),
            );
        }
        let (up, _) = big_round_trip(&c, &s.base, 256, seed + 100 * round).await;
        record("push one 256 MiB blob".into(), up);
    }
    let [with, without] = rounds.map(|figures| Figures {
        values: figures
            .into_iter()
            .map(|(label, mut vs)| {
                vs.sort_by(f64::total_cmp);
                (label, vs[vs.len() / 2], "MB/s")
            })
            .collect(),
    });
    (with, without)
}

/// Rounds of [`measure_core`]: each figure is the median of its rounds, servers taking
/// turns within each round so that the machine's swings hit all alike.
const ROUNDS: u64 = 3;

/// The phases that tell encryption's and the quota checks' costs: every server in turn,
/// [`ROUNDS`] times; the median of each figure.
async fn measure_core(servers: &[&Server], seed: u64) -> Vec<Figures> {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()
        .unwrap();
    for s in servers {
        wait_ready(&c, s).await;
    }
    // rounds[k][figure] = values of each round.
    let mut rounds: Vec<Vec<(String, Vec<f64>)>> = vec![Vec::new(); servers.len()];
    let mut record =
        |k: usize, label: String, v: f64| match rounds[k].iter_mut().find(|(l, _)| *l == label) {
            Some((_, vs)) => vs.push(v),
            None => rounds[k].push((label, vec![v])),
        };
    let mb_small = (SMALL_COUNT * MIB) as f64 / 1e6;
    for round in 0..ROUNDS {
        for conc in [1usize, 4] {
            for (k, s) in servers.iter().enumerate() {
                let blobs = small_blobs(seed * 10 + conc as u64 + 100 * k as u64 + 1000 * round);
                let repo = format!("core/small{conc}");
                let t = Instant::now();
                futures_util::stream::iter(blobs.iter())
                    .map(|(b, d)| push(&c, &s.base, &repo, b.clone(), d))
                    .buffer_unordered(conc)
                    .collect::<Vec<_>>()
                    .await;
                record(
                    k,
                    format!("push 200×1 MiB, c={conc}"),
                    mb_small / t.elapsed().as_secs_f64(),
                );
                let t = Instant::now();
                futures_util::stream::iter(blobs.iter())
                    .map(|(_, d)| pull(&c, &s.base, &repo, d))
                    .buffer_unordered(conc)
                    .collect::<Vec<_>>()
                    .await;
                record(
                    k,
                    format!("pull 200×1 MiB, c={conc}"),
                    mb_small / t.elapsed().as_secs_f64(),
                );
            }
        }
        for (k, s) in servers.iter().enumerate() {
            let (up, down) =
                big_round_trip(&c, &s.base, 256, seed + 7 + k as u64 + 100 * round).await;
            record(k, "push one 256 MiB blob".into(), up);
            record(k, "pull one 256 MiB blob".into(), down);
        }
    }
    rounds
        .into_iter()
        .map(|figures| Figures {
            values: figures
                .into_iter()
                .map(|(label, mut vs)| {
                    vs.sort_by(f64::total_cmp);
                    (label, vs[vs.len() / 2], "MB/s")
                })
                .collect(),
        })
        .collect()
}

fn print_pair(title: &str, a: (&str, &Figures), b: (&str, &Figures), goal: &str) {
    println!("\n{title}\n");
    println!("| figure | {} | {} | ratio |", a.0, b.0);
    println!("|---|---|---|---|");
    for (i, (label, v, unit)) in a.1.values.iter().enumerate() {
        let w = b.1.values[i].1;
        println!("| {label} ({unit}) | {v:.1} | {w:.1} | {:.2}× |", v / w);
    }
    println!("\n{goal}");
}

/// Writes a Classic directory (distribution's layout) of `count` blobs of `mib` MiB in
/// images of 16 layers, as `docker-registry` would have stored them.
fn write_classic(root: &Path, count: usize, mib: usize, seed: u64) -> u64 {
    let v2 = root.join("docker/registry/v2");
    let put_blob = |data: &[u8]| -> String {
        let d = digest(data);
        let p = v2.join("blobs/sha256").join(&d[7..9]).join(&d[7..]);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("data"), data).unwrap();
        d
    };
    let link = |path: std::path::PathBuf, d: &str| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, d).unwrap();
    };
    let mut total = 0u64;
    let mut x = seed | 1;
    for image in 0..count.div_ceil(16) {
        let repo = v2.join(format!("repositories/bench/classic{image}"));
        let mut layers = Vec::new();
        for _ in 0..16.min(count - image * 16) {
            let data: Vec<u8> = (0..mib * MIB)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let d = put_blob(&data);
            link(repo.join("_layers/sha256").join(&d[7..]).join("link"), &d);
            total += data.len() as u64;
            layers.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d, "size": data.len()
            }));
        }
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"i\":{image}}}");
        let cd = put_blob(config.as_bytes());
        link(repo.join("_layers/sha256").join(&cd[7..]).join("link"), &cd);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": layers,
        })
        .to_string();
        let md = put_blob(manifest.as_bytes());
        let tags = repo.join("_manifests");
        link(
            tags.join("revisions/sha256").join(&md[7..]).join("link"),
            &md,
        );
        link(tags.join("tags/v1/current/link"), &md);
        link(
            tags.join("tags/v1/index/sha256")
                .join(&md[7..])
                .join("link"),
            &md,
        );
    }
    total
}

/// The upgrade of a Classic directory of 1 GiB in many blobs into (encrypted) managed
/// storage, beside `cp -r` of the same directory, with and without the final `sync`.
fn migration_bench(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let classic = tmp.path().join("classic");
    let bytes = write_classic(&classic, 256, 4, seed);
    let _ = Command::new("sync").status();
    let copy = tmp.path().join("copy");
    let t = Instant::now();
    assert!(Command::new("cp")
        .arg("-r")
        .arg(&classic)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let cp = t.elapsed().as_secs_f64();
    let _ = Command::new("sync").status();
    let cp_sync = t.elapsed().as_secs_f64();
    let data = tmp.path().join("managed");
    acr_task::store::first_start(
        &data,
        &Default::default(),
        Some(acr_task::tier::Sku::Classic),
        Some(&classic),
        true,
    )
    .unwrap();
    let store = acr_task::store::Store::open(&data, true).unwrap();
    acr_task::registry::service::change_settings(
        &store,
        &acr_task::tier::Change::to(acr_task::tier::Sku::Premium),
        0,
    )
    .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let t = Instant::now();
    let report = acr_task::registry::upgrade::run(&store, Duration::ZERO, &stop, &|_| {})
        .unwrap()
        .unwrap();
    let ours = t.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1e6;
    println!(
        "\nClassic upgrade of {:.0} MB in {} objects (blobs of 4 MiB, 16 per image)\n",
        mb, report.progress.objects_total
    );
    println!("| copy | seconds | MB/s |");
    println!("|---|---|---|");
    println!(
        "| `cp -r` (page cache, no fsync) | {cp:.2} | {:.1} |",
        mb / cp
    );
    println!(
        "| `cp -r` then `sync` | {cp_sync:.2} | {:.1} |",
        mb / cp_sync
    );
    println!(
        "| acr-task upgrade (each blob verified, sealed, fsync'd; manifests parsed and stored) | {ours:.2} | {:.1} |",
        mb / ours
    );
}

/// The rate a plain writer reaches on `dir`'s file system: `mib` MiB in 2 MiB writes, then
/// one fsync (as `dd bs=2M conv=fsync`), what a push must do at the least.
fn disk_write_rate(dir: &Path, mib: usize) -> f64 {
    use std::io::Write;
    let path = dir.join("disk-rate.bin");
    let mut chunk = vec![0u8; 2 * MIB];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in chunk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..mib / 2 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    (mib * MIB) as f64 / 1e6 / secs
}

/// Repositories and tags of the relocation bench.
const RELOCATE_REPOS: usize = 50;
const RELOCATE_TAGS: usize = 5;

/// Fills `base` with the relocation bench's images: every repository shares a 2 MiB base
/// layer; each tag has a 32 KiB layer and a config of its own.
async fn fill_for_relocation(c: &reqwest::Client, base: &str, seed: u64) {
    let shared = big_chunk(&vec![7u8; 2 * MIB], 0, seed);
    let sd = digest(&shared);
    futures_util::stream::iter(0..RELOCATE_REPOS)
        .map(|r| {
            let (shared, sd) = (shared.clone(), sd.clone());
            async move {
                let repo = format!("team{}/app{r}", r % 5);
                push(c, base, &repo, shared.clone(), &sd).await;
                for t in 0..RELOCATE_TAGS {
                    let own = big_chunk(&vec![1u8; 32 * 1024], (r * 100 + t) as u64, seed);
                    let od = digest(&own);
                    push(c, base, &repo, own.clone(), &od).await;
                    let config = bytes::Bytes::from(format!(
                        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{"Labels":{{"n":"{r}-{t}-{seed}"}}}}}}"#
                    ));
                    let cd = digest(&config);
                    push(c, base, &repo, config.clone(), &cd).await;
                    let m = serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cd, "size": config.len()},
                        "layers": [
                            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sd, "size": shared.len()},
                            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": od, "size": own.len()}
                        ]
                    });
                    let r = c
                        .put(format!("{base}/v2/{repo}/manifests/v{t}"))
                        .header("content-type", "application/vnd.docker.distribution.manifest.v2+json")
                        .body(m.to_string())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201, "manifest PUT");
                }
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

/// Seconds a command takes; it must succeed.
fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let out = cmd.output().expect("spawning");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

async fn relocate_bench(seed: u64) {
    let c = reqwest::Client::new();
    let dist = start_distribution();
    wait_ready(&c, &dist).await;
    fill_for_relocation(&c, &dist.base, seed).await;
    let host = dist.base.trim_start_matches("http://").to_string();
    let sync = tempfile::tempdir().unwrap();
    let yaml = sync.path().join("sync.yaml");
    let mut text = format!("{host}:\n  tls-verify: false\n  images-by-tag-regex:\n");
    for r in 0..RELOCATE_REPOS {
        text.push_str(&format!("    team{}/app{r}: '.*'\n", r % 5));
    }
    std::fs::write(&yaml, text).unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let target = start_ours_with("relocate target", &[]);
        wait_ready(&c, &target).await;
        let password =
            std::fs::read_to_string(target._dir.path().join("admin.password")).unwrap_or_default();
        ours.push(timed(
            Command::new(env!("CARGO_BIN_EXE_acr-task"))
                .args([
                    "registry",
                    "relocate",
                    "--source",
                    &host,
                    "--target",
                    &target.base,
                ])
                .args(["--concurrency", "8"])
                .env("ACR_TASK_USERNAME", "admin")
                .env("ACR_TASK_PASSWORD", password.trim()),
        ));
        drop(target);
        let target = start_ours_with("skopeo sync target", &["--registry-only"]);
        wait_ready(&c, &target).await;
        let dest = target.base.trim_start_matches("http://").to_string();
        theirs.push(timed(Command::new("skopeo").args([
            "sync",
            "--src",
            "yaml",
            "--dest",
            "docker",
            "--dest-tls-verify=false",
            &yaml.display().to_string(),
            &dest,
        ])));
        // skopeo's copy is whole too: every repository is there (it names them by
        // their last path component).
        let cat: serde_json::Value = c
            .get(format!("{}/v2/_catalog?n=1000", target.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            cat["repositories"].as_array().map(|r| r.len()),
            Some(RELOCATE_REPOS),
            "round {round}: {cat}"
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (o, t) = (med(&mut ours), med(&mut theirs));
    println!(
        "\nRelocation of {RELOCATE_REPOS} repositories × {RELOCATE_TAGS} tags from distribution 2.8 \
         (medians of 3 rounds, by turns): acr-task registry relocate --concurrency 8: {o:.2} s \
         (runs {ours:.2?}); skopeo sync: {t:.2} s (runs {theirs:.2?}); {:.2}× faster (goal >= 1.5)",
        t / o
    );
}

/// SeaweedFS on loopback (its S3 gateway), with a bucket `bench`; killed when dropped.
struct Seaweed {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_seaweed() -> Seaweed {
    let weed = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/weed");
    assert!(
        weed.exists(),
        "{} is needed: run `make setup`",
        weed.display()
    );
    let dir = tempfile::tempdir().unwrap();
    // gRPC ports are the HTTP ones + 10000.
    let port = || loop {
        let p = free_port();
        if p < 50000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    };
    let (m, v, f, s3) = (port(), port(), port(), port());
    let child = Command::new(weed)
        .arg("server")
        .arg(format!("-dir={}", dir.path().display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3"])
        .arg(format!("-master.port={m}"))
        .arg(format!("-volume.port={v}"))
        .arg(format!("-filer.port={f}"))
        .arg(format!("-s3.port={s3}"))
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
        .args(["-master.volumeSizeLimitMB=1024", "-volume.max=20"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting weed");
    // Owned before the wait, so a failure to start still stops it.
    let weed = Seaweed {
        child,
        endpoint: format!("http://127.0.0.1:{s3}"),
        _dir: dir,
    };
    let c = reqwest::Client::new();
    for _ in 0..240 {
        if c.put(format!("{}/bench", weed.endpoint))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return weed;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("SeaweedFS did not start");
}

async fn s3_bench(seed: u64) {
    let weed = start_seaweed().await;
    let env = [
        ("AWS_ENDPOINT_URL", weed.endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
    ];
    let mut servers = Vec::new();
    // With a PostgreSQL (scripts/with-postgres), the registry as replicas share it too:
    // rows in the database, blobs in the bucket (a full `serve`, whose registry is open).
    let pg = std::env::var("ACR_TASK_TEST_POSTGRES").ok();
    if let Some(url) = &pg {
        servers.push(start_ours_env(
            "acr-task on S3 + PostgreSQL",
            &["--storage", "s3://bench/shared", "--database", url],
            &env,
        ));
    }
    // Pulls redirected to presigned URLs: the bytes come from the bucket, not through the
    // registry (unencrypted, as redirects need).
    servers.push(start_ours_env(
        "acr-task on S3, pulls redirected",
        &[
            "--registry-only",
            "--storage",
            "s3://bench/redirected",
            "--unencrypted",
            "--redirect-pulls",
        ],
        &env,
    ));
    servers.push(start_ours_env(
        "acr-task on S3",
        &["--registry-only", "--storage", "s3://bench/reg"],
        &env,
    ));
    servers.push(start_ours());
    eprintln!("measuring the registry on S3 (SeaweedFS) and on its file system ...");
    let figs = measure(&servers, seed, true).await;
    drop(servers);
    let mut heads = vec!["figure"];
    if pg.is_some() {
        heads.push("S3+PG");
    }
    heads.extend(["S3 redir.", "S3", "files", "S3/files"]);
    println!(
        "| {:<32} |{}",
        heads[0],
        heads[1..]
            .iter()
            .map(|h| format!(" {h:>10} |"))
            .collect::<String>()
    );
    println!(
        "|{}|{}",
        "-".repeat(34),
        "------------|".repeat(heads.len() - 1)
    );
    let n = figs.len();
    for (i, (label, _, unit)) in figs[0].values.iter().enumerate() {
        let cols: Vec<f64> = figs.iter().map(|f| f.values[i].1).collect();
        let (s3, files) = (cols[n - 2], cols[n - 1]);
        println!(
            "| {:<32} |{} {:>10.2} |",
            format!("{label} ({unit})"),
            cols.iter()
                .map(|v| format!(" {v:>10.1} |"))
                .collect::<String>(),
            s3 / files
        );
    }
}
