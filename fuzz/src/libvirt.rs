//! `libvirt_xml`: [`from_libvirt_xml`] (`remus create --from-libvirt`) on
//! arbitrary UTF-8.
//!
//! Asserted for every domain it converts: the config is valid; it
//! round-trips through the TOML `--dry-run` prints; its name is the
//! domain's; its memory is exactly the domain's `<memory>` (in bytes, per
//! libvirt's units), not a truncation of it; every path was resolved
//! against the base directory.

use std::path::Path;

use remus_config::VmConfig;
use remus_config::libvirt::from_libvirt_xml;

pub fn run(data: &[u8]) {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/base");
    let conv = match from_libvirt_xml(xml, base) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let cfg = &conv.config;
    cfg.validate().expect("a converted config is valid");
    let doc = roxmltree::Document::parse(xml).expect("it parsed before");
    let dom = doc.root_element();
    let child = |name: &str| {
        dom.children()
            .find(|c| c.is_element() && c.tag_name().name() == name)
    };
    let name = child("name").and_then(|n| n.text()).map(str::trim);
    assert_eq!(name, Some(cfg.name.as_str()), "name");
    let memory = child("memory").expect("converted without <memory>");
    let value: u128 = memory
        .text()
        .unwrap_or("")
        .trim()
        .parse()
        .expect("converted a memory size that is not a number");
    let unit = memory.attribute("unit").unwrap_or("KiB");
    let bytes = value * unit_bytes(unit).expect("converted an unknown memory unit");
    assert_eq!(
        u128::from(cfg.memory) << 20,
        bytes,
        "<memory unit='{unit}'>{value}</memory> became {} MiB",
        cfg.memory
    );
    let paths = cfg
        .kernel
        .iter()
        .chain(cfg.initrd.iter())
        .chain(cfg.disks.iter().map(|d| &d.path));
    for p in paths {
        assert!(p.is_absolute(), "{} left relative", p.display());
    }
    let t = toml::to_string(cfg).expect("serialises to TOML");
    let back = VmConfig::from_toml_str(&t, Path::new("/elsewhere"))
        .unwrap_or_else(|e| panic!("the printed TOML is refused: {e}\n{t}"));
    assert_eq!(&back, cfg, "TOML round trip changed it:\n{t}");
}

/// Bytes per unit, as libvirt defines its memory units (formatdomain,
/// "Memory Allocation"), for the units remus takes.
fn unit_bytes(unit: &str) -> Option<u128> {
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    })
}
