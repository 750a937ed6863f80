//! Which process is writing a run, and how each of its sessions ended (seed-trainer F13: "OOM
//! kills come without a cause").
//!
//! Every `lorahost train` process appends a `{"event": "session", ...}` record to the run's
//! `metrics.jsonl` when it starts (its process id, the machine's boot id, the process's start
//! time, the OOM killer's counters and the memory limit) and an `{"event": "end", ...}` record
//! when it stops: completed, stopped, interrupted, failed with its error, or panicked. A process
//! killed outright (the kernel's OOM killer, `kill -9`, a job scheduler's limit, the machine
//! going away) writes no end record; the next `lorahost train` in that folder and `lorahost
//! doctor --trace` notice the missing record and say what ended the session, comparing the OOM
//! killer's counters then and now. A session whose process is still alive keeps its folder:
//! another `lorahost train` refuses to start there instead of moving the live run's files.
//! While a run trains, [`MemoryWatch`] warns once when the host's memory is close to running
//! out, before the OOM killer acts.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The OOM killer's kill counters: in this process's memory cgroup (the container's or the
/// job's limit; `memory.events` or `memory.oom_control`) and on the whole machine since boot
/// (`/proc/vmstat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OomCounters {
    /// Kills in this memory cgroup and below it.
    pub cgroup: Option<u64>,
    /// Kills on the machine.
    pub machine: Option<u64>,
}

/// Where a process runs and what the OOM killer has done so far: read at a session's start
/// (its record) and again when a later process looks back at it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    /// The step the session started from (0, or the resume point).
    pub step: u64,
    /// Process id.
    pub pid: u32,
    /// The machine's host name.
    pub host: String,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): another one means the machine
    /// restarted since.
    pub boot_id: String,
    /// The process's start time in clock ticks after boot (`/proc/PID/stat`): with the pid and
    /// the boot id, it tells this process from a later one that reuses its pid.
    pub proc_start: u64,
    /// Seconds since the Unix epoch when the session started.
    pub started_unix: u64,
    /// The OOM killer's counters at the start.
    pub oom_kills: OomCounters,
    /// The memory cgroup's limit in bytes, when it has one.
    pub memory_limit_bytes: Option<u64>,
    /// The machine's memory (`MemTotal`) in bytes.
    pub host_memory_bytes: Option<u64>,
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The value of `key N` in a `key value` per line file (`memory.events`, `/proc/vmstat`).
pub fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok()).flatten()
    })
}

/// The memory cgroup folders of this process, most specific first: the path `/proc/self/cgroup`
/// names (cgroup v2's `0::PATH`, v1's `N:...memory...:PATH`) under the mount, then the mount's
/// root (inside a container the mount is often the container's own cgroup already).
fn cgroup_dirs(proc_cgroup: &str) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            out.push((Path::new("/sys/fs/cgroup").join(rel), true));
            out.push((PathBuf::from("/sys/fs/cgroup"), true));
        } else if controllers.split(',').any(|c| c == "memory") {
            out.push((Path::new("/sys/fs/cgroup/memory").join(rel), false));
            out.push((PathBuf::from("/sys/fs/cgroup/memory"), false));
        }
    }
    out
}

/// This process's memory cgroup: its kill counter and its limit.
fn cgroup_memory() -> (Option<u64>, Option<u64>) {
    let Some(text) = read("/proc/self/cgroup") else { return (None, None) };
    for (dir, v2) in cgroup_dirs(&text) {
        if v2 {
            if let Some(events) = read(dir.join("memory.events")) {
                let limit = read(dir.join("memory.max")).and_then(|s| s.trim().parse().ok());
                return (counter(&events, "oom_kill"), limit);
            }
        } else if let Some(control) = read(dir.join("memory.oom_control")) {
            // cgroup v1 writes "no limit" as a huge number.
            let limit = read(dir.join("memory.limit_in_bytes"))
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|&l| l < 1 << 60);
            return (counter(&control, "oom_kill"), limit);
        }
    }
    (None, None)
}

