//! Helpers shared by the `registry_*` integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use sha2::{Digest, Sha256};

pub use acr_task::registry::{start, RegistryConfig, RunningRegistry};

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An in-process registry on a free loopback port, with its data in `dir`. With
/// `ACR_TASK_TEST_STORAGE=s3://BUCKET` (and the AWS variables; `scripts/with-s3` sets them)
/// its blobs go to a prefix of their own in that bucket: the same tests, on S3. With
/// `ACR_TASK_TEST_POSTGRES` as well (`scripts/with-postgres`), its metadata is in a
/// database of its own there: the registry replicas share.
pub async fn start_in(dir: &Path) -> RunningRegistry {
    let mut place = acr_task::store::MetaPlace::Directory;
    if let Ok(bucket) = std::env::var("ACR_TASK_TEST_STORAGE") {
        let url = format!(
            "{}/{}",
            bucket.trim_end_matches('/'),
            uuid::Uuid::new_v4().simple()
        );
        if let Ok(pg) = std::env::var("ACR_TASK_TEST_POSTGRES") {
            place = acr_task::store::MetaPlace::Shared(Box::new(
                acr_task::pg::fresh_database(&pg).unwrap(),
            ));
        }
        acr_task::store::choose_object_storage(dir, &place, &url, None, true).unwrap();
    }
    let mut cfg = RegistryConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.meta = place;
    start(cfg).await.unwrap()
}

/// The digests of the blobs a store holds, wherever it keeps them.
pub fn blob_digests(store: &acr_task::store::Store) -> Vec<String> {
    let mut d: Vec<String> = store
        .managed()
        .blobs
        .list()
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    d.sort();
    d
}

pub fn base(r: &RunningRegistry) -> String {
    format!("http://{}", r.addr())
}

