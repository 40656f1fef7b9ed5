//! `perf soak`: mcp-guard under one long fixed-rate load phase while a sampler thread records
//! its RSS, CPU and the requests done so far every few seconds; the series, a verdict on whether
//! RSS stayed flat, and the report (JSON, Markdown, SVG line chart).

use crate::load::{self, ErrorCounts, GeneratorCpu, LiveCounts, LoadSpec, Pace};
use crate::pinning::{self, Placement};
use crate::report::{self, Machine};
use crate::scenarios::{self, CpuCost, Latency, Scenario, Settings, Target};
use crate::targets::{self, CpuTicks};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The first this share of the run is warm-up: RSS may still grow there (buffers, pools, the
/// allocator's arenas reaching their working size) and is not judged.
pub const WARMUP_SHARE: f64 = 0.10;
/// "Flat": RSS grew by at most this share of the post-warm-up baseline...
pub const FLAT_MAX_PCT: f64 = 5.0;
/// ...and by at most this many KiB (2 MiB), both by the end and along the fitted trend.
pub const FLAT_MAX_KB: f64 = 2048.0;
/// Fewer samples after warm-up than this, or a shorter judged span, and the run is too short to
/// judge: a few seconds of flat RSS say nothing about a leak of a few KiB a minute.
pub const MIN_JUDGED_SAMPLES: usize = 3;
pub const MIN_JUDGED_SPAN_S: f64 = 60.0;
/// The sampler's finest interval: /proc reads are cheap, but a run is not a profiler.
pub const MIN_SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The gateway config's idle timeout is an hour, and the held idle connections must outlive the
/// run.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// What one soak runs.
pub struct SoakOptions {
    pub name: String,
    pub scenario: &'static Scenario,
    pub duration: Duration,
    pub rate: u64,
    pub sample_every: Duration,
    pub connections: usize,
    /// Idle keep-alive connections held besides the scenario's own (`idle_1k`: 1,000).
    pub extra_idle: usize,
    pub load_threads: usize,
    pub workers: usize,
    pub upstream_threads: Option<usize>,
    pub gateway_bin: PathBuf,
    pub demo_bin: PathBuf,
    pub allowed_cpus: Vec<usize>,
    pub pin: bool,
}

impl SoakOptions {
    /// Refuses settings the soak cannot honour, naming the flag.
    pub fn check(&self) -> Result<(), String> {
        // The name becomes three file names in the results directory, and nothing else.
        if self.name.is_empty()
            || self.name.starts_with('.')
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "--name {:?}: use letters, digits, '-', '_' and '.' (not first)",
                self.name
            ));
        }
        if self.scenario.fleet {
            return Err("--scenario fleet is not supported by soak (its variants need helper processes); use guard".into());
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return Err(format!(
                "--duration must be in (0, {}] seconds",
                MAX_DURATION.as_secs()
            ));
        }
        if self.sample_every < MIN_SAMPLE_EVERY || self.sample_every > self.duration {
            return Err(format!(
                "--sample-every must be between {} s and --duration",
                MIN_SAMPLE_EVERY.as_secs_f64()
            ));
        }
        if self.rate == 0 || self.connections == 0 || self.workers == 0 {
            return Err("--rate, --connections and --target-workers must be positive".into());
        }
        Ok(())
    }

    fn idle(&self) -> usize {
        self.scenario
            .idle_connections
            .saturating_add(self.extra_idle)
    }
}

/// One reading of the gateway while the load runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the sampler started, just before the load phase.
    pub elapsed_s: f64,
    /// VmRSS of the mcp-guard process, KiB.
    pub rss_kb: u64,
    /// Requests completed and failed since the load phase began.
    pub completed: u64,
    pub errors: u64,
    /// The gateway's utime and stime since the first sample, clock ticks.
    pub cpu_user_ticks: u64,
    pub cpu_system_ticks: u64,
}

/// What the series says about memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Flat,
    Grew,
    TooShort,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Flat => "flat",
            Outcome::Grew => "grew",
            Outcome::TooShort => "too short to judge",
        }
    }
}

/// RSS from the end of warm-up to the end of the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Growth {
    /// The first sample at or after the end of warm-up.
    pub baseline_s: f64,
    pub baseline_rss_kb: u64,
    /// The last sample (taken right after the load phase ended).
    pub end_s: f64,
    pub end_rss_kb: u64,
    pub growth_kb: i64,
    pub growth_pct: f64,
    /// Least-squares slope of RSS over the samples from the baseline on.
    pub slope_kb_per_min: f64,
    /// The slope over the judged span: growth along the trend, immune to one noisy last sample.
    pub fitted_growth_kb: f64,
    /// min(FLAT_MAX_PCT of the baseline, FLAT_MAX_KB).
    pub bound_kb: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    pub warmup_end_s: f64,
    /// Samples at or after the end of warm-up.
    pub judged_samples: usize,
    /// `None` with fewer than two judged samples.
    pub growth: Option<Growth>,
}

