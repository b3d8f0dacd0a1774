//! Registry blobs in S3-compatible object storage (`serve --storage s3://BUCKET/PREFIX`),
//! against two real S3 servers from PyPI (installed by `make setup` in `.venv`): SeaweedFS
//! (`weed`) and moto's server. The docker CLI and skopeo push and pull through acr-task;
//! the bucket is read directly to see where the bytes went.

mod registry_common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use registry_common::*;

fn venv_tool(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is required by this test: run `make setup` (it installs the S3 servers from PyPI)",
        p.display()
    );
    p
}

/// Runs one future to its end (these tests are otherwise synchronous).
fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An S3 server on loopback, stopped when dropped.
struct S3 {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3 {
    fn seaweedfs() -> S3 {
        let dir = tempfile::tempdir().unwrap();
        // Its gRPC ports are the HTTP ones + 10000: keep all of them below 55536.
        let port = || loop {
            let p = free_port();
            if p < 50000 && free_at(p + 10000) {
                return p;
            }
        };
        let (m, v, f, s3) = (port(), port(), port(), port());
        let child = Command::new(venv_tool("weed"))
            .arg("server")
            .arg(format!("-dir={}", dir.path().display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={m}"))
            .arg(format!("-volume.port={v}"))
            .arg("-filer")
            .arg(format!("-filer.port={f}"))
            .arg("-s3")
            .arg(format!("-s3.port={s3}"))
            // No Iceberg or Lance listeners: their fixed ports would clash with another
            // SeaweedFS on the machine (scripts/with-s3's).
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=50"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting weed");
        Self::ready(child, format!("http://127.0.0.1:{s3}"), dir)
    }

    fn moto() -> S3 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(venv_tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        Self::ready(child, format!("http://127.0.0.1:{port}"), dir)
    }

    /// Waits until the server makes a bucket.
    fn ready(child: Child, endpoint: String, dir: tempfile::TempDir) -> S3 {
        let s = S3 {
            child,
            endpoint,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            let made = block(async {
                reqwest::Client::new()
                    .put(format!("{}/registry", s.endpoint))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            });
            if made {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the S3 server at {} did not start",
                s.endpoint
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Object keys under `prefix`, read straight from the bucket.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let url = format!("{}/registry?list-type=2&prefix={prefix}", self.endpoint);
        let body = block(async { reqwest::get(url).await.unwrap().text().await.unwrap() });
        body.split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    fn object(&self, key: &str) -> Vec<u8> {
        let url = format!("{}/registry/{key}", self.endpoint);
        block(async {
            reqwest::get(url)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec()
        })
    }

    /// `acr-task ARGS...` with this server's endpoint and a login, as AWS tools take them.
    fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_acr-task"));
        c.args(args)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "acr-task-test")
            .env("AWS_SECRET_ACCESS_KEY", "acr-task-test-secret");
        c
    }

    /// `acr-task serve --registry-only` on `data`.
    fn serve(&self, data: &Path, extra: &[&str]) -> Command {
        let mut c = self.cli(&[
            "serve",
            "--registry-only",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ]);
        c.arg(data).args(extra);
        c
    }
}

fn free_at(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A running `serve`; killed when dropped, with the engine's tags that name it.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_images_of(&self.addr);
    }
}

fn start(mut cmd: Command) -> Server {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("serve did not start: {line:?}"))
        .to_string();
    Server { child, addr }
}

fn docker(args: &[&str]) -> String {
    run(Command::new("docker").args(args))
}

fn scenario(s3: &S3, name: &str) {
    require_docker();
    require_tool("skopeo", "apt-get install -y skopeo");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let url = format!("s3://registry/{name}");

    // A bucket that is not there is said at start, with what to check.
    let o = s3
        .serve(
            &tmp.path().join("other"),
            &["--storage", "s3://no-such-bucket/x"],
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("no-such-bucket") && err.contains("AWS_ENDPOINT_URL"),
        "{err}"
    );

    let srv = start(s3.serve(&data, &["--storage", &url]));
    let image = format!("{}/s3/busybox:v1", srv.addr);
    make_busybox_image(&image, &format!("marker-{name}"));
    let pushed = docker(&["push", &image]);
    assert!(pushed.contains("digest: sha256:"), "{pushed}");

    // The blobs are in the bucket, sealed (encryption at rest applies on S3 too); none
    // in the data directory.
    let keys = s3.keys(&format!("{name}/blobs/sha256/"));
    assert!(keys.len() >= 2, "config and layer in the bucket: {keys:?}");
    for k in &keys {
        let hex = k.rsplit('/').next().unwrap();
        let stored = s3.object(k);
        assert_ne!(
            digest(&stored),
            format!("sha256:{hex}"),
            "{k} is stored as plain bytes"
        );
    }
    let local = data.join("registry/blobs/sha256");
    let files = std::fs::read_dir(&local)
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    assert_eq!(files, 0, "no blob in {}", local.display());

    // The engine pulls it back and runs it; skopeo copies it out, digests checked.
    docker(&["rmi", &image]);
    docker(&["pull", &image]);
    assert_eq!(docker(&["run", "--rm", &image]), format!("marker-{name}"));
    let out = tmp.path().join("copy");
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{image}"),
        &format!("dir:{}", out.display()),
    ]));
    assert!(out.join("manifest.json").exists());

    // A large blob goes up in parts and comes back whole.
    let base = format!("http://{}", srv.addr);
    let big: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let d = block(async {
        let c = reqwest::Client::new();
        let d = push_blob(&c, &base, "s3/big", &big).await;
        let back = c
            .get(format!("{base}/v2/s3/big/blobs/{d}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(digest(&back), d, "the large blob reads back whole");
        // A range from the middle.
        let part = c
            .get(format!("{base}/v2/s3/big/blobs/{d}"))
            .header("range", "bytes=10000000-10000099")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&part[..], &big[10_000_000..10_000_100]);
        d
    });
    let hex = d.trim_start_matches("sha256:");
    assert!(
        s3.keys(&format!("{name}/blobs/sha256/{}/{hex}", &hex[..2]))
            .len()
            == 1,
        "the large blob is one object"
    );

    // Restarted without the option, the registry finds its blobs where it left them.
    drop(srv);
    let srv = start(s3.serve(&data, &[]));
    let image2 = format!("{}/s3/busybox:v1", srv.addr);
    docker(&["pull", &image2]);
    assert_eq!(docker(&["run", "--rm", &image2]), format!("marker-{name}"));
    docker(&["rmi", &image2]);
    // Another storage for the same registry is refused.
    drop(srv);
    let o = s3
        .serve(&data, &["--storage", "s3://registry/elsewhere"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&url), "{err}");
    // Another registry on the same prefix is refused: its gc would remove these blobs.
    let o = s3
        .serve(&tmp.path().join("twin"), &["--storage", &url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("another registry"),
        "{err}"
    );

    // Deleting the repositories and collecting garbage removes the objects (the CLI on
    // the files finds the bucket from the registry's settings).
    let before = s3.keys(&format!("{name}/blobs/")).len();
    let data_s = data.display().to_string();
    for repo in ["s3/busybox", "s3/big"] {
        let o = s3
            .cli(&["repository", "delete", repo, "--yes", "--data", &data_s])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let gc = s3
        .cli(&["registry", "gc", "--grace", "0", "--data", &data_s])
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let after = s3.keys(&format!("{name}/blobs/"));
    assert!(
        after.is_empty(),
        "gc emptied the bucket ({before} objects before): {after:?}\n{}",
        String::from_utf8_lossy(&gc.stdout)
    );
}

#[test]
fn seaweedfs_holds_the_registry_blobs() {
    let s3 = S3::seaweedfs();
    scenario(&s3, "weed");
}

/// With the bucket gone, a pull fails in seconds with an error; the server stays up.
#[test]
fn a_bucket_that_stops_answering_fails_requests_not_the_server() {
    let mut s3 = S3::moto();
    let tmp = tempfile::tempdir().unwrap();
    let srv = start(s3.serve(
        &tmp.path().join("data"),
        &["--storage", "s3://registry/gone"],
    ));
    let base = format!("http://{}", srv.addr);
    let blob = vec![3u8; 100_000];
    let d = block(async { push_blob(&reqwest::Client::new(), &base, "s3/gone", &blob).await });
    let _ = s3.child.kill();
    let _ = s3.child.wait();
    let started = Instant::now();
    let (pull, ping) = block(async {
        let c = reqwest::Client::new();
        // Headers may have gone out before the first read failed: then the body breaks.
        let pull = match c.get(format!("{base}/v2/s3/gone/blobs/{d}")).send().await {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) => Ok(format!("200 with {} bytes, digest {}", b.len(), digest(&b))),
                Err(e) => Err(e),
            },
            Ok(r) => Err(r.error_for_status().unwrap_err()),
            Err(e) => Err(e),
        };
        let ping = c
            .get(format!("{base}/v2/"))
            .send()
            .await
            .map(|r| r.status());
        (pull, ping)
    });
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the failing pull took {:?}",
        started.elapsed()
    );
    assert!(pull.is_err(), "a pull from a bucket that is gone: {pull:?}");
    assert_eq!(ping.unwrap().as_u16(), 200, "the server still answers");
}

#[test]
fn moto_holds_the_registry_blobs() {
    let s3 = S3::moto();
    scenario(&s3, "moto");
}
