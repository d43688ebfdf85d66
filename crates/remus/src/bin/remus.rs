//! remus: the command line (see the remus-cli crate).
fn main() -> std::process::ExitCode {
    remus_cli::main()
}
