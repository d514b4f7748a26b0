//! The `sluice-controller` binary; see [`sluice_controller::cli`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sluice_controller::cli::main()
}
