//! Running external commands with their stderr captured for error messages.

use crate::error::{Error, Result};
use std::process::{Command, Output, Stdio};

/// Renders a command line for messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, capturing stdout and stderr; non-zero exit is an error.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let command = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out)
}

/// Runs `cmd` and returns its stdout as text.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output(cmd)?.stdout).into_owned())
}

/// Runs `cmd` with stderr passed through (for long steps such as cargo, so
/// their progress shows); non-zero exit is an error.
pub fn run_visible(cmd: &mut Command) -> Result<()> {
    let command = display(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if !status.success() {
        return Err(Error::CommandFailed {
            command,
            status,
            stderr: "(its messages are above)".into(),
        });
    }
    Ok(())
}
