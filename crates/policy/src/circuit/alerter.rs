//! Aperture's `Alerter` as a circuit component (`alerter`): an alert that
//! fires while a signal is non-zero and resolves once it has been zero for
//! `resolve_timeout`. `sluice-controller` exports alerts as the
//! `controller_alert` series and lists them on its admin listener
//! (`GET /v1/alerts`); docs/controller.md says how.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Operand;
use crate::types::DurationSpec;

/// Labels of every alert's series, which `labels` may not set (nor
/// Prometheus's own: `job`, `instance`, `alertname`, `__*`).
pub const RESERVED_LABELS: [&str; 7] = [
    "policy_name",
    "alert_name",
    "severity",
    "alert_channels",
    "alertname",
    "job",
    "instance",
];

/// Most `labels` an alert has.
pub const MAX_LABELS: usize = 16;
/// Most `alert_channels` an alert has.
pub const MAX_CHANNELS: usize = 16;
/// Longest alert name, label value or channel, in bytes.
pub const MAX_TEXT: usize = 256;

/// How bad an alert is: Aperture's severities.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// For information.
    #[default]
    Info,
    /// A warning.
    Warn,
    /// Critical.
    Crit,
}

impl Severity {
    /// How policies write it: `info`, `warn`, `crit`.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warn => "warn",
            Severity::Crit => "crit",
        }
    }
}

fn five_seconds() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(5))
}

/// `alerter`: Aperture's alerter. Fires while `signal` is non-zero, and
/// stays firing until `resolve_timeout` after the last tick it was (rounded
/// up to whole ticks); a missing signal counts as zero. It writes no
/// signal.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlerterSpec {
    /// What it watches: a number or a signal; the alert fires while it is
    /// non-zero.
    pub signal: Operand,
    /// The alert's name (the `alert_name` label), 1 to 256 bytes.
    #[schemars(length(min = 1, max = 256))]
    pub alert_name: String,
    /// `info`, `warn` or `crit`. Default `info`.
    #[serde(default)]
    pub severity: Severity,
    /// The alert resolves once the signal has been zero (or missing) this
    /// long. Default `5s`.
    #[serde(default = "five_seconds")]
    pub resolve_timeout: DurationSpec,
    /// More labels of the alert's series: names are Prometheus label names,
    /// none of the alert's own (`policy_name`, `alert_name`, `severity`,
    /// `alert_channels`) nor `alertname`, `job`, `instance` or `__*`; at
    /// most 16. Default `{}`: none.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, crate::schema::ScalarText>")]
    pub labels: BTreeMap<String, String>,
    /// Where the alert should go, for the alert's receivers to route by
    /// (the `alert_channels` label, comma-separated); at most 16, without
    /// commas. Default `[]`: none.
    #[serde(default)]
    pub alert_channels: Vec<String>,
}

/// Whether `name` is a Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl AlerterSpec {
    /// Its parameters (the wiring is checked with the circuit's).
    pub fn check(&self) -> Result<(), String> {
        if self.alert_name.trim().is_empty() {
            return Err("alert_name must not be empty".to_owned());
        }
        if self.alert_name.len() > MAX_TEXT {
            return Err(format!("alert_name is longer than {MAX_TEXT} bytes"));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(format!(
                "at most {MAX_LABELS} labels, got {}",
                self.labels.len()
            ));
        }
        for (name, value) in &self.labels {
            if !is_label_name(name) || name.starts_with("__") {
                return Err(format!(
                    "label {name:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
                ));
            }
            if RESERVED_LABELS.contains(&name.as_str()) {
                return Err(format!(
                    "label {name:?} is reserved (the alert's own labels are {})",
                    RESERVED_LABELS.join(", ")
                ));
            }
            if value.len() > MAX_TEXT {
                return Err(format!(
                    "the value of label {name:?} is longer than {MAX_TEXT} bytes"
                ));
            }
        }
        if self.alert_channels.len() > MAX_CHANNELS {
            return Err(format!(
                "at most {MAX_CHANNELS} alert_channels, got {}",
                self.alert_channels.len()
            ));
        }
        for channel in &self.alert_channels {
            if channel.trim().is_empty() || channel.contains(',') || channel.len() > MAX_TEXT {
                return Err(format!(
                    "alert channel {channel:?} must be 1 to {MAX_TEXT} bytes, without commas"
                ));
            }
        }
        Ok(())
    }

    /// Whether `other` raises the same alert: the same name, severity and
    /// labels (channels aside), so one series and one entry of
    /// `/v1/alerts`.
    pub fn same_alert(&self, other: &AlerterSpec) -> bool {
        self.alert_name == other.alert_name
            && self.severity == other.severity
            && self.labels == other.labels
    }
}
