//! The `sluice` sidecar binary; see [`sluice::cli`].

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
