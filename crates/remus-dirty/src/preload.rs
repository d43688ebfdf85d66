//! Where the agent finds the preload library and how it hands it to QEMU.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Environment variable naming the RAM file the preload tracks. Must match
/// `remus-dirty-preload`.
pub const TRACK_PATH_ENV: &str = "REMUS_DIRTY_TRACK_PATH";

/// File name of the built preload library.
pub const PRELOAD_FILE_NAME: &str = "libremus_dirty_preload.so";

/// Where the Debian package installs the preload (a private library of
/// the package, not on the linker's path). A packager may build with
/// `REMUS_PRELOAD_DIR` set to put it elsewhere.
pub const INSTALL_DIR: &str = match option_env!("REMUS_PRELOAD_DIR") {
    Some(d) => d,
    None => "/usr/lib/remus",
};

/// Finds the preload when no path was given (`remusd --preload`): next to
/// the current executable (installed side by side, or `target/<profile>/`
/// for a binary), one level up (test and example binaries live in
/// `target/<profile>/deps` or `examples`), in `$CARGO_TARGET_DIR` or the
/// nearest enclosing `target/` directory (release build first), and last
/// in [`INSTALL_DIR`], where the package puts it.
pub fn preload_path() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(exe_dir) = exe.parent()
    {
        candidates.push(exe_dir.to_owned());
        candidates.extend(exe_dir.parent().map(Path::to_owned));
        let target_dirs = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                exe_dir
                    .ancestors()
                    .find(|dir| dir.ends_with("target"))
                    .map(Path::to_owned),
            );
        for target in target_dirs {
            candidates.push(target.join("release"));
            candidates.push(target.join("debug"));
        }
    }
    candidates.push(PathBuf::from(INSTALL_DIR));
    candidates
        .into_iter()
        .map(|dir| dir.join(PRELOAD_FILE_NAME))
        .find(|path| path.is_file())
}

/// The environment QEMU needs for tracking `ram_file` with the preload at
/// `preload`. An `LD_PRELOAD` already in the agent's environment is kept
/// after ours.
pub fn preload_env(preload: &Path, ram_file: &Path) -> [(&'static str, OsString); 2] {
    let mut ld_preload = OsString::from(preload);
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        ld_preload.push(":");
        ld_preload.push(existing);
    }
    [
        ("LD_PRELOAD", ld_preload),
        (TRACK_PATH_ENV, OsString::from(ram_file)),
    ]
}
