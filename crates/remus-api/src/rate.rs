//! Rate caps (`--max-rate RATE`) of the bulk transfers: a protection
//! session's initial copy and a migration's pre-copy. Shared by `remus`,
//! which parses a VM's cap, and `remusd`, which parses the host default
//! and checks what a request carries.

/// The least cap taken (256 KiB/s): a page of RAM then goes every 16 ms
/// and a 64 KiB disk chunk every 250 ms, well inside any silence timeout.
/// It also catches `--max-rate 50` meant as 50 MiB/s.
pub const MIN_RATE: u64 = 256 << 10;

/// What `RATE` means, for help texts and errors.
pub const RATE_SYNTAX: &str =
    "bytes per second, with K, M or G for KiB, MiB or GiB (50M, 1G, 800K); 0 for the host default";

/// Parses a rate cap: a whole number of bytes per second, with an
/// optional `K`, `M` or `G` (powers of 1024, as QEMU's and rsync's), or
/// `0` for none. A rate below [`MIN_RATE`] is refused.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, ' '),
    };
    let shift = match unit {
        ' ' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(format!("'{text}' is not a rate: {RATE_SYNTAX}")),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{text}' is not a rate: {RATE_SYNTAX}"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is too large a rate"))?;
    let rate = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large a rate"))?;
    check_rate(rate)?;
    Ok(rate)
}

/// Refuses a nonzero rate below [`MIN_RATE`].
pub fn check_rate(rate: u64) -> Result<(), String> {
    if rate != 0 && rate < MIN_RATE {
        return Err(format!(
            "{rate} bytes/s is below the least rate cap, {}K (256 KiB/s); the unit is bytes per second (50M is 50 MiB/s)",
            MIN_RATE >> 10
        ));
    }
    Ok(())
}

/// The cap a session runs with: the one asked for, or else the host's
/// default (`0` in either means none); `None` for no cap. A nonzero cap
/// below [`MIN_RATE`] is refused.
pub fn effective_rate(asked: u64, host_default: u64) -> Result<Option<u64>, String> {
    check_rate(asked)?;
    let rate = if asked != 0 { asked } else { host_default };
    check_rate(rate)?;
    Ok((rate != 0).then_some(rate))
}

/// A rate for people: `20 MiB/s`, `800 KiB/s`, `1.5 GiB/s`.
pub fn format_rate(rate: u64) -> String {
    let units = [(30, "GiB/s"), (20, "MiB/s"), (10, "KiB/s")];
    for (shift, unit) in units {
        if rate >= 1 << shift {
            let v = rate as f64 / (1u64 << shift) as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0} {unit}")
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{rate} B/s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_take_binary_units_in_either_case() {
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("800K"), Ok(800 << 10));
        assert_eq!(parse_rate("800k"), Ok(800 << 10));
        assert_eq!(parse_rate(" 20m "), Ok(20 << 20));
        assert_eq!(parse_rate("1048576"), Ok(1 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("0M"), Ok(0));
    }

    #[test]
    fn bad_rates_say_what_a_rate_is() {
        for bad in ["", "M", "fast", "50X", "5.5M", "-1M", "50MB", "1e9", "50 M"] {
            let e = parse_rate(bad).unwrap_err();
            assert!(
                e.contains("is not a rate") && e.contains("50M"),
                "{bad}: {e}"
            );
        }
        let e = parse_rate("99999999999G").unwrap_err();
        assert!(e.contains("too large"), "{e}");
        let e = parse_rate("99999999999999999999999").unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn a_rate_below_the_least_is_refused_with_the_unit() {
        let e = parse_rate("50").unwrap_err();
        assert!(e.contains("below the least") && e.contains("50M"), "{e}");
        assert!(parse_rate("255K").is_err());
        assert_eq!(parse_rate("256K"), Ok(MIN_RATE));
    }

    #[test]
    fn the_request_wins_over_the_host_default() {
        assert_eq!(effective_rate(0, 0), Ok(None));
        assert_eq!(effective_rate(0, 50 << 20), Ok(Some(50 << 20)));
        assert_eq!(effective_rate(20 << 20, 50 << 20), Ok(Some(20 << 20)));
        assert_eq!(effective_rate(20 << 20, 0), Ok(Some(20 << 20)));
        // From the API, not through the parser: still refused.
        assert!(effective_rate(100, 0).is_err());
    }

    #[test]
    fn requests_of_older_clients_carry_no_cap() {
        let p: crate::ProtectRequest =
            serde_json::from_str(r#"{"peer": "198.18.0.2:7001"}"#).unwrap();
        assert_eq!(p.max_rate, 0);
        let m: crate::MigrateRequest =
            serde_json::from_str(r#"{"peer": "198.18.0.2:7001"}"#).unwrap();
        assert_eq!(m.max_rate, 0);
        let m: crate::MigrateRequest =
            serde_json::from_str(r#"{"peer": "198.18.0.2:7001", "max_rate": 1048576}"#).unwrap();
        assert_eq!(m.max_rate, 1 << 20);
    }

    #[test]
    fn rates_read_in_binary_units() {
        assert_eq!(format_rate(20 << 20), "20 MiB/s");
        assert_eq!(format_rate(800 << 10), "800 KiB/s");
        assert_eq!(format_rate(3 << 29), "1.5 GiB/s");
        assert_eq!(format_rate(500), "500 B/s");
    }
}
