//! The web page in a real browser: Debian's chromium, headless, driven through
//! chromedriver (WebDriver) against `acr-task serve --auth` on the real Docker Engine.
//! Screenshots of each page land in `target/tmp/web-screenshots/`.

mod serve_common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use serve_common::registry_common::{digest, image_manifest, push_blob, put_manifest};
use serve_common::*;

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The browser tests never skip: without chromium they fail and say what to install.
fn require_browser() {
    for (tool, pkg) in [
        ("chromedriver", "chromium-driver"),
        ("chromium", "chromium"),
    ] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} is needed (apt-get install {pkg}; `make setup` does it)"
        );
    }
}

async fn browser() -> (Driver, Client) {
    require_browser();
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let start = Instant::now();
    while reqwest::get(format!("{}/status", driver.url))
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caps = json!({
        "timeouts": {"pageLoad": 20000, "script": 10000},
        "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"]
        }
    });
    let caps = caps.as_object().unwrap().clone();
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap();
    (driver, client)
}

fn shots_dir() -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
}

async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until `f` holds, polling the page; fails with `what` and the page's text.
async fn until<F, Fut>(c: &Client, what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > timeout {
            let body = text(c, "body").await;
            panic!("{what} did not happen within {timeout:?}; the page says:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Types a user name and password into the login form and sends it.
async fn submit_login(c: &Client, base: &str, user: &str, password: &str) {
    c.goto(&format!("{base}/ui/login")).await.unwrap();
    for (id, value) in [("username", user), ("password", password)] {
        c.find(Locator::Id(id))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    c.find(Locator::Css("form.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn sign_in(c: &Client, base: &str, user: &str, password: &str) {
    submit_login(c, base, user, password).await;
    until(c, "signing in", Duration::from_secs(10), || async {
        !c.current_url()
            .await
            .unwrap()
            .path()
            .starts_with("/ui/login")
    })
    .await;
}

/// A hung browser or server fails the test instead of stalling CI.
#[tokio::test(flavor = "multi_thread")]
async fn runs_tasks_and_the_registry_in_a_real_browser() {
    tokio::time::timeout(Duration::from_secs(480), scenario())
        .await
        .expect("the browser scenario did not finish within 8 minutes");
}

/// Progress on stderr, so a failure shows how far the scenario got.
macro_rules! step {
    ($($t:tt)*) => { eprintln!("[web_browser] {}", format!($($t)*)) };
}

async fn scenario() {
    require_docker();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(&data.path().join("d"), 2, &["--auth"]);
    let api = serve.client();
    let base = serve.url.clone();
    let ctx = |n: &str| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(n)
            .display()
            .to_string()
    };
    for (name, dir) in [("diamond", ctx("web/dag")), ("sleepy", ctx("serve/sleep"))] {
        let (st, v) = api
            .post(
                "/api/tasks",
                &json!({"name": name, "context": dir, "triggers": {"baseImage": false}}),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let (_driver, c) = browser().await;

    // Nothing is shown before signing in: every page sends the browser to the login form.
    for path in ["/", "/ui/tasks", "/ui/registry", "/ui/tasks/diamond"] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        let url = c.current_url().await.unwrap();
        assert_eq!(url.path(), "/ui/login", "{path} before signing in");
        let body = text(&c, "main").await;
        assert!(
            !body.contains("diamond") && !body.contains("sleepy"),
            "{body}"
        );
    }
    step!("login redirects checked");
    shot(&c, "login").await;
    // A wrong password is refused with a message, and still shows nothing.
    sign_in_expecting_failure(&c, &base).await;

    step!("signing in as admin");
    sign_in(&c, &base, "admin", &serve.password).await;

    // The task page, and a run started from it.
    c.goto(&format!("{base}/ui/tasks")).await.unwrap();
    let list = text(&c, "main").await;
    assert!(
        list.contains("diamond") && list.contains("sleepy"),
        "{list}"
    );
    shot(&c, "tasks").await;
    c.goto(&format!("{base}/ui/tasks/diamond")).await.unwrap();
    shot(&c, "task").await;
    c.find(Locator::Id("run-now"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&c, "the run page", Duration::from_secs(10), || async {
        c.current_url()
            .await
            .unwrap()
            .path()
            .starts_with("/ui/runs/")
    })
    .await;
    let run_id = c
        .current_url()
        .await
        .unwrap()
        .path()
        .trim_start_matches("/ui/runs/")
        .to_string();

    step!("run {run_id} started from the page");
    // Its log lines arrive live: tick-2 shows while the run is still running.
    until(
        &c,
        "tick-2 in the live log",
        Duration::from_secs(60),
        || async { text(&c, "#log").await.contains("tick-2") },
    )
    .await;
    let status_then = text(&c, "#run-status").await;
    assert_eq!(
        status_then, "Running",
        "the log was live before the run ended"
    );
    let (_, r) = api.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(r["status"], "Running", "{r}");
    shot(&c, "run-live").await;

    step!("live log seen");
    // The graph: one node per step, an edge for every `when`.
    let nodes: BTreeSet<String> = attrs(&c, "#dag .node", "data-step").await;
    assert_eq!(
        nodes,
        ["fetch", "lint", "package", "unit"]
            .map(String::from)
            .into(),
    );
    let mut edges = BTreeSet::new();
    for e in c.find_all(Locator::Css("#dag line.edge")).await.unwrap() {
        edges.insert((
            e.attr("data-from").await.unwrap().unwrap(),
            e.attr("data-to").await.unwrap().unwrap(),
        ));
    }
    let want: BTreeSet<(String, String)> = [
        ("fetch", "lint"),
        ("fetch", "unit"),
        ("lint", "package"),
        ("unit", "package"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(edges, want);

    step!("graph checked");
    // The page follows the run to its end without a reload: status, nodes, log.
    until(
        &c,
        "the run succeeding on the page",
        Duration::from_secs(90),
        || async { text(&c, "#run-status").await == "Succeeded" },
    )
    .await;
    until(&c, "every node green", Duration::from_secs(10), || async {
        let classes = attr_list(&c, "#dag .node", "class").await;
        classes.len() == 4 && classes.iter().all(|k| k.contains("s-Succeeded"))
    })
    .await;
    // The timeline places each step at its start: fetch first, package after it.
    until(
        &c,
        "the timeline drawn to scale",
        Duration::from_secs(10),
        || async {
            let x = |step: &'static str| {
                let c = &c;
                async move {
                    attr_list(c, &format!("#step-rows tr[data-step={step}] rect.bar"), "x")
                        .await
                        .first()
                        .and_then(|x| x.parse::<u64>().ok())
                }
            };
            x("fetch").await.is_some_and(|f| f < 10) && x("package").await.is_some_and(|p| p > 50)
        },
    )
    .await;
    let log = text(&c, "#log").await;
    for l in ["tick-6", "lint-ok", "unit-ok", "package-ok"] {
        assert!(log.contains(l), "{l} in {log}");
    }
    assert!(log.find("tick-1").unwrap() < log.find("package-ok").unwrap());
    shot(&c, "run").await;
    step!("run page final");
    // Only one step's lines.
    c.find(Locator::Css("#log-step option[value=lint]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let only = text(&c, "#log").await;
    assert!(
        only.contains("lint-ok") && !only.contains("tick-1"),
        "{only}"
    );

    step!("step filter checked");
    // The runs list shows it; a run started elsewhere appears without a reload.
    c.goto(&format!("{base}/")).await.unwrap();
    assert!(text(&c, "#run-rows").await.contains(&run_id));
    let (st, queued) = api.post("/api/tasks/sleepy/runs", &json!({})).await;
    assert_eq!(st, 202, "{queued}");
    let sleepy = queued["id"].as_str().unwrap().to_string();
    until(
        &c,
        "the new run in the live list",
        Duration::from_secs(15),
        || async { text(&c, "#run-rows").await.contains(&sleepy) },
    )
    .await;
    shot(&c, "runs").await;

    step!("live runs list checked");
    // Cancel from the page stops it.
    c.goto(&format!("{base}/ui/runs/{sleepy}")).await.unwrap();
    api.wait_status(&sleepy, &["Running"], Duration::from_secs(60))
        .await;
    until(
        &c,
        "the sleep step running",
        Duration::from_secs(30),
        || async {
            attrs(&c, "#dag .node", "class")
                .await
                .iter()
                .any(|k| k.contains("s-Running"))
        },
    )
    .await;
    c.find(Locator::Id("cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let done = api
        .wait_status(&sleepy, &["Canceled"], Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "Canceled", "{done}");
    until(
        &c,
        "Canceled on the page",
        Duration::from_secs(20),
        || async { text(&c, "#run-status").await == "Canceled" },
    )
    .await;

    step!("cancel checked");
    // The registry: an image pushed over the API shows with its size; deleting its tag
    // from the page (after the confirmation) removes it from the registry.
    let http = serve.registry_client("web/app").await;
    let reg = format!("http://{}", serve.addr);
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = vec![7u8; 3000];
    push_blob(&http, &reg, "web/app", config).await;
    push_blob(&http, &reg, "web/app", &layer).await;
    let m = image_manifest(
        (&digest(config), config.len()),
        &[(&digest(&layer), layer.len())],
    );
    let m = serde_json::to_vec(&m).unwrap();
    let oci = "application/vnd.oci.image.manifest.v1+json";
    for tag in ["v1", "keep"] {
        let r = put_manifest(&http, &reg, "web/app", tag, oci, &m).await;
        assert_eq!(r.status(), 201);
    }
    c.goto(&format!("{base}/ui/registry")).await.unwrap();
    assert!(text(&c, "main").await.contains("web/app"));
    shot(&c, "registry").await;
    c.goto(&format!("{base}/ui/registry/web/app"))
        .await
        .unwrap();
    let page = text(&c, "main").await;
    assert!(
        page.contains(&format!("docker pull {}/web/app:v1", serve.addr)),
        "{page}"
    );
    // The image's size: manifest, config and layer.
    let size = acr_task::tier::human((m.len() + config.len() + layer.len()) as u64);
    assert!(page.contains(&format!("image {size}")), "{page}");
    shot(&c, "repository").await;
    c.find(Locator::Css("a[aria-label='Delete tag v1']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    shot(&c, "delete-confirm").await;
    c.find(Locator::Id("confirm-delete"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &c,
        "back on the repository",
        Duration::from_secs(10),
        || async { c.current_url().await.unwrap().path() == "/ui/registry/web/app" },
    )
    .await;
    let tags = attrs(&c, "table.tags tr[data-tag]", "data-tag").await;
    assert_eq!(tags, BTreeSet::from(["keep".to_string()]));
    let gone = http
        .get(format!("{reg}/v2/web/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404, "the tag is gone from the registry");
    let kept = http
        .get(format!("{reg}/v2/web/app/manifests/keep"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.status(), 200);

    step!("tag delete checked");
    // A form posted without the session's CSRF token is refused.
    let forged = c
        .execute(
            "return fetch('/ui/runs/' + arguments[0] + '/rerun', {method: 'POST', \
             headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'csrf=nope'}) \
             .then(r => r.status)",
            vec![json!(run_id)],
        )
        .await
        .unwrap();
    assert_eq!(forged, json!(403));

    step!("csrf checked");
    // A token for one repository sees that repository only: no runs, no tasks.
    let (ok, _, err) = serve.acr(&[
        "scope-map",
        "create",
        "reader",
        "--repository",
        "web/app",
        "content/read",
        "metadata/read",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = serve.acr(&[
        "token",
        "create",
        "reader",
        "--scope-map",
        "reader",
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pass = v["credentials"]["passwords"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let http2 = serve.registry_client("other/repo").await;
    push_blob(&http2, &reg, "other/repo", config).await;
    push_blob(&http2, &reg, "other/repo", &layer).await;
    let r = put_manifest(&http2, &reg, "other/repo", "x", oci, &m).await;
    assert_eq!(r.status(), 201);
    c.find(Locator::Css("form.logout button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    sign_in(&c, &base, "reader", &pass).await;
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/registry");
    let page = text(&c, "main").await;
    assert!(
        page.contains("web/app") && !page.contains("other/repo"),
        "{page}"
    );
    let nav = text(&c, "header nav").await;
    assert!(!nav.contains("Runs") && !nav.contains("Tasks"), "{nav}");
    c.goto(&format!("{base}/ui/runs/{run_id}")).await.unwrap();
    assert!(text(&c, "main").await.contains("may not see"));
    c.goto(&format!("{base}/ui/registry/other/repo"))
        .await
        .unwrap();
    assert!(text(&c, "main").await.contains("no repository other/repo"));
    c.goto(&format!("{base}/ui/registry/web/app"))
        .await
        .unwrap();
    assert!(
        c.find(Locator::Css("a[aria-label^='Delete tag']"))
            .await
            .is_err(),
        "no delete without content/delete"
    );
    c.close().await.unwrap();
}

async fn sign_in_expecting_failure(c: &Client, base: &str) {
    submit_login(c, base, "admin", "wrong").await;
    until(c, "the refusal", Duration::from_secs(10), || async {
        text(c, "p.error")
            .await
            .contains("Wrong user name or password")
    })
    .await;
    c.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/login");
}

async fn attrs(c: &Client, css: &str, attr: &str) -> BTreeSet<String> {
    attr_list(c, css, attr).await.into_iter().collect()
}

/// `attr` of every element matching `css`, in page order.
async fn attr_list(c: &Client, css: &str, attr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in c.find_all(Locator::Css(css)).await.unwrap_or_default() {
        if let Ok(Some(v)) = e.attr(attr).await {
            out.push(v);
        }
    }
    out
}