/// Tools these tests drive must be installed; a missing one is a failure, not a skip.
pub fn require_tool(tool: &str, hint: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` is required by this test and was not found: {hint}"
    );
}

pub fn require_docker() {
    require_tool("docker", "install the docker CLI (docker.io)");
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .expect("running docker");
    assert!(
        out.status.success(),
        "the Docker Engine is required by this test and is not reachable: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run a command, panic with its output if it fails; return stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Make a local image `reference` (no pull possible here): a root filesystem holding the
/// host's static busybox plus a marker file, imported with `docker import`.
pub fn make_busybox_image(reference: &str, marker: &str) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is required (apt-get install -y busybox-static)"
    );
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy(busybox, root.path().join("bin/busybox")).unwrap();
    std::fs::write(root.path().join("marker"), marker).unwrap();
    let tar = tempfile::NamedTempFile::new().unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .arg("-cf")
        .arg(tar.path())
        .arg("."));
    run(Command::new("docker")
        .args([
            "import",
            "--change",
            "CMD [\"/bin/busybox\",\"cat\",\"/marker\"]",
        ])
        .arg(tar.path())
        .arg(reference));
}

/// `acr-task serve --registry-only` as a child process; returns it with its address.
pub fn spawn_server(data: &Path) -> (Child, String) {
    spawn_serve(&["--registry-only"], data)
}

/// `acr-task serve ARGS... --listen 127.0.0.1:0 --data DATA` as a child process; returns it
/// with the address from its first stdout line (`listening on ADDR`).
pub fn spawn_serve(args: &[&str], data: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning acr-task serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}"))
        .to_string();
    (child, addr)
}

/// Push one blob monolithically (`POST ?digest=`).
pub async fn push_blob(c: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    d
}

/// An OCI image manifest over a config and layers (digest, size).
pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s
        })).collect::<Vec<_>>()
    })
}

pub async fn put_manifest(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> reqwest::Response {
    c.put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

/// The `code` of the first error in a spec error body.
pub async fn error_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.unwrap();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Removes the Docker Engine's image tags under `registry/` (what a test pushed or pulled
/// through a registry that no longer exists), so suites do not pile up images.
pub fn remove_images_of(registry: &str) {
    let Ok(out) = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .output()
    else {
        return;
    };
    let prefix = format!("{registry}/");
    let tags: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    if !tags.is_empty() {
        let _ = Command::new("docker")
            .arg("rmi")
            .args(&tags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Debian's `docker-registry` (CNCF distribution 2.8) serving `root` on a free loopback
/// port, filesystem storage, deletes enabled; stopped when dropped.
pub struct Distribution {
    child: Child,
    pub addr: String,
    _config: tempfile::TempDir,
}

impl Distribution {
    pub fn start(root: &Path) -> Distribution {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(
            bin.exists(),
            "/usr/bin/docker-registry is required by this test: apt-get install -y docker-registry"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = tempfile::tempdir().unwrap();
        let file = config.path().join("config.yml");
        std::fs::write(
            &file,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                root.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(bin)
            .arg("serve")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..200 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return Distribution {
                    child,
                    addr,
                    _config: config,
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("docker-registry did not start on {addr}");
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_images_of(&self.addr);
    }
}

/// The digest `skopeo inspect` reads for `reference` (plain HTTP).
pub fn skopeo_digest(reference: &str) -> String {
    let out = run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{reference}"),
    ]));
    out.trim().to_string()
}

/// `acr-task ARGS --data DATA`: (success, stdout, stderr).
pub fn cli(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_acr-task"))
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// [`cli`] that must succeed: its stdout.
pub fn cli_ok(data: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(data, args);
    assert!(ok, "acr-task {args:?} failed:\n{out}\n{err}");
    out
}

/// [`cli_ok`] of a command with `-o json`: its answer.
pub fn cli_json(data: &Path, args: &[&str]) -> serde_json::Value {
    let out = cli_ok(data, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// A client that pulls in a loop with skopeo (a real client) until stopped, counting
/// the pulls and keeping what failed.
pub struct PullLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pulls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl PullLoop {
    /// Pulls `images` (`HOST:PORT/repo:tag`) in turn into a temp dir.
    pub fn start(images: Vec<String>) -> PullLoop {
        use std::sync::atomic::Ordering;
        require_tool("skopeo", "apt-get install -y skopeo");
        let dir = tempfile::tempdir().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pulls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, p, f, d) = (
            stop.clone(),
            pulls.clone(),
            failures.clone(),
            dir.path().to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            let mut i = 0usize;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                let out = Command::new("skopeo")
                    .args([
                        "copy",
                        "--src-tls-verify=false",
                        &format!("docker://{}", images[i % images.len()]),
                        &format!("dir:{}", d.join(i.to_string()).display()),
                    ])
                    .output()
                    .unwrap();
                let _ = std::fs::remove_dir_all(d.join(i.to_string()));
                if out.status.success() {
                    p.fetch_add(1, Ordering::SeqCst);
                } else {
                    f.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&out.stderr).to_string());
                }
            }
        });
        PullLoop {
            stop,
            pulls,
            failures,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Pulls so far.
    pub fn pulls(&self) -> usize {
        self.pulls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops it: (pulls, failures).
    pub fn stop(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.pulls(), failures)
    }
}

/// Write an OCI image layout holding a two-platform index tagged `multi`.
pub fn write_multi_arch_layout(dir: &Path) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let d = digest(data);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), data).unwrap();
        (d, data.len())
    };
    let mut children = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut b = tar::Builder::new(Vec::new());
        let content = format!("built for {arch}\n");
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "arch.txt", content.as_bytes())
            .unwrap();
        let layer = b.into_inner().unwrap();
        let (ld, ls) = put(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [ld]},
            "config": {}
        }))
        .unwrap();
        let (cd, cs) = put(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]
        }))
        .unwrap();
        let (md, ms) = put(&manifest);
        children.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "platform": {"architecture": arch, "os": "linux"}
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": children
    }))
    .unwrap();
    let (id, is) = put(&index);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": is,
                       "annotations": {"org.opencontainers.image.ref.name": "multi"}}]
    });
    std::fs::write(dir.join("index.json"), top.to_string()).unwrap();
    id
}

/// The digest `repo:reference` names on the registry at `base` (HEAD, any manifest type),
/// or None.
pub async fn resolve(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
) -> Option<String> {
    let r = c
        .head(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(
            "accept",
            "application/vnd.oci.image.index.v1+json, \
             application/vnd.oci.image.manifest.v1+json, \
             application/vnd.docker.distribution.manifest.v2+json, \
             application/vnd.docker.distribution.manifest.list.v2+json",
        )
        .send()
        .await
        .unwrap();
    (r.status() == 200).then(|| {
        r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_string()
    })
}