/// Least-squares slope of `y` over `x`; `None` with fewer than two distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for &(x, y) in points {
        covariance += (x - mean_x) * (y - mean_y);
        variance += (x - mean_x) * (x - mean_x);
    }
    (variance > 0.0).then(|| covariance / variance)
}

/// Judges `samples` of a run of `duration_s`: warm-up is its first `WARMUP_SHARE`; "flat" when
/// both the growth from the baseline to the end and the fitted trend over that span stay within
/// min(`FLAT_MAX_PCT` of the baseline, `FLAT_MAX_KB`). Shrinking counts as flat.
pub fn verdict(samples: &[Sample], duration_s: f64) -> Verdict {
    let warmup_end_s = duration_s * WARMUP_SHARE;
    let judged: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.elapsed_s >= warmup_end_s)
        .collect();
    let growth = match (judged.first(), judged.last()) {
        (Some(first), Some(last)) if judged.len() >= 2 => {
            let points: Vec<(f64, f64)> = judged
                .iter()
                .map(|s| (s.elapsed_s / 60.0, s.rss_kb as f64))
                .collect();
            slope(&points).map(|per_min| {
                let growth_kb = last.rss_kb as i64 - first.rss_kb as i64;
                let baseline = first.rss_kb.max(1) as f64;
                Growth {
                    baseline_s: first.elapsed_s,
                    baseline_rss_kb: first.rss_kb,
                    end_s: last.elapsed_s,
                    end_rss_kb: last.rss_kb,
                    growth_kb,
                    growth_pct: 100.0 * growth_kb as f64 / baseline,
                    slope_kb_per_min: per_min,
                    fitted_growth_kb: per_min * (last.elapsed_s - first.elapsed_s) / 60.0,
                    bound_kb: (baseline * FLAT_MAX_PCT / 100.0).min(FLAT_MAX_KB),
                }
            })
        }
        _ => None,
    };
    let outcome = match &growth {
        Some(g)
            if judged.len() >= MIN_JUDGED_SAMPLES
                && g.end_s - g.baseline_s >= MIN_JUDGED_SPAN_S =>
        {
            if g.growth_kb as f64 <= g.bound_kb && g.fitted_growth_kb <= g.bound_kb {
                Outcome::Flat
            } else {
                Outcome::Grew
            }
        }
        _ => Outcome::TooShort,
    };
    Verdict {
        outcome,
        warmup_end_s,
        judged_samples: judged.len(),
        growth,
    }
}

impl Verdict {
    /// One sentence: the outcome and the figures behind it.
    pub fn describe(&self) -> String {
        match (&self.growth, self.outcome) {
            (Some(g), outcome) => format!(
                "{}: RSS {} KiB at {} s (end of warm-up) → {} KiB at {} s: {:+} KiB ({:+.1} %), least-squares slope {:+.1} KiB/min ({:+.0} KiB along the trend); flat means ≤ {:.0} KiB (min of {FLAT_MAX_PCT} % of the baseline and {FLAT_MAX_KB} KiB) both ways{}",
                outcome.label(),
                g.baseline_rss_kb,
                seconds(g.baseline_s),
                g.end_rss_kb,
                seconds(g.end_s),
                g.growth_kb,
                g.growth_pct,
                g.slope_kb_per_min,
                g.fitted_growth_kb,
                g.bound_kb,
                if outcome == Outcome::TooShort {
                    format!(
                        " (judged on {} samples over {} s; {MIN_JUDGED_SAMPLES} samples over {MIN_JUDGED_SPAN_S} s needed)",
                        self.judged_samples,
                        seconds(g.end_s - g.baseline_s)
                    )
                } else {
                    String::new()
                }
            ),
            (None, _) => format!(
                "too short to judge: {} sample(s) after the end of warm-up at {} s; {MIN_JUDGED_SAMPLES} samples over {MIN_JUDGED_SPAN_S} s needed",
                self.judged_samples,
                seconds(self.warmup_end_s)
            ),
        }
    }
}

/// Reads the gateway: its RSS and CPU through /proc, the load's progress through `live`.
struct Probe {
    pids: Vec<u32>,
    live: Arc<LiveCounts>,
    started: Instant,
    ticks_at_start: CpuTicks,
    /// stdio: the gateway's child servers belong on these CPUs (the load side); re-pinned every
    /// sample in case the gateway restarted one.
    children_to: Option<Vec<usize>>,
}

