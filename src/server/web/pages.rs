//! The page's HTML (maud: escaped by default, checked at compile time), drawn from plain
//! data; no I/O here. Live parts carry `data-` attributes that `app.js` updates.

use maud::{html, Markup, DOCTYPE};

use super::view::{self, duration_text, short_hash, Graph, NODE_H, NODE_W};
use crate::exec::Status;
use crate::server::live::StepState;
use crate::server::model::{RunRecord, TaskSpec};

/// Who is looking, and what the header shows them.
pub struct Chrome {
    /// Empty on an open (`--insecure-open-api`) server.
    pub user: String,
    pub csrf: String,
    pub tasks: bool,
    pub registry: bool,
}

pub fn layout(c: &Chrome, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(c.csrf);
                title { (title) " · acr-task" }
                link rel="stylesheet" href="/ui/assets/app.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Main" {
                        a.brand href="/" { "acr-task" }
                        @if c.tasks {
                            a href="/" { "Runs" }
                            a href="/ui/tasks" { "Tasks" }
                            a href="/ui/pools" { "Agent pools" }
                        }
                        @if c.registry { a href="/ui/registry" { "Registry" } }
                    }
                    @if !c.user.is_empty() {
                        form.logout method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(c.csrf);
                            span.user { (c.user) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" { (body) }
            }
        }
    }
}

