//! The scenario list and the measurement matrix: for each scenario, each target in turn (so drift
//! touches all equally) is started, warmed up, measured at a fixed rate and at full throttle,
//! and stopped; then the optional worker sweep.

use crate::load::{self, Call, ErrorCounts, LoadResult, LoadSpec, Pace};
use crate::targets::{self, GatewayUpstream, Running};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One workload.
#[derive(Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub call: Call,
    /// Tools the mock upstream lists.
    pub upstream_tools: usize,
    /// Idle keep-alive connections held open during the measurement.
    pub idle_connections: usize,
    /// mcp-guard only, with the stdio demo server as its upstream.
    pub stdio: bool,
}

const fn scenario(
    name: &'static str,
    about: &'static str,
    call: Call,
    tools: usize,
    idle: usize,
) -> Scenario {
    Scenario {
        name,
        about,
        call,
        upstream_tools: tools,
        idle_connections: idle,
        stdio: false,
    }
}

#[rustfmt::skip]
pub const SCENARIOS: &[Scenario] = &[
    scenario("passthrough", "tools/call echo, JSON response", Call::Echo, 5, 0),
    scenario("guard", "passthrough through the security path: API key, tool policy, rate limit (never trips), audit file", Call::Echo, 5, 0),
    scenario("tools_list_100", "tools/list answering 100 tools (~20 KiB); through mcp-guard an API key allowed half of them, so every answer is filtered", Call::ToolsList, 100, 0),
    scenario("sse", "tools/call echo_sse, one chunked SSE event", Call::EchoSse, 5, 0),
    Scenario { stdio: true, ..scenario("stdio", "tools/call echo to mcp-demo-server over stdio (mcp-guard only)", Call::Echo, 5, 0) },
    scenario("idle_1k", "passthrough with 1,000 idle keep-alive connections held open", Call::Echo, 5, 1_000),
    scenario("idle_10k", "passthrough with 10,000 idle keep-alive connections held open", Call::Echo, 5, 10_000),
];

pub fn find_scenario(name: &str) -> Result<&'static Scenario, String> {
    SCENARIOS.iter().find(|s| s.name == name).ok_or_else(|| {
        let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        format!("unknown scenario {name:?} (known: {})", known.join(", "))
    })
}

/// What a scenario adds to the generated mcp-guard config, and the headers every load request
/// then carries (e.g. its credentials). Sent to all targets alike; direct and nginx ignore them.
pub struct GatewaySetup {
    /// TOML appended after the generated `[upstream]` table.
    pub config: String,
    /// Raw header lines, each ending in CRLF.
    pub client_headers: String,
}

/// The load generator's API key in the `guard` scenario, and its hash as `mcp-guard hash-key`
/// prints it (base64 of SHA-256), so the harness needs no crypto crate.
const GUARD_API_KEY: &str = "perf-load-generator-key";
const GUARD_API_KEY_HASH: &str = "oNtTxBO8b6J3SxRCrD+weuf3watudilxAdoYlAE5lYM=";

