//! Live preview of flows: what the engine saw and decided for the next
//! Checks of a control point, for someone writing a selector or a
//! classifier, or asking in an incident "what is Sluice deciding now, and
//! why" (`GET /v1/preview`, `sluice preview`).
//!
//! The Check path pays for this only while someone previews: with nobody
//! wanting samples, [`Previews::wanted`] is one relaxed atomic load; while
//! some do, a Check of a control point none of them wants reads the wanted
//! control points without a lock (an `ArcSwap`) and goes on, and only a
//! Check of a wanted one takes the previews' lock. A Check that is sampled
//! copies its labels once into a [`Sample`] (values
//! of secret-bearing headers redacted before they are copied, long values
//! cut), shared by every preview that wants it; delivery is `try_send` on a
//! bounded channel, so a slow reader never holds up a Check. A flow that
//! waits in a scheduler is delivered when its wait ends, with the final
//! decision (or as abandoned when Envoy gave up on it).
//!
//! Previews are few and short: at most [`Previews::max_open`] at once, each
//! for a bounded number of samples.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use smallvec::SmallVec;
use tokio::sync::mpsc;

use crate::decision::Decision;
use crate::labels::{HEADER_PREFIX, LabelSource, normalize_header_name};
use crate::plan::Stages;

/// Headers whose values are never shown, whatever `--preview-redact` adds:
/// credentials and sessions.
pub const ALWAYS_REDACTED: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// What a redacted value shows instead.
pub const REDACTED: &str = "[redacted]";

/// Longest label value a sample keeps, in bytes; a longer one is cut (on a
/// character boundary) and says how long it was.
pub const MAX_VALUE_BYTES: usize = 512;

/// Most request labels one sample keeps; the rest are counted in
/// [`Sample::labels_left_out`]. With the byte bound below, it keeps a
/// sample small whatever the request holds (thousands of headers, a baggage
/// header of tiny members).
pub const MAX_LABELS: usize = 256;

/// Most bytes of names and values one sample keeps.
pub const MAX_SAMPLE_BYTES: usize = 64 * 1024;

/// Most previews open at once, by default.
pub const DEFAULT_MAX_OPEN: usize = 4;

/// Most samples one preview may ask for.
pub const MAX_SAMPLES: usize = 100;

/// One label of a sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Label {
    /// The label's name, as policies write it.
    pub name: String,
    /// Its value (redacted or cut as the module says).
    pub value: String,
}

/// A component whose selectors admitted the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// `classifier`, `flux_meter`, `sampler`, `rate_limiter`,
    /// `concurrency_limiter` or `scheduler`.
    pub kind: &'static str,
    /// Its policy.
    pub policy: String,
    /// Its name.
    pub component: String,
}

/// What became of a previewed flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Outcome {
    /// It may pass.
    Accepted {
        /// Whether it waited in a queue (or for the store) first.
        waited: bool,
    },
    /// A component rejected it.
    Rejected {
        /// The rejecting component's policy.
        policy: String,
        /// The rejecting component.
        component: String,
        /// Why (`rate_limited`, `queue_timeout`...: the `reason` of the
        /// metrics).
        reason: &'static str,
        /// The HTTP status Envoy answered with.
        status: u16,
    },
    /// Envoy gave up on the Check while it waited.
    Abandoned,
}

/// One previewed flow.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Its control point.
    pub control_point: String,
    /// Its service.
    pub service: String,
    /// The request's labels: attributes, headers, baggage members (at most
    /// [`MAX_LABELS`], [`MAX_SAMPLE_BYTES`] in all).
    pub request: Vec<Label>,
    /// Request labels beyond those bounds, not kept.
    pub labels_left_out: usize,
    /// What classifiers added, in order (a later one with the same name
    /// wins).
    pub classified: Vec<Label>,
    /// Components whose selectors admitted the flow, in stage order (each
    /// judged on the flow's labels after every classifier ran).
    pub matched: Vec<Matched>,
    /// The decision.
    pub outcome: Outcome,
}

