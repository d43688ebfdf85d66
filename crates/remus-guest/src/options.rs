//! Numeric `--name VALUE` / `--name=VALUE` options, shared by the
//! workloads (each new workload adds its options here, not a parser).

/// Parses `args` into the named options; unknown names, missing or
/// non-numeric values are errors naming the argument.
pub fn parse_u64(args: &[String], options: &mut [(&str, &mut u64)]) -> Result<(), String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (key, val) = match arg.split_once('=') {
            Some((k, v)) => (k, v),
            None => (
                arg.as_str(),
                it.next()
                    .ok_or_else(|| format!("{arg} needs a value"))?
                    .as_str(),
            ),
        };
        let slot = options
            .iter_mut()
            .find(|(name, _)| *name == key)
            .ok_or_else(|| format!("unexpected argument '{arg}'"))?;
        *slot.1 = val.parse().map_err(|_| format!("bad {key} '{val}'"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_u64;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn both_spellings_and_errors() {
        let (mut a, mut b) = (1, 2);
        parse_u64(
            &s(&["--a", "5", "--b=6"]),
            &mut [("--a", &mut a), ("--b", &mut b)],
        )
        .unwrap();
        assert_eq!((a, b), (5, 6));
        let e = parse_u64(&s(&["--a"]), &mut [("--a", &mut a)]).unwrap_err();
        assert!(e.contains("needs a value"), "{e}");
        let e = parse_u64(&s(&["--a", "x"]), &mut [("--a", &mut a)]).unwrap_err();
        assert!(e.contains("bad --a 'x'"), "{e}");
        let e = parse_u64(&s(&["--c", "1"]), &mut [("--a", &mut a)]).unwrap_err();
        assert!(e.contains("unexpected argument '--c'"), "{e}");
    }
}
