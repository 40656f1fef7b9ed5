//! The scenario list and the measurement matrix: for each scenario, each target in turn (so drift
//! touches all equally) is started on its CPUs, warmed up, measured at a fixed rate and at full
//! throttle (and by wrk, when installed), and stopped; then the optional worker sweep. Every
//! phase records the target's user and system CPU, the upstream's, and the load generator's own,
//! so a closed-loop figure says whether the target or the load side set the pace.

use crate::fleet::{self, FleetFigures, Helpers, Variant};
use crate::load::{self, Call, ErrorCounts, GeneratorCpu, LoadResult, LoadSpec, Pace};
use crate::pinning::Placement;
use crate::targets::{self, CpuTicks, GatewayUpstream, MachineCounters, Running};
use crate::wrk::{self, WrkRun};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Above this share of its CPU(s) a process is taken to be saturated: the side that is, sets the
/// closed-loop pace.
pub const SATURATED: f64 = 0.9;

/// Above this share of a side's CPUs used by nothing of the run, the row is marked disturbed.
pub const DISTURBED: f64 = 0.1;

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
    /// mcp-guard only: this many `[[upstream.servers]]` (`s0`, `s1`, ...), all forwarding to the
    /// one mock upstream, with the load connections spread over their endpoints round robin.
    /// 0: the single upstream at `/mcp`.
    pub routes: usize,
    /// nginx and mcp-guard terminate TLS (direct stays plain HTTP: the floor without a proxy).
    pub tls: bool,
    /// mcp-guard only, once per fleet variant (`fleet::VARIANTS`) instead of once per target.
    pub fleet: bool,
    /// Also measured through the original mcp-guard (`--original-bin`), from the same
    /// configuration keys: a stdio scenario with the guard on, since the original's free tier
    /// serves stdio upstreams only and always authenticates.
    pub vs_original: bool,
    /// The mock's tools/list answers each hold a list no answer held before (`--fresh-lists`).
    pub fresh_lists: bool,
}

impl Scenario {
    /// Measured through mcp-guard alone (nginx and direct have no stdio or routed servers).
    pub fn gateway_only(&self) -> bool {
        self.stdio || self.routes > 0 || self.fleet
    }

    /// The MCP endpoints the load connections are spread over, round robin.
    pub fn endpoints(&self) -> Vec<String> {
        if self.routes == 0 {
            vec!["/mcp".to_string()]
        } else {
            (0..self.routes).map(|i| format!("/mcp/s{i}")).collect()
        }
    }
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
        routes: 0,
        tls: false,
        fleet: false,
        vs_original: false,
        fresh_lists: false,
    }
}

#[rustfmt::skip]
pub const SCENARIOS: &[Scenario] = &[
    scenario("passthrough", "tools/call echo, JSON response", Call::Echo, 5, 0),
    scenario("guard", "passthrough through the security path: API key, tool policy, rate limit (never trips), audit file", Call::Echo, 5, 0),
    scenario("tools_list_100", "tools/list answering 100 tools (~20 KiB); through mcp-guard an API key allowed half of them, so every answer is filtered", Call::ToolsList, 100, 0),
    Scenario { fresh_lists: true, ..scenario("tools_list_100_fresh", "tools_list_100, but each answer's list differs from every other (a number in the middle tool's description), so the gateway cannot recognize a list it scanned before and scans every answer whole: the filter's cost without its memory of recent lists (baseline: `tools_list_all`)", Call::ToolsList, 100, 0) },
    scenario("tools_list_all", "tools_list_100's answer through the same full guard, by an API key allowed every tool, so mcp-guard relays it unfiltered: the baseline of `tools_list_100` (the filter's cost is the difference)", Call::ToolsList, 100, 0),
    scenario("sse", "tools/call echo_sse, one chunked SSE event", Call::EchoSse, 5, 0),
    Scenario { stdio: true, ..scenario("stdio", "tools/call echo to mcp-demo-server over stdio (mcp-guard only)", Call::Echo, 5, 0) },
    Scenario { stdio: true, vs_original: true, ..scenario("stdio_guard", "the `guard` path (API key, tool policy, rate limit that never trips, audit file) over stdio to mcp-demo-server; also through the original mcp-guard when `--original-bin` names its binary (given the same keys; no session handshake, which it does not speak)", Call::Echo, 5, 0) },
    Scenario { routes: 10, ..scenario("routed", "tools/call echo through 10 routed HTTP servers (`[[upstream.servers]]` s0..s9, all on the one mock) at /mcp/s0../mcp/s9; connections spread round robin, each with its session at its own server (mcp-guard only)", Call::Echo, 5, 0) },
    Scenario { tls: true, ..scenario("tls", "passthrough over TLS 1.3 (AES-128-GCM, one ECDSA P-256 certificate for both proxies), keep-alive; handshakes happen before the measured window; direct stays plain HTTP", Call::Echo, 5, 0) },
    scenario("result_4k", "tools/call echo answering ~4 KiB of text (prose with line breaks, no secret), JSON response: the baseline of `redaction`", Call::EchoResult4k, 5, 0),
    scenario("redaction", "result_4k with `[redaction]` on in mcp-guard (the built-in detectors, the default): every answer scanned before it is relayed; direct and nginx scan nothing", Call::EchoResult4k, 5, 0),
    scenario("idle_1k", "passthrough with 1,000 idle keep-alive connections held open", Call::Echo, 5, 1_000),
    scenario("idle_10k", "passthrough with 10,000 idle keep-alive connections held open", Call::Echo, 5, 10_000),
    Scenario { fleet: true, ..scenario("fleet", "the `guard` path (API key, tool policy, rate limit that never trips, audit file) with in-memory limits against the same guard plus one fleet feature at a time: Redis rate limits, audit shipping, tracing at sample rate 1.0 and 0.01; the helper processes (redis-server, the SIEM / OTLP sink) on the load side, measured apart (mcp-guard only)", Call::Echo, 5, 0) },
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
    /// TOML appended after the generated `[upstream]` table (`{scratch}` in it becomes the
    /// target's scratch directory, `{upstream_url}` the mock upstream's MCP endpoint).
    pub config: String,
    /// Raw header lines, each ending in CRLF.
    pub client_headers: String,
}

/// The load generator's API key in the `guard` scenario, and its hash as `mcp-guard hash-key`
/// prints it (base64 of SHA-256), so the harness needs no crypto crate.
const GUARD_API_KEY: &str = "perf-load-generator-key";
const GUARD_API_KEY_HASH: &str = "oNtTxBO8b6J3SxRCrD+weuf3watudilxAdoYlAE5lYM=";