/// The start time (field 22) of a `/proc/PID/stat` line.
fn start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The state letter (field 3) of a `/proc/PID/stat` line.
fn process_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

fn boot_id() -> String {
    read("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn host_name() -> String {
    read("/proc/sys/kernel/hostname")
        .or_else(|| read("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

impl Session {
    /// This process, now, starting at `step`.
    pub fn now(step: u64) -> Self {
        let (cgroup, memory_limit_bytes) = cgroup_memory();
        Session {
            step,
            pid: std::process::id(),
            host: host_name(),
            boot_id: boot_id(),
            proc_start: read("/proc/self/stat").as_deref().and_then(start_ticks).unwrap_or(0),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            oom_kills: OomCounters {
                cgroup,
                machine: read("/proc/vmstat").and_then(|t| counter(&t, "oom_kill")),
            },
            memory_limit_bytes,
            host_memory_bytes: read("/proc/meminfo")
                .and_then(|t| counter(&t.replace(':', ""), "MemTotal"))
                .map(|kb| kb * 1024),
        }
    }

    /// The record that opens a session in `metrics.jsonl`.
    pub fn record(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("event".into(), "session".into());
        }
        v.to_string()
    }

    /// Whether this session's process is alive: the same machine (boot id and host) holds a
    /// process with its pid that started when it did. This process itself does not count (its
    /// earlier sessions ended inside it).
    fn alive(&self, now: &Session) -> bool {
        if self.boot_id.is_empty()
            || self.boot_id != now.boot_id
            || self.host != now.host
            || self.proc_start == 0
        {
            return false;
        }
        if self.pid == now.pid && self.proc_start == now.proc_start {
            return false;
        }
        // (A zombie has ended; its parent has not collected it yet.)
        read(format!("/proc/{}/stat", self.pid))
            .filter(|stat| !matches!(process_state(stat), Some('Z' | 'X')))
            .as_deref()
            .and_then(start_ticks)
            == Some(self.proc_start)
    }
}

/// The record that closes a session: why it ended, at which step, and the error of a failed
/// one or the reason of a stopped one.
pub fn end_record(step: u64, reason: &str, detail: Option<&str>) -> String {
    let mut v = serde_json::json!({"event": "end", "step": step, "reason": reason});
    if let Some(d) = detail {
        v["detail"] = d.into();
    }
    v.to_string()
}

/// Why a session that wrote no end record ended, as far as the machine can tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// The OOM killer killed a process in the session's memory cgroup after it started.
    OomKiller {
        /// The cgroup's counter at the session's start.
        before: u64,
        /// Now.
        after: u64,
    },
    /// The machine's OOM killer killed some process after the session started (its cgroup's
    /// counter is not readable, or the kill was outside it).
    MachineOomKiller {
        /// The machine's counter at the session's start.
        before: u64,
        /// Now.
        after: u64,
    },
    /// The OOM killer's counters did not move: another SIGKILL, or a crash.
    NotOomKiller,
    /// The machine restarted after the session started (another boot id).
    Restarted,
    /// Looked at from another machine, or without the counters: nothing to compare.
    Unknown,
}

/// How the last session of a run's log ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// The log has no session records (a log from an older lorahost, or another trainer's).
    Unknown,
    /// It wrote its end record.
    Recorded {
        /// The step it ended at.
        step: u64,
        /// `completed`, `max_steps`, `stopped`, `out_of_memory`, `interrupted`, `error`,
        /// `panic`.
        reason: String,
        /// The error of a failed session, the reason of a stopped one.
        detail: Option<String>,
    },
    /// Its process is still running.
    Running(Session),
    /// It stopped without an end record: killed, or crashed.
    Unrecorded {
        /// Its start record.
        session: Session,
        /// The last step it recorded.
        last_step: Option<u64>,
        /// The last step record's memory (`memory_bytes`: the process's peak RSS on the CPU,
        /// the device's on CUDA) and, on CUDA, the process's peak RSS.
        last_memory: (Option<u64>, Option<u64>),
        /// What ended it.
        cause: Cause,
    },
}

/// How the last session in the log text `text` ended, seen from `now` (this process).
pub fn ending_of(text: &str, now: &Session) -> Ending {
    /// The last session: its start, its end record, its last step and that step's memory.
    type Seen = (Session, Option<Ending>, Option<u64>, (Option<u64>, Option<u64>));
    let mut last: Option<Seen> = None;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match v.get("event").and_then(|e| e.as_str()) {
            Some("session") => {
                if let Ok(s) = serde_json::from_value::<Session>(v.clone()) {
                    last = Some((s, None, None, (None, None)));
                }
            }
            Some("end") => {
                if let Some(l) = last.as_mut() {
                    l.1 = Some(Ending::Recorded {
                        step: v["step"].as_u64().unwrap_or(0),
                        reason: v["reason"].as_str().unwrap_or("").to_string(),
                        detail: v["detail"].as_str().map(str::to_string),
                    });
                }
            }
            Some(_) => {}
            None => {
                if let (Some(l), Some(step)) = (last.as_mut(), v.get("step").and_then(|s| s.as_u64())) {
                    l.2 = Some(step);
                    l.3 = (v["memory_bytes"].as_u64(), v["host_peak_bytes"].as_u64());
                }
            }
        }
    }
    let Some((session, end, last_step, last_memory)) = last else { return Ending::Unknown };
    if let Some(e) = end {
        return e;
    }
    if session.alive(now) {
        return Ending::Running(session);
    }
    let cause = if session.boot_id.is_empty() || session.host != now.host {
        Cause::Unknown
    } else if session.boot_id != now.boot_id {
        Cause::Restarted
    } else {
        let rose = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if b > a => Some((a, b)),
            _ => None,
        };
        let (was, is) = (session.oom_kills, now.oom_kills);
        if let Some((before, after)) = rose(was.cgroup, is.cgroup) {
            Cause::OomKiller { before, after }
        } else if let Some((before, after)) = rose(was.machine, is.machine) {
            Cause::MachineOomKiller { before, after }
        } else if was.cgroup.is_some() || was.machine.is_some() {
            Cause::NotOomKiller
        } else {
            Cause::Unknown
        }
    };
    Ending::Unrecorded { session, last_step, last_memory, cause }
}

