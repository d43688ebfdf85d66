//! `remus-image build [--out DIR] [--cache DIR] [--force]`: builds the remus
//! guest image (see the library docs).

use anyhow::Context;
use clap::{Parser, Subcommand};
use remus_image::{BuildOptions, Outcome};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "remus-image",
    about = "Build the remus guest image (kernel + busybox initramfs)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build vmlinuz, initrd.img and manifest.json (no-op if up to date).
    Build {
        /// Output directory [default: <workspace>/target/guest-image]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Download cache for .deb files [default: ${XDG_CACHE_HOME:-$HOME/.cache}/remus/debs]
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Rebuild even if the image is up to date.
        #[arg(long)]
        force: bool,
        /// The remus workspace (to build remus-guest) [default: found automatically]
        #[arg(long)]
        workspace: Option<PathBuf>,
        /// No progress messages.
        #[arg(long, short)]
        quiet: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Build {
            out,
            cache,
            force,
            workspace,
            quiet,
        } => {
            let workspace = match workspace {
                Some(w) => w,
                None => remus_image::find_workspace_root()?,
            };
            let opts = BuildOptions {
                out_dir: out.unwrap_or_else(|| remus_image::default_out_dir(&workspace)),
                cache_dir: cache.unwrap_or_else(remus_image::default_cache_dir),
                workspace,
                force,
                quiet,
            };
            match remus_image::build(&opts).context("building the guest image")? {
                Outcome::UpToDate { out_dir, .. } => {
                    println!("guest image up to date: {}", out_dir.display())
                }
                Outcome::Built { out_dir, manifest } => {
                    println!(
                        "guest image built: {} (kernel {}, {} modules, initrd {} bytes)",
                        out_dir.display(),
                        manifest.kernel_release,
                        manifest.modules.len(),
                        manifest.outputs[remus_image::INITRD_FILE].size
                    )
                }
            }
        }
    }
    Ok(())
}
