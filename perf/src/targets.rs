//! The processes under test and their upkeep: the mock upstream, mcp-guard and nginx started on
//! loopback with generated configs, stopped by a drop guard, and measured through /proc (CPU
//! ticks, RSS).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a process may take to report or open its listening address.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A child process that is stopped (SIGTERM, then SIGKILL) when this guard is dropped, and that
/// the kernel signals if the harness itself dies.
pub struct Managed {
    pub name: String,
    child: Child,
}

impl Managed {
    /// Starts `command` on `cpus` (empty: wherever the scheduler likes).
    pub fn spawn(name: &str, mut command: Command, cpus: &[usize]) -> Result<Managed, String> {
        crate::pinning::prepare(&mut command, cpus);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Managed {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` with the exit status if the process has already exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!("{} exited early ({status})", self.name)),
            _ => Ok(()),
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory removed on drop (configs, logs, nginx temp paths).
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(label: &str) -> Result<ScratchDir, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "mcp-guard-perf-{}-{label}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started target: the processes to measure and the address load goes to.
pub struct Running {
    pub addr: SocketAddr,
    /// Processes whose CPU and memory are the target's (nginx: master and workers).
    pub measured_pids: Vec<u32>,
    /// Keeps the processes (and their scratch dir) alive; dropped last.
    _guards: (Managed, Option<ScratchDir>),
}

/// Starts `perf upstream` (this same binary) on `cpus` and reads its address from its one stdout
/// line.
pub fn start_mock(
    tools: usize,
    fresh_lists: bool,
    threads: usize,
    cpus: &[usize],
) -> Result<Running, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the perf binary: {e}"))?;
    let mut command = Command::new(exe);
    command.args([
        "upstream",
        "--listen",
        "127.0.0.1:0",
        "--tools",
        &tools.to_string(),
        "--threads",
        &threads.to_string(),
    ]);
    if fresh_lists {
        command.arg("--fresh-lists");
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut managed = Managed::spawn("mock upstream", command, cpus)?;
    let addr = reported_address(&mut managed)?;
    let pid = managed.pid();
    Ok(Running {
        addr,
        measured_pids: vec![pid],
        _guards: (managed, None),
    })
}

/// The `listening on http://ADDR` line a child started with a piped stdout prints first (the
/// mock upstream, the fleet scenario's receiver).
pub fn reported_address(managed: &mut Managed) -> Result<SocketAddr, String> {
    let name = managed.name.clone();
    let stdout = managed
        .child
        .stdout
        .take()
        .ok_or_else(|| format!("{name} has no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(START_TIMEOUT)
        .map_err(|_| format!("{name} did not report its address"))?;
    address_after(&line, "listening on http://")
        .ok_or_else(|| format!("unexpected {name} output {line:?}"))
}

/// Where mcp-guard's requests go.
pub enum GatewayUpstream {
    Http(SocketAddr),
    /// A stdio MCP server program (absolute path).
    Stdio(PathBuf),
}

/// Starts mcp-guard on `cpus` with a generated config; `extra` is appended to the config (see
/// `scenarios::gateway_setup`).
pub fn start_gateway(
    binary: &Path,
    workers: usize,
    io: &str,
    upstream: &GatewayUpstream,
    extra: &str,
    cpus: &[usize],
) -> Result<Running, String> {
    let scratch = ScratchDir::new("mcp-guard")?;
    let config = gateway_config(
        workers,
        io,
        upstream,
        extra,
        &scratch.0.display().to_string(),
    );
    let (config_path, log_path, log) = config_and_log(&scratch, "mcp-guard", &config)?;
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut managed = Managed::spawn("mcp-guard", command, cpus)?;
    // The log goes to a file, not a pipe, so a chatty gateway can never block on a full pipe.
    let started = Instant::now();
    let addr = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(addr) = text
            .lines()
            .filter(|l| !l.contains("admin"))
            // With [server.tls] the gateway says https://.
            .find_map(|l| {
                address_after(l, "listening on http://")
                    .or_else(|| address_after(l, "listening on https://"))
            })
        {
            break addr;
        }
        if let Err(e) = managed.check_alive() {
            return Err(format!("{e}; log:\n{}", tail(&text, 20)));
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(format!(
                "mcp-guard did not report its address; log:\n{}",
                tail(&text, 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pid = managed.pid();
    Ok(Running {
        addr,
        measured_pids: vec![pid],
        _guards: (managed, Some(scratch)),
    })
}

/// Writes `NAME.toml` holding `config` into the scratch directory and creates `NAME.log` there
/// for the process's output: the config's path, the log's path and the open log.
fn config_and_log(
    scratch: &ScratchDir,
    name: &str,
    config: &str,
) -> Result<(PathBuf, PathBuf, std::fs::File), String> {
    let config_path = scratch.0.join(format!("{name}.toml"));
    std::fs::write(&config_path, config)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let log_path = scratch.0.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    Ok((config_path, log_path, log))
}

/// mcp-guard's config: the listener, the admin port, `[upstream]`, then `extra` with
/// `{scratch}` and `{upstream_url}` (the HTTP upstream's MCP endpoint) filled in.
pub fn gateway_config(
    workers: usize,
    io: &str,
    upstream: &GatewayUpstream,
    extra: &str,
    scratch: &str,
) -> String {
    let (upstream_section, upstream_url) = match upstream {
        GatewayUpstream::Http(addr) => {
            let url = format!("http://{addr}/mcp");
            (format!("transport = \"http\"\nurl = \"{url}\"\n"), url)
        }
        GatewayUpstream::Stdio(program) => (
            format!(
                "transport = \"stdio\"\ncommand = {:?}\n",
                program.display().to_string()
            ),
            String::new(),
        ),
    };
    // Idle and header timeouts above any run length, as nginx's keepalive_timeout and
    // client_header_timeout here: the idle scenarios hold connections that never send for the
    // whole run, and a proxy that closed them mid-run (mcp-guard's default header timeout is
    // 10 s) would be measured closing ten thousand sockets while the other held them.
    format!(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\nworkers = {workers}\nidle_timeout_secs = 3600\nheader_timeout_secs = 3600\nshutdown_grace_secs = 1\nio = {io:?}\n\n\
         [admin]\nport = 0\n\n[upstream]\n{upstream_section}\n{}",
        extra
            .replace("{scratch}", scratch)
            .replace("{upstream_url}", &upstream_url)
    )
}

/// Starts nginx on `cpus` as a reverse proxy to `upstream` with `workers` worker processes.
pub fn start_nginx(
    binary: &Path,
    workers: usize,
    upstream: SocketAddr,
    tls: Option<&crate::tls::TlsMaterial>,
    cpus: &[usize],
) -> Result<Running, String> {
    let scratch = ScratchDir::new("nginx")?;
    // TLS as mcp-guard serves it: 1.2 and 1.3, the same certificate; session tickets and the
    // cache stay at nginx's defaults (the load keeps its connections, so they are not used).
    let (ssl, ssl_settings) = match tls {
        None => ("", String::new()),
        Some(m) => (
            " ssl",
            format!(
                "ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ",
                m.cert_path.display(),
                m.key_path.display()
            ),
        ),
    };
    let dir = scratch.0.display().to_string();
    let port = free_port()?;
    let files = crate::raise_nofile_limit();
    // Idle upstream connections kept per worker: as many as mcp-guard keeps per upstream address
    // (its MAX_IDLE_PER_ADDR), and never retired (nginx's upstream default closes one after 1,000
    // requests), so neither proxy reconnects to the upstream where the other does not.
    let keepalive = 256;
    // `reuseport` gives each worker its own listening socket, as mcp-guard's workers have
    // (SO_REUSEPORT): with several workers both proxies then get connections spread by the
    // kernel's hash, not by which worker's accept wins a wake-up.
    let config = format!(
        r#"worker_processes {workers};
worker_rlimit_nofile {files};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {files}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 3600s;
    keepalive_requests 100000000;
    client_header_timeout 3600s;
    upstream mock {{
        server {upstream};
        keepalive {keepalive};
        keepalive_requests 100000000;
        keepalive_timeout 3600s;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl} backlog=4096 reuseport;
        {ssl_settings}location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
    );
    let config_path = scratch.0.join("nginx.conf");
    std::fs::write(&config_path, config)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let mut command = Command::new(binary);
    command
        .arg("-p")
        .arg(&scratch.0)
        .arg("-e")
        .arg(scratch.0.join("error.log"))
        .arg("-c")
        .arg(&config_path)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut managed = Managed::spawn("nginx", command, cpus)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Err(e) = managed.check_alive() {
            let log = std::fs::read_to_string(scratch.0.join("error.log")).unwrap_or_default();
            return Err(format!("{e}; error.log:\n{}", tail(&log, 20)));
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(format!("nginx did not open {addr}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Workers are forked after the listener opens; wait until all of them exist.
    let master = managed.pid();
    let mut measured = vec![master];
    while started.elapsed() < START_TIMEOUT {
        measured = std::iter::once(master).chain(children_of(master)).collect();
        if measured.len() > workers {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Running {
        addr,
        measured_pids: measured,
        _guards: (managed, Some(scratch)),
    })
}

/// Starts the original mcp-guard (botzrDev/mcp-guard, built by the user) on `cpus` in front of
/// the stdio server `demo`, with `extra` (the scenario's compat keys: API key, rate limit, audit)
/// after its `[server]` and `[upstream]` tables, at log level `log_level` (at its default,
/// `info`, it writes a line per request).
pub fn start_original(
    binary: &Path,
    log_level: &str,
    demo: &Path,
    extra: &str,
    cpus: &[usize],
) -> Result<Running, String> {
    let scratch = ScratchDir::new("original")?;
    let port = free_port()?;
    let config = format!(
        "[server]\nhost = \"127.0.0.1\"\nport = {port}\n\n[upstream]\ntransport = \"stdio\"\ncommand = {:?}\n\n{}",
        demo.display().to_string(),
        extra.replace("{scratch}", &scratch.0.display().to_string())
    );
    let (config_path, log_path, log) = config_and_log(&scratch, "original", &config)?;
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(&config_path)
        .args(["run", "--host", "127.0.0.1", "--port", &port.to_string()])
        .env("RUST_LOG", log_level)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| format!("log file: {e}"))?)
        .stderr(log);
    let mut managed = Managed::spawn("original mcp-guard", command, cpus)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        let log = || tail(&std::fs::read_to_string(&log_path).unwrap_or_default(), 20);
        if let Err(e) = managed.check_alive() {
            return Err(format!("{e}; log:\n{}", log()));
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(format!("the original did not open {addr}; log:\n{}", log()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = managed.pid();
    Ok(Running {
        addr,
        measured_pids: vec![pid],
        _guards: (managed, Some(scratch)),
    })
}

/// nginx's path: /usr/sbin/nginx or on PATH; if absent and `install` is set, apt-get installs
/// nginx-light (or nginx). `Ok(None)`: absent and not installed.
pub fn find_nginx(install: bool) -> Result<Option<PathBuf>, String> {
    let lookup = || {
        let mut candidates = vec![PathBuf::from("/usr/sbin/nginx")];
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("nginx")));
        }
        candidates.into_iter().find(|p| p.is_file())
    };
    if let Some(found) = lookup() {
        return Ok(Some(found));
    }
    if !install {
        return Ok(None);
    }
    eprintln!(
        "perf: nginx not found; installing it with apt-get (apt-get update; apt-get install -y nginx-light)"
    );
    // apt's chatter goes to our stderr: stdout carries only the report.
    let apt = |args: &[&str]| {
        let to_stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(to_stderr)
            .status()
    };
    let updated = apt(&["update"]).map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !updated.success() {
        return Err(format!("apt-get update failed ({updated})"));
    }
    for package in ["nginx-light", "nginx"] {
        if apt(&["install", "-y", "--no-install-recommends", package]).is_ok_and(|s| s.success()) {
            eprintln!("perf: installed {package}");
            break;
        }
    }
    lookup()
        .map(Some)
        .ok_or_else(|| "nginx is still missing after apt-get install".to_string())
}

/// `nginx -v` output (it prints to stderr).
pub fn nginx_version(binary: &Path) -> Option<String> {
    let out = Command::new(binary).arg("-v").output().ok()?;
    Some(String::from_utf8_lossy(&out.stderr).trim().to_string())
}

/// Samples the summed RSS of `pids` every 100 ms on a thread until `finish`.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(status_kb(&pids, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        RssSampler { stop, handle }
    }

    /// The highest summed RSS sampled, in KiB.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// Sums a `/proc/<pid>/status` field (VmRSS:, VmHWM:) over `pids`, in KiB.
pub fn status_kb(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|text| {
            let line = text.lines().find(|l| l.starts_with(field))?;
            line[field.len()..]
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// CPU time in clock ticks, user and system apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

impl CpuTicks {
    /// What was spent between `before` and `self`.
    pub fn since(self, before: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    pub fn total(self) -> u64 {
        self.user + self.system
    }
}

/// utime and stime of `pids`, summed. /proc/PID/stat counts the whole thread group (every
/// thread, also exited ones), so a process's helper threads and io_uring workers are included.
pub fn cpu_ticks(pids: &[u32]) -> CpuTicks {
    pids.iter()
        .filter_map(|pid| stat_fields(*pid))
        .fold(CpuTicks::default(), |sum, f| CpuTicks {
            user: sum.user + f.utime,
            system: sum.system + f.stime,
        })
}

/// Machine-wide counters read around a phase: every CPU's busy and total ticks (/proc/stat) and
/// the TCP segments sent (/proc/net/snmp). They see what per-process figures cannot: softirq
/// work done in ksoftirqd, the whole cost of a hop whoever the kernel charged it to, and anything
/// else that ran on a CPU meant for one side only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineCounters {
    /// (cpu, busy ticks, total ticks) per CPU.
    pub cpus: Vec<(usize, u64, u64)>,
    pub tcp_out_segs: Option<u64>,
}

impl MachineCounters {
    pub fn read() -> MachineCounters {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
        MachineCounters {
            cpus: parse_proc_stat(&stat),
            tcp_out_segs: parse_out_segs(&snmp),
        }
    }

    /// The counters' growth since `before`.
    pub fn since(&self, before: &MachineCounters) -> MachineCounters {
        MachineCounters {
            cpus: self
                .cpus
                .iter()
                .filter_map(|&(cpu, busy, total)| {
                    let &(_, b0, t0) = before.cpus.iter().find(|c| c.0 == cpu)?;
                    Some((cpu, busy.saturating_sub(b0), total.saturating_sub(t0)))
                })
                .collect(),
            tcp_out_segs: self
                .tcp_out_segs
                .zip(before.tcp_out_segs)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }

    /// Busy ticks summed over every CPU.
    pub fn busy_ticks(&self) -> u64 {
        self.cpus.iter().map(|c| c.1).sum()
    }

    /// Busy ÷ total ticks over `cpus` (None if none of them was read).
    pub fn busy_share(&self, cpus: &[usize]) -> Option<f64> {
        let (busy, total) = self
            .cpus
            .iter()
            .filter(|c| cpus.contains(&c.0))
            .fold((0, 0), |(b, t), c| (b + c.1, t + c.2));
        (total > 0).then(|| busy as f64 / total as f64)
    }
}

/// Per-CPU (cpu, busy, total) from /proc/stat: busy = user + nice + system + irq + softirq; total
/// adds idle and iowait (steal and guest time are not this machine's work).
fn parse_proc_stat(text: &str) -> Vec<(usize, u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu = fields.next()?.strip_prefix("cpu")?.parse::<usize>().ok()?;
            let v: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
            // user nice system idle iowait irq softirq
            let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
            Some((cpu, busy, busy + v.get(3)? + v.get(4)?))
        })
        .collect()
}

/// OutSegs from the `Tcp:` header and value lines of /proc/net/snmp.
fn parse_out_segs(text: &str) -> Option<u64> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let index = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// Clock ticks per second, for converting `cpu_ticks`.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Direct children of `pid` (nginx workers; mcp-guard's stdio servers).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat_fields(child).is_some_and(|f| f.ppid == pid))
        .collect()
}

struct StatFields {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn stat_fields(pid: u32) -> Option<StatFields> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12), i.e. fields 14 and 15 of stat(5).
    Some(StatFields {
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// Parses the `IP:PORT` that follows `marker` in a log line (ANSI colour codes tolerated).
pub fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let start = line.find(marker)? + marker.len();
    let text: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    text.parse().ok()
}

/// A free loopback port for nginx and redis-server (which cannot report a port-0 bind back to
/// us; redis-server takes port 0 to mean no TCP at all).
pub fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_log_lines() {
        let line = "\u{1b}[32mINFO\u{1b}[0m mcp-guard 0.1.0 listening on http://127.0.0.1:4321 (2 workers, io_uring driver)";
        assert_eq!(
            address_after(line, "listening on http://"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4321)))
        );
        assert_eq!(address_after("nothing here", "listening on http://"), None);
    }

    #[test]
    fn machine_counters_parse() {
        let stat = "cpu  10 0 5 100 1 0 2 0 0 0\ncpu0 4 0 2 50 1 0 1 3 0 0\ncpu1 6 0 3 50 0 0 1 0 0 0\nintr 1 2\n";
        assert_eq!(parse_proc_stat(stat), vec![(0, 7, 58), (1, 10, 60)]);
        let snmp = "Tcp: RtoAlgorithm InSegs OutSegs RetransSegs\nTcp: 1 500 400 3\nUdp: InDatagrams\nUdp: 9\n";
        assert_eq!(parse_out_segs(snmp), Some(400));
        let before = MachineCounters {
            cpus: vec![(0, 7, 58), (1, 10, 60)],
            tcp_out_segs: Some(400),
        };
        let after = MachineCounters {
            cpus: vec![(0, 17, 68), (1, 10, 70)],
            tcp_out_segs: Some(450),
        };
        let d = after.since(&before);
        assert_eq!((d.busy_ticks(), d.tcp_out_segs), (10, Some(50)));
        assert_eq!(d.busy_share(&[0]), Some(1.0));
        assert_eq!(d.busy_share(&[0, 1]), Some(0.5));
        assert_eq!(d.busy_share(&[7]), None);
        assert!(!MachineCounters::read().cpus.is_empty());
    }

    #[test]
    fn own_process_is_measurable() {
        let me = std::process::id();
        assert!(stat_fields(me).is_some());
        assert!(status_kb(&[me], "VmRSS:") > 0);
    }
}