/// How the last session of the log at `metrics` ended, seen from this process (Unknown when
/// there is no log).
pub fn ending(metrics: &Path) -> Ending {
    match std::fs::read(metrics) {
        Ok(bytes) => ending_of(&String::from_utf8_lossy(&bytes), &Session::now(0)),
        Err(_) => Ending::Unknown,
    }
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// What to do about a memory kill.
pub const MEMORY_FIX: &str = "lower training.batch_size (keep the effective batch with gradient_accumulation_steps) or training.num_workers, or give the job more memory; `lorahost doctor --config C` predicts the host's and the device's peak before a run (F13)";

impl Ending {
    /// Whether the session was killed by the OOM killer (as far as the counters tell).
    pub fn oom_killed(&self) -> bool {
        matches!(self, Ending::Unrecorded { cause: Cause::OomKiller { .. }, .. })
    }

    /// One paragraph for a person, or None when there is nothing to say (recorded, unknown).
    pub fn describe(&self) -> Option<String> {
        let Ending::Unrecorded { session, last_step, last_memory, cause } = self else { return None };
        let when = last_step.map_or_else(
            || format!("before its first step (it started at step {})", session.step),
            |s| format!("after step {s}"),
        );
        let memory = match last_memory {
            (Some(m), Some(rss)) => format!(
                " (its last step record: {} on the device, {} resident on the host)",
                gib(*m),
                gib(*rss)
            ),
            (Some(m), None) => format!(" (its last step record: peak memory {})", gib(*m)),
            _ => String::new(),
        };
        let limit = match (session.memory_limit_bytes, session.host_memory_bytes) {
            (Some(l), _) => format!("the cgroup's limit is {}", gib(l)),
            (None, Some(h)) => format!("the machine has {}", gib(h)),
            _ => "the limit is not known".into(),
        };
        let why = match cause {
            Cause::OomKiller { before, after } => format!(
                "It was killed by the kernel's OOM killer: the memory cgroup it ran in counted {} OOM kill(s) since it started (oom_kill {before} -> {after}); {limit}. Fix: {MEMORY_FIX}.",
                after - before
            ),
            Cause::MachineOomKiller { before, after } => format!(
                "The machine's OOM killer killed {} process(es) after it started (/proc/vmstat oom_kill {before} -> {after}), most likely this one (exit status 137); {limit}. Fix: {MEMORY_FIX}.",
                after - before
            ),
            Cause::NotOomKiller => "The OOM killer's counters did not change since it started, so something else ended it: a SIGKILL (kill -9, a job scheduler's time limit, a second Ctrl-C quits at once too) or a crash (its message is on that run's stderr).".into(),
            Cause::Restarted => "The machine restarted since it started (another boot id): a reboot, or a preempted or lost instance.".into(),
            Cause::Unknown => format!(
                "This machine cannot tell why{}.",
                if session.host.is_empty() { String::new() } else { format!(" (the session ran on {})", session.host) }
            ),
        };
        Some(format!(
            "the last session of this run (process {} on {}) ended without a record {when}{memory}: it was killed or crashed. {why}",
            session.pid,
            if session.host.is_empty() { "an unnamed host" } else { &session.host },
        ))
    }
}

/// Host memory as the OOM killer sees it, read once per optimizer step by [`MemoryWatch`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostMemory {
    /// This process's resident memory (`VmRSS`).
    pub rss: u64,
    /// Its peak so far (`VmHWM`).
    pub peak: u64,
    /// The memory cgroup's limit, when it has one.
    pub limit: Option<u64>,
    /// The machine's available memory (`MemAvailable`: free plus reclaimable).
    pub available: Option<u64>,
    /// The machine's memory (`MemTotal`).
    pub total: Option<u64>,
}