/// The one place a scenario shapes mcp-guard's config.
///
/// Every scenario but `guard` measures the bare proxy path: the gateway's default per-client
/// rate limit (100/s) would otherwise throttle the load generator, and audit is off.
/// `guard` measures the full security path: the load generator authenticates with an API key
/// whose policy allows the echo tools and tools/list, a rate limit far above any offered load
/// keeps its bookkeeping in the path without ever tripping, and every decision is audited to a
/// JSON-lines file. A routed scenario adds its servers to the bare proxy path (the generated
/// `[upstream]` stays as the default at `/mcp`, which its load never uses).
pub fn gateway_setup(scenario: &Scenario) -> GatewaySetup {
    if scenario.routes > 0 {
        let mut config = bare_proxy();
        for name in (0..scenario.routes).map(|i| format!("s{i}")) {
            config.push_str(&format!(
                "\n[[upstream.servers]]\nname = \"{name}\"\ntransport = \"http\"\nurl = \"{{upstream_url}}\"\n"
            ));
        }
        return GatewaySetup {
            config,
            client_headers: String::new(),
        };
    }
    match scenario.name {
        // The fleet scenario's variants add their keys through `fleet::setup`.
        "guard" | "fleet" | "stdio_guard" => guarded(r#"["echo", "echo_sse"]"#),
        "redaction" => GatewaySetup {
            config: format!("{}\n[redaction]\nenabled = true\n", bare_proxy()),
            client_headers: String::new(),
        },
        // The identity may call half of the listed tools, so every answer is really filtered.
        "tools_list_100" | "tools_list_100_fresh" => guarded(
            r#"["echo", "echo_sse", "tool_0*0", "tool_0*2", "tool_0*4", "tool_0*6", "tool_0*8"]"#,
        ),
        // An empty `allowed_tools` is every tool: nothing to filter, the rest of the guard on.
        "tools_list_all" => guarded("[]"),
        _ => GatewaySetup {
            config: bare_proxy(),
            client_headers: String::new(),
        },
    }
}

/// No rate limit, no audit: the proxy path alone.
fn bare_proxy() -> String {
    "[rate_limit]\nenabled = false\n\n[audit]\nenabled = false\n".into()
}

/// The full guard: API key, a tool policy, a rate limit that never trips, audit to a file.
fn guarded(allowed_tools: &str) -> GatewaySetup {
    guarded_plus(allowed_tools, &GuardExtras::default())
}

/// Keys a fleet variant adds to the full guard: lines for its `[rate_limit]` and `[audit]`
/// tables, and whole tables after them.
#[derive(Clone, Debug, Default)]
pub struct GuardExtras {
    pub rate_limit: String,
    pub audit: String,
    pub tail: String,
}

/// The full guard with `extras` in its tables.
pub fn guarded_plus(allowed_tools: &str, extras: &GuardExtras) -> GatewaySetup {
    let GuardExtras {
        rate_limit,
        audit,
        tail,
    } = extras;
    GatewaySetup {
        config: format!(
            "[[auth.api_keys]]\nid = \"perf\"\nkey_hash = \"{GUARD_API_KEY_HASH}\"\nallowed_tools = {allowed_tools}\n\n\
             [rate_limit]\nenabled = true\nrequests_per_second = 1000000000\nburst_size = 1000000000\n{rate_limit}\n\
             [audit]\nenabled = true\nfile = \"{{scratch}}/audit.jsonl\"\n{audit}{tail}"
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
    /// The original mcp-guard (botzrDev/mcp-guard) in front of the stdio demo server, in the
    /// scenarios marked `vs_original`, when `--original-bin` names a binary the user built.
    Original,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Direct,
        Target::Nginx,
        Target::McpGuard,
        Target::Original,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::McpGuard => "mcp-guard",
            Target::Original => "original",
        }
    }

    /// Whether this target takes part in `scenario` with what `settings` has.
    fn measures(self, scenario: &Scenario, settings: &Settings) -> bool {
        match self {
            Target::Direct => !scenario.gateway_only(),
            Target::Nginx => !scenario.gateway_only() && settings.nginx_bin.is_some(),
            Target::McpGuard => true,
            Target::Original => scenario.vs_original && settings.original.is_some(),
        }
    }
}

/// The original mcp-guard as `--original-bin` and `--original-log` name it.
#[derive(Clone, Debug, Serialize)]
pub struct Original {
    pub bin: PathBuf,
    /// Its RUST_LOG.
    pub log_level: String,
}

/// Everything one `perf all` / `perf smoke` run needs.
pub struct Settings {
    pub duration: Duration,
    pub warmup: Duration,
    /// Each scenario's targets are measured this many times, interleaved.
    pub rounds: usize,
    pub rate: u64,
    pub connections: usize,
    pub load_threads: usize,
    /// mcp-guard workers = nginx worker_processes.
    pub workers: usize,
    /// mcp-guard's `[server] io`: `auto`, `io_uring` or `epoll`.
    pub gateway_io: String,
    /// Mock upstream threads; `None`: one per load-side CPU when pinned, else one per core.
    pub upstream_threads: Option<usize>,
    pub sweep: Vec<usize>,
    pub scenarios: Vec<&'static Scenario>,
    pub targets: Vec<Target>,
    pub gateway_bin: PathBuf,
    pub demo_bin: PathBuf,
    pub nginx_bin: Option<PathBuf>,
    /// The original mcp-guard, built by the user (the harness never builds it).
    pub original: Option<Original>,
    /// The CPUs the harness may use, and whether to pin onto them (see `Placement::plan`).
    pub allowed_cpus: Vec<usize>,
    pub pin: bool,
    /// wrk for the passthrough cross-check; `None`: skipped.
    pub wrk_bin: Option<PathBuf>,
    /// The fleet scenario's gateway variants, in order.
    pub variants: Vec<&'static Variant>,
    /// redis-server for the fleet scenario's `redis` variant; `None`: that variant is skipped.
    pub redis_bin: Option<PathBuf>,
}

impl Settings {
    /// Where a run with `workers` target workers puts its processes.
    pub fn placement(&self, workers: usize) -> Placement {
        Placement::plan(&self.allowed_cpus, workers, self.pin).verified()
    }

    pub fn upstream_threads(&self, placement: &Placement) -> usize {
        self.upstream_threads.unwrap_or(if placement.pinned {
            placement.load_cpus.len()
        } else {
            self.allowed_cpus.len()
        })
    }
}

/// One load phase, summarised.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    pub completed: u64,
    pub elapsed_s: f64,
    pub errors: ErrorCounts,
    pub missed_slots: u64,
    /// The load generator's own CPU in this phase.
    pub generator: GeneratorCpu,
}

