//! `perf`: the mcp-guard load-test harness — command line, process-wide setup (file limit,
//! interrupt flag, runtimes) and the `all`, `smoke`, `soak`, `upstream` and `receiver` commands.

mod fleet;
mod load;
mod pinning;
mod report;
mod scenarios;
mod soak;
mod targets;
mod tls;
mod upstream;
mod wire;
mod wrk;

use clap::{Args, Parser, Subcommand};
use scenarios::{Settings, Target};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "perf",
    about = "Load tests for mcp-guard against a direct upstream and nginx"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario against every target, interleaved; writes <out>/<name>.{json,md,svg}.
    All(AllArgs),
    /// A few-seconds run proving the harness works; non-zero exit on any failure.
    Smoke(CommonArgs),
    /// mcp-guard at a fixed rate for minutes, its RSS sampled over time, with a verdict on
    /// whether memory stayed flat; writes <out>/<name>.{json,md,svg}; non-zero exit on any
    /// failed request.
    Soak(SoakArgs),
    /// Only the mock MCP upstream, until killed.
    Upstream(UpstreamArgs),
    /// Only the fleet scenario's HTTP sink (SIEM / OTLP collector stand-in), until killed.
    Receiver(ReceiverArgs),
}

#[derive(Args)]
struct CommonArgs {
    /// Directory holding mcp-guard and mcp-demo-server [default: <repo>/target/release].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Results directory [default: <repo>/perf/results].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Load generator threads (each one monoio runtime).
    #[arg(long, default_value_t = 1)]
    load_threads: usize,
}

#[derive(Args)]
struct AllArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Seconds per measured phase (fixed rate, then closed loop).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Measure each scenario's targets this many times, interleaved (A B C, C B A, ...); the
    /// ratios are reported as the median and range over the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Fixed request rate (requests/s) for the latency and CPU phase.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Load connections (keep-alive, one MCP session each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// mcp-guard workers = nginx worker_processes for the scenarios [default: half the CPUs,
    /// at least 1: on two cores, one for the target and one for the load side].
    #[arg(long)]
    target_workers: Option<usize>,
    /// Worker counts to sweep for passthrough max throughput, e.g. 1,2,4.
    #[arg(long, value_delimiter = ',')]
    workers: Vec<usize>,
    /// Scenarios to run [default: all].
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Targets to run: direct, nginx, mcp-guard, original [default: all; `original` needs
    /// --original-bin].
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// The fleet scenario's gateway variants: memory, redis, audit-ship, trace-1.0, trace-0.01
    /// [default: all; `memory`, the baseline, is always added].
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Mock upstream threads [default: one per load-side CPU when pinned, else one per core].
    #[arg(long)]
    upstream_threads: Option<usize>,
    /// Do not pin the target and the load side to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Skip the wrk cross-check even when wrk is installed.
    #[arg(long)]
    no_wrk: bool,
    /// Skip nginx instead of installing it when it is missing.
    #[arg(long)]
    no_install: bool,
    /// The original mcp-guard's binary (botzrDev/mcp-guard's `mcp-guard`, built by you: the
    /// harness never builds it). With it, the `stdio_guard` scenario is also measured through
    /// the original, from the same configuration keys.
    #[arg(long)]
    original_bin: Option<PathBuf>,
    /// The original's log level (its RUST_LOG). Its own default, `info`, writes a line per
    /// request; `warn` spares it that cost.
    #[arg(long, default_value = "warn")]
    original_log: String,
    /// mcp-guard's I/O driver, its `[server] io`: `auto` (io_uring where the kernel allows
    /// it), `io_uring` or `epoll`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "io_uring", "epoll"])]
    io: String,
    /// Result file name (without extension).
    #[arg(long, default_value = "latest")]
    name: String,
}

