//! The `tokenserver` binary.

fn main() -> std::process::ExitCode {
    tokenserver::cli::main()
}
