//! Results on disk: the JSON record (raw figures and machine info), the Markdown tables, and a
//! hand-written SVG (latency bars per scenario and target; rps against workers when swept).

use crate::pinning::{self, Placement};
use crate::scenarios::{
    Bound, CpuCost, DISTURBED, Measurement, SATURATED, Scenario, SweepPoint, Target,
};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Where and how a run was made.
#[derive(Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub date_utc: String,
    pub git_commit: Option<String>,
    pub command_line: String,
    pub load_generator_driver: &'static str,
    pub nginx_version: Option<String>,
    /// Resolution of the CPU figures: utime/stime count in these ticks.
    pub clock_ticks_per_second: u64,
}

/// The run's knobs, as recorded.
#[derive(Serialize)]
pub struct RunSettings {
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rounds: usize,
    pub rate: u64,
    pub connections: usize,
    pub load_threads: usize,
    /// mcp-guard `workers` = nginx `worker_processes`.
    pub workers: usize,
    /// mcp-guard's `[server] io`.
    pub gateway_io: String,
    pub upstream_threads: usize,
    /// The CPUs the harness could use.
    pub allowed_cpus: Vec<usize>,
    /// Where the target and the load side ran.
    pub placement: Placement,
    /// wrk used for the passthrough cross-check, if any.
    pub wrk: Option<String>,
    /// The original mcp-guard, when measured.
    pub original: Option<crate::scenarios::Original>,
    pub scenarios: Vec<&'static Scenario>,
}

/// mcp-guard against the other targets, per scenario and round, from the same run.
#[derive(Serialize)]
pub struct Ratios {
    pub scenario: String,
    pub round: usize,
    /// mcp-guard max rps / direct max rps.
    pub throughput_vs_direct: Option<f64>,
    /// mcp-guard max rps / nginx max rps.
    pub throughput_vs_nginx: Option<f64>,
    /// mcp-guard CPU per request / the mock upstream's own CPU per request (direct).
    pub cpu_per_request_vs_direct: Option<f64>,
    /// mcp-guard CPU per request / nginx CPU per request, at the fixed rate.
    pub cpu_per_request_vs_nginx: Option<f64>,
    /// mcp-guard CPU per request / nginx's at full throttle (the closed-loop phase): total, user
    /// and system.
    pub cpu_at_max_vs_nginx: Option<f64>,
    pub user_cpu_at_max_vs_nginx: Option<f64>,
    pub system_cpu_at_max_vs_nginx: Option<f64>,
    /// Whole-machine CPU per request at full throttle, mcp-guard's run ÷ nginx's: the cost of the
    /// hop whoever the kernel charged it to.
    pub machine_cpu_at_max_vs_nginx: Option<f64>,
    /// mcp-guard req/s ÷ nginx req/s as wrk measured them (passthrough, when wrk ran).
    pub wrk_throughput_vs_nginx: Option<f64>,
    /// This scenario's mcp-guard CPU per request ÷ mcp-guard's in `passthrough`, same round, at
    /// the fixed rate and at full throttle (every scenario but passthrough itself): what the
    /// scenario's extra work costs the gateway, e.g. routing over many servers in `routed`.
    pub cpu_per_request_vs_passthrough: Option<f64>,
    pub cpu_at_max_vs_passthrough: Option<f64>,
    /// Both closed-loop phases were bound by the target, not the load side, and neither was
    /// disturbed by outside work: only then does `throughput_vs_nginx` compare the two proxies.
    /// (Under contention, req/s = the CPU share a target wins ÷ its CPU per request, and the
    /// share won is the scheduler's doing.)
    pub comparable: bool,
    /// nginx p99 − direct p99, µs.
    pub nginx_p99_added_us: Option<i64>,
    /// mcp-guard p99 − direct p99, µs.
    pub mcp_guard_p99_added_us: Option<i64>,
}

#[derive(Serialize)]
pub struct Report {
    pub name: String,
    pub machine: Machine,
    pub settings: RunSettings,
    pub measurements: Vec<Measurement>,
    pub ratios: Vec<Ratios>,
    /// The fleet scenario's variants against the in-memory guard, per round.
    pub fleet: Vec<crate::fleet::FleetComparison>,
    /// What the run left out, and why (e.g. the Redis variant without redis-server).
    pub skipped: Vec<String>,
    pub worker_sweep: Vec<SweepPoint>,
}

impl Machine {
    pub fn collect(nginx_version: Option<String>) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let git_commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let command_line = std::env::args()
            .map(|a| {
                if a.is_empty() || a.contains(char::is_whitespace) {
                    format!("'{a}'")
                } else {
                    a
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            date_utc: utc_now(),
            git_commit,
            command_line,
            load_generator_driver: if monoio::utils::detect_uring() {
                "io_uring"
            } else {
                "epoll"
            },
            nginx_version,
            clock_ticks_per_second: crate::targets::ticks_per_second(),
        }
    }
}

/// Ratios for every scenario that has an mcp-guard row.
pub fn ratios(measurements: &[Measurement]) -> Vec<Ratios> {
    // Within a round, so every ratio compares targets measured next to each other.
    let get = |scenario: &str, round: usize, target: Target| {
        measurements.iter().find(|m| {
            m.scenario == scenario
                && m.round == round
                && m.target == target.name()
                && m.failure.is_none()
        })
    };
    let ratio = |a: f64, b: f64| (b > 0.0 && a > 0.0).then(|| a / b);
    let mut out = Vec::new();
    for guard in measurements
        .iter()
        .filter(|m| m.target == Target::McpGuard.name() && m.failure.is_none())
    {
        let direct = get(&guard.scenario, guard.round, Target::Direct);
        let nginx = get(&guard.scenario, guard.round, Target::Nginx);
        let passthrough = (guard.scenario != "passthrough")
            .then(|| get("passthrough", guard.round, Target::McpGuard))
            .flatten();
        let cpu = |m: Option<&Measurement>| m.and_then(|m| m.cpu_us_per_request);
        let cpu_ratio = |other| match (cpu(Some(guard)), cpu(other)) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => None,
        };
        let added = |m: Option<&Measurement>| {
            direct
                .zip(m)
                .map(|(d, m)| m.latency_us.p99 as i64 - d.latency_us.p99 as i64)
        };
        let at_max = |m: Option<&Measurement>, part: fn(&CpuCost) -> f64| {
            let ours = guard.at_max.target_cpu.as_ref().map(part)?;
            let theirs = m?.at_max.target_cpu.as_ref().map(part)?;
            ratio(ours, theirs)
        };
        let wrk_rps = |m: &Measurement| m.wrk.as_ref()?.run.as_ref().map(|r| r.rps);
        out.push(Ratios {
            scenario: guard.scenario.clone(),
            round: guard.round,
            throughput_vs_direct: direct.and_then(|d| ratio(guard.max_rps, d.max_rps)),
            throughput_vs_nginx: nginx.and_then(|n| ratio(guard.max_rps, n.max_rps)),
            cpu_per_request_vs_direct: cpu_ratio(direct),
            cpu_per_request_vs_nginx: cpu_ratio(nginx),
            cpu_per_request_vs_passthrough: cpu_ratio(passthrough),
            cpu_at_max_vs_passthrough: at_max(passthrough, |c| c.total_us),
            cpu_at_max_vs_nginx: at_max(nginx, |c| c.total_us),
            user_cpu_at_max_vs_nginx: at_max(nginx, |c| c.user_us),
            system_cpu_at_max_vs_nginx: at_max(nginx, |c| c.system_us),
            machine_cpu_at_max_vs_nginx: nginx
                .and_then(|n| n.at_max.machine_cpu_us)
                .zip(guard.at_max.machine_cpu_us)
                .and_then(|(n, g)| ratio(g, n)),
            wrk_throughput_vs_nginx: nginx
                .and_then(wrk_rps)
                .zip(wrk_rps(guard))
                .and_then(|(n, g)| ratio(g, n)),
            comparable: [nginx, Some(guard)]
                .iter()
                .all(|m| m.is_some_and(|m| m.at_max.bound == Bound::Target && !m.at_max.disturbed)),
            nginx_p99_added_us: added(nginx),
            mcp_guard_p99_added_us: added(Some(guard)),
        });
    }
    out
}