/// Why a preview was not opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// As many previews are open as allowed.
    #[error("{0} previews are open already (the most at once); try again when one ends")]
    TooMany(usize),
    /// Zero samples, or more than [`MAX_SAMPLES`].
    #[error("samples must be between 1 and {MAX_SAMPLES}")]
    Samples,
}

/// A preview's wish: Checks of one control point (and service).
struct Watcher {
    id: u64,
    control_point: Box<str>,
    service: Option<Box<str>>,
    /// Samples still to claim.
    wanted: usize,
    tx: mpsc::Sender<Arc<Sample>>,
}

impl Watcher {
    fn wants(&self, control_point: &str, service: &str) -> bool {
        self.wanted > 0
            && *self.control_point == *control_point
            && self.service.as_deref().is_none_or(|s| s == service)
    }
}

/// The previews open on one engine.
pub struct Previews {
    /// Watchers that still want samples: the one load the Check path makes.
    wanting: AtomicUsize,
    /// The control points they want, read without a lock by Checks while
    /// `wanting` is above 0, so that only Checks a preview may want take
    /// the lock (updated under it).
    points: ArcSwap<Vec<Box<str>>>,
    watchers: Mutex<Vec<Watcher>>,
    /// Normalized names (`set_cookie`) of the headers never shown.
    redact: Box<[Box<str>]>,
    max_open: usize,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Previews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Previews")
            .field("wanting", &self.wanting.load(Ordering::Relaxed))
            .field("redact", &self.redact)
            .field("max_open", &self.max_open)
            .finish_non_exhaustive()
    }
}

impl Default for Previews {
    fn default() -> Self {
        Previews::new(std::iter::empty::<&str>(), DEFAULT_MAX_OPEN)
    }
}

impl Previews {
    /// Previews redacting [`ALWAYS_REDACTED`] and the headers named in
    /// `redact` (any spelling: `X-Api-Key`, `x_api_key`), at most
    /// `max_open` at once.
    pub fn new<S: AsRef<str>>(redact: impl IntoIterator<Item = S>, max_open: usize) -> Self {
        let mut names: Vec<Box<str>> = ALWAYS_REDACTED
            .iter()
            .map(|n| normalize_header_name(n))
            .chain(redact.into_iter().map(|n| {
                // `x-api-key`, `X_Api_Key` or as policies name it,
                // `http.request.header.x_api_key`.
                let n = n.as_ref().trim();
                normalize_header_name(n.strip_prefix(HEADER_PREFIX).unwrap_or(n))
            }))
            .filter(|n| !n.is_empty())
            .map(String::into_boxed_str)
            .collect();
        names.sort();
        names.dedup();
        Previews {
            wanting: AtomicUsize::new(0),
            points: ArcSwap::from_pointee(Vec::new()),
            watchers: Mutex::new(Vec::new()),
            redact: names.into(),
            max_open,
            next_id: AtomicU64::new(1),
        }
    }

    /// Most previews open at once.
    pub fn max_open(&self) -> usize {
        self.max_open
    }

    /// Whether any preview wants a sample: the Check path's only cost
    /// while nobody previews. Relaxed: a Check that races with a preview
    /// opening may miss it, which only means the next one is sampled.
    #[inline]
    pub fn wanted(&self) -> bool {
        self.wanting.load(Ordering::Relaxed) != 0
    }

