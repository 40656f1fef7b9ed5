//! CPU placement: which CPUs the target (the proxy under test) gets and which the load side (load
//! generator, mock upstream, wrk) gets, so that the two never compete for a core and a target's
//! requests/s measure the target, not the scheduler; and the sched_setaffinity calls that put
//! each process and thread there.

use serde::Serialize;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Where the run's processes were put. Unpinned: both lists are empty and `note` says why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Placement {
    pub pinned: bool,
    /// CPUs of the target's processes (nginx master and workers, every mcp-guard thread).
    pub target_cpus: Vec<usize>,
    /// CPUs of the load generator's threads, the mock upstream, wrk, and a stdio upstream.
    pub load_cpus: Vec<usize>,
    /// What was pinned where, or why nothing was, in words for the report.
    pub note: String,
}

impl Placement {
    /// The target gets the last `workers` CPUs of `allowed` (one per worker) and the load side
    /// the rest; pinning is skipped when that leaves the load side no CPU of its own, because a
    /// target sharing a core with its own load generator is exactly what must not be measured.
    pub fn plan(allowed: &[usize], workers: usize, enabled: bool) -> Placement {
        let unpinned = |why: String| Placement {
            pinned: false,
            target_cpus: Vec::new(),
            load_cpus: Vec::new(),
            note: format!("not pinned: {why}"),
        };
        if !enabled {
            return unpinned("--no-pin given".into());
        }
        let workers = workers.max(1);
        if allowed.len() < workers + 1 {
            return unpinned(format!(
                "{workers} worker(s) need {workers} CPU(s) of their own plus at least one for the \
                 load generator and upstream, and this process may use {} CPU(s) ({})",
                allowed.len(),
                list(allowed)
            ));
        }
        let (load, target) = allowed.split_at(allowed.len() - workers);
        Placement {
            pinned: true,
            target_cpus: target.to_vec(),
            load_cpus: load.to_vec(),
            note: format!(
                "target on CPU {}; load generator, mock upstream, wrk and stdio servers on CPU {}",
                list(target),
                list(load)
            ),
        }
    }

    /// This placement if a thread can really be pinned to both sides' CPUs here (a container
    /// may forbid sched_setaffinity or hide CPUs), else unpinned with the error as the reason.
    pub fn verified(self) -> Placement {
        if !self.pinned {
            return self;
        }
        let (target, load) = (self.target_cpus.clone(), self.load_cpus.clone());
        // A throwaway thread, so the caller's own affinity is left alone.
        let probe = std::thread::spawn(move || {
            pin_current_thread(&target).and_then(|()| pin_current_thread(&load))
        })
        .join()
        .unwrap_or_else(|_| Err("the pinning probe panicked".into()));
        match probe {
            Ok(()) => self,
            Err(e) => Placement {
                pinned: false,
                target_cpus: Vec::new(),
                load_cpus: Vec::new(),
                note: format!("not pinned: {e}"),
            },
        }
    }

    /// How many CPUs the target can keep busy: its own set when pinned, else one per worker (a
    /// worker is one thread or process) up to the machine.
    pub fn target_capacity(&self, workers: usize, machine: usize) -> usize {
        if self.pinned {
            self.target_cpus.len()
        } else {
            workers.clamp(1, machine.max(1))
        }
    }
}

/// "0", "0,1", "2-5": CPU lists as taskset and /proc print them.
pub fn list(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(match j - i {
            0 => cpus[i].to_string(),
            1 => format!("{},{}", cpus[i], cpus[j]),
            _ => format!("{}-{}", cpus[i], cpus[j]),
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The CPUs this process may run on (sched_getaffinity honours taskset and cpusets), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain bits; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0;
    if !ok {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain bits; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// Pins thread `tid` (0: the calling thread) to `cpus`; no-op for an empty list.
fn pin_thread(tid: libc::pid_t, cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let set = cpu_set(cpus);
    // SAFETY: the kernel reads size_of::<cpu_set_t>() bytes from `set`, which lives here.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread (the load generator's threads call this as they start).
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    pin_thread(0, cpus).map_err(|e| format!("cannot pin a thread to CPU {}: {e}", list(cpus)))
}

/// Pins every thread `pid` has now; threads it starts later inherit from their creator. Used for
/// a process the harness did not start itself (mcp-guard's stdio server).
pub fn pin_process(pid: u32, cpus: &[usize]) -> Result<(), String> {
    if cpus.is_empty() {
        return Ok(());
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("cannot list the threads of {pid}: {e}"))?;
    for tid in tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok()) {
        // A thread that exited meanwhile (ESRCH) needs no pinning.
        match pin_thread(tid, cpus) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                return Err(format!(
                    "cannot pin thread {tid} of {pid} to CPU {}: {e}",
                    list(cpus)
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Makes `command`'s process die with the harness (PR_SET_PDEATHSIG) and, when `cpus` is not
/// empty, start on those CPUs: set between fork and exec, so every thread and child process it
/// ever makes inherits the mask (nginx's workers, mcp-guard's workers and helpers).
pub fn prepare(command: &mut Command, cpus: &[usize]) {
    let set = (!cpus.is_empty()).then(|| cpu_set(cpus));
    // SAFETY: prctl and sched_setaffinity are async-signal-safe system calls touching only the
    // new process's own state; `set` was built before the fork and is only read.
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if let Some(set) = &set {
                if libc::sched_setaffinity(0, std::mem::size_of_val(set), set) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cores_split_one_and_one() {
        let p = Placement::plan(&[0, 1], 1, true);
        assert!(p.pinned);
        if allowed_cpus() == [0, 1] {
            assert_eq!(p.clone().verified(), p);
        }
        assert_eq!(
            (p.target_cpus.as_slice(), p.load_cpus.as_slice()),
            (&[1][..], &[0][..])
        );
        assert_eq!(p.target_capacity(1, 2), 1);
    }

    #[test]
    fn pinning_skipped_when_the_load_side_would_have_no_cpu() {
        for (allowed, workers) in [(&[0usize][..], 1), (&[0, 1][..], 2)] {
            let p = Placement::plan(allowed, workers, true);
            assert!(!p.pinned && p.target_cpus.is_empty(), "{p:?}");
            assert!(p.note.starts_with("not pinned:"));
        }
        // A CPU this process may not use cannot be pinned to: the probe says so.
        let impossible = Placement::plan(&[0, libc::CPU_SETSIZE as usize - 1], 1, true);
        let checked = impossible.verified();
        assert!(
            !checked.pinned && checked.note.starts_with("not pinned: cannot pin"),
            "{checked:?}"
        );
        let off = Placement::plan(&[0, 1, 2, 3], 1, false);
        assert!(!off.pinned && off.note.contains("--no-pin"));
        assert_eq!(off.target_capacity(2, 4), 2);
    }

    #[test]
    fn larger_machines_and_lists() {
        let p = Placement::plan(&[0, 1, 2, 3, 4, 5, 6, 7], 4, true);
        assert_eq!(list(&p.target_cpus), "4-7");
        assert_eq!(list(&p.load_cpus), "0-3");
        assert_eq!(list(&[0, 2, 3, 5, 6, 7]), "0,2,3,5-7");
    }

    #[test]
    fn this_thread_can_be_pinned_where_it_may_run() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        // Pinning to the whole allowed set changes nothing and must succeed.
        let pinned = std::thread::spawn(move || pin_current_thread(&allowed))
            .join()
            .unwrap();
        assert_eq!(pinned, Ok(()));
    }
}
