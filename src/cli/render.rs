//! Terminal rendering of run events: step-prefixed log lines (coloured on a TTY), a live
//! status line for running steps, and the summary table at the end.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::exec::{Event, RunReport, Status};
use crate::task::Task;

const COLORS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];

pub struct Renderer {
    ids: Vec<String>,
    width: usize,
    tty: bool,
    /// When false (JSON output), logs go to stderr so stdout holds only the report.
    logs_to_stdout: bool,
    /// Step output is not shown (`--no-logs`): only steps starting and ending.
    pub no_logs: bool,
    running: Vec<(usize, Instant)>,
    status_shown: bool,
}

impl Renderer {
    pub fn new(task: &Task, logs_to_stdout: bool) -> Renderer {
        let ids: Vec<String> = task.steps.iter().map(|s| s.id.clone()).collect();
        let width = ids.iter().map(|i| i.len()).max().unwrap_or(0);
        let tty = if logs_to_stdout {
            std::io::stdout().is_terminal()
        } else {
            std::io::stderr().is_terminal()
        };
        Renderer {
            ids,
            width,
            tty: tty && std::env::var_os("NO_COLOR").is_none(),
            logs_to_stdout,
            no_logs: false,
            running: Vec::new(),
            status_shown: false,
        }
    }

    fn out(&self) -> Box<dyn Write> {
        if self.logs_to_stdout {
            Box::new(std::io::stdout().lock())
        } else {
            Box::new(std::io::stderr().lock())
        }
    }

    fn prefix(&self, step: usize) -> String {
        let id = self.ids.get(step).map(String::as_str).unwrap_or("?");
        if self.tty {
            format!(
                "\x1b[{}m{:<w$} |\x1b[0m ",
                COLORS[step % COLORS.len()],
                id,
                w = self.width
            )
        } else {
            format!("{:<w$} | ", id, w = self.width)
        }
    }

    fn line(&mut self, text: &str) {
        let mut out = self.out();
        if self.status_shown {
            let _ = write!(out, "\r\x1b[2K");
        }
        let _ = writeln!(out, "{text}");
        drop(out);
        self.status_shown = false;
        self.status();
    }

    /// The live line: which steps run and for how long (TTY only).
    fn status(&mut self) {
        if !self.tty || self.running.is_empty() {
            return;
        }
        let parts: Vec<String> = self
            .running
            .iter()
            .map(|(s, t)| format!("{} {}s", self.ids[*s], t.elapsed().as_secs()))
            .collect();
        let mut out = self.out();
        let _ = write!(out, "\r\x1b[2K\x1b[2mrunning: {}\x1b[0m", parts.join(", "));
        let _ = out.flush();
        self.status_shown = true;
    }

    pub fn event(&mut self, ev: &Event) {
        match ev {
            Event::StepQueued { .. } => {}
            Event::StepStarted { step, attempt } => {
                if !self.running.iter().any(|(s, _)| s == step) {
                    self.running.push((*step, Instant::now()));
                }
                let note = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                let p = self.prefix(*step);
                self.line(&format!("{p}--> starting{note}"));
            }
            Event::Log { .. } if self.no_logs => {}
            Event::Log { step, line } => {
                let p = self.prefix(*step);
                self.line(&format!("{p}{line}"));
            }
            Event::StepFinished { step, report } => {
                self.running.retain(|(s, _)| s != step);
                let p = self.prefix(*step);
                let secs = report.duration_ms as f64 / 1000.0;
                let mut msg = format!("{p}<-- {} in {secs:.1}s", report.status.as_str());
                if let Some(e) = &report.error {
                    msg.push_str(&format!(": {e}"));
                }
                if report.ignored_error {
                    msg.push_str(" (ignored)");
                }
                self.line(&msg);
            }
            Event::RunFinished { .. } => {
                if self.status_shown {
                    let mut out = self.out();
                    let _ = write!(out, "\r\x1b[2K");
                    self.status_shown = false;
                }
            }
        }
    }

    /// Consumes events until the run finishes; ticks the live line once a second.
    /// (The channel may stay open: kept detached containers keep streaming logs.)
    pub async fn drive(mut self, mut rx: UnboundedReceiver<Event>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        self.event(&ev);
                        if matches!(ev, Event::RunFinished { .. }) {
                            break;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.status(),
            }
        }
    }
}

fn status_text(s: Status, tty: bool) -> String {
    let color = match s {
        Status::Succeeded => "32",
        Status::Failed | Status::TimedOut => "31",
        _ => "33",
    };
    if tty {
        format!("\x1b[{color}m{}\x1b[0m", s.as_str())
    } else {
        s.as_str().to_string()
    }
}

/// A plain text table with columns sized to their content.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(visible_len(c));
        }
    }
    let fmt_row = |cells: Vec<String>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - visible_len(c);
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = fmt_row(headers.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    out.push_str(&fmt_row(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for r in rows {
        out.push('\n');
        out.push_str(&fmt_row(r.clone()));
    }
    out
}

fn visible_len(s: &str) -> usize {
    // Skip ANSI colour sequences.
    let mut n = 0;
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            _ => n += 1,
        }
    }
    n
}

/// The end-of-run summary: one row per step, then images pushed and built images with
/// their base-image dependencies, the way ACR lists them.
pub fn summary(report: &RunReport) -> String {
    let tty = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let rows: Vec<Vec<String>> = report
        .steps
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.kind.to_string(),
                status_text(s.status, tty) + if s.ignored_error { " (ignored)" } else { "" },
                format!("{:.1}s", s.duration_ms as f64 / 1000.0),
                s.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                s.attempts.to_string(),
            ]
        })
        .collect();
    let mut out = format!(
        "Run {} {} in {:.1}s\n\n",
        report.run_id,
        status_text(report.status, tty),
        report.duration_ms as f64 / 1000.0
    );
    if let Some(e) = &report.error {
        out.push_str(&format!("Error: {e}\n\n"));
    }
    out.push_str(&table(
        &["STEP", "KIND", "STATUS", "DURATION", "EXIT", "ATTEMPTS"],
        &rows,
    ));
    let pushed: Vec<Vec<String>> = report
        .steps
        .iter()
        .flat_map(|s| {
            s.pushed
                .iter()
                .map(|p| vec![p.image.clone(), p.digest.clone()])
        })
        .collect();
    if !pushed.is_empty() {
        out.push_str("\n\nImages pushed\n");
        out.push_str(&table(&["IMAGE", "DIGEST"], &pushed));
    }
    let mut deps = Vec::new();
    for s in &report.steps {
        if let Some(b) = &s.built {
            for base in &b.base_images {
                deps.push(vec![
                    b.tags
                        .first()
                        .cloned()
                        .unwrap_or_else(|| b.image_id.clone()),
                    base.image.clone(),
                    // An image made here has no registry digest: its id tells which.
                    base.digest
                        .clone()
                        .or_else(|| base.image_id.as_ref().map(|id| format!("{id} (local)")))
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
        }
    }
    if !deps.is_empty() {
        out.push_str("\n\nBase image dependencies\n");
        out.push_str(&table(&["IMAGE", "BASE IMAGE", "DIGEST"], &deps));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "y".into()],
                vec!["\x1b[32mz\x1b[0m".into(), "w".into()],
            ],
        );
        assert_eq!(t, "A    BB\n---  --\nxxx  y\n\x1b[32mz\x1b[0m    w");
    }
}