    /// Opens a preview of the next `samples` Checks of `control_point`
    /// (and `service`, if given).
    pub fn open(
        self: &Arc<Self>,
        control_point: &str,
        service: Option<&str>,
        samples: usize,
    ) -> Result<Preview, OpenError> {
        if samples == 0 || samples > MAX_SAMPLES {
            return Err(OpenError::Samples);
        }
        let mut watchers = self.watchers.lock();
        if watchers.len() >= self.max_open {
            return Err(OpenError::TooMany(self.max_open));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(samples);
        watchers.push(Watcher {
            id,
            control_point: control_point.into(),
            service: service.map(Into::into),
            wanted: samples,
            tx,
        });
        self.wanting.fetch_add(1, Ordering::Relaxed);
        self.refresh(&watchers);
        Ok(Preview {
            id,
            previews: self.clone(),
            rx,
            left: samples,
        })
    }

    /// The previews that want this Check, each counting it as claimed;
    /// empty when none does.
    fn claim(&self, control_point: &str, service: &str) -> SmallVec<[u64; 2]> {
        let mut watchers = self.watchers.lock();
        let mut ids = SmallVec::new();
        for w in watchers
            .iter_mut()
            .filter(|w| w.wants(control_point, service))
        {
            w.wanted -= 1;
            if w.wanted == 0 {
                self.wanting.fetch_sub(1, Ordering::Relaxed);
            }
            ids.push(w.id);
        }
        if !ids.is_empty() {
            self.refresh(&watchers);
        }
        ids
    }

    /// Publishes the control points previews still want samples of, for
    /// Checks to read without the lock. Called under it.
    fn refresh(&self, watchers: &[Watcher]) {
        let mut points: Vec<Box<str>> = watchers
            .iter()
            .filter(|w| w.wanted > 0)
            .map(|w| w.control_point.clone())
            .collect();
        points.sort();
        points.dedup();
        self.points.store(Arc::new(points));
    }

    /// Hands `sample` to the previews that claimed it and are still open.
    fn deliver(&self, to: &[u64], sample: Sample) {
        let sample = Arc::new(sample);
        let watchers = self.watchers.lock();
        for w in watchers.iter().filter(|w| to.contains(&w.id)) {
            // Never full: a preview claims at most as many samples as its
            // channel holds. A reader gone is no error either.
            let _ = w.tx.try_send(sample.clone());
        }
    }

    fn close(&self, id: u64) {
        let mut watchers = self.watchers.lock();
        if let Some(i) = watchers.iter().position(|w| w.id == id) {
            let w = watchers.swap_remove(i);
            if w.wanted > 0 {
                self.wanting.fetch_sub(1, Ordering::Relaxed);
            }
            self.refresh(&watchers);
        }
    }

    /// The request's labels as a preview shows them, and how many were
    /// left out.
    fn request_labels(&self, source: &dyn LabelSource) -> (Vec<Label>, usize) {
        let mut out = Vec::new();
        let (mut bytes, mut left_out) = (0, 0);
        source.each_label(&mut |name, value| {
            if out.len() >= MAX_LABELS || bytes >= MAX_SAMPLE_BYTES {
                left_out += 1;
                return;
            }
            let secret = name
                .strip_prefix(HEADER_PREFIX)
                .is_some_and(|h| self.redact.iter().any(|r| **r == *h));
            let label = Label {
                name: shown(name),
                value: if secret {
                    REDACTED.to_owned()
                } else {
                    shown(&value)
                },
            };
            bytes += label.name.len() + label.value.len();
            out.push(label);
        });
        (out, left_out)
    }

    /// Samples `decision` if a preview wants a Check of this control point
    /// and service: called by the engine after the stages ran, only when
    /// [`Previews::wanted`]. A flow that waits is delivered when its wait
    /// ends: the [`Pending`] goes into its `Waiting`.
    #[cold]
    pub(crate) fn sample(
        self: &Arc<Self>,
        stages: Option<&Stages>,
        control_point: &str,
        service: &str,
        decision: &mut Decision<'_>,
    ) {
        // Checks of control points nobody previews never take the lock.
        if !self.points.load().iter().any(|p| **p == *control_point) {
            return;
        }
        let to = self.claim(control_point, service);
        if to.is_empty() {
            return;
        }
        let labels = &decision.labels;
        let admits = |selectors: &[crate::components::selector::Selector]| {
            selectors.iter().any(|s| s.admits(service, labels))
        };
        let mut matched = Vec::new();
        if let Some(st) = stages {
            let mut note = |kind, policy: &str, component: &str| {
                matched.push(Matched {
                    kind,
                    policy: policy.to_owned(),
                    component: component.to_owned(),
                })
            };
            for c in st.classifiers.iter().filter(|c| admits(&c.selectors)) {
                note("classifier", &c.policy, &c.name);
            }
            for f in st.flux_meters.iter().filter(|f| admits(&f.selectors)) {
                note("flux_meter", &f.policy, &f.name);
            }
            for s in st.samplers.iter().filter(|s| admits(&s.selectors)) {
                note("sampler", &s.policy, &s.name);
            }
            for r in st.rate_limiters.iter().filter(|r| admits(&r.selectors)) {
                note("rate_limiter", &r.policy, &r.name);
            }
            for c in st
                .concurrency_limiters
                .iter()
                .filter(|c| admits(&c.selectors))
            {
                note("concurrency_limiter", &c.policy, &c.name);
            }
            for s in st.schedulers.iter().filter(|s| admits(&s.selectors)) {
                let (policy, component) = s.names();
                note(s.kind(), policy, component);
            }
        }
        let (request, labels_left_out) = self.request_labels(labels.source());
        let sample = Sample {
            control_point: control_point.to_owned(),
            service: service.to_owned(),
            request,
            labels_left_out,
            classified: labels
                .classified()
                .iter()
                .map(|(name, value)| Label {
                    name: name.to_string(),
                    value: shown(value),
                })
                .collect(),
            matched,
            outcome: match &decision.rejection {
                Some(r) => Outcome::Rejected {
                    policy: r.policy.to_owned(),
                    component: r.component.to_owned(),
                    reason: r.reason.as_str(),
                    status: r.status,
                },
                None => Outcome::Accepted {
                    waited: decision.waiting.is_some(),
                },
            },
        };
        let pending = Pending {
            previews: self.clone(),
            to,
            sample: Some(sample),
        };
        match decision.waiting.as_mut() {
            Some(waiting) => waiting.preview = Some(pending),
            None => pending.settle(None),
        }
    }
}

/// A value as a sample keeps it: at most [`MAX_VALUE_BYTES`].
fn shown(value: &str) -> String {
    if value.len() <= MAX_VALUE_BYTES {
        return value.to_owned();
    }
    let mut end = MAX_VALUE_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &value[..end], value.len())
}

