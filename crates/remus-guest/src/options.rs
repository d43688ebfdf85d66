//! Numeric `--name VALUE` / `--name=VALUE` options, shared by the
//! workloads (each new workload adds its options here, not a parser).

/// Parses `args` into the named options; unknown names, missing or
/// non-numeric values are errors naming the argument.
pub fn parse_u64(args: &[String], options: &mut [(&str, &mut u64)]) -> Result<(), String> {
    match parse(args, options, &mut [])?.first() {
        Some(extra) => Err(format!("unexpected argument '{extra}'")),
        None => Ok(()),
    }
}

/// Like [`parse_u64`], plus string-valued options (`strings`), and
/// positional arguments (anything not starting with `--`), which are
/// returned in order.
pub fn parse(
    args: &[String],
    numbers: &mut [(&str, &mut u64)],
    strings: &mut [(&str, &mut String)],
) -> Result<Vec<String>, String> {
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if !arg.starts_with("--") {
            positional.push(arg.clone());
            continue;
        }
        let (key, val) = match arg.split_once('=') {
            Some((k, v)) => (k, v),
            None => (
                arg.as_str(),
                it.next()
                    .ok_or_else(|| format!("{arg} needs a value"))?
                    .as_str(),
            ),
        };
        if let Some(slot) = numbers.iter_mut().find(|(name, _)| *name == key) {
            *slot.1 = val.parse().map_err(|_| format!("bad {key} '{val}'"))?;
        } else if let Some(slot) = strings.iter_mut().find(|(name, _)| *name == key) {
            *slot.1 = val.to_string();
        } else {
            return Err(format!("unexpected argument '{arg}'"));
        }
    }
    Ok(positional)
}

#[cfg(test)]
mod tests {
    use super::{parse, parse_u64};

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

    #[test]
    fn strings_and_positionals() {
        let mut n = 1;
        let mut dir = "/mnt".to_string();
        let pos = parse(
            &s(&["/dev/vda", "--dir", "/x", "--n=3", "extra"]),
            &mut [("--n", &mut n)],
            &mut [("--dir", &mut dir)],
        )
        .unwrap();
        assert_eq!(pos, s(&["/dev/vda", "extra"]));
        assert_eq!((n, dir.as_str()), (3, "/x"));
        let e = parse_u64(&s(&["x"]), &mut [("--a", &mut n)]).unwrap_err();
        assert!(e.contains("unexpected argument 'x'"), "{e}");
        let e = parse(&s(&["--dir"]), &mut [], &mut [("--dir", &mut dir)]).unwrap_err();
        assert!(e.contains("needs a value"), "{e}");
    }
}