impl Probe {
    fn read(&self) -> Sample {
        if let Some(cpus) = &self.children_to {
            for &pid in &self.pids {
                for child in targets::children_of(pid) {
                    // A child that exited meanwhile needs no pinning; the next sample retries.
                    let _ = pinning::pin_process(child, cpus);
                }
            }
        }
        let (completed, errors) = self.live.read();
        let ticks = targets::cpu_ticks(&self.pids).since(self.ticks_at_start);
        Sample {
            elapsed_s: self.started.elapsed().as_secs_f64(),
            rss_kb: targets::status_kb(&self.pids, "VmRSS:"),
            completed,
            errors,
            cpu_user_ticks: ticks.user,
            cpu_system_ticks: ticks.system,
        }
    }
}

/// Samples on its own thread every interval, on a fixed schedule from its start (a slow read
/// does not shift the later ones), until `finish` adds the last sample.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<Sample>, Probe)>,
}

impl Sampler {
    fn start(probe: Probe, every: Duration) -> Result<Sampler, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("soak-sampler".into())
            .spawn(move || {
                let mut samples = vec![probe.read()];
                let mut next: u32 = 1;
                loop {
                    let due = probe.started + every * next;
                    // Short sleeps, so `finish` never waits a whole interval.
                    loop {
                        if flag.load(Ordering::Relaxed) {
                            return (samples, probe);
                        }
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        std::thread::sleep((due - now).min(Duration::from_millis(50)));
                    }
                    samples.push(probe.read());
                    next = next.saturating_add(1);
                }
            })
            .map_err(|e| format!("cannot start the sampler thread: {e}"))?;
        Ok(Sampler { stop, handle })
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok((mut samples, probe)) => {
                samples.push(probe.read());
                samples
            }
            Err(_) => Vec::new(),
        }
    }
}

/// The run's knobs, as recorded.
#[derive(Serialize)]
pub struct SoakSettings {
    pub scenario: &'static Scenario,
    pub duration_s: f64,
    pub rate: u64,
    pub sample_every_s: f64,
    pub connections: usize,
    pub idle_connections: usize,
    pub load_threads: usize,
    pub workers: usize,
    /// The mock upstream's threads; `None` for the stdio demo server.
    pub upstream_threads: Option<usize>,
    pub allowed_cpus: Vec<usize>,
    pub placement: Placement,
}

/// What the load phase did as a whole.
#[derive(Serialize)]
pub struct Totals {
    pub completed: u64,
    pub elapsed_s: f64,
    pub achieved_rate: f64,
    pub errors: ErrorCounts,
    /// Scheduled requests never sent because the gateway fell too far behind.
    pub missed_slots: u64,
    pub latency_us: Latency,
    /// The gateway's CPU per request over the whole phase (warm-up included).
    pub cpu: Option<CpuCost>,
    pub generator: GeneratorCpu,
    /// VmHWM at the end: the highest RSS, also between samples.
    pub peak_rss_kb: u64,
    pub idle_connections_dropped: usize,
}

impl Totals {
    /// The fixed rate was really offered: ≥ 95 % of it achieved and no slot missed.
    pub fn rate_sustained(&self, rate: u64) -> bool {
        self.achieved_rate >= 0.95 * rate as f64 && self.missed_slots == 0
    }
}

#[derive(Serialize)]
pub struct SoakReport {
    pub name: String,
    pub machine: Machine,
    pub settings: SoakSettings,
    pub totals: Totals,
    pub verdict: Verdict,
    pub samples: Vec<Sample>,
}