impl HostMemory {
    /// Now (Linux; zeros and Nones elsewhere). `limit` is the session's cgroup limit.
    pub fn now(limit: Option<u64>) -> Self {
        let kib = |text: &Option<String>, key: &str| {
            text.as_deref().and_then(|t| counter(&t.replace(':', ""), key)).map(|kb| kb * 1024)
        };
        let status = read("/proc/self/status");
        let meminfo = read("/proc/meminfo");
        HostMemory {
            rss: kib(&status, "VmRSS").unwrap_or(0),
            peak: kib(&status, "VmHWM").unwrap_or(0),
            limit,
            available: kib(&meminfo, "MemAvailable"),
            total: kib(&meminfo, "MemTotal"),
        }
    }
}

/// Warns once per run when the host's memory is close to running out, before the OOM killer
/// ends the run without a word: the process holds [`MemoryWatch::SHARE`] of its cgroup's
/// limit, or the machine has less than [`MemoryWatch::SPARE`] of its memory available.
#[derive(Debug, Default)]
pub struct MemoryWatch {
    warned: bool,
}

impl MemoryWatch {
    /// The share of the cgroup's limit the process may hold before the warning.
    pub const SHARE: f64 = 0.85;
    /// The share of the machine's memory that must stay available.
    pub const SPARE: f64 = 0.05;

