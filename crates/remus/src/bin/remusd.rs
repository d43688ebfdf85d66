//! remusd: the remus host agent (see the remus-agent crate).
fn main() -> std::process::ExitCode {
    match remus_agent::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remusd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