/// Starts the mock upstream and mcp-guard as `perf all` does for the scenario, holds the idle
/// connections, drives the fixed rate for the duration while sampling, and stops everything.
pub fn run(o: &SoakOptions) -> Result<SoakReport, String> {
    o.check()?;
    let idle_count = o.idle();
    if idle_count > 0 {
        let limit = crate::raise_nofile_limit();
        let needed = (idle_count as u64)
            .saturating_add(o.connections as u64)
            .saturating_add(512);
        if limit < needed {
            return Err(format!(
                "needs ~{needed} open files, RLIMIT_NOFILE is {limit} (raise ulimit -Hn)"
            ));
        }
    }
    let settings = Settings {
        duration: o.duration,
        warmup: Duration::ZERO,
        gateway_io: "auto".into(),
        rounds: 1,
        rate: o.rate,
        connections: o.connections,
        load_threads: o.load_threads.max(1),
        workers: o.workers,
        upstream_threads: o.upstream_threads,
        sweep: Vec::new(),
        scenarios: vec![o.scenario],
        targets: vec![Target::McpGuard],
        gateway_bin: o.gateway_bin.clone(),
        demo_bin: o.demo_bin.clone(),
        nginx_bin: None,
        original: None,
        allowed_cpus: o.allowed_cpus.clone(),
        pin: o.pin,
        wrk_bin: None,
        variants: Vec::new(),
        redis_bin: None,
    };
    let placement = settings.placement(o.workers);
    let upstream_threads = (!o.scenario.stdio).then(|| settings.upstream_threads(&placement));
    let mock = match upstream_threads {
        Some(threads) => Some(targets::start_mock(
            o.scenario.upstream_tools,
            o.scenario.fresh_lists,
            threads,
            &placement.load_cpus,
        )?),
        None => None,
    };
    let setup = scenarios::gateway_setup(o.scenario);
    let (running, addr, pids, tls) = scenarios::start_target(
        &settings,
        &placement,
        o.scenario,
        Target::McpGuard,
        o.workers,
        mock.as_ref(),
        &setup,
    )?;
    let children_to = o.scenario.stdio.then(|| placement.load_cpus.clone());
    if o.scenario.stdio {
        // The gateway starts its stdio server for the first session; start it now, so that it
        // is pinned to the load side before the clock starts.
        load::session_headers(addr, &setup.client_headers)?;
    }
    let idle = load::open_idle(addr, idle_count)?;
    if !idle.is_empty() {
        // Let the gateway accept and settle the whole batch before the first sample.
        std::thread::sleep(Duration::from_millis(500));
    }
    let live = Arc::new(LiveCounts::default());
    let spec = LoadSpec {
        addr,
        endpoints: o.scenario.endpoints(),
        call: o.scenario.call,
        connections: o.connections,
        threads: o.load_threads.max(1),
        duration: o.duration,
        pace: Pace::Open { rate: o.rate },
        extra_headers: setup.client_headers.clone(),
        cpus: placement.load_cpus.clone(),
        tls: tls.as_ref().map(|t| t.client.clone()),
        live: Some(live.clone()),
        handshake: true,
    };
    let probe = Probe {
        pids: pids.clone(),
        live,
        started: Instant::now(),
        ticks_at_start: targets::cpu_ticks(&pids),
        children_to,
    };
    if let Some(cpus) = &probe.children_to {
        for child in pids.iter().flat_map(|&p| targets::children_of(p)) {
            pinning::pin_process(child, cpus)?;
        }
    }
    let sampler = Sampler::start(probe, o.sample_every)?;
    let result = load::run(&spec);
    let samples = sampler.finish();
    let peak_rss_kb = targets::status_kb(&pids, "VmHWM:");
    let idle_connections_dropped = load::count_closed(&idle);
    drop(idle);
    drop(running);
    drop(mock);
    let result = result?;
    if crate::interrupted() {
        return Err("interrupted".into());
    }

    let elapsed_s = result.elapsed.as_secs_f64();
    let last = samples.last().cloned().unwrap_or_default();
    let cpu = CpuCost::from_ticks(
        CpuTicks {
            user: last.cpu_user_ticks,
            system: last.cpu_system_ticks,
        },
        result.completed,
        last.elapsed_s,
        placement.target_capacity(o.workers, crate::cores()),
    );
    let totals = Totals {
        completed: result.completed,
        elapsed_s,
        achieved_rate: if elapsed_s > 0.0 {
            result.completed as f64 / elapsed_s
        } else {
            0.0
        },
        errors: result.errors,
        missed_slots: result.missed_slots,
        latency_us: scenarios::latency(&result),
        cpu,
        generator: result.generator,
        peak_rss_kb,
        idle_connections_dropped,
    };
    Ok(SoakReport {
        name: o.name.clone(),
        machine: Machine::collect(None),
        settings: SoakSettings {
            scenario: o.scenario,
            duration_s: o.duration.as_secs_f64(),
            rate: o.rate,
            sample_every_s: o.sample_every.as_secs_f64(),
            connections: o.connections,
            idle_connections: idle_count,
            load_threads: o.load_threads.max(1),
            workers: o.workers,
            upstream_threads,
            allowed_cpus: o.allowed_cpus.clone(),
            placement,
        },
        verdict: verdict(&samples, o.duration.as_secs_f64()),
        totals,
        samples,
    })
}

