//! `GET /v1/preview`: waits for the next Checks of a control point and
//! answers what the engine saw and decided for each
//! (`sluice_engine::preview`). Parameters:
//!
//! - `control_point` (required): one a policy names or a Check has named;
//! - `service`: only Checks of this service;
//! - `samples`: how many, 1 to 100 (default 10);
//! - `timeout`: how long to wait for them, up to 60 s (default 10 s); the
//!   answer then holds what arrived, with `complete: false`.
//!
//! Anything else is a 400 with the reason, and so is a control point
//! nobody knows (most likely a typo, which would otherwise wait for the
//! timeout and answer nothing); a 429 when as many previews are open as
//! allowed.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use serde::Serialize;
use sluice_engine::preview::{MAX_SAMPLES, OpenError, Sample};
use sluice_runtime::admin::{Body, TEXT, answer};

use super::{AdminState, Query, json};

/// Samples a preview asks for when it does not say.
const DEFAULT_SAMPLES: usize = 10;
/// How long a preview waits when it does not say.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a preview may wait: an admin request is not a subscription.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The answer.
#[derive(Serialize)]
struct Answer<'a> {
    control_point: String,
    service: Option<String>,
    /// Samples asked for.
    asked: usize,
    /// Whether all of them arrived before the timeout.
    complete: bool,
    samples: Vec<&'a Sample>,
}

/// What the query asks for.
struct Ask {
    control_point: String,
    service: Option<String>,
    samples: usize,
    timeout: Duration,
}

fn parse(state: &AdminState, query: Option<&str>) -> Result<Ask, String> {
    let q = Query::parse(query, &["control_point", "service", "samples", "timeout"])?;
    let Some(control_point) = q.get("control_point") else {
        return Err(format!(
            "control_point is required (known: {})",
            known(state)
        ));
    };
    if !state.engine.knows_control_point(control_point) {
        return Err(format!(
            "unknown control point {control_point:?}: no policy names it and no Check has (known: {})",
            known(state)
        ));
    }
    let samples = match q.get("samples") {
        None => DEFAULT_SAMPLES,
        Some(n) => n
            .parse()
            .ok()
            .filter(|n| (1..=MAX_SAMPLES).contains(n))
            .ok_or_else(|| format!("samples must be between 1 and {MAX_SAMPLES}, not {n:?}"))?,
    };
    let timeout = match q.get("timeout") {
        None => DEFAULT_TIMEOUT,
        Some(t) => sluice_time::parse_duration(t)
            .ok()
            .filter(|t| !t.is_zero() && *t <= MAX_TIMEOUT)
            .ok_or_else(|| {
                format!("timeout must be a duration above 0 and up to 60s, not {t:?}")
            })?,
    };
    Ok(Ask {
        control_point: control_point.to_owned(),
        service: q.get("service").map(str::to_owned),
        samples,
        timeout,
    })
}

/// The control points a preview may ask for, for error messages.
fn known(state: &AdminState) -> String {
    let mut names: Vec<String> = state
        .engine
        .plan()
        .control_points
        .keys()
        .map(|k| k.to_string())
        .chain(
            state
                .engine
                .control_points()
                .into_iter()
                .map(|c| c.control_point),
        )
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        "none yet".to_owned()
    } else {
        names.join(", ")
    }
}

/// Answers `GET /v1/preview`.
pub async fn preview(state: &AdminState, query: Option<&str>) -> Response<Body> {
    if !state.preview {
        return answer(
            StatusCode::NOT_FOUND,
            TEXT,
            "preview is off on this sidecar (--preview=false)\n",
        );
    }
    let ask = match parse(state, query) {
        Ok(ask) => ask,
        Err(why) => return answer(StatusCode::BAD_REQUEST, TEXT, format!("{why}\n")),
    };
    let mut open =
        match state
            .engine
            .previews()
            .open(&ask.control_point, ask.service.as_deref(), ask.samples)
        {
            Ok(p) => p,
            Err(e @ OpenError::TooMany(_)) => {
                return answer(StatusCode::TOO_MANY_REQUESTS, TEXT, format!("{e}\n"));
            }
            Err(e) => return answer(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
        };
    let mut samples = Vec::with_capacity(ask.samples);
    let _ = tokio::time::timeout(ask.timeout, async {
        while let Some(s) = open.next().await {
            samples.push(s);
        }
    })
    .await;
    drop(open);
    json(&Answer {
        complete: samples.len() == ask.samples,
        control_point: ask.control_point,
        service: ask.service,
        asked: ask.samples,
        samples: samples.iter().map(|s: &Arc<Sample>| &**s).collect(),
    })
}