/// CPU per completed request over one phase, user and system apart.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CpuCost {
    pub user_us: f64,
    pub system_us: f64,
    pub total_us: f64,
    /// CPU time ÷ (phase × the CPUs these processes can use): 1.0 = busy throughout.
    pub busy: f64,
}

impl CpuCost {
    pub fn from_ticks(
        ticks: CpuTicks,
        requests: u64,
        wall_s: f64,
        capacity: usize,
    ) -> Option<CpuCost> {
        if requests == 0 || wall_s <= 0.0 {
            return None;
        }
        let us = |t: u64| t as f64 * 1e6 / targets::ticks_per_second() as f64;
        let per = |t: u64| us(t) / requests as f64;
        Some(CpuCost {
            user_us: per(ticks.user),
            system_us: per(ticks.system),
            total_us: per(ticks.total()),
            busy: us(ticks.total()) / 1e6 / wall_s / capacity.max(1) as f64,
        })
    }
}

/// What set the pace of a closed-loop phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bound {
    /// Not measured.
    #[default]
    Unknown,
    /// The target was saturated and the load side was not: the figure is the target's.
    Target,
    /// The load generator (or, pinned, the load-side CPUs) was saturated and the target was
    /// not: the figure is the load side's, and says little about the target.
    LoadSide,
    /// Both were: the figure is a lower bound for the target.
    Both,
    /// Neither was: latency-bound (too few connections) or disturbed by something else.
    Neither,
}

impl Bound {
    pub fn classify(target_busy: f64, load_side_busy: f64) -> Bound {
        match (target_busy >= SATURATED, load_side_busy >= SATURATED) {
            (true, false) => Bound::Target,
            (false, true) => Bound::LoadSide,
            (true, true) => Bound::Both,
            (false, false) => Bound::Neither,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Bound::Unknown => "n/a",
            Bound::Target => "target",
            Bound::LoadSide => "load side",
            Bound::Both => "both",
            Bound::Neither => "neither",
        }
    }
}

/// The closed-loop phase's account of who was busy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AtMax {
    /// The target's CPU; `busy` is over the CPUs it may use (its own set when pinned).
    pub target_cpu: Option<CpuCost>,
    /// The upstream's CPU (mock, or mcp-guard's stdio server); none for `direct`.
    pub upstream_cpu: Option<CpuCost>,
    /// The load generator's user and system µs per request.
    pub generator_user_us: Option<f64>,
    pub generator_system_us: Option<f64>,
    /// The busiest load thread's share of its core.
    pub generator_busy: f64,
    /// Pinned only: the load side's own CPU (generator + upstream) ÷ its CPUs.
    pub load_side_busy: Option<f64>,
    /// Pinned only: busy share of the target's CPUs and of the load side's, from /proc/stat
    /// (so softirq work and anything else that ran there counts).
    pub target_cpus_busy: Option<f64>,
    pub load_cpus_busy: Option<f64>,
    /// Pinned only: the part of those shares no process of the run accounts for.
    pub other_on_target_cpus: Option<f64>,
    pub other_on_load_cpus: Option<f64>,
    /// Something outside the run took over 10 % of a side's CPUs: the figures are suspect.
    pub disturbed: bool,
    /// Every CPU's busy time per request: target, generator, upstream and the kernel work
    /// between them, whoever it was charged to (includes whatever else ran on the machine).
    pub machine_cpu_us: Option<f64>,
    /// TCP segments sent machine-wide per request (every hop, both directions, ACKs included).
    pub tcp_segments_per_request: Option<f64>,
    pub bound: Bound,
}

/// The wrk cross-check of one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WrkCheck {
    pub run: Option<WrkRun>,
    /// The target's CPU per request wrk completed.
    pub target_cpu: Option<CpuCost>,
    pub failure: Option<String>,
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
    /// Which of the scenario's interleaved rounds (from 1).
    pub round: usize,
    pub workers: usize,
    /// What was pinned where (or why not).
    pub placement: String,
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
    /// The same, user and system apart.
    pub cpu_at_rate: Option<CpuCost>,
    /// Every CPU's busy time per request at the fixed rate (see `AtMax::machine_cpu_us`).
    pub machine_cpu_us_at_rate: Option<f64>,
    /// The upstream's CPU per request over the same phase (mock or stdio server).
    pub upstream_cpu_us_per_request: Option<f64>,
    /// The closed-loop phase: CPU per request at full throttle and who set the pace.
    pub at_max: AtMax,
    /// Passthrough only, when wrk is installed.
    pub wrk: Option<WrkCheck>,
    pub idle_rss_kb: u64,
    pub peak_rss_kb: u64,
    /// Failed requests in both phases.
    pub errors: u64,
    /// Why the measurement could not be made (target did not start, ...).
    pub failure: Option<String>,
    /// The fleet scenario: the variant, its helper processes' CPU and what they received.
    pub fleet: Option<FleetFigures>,
}

/// One point of the worker sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub target: String,
    pub workers: usize,
    pub placement: String,
    pub max_rps: f64,
    /// (req/s at this worker count ÷ workers) ÷ req/s of the same target at one worker: 1.0 is
    /// linear scaling. `None` for `direct` (the mock does not run the target's workers), a
    /// failed point, or a sweep without a one-worker point.
    pub efficiency: Option<f64>,
    pub at_max: AtMax,
    pub errors: u64,
    pub failure: Option<String>,
}

/// Fills in every sweep point's `efficiency` against its target's one-worker point.
pub fn fill_efficiency(points: &mut [SweepPoint]) {
    let base: Vec<(String, f64)> = points
        .iter()
        .filter(|p| p.workers == 1 && p.failure.is_none() && p.max_rps > 0.0)
        .map(|p| (p.target.clone(), p.max_rps))
        .collect();
    for p in points.iter_mut() {
        let one = base.iter().find(|(t, _)| *t == p.target).map(|b| b.1);
        p.efficiency = match one {
            Some(one) if p.target != Target::Direct.name() && p.failure.is_none() => {
                Some(p.max_rps / p.workers.max(1) as f64 / one)
            }
            _ => None,
        };
    }
}