    /// The warning for `m`, the first time it is due.
    pub fn observe(&mut self, m: &HostMemory) -> Option<String> {
        if self.warned || m.rss == 0 {
            return None;
        }
        let why = match (m.limit, m.available, m.total) {
            (Some(l), _, _) if m.rss as f64 >= Self::SHARE * l as f64 => format!(
                "this process holds {} of its memory cgroup's {} limit ({:.0}%)",
                gib(m.rss),
                gib(l),
                100.0 * m.rss as f64 / l as f64
            ),
            (_, Some(a), Some(t)) if (a as f64) < Self::SPARE * t as f64 => format!(
                "the machine has {} of its {} available (this process holds {})",
                gib(a),
                gib(t),
                gib(m.rss)
            ),
            _ => return None,
        };
        self.warned = true;
        Some(format!(
            "host memory is nearly exhausted: {why}; when it runs out the kernel's OOM killer ends the run without a word (exit 137). Fix: {MEMORY_FIX}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(host: &str, boot: &str, cgroup: Option<u64>, machine: Option<u64>) -> Session {
        Session {
            pid: 4_000_000,
            host: host.into(),
            boot_id: boot.into(),
            proc_start: 77,
            oom_kills: OomCounters { cgroup, machine },
            memory_limit_bytes: Some(24 << 30),
            ..Default::default()
        }
    }

    fn log(start: &Session, rest: &[&str]) -> String {
        let mut lines = vec![r#"{"run":{"total_steps":9}}"#.to_string(), start.record()];
        lines.extend(rest.iter().map(|s| s.to_string()));
        lines.join("\n")
    }

    #[test]
    fn counters_are_read_from_the_kernels_files() {
        assert_eq!(
            counter("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n", "oom_kill"),
            Some(2)
        );
        assert_eq!(counter("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n", "oom_kill"), Some(5));
        assert_eq!(counter("nr_free_pages 1\n", "oom_kill"), None);
        let stat = "1234 (lora host) (x)) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1 1";
        assert_eq!(start_ticks(stat), Some(98765));
        assert_eq!(process_state(stat), Some('S'));
        let v2 = cgroup_dirs("0::/user.slice/job-7\n");
        assert_eq!(v2[0], (PathBuf::from("/sys/fs/cgroup/user.slice/job-7"), true));
        let v1 = cgroup_dirs("5:devices:/\n4:memory:/process_api/ab\n0::/\n");
        assert_eq!(v1[0], (PathBuf::from("/sys/fs/cgroup/memory/process_api/ab"), false));
        // This machine answers for itself (the fields the records need are readable on Linux).
        let me = Session::now(3);
        assert_eq!((me.step, me.pid), (3, std::process::id()));
        if cfg!(target_os = "linux") {
            assert!(!me.boot_id.is_empty() && me.proc_start > 0, "{me:?}");
            assert!(me.oom_kills.machine.is_some(), "{me:?}");
        }
    }

    #[test]
    fn an_ending_is_read_from_the_last_session() {
        let start = at("gpu1", "b1", Some(0), Some(8));
        let step = r#"{"step":4,"loss":1.0,"memory_bytes":21474836480}"#;
        let now = at("gpu1", "b1", Some(1), Some(9));
        // Recorded: the end record wins whatever the counters say.
        let done = log(&start, &[step, &end_record(4, "completed", None)]);
        assert!(
            matches!(ending_of(&done, &now), Ending::Recorded { step: 4, ref reason, .. } if reason == "completed")
        );
        // A later session without an end: its own ending, with the cgroup's kill.
        let later = format!("{done}\n{}\n{step}", Session { step: 4, ..start.clone() }.record());
        let e = ending_of(&later, &now);
        assert!(e.oom_killed(), "{e:?}");
        let text = e.describe().unwrap();
        assert!(
            text.contains("after step 4") && text.contains("OOM killer") && text.contains("20.0 GiB"),
            "{text}"
        );
        assert!(
            text.contains("oom_kill 0 -> 1") && text.contains("24.0 GiB") && text.contains("batch_size"),
            "{text}"
        );
        // Only the machine's counter rose.
        let e = ending_of(&log(&start, &[step]), &at("gpu1", "b1", Some(0), Some(9)));
        assert!(
            matches!(e, Ending::Unrecorded { cause: Cause::MachineOomKiller { before: 8, after: 9 }, .. }),
            "{e:?}"
        );
        // Neither: not the OOM killer.
        let e = ending_of(&log(&start, &[step]), &at("gpu1", "b1", Some(0), Some(8)));
        assert!(matches!(e, Ending::Unrecorded { cause: Cause::NotOomKiller, .. }), "{e:?}");
        assert!(e.describe().unwrap().contains("SIGKILL"));
        // Another boot, another machine, before the first step.
        let e = ending_of(&log(&start, &[]), &at("gpu1", "b2", Some(0), Some(0)));
        assert!(matches!(e, Ending::Unrecorded { cause: Cause::Restarted, last_step: None, .. }), "{e:?}");
        assert!(e.describe().unwrap().contains("before its first step"));
        let e = ending_of(&log(&start, &[step]), &at("laptop", "b9", Some(5), Some(50)));
        assert!(matches!(e, Ending::Unrecorded { cause: Cause::Unknown, .. }), "{e:?}");
        // No session records at all.
        assert_eq!(ending_of(&format!("{step}\n{step}"), &now), Ending::Unknown);
        assert!(Ending::Unknown.describe().is_none());
    }

    #[test]
    fn host_memory_near_its_limit_is_warned_about_once() {
        let gb = 1u64 << 30;
        let mut w = MemoryWatch::default();
        let roomy = HostMemory {
            rss: 10 * gb,
            peak: 10 * gb,
            limit: Some(24 * gb),
            available: Some(12 * gb),
            total: Some(64 * gb),
        };
        assert_eq!(w.observe(&roomy), None);
        // 21 of 24 GiB of the cgroup's limit: 87.5%.
        let near = HostMemory { rss: 21 * gb, ..roomy };
        let text = w.observe(&near).unwrap();
        assert!(
            text.contains("21.0 GiB of its memory cgroup's 24.0 GiB limit (88%)")
                && text.contains("exit 137"),
            "{text}"
        );
        assert_eq!(w.observe(&near), None, "once per run");
        // No cgroup limit: the machine's available memory.
        let mut w = MemoryWatch::default();
        let machine = HostMemory {
            rss: 50 * gb,
            peak: 50 * gb,
            limit: None,
            available: Some(2 * gb),
            total: Some(64 * gb),
        };
        assert!(w.observe(&machine).unwrap().contains("2.0 GiB of its 64.0 GiB available"));
        let mut w = MemoryWatch::default();
        assert_eq!(w.observe(&HostMemory { available: Some(8 * gb), ..machine }), None);
        // What this machine reads.
        let me = HostMemory::now(None);
        if cfg!(target_os = "linux") {
            assert!(
                me.rss > 0 && me.peak >= me.rss && me.total.is_some() && me.available.is_some(),
                "{me:?}"
            );
        }
    }

    #[test]
    fn a_live_process_is_told_from_one_that_reused_its_pid() {
        // The test's own parent (cargo's test runner is this process; its parent is alive).
        let me = Session::now(0);
        if !cfg!(target_os = "linux") || me.proc_start == 0 {
            return;
        }
        let parent: u32 = read("/proc/self/stat")
            .and_then(|s| {
                s[s.rfind(')').unwrap() + 1..].split_whitespace().nth(1).and_then(|p| p.parse().ok())
            })
            .unwrap();
        let parent_start = read(format!("/proc/{parent}/stat")).as_deref().and_then(start_ticks).unwrap();
        let live = Session { pid: parent, proc_start: parent_start, ..me.clone() };
        let text = log(&live, &[]);
        assert!(matches!(ending_of(&text, &me), Ending::Running(_)));
        // The same pid with another start time: a process that reused the pid.
        let reused = Session { proc_start: parent_start + 1, ..live.clone() };
        assert!(matches!(ending_of(&log(&reused, &[]), &me), Ending::Unrecorded { .. }));
        // This process's own earlier session is not a running one.
        assert!(matches!(ending_of(&log(&me, &[]), &me), Ending::Unrecorded { .. }));
    }
}
