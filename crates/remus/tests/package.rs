//! The Debian package, installed as an operator would: `scripts/package.sh`
//! builds it, debootstrap makes a fresh Debian 12 tree (minbase with
//! systemd and man-db, as on a host), apt installs the package there with
//! its dependencies (QEMU from bookworm-backports), and the checks run
//! inside the tree: the files are where the unit and the agent expect
//! them, the unit is enabled and passes `systemd-analyze verify` (which
//! also looks up its man pages), and the installed `remusd --check` finds
//! its kernel, QEMU, preload library and config file with no build tree
//! in sight.
//!
//! Needs root and the network path to this machine's Debian mirror (as
//! `scripts/install-deps.sh` does); about a minute besides the release
//! build.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use remus_testbed::workspace_root;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `args` chrooted into `tree`, with /proc mounted there in a private
/// mount namespace (gone with the command, whatever happens).
fn in_tree(tree: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t proc proc \"$1/proc\" && t=$1 && shift && exec chroot \"$t\" \"$@\"")
        .arg("sh")
        .arg(tree)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C.UTF-8");
    cmd.output()
        .unwrap_or_else(|e| panic!("run {args:?} in the tree: {e}"))
}

fn in_tree_ok(tree: &Path, args: &[&str]) -> String {
    let out = in_tree(tree, args);
    assert!(
        out.status.success(),
        "{args:?} in the tree failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// The URI of this machine's apt source for bookworm main.
fn mirror() -> String {
    let out = run(Command::new("apt-get").args([
        "indextargets",
        "--format",
        "$(REPO_URI) $(RELEASE) $(COMPONENT) $(IDENTIFIER)",
    ]));
    stdout(&out)
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1..4) == Some(&["bookworm", "main", "Packages"][..])).then(|| f[0].to_string())
        })
        .expect("an apt source serving bookworm main (run apt-get update)")
}

#[test]
fn the_package_installs_on_a_fresh_debian_and_finds_its_files() {
    let root = workspace_root();
    let built = run(Command::new("bash")
        .arg(root.join("scripts/package.sh"))
        .current_dir(&root));
    let deb = PathBuf::from(
        stdout(&built)
            .lines()
            .last()
            .expect("the .deb's path")
            .trim(),
    );
    let deb = if deb.is_absolute() {
        deb
    } else {
        root.join(deb)
    };
    assert!(deb.is_file(), "{}", deb.display());

    let dir = tempfile::Builder::new()
        .prefix("remus-pkg")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tree = dir.path().join("root");
    let mirror = mirror();
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,man-db", "bookworm"])
        .arg(&tree)
        .arg(&mirror));
    std::fs::write(
        tree.join("etc/apt/sources.list.d/backports.sources"),
        format!(
            "Types: deb\nURIs: {mirror}\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )
    .unwrap();
    std::fs::copy(&deb, tree.join("tmp/remus.deb")).unwrap();
    in_tree_ok(&tree, &["apt-get", "update", "-qq"]);
    in_tree_ok(
        &tree,
        &[
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "/tmp/remus.deb",
        ],
    );

    // The files, where the unit and the agent look for them.
    let files = in_tree_ok(&tree, &["dpkg", "-L", "remus"]);
    for f in [
        "/usr/sbin/remusd",
        "/usr/bin/remus",
        "/usr/lib/remus/libremus_dirty_preload.so",
        "/usr/lib/systemd/system/remusd.service",
        "/etc/remus/remusd.toml",
        "/usr/share/man/man1/remus.1.gz",
        "/usr/share/man/man1/remus-protect.1.gz",
        "/usr/share/man/man5/remus.toml.5.gz",
        "/usr/share/man/man8/remusd.8.gz",
        "/usr/share/bash-completion/completions/remus",
        "/usr/share/zsh/vendor-completions/_remus",
        "/usr/share/fish/vendor_completions.d/remus.fish",
        "/usr/lib/ocf/resource.d/remus/vm",
    ] {
        assert!(files.lines().any(|l| l == f), "package lacks {f}:\n{files}");
    }
    // The resource agent runs where Pacemaker looks for it, with what the
    // package depends on.
    let meta = in_tree_ok(&tree, &["/usr/lib/ocf/resource.d/remus/vm", "meta-data"]);
    assert!(meta.contains("<resource-agent name=\"vm\""), "{meta}");
    let conffiles = in_tree_ok(&tree, &["dpkg-query", "-W", "-f=${Conffiles}", "remus"]);
    assert!(conffiles.contains("/etc/remus/remusd.toml"), "{conffiles}");

    // The unit: enabled, its ExecStart installed, and systemd finds
    // nothing wrong with it (man-db is in the tree, so the man: links of
    // Documentation= are checked as well).
    let unit = std::fs::read_to_string(tree.join("usr/lib/systemd/system/remusd.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let program = exec.split_whitespace().next().unwrap();
    let meta = std::fs::metadata(tree.join(program.trim_start_matches('/'))).unwrap();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
        "{program} is not executable"
    );
    assert!(
        unit.contains("Type=notify") && unit.contains("KillMode=process"),
        "{unit}"
    );
    assert!(
        tree.join("etc/systemd/system/multi-user.target.wants/remusd.service")
            .symlink_metadata()
            .is_ok(),
        "the unit is not enabled"
    );
    let verify = in_tree(
        &tree,
        &[
            "systemd-analyze",
            "verify",
            "/usr/lib/systemd/system/remusd.service",
        ],
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&verify.stderr)
    );
    for page in ["remusd", "remus", "remus.toml", "remus-protect"] {
        in_tree_ok(&tree, &["man", "-w", page]);
    }

    // The installed agent finds its library and config without a build
    // tree, and the CLI answers.
    let check = in_tree_ok(&tree, &["remusd", "--check"]);
    for want in [
        "settings  ok: config file /etc/remus/remusd.toml",
        "kernel    ok:",
        "qemu      ok:",
        "preload   ok: /usr/lib/remus/libremus_dirty_preload.so",
    ] {
        assert!(
            check.contains(want),
            "remusd --check lacks '{want}':\n{check}"
        );
    }
    let version = in_tree_ok(&tree, &["remus", "--version"]);
    assert!(version.starts_with("remus "), "{version}");
    let bash = in_tree_ok(&tree, &["remus", "completions", "bash"]);
    let shipped =
        std::fs::read_to_string(tree.join("usr/share/bash-completion/completions/remus")).unwrap();
    assert_eq!(bash, shipped, "the shipped completions are the CLI's own");
}
