//! The `sluice` sidecar binary; see [`sluice::cli`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
