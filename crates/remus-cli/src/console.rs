//! Interactive console: the terminal in raw mode, bytes both ways, Ctrl-]
//! detaches (as `xl console` and `virsh console` do). With a non-terminal
//! standard input (a script), input is forwarded until end of file.

use std::process::ExitCode;

use remus_api::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ctrl-].
const DETACH: u8 = 0x1d;

/// Restores the terminal's settings when dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enable() -> Option<RawMode> {
        // SAFETY: termios calls on fd 0 with a properly sized struct.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read in enable().
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

pub async fn attach(client: &Client, vm: &str) -> anyhow::Result<ExitCode> {
    let stream = client
        .console_attach(vm)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let raw = RawMode::enable();
    if raw.is_some() {
        eprint!("Connected to the console of '{vm}'. Detach with Ctrl-].\r\n");
    }
    let (mut rd, mut wr) = tokio::io::split(stream);
    let output = async {
        let mut out = tokio::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            out.write_all(&buf[..n]).await?;
            out.flush().await?;
        }
    };
    let interactive = raw.is_some();
    let input = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                wr.flush().await?;
                return Ok::<bool, std::io::Error>(true);
            }
            if interactive && let Some(i) = buf[..n].iter().position(|&b| b == DETACH) {
                wr.write_all(&buf[..i]).await?;
                wr.flush().await?;
                return Ok(true);
            }
            wr.write_all(&buf[..n]).await?;
            wr.flush().await?;
        }
    };
    let detached = tokio::select! {
        r = output => r?,
        r = input => r?,
    };
    drop(raw);
    if interactive {
        if detached {
            eprintln!("\r\nDetached from '{vm}'.");
        } else {
            eprintln!("\r\nConsole of '{vm}' closed by the agent.");
        }
    }
    Ok(ExitCode::SUCCESS)
}