/// A sample of a flow still waiting; delivered by [`Pending::settle`], or
/// as [`Outcome::Abandoned`] when dropped unsettled.
pub struct Pending {
    previews: Arc<Previews>,
    to: SmallVec<[u64; 2]>,
    sample: Option<Sample>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("to", &self.to).finish()
    }
}

impl Pending {
    /// Delivers the sample, with `outcome` if the flow's fate changed
    /// since it was taken.
    pub(crate) fn settle(mut self, outcome: Option<Outcome>) {
        if let Some(mut sample) = self.sample.take() {
            if let Some(outcome) = outcome {
                sample.outcome = outcome;
            }
            self.previews.deliver(&self.to, sample);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut sample) = self.sample.take() {
            sample.outcome = Outcome::Abandoned;
            self.previews.deliver(&self.to, sample);
        }
    }
}

/// An open preview: its samples arrive as Checks are decided. Dropping it
/// closes it.
pub struct Preview {
    id: u64,
    previews: Arc<Previews>,
    rx: mpsc::Receiver<Arc<Sample>>,
    /// Samples still to arrive.
    left: usize,
}

impl Preview {
    /// The next sample; `None` once every sample asked for has arrived.
    /// Waits as long as it takes: callers bound it with a timeout.
    pub async fn next(&mut self) -> Option<Arc<Sample>> {
        if self.left == 0 {
            return None;
        }
        let sample = self.rx.recv().await?;
        self.left -= 1;
        Some(sample)
    }
}

impl Drop for Preview {
    fn drop(&mut self) {
        self.previews.close(self.id);
    }
}
