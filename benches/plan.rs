//! Render + parse + validate + plan of a generated 10,000-step task file with random `when`
//! edges, in-process; then `acr-task run --dry-run` of the same file as a whole process.
//! Run: `cargo bench --bench plan`. Prints the best and median of several runs of each.

use std::time::{Duration, Instant};

use acr_task::plan::Plan;
use acr_task::task::{self, RunInfo, Values};

const STEPS: usize = 10_000;

/// A small deterministic generator (no extra dependency).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % bound.max(1)
    }
}

fn generate() -> String {
    let mut rng = Lcg(42);
    let mut s = String::with_capacity(STEPS * 120);
    s.push_str("version: v1.1.0\nstepTimeout: 300\nsteps:\n");
    for i in 0..STEPS {
        s.push_str(&format!("  - id: s{i}\n"));
        match i % 3 {
            0 => s.push_str(&format!(
                "    build: -t $Registry/app{i}:{{{{.Run.ID}}}} -f Dockerfile .\n"
            )),
            1 => s.push_str(&format!(
                "    cmd: busybox echo step {i} {{{{.Values.tag}}}}\n"
            )),
            _ => s.push_str(&format!("    push: [\"$Registry/app{i}:$ID\"]\n")),
        }
        if i == 0 || rng.next(10) == 0 {
            s.push_str("    when: [\"-\"]\n");
        } else {
            let k = 1 + rng.next(3);
            let deps: Vec<String> = (0..k).map(|_| format!("s{}", rng.next(i))).collect();
            s.push_str(&format!("    when: [{}]\n", deps.join(", ")));
        }
    }
    s
}

fn main() {
    let text = generate();
    let run = RunInfo {
        id: "ca1".into(),
        registry: "127.0.0.1:5000".into(),
        ..Default::default()
    };
    let mut values = Values::default();
    let _ = values.set("tag=v1");
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        let t = match task::load_str("bench.yaml", &text, &run, &values) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("generated task does not load: {e}");
                std::process::exit(1);
            }
        };
        let plan = match Plan::new(&t) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("generated task does not plan: {e}");
                std::process::exit(1);
            }
        };
        times.push(start.elapsed());
        assert_eq!(plan.len(), STEPS);
    }
    times.sort();
    println!(
        "render+parse+plan, {STEPS} steps ({} KiB): best {:.1} ms, median {:.1} ms",
        text.len() / 1024,
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3
    );
    dry_run(&text);
}

/// The same file through the binary, as a user runs it: process start to exit.
fn dry_run(text: &str) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("temp dir: {e}");
            std::process::exit(1);
        }
    };
    let file = dir.path().join("acb.yaml");
    if let Err(e) = std::fs::write(&file, text) {
        eprintln!("writing {}: {e}", file.display());
        std::process::exit(1);
    }
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_acr-task"))
            .args(["run", "--dry-run", "--set", "tag=v1", "-o", "json"])
            .arg(&file)
            .output();
        times.push(start.elapsed());
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!("dry run failed: {}", String::from_utf8_lossy(&o.stderr));
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("starting acr-task: {e}");
                std::process::exit(1);
            }
        }
    }
    times.sort();
    println!(
        "acr-task run --dry-run, {STEPS} steps, whole process: best {:.1} ms, median {:.1} ms",
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3
    );
}
