//! Logging for both binaries: one `tracing` subscriber writing to stderr,
//! as text or JSON, filtered by a level or tracing directives.

use clap::ValueEnum;

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Installs the process's subscriber. `filter` is a level (`info`) or
/// tracing directives (`info,sluice=debug`); an invalid one is reported on
/// stderr and `info` is used, rather than refusing to start over a log
/// setting.
pub fn init(filter: &str, format: LogFormat) {
    let parsed = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("invalid log level {filter:?}: {e}; using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(parsed)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
