//! Finding and downloading the two Debian packages the image is made from.
//!
//! `apt-get download` puts `NAME_VERSION_ARCH.deb` (with `:` of an epoch
//! written `%3a`) into the cache directory; a package is downloaded only when
//! the .deb of apt's current candidate version is not there yet. Without apt
//! package lists (offline, fresh container) the newest cached .deb is used.

use crate::Reporter;
use crate::cmd;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The meta package whose `Depends:` names the real kernel package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// A .deb file in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deb {
    pub package: String,
    pub version: String,
    pub arch: String,
    pub path: PathBuf,
}

impl Deb {
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Splits `NAME_VERSION_ARCH.deb` (version with `%3a` for `:`).
pub fn parse_deb_file_name(name: &str) -> Option<(String, String, String)> {
    let stem = name.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (pkg, ver, arch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || pkg.is_empty() || ver.is_empty() || arch.is_empty() {
        return None;
    }
    let ver = ver.replace("%3a", ":").replace("%3A", ":");
    Some((pkg.to_string(), ver, arch.to_string()))
}

/// All cached .debs whose package name satisfies `want`, sorted by file name.
pub fn cached(cache: &Path, want: impl Fn(&str) -> bool) -> Result<Vec<Deb>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("read cache directory", cache)(e)),
    };
    for ent in rd {
        let ent = ent.map_err(Error::io("read cache directory", cache))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some((package, version, arch)) = parse_deb_file_name(&name)
            && want(&package)
        {
            out.push(Deb {
                package,
                version,
                arch,
                path: ent.path(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// What apt would install today, from one `apt-cache show` call (apt-cache
/// takes about a second per call on hosts without a pkgcache.bin).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    /// (real kernel package, version), from `linux-image-amd64`'s `Depends: X (= V)`.
    pub kernel: Option<(String, String)>,
    pub busybox: Option<String>,
}

/// Asks apt; fields are None where apt cannot tell (e.g. no package lists).
pub fn query_candidates() -> Candidates {
    let mut c = Command::new("apt-cache");
    c.args([
        "show",
        "--no-all-versions",
        KERNEL_META_PACKAGE,
        BUSYBOX_PACKAGE,
    ]);
    // Exits non-zero if any package is unknown; parse whatever was printed.
    let out = c.stdin(std::process::Stdio::null()).output();
    let mut cand = out
        .map(|o| parse_show(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default();
    // Depends without an exact version: ask for the candidate.
    if let Some((pkg, ver)) = &mut cand.kernel
        && ver.is_empty()
    {
        match candidate_version(pkg) {
            Some(v) => *ver = v,
            None => cand.kernel = None,
        }
    }
    cand
}

/// Parses `apt-cache show` stanzas of the meta package and busybox-static.
pub fn parse_show(out: &str) -> Candidates {
    let mut cand = Candidates::default();
    for stanza in out.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        match field("Package") {
            Some(KERNEL_META_PACKAGE) if cand.kernel.is_none() => {
                cand.kernel = field("Depends").and_then(parse_kernel_dep);
            }
            Some(BUSYBOX_PACKAGE) if cand.busybox.is_none() => {
                cand.busybox = field("Version").map(str::to_string);
            }
            _ => {}
        }
    }
    cand
}

/// `linux-image-6.1.0-56-amd64 (= 6.1.192-2), ...` → (package, version or "").
fn parse_kernel_dep(depends: &str) -> Option<(String, String)> {
    depends
        .split([',', '|'])
        .map(str::trim)
        .find(|d| is_kernel_image_package(d.split_whitespace().next().unwrap_or("")))
        .map(|d| {
            let pkg = d.split_whitespace().next().unwrap_or("").to_string();
            let ver = d
                .split_once("(=")
                .and_then(|(_, v)| v.split_once(')'))
                .map(|(v, _)| v.trim().to_string())
                .unwrap_or_default();
            (pkg, ver)
        })
}

/// apt's candidate version of `package`, or None (unknown / no lists).
pub fn candidate_version(package: &str) -> Option<String> {
    let out = cmd::stdout(Command::new("apt-cache").args(["policy", package])).ok()?;
    parse_candidate(&out)
}

pub fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

/// Newest of `debs` by Debian version order (`dpkg --compare-versions`).
fn newest(debs: Vec<Deb>) -> Option<Deb> {
    debs.into_iter().reduce(|best, d| {
        let gt = Command::new("dpkg")
            .args(["--compare-versions", &d.version, "gt", &best.version])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if gt { d } else { best }
    })
}

/// Makes sure the .deb of `package`'s candidate version is in `cache`.
fn ensure_exact(cache: &Path, package: &str, version: &str, rep: &Reporter) -> Result<Deb> {
    let find = || -> Result<Option<Deb>> {
        Ok(cached(cache, |p| p == package)?
            .into_iter()
            .find(|d| d.version == version))
    };
    if let Some(d) = find()? {
        rep.step(&format!("using cached {}", d.file_name()));
        return Ok(d);
    }
    std::fs::create_dir_all(cache).map_err(Error::io("create cache directory", cache))?;
    rep.step(&format!(
        "downloading {package}={version} into {}",
        cache.display()
    ));
    cmd::output(
        Command::new("apt-get")
            .arg("download")
            .arg(format!("{package}={version}"))
            .current_dir(cache),
    )?;
    find()?.ok_or_else(|| Error::DebMissingAfterDownload {
        package: package.to_string(),
        cache: cache.to_path_buf(),
    })
}

/// The newest cached .deb among those `want` accepts (offline fallback).
fn offline(
    cache: &Path,
    package: &str,
    want: impl Fn(&str) -> bool,
    rep: &Reporter,
) -> Result<Deb> {
    match newest(cached(cache, want)?) {
        Some(d) => {
            rep.step(&format!(
                "apt cannot resolve {package} (no package lists?); using cached {}",
                d.file_name()
            ));
            Ok(d)
        }
        None => Err(Error::AptListsMissing {
            package: package.to_string(),
            cache: cache.to_path_buf(),
        }),
    }
}

/// Is `name` a real amd64 kernel image package (not the meta package, not dbg)?
pub fn is_kernel_image_package(name: &str) -> bool {
    name.starts_with("linux-image-")
        && name.ends_with("-amd64")
        && name != KERNEL_META_PACKAGE
        && !name.contains("-dbg")
        && !name.contains("-unsigned")
        && name[12..].starts_with(|c: char| c.is_ascii_digit())
}

/// The kernel package's .deb, downloaded if needed.
pub fn ensure_kernel(cache: &Path, cand: &Candidates, rep: &Reporter) -> Result<Deb> {
    match &cand.kernel {
        Some((pkg, ver)) => {
            rep.step(&format!("{KERNEL_META_PACKAGE} -> {pkg} {ver}"));
            ensure_exact(cache, pkg, ver, rep)
        }
        None => offline(cache, KERNEL_META_PACKAGE, is_kernel_image_package, rep),
    }
}

/// The busybox-static .deb, downloaded if needed.
pub fn ensure_busybox(cache: &Path, cand: &Candidates, rep: &Reporter) -> Result<Deb> {
    match &cand.busybox {
        Some(ver) => ensure_exact(cache, BUSYBOX_PACKAGE, ver, rep),
        None => offline(cache, BUSYBOX_PACKAGE, |p| p == BUSYBOX_PACKAGE, rep),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_file_names() {
        assert_eq!(
            parse_deb_file_name("busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"),
            Some((
                "busybox-static".into(),
                "1:1.35.0-4+deb12u1+b1".into(),
                "amd64".into()
            ))
        );
        assert_eq!(
            parse_deb_file_name("linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"),
            Some((
                "linux-image-6.1.0-56-amd64".into(),
                "6.1.192-2".into(),
                "amd64".into()
            ))
        );
        assert_eq!(parse_deb_file_name("foo.deb"), None);
        assert_eq!(parse_deb_file_name("a_b_c_d.deb"), None);
        assert_eq!(parse_deb_file_name("a_b_c.tar"), None);
    }

    #[test]
    fn apt_cache_outputs() {
        let show = "Package: linux-image-amd64\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: x\n\n\
                    Package: busybox-static\nSource: busybox\nVersion: 1:1.35.0-4+deb12u1+b1\n";
        assert_eq!(
            parse_show(show),
            Candidates {
                kernel: Some(("linux-image-6.1.0-56-amd64".into(), "6.1.192-2".into())),
                busybox: Some("1:1.35.0-4+deb12u1+b1".into()),
            }
        );
        assert_eq!(parse_show("E: No packages found\n"), Candidates::default());
        assert_eq!(
            parse_kernel_dep("linux-image-6.1.0-9-amd64, foo"),
            Some(("linux-image-6.1.0-9-amd64".into(), String::new()))
        );
        let pol = "busybox-static:\n  Installed: (none)\n  Candidate: 1:1.35.0-4+deb12u1+b1\n";
        assert_eq!(
            parse_candidate(pol).as_deref(),
            Some("1:1.35.0-4+deb12u1+b1")
        );
        assert_eq!(
            parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
    }

    #[test]
    fn kernel_package_names() {
        assert!(is_kernel_image_package("linux-image-6.1.0-56-amd64"));
        assert!(!is_kernel_image_package("linux-image-amd64"));
        assert!(!is_kernel_image_package("linux-image-6.1.0-56-amd64-dbg"));
        assert!(!is_kernel_image_package("linux-image-cloud-amd64"));
    }
}