/// The one place a scenario shapes mcp-guard's config (`{scratch}` in it becomes the target's
/// scratch directory).
///
/// Every scenario but `guard` measures the bare proxy path: the gateway's default per-client
/// rate limit (100/s) would otherwise throttle the load generator, and audit is off.
/// `guard` measures the full security path: the load generator authenticates with an API key
/// whose policy allows the echo tools and tools/list, a rate limit far above any offered load
/// keeps its bookkeeping in the path without ever tripping, and every decision is audited to a
/// JSON-lines file.
pub fn gateway_setup(scenario: &Scenario) -> GatewaySetup {
    match scenario.name {
        "guard" => guarded(r#"["echo", "echo_sse"]"#),
        // The identity may call half of the listed tools, so every answer is really filtered.
        "tools_list_100" => guarded(
            r#"["echo", "echo_sse", "tool_0*0", "tool_0*2", "tool_0*4", "tool_0*6", "tool_0*8"]"#,
        ),
        _ => GatewaySetup {
            config: "[rate_limit]\nenabled = false\n\n[audit]\nenabled = false\n".into(),
            client_headers: String::new(),
        },
    }
}

/// The full guard: API key, a tool policy, a rate limit that never trips, audit to a file.
fn guarded(allowed_tools: &str) -> GatewaySetup {
    GatewaySetup {
        config: format!(
            "[[auth.api_keys]]\nid = \"perf\"\nkey_hash = \"{GUARD_API_KEY_HASH}\"\nallowed_tools = {allowed_tools}\n\n\
             [rate_limit]\nenabled = true\nrequests_per_second = 1000000000\nburst_size = 1000000000\n\n\
             [audit]\nenabled = true\nfile = \"{{scratch}}/audit.jsonl\"\n"
        ),
        client_headers: format!("Authorization: Bearer {GUARD_API_KEY}\r\n"),
    }
}

/// What gets load.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Load straight to the mock upstream: the floor every proxy is compared to.
    Direct,
    /// nginx reverse proxy in front of the mock upstream.
    Nginx,
    /// mcp-guard in front of the mock upstream (or the stdio demo server).
    McpGuard,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Direct, Target::Nginx, Target::McpGuard];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::McpGuard => "mcp-guard",
        }
    }
}

/// Everything one `perf all` / `perf smoke` run needs.
pub struct Settings {
    pub duration: Duration,
    pub warmup: Duration,
    pub rate: u64,
    pub connections: usize,
    pub load_threads: usize,
    /// mcp-guard workers = nginx worker_processes.
    pub workers: usize,
    pub upstream_threads: usize,
    pub sweep: Vec<usize>,
    pub scenarios: Vec<&'static Scenario>,
    pub targets: Vec<Target>,
    pub gateway_bin: PathBuf,
    pub demo_bin: PathBuf,
    pub nginx_bin: Option<PathBuf>,
}

/// One load phase, summarised.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    pub completed: u64,
    pub elapsed_s: f64,
    pub errors: ErrorCounts,
    pub missed_slots: u64,
}

/// Latency percentiles at the fixed rate, µs from the scheduled send time.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// One scenario × target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measurement {
    pub scenario: String,
    pub target: String,
    pub workers: usize,
    pub idle_connections: usize,
    /// Idle connections the target closed during the run.
    pub idle_connections_dropped: usize,
    /// Closed loop: completed requests per second.
    pub max_rps: f64,
    pub closed_loop: Phase,
    pub rate: u64,
    pub achieved_rate: f64,
    pub latency_us: Latency,
    pub open_loop: Phase,
    /// Target CPU (user + system) per completed request at the fixed rate. For `direct` this is
    /// the mock upstream's own cost.
    pub cpu_us_per_request: Option<f64>,
    /// The upstream's CPU per request over the same phase (mock or stdio server).
    pub upstream_cpu_us_per_request: Option<f64>,
    pub idle_rss_kb: u64,
    pub peak_rss_kb: u64,
    /// Failed requests in both phases.
    pub errors: u64,
    /// Why the measurement could not be made (target did not start, ...).
    pub failure: Option<String>,
}

/// One point of the worker sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub target: String,
    pub workers: usize,
    pub max_rps: f64,
    pub errors: u64,
    pub failure: Option<String>,
}

