//! remus-docgen: writes remus's man pages, shell completions and the
//! example `remusd.toml` into a directory, from the same definitions as
//! `--help` (the clap commands of `remus` and `remusd`) and as the VM
//! config parser (the serde structs of remus-config, through their JSON
//! schema): a flag or a config field documented in the code is documented
//! in the man page, and nothing else is.
//!
//! ```text
//! remus-docgen OUT
//!   OUT/man/remus.1, OUT/man/remus-SUBCOMMAND.1, OUT/man/remusd.8,
//!   OUT/man/remus.toml.5
//!   OUT/completions/{remus,remusd}.bash, _remus, _remusd, {remus,remusd}.fish
//!   OUT/remusd.toml
//! ```
//!
//! Used by `scripts/package.sh`; the pages are not committed.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use roff::{Roff, bold, italic, roman};
use serde_json::Value;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: remus-docgen OUT_DIR");
    };
    generate(Path::new(&out))
}

/// Writes everything under `out`.
fn generate(out: &Path) -> Result<()> {
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    remus_pages(&man)?;
    write(&man.join("remusd.8"), &remusd_page()?)?;
    write(&man.join("remus.toml.5"), &config_page()?)?;
    completions(&comp)?;
    write(
        &out.join("remusd.toml"),
        remus_agent::cli::example_config().as_bytes(),
    )?;
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

const SEE_ALSO_REMUS: &str = "remusd(8), remus.toml(5)";

/// remus(1) and a page per subcommand (remus-create(1), ...), as git
/// and cargo do.
fn remus_pages(dir: &Path) -> Result<()> {
    let mut cmd = remus_cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![(cmd.clone(), "1")];
    pages.extend(cmd.get_subcommands().map(|s| (s.clone(), "1")));
    for (c, section) in pages {
        let man = clap_mangen::Man::new(c).section(section).manual("remus");
        let mut page = Vec::new();
        man.render(&mut page)?;
        let see_also = if man.get_filename() == "remus.1" {
            SEE_ALSO_REMUS.to_string()
        } else {
            format!("remus(1), {SEE_ALSO_REMUS}")
        };
        page.extend(see_also_section(&see_also).as_bytes());
        write(&dir.join(man.get_filename()), &page)?;
    }
    Ok(())
}

fn see_also_section(refs: &str) -> String {
    let mut r = Roff::new();
    r.control("SH", ["SEE ALSO"]).text([roman(refs)]);
    r.to_roff()
}

/// remusd(8): the flags, then where its settings, state and logs live.
fn remusd_page() -> Result<Vec<u8>> {
    let cmd = remus_agent::Args::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .section("8")
        .manual("remus")
        .render(&mut page)?;
    let mut r = Roff::new();
    r.control("SH", ["CONFIGURATION FILE"])
        .text([
            roman("Every flag can be set in "),
            bold(remus_agent::cli::DEFAULT_CONFIG),
            roman(" (or the file given with "),
            bold("--config"),
            roman("), a TOML file whose keys are the flags' long names without the dashes in front, with the values the flags take: "),
            italic("listen = \"198.18.0.1:7001\""),
            roman(", "),
            italic("al-extents = 2048"),
            roman(", "),
            italic("arbiter = [\"https://etcd1:2379\", \"https://etcd2:2379\"]"),
            roman(". A flag on the command line (or its environment variable) overrides the file; the file overrides the defaults. An unknown key or a bad value is refused at start with the key named. The package installs the file with every setting commented out."),
        ])
        .control("SH", ["FILES"])
        .control("TP", [])
        .text([bold(remus_agent::cli::DEFAULT_CONFIG)])
        .text([roman("The settings (see above).")])
        .control("TP", [])
        .text([bold("/var/lib/remus/vms/NAME/")])
        .text([roman("A running VM's files: its QMP, console, disk and NIC sockets, qemu.log and console.log (each kept to 2 MiB plus three rotated parts, as virtlogd does).")])
        .control("TP", [])
        .text([bold("/var/lib/remus/copies/NAME/")])
        .text([roman("The replication record of a protected VM's copy on this host (its generations and change maps); it outlives the VM, so that a resync copies only changed blocks.")])
        .control("TP", [])
        .text([bold("/var/lib/remus/logs/")])
        .text([roman("Logs of VMs that are gone.")])
        .control("TP", [])
        .text([bold("/usr/lib/remus/libremus_dirty_preload.so")])
        .text([roman("The dirty-page tracking library loaded into every QEMU (see --preload).")])
        .control("SH", ["ENVIRONMENT"])
        .control("TP", [])
        .text([bold("RUST_LOG")])
        .text([roman("Log filter, overriding --log.")])
        .control("TP", [])
        .text([bold("REMUS_SOCKET")])
        .text([roman("The API socket, as --socket.")])
        .control("SH", ["SIGNALS"])
        .text([roman("SIGTERM or SIGINT stop the agent and the VMs it runs: the agent carries their disk and network I/O. A protected VM then fails over to its backup; its copy here is listed stale when the agent starts again.")])
        .control("SH", ["EXIT STATUS"])
        .text([roman("0 after a clean stop (or a passing --check), 1 when the host or the settings do not allow the agent to run (the reason is printed), 2 for a bad command line or config file.")]);
    page.extend(r.to_roff().as_bytes());
    page.extend(see_also_section("remus(1), remus.toml(5), systemd.service(5)").as_bytes());
    Ok(page)
}

/// remus.toml(5): every field of a VM config, from the config structs'
/// schema (names, types, defaults and doc comments).
fn config_page() -> Result<Vec<u8>> {
    let schema = serde_json::to_value(schemars::schema_for!(remus_config::VmConfig))?;
    let defs = schema["$defs"].clone();
    let mut r = Roff::new();
    r.control("TH", ["REMUS.TOML", "5", "", "remus", "remus"])
        .control("SH", ["NAME"])
        .text([roman("remus.toml - the configuration of a remus VM")])
        .control("SH", ["SYNOPSIS"])
        .text([italic("VM"), roman(".toml, given to "), bold("remus create")])
        .control("SH", ["DESCRIPTION"])
        .text([roman(
            "A VM is described by a TOML file in the spirit of xl.cfg(5): top-level keys for the machine, a [[disk]] table per disk and a [[vif]] table per network interface. Relative paths are relative to the file. Unknown keys are refused. ",
        ), bold("remus create --dry-run"), roman(" checks a file without starting anything; every mistake is reported with its field, e.g. disk[0].target.")])
        .control("SH", ["SETTINGS"]);
    fields(&mut r, &schema, &defs)?;
    for (table, def) in [("[[disk]]", "DiskConfig"), ("[[vif]]", "VifConfig")] {
        let d = &defs[def];
        r.control("SH", [table]);
        if let Some(desc) = d["description"].as_str() {
            r.text([roman(one_paragraph(desc))]);
        }
        fields(&mut r, d, &defs)?;
    }
    r.control("SH", ["EXAMPLE"])
        .control("nf", [])
        .text([roman(EXAMPLE)])
        .control("fi", []);
    let mut page = r.to_roff().into_bytes();
    page.extend(see_also_section("remus(1), remus-create(1), remusd(8), xl.cfg(5)").as_bytes());
    Ok(page)
}

const EXAMPLE: &str = r#"name = "web"
memory = 2048
vcpus = 2
machine = "q35"

[[disk]]
path = "/var/lib/remus/images/web.qcow2"
format = "qcow2"
target = "vda"

[[vif]]
bridge = "br0"
mac = "52:54:00:12:34:56""#;

/// One `.TP` entry per property of `obj`, in declaration order.
fn fields(r: &mut Roff, obj: &Value, defs: &Value) -> Result<()> {
    let required: Vec<&str> = obj["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = obj["properties"].as_object() else {
        bail!("schema without properties: {obj}");
    };
    for (key, p) in props {
        // Arrays of tables are documented in sections of their own.
        if p["type"] == "array" && p["items"]["$ref"].is_string() {
            continue;
        }
        let target = resolve(p, defs);
        r.control("TP", []).text([
            bold(key.as_str()),
            roman(" = "),
            italic(type_name(p, &target)),
        ]);
        let mut text = String::new();
        if let Some(d) = p["description"].as_str() {
            text.push_str(&one_paragraph(d));
        }
        if required.contains(&key.as_str()) {
            text.push_str(" Required.");
        } else if let Some(d) = p.get("default") {
            text.push_str(&format!(" Default: {d}."));
        }
        r.text([roman(text.trim())]);
        if let Some(variants) = target["oneOf"].as_array() {
            for v in variants {
                if let (Some(c), Some(d)) = (v["const"].as_str(), v["description"].as_str()) {
                    r.control("RS", [])
                        .control("TP", [])
                        .text([bold(format!("\"{c}\""))])
                        .text([roman(one_paragraph(d))])
                        .control("RE", []);
                }
            }
        }
    }
    Ok(())
}

/// The schema a `$ref` points at (or the property itself); an optional
/// value (`anyOf` with `null`) is its non-null alternative.
fn resolve(p: &Value, defs: &Value) -> Value {
    if let Some(alts) = p["anyOf"].as_array()
        && let Some(some) = alts.iter().find(|a| a["type"] != "null")
    {
        return resolve(some, defs);
    }
    match p["$ref"].as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => defs[name].clone(),
        None => p.clone(),
    }
}

