//! The guest's kernel command-line contract, parsed from `/proc/cmdline`:
//!
//! * `remus.workload=ITEM[,ITEM...]`: each ITEM is a `remus-guest` subcommand
//!   with its arguments joined by `:`, e.g. `tick`, `tick:--interval-ms:50`,
//!   `disk-probe:/dev/vda`. Absent: `tick`. Present but empty (or `none`):
//!   no workload. If given more than once, the last one wins (kernel style).
//! * `remus.ip=ADDR/PREFIX` is handled by `/init` (busybox `ip`), not here.

use std::process::{Command, Stdio};

pub const DEFAULT_WORKLOADS: &str = "tick";

/// One workload: argv for `remus-guest` (subcommand first).
pub type Workload = Vec<String>;

/// Value of the last `key=value` on the command line (surrounding quotes removed).
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v.trim_matches('"'))
        .next_back()
}

/// Parses `remus.workload=` into argv lists; checks each subcommand exists.
pub fn workloads(cmdline: &str) -> Result<Vec<Workload>, String> {
    let spec = param(cmdline, "remus.workload").unwrap_or(DEFAULT_WORKLOADS);
    if spec == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let argv: Workload = item.split(':').map(str::to_string).collect();
        let name = argv[0].as_str();
        if name == "start-workloads" || !crate::COMMANDS.iter().any(|c| c.name == name) {
            return Err(format!(
                "remus.workload: unknown workload '{name}' in '{item}'"
            ));
        }
        out.push(argv);
    }
    Ok(out)
}

/// `start-workloads [--cmdline FILE] [--dry-run]`: start every workload as a
/// background child (stdin /dev/null, stdout/stderr inherited, i.e. the
/// console when run from /init) and return without waiting for them.
pub fn start_workloads(args: &[String]) -> Result<(), String> {
    let mut file = "/proc/cmdline".to_string();
    let mut dry_run = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cmdline" => file = it.next().ok_or("--cmdline needs a file")?.clone(),
            "--dry-run" => dry_run = true,
            _ => return Err(format!("unexpected argument '{a}'")),
        }
    }
    let cmdline = std::fs::read_to_string(&file).map_err(|e| format!("read {file}: {e}"))?;
    let list = workloads(&cmdline)?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    for argv in list {
        let shown = argv.join(" ");
        if dry_run {
            println!("{shown}");
            continue;
        }
        match Command::new(&exe).args(&argv).stdin(Stdio::null()).spawn() {
            Ok(child) => eprintln!(
                "remus-guest: started workload '{shown}' (pid {})",
                child.id()
            ),
            Err(e) => eprintln!("remus-guest: cannot start workload '{shown}': {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&[&str]]) -> Vec<Workload> {
        items
            .iter()
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn default_is_tick() {
        assert_eq!(workloads("console=ttyS0 quiet\n").unwrap(), v(&[&["tick"]]));
    }

    #[test]
    fn items_and_args() {
        let c = "console=ttyS0 remus.workload=tick,disk-probe:/dev/vda remus.ip=198.18.0.2/24";
        assert_eq!(
            workloads(c).unwrap(),
            v(&[&["tick"], &["disk-probe", "/dev/vda"]])
        );
        assert_eq!(
            workloads("remus.workload=tick:--interval-ms:50").unwrap(),
            v(&[&["tick", "--interval-ms", "50"]])
        );
        assert_eq!(
            workloads("remus.workload=tick,dirty:--mb-per-s:50").unwrap(),
            v(&[&["tick"], &["dirty", "--mb-per-s", "50"]])
        );
    }

    #[test]
    fn last_wins_empty_and_none() {
        assert_eq!(
            workloads("remus.workload=disk-probe:/dev/vdb remus.workload=tick").unwrap(),
            v(&[&["tick"]])
        );
        assert!(workloads("remus.workload=").unwrap().is_empty());
        assert!(workloads("remus.workload=none").unwrap().is_empty());
        assert_eq!(
            workloads("remus.workload=\"tick\"").unwrap(),
            v(&[&["tick"]])
        );
    }

    #[test]
    fn unknown_is_an_error() {
        assert!(workloads("remus.workload=tick,bogus").is_err());
        assert!(workloads("remus.workload=start-workloads").is_err());
    }

    #[test]
    fn param_lookup() {
        assert_eq!(
            param("a=1 remus.ip=198.18.0.2/24 b", "remus.ip"),
            Some("198.18.0.2/24")
        );
        assert_eq!(param("a=1", "remus.ip"), None);
    }
}