/// Runs every scenario against every target, then the worker sweep.
pub fn run_matrix(settings: &Settings) -> Result<(Vec<Measurement>, Vec<SweepPoint>), String> {
    let mut measurements = Vec::new();
    for scenario in &settings.scenarios {
        let mock = if scenario.stdio {
            None
        } else {
            Some(targets::start_mock(
                scenario.upstream_tools,
                settings.upstream_threads,
            ))
        };
        for &target in &settings.targets {
            if scenario.stdio && target != Target::McpGuard {
                continue;
            }
            if target == Target::Nginx && settings.nginx_bin.is_none() {
                continue;
            }
            check_interrupted()?;
            let result = match &mock {
                Some(Err(e)) => Err(format!("mock upstream: {e}")),
                Some(Ok(m)) => measure(settings, scenario, target, Some(m)),
                None => measure(settings, scenario, target, None),
            };
            let m = result.unwrap_or_else(|failure| Measurement {
                scenario: scenario.name.into(),
                target: target.name().into(),
                workers: settings.workers,
                failure: Some(failure),
                ..Measurement::default()
            });
            progress(&m);
            measurements.push(m);
        }
    }
    let mut sweep = Vec::new();
    if !settings.sweep.is_empty() {
        let mock = targets::start_mock(5, settings.upstream_threads)?;
        for &workers in &settings.sweep {
            for &target in &settings.targets {
                if target == Target::Nginx && settings.nginx_bin.is_none() {
                    continue;
                }
                check_interrupted()?;
                let result = sweep_point(settings, target, workers, &mock);
                let point = match result {
                    Ok(r) => SweepPoint {
                        target: target.name().into(),
                        workers,
                        max_rps: rps(&r),
                        errors: r.errors.total(),
                        failure: None,
                    },
                    Err(e) => SweepPoint {
                        target: target.name().into(),
                        workers,
                        max_rps: 0.0,
                        errors: 0,
                        failure: Some(e),
                    },
                };
                eprintln!(
                    "perf: sweep {workers} workers / {}: {:.0} rps, {} errors{}",
                    point.target,
                    point.max_rps,
                    point.errors,
                    point
                        .failure
                        .as_deref()
                        .map(|f| format!(" — FAILED: {f}"))
                        .unwrap_or_default()
                );
                sweep.push(point);
            }
        }
    }
    Ok((measurements, sweep))
}

