//! Agent pools with real agents: one `acr-task serve` and three `acr-task agent`
//! processes on the real Docker Engine. Every queued run of a pool runs exactly once on
//! its agents; a run whose agent is killed (-9) goes to another agent as its next attempt
//! and finishes there; a cancel reaches a run on an agent; SIGTERM drains an agent (its
//! run finishes, then it leaves); the pool commands say what they refuse.

mod serve_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::*;

/// How many runs the first test queues at once.
const RUNS: usize = 200;

struct Agent {
    name: String,
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(serve: &Serve, dir: &Path, name: &str, concurrency: u32) -> Agent {
        let log = dir.join(format!("{name}.log"));
        let child = serve
            .cli()
            .args([
                "agent", "--server", &serve.url, "--pool", "pool1", "--name", name,
            ])
            .args([
                "--concurrency",
                &concurrency.to_string(),
                "--labels",
                "zone=a,disk=ssd",
            ])
            .arg("--work-dir")
            .arg(dir.join(format!("{name}-work")))
            .args(["--log", "acr_task=info"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Agent {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn sigterm(&self) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
    }

    /// Waits for the process to end; its exit status.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        let c = self.child.as_mut().expect("running");
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "agent {} did not stop: {}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn cli(serve: &Serve, args: &[&str]) -> (bool, String, String) {
    let o = serve
        .cli()
        .args(args)
        .args(["--server", &serve.addr])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

async fn pool(api: &Api) -> Value {
    let (st, v) = api.get("/api/agentpools/pool1").await;
    assert_eq!(st, 200, "{v}");
    v
}

async fn wait_online(api: &Api, n: u64) {
    let start = Instant::now();
    loop {
        let v = pool(api).await;
        if v["agentsOnline"].as_u64() == Some(n) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn queue(api: &Api, task: &str) -> String {
    let (st, v) = api
        .post(&format!("/api/tasks/{task}/runs"), &json!({}))
        .await;
    assert_eq!(st, 202, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Waits until the run's log has `needle`; the run as it is then.
async fn wait_log(api: &Api, id: &str, needle: &str) -> Value {
    let start = Instant::now();
    loop {
        let log = api.text(&format!("/api/runs/{id}/logs")).await;
        if log.contains(needle) {
            return api.get(&format!("/api/runs/{id}")).await.1;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "run {id} never logged {needle:?}: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn agent_named<'a>(agents: &'a mut [Agent], id: &str) -> &'a mut Agent {
    agents
        .iter_mut()
        .find(|a| id.starts_with(&format!("{}-", a.name)))
        .unwrap_or_else(|| panic!("no agent for {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_run_each_run_once_and_a_killed_agents_run_moves_on() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    // The server runs nothing itself here: runs of the pool go to agents only. A lease
    // short enough for a quick redelivery, long enough that a heartbeat slowed by the
    // machine's load (200 runs, five at a time, on 2 cores) still renews it.
    let serve = Serve::start_with(&dir.path().join("d"), 1, &["--agent-lease", "6"]);
    let api = serve.token_client().await;

    // Pools: made, and a task naming a pool that does not exist is refused.
    let (ok, out, err) = cli(
        &serve,
        &["agent-pool", "create", "pool1", "--max-runs", "5"],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("pool1"), "{out}");
    let (ok, _, err) = cli(
        &serve,
        &[
            "task",
            "create",
            "x",
            "--cmd",
            "busybox true",
            "--context",
            "/dev/null",
            "--agent-pool",
            "nope",
        ],
    );
    assert!(
        !ok && err.contains("agent pool nope does not exist"),
        "{err}"
    );
    for (name, cmd) in [
        ("quick", "busybox echo ran-{{.Run.ID}}"),
        (
            "slow",
            "busybox sh -c 'echo start-{{.Run.ID}}; sleep 8; echo end-{{.Run.ID}}'",
        ),
    ] {
        let (ok, out, err) = cli(
            &serve,
            &[
                "task",
                "create",
                name,
                "--cmd",
                cmd,
                "--context",
                "/dev/null",
                "--agent-pool",
                "pool1",
            ],
        );
        assert!(ok, "{out}{err}");
    }
    // A pool in use is not deleted.
    let (ok, _, err) = cli(&serve, &["agent-pool", "delete", "pool1"]);
    assert!(!ok && err.contains("in use (quick, slow)"), "{err}");

    let mut agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::start(&serve, dir.path(), &format!("a{i}"), 2))
        .collect();
    wait_online(&api, 3).await;
    let (ok, out, _) = cli(&serve, &["agent-pool", "show", "pool1"]);
    assert!(
        ok && out.contains("zone=a") && out.contains("online"),
        "{out}"
    );
    // The web page lists the pool's agents.
    let page = serve.page("/ui/pools").await;
    for a in ["a1", "a2", "a3"] {
        assert!(page.contains(&format!("<td>{a}</td>")), "{page}");
    }
    assert!(
        page.contains("zone=a, disk=ssd") || page.contains("disk=ssd, zone=a"),
        "{page}"
    );
    let metrics = api.text("/metrics").await;
    assert!(
        metrics.contains("acr_task_agents_online{pool=\"pool1\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("acr_task_agent_heartbeat_age_seconds{pool=\"pool1\",agent=\"a1-"),
        "{metrics}"
    );

    // Many runs queued at once: each succeeds, exactly once, never above the pool's limit.
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..RUNS {
        ids.push(queue(&api, "quick").await);
    }
    let mut most_running = 0;
    loop {
        let v = pool(&api).await;
        most_running = most_running.max(v["running"].as_u64().unwrap_or(0));
        if v["queued"] == 0 && v["running"] == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "{v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("{RUNS} runs on 3 agents: {:?}", started.elapsed());
    assert!(
        most_running <= 5,
        "the pool's limit of 5 was passed: {most_running}"
    );
    let mut by_agent: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let (_, r) = api.get(&format!("/api/runs/{id}")).await;
        assert_eq!(r["status"], "Succeeded", "{r}");
        assert_eq!(r["attempt"], 1, "{r}");
        assert_eq!(r["pool"], "pool1", "{r}");
        *by_agent
            .entry(r["agent"].as_str().unwrap().to_string())
            .or_default() += 1;
        let log = api.text(&format!("/api/runs/{id}/logs")).await;
        assert_eq!(log.matches(&format!("| ran-{id}")).count(), 1, "{log}");
        assert_eq!(log.matches("attempt 1 on agent").count(), 1, "{log}");
        assert!(log.contains(&format!("run {id}: Succeeded")), "{log}");
    }
    assert!(
        by_agent.len() >= 2,
        "the runs went to one agent only: {by_agent:?}"
    );

    // kill -9 of an agent mid-run: the run goes to another agent as attempt 2.
    let id = queue(&api, "slow").await;
    let r = wait_log(&api, &id, &format!("start-{id}")).await;
    let first = r["agent"].as_str().unwrap().to_string();
    agent_named(&mut agents, &first).kill9();
    let done = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(90))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    assert_ne!(done["agent"], first.as_str(), "{done}");
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert!(
        log.contains("stopped heartbeating; queued again as attempt 2"),
        "{log}"
    );
    assert_eq!(log.matches(&format!("end-{id}")).count(), 1, "{log}");
    assert!(leftovers(&id).is_empty(), "{:?}", leftovers(&id));
    wait_online(&api, 2).await;

    // A run of no stored task goes to the pool it names (`run --no-wait --agent-pool`).
    let (ok, out, err) = cli(
        &serve,
        &[
            "run",
            "--no-wait",
            "--agent-pool",
            "pool1",
            "--cmd",
            "busybox echo quick-{{.Run.ID}}",
            "/dev/null",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{out}{err}");
    let quick: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(quick["pool"], "pool1", "{quick}");
    let id = quick["id"].as_str().unwrap().to_string();
    let done = api
        .wait_status(&id, &["Succeeded", "Failed"], Duration::from_secs(60))
        .await;
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert!(done["agent"].is_string(), "ran on an agent: {done}");
    let log = api.text(&format!("/api/runs/{id}/logs")).await;
    assert!(log.contains(&format!("quick-{id}")), "{log}");

    // A cancel reaches a run on an agent.
    let id = queue(&api, "slow").await;
    wait_log(&api, &id, &format!("start-{id}")).await;
    let (st, v) = api
        .post(&format!("/api/runs/{id}/cancel"), &json!({}))
        .await;
    assert!(st < 300, "{v}");
    let done = api
        .wait_status(
            &id,
            &["Canceled", "Succeeded", "Failed"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["status"], "Canceled", "{done}");

    // SIGTERM drains: the agent's run finishes there, then the agent leaves.
    let id = queue(&api, "slow").await;
    let r = wait_log(&api, &id, &format!("start-{id}")).await;
    let holder = r["agent"].as_str().unwrap().to_string();
    let agent = agent_named(&mut agents, &holder);
    agent.sigterm();
    let done = api
        .wait_status(
            &id,
            &["Succeeded", "Failed", "Canceled"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        (done["status"].as_str(), done["attempt"].as_u64()),
        (Some("Succeeded"), Some(1)),
        "{done}"
    );
    assert_eq!(done["agent"], holder.as_str());
    assert!(agent.wait(Duration::from_secs(30)).success());
    let left: BTreeSet<String> = pool(&api).await["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!left.contains(&holder), "{left:?}");

    // The pool's tasks move away; then it can go.
    for t in ["quick", "slow"] {
        let (ok, out, err) = cli(&serve, &["task", "update", t, "--agent-pool", ""]);
        assert!(ok, "{out}{err}");
    }
    let (ok, out, err) = cli(&serve, &["agent-pool", "delete", "pool1"]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = cli(&serve, &["agent-pool", "list", "-o", "json"]);
    assert!(ok && out.trim() == "[]", "{out}");
}