/// Writes `<dir>/<name>.json`, `.md` and `.svg`; returns the Markdown.
pub fn write_all(r: &SoakReport, dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json =
        serde_json::to_string_pretty(r).map_err(|e| format!("cannot encode results: {e}"))?;
    let markdown = markdown(r);
    for (ext, text) in [("json", json), ("md", markdown.clone()), ("svg", svg(r))] {
        let path = dir.join(format!("{}.{ext}", r.name));
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(markdown)
}

/// "60", "1.5": whole seconds without decimals, others to a tenth.
fn seconds(s: f64) -> String {
    if (s - s.round()).abs() < 0.05 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

/// Per interval between consecutive samples: req/s, and the gateway's CPU µs per request.
fn interval(a: &Sample, b: &Sample) -> (Option<f64>, Option<f64>) {
    let dt = b.elapsed_s - a.elapsed_s;
    let requests = b.completed.saturating_sub(a.completed);
    let ticks = (b.cpu_user_ticks + b.cpu_system_ticks)
        .saturating_sub(a.cpu_user_ticks + a.cpu_system_ticks);
    let rps = (dt > 0.0).then(|| requests as f64 / dt);
    let cpu = (requests > 0)
        .then(|| ticks as f64 * 1e6 / targets::ticks_per_second() as f64 / requests as f64);
    (rps, cpu)
}

fn markdown(r: &SoakReport) -> String {
    let m = &r.machine;
    let s = &r.settings;
    let t = &r.totals;
    let mut out = report::title("soak", &r.name, m);
    out.push_str("## Method\n\n");
    let upstream = match s.upstream_threads {
        Some(n) => format!("the mock MCP upstream (`perf upstream`, {n} thread(s))"),
        None => "mcp-demo-server as its stdio child".to_string(),
    };
    let _ = writeln!(
        out,
        "- **What ran:** mcp-guard `workers = {}`, scenario `{}` ({}), started as `perf all` starts it, in front of {upstream}.",
        s.workers, s.scenario.name, s.scenario.about
    );
    let pinning = if s.placement.pinned {
        format!(
            "{} (sched_setaffinity before exec; the load threads pin themselves).",
            s.placement.note
        )
    } else {
        format!(
            "{}; gateway, load generator and upstream share CPU {}.",
            s.placement.note,
            pinning::list(&s.allowed_cpus)
        )
    };
    let _ = writeln!(out, "- **Pinning:** {pinning}");
    let idle = if s.idle_connections > 0 {
        format!(
            " {} idle keep-alive connections (nothing sent) were opened before it and held to the end.",
            s.idle_connections
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "- **Load:** one open-loop phase of {} s at a fixed {}/s over {} keep-alive connections (one MCP session each, {} load thread(s), monoio on {}); the schedule never pauses for sampling, and a request delayed by a slow answer counts from its scheduled time.{idle}",
        s.duration_s, s.rate, s.connections, s.load_threads, m.load_generator_driver
    );
    let _ = writeln!(
        out,
        "- **Sampling:** a harness thread, every {} s on a fixed schedule: VmRSS of the mcp-guard process from /proc/PID/status (one process, all its threads; shared pages included), its utime and stime from /proc/PID/stat (resolution 1/{} s), and the requests completed and failed so far (counters the load threads bump per request). The first row is read just before the load starts, the last right after it ends; the peak is VmHWM at the end, so a spike between samples still shows.",
        s.sample_every_s, m.clock_ticks_per_second
    );
    let _ = writeln!(
        out,
        "- **Verdict:** warm-up is the first {:.0} % of the run ({} s); the baseline is the first sample at or after it, the end the last sample. Growth = end − baseline; slope = least-squares fit of RSS over the samples from the baseline on, in KiB/min. **Flat** when both the growth and the slope × the judged span are ≤ {FLAT_MAX_PCT} % of the baseline and ≤ {FLAT_MAX_KB} KiB (the smaller bound applies; shrinking is flat); **grew** otherwise; too short to judge with fewer than {MIN_JUDGED_SAMPLES} samples after warm-up or less than {MIN_JUDGED_SPAN_S} s between the baseline and the end. The verdict is reported, not enforced: only failed requests make the command fail.",
        100.0 * WARMUP_SHARE,
        seconds(r.verdict.warmup_end_s)
    );
    out.push_str("\n## Verdict\n\n");
    let _ = writeln!(out, "**{}**", r.verdict.describe());
    if !t.rate_sustained(s.rate) {
        let _ = writeln!(
            out,
            "\nThe fixed rate was not sustained ({:.0}/s achieved of {}/s, {} slot(s) missed): memory was judged at a lower load than asked.",
            t.achieved_rate, s.rate, t.missed_slots
        );
    }
    out.push_str("\n## Totals\n\n| requests | achieved req/s | errors | missed slots | p50 µs | p99 µs | p99.9 µs | max µs | gateway CPU µs/req (user + sys) | generator busiest thread | peak RSS (VmHWM) KiB | idle connections dropped |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let l = &t.latency_us;
    let _ = writeln!(
        out,
        "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} % | {} | {} |",
        t.completed,
        t.achieved_rate,
        t.errors.total(),
        t.missed_slots,
        l.p50,
        l.p99,
        l.p999,
        l.max,
        t.cpu
            .map(|c| format!("{:.1} ({:.1} + {:.1})", c.total_us, c.user_us, c.system_us))
            .unwrap_or_else(|| "n/a".into()),
        100.0 * t.generator.busiest_thread,
        t.peak_rss_kb,
        t.idle_connections_dropped
    );
    if t.errors.total() > 0 {
        let _ = writeln!(out, "\nErrors by cause: {:?}", t.errors);
    }
    out.push_str("\n## Series\n\n| t s | RSS KiB | RSS MiB | requests so far | errors so far | req/s since previous | gateway CPU µs/req since previous |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, x) in r.samples.iter().enumerate() {
        let (rps, cpu) = match i.checked_sub(1).map(|p| &r.samples[p]) {
            Some(prev) => interval(prev, x),
            None => (None, None),
        };
        let mark = if r
            .verdict
            .growth
            .as_ref()
            .is_some_and(|g| g.baseline_s == x.elapsed_s)
        {
            " (baseline)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "| {:.1}{mark} | {} | {:.1} | {} | {} | {} | {} |",
            x.elapsed_s,
            x.rss_kb,
            x.rss_kb as f64 / 1024.0,
            x.completed,
            x.errors,
            rps.map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "n/a".into()),
            cpu.map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "n/a".into()),
        );
    }
    out.push_str("\nCPU per request over one interval counts whole clock ticks: over short intervals at low rates it is coarse; the Totals row is the figure to quote.\n");
    out
}

/// RSS (MiB) against time: the series, the end of warm-up, and the flat bound above the
/// baseline. The y axis starts at 0, so the chart shows growth at its true proportion.
fn svg(r: &SoakReport) -> String {
    const W: f64 = 760.0;
    const H: f64 = 340.0;
    const LEFT: f64 = 80.0;
    const TOP: f64 = 50.0;
    const PLOT_W: f64 = W - LEFT - 30.0;
    const PLOT_H: f64 = 220.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">mcp-guard RSS over a soak at {}/s — {} ({})</text>\n",
        r.settings.rate,
        report::esc(&r.name),
        r.verdict.outcome.label()
    );
    let mib = |kb: f64| kb / 1024.0;
    let bound_line = r
        .verdict
        .growth
        .as_ref()
        .map(|g| mib(g.baseline_rss_kb as f64 + g.bound_kb));
    let top = r
        .samples
        .iter()
        .map(|s| mib(s.rss_kb as f64))
        .fold(bound_line.unwrap_or(0.0), f64::max)
        .max(1.0);
    let step = report::nice_step(top);
    let y_max = (top / step).ceil() * step;
    let x_max = r
        .samples
        .iter()
        .map(|s| s.elapsed_s)
        .fold(r.settings.duration_s, f64::max)
        .max(1e-9);
    let bottom = TOP + PLOT_H;
    let x = |t: f64| LEFT + PLOT_W * t / x_max;
    let y = |v: f64| bottom - PLOT_H * v / y_max;
    let ticks = (y_max / step).round() as usize;
    for i in 0..=ticks {
        let v = step * i as f64;
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{gy:.1}\" y2=\"{gy:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + PLOT_W,
            LEFT - 6.0,
            y(v) + 4.0,
            report::short_number(v),
            gy = y(v)
        );
    }
    let time_step = report::nice_step(x_max);
    let mut t = 0.0;
    while t <= x_max + 1e-9 {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(t),
            bottom + 18.0,
            report::short_number(t)
        );
        t += time_step;
    }
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds</text><text transform=\"translate(24,{}) rotate(-90)\" text-anchor=\"middle\">RSS (MiB)</text>",
        LEFT + PLOT_W / 2.0,
        bottom + 40.0,
        TOP + PLOT_H / 2.0
    );
    let warmup_x = x(r.verdict.warmup_end_s);
    let _ = writeln!(
        out,
        "<line x1=\"{warmup_x:.1}\" x2=\"{warmup_x:.1}\" y1=\"{TOP}\" y2=\"{bottom}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{}\">end of warm-up</text>",
        warmup_x + 4.0,
        TOP + 12.0
    );
    if let Some(b) = bound_line {
        let _ = writeln!(
            out,
            "<line x1=\"{warmup_x:.1}\" x2=\"{}\" y1=\"{by:.1}\" y2=\"{by:.1}\" stroke=\"#e45756\" stroke-dasharray=\"6 3\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#e45756\">flat bound</text>",
            LEFT + PLOT_W,
            LEFT + PLOT_W,
            y(b) - 4.0,
            by = y(b)
        );
    }
    let points: Vec<String> = r
        .samples
        .iter()
        .map(|s| format!("{:.1},{:.1}", x(s.elapsed_s), y(mib(s.rss_kb as f64))))
        .collect();
    let _ = writeln!(
        out,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#4c78a8\" stroke-width=\"2\"/>\n<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"#333\"/>\n</svg>",
        points.join(" "),
        LEFT + PLOT_W
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rss: &[(f64, u64)]) -> Vec<Sample> {
        rss.iter()
            .map(|&(elapsed_s, rss_kb)| Sample {
                elapsed_s,
                rss_kb,
                ..Sample::default()
            })
            .collect()
    }

    #[test]
    fn least_squares_slope() {
        assert_eq!(slope(&[]), None);
        assert_eq!(slope(&[(1.0, 5.0)]), None);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 7.0)]), None, "no spread in x");
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-12);
        // Noise symmetric about a flat line fits to zero.
        let flat = [(0.0, 10.0), (1.0, 12.0), (2.0, 12.0), (3.0, 10.0)];
        assert!(slope(&flat).unwrap().abs() < 1e-12);
    }

    #[test]
    fn flat_run_within_both_bounds() {
        // 600 s, warm-up to 60 s: the climb before it is not judged.
        let mut points = vec![(0.0, 4_000), (30.0, 9_000)];
        points.extend((6..=60).map(|i| (i as f64 * 10.0, 10_000 + (i % 3) * 50)));
        let v = verdict(&series(&points), 600.0);
        assert_eq!(v.outcome, Outcome::Flat, "{v:?}");
        assert_eq!(v.warmup_end_s, 60.0);
        assert_eq!(v.judged_samples, 55);
        let g = v.growth.as_ref().unwrap();
        assert_eq!((g.baseline_s, g.baseline_rss_kb), (60.0, 10_000));
        assert_eq!((g.end_s, g.end_rss_kb), (600.0, 10_000));
        assert_eq!(g.growth_kb, 0);
        // 5 % of 10,000 KiB is below 2 MiB: the smaller bound applies.
        assert_eq!(g.bound_kb, 500.0);
        assert!(v.describe().starts_with("flat: RSS 10000 KiB at 60 s"));
    }

    #[test]
    fn steady_growth_is_caught_by_the_end_and_by_the_slope() {
        // +120 KiB a minute from 10 MiB: +1,080 KiB over the 9 judged minutes, above 5 % of
        // the 10,360 KiB baseline (518 KiB).
        let points: Vec<(f64, u64)> = (0..=60)
            .map(|i| (i as f64 * 10.0, 10_240 + i as u64 * 20))
            .collect();
        let v = verdict(&series(&points), 600.0);
        assert_eq!(v.outcome, Outcome::Grew);
        let g = v.growth.unwrap();
        assert_eq!(g.growth_kb, 1_080);
        assert!((g.growth_pct - 100.0 * 1_080.0 / 10_360.0).abs() < 1e-9);
        assert!((g.bound_kb - 518.0).abs() < 1e-9);
        assert!((g.slope_kb_per_min - 120.0).abs() < 1e-9);
        assert!((g.fitted_growth_kb - 1_080.0).abs() < 1e-9);

        // A last sample back at the baseline cannot hide the trend: the fitted growth still
        // exceeds the bound.
        let mut dipped = points.clone();
        dipped.last_mut().unwrap().1 = 10_360;
        let v = verdict(&series(&dipped), 600.0);
        assert_eq!(v.growth.as_ref().unwrap().growth_kb, 0);
        assert_eq!(v.outcome, Outcome::Grew);

        // A big process: the 2 MiB bound applies before 5 %.
        let big: Vec<(f64, u64)> = (0..=60)
            .map(|i| (i as f64 * 10.0, 100_000 + i as u64 * 50))
            .collect();
        let v = verdict(&series(&big), 600.0);
        let g = v.growth.unwrap();
        assert_eq!(g.bound_kb, FLAT_MAX_KB);
        assert_eq!(g.growth_kb, 2_700);
        assert_eq!(v.outcome, Outcome::Grew);
    }

    #[test]
    fn shrinking_is_flat_and_short_runs_are_not_judged() {
        let points: Vec<(f64, u64)> = (0..=10)
            .map(|i| (i as f64 * 10.0, 20_000 - i * 100))
            .collect();
        assert_eq!(verdict(&series(&points), 100.0).outcome, Outcome::Flat);

        // Many samples, but over less than a minute after warm-up: figures, no verdict, even
        // for a steep climb.
        let short: Vec<(f64, u64)> = (0..=10).map(|i| (i as f64, 20_000 + i * 1_000)).collect();
        let v = verdict(&series(&short), 10.0);
        assert_eq!((v.outcome, v.judged_samples), (Outcome::TooShort, 10));
        assert!(v.growth.is_some());
        assert!(
            v.describe()
                .ends_with("(judged on 10 samples over 9 s; 3 samples over 60 s needed)"),
            "{}",
            v.describe()
        );

        // Two samples after warm-up, however far apart: figures, but no verdict.
        let v = verdict(&series(&[(0.0, 1), (100.0, 100), (900.0, 100)]), 1000.0);
        assert_eq!((v.outcome, v.judged_samples), (Outcome::TooShort, 2));
        assert!(v.growth.is_some());
        assert!(v.describe().starts_with("too short to judge: RSS"));
        // One, or none (an empty series from a sampler that failed): no figures at all.
        for samples in [series(&[(0.0, 1), (9.0, 100)]), Vec::new()] {
            let v = verdict(&samples, 10.0);
            assert_eq!(v.outcome, Outcome::TooShort);
            assert!(v.growth.is_none());
            assert!(
                v.describe().ends_with("; 3 samples over 60 s needed"),
                "{}",
                v.describe()
            );
        }
        // A zero RSS (the process vanished) divides by nothing.
        let v = verdict(&series(&[(50.0, 0), (80.0, 0), (110.0, 0)]), 100.0);
        assert_eq!(v.outcome, Outcome::Flat);
        assert_eq!(v.growth.unwrap().growth_pct, 0.0);
    }

    fn options() -> SoakOptions {
        SoakOptions {
            name: "soak-2core".into(),
            scenario: scenarios::find_scenario("guard").unwrap(),
            duration: Duration::from_secs(600),
            rate: 5000,
            sample_every: Duration::from_secs(10),
            connections: 64,
            extra_idle: 0,
            load_threads: 1,
            workers: 1,
            upstream_threads: None,
            gateway_bin: PathBuf::from("/nonexistent/mcp-guard"),
            demo_bin: PathBuf::from("/nonexistent/mcp-demo-server"),
            allowed_cpus: vec![0, 1],
            pin: true,
        }
    }

    #[test]
    fn options_are_checked_before_anything_starts() {
        assert_eq!(options().check(), Ok(()));
        let refused = |change: fn(&mut SoakOptions), flag: &str| {
            let mut o = options();
            change(&mut o);
            // `run` checks first: nothing is started for refused options (the binaries given
            // do not even exist).
            let e = run(&o).err().unwrap();
            assert!(e.contains(flag), "{flag}: {e}");
        };
        refused(
            |o| o.scenario = scenarios::find_scenario("fleet").unwrap(),
            "--scenario fleet",
        );
        refused(|o| o.duration = Duration::ZERO, "--duration");
        refused(|o| o.duration = Duration::from_secs(3601), "--duration");
        refused(
            |o| o.sample_every = Duration::from_millis(99),
            "--sample-every",
        );
        refused(
            |o| o.sample_every = Duration::from_secs(601),
            "--sample-every",
        );
        refused(|o| o.rate = 0, "--rate");
        refused(|o| o.connections = 0, "--connections");
        refused(|o| o.workers = 0, "--target-workers");
        for name in ["", "../x", "a/b", ".hidden", "soak run", "x\0"] {
            let mut o = options();
            o.name = name.into();
            assert!(o.check().unwrap_err().starts_with("--name"), "{name:?}");
        }
        let mut idle = options();
        idle.scenario = scenarios::find_scenario("idle_1k").unwrap();
        idle.extra_idle = 24;
        assert_eq!(idle.idle(), 1_024);
        idle.extra_idle = usize::MAX;
        assert_eq!(
            idle.idle(),
            usize::MAX,
            "saturates, then the file limit refuses it"
        );
    }

    #[test]
    fn seconds_drop_needless_decimals() {
        assert_eq!(seconds(60.0), "60");
        assert_eq!(seconds(60.0003), "60");
        assert_eq!(seconds(1.5), "1.5");
        assert_eq!(seconds(15.05), "15.1");
    }

    #[test]
    fn intervals_give_rate_and_cpu_per_request() {
        let tps = targets::ticks_per_second();
        let a = Sample {
            elapsed_s: 10.0,
            completed: 1_000,
            cpu_user_ticks: tps,
            ..Sample::default()
        };
        // 5,000 requests in 10 s on one second of CPU: 500/s, 200 µs each.
        let b = Sample {
            elapsed_s: 20.0,
            completed: 6_000,
            cpu_user_ticks: tps + tps / 2,
            cpu_system_ticks: tps / 2,
            ..Sample::default()
        };
        let (rps, cpu) = interval(&a, &b);
        assert_eq!(rps, Some(500.0));
        assert!((cpu.unwrap() - 200.0).abs() < 1e-9);
        assert_eq!(interval(&a, &a), (None, None));
    }
}
