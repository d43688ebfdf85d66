//! `tick [--interval-ms N]`: print `tick 1`, `tick 2`, ... every N ms.
//!
//! The schedule is absolute (deadline += interval), so it does not drift. If
//! the process falls behind by whole intervals (e.g. the VM was paused), the
//! missed slots are skipped instead of printed in a burst; the counter keeps
//! counting lines actually printed, so it is gap-free.

use std::io::Write;
use std::time::{Duration, Instant};

pub fn run(args: &[String]) -> Result<(), String> {
    let interval = Duration::from_millis(parse_args(args)?);
    let stdout = std::io::stdout();
    let mut next = Instant::now();
    let mut n: u64 = 0;
    loop {
        n += 1;
        let mut out = stdout.lock();
        writeln!(out, "tick {n}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("write stdout: {e}"))?;
        drop(out);
        next += interval;
        let now = Instant::now();
        while next <= now {
            next += interval;
        }
        std::thread::sleep(next - now);
    }
}

fn parse_args(args: &[String]) -> Result<u64, String> {
    let mut interval_ms = 100u64;
    crate::options::parse_u64(args, &mut [("--interval-ms", &mut interval_ms)])?;
    if interval_ms == 0 {
        return Err("--interval-ms must be > 0".into());
    }
    Ok(interval_ms)
}

#[cfg(test)]
mod tests {
    use super::parse_args;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args() {
        assert_eq!(parse_args(&s(&[])), Ok(100));
        assert_eq!(parse_args(&s(&["--interval-ms", "250"])), Ok(250));
        assert_eq!(parse_args(&s(&["--interval-ms=7"])), Ok(7));
        assert!(parse_args(&s(&["--interval-ms", "0"])).is_err());
        assert!(parse_args(&s(&["--interval-ms"])).is_err());
        assert!(parse_args(&s(&["x"])).is_err());
    }
}