/// What a run measured, and what it skipped (a line each, for the report).
pub struct Matrix {
    pub measurements: Vec<Measurement>,
    pub sweep: Vec<SweepPoint>,
    pub skipped: Vec<String>,
}

/// Runs every scenario against every target, then the worker sweep.
///
/// Rounds are the outer loop: each round measures every scenario once, so the scenarios one
/// report compares with each other (the filtered lists with `tools_list_all`, `routed` with
/// `passthrough`) are measured seconds apart within a round, not minutes, and drift on a shared
/// machine cancels in their difference. The report lists measurements by scenario as before.
pub fn run_matrix(settings: &Settings) -> Result<Matrix, String> {
    let placement = settings.placement(settings.workers);
    let mut measurements = Vec::new();
    let mut skipped = Vec::new();
    // One mock per scenario, shared by every target and round of it: nginx and mcp-guard
    // forward to the very same upstream process. Started up front (each is idle while the
    // others' scenarios run).
    let mocks: Vec<_> = settings
        .scenarios
        .iter()
        .map(|scenario| {
            (!scenario.stdio && !scenario.fleet).then(|| {
                targets::start_mock(
                    scenario.upstream_tools,
                    scenario.fresh_lists,
                    settings.upstream_threads(&placement),
                    &placement.load_cpus,
                )
            })
        })
        .collect();
    for round in 1..=settings.rounds {
        for (scenario, mock) in settings.scenarios.iter().zip(&mocks) {
            if scenario.fleet {
                continue;
            }
            for target in round_order(&settings.targets, round) {
                if !target.measures(scenario, settings) {
                    continue;
                }
                check_interrupted()?;
                let result = match &mock {
                    Some(Err(e)) => Err(format!("mock upstream: {e}")),
                    Some(Ok(m)) => measure(settings, &placement, scenario, target, Some(m)),
                    None => measure(settings, &placement, scenario, target, None),
                };
                let mut m = result.unwrap_or_else(|failure| Measurement {
                    scenario: scenario.name.into(),
                    target: target.name().into(),
                    workers: settings.workers,
                    placement: placement.note.clone(),
                    failure: Some(failure),
                    ..Measurement::default()
                });
                m.round = round;
                progress(&m, settings.rounds);
                measurements.push(m);
            }
        }
    }
    drop(mocks);
    for scenario in settings.scenarios.iter().filter(|s| s.fleet) {
        if settings.targets.contains(&Target::McpGuard) {
            run_fleet(
                settings,
                &placement,
                scenario,
                &mut measurements,
                &mut skipped,
            )?;
        }
    }
    // By scenario, in the order asked for; within one, by round as measured (a stable sort).
    measurements.sort_by_key(|m| settings.scenarios.iter().position(|s| s.name == m.scenario));
    let mut sweep = Vec::new();
    for &workers in &settings.sweep {
        // Each worker count has its own placement (two workers on two cores cannot be pinned
        // apart from the load side), so the mock is started anew on that placement's CPUs.
        let placement = settings.placement(workers);
        let mock = targets::start_mock(
            5,
            false,
            settings.upstream_threads(&placement),
            &placement.load_cpus,
        )?;
        for &target in &settings.targets {
            if target == Target::Original
                || (target == Target::Nginx && settings.nginx_bin.is_none())
            {
                continue;
            }
            check_interrupted()?;
            let point = match sweep_point(settings, &placement, target, workers, &mock) {
                Ok((r, at_max)) => SweepPoint {
                    target: target.name().into(),
                    workers,
                    placement: placement.note.clone(),
                    max_rps: rps(&r),
                    efficiency: None,
                    at_max,
                    errors: r.errors.total(),
                    failure: None,
                },
                Err(e) => SweepPoint {
                    target: target.name().into(),
                    workers,
                    placement: placement.note.clone(),
                    max_rps: 0.0,
                    efficiency: None,
                    at_max: AtMax::default(),
                    errors: 0,
                    failure: Some(e),
                },
            };
            eprintln!(
                "perf: sweep {workers} workers / {}: {:.0} rps, bound by {}, {} errors{}",
                point.target,
                point.max_rps,
                point.at_max.bound.label(),
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
    fill_efficiency(&mut sweep);
    Ok(Matrix {
        measurements,
        sweep,
        skipped,
    })
}

/// The fleet scenario: mcp-guard once per variant and round, interleaved like targets, all on
/// one mock upstream.
fn run_fleet(
    settings: &Settings,
    placement: &Placement,
    scenario: &Scenario,
    measurements: &mut Vec<Measurement>,
    skipped: &mut Vec<String>,
) -> Result<(), String> {
    let mut variants = settings.variants.clone();
    if settings.redis_bin.is_none() && variants.iter().any(|v| v.feature == fleet::Feature::Redis) {
        let note = "fleet / redis: SKIPPED: redis-server is not installed (apt-get install redis-server); the Redis rate-limit variant was not measured".to_string();
        eprintln!("perf: WARNING: {note}");
        skipped.push(note);
        variants.retain(|v| v.feature != fleet::Feature::Redis);
    }
    let mock = targets::start_mock(
        scenario.upstream_tools,
        scenario.fresh_lists,
        settings.upstream_threads(placement),
        &placement.load_cpus,
    );
    for round in 1..=settings.rounds {
        for variant in round_order(&variants, round) {
            check_interrupted()?;
            let result = match &mock {
                Err(e) => Err(format!("mock upstream: {e}")),
                Ok(m) => measure_variant(settings, placement, scenario, variant, m),
            };
            let mut m = result.unwrap_or_else(|failure| Measurement {
                scenario: scenario.name.into(),
                target: variant.label(),
                workers: settings.workers,
                placement: placement.note.clone(),
                failure: Some(failure),
                ..Measurement::default()
            });
            m.round = round;
            progress(&m, settings.rounds);
            measurements.push(m);
        }
    }
    Ok(())
}

/// One fleet variant: its helpers started on the load side, then mcp-guard with the guard and
/// the variant's keys, measured like any target; the helpers' CPU and tallies added.
fn measure_variant(
    settings: &Settings,
    placement: &Placement,
    scenario: &Scenario,
    variant: &Variant,
    mock: &Running,
) -> Result<Measurement, String> {
    let helpers = Helpers::start(variant, settings.redis_bin.as_deref(), &placement.load_cpus)?;
    let setup = fleet::setup(&helpers.extras);
    let (mut m, helper_windows) = measure_with(
        settings,
        placement,
        scenario,
        Target::McpGuard,
        Some(mock),
        &setup,
        &helpers.pids,
    )?;
    // Read after the gateway stopped, so its shutdown flush has arrived.
    let tally = helpers.tally()?;
    let helper_names = helpers.names.clone();
    drop(helpers);
    let rate_limited = m.open_loop.errors.rate_limited + m.closed_loop.errors.rate_limited;
    fleet::check(variant, rate_limited, &tally)?;
    m.target = variant.label();
    m.fleet = Some(FleetFigures {
        variant: variant.name.to_string(),
        helper_names,
        helpers_at_rate: helper_windows.0,
        helpers_at_max: helper_windows.1,
        tally,
        requests: helper_windows.2,
    });
    Ok(m)
}

/// The targets in the order round `round` (from 1) runs them: as given, then reversed, and so
/// on (A B C, C B A, A B C), so a drift of the machine over a scenario favours no target.
fn round_order<T: Clone>(targets: &[T], round: usize) -> Vec<T> {
    let mut order = targets.to_vec();
    if round % 2 == 0 {
        order.reverse();
    }
    order
}

fn check_interrupted() -> Result<(), String> {
    if crate::interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

fn progress(m: &Measurement, rounds: usize) {
    let round = if rounds > 1 {
        format!(" (round {})", m.round)
    } else {
        String::new()
    };
    match &m.failure {
        Some(f) => eprintln!("perf: {} / {}{round}: FAILED: {f}", m.scenario, m.target),
        None => {
            let cpu = m
                .at_max
                .target_cpu
                .map(|c| {
                    format!(
                        " ({:.1} user + {:.1} sys µs/req, {:.0} % busy)",
                        c.user_us,
                        c.system_us,
                        100.0 * c.busy
                    )
                })
                .unwrap_or_default();
            let wrk = match &m.wrk {
                Some(WrkCheck { run: Some(w), .. }) => format!("; wrk {:.0} rps", w.rps),
                Some(WrkCheck {
                    failure: Some(f), ..
                }) => format!("; wrk failed: {f}"),
                _ => String::new(),
            };
            eprintln!(
                "perf: {} / {}{round}: {:.0} rps max{cpu}, bound by {}, generator {:.0} % busy{wrk}; at {}/s p50 {} µs p99 {} µs; {} errors",
                m.scenario,
                m.target,
                m.max_rps,
                m.at_max.bound.label(),
                100.0 * m.at_max.generator_busy,
                m.rate,
                m.latency_us.p50,
                m.latency_us.p99,
                m.errors
            )
        }
    }
}

/// A started target: its guard (none for direct), its address, the processes to measure, and
/// the TLS it speaks (its certificate's directory kept for as long as the target runs).
pub type Started = (Option<Running>, SocketAddr, Vec<u32>, Option<TlsInUse>);

/// The certificate a TLS target serves and the client configuration that trusts it.
pub struct TlsInUse {
    _dir: targets::ScratchDir,
    pub client: std::sync::Arc<rustls::ClientConfig>,
}

/// Starts `target` (direct: the mock itself) on the placement's target CPUs.
pub fn start_target(
    settings: &Settings,
    placement: &Placement,
    scenario: &Scenario,
    target: Target,
    workers: usize,
    mock: Option<&Running>,
    setup: &GatewaySetup,
) -> Result<Started, String> {
    let mock_addr = mock.map(|m| m.addr);
    let cpus = &placement.target_cpus;
    let (tls, material) = if scenario.tls && target != Target::Direct {
        let dir = targets::ScratchDir::new("tls")?;
        let material = crate::tls::TlsMaterial::generate(&dir.0)?;
        let client = material.client.clone();
        (Some(TlsInUse { _dir: dir, client }), Some(material))
    } else {
        (None, None)
    };
    match (target, mock_addr) {
        (Target::Direct, Some(addr)) => Ok((
            None,
            addr,
            mock.map(|m| m.measured_pids.clone()).unwrap_or_default(),
            None,
        )),
        (Target::Nginx, Some(addr)) => {
            let nginx = settings
                .nginx_bin
                .as_deref()
                .ok_or("nginx is not available")?;
            let running = targets::start_nginx(nginx, workers, addr, material.as_ref(), cpus)?;
            let (addr, pids) = (running.addr, running.measured_pids.clone());
            Ok((Some(running), addr, pids, tls))
        }
        (Target::McpGuard, upstream_addr) => {
            let upstream = match upstream_addr {
                Some(addr) => GatewayUpstream::Http(addr),
                None => GatewayUpstream::Stdio(settings.demo_bin.clone()),
            };
            let mut config = setup.config.clone();
            if let Some(m) = &material {
                config.push_str(&format!(
                    "\n[server.tls]\ncert_path = {:?}\nkey_path = {:?}\n",
                    m.cert_path.display().to_string(),
                    m.key_path.display().to_string()
                ));
            }
            let running = targets::start_gateway(
                &settings.gateway_bin,
                workers,
                &settings.gateway_io,
                &upstream,
                &config,
                cpus,
            )?;
            let (addr, pids) = (running.addr, running.measured_pids.clone());
            Ok((Some(running), addr, pids, tls))
        }
        (Target::Original, None) => {
            let original = settings
                .original
                .as_ref()
                .ok_or("no --original-bin given")?;
            let running = targets::start_original(
                &original.bin,
                &original.log_level,
                &settings.demo_bin,
                &setup.config,
                cpus,
            )?;
            let (addr, pids) = (running.addr, running.measured_pids.clone());
            Ok((Some(running), addr, pids, None))
        }
        (Target::Original, Some(_)) => Err("the original is measured on stdio only".into()),
        (_, None) => Err(format!("{} needs an HTTP upstream", target.name())),
    }
}

/// One load phase with the CPU of the target and the upstream read around it.
struct Window {
    load: LoadResult,
    target: CpuTicks,
    upstream: CpuTicks,
    /// Processes the target talks to besides its upstream (the fleet scenario's helpers).
    helpers: CpuTicks,
    machine: MachineCounters,
    wall_s: f64,
}

impl Window {
    /// Whole-machine busy µs per completed request.
    fn machine_cpu_us(&self) -> Option<f64> {
        let requests = self.load.completed;
        (requests > 0 && !self.machine.cpus.is_empty()).then(|| {
            self.machine.busy_ticks() as f64 * 1e6
                / targets::ticks_per_second() as f64
                / requests as f64
        })
    }
}

fn measured(
    spec: &LoadSpec,
    target_pids: &[u32],
    upstream_pids: &[u32],
    helper_pids: &[u32],
) -> Result<Window, String> {
    let (target_before, upstream_before, helpers_before, machine_before) = (
        targets::cpu_ticks(target_pids),
        targets::cpu_ticks(upstream_pids),
        targets::cpu_ticks(helper_pids),
        MachineCounters::read(),
    );
    let started = Instant::now();
    let load = load::run(spec)?;
    let wall_s = started.elapsed().as_secs_f64();
    Ok(Window {
        load,
        target: targets::cpu_ticks(target_pids).since(target_before),
        upstream: targets::cpu_ticks(upstream_pids).since(upstream_before),
        helpers: targets::cpu_ticks(helper_pids).since(helpers_before),
        machine: MachineCounters::read().since(&machine_before),
        wall_s,
    })
}

/// Who was busy in a closed-loop window. `direct`'s target is the mock itself, on the load side.
fn at_max(
    w: &Window,
    placement: &Placement,
    target: Target,
    workers: usize,
    upstream_threads: usize,
    has_upstream: bool,
) -> AtMax {
    let machine = crate::cores();
    let requests = w.load.completed;
    let target_capacity = match target {
        Target::Direct if placement.pinned => placement.load_cpus.len(),
        Target::Direct => upstream_threads.clamp(1, machine),
        _ => placement.target_capacity(workers, machine),
    };
    let target_cpu = CpuCost::from_ticks(w.target, requests, w.wall_s, target_capacity);
    let upstream_cpu = has_upstream
        .then(|| {
            let capacity = if placement.pinned {
                placement.load_cpus.len()
            } else {
                upstream_threads.clamp(1, machine)
            };
            CpuCost::from_ticks(w.upstream, requests, w.wall_s, capacity)
        })
        .flatten();
    let g = w.load.generator;
    let per_request = |s: f64| (requests > 0).then(|| s * 1e6 / requests as f64);
    let share = |cpus: &[usize]| {
        placement
            .pinned
            .then(|| w.machine.busy_share(cpus))
            .flatten()
    };
    let (target_cpus_busy, load_cpus_busy) =
        (share(&placement.target_cpus), share(&placement.load_cpus));
    // The load side's own work on its CPUs: generator, upstream and helpers, and for direct
    // the mock as the target.
    let own_load = placement.pinned.then(|| {
        let ticks = w.upstream.total()
            + w.helpers.total()
            + if target == Target::Direct {
                w.target.total()
            } else {
                0
            };
        let own = g.user_s + g.system_s + ticks as f64 / targets::ticks_per_second() as f64;
        own / w.wall_s.max(1e-9) / placement.load_cpus.len().max(1) as f64
    });
    let target_busy = target_cpu.map_or(0.0, |c| c.busy);
    // Busy time on a side's CPUs that none of its processes accounts for: another user's work
    // (or softirq work deferred to ksoftirqd, which is small here). Over 10 % and the row is
    // marked disturbed: the CPUs were not the run's alone.
    let other_on_target = match (target, target_cpus_busy) {
        (Target::Direct, _) | (_, None) => None,
        (_, Some(busy)) => Some((busy - target_busy).max(0.0)),
    };
    let other_on_load = load_cpus_busy
        .zip(own_load)
        .map(|(busy, own)| (busy - own).max(0.0));
    let disturbed = [other_on_target, other_on_load]
        .iter()
        .any(|o| o.is_some_and(|o| o > DISTURBED));
    let load_side = g.busiest_thread.max(own_load.unwrap_or(0.0));
    AtMax {
        bound: Bound::classify(target_busy, load_side),
        disturbed,
        target_cpu,
        upstream_cpu,
        generator_user_us: per_request(g.user_s),
        generator_system_us: per_request(g.system_s),
        generator_busy: g.busiest_thread,
        load_side_busy: own_load,
        target_cpus_busy,
        load_cpus_busy,
        other_on_target_cpus: other_on_target,
        other_on_load_cpus: other_on_load,
        machine_cpu_us: w.machine_cpu_us(),
        tcp_segments_per_request: w
            .machine
            .tcp_out_segs
            .filter(|_| requests > 0)
            .map(|segs| segs as f64 / requests as f64),
    }
}

fn measure(
    settings: &Settings,
    placement: &Placement,
    scenario: &Scenario,
    target: Target,
    mock: Option<&Running>,
) -> Result<Measurement, String> {
    measure_with(
        settings,
        placement,
        scenario,
        target,
        mock,
        &gateway_setup(scenario),
        &[],
    )
    .map(|(m, _)| m)
}

/// Helper processes' CPU per request at the fixed rate and in the closed loop, and the
/// requests completed over warm-up and both phases.
type HelperCpu = (Option<CpuCost>, Option<CpuCost>, u64);

/// [`measure`] with the gateway config given, and `helper_pids` (processes the target talks to,
/// on the load side) measured apart.
fn measure_with(
    settings: &Settings,
    placement: &Placement,
    scenario: &Scenario,
    target: Target,
    mock: Option<&Running>,
    setup: &GatewaySetup,
    helper_pids: &[u32],
) -> Result<(Measurement, HelperCpu), String> {
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
    let (running, addr, pids, tls) = start_target(
        settings,
        placement,
        scenario,
        target,
        settings.workers,
        mock,
        setup,
    )?;
    let headers = setup.client_headers.clone();
    let endpoints = scenario.endpoints();
    let spec = |pace, duration| LoadSpec {
        addr,
        endpoints: endpoints.clone(),
        call: scenario.call,
        connections: settings.connections,
        threads: settings.load_threads,
        duration,
        pace,
        extra_headers: headers.clone(),
        cpus: placement.load_cpus.clone(),
        tls: tls.as_ref().map(|t| t.client.clone()),
        live: None,
        handshake: target != Target::Original,
    };
    let idle = load::open_idle(addr, scenario.idle_connections)?;
    if !idle.is_empty() {
        // Let the target accept and settle the whole batch before reading its memory.
        std::thread::sleep(Duration::from_millis(500));
    }
    let idle_rss_kb = targets::status_kb(&pids, "VmRSS:");
    let warmup = load::run(&spec(Pace::Closed, settings.warmup))?;
    let upstream_pids = match (target, mock) {
        (Target::Direct, _) => Vec::new(),
        (_, Some(m)) => m.measured_pids.clone(),
        (_, None) => {
            // mcp-guard's stdio server is the upstream, not the target: it goes to the load
            // side like the mock does (it exists by now; the warm-up used it).
            let children: Vec<u32> = pids.iter().flat_map(|&p| targets::children_of(p)).collect();
            for &child in &children {
                crate::pinning::pin_process(child, &placement.load_cpus)?;
            }
            children
        }
    };
    let sampler = targets::RssSampler::start(pids.clone());
    let open = measured(
        &spec(
            Pace::Open {
                rate: settings.rate,
            },
            settings.duration,
        ),
        &pids,
        &upstream_pids,
        helper_pids,
    )?;
    let closed = measured(
        &spec(Pace::Closed, settings.duration),
        &pids,
        &upstream_pids,
        helper_pids,
    )?;
    let wrk = (scenario.name == "passthrough")
        .then_some(settings.wrk_bin.as_deref())
        .flatten()
        .map(|bin| wrk_check(bin, settings, placement, scenario, addr, &pids));
    let peak_rss_kb = sampler.finish().max(targets::status_kb(&pids, "VmHWM:"));
    let idle_connections_dropped = load::count_closed(&idle);
    drop(idle);
    drop(running);
    check_interrupted()?;

    let upstream_threads = settings.upstream_threads(placement);
    let machine = crate::cores();
    let at_rate = CpuCost::from_ticks(
        open.target,
        open.load.completed,
        open.wall_s,
        placement.target_capacity(settings.workers, machine),
    );
    let upstream_at_rate = (!upstream_pids.is_empty())
        .then(|| CpuCost::from_ticks(open.upstream, open.load.completed, open.wall_s, 1))
        .flatten();
    let helper_capacity = placement.load_cpus.len().max(1);
    let helpers = (!helper_pids.is_empty()).then(|| {
        (
            CpuCost::from_ticks(
                open.helpers,
                open.load.completed,
                open.wall_s,
                helper_capacity,
            ),
            CpuCost::from_ticks(
                closed.helpers,
                closed.load.completed,
                closed.wall_s,
                helper_capacity,
            ),
        )
    });
    let requests = warmup.completed + open.load.completed + closed.load.completed;
    let at_max = at_max(
        &closed,
        placement,
        target,
        settings.workers,
        upstream_threads,
        !upstream_pids.is_empty(),
    );
    let machine_at_rate = open.machine_cpu_us();
    let (open, closed) = (open.load, closed.load);
    let helper_cpu = (
        helpers.and_then(|h| h.0),
        helpers.and_then(|h| h.1),
        requests,
    );
    let m = Measurement {
        scenario: scenario.name.into(),
        target: target.name().into(),
        round: 1,
        workers: settings.workers,
        placement: placement.note.clone(),
        idle_connections: scenario.idle_connections,
        idle_connections_dropped,
        max_rps: rps(&closed),
        closed_loop: phase(&closed),
        rate: settings.rate,
        achieved_rate: rps(&open),
        latency_us: latency(&open),
        open_loop: phase(&open),
        cpu_us_per_request: at_rate.map(|c| c.total_us),
        cpu_at_rate: at_rate,
        machine_cpu_us_at_rate: machine_at_rate,
        upstream_cpu_us_per_request: upstream_at_rate.map(|c| c.total_us),
        at_max,
        wrk,
        idle_rss_kb,
        peak_rss_kb,
        errors: open.errors.total() + closed.errors.total(),
        failure: None,
        fleet: None,
    };
    Ok((m, helper_cpu))
}

/// Loads the running target with wrk for one phase, on the same connections and CPUs as the
/// harness's closed loop, reading the target's CPU around it. A failure is recorded, not fatal:
/// the cross-check is optional.
fn wrk_check(
    bin: &std::path::Path,
    settings: &Settings,
    placement: &Placement,
    scenario: &Scenario,
    addr: SocketAddr,
    pids: &[u32],
) -> WrkCheck {
    let attempt = || -> Result<WrkCheck, String> {
        let headers = load::session_headers(addr, &gateway_setup(scenario).client_headers)?;
        let scratch = targets::ScratchDir::new("wrk")?;
        let body = load::request_body(scenario.call, 1);
        let before = targets::cpu_ticks(pids);
        let started = Instant::now();
        let run = wrk::run(
            bin,
            &wrk::WrkSpec {
                addr,
                body: &body,
                headers: &headers,
                connections: settings.connections,
                duration: settings.duration,
                cpus: &placement.load_cpus,
                scratch: &scratch.0,
            },
        )?;
        let ticks = targets::cpu_ticks(pids).since(before);
        let capacity = placement.target_capacity(settings.workers, crate::cores());
        let target_cpu = CpuCost::from_ticks(
            ticks,
            run.requests,
            started.elapsed().as_secs_f64(),
            capacity,
        );
        let failure = (run.non_2xx + run.socket_errors > 0).then(|| {
            format!(
                "{} non-2xx responses, {} socket errors",
                run.non_2xx, run.socket_errors
            )
        });
        Ok(WrkCheck {
            run: Some(run),
            target_cpu,
            failure,
        })
    };
    attempt().unwrap_or_else(|e| WrkCheck {
        failure: Some(e),
        ..WrkCheck::default()
    })
}

fn sweep_point(
    settings: &Settings,
    placement: &Placement,
    target: Target,
    workers: usize,
    mock: &Running,
) -> Result<(LoadResult, AtMax), String> {
    let passthrough = find_scenario("passthrough")?;
    let (running, addr, pids, _) = start_target(
        settings,
        placement,
        passthrough,
        target,
        workers,
        Some(mock),
        &gateway_setup(passthrough),
    )?;
    let spec = |duration| LoadSpec {
        addr,
        endpoints: passthrough.endpoints(),
        call: Call::Echo,
        connections: settings.connections,
        threads: settings.load_threads,
        duration,
        pace: Pace::Closed,
        extra_headers: String::new(),
        cpus: placement.load_cpus.clone(),
        tls: None,
        live: None,
        handshake: true,
    };
    load::run(&spec(settings.warmup))?;
    let upstream_pids = match target {
        Target::Direct => Vec::new(),
        _ => mock.measured_pids.clone(),
    };
    let window = measured(&spec(settings.duration), &pids, &upstream_pids, &[]);
    drop(running);
    let window = window?;
    let at_max = at_max(
        &window,
        placement,
        target,
        workers,
        settings.upstream_threads(placement),
        target != Target::Direct,
    );
    Ok((window.load, at_max))
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
        generator: r.generator,
    }
}

pub fn latency(r: &LoadResult) -> Latency {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_the_order() {
        let all = [Target::Direct, Target::Nginx, Target::McpGuard];
        assert_eq!(round_order(&all, 1), all.to_vec());
        assert_eq!(
            round_order(&all, 2),
            vec![Target::McpGuard, Target::Nginx, Target::Direct]
        );
        assert_eq!(round_order(&all, 3), all.to_vec());
    }

    fn point(target: Target, workers: usize, max_rps: f64, failed: bool) -> SweepPoint {
        SweepPoint {
            target: target.name().into(),
            workers,
            placement: String::new(),
            max_rps,
            efficiency: Some(-1.0),
            at_max: AtMax::default(),
            errors: 0,
            failure: failed.then(|| "did not start".to_string()),
        }
    }

    #[test]
    fn efficiency_is_per_worker_throughput_against_one_worker() {
        let mut points = vec![
            point(Target::Direct, 1, 100_000.0, false),
            point(Target::McpGuard, 1, 40_000.0, false),
            point(Target::Nginx, 2, 70_000.0, false),
            point(Target::Direct, 2, 100_000.0, false),
            point(Target::McpGuard, 2, 76_000.0, false),
            point(Target::McpGuard, 4, 140_000.0, false),
            point(Target::McpGuard, 8, 0.0, true),
        ];
        fill_efficiency(&mut points);
        let got: Vec<Option<f64>> = points.iter().map(|p| p.efficiency).collect();
        assert_eq!(
            got,
            [
                // direct is the mock alone: it has no workers to scale.
                None,
                Some(1.0),
                // nginx has no one-worker point to compare with.
                None,
                None,
                Some(0.95),
                Some(0.875),
                // A failed point has no efficiency.
                None,
            ]
        );
        // A failed one-worker point leaves nothing to compare with.
        let mut points = vec![
            point(Target::McpGuard, 1, 0.0, true),
            point(Target::McpGuard, 2, 50_000.0, false),
        ];
        fill_efficiency(&mut points);
        assert!(points.iter().all(|p| p.efficiency.is_none()));
    }

    #[test]
    fn the_saturated_side_sets_the_pace() {
        assert_eq!(Bound::classify(0.97, 0.50), Bound::Target);
        assert_eq!(Bound::classify(0.60, 0.95), Bound::LoadSide);
        assert_eq!(Bound::classify(0.95, 0.95), Bound::Both);
        assert_eq!(Bound::classify(0.60, 0.60), Bound::Neither);
    }

    #[test]
    fn cpu_cost_splits_user_and_system_per_request() {
        let tps = targets::ticks_per_second() as f64;
        // One second of user and half a second of system over 10,000 requests in 2 s on 1 CPU.
        let ticks = CpuTicks {
            user: tps as u64,
            system: (tps / 2.0) as u64,
        };
        let c = CpuCost::from_ticks(ticks, 10_000, 2.0, 1).unwrap();
        assert!((c.user_us - 100.0).abs() < 1e-9);
        assert!((c.system_us - 50.0).abs() < 1e-9);
        assert!((c.total_us - 150.0).abs() < 1e-9);
        assert!((c.busy - 0.75).abs() < 1e-9);
        assert!(CpuCost::from_ticks(ticks, 0, 2.0, 1).is_none());
    }

    #[test]
    fn gateway_config_per_scenario() {
        let plain = gateway_setup(find_scenario("passthrough").unwrap());
        assert!(plain.config.contains("[audit]\nenabled = false"));
        assert!(plain.client_headers.is_empty());
        let guard = gateway_setup(find_scenario("guard").unwrap());
        assert!(guard.client_headers.starts_with("Authorization: Bearer "));
        assert!(find_scenario("nope").is_err());
    }

    #[test]
    fn routed_configures_ten_servers_on_the_one_mock() {
        let routed = find_scenario("routed").unwrap();
        assert!(routed.gateway_only() && !routed.stdio);
        let endpoints = routed.endpoints();
        assert_eq!(endpoints.len(), 10);
        let setup = gateway_setup(routed);
        assert!(setup.client_headers.is_empty());
        let mock: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let text = targets::gateway_config(
            1,
            "auto",
            &GatewayUpstream::Http(mock),
            &setup.config,
            "/tmp/x",
        );
        let config: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config["rate_limit"]["enabled"].as_bool(), Some(false));
        assert_eq!(config["audit"]["enabled"].as_bool(), Some(false));
        let servers = config["upstream"]["servers"].as_array().unwrap();
        assert_eq!(servers.len(), 10);
        for (i, server) in servers.iter().enumerate() {
            let name = server["name"].as_str().unwrap();
            assert_eq!(name, format!("s{i}"));
            // Each server is reachable at <mcp_path>/<name>: the endpoint the load uses.
            assert_eq!(endpoints[i], format!("/mcp/{name}"));
            assert_eq!(server["transport"].as_str(), Some("http"));
            assert_eq!(server["url"].as_str(), Some("http://127.0.0.1:4000/mcp"));
        }
        // The default upstream is the same mock too.
        assert_eq!(
            config["upstream"]["url"].as_str(),
            Some("http://127.0.0.1:4000/mcp")
        );

        let passthrough = find_scenario("passthrough").unwrap();
        assert!(!passthrough.gateway_only());
        assert_eq!(passthrough.endpoints(), vec!["/mcp".to_string()]);
        assert!(find_scenario("stdio").unwrap().gateway_only());
        let plain = gateway_setup(passthrough).config;
        let text =
            targets::gateway_config(1, "auto", &GatewayUpstream::Http(mock), &plain, "/tmp/x");
        let table = text.parse::<toml::Table>().unwrap();
        assert!(
            !table["upstream"]
                .as_table()
                .unwrap()
                .contains_key("servers")
        );
        // Held idle connections outlive every run, as nginx's are configured to.
        let server = table["server"].as_table().unwrap();
        assert_eq!(server["header_timeout_secs"].as_integer(), Some(3600));
        assert_eq!(server["idle_timeout_secs"].as_integer(), Some(3600));
    }
}