fn type_name(p: &Value, target: &Value) -> String {
    if let Some(values) = target["enum"].as_array() {
        return values
            .iter()
            .filter_map(Value::as_str)
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(" | ");
    }
    if let Some(variants) = target["oneOf"].as_array() {
        return variants
            .iter()
            .filter_map(|v| v["const"].as_str())
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let t = match &target["type"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("value")
            .to_string(),
        _ => "value".into(),
    };
    match (t.as_str(), p["format"].as_str()) {
        ("integer", _) => "integer".into(),
        ("string", _) if target["pattern"].is_string() => "string (MAC address)".into(),
        _ => t,
    }
}

/// A doc comment's lines as one paragraph, without Markdown's code ticks.
fn one_paragraph(doc: &str) -> String {
    doc.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('`', "")
}

/// bash, zsh and fish completions for both commands.
fn completions(dir: &Path) -> Result<()> {
    use clap_complete::Shell;
    let commands = [
        ("remus", remus_cli::Cli::command()),
        ("remusd", remus_agent::Args::command()),
    ];
    for (name, cmd) in commands {
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut out);
            let mut f = std::fs::File::create(dir.join(&file))
                .with_context(|| format!("create {}", dir.join(&file).display()))?;
            f.write_all(&out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page is generated and says what its definitions say: each
    /// flag of remusd and each field of the VM config appears in its page.
    #[test]
    fn pages_cover_every_flag_and_field() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        let remusd = read("man/remusd.8");
        for arg in remus_agent::Args::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    remusd.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))),
                    "remusd.8 lacks --{long}"
                );
            }
        }
        let toml5 = read("man/remus.toml.5");
        for key in [
            "name",
            "memory",
            "vcpus",
            "kernel",
            "initrd",
            "cmdline",
            "accel",
            "machine",
            "firmware",
            "cpu",
            "arbiter",
            "path",
            "format",
            "target",
            "replicate",
            "readonly",
            "mac",
            "bridge",
        ] {
            assert!(
                toml5.contains(&format!("\\fB{key}\\fR")),
                "remus.toml.5 lacks {key}"
            );
        }
        // The enum values come with their own doc comments.
        assert!(toml5.contains("KVM when it really works"), "{toml5}");
        let remus = read("man/remus.1");
        assert!(remus.contains("remus\\-protect"), "subcommands listed");
        for sub in remus_cli::Cli::command().get_subcommands() {
            let page = format!("man/remus-{}.1", sub.get_name());
            assert!(dir.path().join(&page).is_file(), "{page}");
        }
        for f in [
            "remus.bash",
            "_remus",
            "remus.fish",
            "remusd.bash",
            "_remusd",
            "remusd.fish",
        ] {
            assert!(read(&format!("completions/{f}")).len() > 100, "{f}");
        }
        assert!(read("remusd.toml").contains("#state-dir = \"/var/lib/remus\""));
    }

    /// The schema the page comes from is read as the parser reads: a file
    /// that sets every field the schema names, with a value of the type it
    /// gives, parses (the parser refuses unknown keys, so a name schemars
    /// got wrong would fail here).
    #[test]
    fn the_schema_is_the_parser() {
        let schema = serde_json::to_value(schemars::schema_for!(remus_config::VmConfig)).unwrap();
        let defs = &schema["$defs"];
        let value = |key: &str, p: &Value| -> String {
            let t = resolve(p, defs);
            if let Some(v) = t["enum"].as_array() {
                return format!("{}", v[0]);
            }
            if let Some(v) = t["oneOf"].as_array() {
                return format!("\"{}\"", v[0]["const"].as_str().unwrap());
            }
            if t["pattern"].is_string() {
                return "\"52:54:00:00:00:01\"".into();
            }
            match type_name(p, &t).as_str() {
                "integer" => "64".into(),
                "boolean" => "true".into(),
                "string" if key == "name" => "\"x\"".into(),
                "string" if key == "target" => "\"vda\"".into(),
                "string" => "\"s\"".into(),
                other => panic!("{key}: no example for {other}"),
            }
        };
        let table = |obj: &Value| -> String {
            obj["properties"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, p)| p["type"] != "array")
                .map(|(k, p)| format!("{k} = {}\n", value(k, p)))
                .collect()
        };
        let text = format!(
            "{}[[disk]]\n{}[[vif]]\n{}",
            table(&schema),
            table(&defs["DiskConfig"]),
            table(&defs["VifConfig"])
        );
        let cfg: remus_config::VmConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!((cfg.disks.len(), cfg.vifs.len()), (1, 1), "{text}");
    }
}