pub fn login(error: Option<&str>, next: &str) -> Markup {
    let c = Chrome {
        user: String::new(),
        csrf: String::new(),
        tasks: false,
        registry: false,
    };
    layout(
        &c,
        "Sign in",
        html! {
            h1 { "Sign in" }
            p { "Use the registry's admin user or a token (its name and one of its passwords)." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.login method="post" action="/ui/login" {
                input type="hidden" name="next" value=(next);
                label for="username" { "User name" }
                input id="username" name="username" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input id="password" name="password" type="password" autocomplete="current-password" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub fn message(c: &Chrome, title: &str, text: &str) -> Markup {
    layout(c, title, html! { h1 { (title) } p role="alert" { (text) } })
}

fn status_badge(s: Status) -> Markup {
    html! { span class={ "status s-" (s.as_str()) } data-status=(s.as_str()) { (s.as_str()) } }
}

fn csrf_field(c: &Chrome) -> Markup {
    html! { input type="hidden" name="csrf" value=(c.csrf); }
}

pub struct RunsPage {
    pub runs: Vec<RunRecord>,
    pub tasks: Vec<String>,
    pub task: Option<String>,
    pub status: Option<Status>,
    pub next: Option<i64>,
    pub queued: u64,
    pub running: usize,
    pub concurrency: usize,
}

pub fn run_rows(runs: &[RunRecord], now: chrono::DateTime<chrono::Utc>) -> Markup {
    html! {
        @for r in runs {
            @let (trig, what) = view::trigger_text(&r.trigger);
            tr data-run=(r.id) {
                td { a href={ "/ui/runs/" (r.id) } { (r.id) } }
                td { a href={ "/ui/tasks/" (r.task) } { (r.task) } }
                td { (status_badge(r.status)) }
                td { (trig) @if let Some(w) = what { " " code { (w) } } }
                td { time datetime=(r.queued_at) { (r.queued_at) } }
                td { (view::run_duration(r, now).map(duration_text).unwrap_or_default()) }
            }
        }
        @if runs.is_empty() { tr { td colspan="6" { "No runs." } } }
    }
}

pub fn runs(c: &Chrome, p: &RunsPage, now: chrono::DateTime<chrono::Utc>) -> Markup {
    let statuses = Status::RUN;
    layout(
        c,
        "Runs",
        html! {
            h1 { "Runs" }
            p.queue aria-live="polite" {
                "Queue: " strong { (p.queued) } " waiting, "
                strong { (p.running) } " running of " (p.concurrency) " at once."
            }
            form.filters method="get" action="/" {
                label for="f-task" { "Task" }
                select id="f-task" name="task" {
                    option value="" { "all" }
                    @for t in &p.tasks {
                        option value=(t) selected[p.task.as_deref() == Some(t.as_str())] { (t) }
                    }
                }
                label for="f-status" { "Status" }
                select id="f-status" name="status" {
                    option value="" { "all" }
                    @for s in statuses {
                        option value=(s.as_str()) selected[p.status == Some(s)] { (s.as_str()) }
                    }
                }
                button type="submit" { "Filter" }
            }
            div.scroll {
                table.runs {
                    caption.visually-hidden { "Runs, newest first" }
                    thead { tr { th { "Run" } th { "Task" } th { "Status" } th { "Trigger" } th { "Queued" } th { "Duration" } } }
                    tbody id="run-rows" data-live="runs" { (run_rows(&p.runs, now)) }
                }
            }
            @if let Some(n) = p.next {
                a.more href=(older_href(p, n)) { "Older runs →" }
            }
        },
    )
}

fn older_href(p: &RunsPage, before: i64) -> String {
    let mut q = format!("/?before={before}");
    if let Some(t) = &p.task {
        q.push_str(&format!("&task={}", urlenc(t)));
    }
    if let Some(s) = p.status {
        q.push_str(&format!("&status={}", s.as_str()));
    }
    q
}

/// Percent-encodes a query value.
pub fn urlenc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn graph(g: &Graph) -> Markup {
    html! {
        svg.dag id="dag" role="img" aria-label="The run's steps and what each waits for"
            width=(g.width) height=(g.height) viewBox={ "0 0 " (g.width) " " (g.height) }
            data-steps=(g.nodes.len()) {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" {}
                }
            }
            @for e in &g.edges {
                @let (a, b) = (&g.nodes[e.from], &g.nodes[e.to]);
                line.edge data-from=(a.id) data-to=(b.id)
                    x1=(a.x + NODE_W) y1=(a.y + NODE_H / 2) x2=(b.x) y2=(b.y + NODE_H / 2)
                    marker-end="url(#arrow)" {}
            }
            @for n in &g.nodes {
                g class={ "node s-" (n.status.as_str()) } data-step=(n.id) data-index=(n.index) {
                    title { (n.id) ": " (n.status.as_str()) }
                    rect x=(n.x) y=(n.y) width=(NODE_W) height=(NODE_H) rx="6" {}
                    text x=(n.x + 10) y=(n.y + NODE_H / 2 + 5) { (truncate(&n.id, 18)) }
                }
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub fn timeline(steps: &[StepState]) -> Markup {
    let total = steps
        .iter()
        .map(|s| s.started_ms + s.duration_ms)
        .max()
        .unwrap_or(0)
        .max(1);
    html! {
        table.timeline {
            caption.visually-hidden { "Steps: start, duration, attempts" }
            thead { tr { th { "Step" } th { "Kind" } th { "Status" } th { "Start" } th { "Duration" } th { "Attempts" } th.bar-col { "Timeline" } } }
            tbody id="step-rows" {
                @for s in steps {
                    @let left = s.started_ms * 100 / total;
                    @let width = (s.duration_ms * 100 / total).max(1);
                    tr data-step=(s.id) {
                        td { (s.id) }
                        td { (s.kind) }
                        td.st { (status_badge(s.status)) }
                        td.start { "+" (duration_text(s.started_ms)) }
                        td.dur { (duration_text(s.duration_ms)) }
                        td.att { (s.attempts) }
                        // SVG geometry, not inline styles: the page's CSP allows no inline style.
                        td.bar-col { svg.track viewBox="0 0 100 10" preserveAspectRatio="none" aria-hidden="true" { rect class={ "bar s-" (s.status.as_str()) } x=(left) y="0" width=(width) height="10" {} } }
                    }
                }
            }
        }
    }
}

pub struct RunPage {
    pub run: RunRecord,
    pub steps: Vec<StepState>,
    pub log: String,
    /// Bytes of the log file the page shows (where its live stream starts).
    pub log_bytes: u64,
    pub can_write: bool,
    pub stored_task: bool,
}

pub fn run(c: &Chrome, p: &RunPage, now: chrono::DateTime<chrono::Utc>) -> Markup {
    let r = &p.run;
    let (trig, what) = view::trigger_text(&r.trigger);
    let g = view::layout(&p.steps);
    layout(
        c,
        &format!("Run {}", r.id),
        html! {
            h1 { "Run " (r.id) " " span id="run-status" { (status_badge(r.status)) } }
            dl.facts id="run" data-run=(r.id) data-offset=(p.log_bytes) data-final=(r.is_finished()) {
                dt { "Task" } dd { a href={ "/ui/tasks/" (r.task) } { (r.task) } }
                dt { "Trigger" } dd { (trig) @if let Some(w) = what { " " code { (w) } } }
                @if let Some(cm) = &r.commit { dt { "Commit" } dd { code { (short_hash(cm)) } } }
                @if let Some(pool) = &r.pool {
                    dt { "Agent pool" } dd { (pool) }
                    dt { "Agent" } dd id="run-agent" { (r.agent.as_deref().unwrap_or("waiting for one")) }
                    dt { "Attempt" } dd id="run-attempt" { (r.attempt) }
                }
                dt { "Queued" } dd { time datetime=(r.queued_at) { (r.queued_at) } }
                @if let Some(s) = &r.started_at { dt { "Started" } dd { time datetime=(s) { (s) } } }
                @if let Some(f) = &r.finished_at { dt { "Finished" } dd { time datetime=(f) { (f) } } }
                dt { "Duration" } dd id="run-duration" { (view::run_duration(r, now).map(duration_text).unwrap_or_default()) }
                @if let Some(e) = &r.error { dt { "Error" } dd.error { (e) } }
            }
            @if p.can_write {
                div.actions {
                    @if !r.is_finished() {
                        form method="post" action={ "/ui/runs/" (r.id) "/cancel" } {
                            (csrf_field(c))
                            button.danger id="cancel" type="submit" { "Cancel run" }
                        }
                    }
                    @if r.is_finished() && (p.stored_task || matches!(r.trigger, crate::server::model::Trigger::Quick)) {
                        form method="post" action={ "/ui/runs/" (r.id) "/rerun" } {
                            (csrf_field(c))
                            button id="rerun" type="submit" { "Run again" }
                        }
                    }
                }
            }
            h2 { "Steps" }
            div.scroll id="graph" { @if p.steps.is_empty() { p.muted { "The steps appear once the task file is loaded." } } @else { (graph(&g)) } }
            div.scroll { (timeline(&p.steps)) }
            h2 { "Log" }
            div.logbar {
                label for="log-step" { "Show" }
                select id="log-step" {
                    option value="" { "all steps" }
                    @for s in &p.steps { option value=(s.id) { (s.id) } }
                    option value="acr-task" { "acr-task" }
                }
                span id="live" aria-live="polite" { @if !r.is_finished() { "live" } }
            }
            pre id="log" tabindex="0" aria-label="Run log" { (p.log) }
        },
    )
}

pub fn tasks(c: &Chrome, tasks: &[(TaskSpec, Option<RunRecord>)]) -> Markup {
    layout(
        c,
        "Tasks",
        html! {
            h1 { "Tasks" }
            div.scroll {
                table {
                    thead { tr { th { "Task" } th { "Context" } th { "Triggers" } th { "Last run" } } }
                    tbody {
                        @for (t, last) in tasks {
                            tr {
                                td { a href={ "/ui/tasks/" (t.name) } { (t.name) } }
                                td { code { (t.context) } }
                                td { (triggers_text(t)) }
                                td { @if let Some(r) = last { a href={ "/ui/runs/" (r.id) } { (r.id) } " " (status_badge(r.status)) } }
                            }
                        }
                        @if tasks.is_empty() { tr { td colspan="4" { "No tasks. Create one with acr-task task create." } } }
                    }
                }
            }
        },
    )
}

pub fn pools(c: &Chrome, pools: &[crate::server::agents::PoolView]) -> Markup {
    layout(
        c,
        "Agent pools",
        html! {
            h1 { "Agent pools" }
            @if pools.is_empty() { p { "No agent pools. Create one with acr-task agent-pool create NAME." } }
            @for p in pools {
                section.pool id={ "pool-" (p.pool.name) } {
                    h2 { (p.pool.name) }
                    dl.facts {
                        dt { "Runs at once" } dd { (p.pool.max_runs.map(|n| n.to_string()).unwrap_or_else(|| "no limit".into())) }
                        dt { "Queued" } dd.queued { (p.queued) }
                        dt { "Running" } dd.running { (p.running) }
                        dt { "Agents online" } dd.online { (p.agents_online) }
                    }
                    div.scroll {
                        table {
                            caption.visually-hidden { "Agents of " (p.pool.name) }
                            thead { tr { th { "Agent" } th { "Machine" } th { "State" } th { "Runs at once" } th { "Labels" } th { "Last heard from" } } }
                            tbody {
                                @for a in &p.agents {
                                    tr {
                                        td { code { (a.agent.id) } }
                                        td { (a.agent.name) }
                                        td { @if !a.online { "offline" } @else if a.agent.draining { "draining" } @else { "online" } }
                                        td { (a.agent.concurrency) }
                                        td { (a.agent.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")) }
                                        td { time datetime=(a.agent.last_seen) { (a.agent.last_seen) } }
                                    }
                                }
                                @if p.agents.is_empty() { tr { td colspan="6" { "No agents. Start one with acr-task agent --pool " (p.pool.name) "." } } }
                            }
                        }
                    }
                }
            }
        },
    )
}

fn triggers_text(t: &TaskSpec) -> String {
    let mut out = Vec::new();
    if t.triggers.commit.is_some() {
        out.push("commit".to_string());
    }
    if t.triggers.base_image {
        out.push("base image".to_string());
    }
    for tm in &t.triggers.timers {
        out.push(format!("timer {} ({})", tm.name, tm.schedule));
    }
    if out.is_empty() {
        "manual".into()
    } else {
        out.join(", ")
    }
}

pub struct TaskPage {
    pub spec: TaskSpec,
    pub bases: Vec<(String, Option<String>)>,
    pub outputs: Vec<String>,
    pub runs: Vec<RunRecord>,
    pub can_write: bool,
}

pub fn task(c: &Chrome, p: &TaskPage, now: chrono::DateTime<chrono::Utc>) -> Markup {
    let t = &p.spec;
    layout(
        c,
        &format!("Task {}", t.name),
        html! {
            h1 { "Task " (t.name) }
            @if p.can_write {
                form method="post" action={ "/ui/tasks/" (t.name) "/run" } {
                    (csrf_field(c))
                    button id="run-now" type="submit" { "Run now" }
                }
            }
            dl.facts {
                dt { "Context" } dd { code { (t.context) } }
                dt { "Branch" } dd { (t.branch()) }
                dt { "Task file" } dd { @if t.task_yaml.is_some() { "inline" } @else { code { (t.file.as_deref().unwrap_or(crate::server::model::DEFAULT_FILE)) } } }
                dt { "Timeout" } dd { (t.timeout_secs()) " s" }
                @if let Some(pl) = &t.platform { dt { "Platform" } dd { (pl) } }
                dt { "Triggers" } dd { (triggers_text(t)) }
                @if let Some(cm) = &t.triggers.commit {
                    dt { "Commit trigger" } dd {
                        @if cm.secret.is_some() { "webhooks (signed)" } @else { "no webhook secret" }
                        @if let Some(p) = cm.poll_interval { ", polls every " (p) " s" }
                        @if cm.watch { ", watches the local repository" }
                    }
                }
                @if !t.secrets.is_empty() { dt { "Secrets" } dd { @for (k, _) in &t.secrets { code { (k) } " " } } }
            }
            @if !t.triggers.timers.is_empty() {
                h2 { "Timers" }
                ul { @for tm in &t.triggers.timers { li { (tm.name) ": " code { (tm.schedule) } " (UTC)" } } }
            }
            h2 { "Base images" }
            @if p.bases.is_empty() { p.muted { "None recorded yet (they are learned from a successful run's builds)." } }
            @else { ul { @for (b, d) in &p.bases { li { code { (b) } @if let Some(d) = d { " at " code { (short_hash(d)) } } } } } }
            @if !p.outputs.is_empty() {
                h2 { "Images it pushes" }
                ul { @for o in &p.outputs { li { code { (o) } } } }
            }
            @if let Some(y) = &t.task_yaml {
                h2 { "Task file" }
                pre.code { (y) }
            }
            h2 { "Recent runs" }
            div.scroll { table.runs { tbody { (run_rows(&p.runs, now)) } } }
        },
    )
}

pub struct RepoLine {
    pub name: String,
    pub tags: usize,
}

pub struct RegistryPage {
    pub tier: String,
    pub used: u64,
    pub included: Option<u64>,
    pub repos: Vec<RepoLine>,
    pub next: Option<String>,
    /// Its geo-replication group, this server first (none: not replicated, or not the
    /// admin's page).
    pub replicas: Vec<crate::replication::ReplicationInfo>,
}

pub fn registry(c: &Chrome, p: &RegistryPage) -> Markup {
    let pct = p
        .included
        .filter(|i| *i > 0)
        .map(|i| (p.used.saturating_mul(100) / i).min(100));
    layout(
        c,
        "Registry",
        html! {
            h1 { "Registry" }
            section.usage aria-label="Storage" {
                p { "Tier " strong { (p.tier) } ": " (crate::tier::human(p.used)) " used"
                    @if let Some(i) = p.included { " of " (crate::tier::human(i)) " included" } "." }
                @if let Some(pc) = pct {
                    meter min="0" max="100" value=(pc) aria-label="Storage used" { (pc) "%" }
                }
            }
            div.scroll {
                table {
                    thead { tr { th { "Repository" } th { "Tags" } } }
                    tbody {
                        @for r in &p.repos {
                            tr { td { a href={ "/ui/registry/" (r.name) } { (r.name) } } td { (r.tags) } }
                        }
                        @if p.repos.is_empty() { tr { td colspan="2" { "No repositories you may see." } } }
                    }
                }
            }
            @if let Some(n) = &p.next { a.more href={ "/ui/registry?last=" (urlenc(n)) } { "More →" } }
            @if !p.replicas.is_empty() {
                section.replicas aria-labelledby="replications" {
                    h2 id="replications" { "Replications" }
                    div.scroll {
                        table {
                            thead { tr { th { "Region" } th { "URL" } th { "Status" } th { "Behind" } th { "Last sync" } th { "Last error" } } }
                            tbody {
                                @for r in &p.replicas {
                                    tr id={ "replica-" (r.name) } {
                                        td { (r.name) @if r.this_server { " (this server)" } }
                                        td { code { (r.url) } }
                                        td.status {
                                            (r.status)
                                            @if let Some((done, all)) = r.backfill { " " (done) "/" (all) }
                                            @if !r.region_endpoint_enabled { ", serves no client" }
                                        }
                                        td.lag { @if !r.this_server { (r.lag_events) " events, " (r.lag_seconds) " s" } }
                                        td { @if let Some(t) = &r.last_sync { time datetime=(t) { (t) } } }
                                        td.error { @if let Some(e) = &r.last_error { (e) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub struct ManifestLine {
    pub digest: String,
    pub kind: String,
    pub size: u64,
    pub platforms: Vec<String>,
    pub created: String,
    pub tags: Vec<String>,
    /// (digest, artifact type) of the manifests whose subject this is.
    pub referrers: Vec<(String, String)>,
}

pub struct TagLine {
    pub tag: String,
    pub digest: String,
    pub updated: String,
}

pub struct RepoPage {
    pub repo: String,
    pub host: String,
    pub tags: Vec<TagLine>,
    pub manifests: Vec<ManifestLine>,
    pub can_delete: bool,
}

pub fn repo(c: &Chrome, p: &RepoPage) -> Markup {
    layout(
        c,
        &format!("Repository {}", p.repo),
        html! {
            h1 { "Repository " (p.repo) }
            h2 { "Tags" }
            div.scroll {
                table.tags {
                    thead { tr { th { "Tag" } th { "Digest" } th { "Pushed" } th { "Pull" } @if p.can_delete { th { span.visually-hidden { "Actions" } } } } }
                    tbody {
                        @for t in &p.tags {
                            @let pull = format!("docker pull {}/{}:{}", p.host, p.repo, t.tag);
                            tr data-tag=(t.tag) {
                                td { (t.tag) }
                                td { code title=(t.digest) { (short_hash(&t.digest)) } }
                                td { time datetime=(t.updated) { (t.updated) } }
                                td.pull { code { (pull) } " " button.copy type="button" data-copy=(pull) aria-label={ "Copy the pull command of " (t.tag) } { "Copy" } }
                                @if p.can_delete {
                                    td { a.danger href={ "/ui/registry/" (p.repo) "/_delete?tag=" (urlenc(&t.tag)) } aria-label={ "Delete tag " (t.tag) } { "Delete" } }
                                }
                            }
                        }
                        @if p.tags.is_empty() { tr { td colspan="5" { "No tags." } } }
                    }
                }
            }
            h2 { "Manifests" }
            div.scroll {
                table.manifests {
                    thead { tr { th { "Digest" } th { "Type" } th { "Size" } th { "Platforms" } th { "Created" } th { "Tags" } th { "Referrers" } } }
                    tbody {
                        @for m in &p.manifests {
                            tr {
                                td { code title=(m.digest) { (short_hash(&m.digest)) } }
                                td { (m.kind) }
                                td { (crate::tier::human(m.size)) }
                                td { (m.platforms.join(", ")) }
                                td { time datetime=(m.created) { (m.created) } }
                                td { (m.tags.join(", ")) }
                                td { @for (d, a) in &m.referrers { div { code title=(d) { (short_hash(d)) } " " (a) } } }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn confirm_delete(c: &Chrome, repo: &str, tag: &str, digest: &str) -> Markup {
    layout(
        c,
        "Delete a tag",
        html! {
            h1 { "Delete tag " (repo) ":" (tag) "?" }
            p { "The tag goes; the manifest " code { (short_hash(digest)) } " stays while anything else names it. This cannot be undone." }
            form method="post" action={ "/ui/registry/" (repo) "/_delete" } {
                (csrf_field(c))
                input type="hidden" name="tag" value=(tag);
                input type="hidden" name="digest" value=(digest);
                button.danger id="confirm-delete" type="submit" { "Delete " (tag) }
                " "
                a href={ "/ui/registry/" (repo) } { "Keep it" }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_stores_is_escaped() {
        let c = Chrome {
            user: "<script>".into(),
            csrf: "t".into(),
            tasks: true,
            registry: true,
        };
        let html = message(&c, "x", "<img src=x onerror=alert(1)>").into_string();
        assert!(!html.contains("<img src=x"));
        assert!(html.contains("&lt;img"));
        assert!(!html.contains("<script>"));
    }
}