/// Writes `<dir>/<name>.json`, `.md` and `.svg`; returns the Markdown (also for the console).
pub fn write_all(report: &Report, dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json =
        serde_json::to_string_pretty(report).map_err(|e| format!("cannot encode results: {e}"))?;
    let markdown = markdown(report);
    for (ext, text) in [
        ("json", json),
        ("md", markdown.clone()),
        ("svg", svg(report)),
    ] {
        let path = dir.join(format!("{}.{ext}", report.name));
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(markdown)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

/// A report's title, the machine it ran on and the command that ran it (`what`: "load test",
/// "soak").
pub fn title(what: &str, name: &str, m: &Machine) -> String {
    let mut out = format!("# mcp-guard {what}: {name}\n\n");
    let _ = writeln!(
        out,
        "{} · {} ({} cores) · kernel {} · commit {} · load generator on {}{}\n",
        m.date_utc,
        m.cpu_model,
        m.nproc,
        m.kernel,
        m.git_commit.as_deref().unwrap_or("unknown"),
        m.load_generator_driver,
        m.nginx_version
            .as_deref()
            .map(|v| format!(" · {v}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "Command: `{}`\n", m.command_line);
    out
}

fn markdown(r: &Report) -> String {
    let s = &r.settings;
    let mut out = title("load test", &r.name, &r.machine);
    method(&mut out, r);
    out.push_str("\n## At a fixed rate (latency, CPU)\n\n");
    out.push_str("| scenario | target | p50 µs | p90 µs | p99 µs | p99.9 µs | CPU µs/req | user µs/req | sys µs/req | machine µs/req | idle RSS MB | peak RSS MB | errors |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut failures = Vec::new();
    let mut behind = false;
    for x in &r.measurements {
        if let Some(f) = &x.failure {
            let _ = writeln!(
                out,
                "| {} | {} | failed | | | | | | | | | | |",
                x.scenario,
                target_label(x, s.rounds)
            );
            failures.push(format!(
                "- {} / {}: {}",
                x.scenario,
                x.target,
                f.replace('\n', " ")
            ));
            continue;
        }
        // The percentiles only mean "at the rate" if the rate was actually offered.
        let mark = if x.achieved_rate < 0.95 * x.rate as f64 {
            behind = true;
            " †"
        } else {
            ""
        };
        let l = &x.latency_us;
        let c = x.cpu_at_rate.as_ref();
        let _ = writeln!(
            out,
            "| {} | {} | {}{mark} | {}{mark} | {}{mark} | {}{mark} | {} | {} | {} | {} | {:.1} | {:.1} | {} |",
            x.scenario,
            target_label(x, s.rounds),
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            opt(c.map(|c| c.total_us), 1),
            opt(c.map(|c| c.user_us), 1),
            opt(c.map(|c| c.system_us), 1),
            opt(x.machine_cpu_us_at_rate, 1),
            x.idle_rss_kb as f64 / 1024.0,
            x.peak_rss_kb as f64 / 1024.0,
            x.errors
        );
    }
    let _ = writeln!(
        out,
        "\nAt {}/s. Latency is measured from each request's scheduled send time when a slow earlier response delayed it (coordinated omission corrected), else from the actual send (the generator's own ~1 ms timer lateness is not counted). RSS of nginx is the sum over master and workers (shared pages count once per process); for direct it is the mock upstream's.",
        s.rate
    );
    if behind {
        out.push_str("\n† the target did not sustain the fixed rate (achieved < 95 %); these latencies include queueing.\n");
    }
    for x in r
        .measurements
        .iter()
        .filter(|x| x.idle_connections_dropped > 0)
    {
        let _ = writeln!(
            out,
            "\n{} / {}: the target closed {} of the {} idle connections held during the run; its figures include closing them.",
            x.scenario,
            target_label(x, s.rounds),
            x.idle_connections_dropped,
            x.idle_connections
        );
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\nFailed measurements:\n{}", failures.join("\n"));
    }
    at_max_table(&mut out, r);
    if !r.ratios.is_empty() {
        ratio_table(&mut out, r);
    }
    filter_table(&mut out, r);
    original_table(&mut out, r);
    crate::fleet::markdown(&mut out, &r.measurements, &r.fleet);
    if !r.skipped.is_empty() {
        let _ = writeln!(out, "\nSkipped:\n");
        for note in &r.skipped {
            let _ = writeln!(out, "- {note}");
        }
    }
    out.push_str("\n## Scenarios\n\n");
    for sc in &s.scenarios {
        let _ = writeln!(out, "- `{}`: {}", sc.name, sc.about);
        if sc.fleet {
            for v in crate::fleet::VARIANTS {
                let _ = writeln!(out, "  - `{}`: {}", v.label(), v.about);
            }
        }
    }
    if !r.worker_sweep.is_empty() {
        sweep_table(&mut out, r);
    }
    out
}

/// Issue 12's scaling target: this efficiency at this many workers.
pub const EFFICIENCY_TARGET: f64 = 0.85;
pub const EFFICIENCY_TARGET_WORKERS: usize = 8;

/// The worker sweep: per worker count, the placement, and per target its max req/s, what bound
/// it, and its efficiency against one worker; then the machine it ran on and issue 12's target.
fn sweep_table(out: &mut String, r: &Report) {
    let points = &r.worker_sweep;
    let targets = sweep_targets(points);
    // Efficiency compares a proxy's workers; `direct` is the mock alone and has none.
    let scaled: Vec<&String> = targets
        .iter()
        .filter(|t| t.as_str() != Target::Direct.name())
        .collect();
    out.push_str(
        "\n## Worker sweep (passthrough, closed loop: requests/s (bound by), efficiency)\n\n| workers | placement |",
    );
    for t in &targets {
        let _ = write!(out, " {t} |");
    }
    for t in &scaled {
        let _ = write!(out, " {t} efficiency |");
    }
    out.push_str("\n|---:|---|");
    out.push_str(&"---:|".repeat(targets.len() + scaled.len()));
    out.push('\n');
    let find = |w: usize, t: &str| points.iter().find(|p| p.workers == w && p.target == t);
    let mut unbound = false;
    for w in sweep_workers(points) {
        let placement = points
            .iter()
            .find(|p| p.workers == w)
            .map(|p| p.placement.as_str())
            .unwrap_or_default();
        let _ = write!(out, "| {w} | {placement} |");
        for t in &targets {
            let text = match find(w, t) {
                Some(p) if p.failure.is_none() => {
                    format!("{:.0} ({})", p.max_rps, p.at_max.bound.label())
                }
                Some(_) => "failed".into(),
                None => "n/a".into(),
            };
            let _ = write!(out, " {text} |");
        }
        for t in &scaled {
            let text = match find(w, t) {
                Some(p) => match p.efficiency {
                    Some(e) if p.at_max.bound != Bound::Target => {
                        unbound = true;
                        format!("{e:.2} ‡")
                    }
                    Some(e) => format!("{e:.2}"),
                    None => "n/a".into(),
                },
                None => "n/a".into(),
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    let m = &r.machine;
    let _ = writeln!(
        out,
        "\nMachine: {} ({} CPUs online, CPU {} available to the run); each row says where the target and the load side ran: pinned rows give the target its last N CPUs and the load side (generator, mock upstream) the rest, so the load side shrinks as the target grows. Efficiency = (req/s at N workers ÷ N) ÷ req/s of the same target at 1 worker, both from this run (1.00 = linear scaling; n/a without a 1-worker point).",
        m.cpu_model,
        m.nproc,
        pinning::list(&r.settings.allowed_cpus)
    );
    if unbound {
        out.push_str("\n‡ that row was not bound by the target's own CPU (see \"bound by\"): its req/s, and so its efficiency, is what the load side or the scheduler allowed, a lower bound for the target.\n");
    }
    let _ = writeln!(
        out,
        "\nIssue 12's scaling target, mcp-guard efficiency ≥ {EFFICIENCY_TARGET:.2} at {EFFICIENCY_TARGET_WORKERS} workers on a machine with ≥ {EFFICIENCY_TARGET_WORKERS} spare cores: {}.",
        efficiency_verdict(points)
    );
}

/// Issue 12's scaling target, judged from the sweep's mcp-guard point at 8 workers.
pub fn efficiency_verdict(points: &[SweepPoint]) -> String {
    let Some(p) = points
        .iter()
        .find(|p| p.target == Target::McpGuard.name() && p.workers == EFFICIENCY_TARGET_WORKERS)
    else {
        return format!("not measured (no {EFFICIENCY_TARGET_WORKERS}-worker mcp-guard point)");
    };
    let Some(e) = p.efficiency else {
        return "not measured (the point failed, or no 1-worker point)".into();
    };
    let met = if e >= EFFICIENCY_TARGET {
        "met"
    } else {
        "missed"
    };
    let caveat = if !p.placement.starts_with("target on CPU") {
        format!("; {}", p.placement)
    } else if p.at_max.bound != Bound::Target {
        format!(
            "; bound by {}, not the target: a lower bound",
            p.at_max.bound.label()
        )
    } else {
        String::new()
    };
    format!("{met} ({e:.2}){caveat}")
}

/// A row's target, with its round when there are several.
fn target_label(m: &Measurement, rounds: usize) -> String {
    if rounds > 1 {
        format!("{} #{}", m.target, m.round)
    } else {
        m.target.clone()
    }
}

/// `values` as one cell: the value itself for one round, else "median (min–max)".
fn spread(values: &[f64], digits: usize) -> String {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => "n/a".into(),
        1 => format!("{:.digits$}", v[0]),
        n => {
            let median = if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            };
            format!(
                "{median:.digits$} ({:.digits$}–{:.digits$})",
                v[0],
                v[n - 1]
            )
        }
    }
}

/// The scenario whose answers are relayed whole: the baseline of the filter's cost.
const UNFILTERED_LIST: &str = "tools_list_all";

/// Issue 12's bound on the filter: CPU µs per answer above relaying the same list whole.
pub const FILTER_TARGET_US: f64 = 15.0;

/// The `tools/list` filter's own cost: per filtered scenario, mcp-guard's CPU per request at
/// maximum throughput minus its CPU per request in `tools_list_all` (the same 100-tool answer
/// relayed whole) of the same round, total, user and system apart.
fn filter_table(out: &mut String, r: &Report) {
    let guard_at_max = |scenario: &str, round: usize| {
        r.measurements
            .iter()
            .find(|x| {
                x.failure.is_none()
                    && x.target == "mcp-guard"
                    && x.scenario == scenario
                    && x.round == round
            })
            .and_then(|x| x.at_max.target_cpu)
    };
    let mut filtered: Vec<&str> = Vec::new();
    for x in &r.measurements {
        if x.target == "mcp-guard"
            && x.scenario.starts_with("tools_list_")
            && x.scenario != UNFILTERED_LIST
            && !filtered.contains(&x.scenario.as_str())
        {
            filtered.push(&x.scenario);
        }
    }
    let mut rows = Vec::new();
    for scenario in filtered {
        let (mut total, mut user, mut system) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=r.settings.rounds {
            if let (Some(f), Some(base)) = (
                guard_at_max(scenario, round),
                guard_at_max(UNFILTERED_LIST, round),
            ) {
                total.push(f.total_us - base.total_us);
                user.push(f.user_us - base.user_us);
                system.push(f.system_us - base.system_us);
            }
        }
        if !total.is_empty() {
            rows.push(format!(
                "| {scenario} | {} | {} | {} |",
                spread(&total, 1),
                spread(&user, 1),
                spread(&system, 1)
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n## The tools/list filter's cost\n\nmcp-guard's CPU µs per request at maximum throughput, minus its CPU µs per request in `{UNFILTERED_LIST}` of the same round (the same 100-tool answer, relayed whole); median (min–max) over the rounds. Issue 12's bound: {FILTER_TARGET_US:.0} µs.\n\n| scenario | CPU µs above `{UNFILTERED_LIST}` | user µs | sys µs |\n|---|---:|---:|---:|"
    );
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
}

/// mcp-guard ÷ the others per scenario; with several rounds, each ratio is taken within a round
/// and shown as the median and range over the rounds.
/// mcp-guard against the original mcp-guard, per round of each scenario both ran: the CPU per
/// request of gateway and stdio server together (issue 12 compares that sum), each apart, and
/// requests/s.
fn original_table(out: &mut String, r: &Report) {
    let find = |scenario: &str, round: usize, target: Target| {
        r.measurements.iter().find(|m| {
            m.scenario == scenario
                && m.round == round
                && m.target == target.name()
                && m.failure.is_none()
        })
    };
    let pairs: Vec<(&Measurement, &Measurement)> = r
        .measurements
        .iter()
        .filter(|m| m.target == Target::Original.name() && m.failure.is_none())
        .filter_map(|original| {
            find(&original.scenario, original.round, Target::McpGuard).map(|ours| (ours, original))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    out.push_str("\n## mcp-guard compared with the original mcp-guard (same run, same configuration keys, stdio upstream)\n\n");
    out.push_str("| scenario | round | rps ÷ original | gateway + server µs/req at max: mcp-guard | original | ÷ original | gateway µs/req: mcp-guard | original | server µs/req: mcp-guard | original | CPU/req ÷ original at rate | peak RSS MB: mcp-guard | original |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let both = |m: &Measurement| {
        m.at_max
            .target_cpu
            .map(|c| c.total_us)
            .zip(m.at_max.upstream_cpu.map(|c| c.total_us))
            .map(|(g, s)| g + s)
    };
    let at_rate = |m: &Measurement| {
        m.cpu_us_per_request
            .zip(m.upstream_cpu_us_per_request)
            .map(|(g, s)| g + s)
    };
    let ratio = |a: f64, b: f64| (b > 0.0 && a > 0.0).then(|| a / b);
    let quotient = |a: Option<f64>, b: Option<f64>| a.zip(b).and_then(|(a, b)| ratio(a, b));
    for (ours, original) in pairs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
            ours.scenario,
            ours.round,
            opt(ratio(ours.max_rps, original.max_rps), 2),
            opt(both(ours), 1),
            opt(both(original), 1),
            opt(quotient(both(ours), both(original)), 2),
            opt(ours.at_max.target_cpu.map(|c| c.total_us), 1),
            opt(original.at_max.target_cpu.map(|c| c.total_us), 1),
            opt(ours.at_max.upstream_cpu.map(|c| c.total_us), 1),
            opt(original.at_max.upstream_cpu.map(|c| c.total_us), 1),
            opt(quotient(at_rate(ours), at_rate(original)), 2),
            ours.peak_rss_kb as f64 / 1024.0,
            original.peak_rss_kb as f64 / 1024.0,
        );
    }
    let level = r
        .settings
        .original
        .as_ref()
        .map_or("?", |o| o.log_level.as_str());
    let _ = write!(
        out,
        "\nThe original is given the scenario's keys under its own `[server]` and `[upstream]` tables, runs at log level `{level}` (`--original-log`; its default, `info`, writes a line per request), and is sent"
    );
    out.push_str(" no session handshake (it has no sessions, and it would wait for an answer to `notifications/initialized`). Both gateways' stdio server is this repository's `mcp-demo-server`, pinned to the load side; \"server\" is its CPU.\n");
}

fn ratio_table(out: &mut String, r: &Report) {
    let rounds = r.settings.rounds;
    let _ = writeln!(
        out,
        "\n## mcp-guard compared (same run{})\n",
        if rounds > 1 {
            format!(
                "; median (min–max) over {rounds} interleaved rounds, each ratio within a round"
            )
        } else {
            String::new()
        }
    );
    out.push_str("| scenario | rps ÷ direct | rps ÷ nginx | wrk rps ÷ nginx | CPU/req ÷ nginx at max | user ÷ nginx | sys ÷ nginx | machine CPU/req ÷ nginx at max | CPU/req ÷ nginx at rate | CPU/req ÷ direct at rate | CPU/req ÷ passthrough at rate | CPU/req ÷ passthrough at max | p99 added by nginx µs | p99 added by mcp-guard µs |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut scenarios: Vec<&str> = Vec::new();
    for q in &r.ratios {
        if !scenarios.contains(&q.scenario.as_str()) {
            scenarios.push(&q.scenario);
        }
    }
    let mut unbound = false;
    for scenario in scenarios {
        let rows: Vec<&Ratios> = r.ratios.iter().filter(|q| q.scenario == scenario).collect();
        let cell = |f: fn(&Ratios) -> Option<f64>, digits| {
            spread(
                &rows.iter().filter_map(|q| f(q)).collect::<Vec<_>>(),
                digits,
            )
        };
        let int = |f: fn(&Ratios) -> Option<i64>| {
            spread(
                &rows
                    .iter()
                    .filter_map(|q| f(q))
                    .map(|v| v as f64)
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let mark = if rows
            .iter()
            .any(|q| q.throughput_vs_nginx.is_some() && !q.comparable)
        {
            unbound = true;
            " ‡"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "| {scenario} | {} | {}{mark} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(|q| q.throughput_vs_direct, 2),
            cell(|q| q.throughput_vs_nginx, 2),
            cell(|q| q.wrk_throughput_vs_nginx, 2),
            cell(|q| q.cpu_at_max_vs_nginx, 2),
            cell(|q| q.user_cpu_at_max_vs_nginx, 2),
            cell(|q| q.system_cpu_at_max_vs_nginx, 2),
            cell(|q| q.machine_cpu_at_max_vs_nginx, 2),
            cell(|q| q.cpu_per_request_vs_nginx, 2),
            cell(|q| q.cpu_per_request_vs_direct, 2),
            cell(|q| q.cpu_per_request_vs_passthrough, 3),
            cell(|q| q.cpu_at_max_vs_passthrough, 3),
            int(|q| q.nginx_p99_added_us),
            int(|q| q.mcp_guard_p99_added_us),
        );
    }
    out.push_str("\n\"at max\" = the closed-loop phase; \"at rate\" = the fixed-rate phase; \"added\" = target p99 − direct p99 at the same fixed rate.\n");
    if r.ratios
        .iter()
        .any(|q| q.cpu_per_request_vs_passthrough.is_some())
    {
        out.push_str("\n\"÷ passthrough\" = mcp-guard's CPU per request in this scenario ÷ its CPU per request in `passthrough` of the same run and round: for `routed`, the cost of routing over many servers instead of one (the bound to hold is 1.05). It compares two scenarios measured one after the other, not interleaved, and CPU time counts in clock ticks: read it from long runs with several rounds.\n");
    }
    if unbound {
        out.push_str("\n‡ in at least one round nginx or mcp-guard was not bound by its own CPU in the closed loop, or was disturbed (see \"bound by\" above): there req/s is the CPU share a target won ÷ its CPU per request, so the throughput ratio says as much about the scheduler and the load side as about the proxies; compare the CPU per request columns instead.\n");
    }
}

/// How the run was made, in words a sceptical reader can check against the JSON.
fn method(out: &mut String, r: &Report) {
    let s = &r.settings;
    let p = &s.placement;
    out.push_str("## Method\n\n");
    let _ = writeln!(
        out,
        "- **Workers:** nginx `worker_processes {0}` and mcp-guard `workers = {0}`, `io = {2:?}` (`auto`: io_uring where the kernel allows it; `--io`); both forward to the same mock upstream process ({1} thread(s)), started once per scenario; `direct` loads that mock itself.",
        s.workers, s.upstream_threads, s.gateway_io
    );
    let pinning = if p.pinned {
        format!(
            "{} (sched_setaffinity, set before exec so every thread and worker process inherits it; the harness's load threads pin themselves).",
            p.note
        )
    } else {
        format!(
            "{}; the target, load generator and upstream share CPU {}.",
            p.note,
            pinning::list(&s.allowed_cpus)
        )
    };
    let _ = writeln!(out, "- **Pinning:** {pinning}");
    let _ = writeln!(
        out,
        "- **Load:** {} keep-alive connections, one MCP session each, tools/call POSTs from {} load thread(s) (monoio, {}). Per scenario and target: warm-up {} s, then {} s at a fixed {}/s (latency, CPU at rate), then {} s closed loop (max req/s, CPU at max).",
        s.connections,
        s.load_threads,
        r.machine.load_generator_driver,
        s.warmup_s,
        s.duration_s,
        s.rate,
        s.duration_s
    );
    let _ = writeln!(
        out,
        "- **Interleaving:** each scenario runs its targets one after another, each started fresh, {}; ratios compare targets of the same scenario and round, measured minutes apart at most.",
        if s.rounds > 1 {
            format!(
                "in {} rounds whose order alternates (direct, nginx, mcp-guard, then the reverse), so a drift of the machine favours no target; rows are labelled target #round. Rounds are the outer loop: each round measures every scenario once, so two scenarios compared with each other (a filtered list and `tools_list_all`, `routed` and `passthrough`) are measured within the same round, seconds apart",
                s.rounds
            )
        } else {
            "in one round (direct, nginx, mcp-guard); `--rounds N` repeats it with alternating order and reports medians".to_string()
        }
    );
    let _ = writeln!(
        out,
        "- **CPU:** utime and stime from /proc/PID/stat of every target process (nginx: master and workers; mcp-guard: the process, whose stat sums all its threads), read before and after each phase and divided by the requests completed in it; resolution 1/{} s. \"busy\" = that CPU time ÷ (phase × the CPUs the target may use: {}). The load generator's own CPU comes from getrusage(RUSAGE_THREAD) of each load thread.",
        r.machine.clock_ticks_per_second,
        if p.pinned {
            format!("its {} pinned CPU(s)", p.target_cpus.len())
        } else {
            format!("one per worker, {}", s.workers)
        }
    );
    let _ = writeln!(
        out,
        "- **Saturation check:** a closed loop is \"bound by\" the target when its processes were ≥ {0:.0} % busy (over {1}), by the load side when the busiest load thread was ≥ {0:.0} % of its core{2}; \"both\" or \"neither\" otherwise. Only target-bound rows compare the proxies' throughput: a load-side-bound row measures the generator and upstream. {3}",
        SATURATED * 100.0,
        if p.pinned {
            "its pinned CPUs"
        } else {
            "one CPU per worker"
        },
        if p.pinned {
            " or generator + upstream were ≥ that share of the load-side CPUs"
        } else {
            ""
        },
        if p.pinned {
            format!(
                "A row is marked disturbed when over {:.0} % of either side's CPUs (/proc/stat) went to work no process of the run accounts for.",
                DISTURBED * 100.0
            )
        } else {
            "Unpinned, work from outside the run cannot be told apart, so no row is marked disturbed.".to_string()
        }
    );
    let _ = writeln!(
        out,
        "- **Whole machine:** every CPU's busy ticks (/proc/stat: user, nice, system, irq, softirq) and TCP segments sent (/proc/net/snmp) over each phase, per request. On loopback the kernel charges a hop's receive work to the sender, so per-process figures move cost between target, generator and upstream with placement and segmenting; the machine figure does not (it also counts anything else that ran, so it wants a quiet machine)."
    );
    let wrk = match &s.wrk {
        Some(path) => format!(
            "{path}, 1 thread, {} connections, {} s per target, the same tools/call request and session headers, pinned like the load generator; run right after the closed loop against the same target process.",
            s.connections,
            s.duration_s.ceil().max(1.0)
        ),
        None => "skipped (wrk not installed, or --no-wrk).".into(),
    };
    let _ = writeln!(out, "- **wrk cross-check (passthrough):** {wrk}");
}

/// The closed-loop phase: throughput, CPU per request user/system, and who set the pace.
fn at_max_table(out: &mut String, r: &Report) {
    out.push_str("\n## At maximum throughput (closed loop)\n\n");
    out.push_str("| scenario | target | max rps | CPU µs/req | user µs/req | sys µs/req | machine µs/req | TCP segs/req | target busy | generator busy | load side busy | upstream µs/req | other work on target / load CPUs | bound by | wrk rps | wrk busy | CPU µs/req under wrk |\n");
    out.push_str(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n",
    );
    let pct = |v: Option<f64>| {
        v.map(|v| format!("{:.0} %", 100.0 * v))
            .unwrap_or_else(|| "n/a".into())
    };
    let mut wrk_notes = Vec::new();
    let mut disturbed = false;
    for x in r.measurements.iter().filter(|x| x.failure.is_none()) {
        let a = &x.at_max;
        let c = a.target_cpu.as_ref();
        let w = x.wrk.as_ref();
        let run = w.and_then(|w| w.run.as_ref());
        if let Some(f) = w.and_then(|w| w.failure.as_deref()) {
            wrk_notes.push(format!(
                "- wrk {} / {}: {f}",
                x.scenario,
                target_label(x, r.settings.rounds)
            ));
        }
        let other = match (a.other_on_target_cpus, a.other_on_load_cpus) {
            (None, None) => "n/a".to_string(),
            (t, l) => format!("{} / {}", pct(t), pct(l)),
        };
        let bound = if a.disturbed {
            disturbed = true;
            format!("{} (disturbed)", a.bound.label())
        } else {
            a.bound.label().to_string()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {other} | {bound} | {} | {} | {} |",
            x.scenario,
            target_label(x, r.settings.rounds),
            x.max_rps,
            opt(c.map(|c| c.total_us), 1),
            opt(c.map(|c| c.user_us), 1),
            opt(c.map(|c| c.system_us), 1),
            opt(a.machine_cpu_us, 1),
            opt(a.tcp_segments_per_request, 2),
            pct(c.map(|c| c.busy)),
            pct(Some(a.generator_busy)),
            pct(a.load_side_busy),
            opt(a.upstream_cpu.map(|c| c.total_us), 1),
            opt(run.map(|r| r.rps), 0),
            pct(run.map(|r| r.busy)),
            opt(w.and_then(|w| w.target_cpu).map(|c| c.total_us), 1),
        );
    }
    out.push_str("\n\"busy\" columns are shares of the CPUs each side may use, from the processes' own CPU time (see Method); for `direct` the target is the mock upstream on the load side. \"generator busy\" is the busiest load thread's share of its core; \"load side busy\" is generator + upstream over the load-side CPUs (pinned runs). \"other work\" is the busy time of each side's CPUs (/proc/stat) that no process of the run accounts for. \"machine µs/req\" is every CPU's busy time (/proc/stat) per request: target, generator, upstream and the kernel's loopback work, whoever it was charged to; \"TCP segs/req\" counts segments sent machine-wide (/proc/net/snmp).\n");
    if disturbed {
        let _ = writeln!(
            out,
            "\n(disturbed): over {:.0} % of the target's or the load side's CPUs went to work outside this run (another process on the machine); rerun those rows on a quiet machine.",
            100.0 * DISTURBED
        );
    }
    if !wrk_notes.is_empty() {
        let _ = writeln!(out, "\nwrk problems:\n{}", wrk_notes.join("\n"));
    }
}

fn sweep_targets(points: &[SweepPoint]) -> Vec<String> {
    let mut targets: Vec<String> = Vec::new();
    for p in points {
        if !targets.contains(&p.target) {
            targets.push(p.target.clone());
        }
    }
    targets
}

fn sweep_workers(points: &[SweepPoint]) -> Vec<usize> {
    let mut workers: Vec<usize> = points.iter().map(|p| p.workers).collect();
    workers.sort_unstable();
    workers.dedup();
    workers
}

fn color(target: &str) -> &'static str {
    match target {
        "direct" => "#4c78a8",
        "nginx" => "#54a24b",
        "original" => "#b279a2",
        _ => "#e45756",
    }
}

pub(crate) fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const CHART_HEIGHT: f64 = 370.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 50.0;
const PLOT_HEIGHT: f64 = 220.0;

fn svg(r: &Report) -> String {
    let rows: Vec<&Measurement> = r
        .measurements
        .iter()
        // The fleet scenario's variants have their own table, not a bar per proxy.
        .filter(|m| m.failure.is_none() && m.latency_us.p99 > 0 && m.fleet.is_none())
        .collect();
    let mut scenarios: Vec<&str> = Vec::new();
    for m in &rows {
        if !scenarios.contains(&m.scenario.as_str()) {
            scenarios.push(&m.scenario);
        }
    }
    let targets: Vec<&str> = Target::ALL
        .iter()
        .map(|t| t.name())
        .filter(|t| rows.iter().any(|m| m.target == *t))
        .collect();
    let bar = 22.0;
    let min_group = bar * targets.len() as f64 + 30.0;
    let width = (LEFT + 40.0 + min_group * scenarios.len() as f64).max(760.0);
    // Spread the groups over the plot when there are few of them.
    let group = (width - LEFT - 40.0) / scenarios.len().max(1) as f64;
    let height = if r.worker_sweep.is_empty() {
        CHART_HEIGHT
    } else {
        2.0 * CHART_HEIGHT
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">Latency at {}/s: p50 (solid) and p99 (pale), µs, log scale — {}</text>",
        r.settings.rate,
        esc(&r.name)
    );
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"{}\">no successful measurements</text>",
            TOP + 20.0
        );
    } else {
        let low = rows
            .iter()
            .map(|m| m.latency_us.p50.max(1))
            .min()
            .unwrap_or(1) as f64;
        let high = rows
            .iter()
            .map(|m| m.latency_us.p99.max(1))
            .max()
            .unwrap_or(10) as f64;
        let (lo_exp, hi_exp) = (
            low.log10().floor(),
            high.log10().ceil().max(low.log10().floor() + 1.0),
        );
        let y =
            |v: f64| TOP + PLOT_HEIGHT * (1.0 - (v.max(1.0).log10() - lo_exp) / (hi_exp - lo_exp));
        let bottom = TOP + PLOT_HEIGHT;
        for e in (lo_exp as i32)..=(hi_exp as i32) {
            let v = 10f64.powi(e);
            let label = short_number(v);
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{right}\" y1=\"{gy}\" y2=\"{gy}\" stroke=\"#ddd\"/><text x=\"{lx}\" y=\"{ly}\" text-anchor=\"end\">{label}</text>",
                right = width - 20.0,
                gy = y(v),
                lx = LEFT - 6.0,
                ly = y(v) + 4.0
            );
        }
        let _ = writeln!(
            out,
            "<text transform=\"translate(20,{}) rotate(-90)\" text-anchor=\"middle\">latency (µs)</text>",
            TOP + PLOT_HEIGHT / 2.0
        );
        for (g, scenario) in scenarios.iter().enumerate() {
            let gx = LEFT + 20.0 + group * g as f64 + (group - min_group) / 2.0;
            for (t, target) in targets.iter().enumerate() {
                let Some(m) = rows
                    .iter()
                    .find(|m| m.scenario == *scenario && m.target == *target)
                else {
                    continue;
                };
                let x = gx + bar * t as f64;
                let (p50, p99) = (m.latency_us.p50 as f64, m.latency_us.p99 as f64);
                let c = color(target);
                let _ = writeln!(
                    out,
                    "<rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{c}\" fill-opacity=\"0.35\"><title>{scenario} / {target}: p99 {p99} µs</title></rect>",
                    y(p99),
                    bar - 3.0,
                    bottom - y(p99)
                );
                let _ = writeln!(
                    out,
                    "<rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{c}\"><title>{scenario} / {target}: p50 {p50} µs</title></rect>",
                    y(p50),
                    bar - 3.0,
                    bottom - y(p50)
                );
            }
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                gx + bar * targets.len() as f64 / 2.0,
                bottom + 18.0,
                esc(scenario)
            );
        }
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"#333\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">scenario</text>",
            width - 20.0,
            LEFT + (width - LEFT) / 2.0,
            bottom + 40.0
        );
        legend(&mut out, &targets, bottom + 62.0);
    }
    if !r.worker_sweep.is_empty() {
        let _ = writeln!(out, "<g transform=\"translate(0,{CHART_HEIGHT})\">");
        sweep_chart(&mut out, &r.worker_sweep, width);
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

fn legend(out: &mut String, targets: &[&str], y: f64) {
    for (i, t) in targets.iter().enumerate() {
        let x = LEFT + 130.0 * i as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{x}\" y=\"{}\" width=\"14\" height=\"14\" fill=\"{}\"/><text x=\"{}\" y=\"{y}\">{t}</text>",
            y - 11.0,
            color(t),
            x + 20.0
        );
    }
}

/// 1500 → "1.5k", 2000000 → "2M": axis labels stay short.
pub(crate) fn short_number(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

/// A readable axis step for `max`: 1, 2 or 5 times a power of ten, about five steps in all.
pub(crate) fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn sweep_chart(out: &mut String, points: &[SweepPoint], width: f64) {
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">Passthrough max throughput by worker count (closed loop)</text>"
    );
    let workers = sweep_workers(points);
    let targets = sweep_targets(points);
    let top_rps = points.iter().map(|p| p.max_rps).fold(0.0, f64::max);
    let step = nice_step(top_rps.max(1.0));
    let y_max = (top_rps / step).ceil().max(1.0) * step;
    let bottom = TOP + PLOT_HEIGHT;
    let y = |v: f64| bottom - PLOT_HEIGHT * v / y_max;
    let span = width - LEFT - 60.0;
    let x = |i: usize| {
        LEFT + 30.0
            + if workers.len() > 1 {
                span * i as f64 / (workers.len() - 1) as f64
            } else {
                span / 2.0
            }
    };
    let ticks = (y_max / step).round() as usize;
    for i in 0..=ticks {
        let tick = step * i as f64;
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{right}\" y1=\"{gy}\" y2=\"{gy}\" stroke=\"#ddd\"/><text x=\"{lx}\" y=\"{ly}\" text-anchor=\"end\">{label}</text>",
            right = width - 20.0,
            gy = y(tick),
            lx = LEFT - 6.0,
            ly = y(tick) + 4.0,
            label = short_number(tick)
        );
    }
    for (i, w) in workers.iter().enumerate() {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{w}</text>",
            x(i),
            bottom + 18.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">workers (mcp-guard workers = nginx worker_processes)</text>",
        LEFT + (width - LEFT) / 2.0,
        bottom + 40.0
    );
    let _ = writeln!(
        out,
        "<text transform=\"translate(20,{}) rotate(-90)\" text-anchor=\"middle\">requests/s</text>",
        TOP + PLOT_HEIGHT / 2.0
    );
    for t in &targets {
        let coords: Vec<(f64, f64)> = workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                points
                    .iter()
                    .find(|p| p.workers == *w && &p.target == t && p.failure.is_none())
                    .map(|p| (x(i), y(p.max_rps)))
            })
            .collect();
        let line: Vec<String> = coords
            .iter()
            .map(|(a, b)| format!("{a:.1},{b:.1}"))
            .collect();
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>",
            line.join(" "),
            color(t)
        );
        for (a, b) in coords {
            let _ = writeln!(
                out,
                "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3.5\" fill=\"{}\"/>",
                color(t)
            );
        }
    }
    let names: Vec<&str> = targets.iter().map(String::as_str).collect();
    legend(out, &names, bottom + 62.0);
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days; no date crate for one timestamp).
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(10_000.0), 2_000.0);
        assert_eq!(nice_step(7_300.0), 2_000.0);
        assert_eq!(nice_step(450.0), 100.0);
    }

    #[test]
    fn spreads_show_median_and_range() {
        assert_eq!(spread(&[], 2), "n/a");
        assert_eq!(spread(&[1.234], 2), "1.23");
        assert_eq!(spread(&[1.3, 0.9, 1.0], 2), "1.00 (0.90–1.30)");
        assert_eq!(spread(&[2.0, 1.0], 1), "1.5 (1.0–2.0)");
    }

    fn row(target: Target, round: usize, rps: f64, user: f64, bound: Bound) -> Measurement {
        let mut m = Measurement {
            scenario: "passthrough".into(),
            target: target.name().into(),
            round,
            max_rps: rps,
            ..Measurement::default()
        };
        m.at_max.bound = bound;
        m.at_max.target_cpu = Some(CpuCost {
            user_us: user,
            system_us: 10.0,
            total_us: user + 10.0,
            busy: 0.95,
        });
        m
    }

    #[test]
    fn ratios_pair_targets_of_the_same_round() {
        let rows = vec![
            row(Target::Nginx, 1, 50_000.0, 4.0, Bound::Target),
            row(Target::McpGuard, 1, 45_000.0, 6.0, Bound::Target),
            row(Target::McpGuard, 2, 60_000.0, 6.0, Bound::LoadSide),
            row(Target::Nginx, 2, 40_000.0, 4.0, Bound::Target),
        ];
        let q = ratios(&rows);
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].round, 1);
        assert!((q[0].throughput_vs_nginx.unwrap() - 0.9).abs() < 1e-9);
        assert!((q[0].user_cpu_at_max_vs_nginx.unwrap() - 1.5).abs() < 1e-9);
        assert!((q[0].system_cpu_at_max_vs_nginx.unwrap() - 1.0).abs() < 1e-9);
        assert!(q[0].comparable);
        assert!((q[1].throughput_vs_nginx.unwrap() - 1.5).abs() < 1e-9);
        assert!(!q[1].comparable, "a load-side-bound row is flagged");
    }

    #[test]
    fn routed_cpu_is_compared_with_passthrough_of_the_same_round() {
        let at = |scenario: &str, round, cpu: f64| {
            let mut m = row(Target::McpGuard, round, 40_000.0, cpu - 10.0, Bound::Target);
            m.scenario = scenario.into();
            m.cpu_us_per_request = Some(cpu);
            m
        };
        let rows = vec![
            at("passthrough", 1, 20.0),
            at("passthrough", 2, 25.0),
            at("routed", 1, 21.0),
            at("routed", 2, 25.0),
        ];
        let q = ratios(&rows);
        assert!(q[0].cpu_per_request_vs_passthrough.is_none());
        assert!((q[2].cpu_per_request_vs_passthrough.unwrap() - 1.05).abs() < 1e-9);
        assert!((q[2].cpu_at_max_vs_passthrough.unwrap() - 1.05).abs() < 1e-9);
        assert!((q[3].cpu_per_request_vs_passthrough.unwrap() - 1.0).abs() < 1e-9);
        let md = markdown(&report(Placement::plan(&[0, 1], 1, true), rows));
        assert!(
            md.contains("| routed | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 1.025 (1.000–1.050) | 1.025 (1.000–1.050) |"),
            "{md}"
        );
        assert!(md.contains("\"÷ passthrough\" = mcp-guard's CPU per request"));
    }

    #[test]
    fn the_filters_cost_is_taken_above_the_whole_list_of_the_same_round() {
        // CPU at max = user + 10 µs of system (see `row`).
        let at = |scenario: &str, round, user: f64| {
            let mut m = row(Target::McpGuard, round, 30_000.0, user, Bound::Target);
            m.scenario = scenario.into();
            m
        };
        let mut nginx = row(Target::Nginx, 1, 16_000.0, 8.0, Bound::Target);
        nginx.scenario = "tools_list_100".into();
        let rows = vec![
            at("tools_list_all", 1, 9.0),
            at("tools_list_all", 2, 10.0),
            at("tools_list_all", 3, 8.0),
            at("tools_list_100", 1, 14.0),
            at("tools_list_100", 2, 14.5),
            at("tools_list_100", 3, 14.0),
            // Round 3 of the fresh lists failed: the medians come from the rounds that have both.
            at("tools_list_100_fresh", 1, 25.0),
            at("tools_list_100_fresh", 2, 26.5),
            nginx,
        ];
        let md = markdown(&report(Placement::plan(&[0, 1], 1, true), rows));
        assert!(md.contains("## The tools/list filter's cost"), "{md}");
        assert!(
            md.contains("| tools_list_100 | 5.0 (4.5–6.0) | 5.0 (4.5–6.0) | 0.0 (0.0–0.0) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| tools_list_100_fresh | 16.2 (16.0–16.5) | 16.2 (16.0–16.5) | 0.0 (0.0–0.0) |"
            ),
            "{md}"
        );
        // Without the baseline there is nothing to subtract, and no table.
        let alone = vec![at("tools_list_100", 1, 14.0)];
        let md = markdown(&report(Placement::plan(&[0, 1], 1, true), alone));
        assert!(!md.contains("filter's cost"), "{md}");
    }

    fn report(placement: Placement, measurements: Vec<Measurement>) -> Report {
        Report {
            name: "t".into(),
            machine: Machine {
                nproc: 2,
                cpu_model: "cpu".into(),
                kernel: "k".into(),
                date_utc: utc_now(),
                git_commit: None,
                command_line: "perf all".into(),
                load_generator_driver: "io_uring",
                nginx_version: None,
                clock_ticks_per_second: 100,
            },
            settings: RunSettings {
                duration_s: 8.0,
                warmup_s: 0.8,
                rounds: 3,
                rate: 5000,
                connections: 64,
                load_threads: 1,
                workers: 1,
                gateway_io: "auto".into(),
                upstream_threads: 1,
                allowed_cpus: vec![0, 1],
                placement,
                wrk: None,
                original: None,
                scenarios: Vec::new(),
            },
            ratios: ratios(&measurements),
            fleet: crate::fleet::comparisons(&measurements),
            skipped: Vec::new(),
            measurements,
            worker_sweep: Vec::new(),
        }
    }

    #[test]
    fn fleet_variants_are_compared_with_the_in_memory_guard_of_their_round() {
        use crate::fleet::{FleetFigures, HelperTally, SinkStats};
        // Gateway CPU at max = user + 10 µs (see `row`).
        let variant = |name: &str, round, user: f64, helpers: Option<f64>| {
            let mut m = row(Target::McpGuard, round, 40_000.0, user, Bound::Target);
            m.scenario = "fleet".into();
            m.target = format!("mcp-guard:{name}");
            m.fleet = Some(FleetFigures {
                variant: name.into(),
                helper_names: vec!["receiver".into()],
                helpers_at_max: helpers.map(|h| CpuCost {
                    user_us: h,
                    system_us: 0.0,
                    total_us: h,
                    busy: 0.1,
                }),
                tally: HelperTally {
                    redis_leases: None,
                    receiver: Some(SinkStats {
                        posts: 3,
                        bytes: 1024,
                    }),
                },
                requests: 1000,
                ..FleetFigures::default()
            });
            m
        };
        let rows = vec![
            variant("memory", 1, 10.0, None),
            variant("trace-0.01", 1, 11.0, Some(1.0)),
            variant("trace-0.01", 2, 16.0, Some(1.0)),
            variant("memory", 2, 10.0, None),
            variant("trace-1.0", 2, 20.0, Some(2.0)),
        ];
        let r = report(Placement::plan(&[0, 1], 1, true), rows);
        // The generic ratios leave the variants alone; the fleet comparison pairs each with
        // `memory` of its own round.
        assert!(r.ratios.is_empty());
        let q = &r.fleet;
        assert_eq!(q.len(), 5);
        let find = |v: &str, round| {
            q.iter()
                .find(|c| c.variant == v && c.round == round)
                .unwrap()
        };
        assert!((find("trace-0.01", 1).cpu_at_max_vs_memory.unwrap() - 1.05).abs() < 1e-9);
        assert!((find("trace-0.01", 2).cpu_at_max_vs_memory.unwrap() - 1.3).abs() < 1e-9);
        assert!(
            (find("trace-1.0", 2)
                .cpu_with_helpers_at_max_vs_memory
                .unwrap()
                - 1.6)
                .abs()
                < 1e-9
        );
        // Median of 1.05 and 1.3: 1.175, above 1.10.
        assert_eq!(
            crate::fleet::target_verdict(q),
            "missed (1.175×, median of 2 rounds); at the fixed rate: not measured"
        );
        let md = markdown(&r);
        assert!(
            md.contains("## Fleet features against the in-memory guard"),
            "{md}"
        );
        assert!(
            md.contains("| trace-0.01 | 1 | 40000 | 21.0 | 11.0 | 10.0 |"),
            "{md}"
        );
        assert!(md.contains(
            "within 10 % of the in-memory guard's gateway CPU per request at max: missed"
        ));
        assert!(md.contains("the audit shipper, the OTLP exporter, the Redis lease thread"));
        assert_eq!(
            crate::fleet::target_verdict(&q[..1]),
            "not measured",
            "memory alone"
        );
        assert!(crate::fleet::target_verdict(&q[..2]).starts_with("met (1.050×"));
    }

    #[test]
    fn the_report_states_its_method() {
        let rows = vec![
            row(Target::Nginx, 1, 50_000.0, 4.0, Bound::Target),
            row(Target::McpGuard, 1, 45_000.0, 6.0, Bound::LoadSide),
        ];
        let md = markdown(&report(Placement::plan(&[0, 1], 1, true), rows));
        for needle in [
            "## Method",
            "nginx `worker_processes 1` and mcp-guard `workers = 1`",
            "same mock upstream process",
            "**Pinning:** target on CPU 1; load generator, mock upstream, wrk and stdio servers on CPU 0",
            "64 keep-alive connections",
            "3 rounds whose order alternates",
            "utime and stime from /proc/PID/stat",
            "RUSAGE_THREAD",
            "wrk not installed",
            // mcp-guard was load-side bound: its throughput ratio carries the warning mark.
            "| passthrough | n/a | 0.90 ‡ |",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
        let unpinned = markdown(&report(Placement::plan(&[0], 1, true), Vec::new()));
        assert!(unpinned.contains("**Pinning:** not pinned: 1 worker(s) need"));
        assert!(unpinned.contains("share CPU 0,1"));
    }

    fn sweep_point(target: Target, workers: usize, rps: f64, bound: Bound) -> SweepPoint {
        let at_max = crate::scenarios::AtMax {
            bound,
            ..Default::default()
        };
        SweepPoint {
            target: target.name().into(),
            workers,
            placement: Placement::plan(&(0..16).collect::<Vec<_>>(), workers, true).note,
            max_rps: rps,
            efficiency: None,
            at_max,
            errors: 0,
            failure: None,
        }
    }

    #[test]
    fn the_sweep_reports_efficiency_and_the_machine() {
        let mut points = vec![
            sweep_point(Target::Direct, 1, 200_000.0, Bound::LoadSide),
            sweep_point(Target::McpGuard, 1, 40_000.0, Bound::Target),
            sweep_point(Target::McpGuard, 2, 76_000.0, Bound::Target),
            sweep_point(Target::McpGuard, 8, 288_000.0, Bound::LoadSide),
        ];
        crate::scenarios::fill_efficiency(&mut points);
        let mut r = report(Placement::plan(&[0, 1], 1, true), Vec::new());
        r.machine.cpu_model = "Test CPU 9000".into();
        r.machine.nproc = 16;
        r.settings.allowed_cpus = (0..16).collect();
        r.worker_sweep = points;
        let md = markdown(&r);
        for needle in [
            "| workers | placement | direct | mcp-guard | mcp-guard efficiency |",
            "| 1 | target on CPU 15; load generator, mock upstream, wrk and stdio servers on CPU 0-14 | 200000 (load side) | 40000 (target) | 1.00 |",
            "| 2 | target on CPU 14,15; load generator, mock upstream, wrk and stdio servers on CPU 0-13 | n/a | 76000 (target) | 0.95 |",
            "| 8 | target on CPU 8-15; load generator, mock upstream, wrk and stdio servers on CPU 0-7 | n/a | 288000 (load side) | 0.90 ‡ |",
            "Machine: Test CPU 9000 (16 CPUs online, CPU 0-15 available to the run)",
            "Efficiency = (req/s at N workers ÷ N) ÷ req/s of the same target at 1 worker",
            "‡ that row was not bound by the target's own CPU",
            "mcp-guard efficiency ≥ 0.85 at 8 workers on a machine with ≥ 8 spare cores: met (0.90); bound by load side, not the target: a lower bound.",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }

    #[test]
    fn the_scaling_target_is_judged_at_eight_workers() {
        let mut points = vec![
            sweep_point(Target::McpGuard, 1, 40_000.0, Bound::Target),
            sweep_point(Target::McpGuard, 4, 150_000.0, Bound::Target),
        ];
        crate::scenarios::fill_efficiency(&mut points);
        assert_eq!(
            efficiency_verdict(&points),
            "not measured (no 8-worker mcp-guard point)"
        );
        points.push(sweep_point(Target::McpGuard, 8, 256_000.0, Bound::Target));
        crate::scenarios::fill_efficiency(&mut points);
        assert_eq!(efficiency_verdict(&points), "missed (0.80)");
        points[2].max_rps = 280_000.0;
        crate::scenarios::fill_efficiency(&mut points);
        assert_eq!(efficiency_verdict(&points), "met (0.88)");
        // Unpinned (8 workers on 8 CPUs leave the load side none): said next to the figure.
        points[2].placement = Placement::plan(&(0..8).collect::<Vec<_>>(), 8, true).note;
        assert!(efficiency_verdict(&points).starts_with("met (0.88); not pinned: 8 worker(s)"));
        points[0].failure = Some("x".into());
        crate::scenarios::fill_efficiency(&mut points);
        assert_eq!(
            efficiency_verdict(&points),
            "not measured (the point failed, or no 1-worker point)"
        );
    }

    #[test]
    fn date_format() {
        let now = utc_now();
        assert_eq!(now.len(), 20);
        assert!(now.starts_with("20") && now.ends_with('Z'));
    }
}
