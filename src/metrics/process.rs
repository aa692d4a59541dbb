//! Standard Prometheus process metrics, read from `/proc/self` at scrape time (Linux).
//!
//! The names and types follow the Prometheus client libraries' process collector, so existing
//! dashboards and alerts for `process_*` work unchanged. They are rendered as text and appended
//! to the exporter's output because `metrics` counters are integers, and CPU seconds are not.

use std::fmt::Write;

/// Clock ticks per second of `/proc` times; 100 on every Linux platform we run on.
const TICKS_PER_SECOND: f64 = 100.0;

/// The process metrics in Prometheus text format; empty where `/proc` is not available.
pub fn render() -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name: utime is the 12th, stime the 13th,
        // num_threads the 18th, starttime the 20th.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let cpu = (num(11) + num(12)) / TICKS_PER_SECOND;
            metric(
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                cpu,
            );
            metric(
                "process_threads",
                "gauge",
                "Number of OS threads in the process.",
                num(17),
            );
            if let Some(boot) = boot_time() {
                let start = boot + num(19) / TICKS_PER_SECOND;
                metric(
                    "process_start_time_seconds",
                    "gauge",
                    "Start time of the process since unix epoch in seconds.",
                    start,
                );
            }
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
        {
            metric(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                kb * 1024.0,
            );
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count() as f64,
        );
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(soft) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
        {
            metric(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                soft,
            );
        }
    }
    if let Some(heap) = crate::heap::stats() {
        metric(
            super::names::HEAP_IN_USE,
            "gauge",
            "Bytes the memory allocator has handed out and not taken back.",
            heap.in_use as f64,
        );
        metric(
            super::names::HEAP_HELD,
            "gauge",
            "Bytes the memory allocator holds from the operating system, in use or kept free for reuse.",
            heap.held as f64,
        );
    }
    out
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_the_standard_names() {
        let text = super::render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_threads",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing in {text}"
            );
        }
    }
}
