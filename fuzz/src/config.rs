//! `config_toml`: a VM config file as a local user writes it: arbitrary
//! UTF-8 through `toml::from_str::<VmConfig>` and [`VmConfig::validate`],
//! and through [`VmConfig::from_toml_str`], the entry point for files.
//!
//! Asserted: whatever parses survives the trips remus makes it take: to
//! TOML and back (`remus create --dry-run` prints TOML) and to JSON and
//! back (the CLI sends configs to the agent as JSON), unchanged, with the
//! same verdict from `validate`. `from_toml_str` agrees with the two steps
//! it is made of: a syntax error exactly when `toml::from_str` fails, and
//! what it accepts is valid, with every relative path resolved.

use std::path::Path;

use remus_config::{ConfigError, VmConfig};

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = toml::from_str::<VmConfig>(text);
    if let Ok(cfg) = &parsed {
        let verdict = cfg.validate();
        if let Err(e) = &verdict {
            assert!(matches!(e, ConfigError::Field { .. }), "{e:?}");
            let _ = e.to_string();
        }
        let t = toml::to_string(cfg).expect("a parsed config serialises to TOML");
        let back: VmConfig =
            toml::from_str(&t).unwrap_or_else(|e| panic!("its own TOML does not parse: {e}\n{t}"));
        assert_eq!(&back, cfg, "TOML round trip changed it:\n{t}");
        let j = serde_json::to_string(cfg).expect("serialises to JSON");
        let back: VmConfig = serde_json::from_str(&j)
            .unwrap_or_else(|e| panic!("its own JSON does not parse: {e}\n{j}"));
        assert_eq!(&back, cfg, "JSON round trip changed it: {j}");
        assert_eq!(back.validate(), verdict);
        if verdict.is_ok() {
            for i in 0..cfg.vifs.len() {
                let mac = cfg.vif_mac(i).0;
                assert!(mac[0] & 1 == 0 && mac != [0; 6], "vif[{i}]: MAC {mac:02x?}");
            }
        }
    }
    let base = Path::new("/base");
    match VmConfig::from_toml_str(text, base) {
        Ok(cfg) => {
            assert!(parsed.is_ok());
            cfg.validate()
                .expect("from_toml_str returned an invalid config");
            let paths = cfg
                .kernel
                .iter()
                .chain(cfg.initrd.iter())
                .chain(cfg.disks.iter().map(|d| &d.path));
            for p in paths {
                assert!(p.is_absolute(), "{} left relative", p.display());
            }
        }
        Err(ConfigError::Syntax(e)) => assert!(parsed.is_err(), "syntax error {e}"),
        Err(e @ ConfigError::Field { .. }) => {
            assert!(parsed.is_ok(), "{e}");
        }
        Err(e @ ConfigError::Read { .. }) => panic!("read error without a file: {e}"),
    }
}
