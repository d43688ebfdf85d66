//! remusd: the remus host agent (see the remus-agent crate).
fn main() -> std::process::ExitCode {
    remus_agent::main()
}