fn check_interrupted() -> Result<(), String> {
    if crate::interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

fn progress(m: &Measurement) {
    match &m.failure {
        Some(f) => eprintln!("perf: {} / {}: FAILED: {f}", m.scenario, m.target),
        None => eprintln!(
            "perf: {} / {}: {:.0} rps max; at {}/s p50 {} µs p99 {} µs; {} errors",
            m.scenario, m.target, m.max_rps, m.rate, m.latency_us.p50, m.latency_us.p99, m.errors
        ),
    }
}

/// Starts `target` (direct: the mock itself), returning it with the processes to measure.
fn start_target(
    settings: &Settings,
    scenario: &Scenario,
    target: Target,
    workers: usize,
    mock: Option<&Running>,
) -> Result<(Option<Running>, SocketAddr, Vec<u32>), String> {
    let mock_addr = mock.map(|m| m.addr);
    match (target, mock_addr) {
        (Target::Direct, Some(addr)) => Ok((
            None,
            addr,
            mock.map(|m| m.measured_pids.clone()).unwrap_or_default(),
        )),
        (Target::Nginx, Some(addr)) => {
            let nginx = settings
                .nginx_bin
                .as_deref()
                .ok_or("nginx is not available")?;
            let running = targets::start_nginx(nginx, workers, addr)?;
            let (addr, pids) = (running.addr, running.measured_pids.clone());
            Ok((Some(running), addr, pids))
        }
        (Target::McpGuard, upstream_addr) => {
            let upstream = match upstream_addr {
                Some(addr) => GatewayUpstream::Http(addr),
                None => GatewayUpstream::Stdio(settings.demo_bin.clone()),
            };
            let setup = gateway_setup(scenario);
            let running =
                targets::start_gateway(&settings.gateway_bin, workers, &upstream, &setup.config)?;
            let (addr, pids) = (running.addr, running.measured_pids.clone());
            Ok((Some(running), addr, pids))
        }
        (_, None) => Err(format!("{} needs an HTTP upstream", target.name())),
    }
}

fn measure(
    settings: &Settings,
    scenario: &Scenario,
    target: Target,
    mock: Option<&Running>,
) -> Result<Measurement, String> {
    if scenario.idle_connections > 0 {
        let limit = crate::raise_nofile_limit();
        // Per process: this one holds the idle and load sockets, the target (which inherits the
        // limit) the same plus its upstream connections.
        let needed = (scenario.idle_connections + settings.connections) as u64 + 512;
        if limit < needed {
            return Err(format!(
                "needs ~{needed} open files, RLIMIT_NOFILE is {limit} (raise ulimit -Hn)"
            ));
        }
    }
    let (running, addr, pids) = start_target(settings, scenario, target, settings.workers, mock)?;
    let headers = gateway_setup(scenario).client_headers;
    let spec = |pace, duration| LoadSpec {
        addr,
        call: scenario.call,
        connections: settings.connections,
        threads: settings.load_threads,
        duration,
        pace,
        extra_headers: headers.clone(),
    };
    let idle = load::open_idle(addr, scenario.idle_connections)?;
    if !idle.is_empty() {
        // Let the target accept and settle the whole batch before reading its memory.
        std::thread::sleep(Duration::from_millis(500));
    }
    let idle_rss_kb = targets::status_kb(&pids, "VmRSS:");
    load::run(&spec(Pace::Closed, settings.warmup))?;
    let upstream_pids = match (target, mock) {
        (Target::Direct, _) => Vec::new(),
        (_, Some(m)) => m.measured_pids.clone(),
        (_, None) => pids.iter().flat_map(|&p| targets::children_of(p)).collect(),
    };
    let sampler = targets::RssSampler::start(pids.clone());
    let (cpu_before, upstream_before) = (
        targets::cpu_ticks(&pids),
        targets::cpu_ticks(&upstream_pids),
    );
    let open = load::run(&spec(
        Pace::Open {
            rate: settings.rate,
        },
        settings.duration,
    ))?;
    let (cpu_after, upstream_after) = (
        targets::cpu_ticks(&pids),
        targets::cpu_ticks(&upstream_pids),
    );
    let closed = load::run(&spec(Pace::Closed, settings.duration))?;
    let peak_rss_kb = sampler.finish().max(targets::status_kb(&pids, "VmHWM:"));
    let idle_connections_dropped = load::count_closed(&idle);
    drop(idle);
    drop(running);
    check_interrupted()?;

    let per_request = |ticks: u64| {
        (open.completed > 0).then(|| {
            ticks as f64 * 1e6 / targets::ticks_per_second() as f64 / open.completed as f64
        })
    };
    let upstream_cpu = (!upstream_pids.is_empty())
        .then(|| per_request(upstream_after.saturating_sub(upstream_before)))
        .flatten();
    Ok(Measurement {
        scenario: scenario.name.into(),
        target: target.name().into(),
        workers: settings.workers,
        idle_connections: scenario.idle_connections,
        idle_connections_dropped,
        max_rps: rps(&closed),
        closed_loop: phase(&closed),
        rate: settings.rate,
        achieved_rate: rps(&open),
        latency_us: latency(&open),
        open_loop: phase(&open),
        cpu_us_per_request: per_request(cpu_after.saturating_sub(cpu_before)),
        upstream_cpu_us_per_request: upstream_cpu,
        idle_rss_kb,
        peak_rss_kb,
        errors: open.errors.total() + closed.errors.total(),
        failure: None,
    })
}

fn sweep_point(
    settings: &Settings,
    target: Target,
    workers: usize,
    mock: &Running,
) -> Result<LoadResult, String> {
    let passthrough = find_scenario("passthrough")?;
    let (running, addr, _) = start_target(settings, passthrough, target, workers, Some(mock))?;
    let spec = |duration| LoadSpec {
        addr,
        call: Call::Echo,
        connections: settings.connections,
        threads: settings.load_threads,
        duration,
        pace: Pace::Closed,
        extra_headers: String::new(),
    };
    load::run(&spec(settings.warmup))?;
    let result = load::run(&spec(settings.duration));
    drop(running);
    result
}

fn rps(r: &LoadResult) -> f64 {
    let secs = r.elapsed.as_secs_f64();
    if secs > 0.0 {
        r.completed as f64 / secs
    } else {
        0.0
    }
}

fn phase(r: &LoadResult) -> Phase {
    Phase {
        completed: r.completed,
        elapsed_s: r.elapsed.as_secs_f64(),
        errors: r.errors,
        missed_slots: r.missed_slots,
    }
}

fn latency(r: &LoadResult) -> Latency {
    let h = &r.histogram;
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean(),
    }
}
