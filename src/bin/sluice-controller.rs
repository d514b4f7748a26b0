//! The `sluice-controller` binary; see [`sluice::controller::cli`].

fn main() -> std::process::ExitCode {
    sluice::controller::cli::main()
}
