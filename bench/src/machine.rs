//! What the run ran on: the machine, its load and the commit of vitals.

use std::{fs, path::Path, process::Command};

use crate::report::Machine;

/// The load average (1, 5 and 15 minutes) as /proc/loadavg says it.
pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The trimmed standard output of a shell command, empty if it failed.
fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine now, and the commit of the workspace vitals is built from.
pub(crate) fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let commit = sh(&format!(
        "cd '{}' && git rev-parse --short HEAD 2>/dev/null && (git status --porcelain -- src migrations proto Cargo.toml | grep -q . && echo '(with uncommitted changes)' || true)",
        root.display()
    ))
    .replace('\n', " ");
    Machine {
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kb / 1024.0 / 1024.0,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        loadavg_start: loadavg(),
        top_processes_start: sh(
            "ps -eo pcpu=,comm= --sort=-pcpu | head -n 6 | awk '{print $2\" \"$1\"%\"}' | paste -sd ';'",
        ),
        vitals_commit: if commit.is_empty() { "unknown".into() } else { commit },
        ..Machine::default()
    }
}
