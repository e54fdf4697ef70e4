//! Reading the server's CPU time and memory, and the kernel's socket memory, from /proc.
//!
//! The server is a process tree (granian forks workers, sockworker may one day): every figure
//! is summed over the pid given and all its live descendants.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second of /proc/PID/stat's utime and stime.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Fields of /proc/PID/stat after the command name: (ppid, utime + stime in ticks).
fn parse_stat(text: &str) -> Option<(u32, u64)> {
    // The command name is in parentheses and may contain spaces; fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15 (1-based in proc(5)).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// The pid given and every live descendant of it.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) {
                if let Some((ppid, _)) = parse_stat(&text) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    // Bounded: each pid is visited once, and /proc lists finitely many.
    while i < tree.len() && i < 100_000 {
        if let Some(kids) = children.get(&tree[i]) {
            tree.extend(kids.iter().copied());
        }
        i += 1;
    }
    tree
}

/// utime + stime of these processes (a tree from [`process_tree`]), in microseconds.
pub fn tree_cpu_us(pids: &[u32]) -> Option<u64> {
    let ticks = clock_ticks_per_sec();
    let mut total = 0u64;
    let mut found = false;
    for &pid in pids {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some((_, t)) = parse_stat(&text) {
                total += t;
                found = true;
            }
        }
    }
    found.then(|| total * 1_000_000 / ticks)
}

/// utime + stime of this process, in microseconds.
pub fn self_cpu_us() -> u64 {
    let ticks = clock_ticks_per_sec();
    fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat(&t))
        .map(|(_, t)| t * 1_000_000 / ticks)
        .unwrap_or(0)
}

/// Busy time of all CPUs together (/proc/stat: everything but idle and iowait), in microseconds.
pub fn system_busy_us() -> Option<u64> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line.split_ascii_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7).unwrap_or(&0);
    Some(busy * 1_000_000 / clock_ticks_per_sec())
}

/// VmRSS of these processes (a tree from [`process_tree`]), in KiB.
pub fn tree_rss_kib(pids: &[u32]) -> Option<u64> {
    let mut total = 0u64;
    let mut found = false;
    for &pid in pids {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("VmRSS:") {
                if let Some(kib) = v.split_ascii_whitespace().next().and_then(|n| n.parse::<u64>().ok()) {
                    total += kib;
                    found = true;
                }
            }
        }
    }
    found.then_some(total)
}

/// The TCP line of /proc/net/sockstat: sockets in use and memory in pages.
#[derive(Clone, Copy, Debug, Default)]
pub struct SockStat {
    pub tcp_inuse: u64,
    pub tcp_mem_pages: u64,
}

pub fn sockstat() -> SockStat {
    let mut s = SockStat::default();
    let Ok(text) = fs::read_to_string("/proc/net/sockstat") else {
        return s;
    };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("TCP:") else {
            continue;
        };
        let words: Vec<&str> = rest.split_ascii_whitespace().collect();
        for pair in words.chunks(2) {
            if let [key, value] = pair {
                let v = value.parse().unwrap_or(0);
                match *key {
                    "inuse" => s.tcp_inuse = v,
                    "mem" => s.tcp_mem_pages = v,
                    _ => {}
                }
            }
        }
    }
    s
}

/// The kernel's slab memory (/proc/meminfo `Slab:`), in KiB: socket structures live there.
pub fn slab_kib() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("Slab:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Raise this process's open-file limit as far as it goes, for idle runs with many sockets.
pub fn raise_nofile_limit(wanted: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur >= wanted {
        return lim.rlim_cur;
    }
    // Root may raise the hard limit too; anyone may raise the soft limit to the hard one.
    let raised = libc::rlimit { rlim_cur: wanted, rlim_max: wanted.max(lim.rlim_max) };
    // SAFETY: `raised` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return wanted;
    }
    let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: `soft` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
        return lim.rlim_max;
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let line = "123 (a b) c) S 7 1 1 0 -1 4194560 1 0 0 0 25 5 3 4 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(line), Some((7, 30)));
    }

    #[test]
    fn reads_own_figures() {
        let me = std::process::id();
        let tree = process_tree(me);
        assert!(tree.contains(&me));
        assert!(tree_rss_kib(&tree).unwrap_or(0) > 0);
        assert!(tree_cpu_us(&tree).is_some());
        assert!(sockstat().tcp_inuse < u64::MAX);
        assert!(slab_kib().unwrap_or(0) > 0);
        assert!(system_busy_us().is_some());
    }
}
