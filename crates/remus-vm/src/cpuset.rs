//! xl-style CPU lists: `all`, `3`, `0-2,5`.

/// Parses a CPU list into sorted, deduplicated CPU numbers; `all` gives
/// every CPU in `0..ncpus`.
pub fn parse_cpus(s: &str, ncpus: usize) -> Result<Vec<usize>, String> {
    let s = s.trim();
    if s == "all" {
        return Ok((0..ncpus).collect());
    }
    if s.is_empty() {
        return Err("empty CPU list".into());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a, s)?, num(b, s)?),
            None => {
                let n = num(part, s)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("'{part}' in '{s}': range goes backwards"));
        }
        if hi >= ncpus {
            return Err(format!(
                "CPU {hi} in '{s}' does not exist (this host has CPUs 0-{})",
                ncpus.saturating_sub(1)
            ));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn num(x: &str, whole: &str) -> Result<usize, String> {
    x.trim()
        .parse()
        .map_err(|_| format!("'{x}' in '{whole}' is not a CPU number (want e.g. 0-2,5 or all)"))
}

/// Parses the vCPU argument: a number or `all`.
pub fn parse_vcpus(s: &str, nvcpus: u32) -> Result<Vec<u32>, String> {
    if s == "all" {
        return Ok((0..nvcpus).collect());
    }
    let v: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a vCPU number or 'all'"))?;
    if v >= nvcpus {
        return Err(format!(
            "vCPU {v} does not exist (the VM has vCPUs 0-{})",
            nvcpus.saturating_sub(1)
        ));
    }
    Ok(vec![v])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(parse_cpus("all", 2).unwrap(), vec![0, 1]);
        assert_eq!(parse_cpus("1", 2).unwrap(), vec![1]);
        assert_eq!(parse_cpus("0-2,5,1", 8).unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("2", 2).unwrap_err().contains("does not exist"));
        assert!(parse_cpus("3-1", 8).unwrap_err().contains("backwards"));
        assert!(parse_cpus("x", 8).unwrap_err().contains("not a CPU number"));
        assert!(parse_cpus("", 8).is_err());
        assert_eq!(parse_vcpus("all", 3).unwrap(), vec![0, 1, 2]);
        assert!(parse_vcpus("3", 3).is_err());
        assert!(parse_vcpus("-1", 3).is_err());
    }
}