#[derive(Args)]
struct SoakArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Seconds of load (one fixed-rate phase; the first 10 % is warm-up).
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Fixed request rate (requests/s).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds between samples of RSS, CPU and requests done.
    #[arg(long, default_value_t = 10.0)]
    sample_every: f64,
    /// Load connections (keep-alive, one MCP session each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Idle keep-alive connections held open for the whole run, besides the scenario's own
    /// (idle_1k, idle_10k).
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// The scenario whose gateway config and request are used (not fleet) [default: guard, the
    /// full security path].
    #[arg(long, default_value = "guard")]
    scenario: String,
    /// mcp-guard workers [default: half the CPUs, at least 1, as `perf all`].
    #[arg(long)]
    target_workers: Option<usize>,
    /// Mock upstream threads [default: one per load-side CPU when pinned, else one per core].
    #[arg(long)]
    upstream_threads: Option<usize>,
    /// Do not pin the gateway and the load side to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Result file name (without extension).
    #[arg(long, default_value = "soak")]
    name: String,
}

#[derive(Args)]
struct ReceiverArgs {
    /// Loopback address to listen on (port 0 picks one; printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

#[derive(Args)]
struct UpstreamArgs {
    /// Loopback address to listen on (port 0 picks one; printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Tools listed by tools/list.
    #[arg(long, default_value_t = 5)]
    tools: usize,
    /// Runtime threads [default: cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Make each tools/list answer's list differ from every other (a number in the middle
    /// tool's description).
    #[arg(long)]
    fresh_lists: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True once SIGINT or SIGTERM arrived: loops stop, drop guards stop the children.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    // A second signal takes the default action; children still get PR_SET_PDEATHSIG.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(signal, libc::SIG_DFL) };
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores an atomic and calls signal(2).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Raises the RLIMIT_NOFILE soft limit to the hard limit (idle scenarios hold 10k sockets, and
/// children inherit the limit); returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

pub type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// One monoio runtime for the calling thread: io_uring where the kernel allows, else epoll.
pub fn runtime() -> Result<Runtime, String> {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .map_err(|e| format!("cannot build a monoio runtime: {e}"))
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Checks the gateway binaries exist, so a missing build is one clear message.
fn binaries(common: &CommonArgs) -> Result<(PathBuf, PathBuf), String> {
    let dir =
        common
            .bin_dir
            .clone()
            .unwrap_or_else(|| match std::env::var_os("CARGO_TARGET_DIR") {
                Some(target) => PathBuf::from(target).join("release"),
                None => repo_root().join("target/release"),
            });
    let gateway = dir.join("mcp-guard");
    let demo = dir.join("mcp-demo-server");
    for bin in [&gateway, &demo] {
        if !bin.is_file() {
            return Err(format!(
                "{} is missing: run `cargo build --release` first (or pass --bin-dir)",
                bin.display()
            ));
        }
    }
    let absolute = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    Ok((absolute(gateway), absolute(demo)))
}

fn parse_targets(names: &[String]) -> Result<Vec<Target>, String> {
    if names.is_empty() {
        return Ok(Target::ALL.to_vec());
    }
    let mut chosen = Vec::new();
    for target in Target::ALL {
        if names.iter().any(|n| n == target.name()) {
            chosen.push(target);
        }
    }
    match names
        .iter()
        .find(|n| !Target::ALL.iter().any(|t| t.name() == n.as_str()))
    {
        Some(unknown) => Err(format!(
            "unknown target {unknown:?} (known: direct, nginx, mcp-guard, original)"
        )),
        None => Ok(chosen),
    }
}

/// The fleet variants named, in the canonical order, with the baseline always first.
fn parse_variants(names: &[String]) -> Result<Vec<&'static fleet::Variant>, String> {
    for name in names {
        fleet::find_variant(name)?;
    }
    Ok(fleet::VARIANTS
        .iter()
        .filter(|v| {
            names.is_empty() || v.name == fleet::BASELINE || names.iter().any(|n| n == v.name)
        })
        .collect())
}

/// The worker counts to sweep, ascending, with 1 added when missing: every point's efficiency is
/// taken against the same target at one worker.
fn sweep_with_one(mut workers: Vec<usize>) -> Vec<usize> {
    if !workers.is_empty() {
        workers.push(1);
        workers.sort_unstable();
        workers.dedup();
    }
    workers
}

/// Runs the matrix, writes the report, prints the Markdown; Err if any measurement failed.
fn run_and_report(
    settings: &Settings,
    name: &str,
    out: &Path,
    strict_errors: bool,
) -> Result<(), String> {
    let nginx_version = settings
        .nginx_bin
        .as_deref()
        .and_then(targets::nginx_version);
    let scenarios::Matrix {
        measurements,
        sweep,
        skipped,
    } = scenarios::run_matrix(settings)?;
    let ratios = report::ratios(&measurements);
    let fleet = fleet::comparisons(&measurements);
    let full = report::Report {
        name: name.to_string(),
        machine: report::Machine::collect(nginx_version),
        settings: report::RunSettings {
            duration_s: settings.duration.as_secs_f64(),
            warmup_s: settings.warmup.as_secs_f64(),
            rounds: settings.rounds,
            rate: settings.rate,
            connections: settings.connections,
            load_threads: settings.load_threads,
            workers: settings.workers,
            gateway_io: settings.gateway_io.clone(),
            upstream_threads: settings.upstream_threads(&settings.placement(settings.workers)),
            allowed_cpus: settings.allowed_cpus.clone(),
            placement: settings.placement(settings.workers),
            wrk: settings.wrk_bin.as_ref().map(|p| p.display().to_string()),
            original: settings.original.clone(),
            scenarios: settings.scenarios.clone(),
        },
        measurements,
        ratios,
        fleet,
        skipped,
        worker_sweep: sweep,
    };
    let markdown = report::write_all(&full, out)?;
    println!("{markdown}");
    eprintln!(
        "perf: wrote {0}/{name}.json, {0}/{name}.md, {0}/{name}.svg",
        out.display()
    );
    let failed = full
        .measurements
        .iter()
        .filter(|m| m.failure.is_some())
        .count()
        + full
            .worker_sweep
            .iter()
            .filter(|p| p.failure.is_some())
            .count();
    let errors: u64 = full.measurements.iter().map(|m| m.errors).sum::<u64>()
        + full.worker_sweep.iter().map(|p| p.errors).sum::<u64>();
    if failed > 0 {
        return Err(format!("{failed} measurement(s) failed"));
    }
    if strict_errors && errors > 0 {
        return Err(format!("{errors} request(s) failed"));
    }
    Ok(())
}

/// wrk for the cross-check, or `None` (with a note on stderr) when it is skipped.
fn wrk_for(disabled: bool) -> Option<PathBuf> {
    if disabled {
        return None;
    }
    let found = wrk::find();
    if found.is_none() {
        eprintln!("perf: wrk not installed: skipping the wrk cross-check");
    }
    found
}

fn all(args: AllArgs) -> Result<(), String> {
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return Err("--duration must be in (0, 3600] seconds".into());
    }
    if args.rate == 0 || args.connections == 0 || args.rounds == 0 || args.workers.contains(&0) {
        return Err("--rate, --connections, --rounds and --workers must be positive".into());
    }
    let (gateway_bin, demo_bin) = binaries(&args.common)?;
    let scenarios = if args.scenarios.is_empty() {
        scenarios::SCENARIOS.iter().collect()
    } else {
        args.scenarios
            .iter()
            .map(|n| scenarios::find_scenario(n))
            .collect::<Result<Vec<_>, _>>()?
    };
    let targets = parse_targets(&args.targets)?;
    let variants = parse_variants(&args.variants)?;
    let nginx_bin = if targets.contains(&Target::Nginx) {
        let found = targets::find_nginx(!args.no_install)?;
        if found.is_none() {
            eprintln!("perf: nginx not found and --no-install given: skipping the nginx target");
        }
        found
    } else {
        None
    };
    let original_bin = match args.original_bin {
        Some(bin) if !bin.is_file() => {
            return Err(format!("--original-bin {}: no such file", bin.display()));
        }
        Some(bin) => Some(scenarios::Original {
            bin: std::fs::canonicalize(&bin).unwrap_or(bin),
            log_level: args.original_log.clone(),
        }),
        None => None,
    };
    if original_bin.is_none() && args.targets.iter().any(|t| t == "original") {
        return Err("the original target needs --original-bin".into());
    }
    let duration = Duration::from_secs_f64(args.duration);
    let allowed_cpus = pinning::allowed_cpus();
    let sweep = sweep_with_one(args.workers);
    let settings = Settings {
        duration,
        warmup: (duration / 10).clamp(Duration::from_millis(200), Duration::from_secs(2)),
        gateway_io: args.io.clone(),
        rounds: args.rounds,
        rate: args.rate,
        connections: args.connections,
        load_threads: args.common.load_threads.max(1),
        workers: args.target_workers.unwrap_or(allowed_cpus.len() / 2).max(1),
        upstream_threads: args.upstream_threads.map(|n| n.max(1)),
        sweep,
        scenarios,
        targets,
        gateway_bin,
        demo_bin,
        nginx_bin,
        original: original_bin,
        allowed_cpus,
        pin: !args.no_pin,
        wrk_bin: wrk_for(args.no_wrk),
        variants,
        redis_bin: fleet::find_redis(),
    };
    let out = args
        .common
        .out
        .unwrap_or_else(|| repo_root().join("perf/results"));
    run_and_report(&settings, &args.name, &out, false)
}

/// Seconds from the command line as a Duration, refusing what Duration cannot hold.
fn seconds(value: f64, flag: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{flag} must be a number of seconds"))
}

/// Runs a soak, writes its report and prints its Markdown; Err on any failed request.
fn soak_and_report(options: &soak::SoakOptions, out: &Path) -> Result<soak::SoakReport, String> {
    let report = soak::run(options)?;
    let markdown = soak::write_all(&report, out)?;
    println!("{markdown}");
    eprintln!(
        "perf: wrote {0}/{1}.json, {0}/{1}.md, {0}/{1}.svg; RSS {2}",
        out.display(),
        report.name,
        report.verdict.describe()
    );
    let errors = report.totals.errors.total();
    if errors > 0 {
        return Err(format!("soak: {errors} request(s) failed"));
    }
    Ok(report)
}

fn soak(args: SoakArgs) -> Result<(), String> {
    // Refused rather than rounded up: a typo must not start a ten-minute run.
    if args.target_workers == Some(0) || args.upstream_threads == Some(0) {
        return Err("--target-workers and --upstream-threads must be positive".into());
    }
    let (gateway_bin, demo_bin) = binaries(&args.common)?;
    let allowed_cpus = pinning::allowed_cpus();
    let options = soak::SoakOptions {
        name: args.name,
        scenario: scenarios::find_scenario(&args.scenario)?,
        duration: seconds(args.duration, "--duration")?,
        rate: args.rate,
        sample_every: seconds(args.sample_every, "--sample-every")?,
        connections: args.connections,
        extra_idle: args.idle,
        load_threads: args.common.load_threads.max(1),
        workers: args.target_workers.unwrap_or(allowed_cpus.len() / 2).max(1),
        upstream_threads: args.upstream_threads,
        gateway_bin,
        demo_bin,
        allowed_cpus,
        pin: !args.no_pin,
    };
    let out = args
        .common
        .out
        .unwrap_or_else(|| repo_root().join("perf/results"));
    soak_and_report(&options, &out).map(|_| ())
}

fn smoke(args: CommonArgs) -> Result<(), String> {
    let (gateway_bin, demo_bin) = binaries(&args)?;
    let nginx_bin = targets::find_nginx(false)?;
    if nginx_bin.is_none() {
        eprintln!("perf: smoke: nginx not installed, skipping the nginx target");
    }
    // Pinned like a full run where the machine allows it, so the smoke run exercises that path;
    // wrk only if it happens to be installed (CI does not install it).
    let settings = Settings {
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        gateway_io: "auto".into(),
        rounds: 1,
        rate: 200,
        // At least one per server of the routed scenario, so every route carries load.
        connections: 10,
        load_threads: args.load_threads.max(1),
        workers: 1,
        upstream_threads: Some(1),
        sweep: Vec::new(),
        scenarios: vec![
            scenarios::find_scenario("passthrough")?,
            scenarios::find_scenario("sse")?,
            scenarios::find_scenario("routed")?,
            scenarios::find_scenario("tls")?,
            scenarios::find_scenario("fleet")?,
        ],
        targets: Target::ALL.to_vec(),
        gateway_bin,
        demo_bin,
        nginx_bin,
        original: None,
        allowed_cpus: pinning::allowed_cpus(),
        pin: true,
        wrk_bin: wrk_for(false),
        variants: fleet::VARIANTS.iter().collect(),
        redis_bin: fleet::find_redis(),
    };
    let out = args.out.unwrap_or_else(|| repo_root().join("perf/results"));
    run_and_report(&settings, "smoke", &out, true)?;
    // A short soak proves the command works end to end (sampler, verdict, report); three
    // seconds are too few to judge memory, which the report says.
    let soak = soak::SoakOptions {
        name: "smoke-soak".into(),
        scenario: scenarios::find_scenario("guard")?,
        duration: Duration::from_secs(3),
        rate: 200,
        sample_every: Duration::from_secs(1),
        connections: 10,
        extra_idle: 0,
        load_threads: args.load_threads.max(1),
        workers: 1,
        upstream_threads: Some(1),
        gateway_bin: settings.gateway_bin.clone(),
        demo_bin: settings.demo_bin.clone(),
        allowed_cpus: settings.allowed_cpus.clone(),
        pin: true,
    };
    let report = soak_and_report(&soak, &out)?;
    if report.samples.len() < 4 {
        return Err(format!(
            "smoke-soak: {} sample(s) in 3 s at 1 s intervals, expected at least 4",
            report.samples.len()
        ));
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    // The mock upstream and the receiver keep the default SIGTERM action: that is how the
    // harness stops them.
    if !matches!(cli.command, Command::Upstream(_) | Command::Receiver(_)) {
        install_signal_handlers();
    }
    raise_nofile_limit();
    let result = match cli.command {
        Command::All(args) => all(args),
        Command::Smoke(args) => smoke(args),
        Command::Soak(args) => soak(args),
        Command::Receiver(args) => fleet::serve_receiver(args.listen),
        Command::Upstream(args) => upstream::serve(&upstream::MockOptions {
            listen: args.listen,
            tools: args.tools,
            threads: args.threads.unwrap_or_else(cores),
            fresh_lists: args.fresh_lists,
        }),
    };
    if let Err(e) = result {
        eprintln!("perf: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_always_has_its_one_worker_reference() {
        assert_eq!(sweep_with_one(vec![]), Vec::<usize>::new());
        assert_eq!(sweep_with_one(vec![8, 2, 4]), vec![1, 2, 4, 8]);
        assert_eq!(sweep_with_one(vec![1, 2, 2]), vec![1, 2]);
    }

    #[test]
    fn variants_keep_their_order_and_always_the_baseline() {
        let names = |v: Vec<&fleet::Variant>| v.iter().map(|v| v.name).collect::<Vec<_>>();
        assert_eq!(
            names(parse_variants(&[]).unwrap()),
            ["memory", "redis", "audit-ship", "trace-1.0", "trace-0.01"]
        );
        let chosen = parse_variants(&["trace-0.01".into(), "redis".into()]).unwrap();
        assert_eq!(names(chosen), ["memory", "redis", "trace-0.01"]);
        assert!(parse_variants(&["trace-0.5".into()]).is_err());
    }
}
