//! A compiled policy set: the components, indexed by control point.
//!
//! Compiling happens off the request path, when policies load. The request
//! path then looks up its control point once and walks the short lists of
//! components that can apply there, stage by stage.

use std::sync::Arc;

use ahash::AHashMap;

use sluice_policy::PolicySet;
use sluice_time::Clock;

use crate::components::classifier::Classifier;
use crate::components::concurrency_limiter::ConcurrencyLimiter;
use crate::components::flux_meter::FluxMeter;
use crate::components::rate_limiter::RateLimiter;
use crate::components::sampler::Sampler;
use crate::components::selector::Selector;
use crate::metrics::{Metrics, Series};
use crate::schedulers::AnyScheduler;
use crate::schedulers::concurrency::ConcurrencyScheduler;
use crate::schedulers::load::LoadScheduler;
use crate::schedulers::quota::QuotaScheduler;
use crate::store::SharedStore;

/// A component as one control point sees it: with only its selectors for
/// that control point, so that a selector written for another control
/// point can never admit this one's flows.
#[derive(Debug)]
pub struct Staged<T> {
    /// The component.
    pub component: Arc<T>,
    /// Its selectors naming this control point.
    pub selectors: Box<[Selector]>,
}

impl<T> std::ops::Deref for Staged<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.component
    }
}

/// The components of one control point, per stage, in policy-name then
/// file order.
#[derive(Default, Debug)]
pub struct Stages {
    /// Stage 2.
    pub classifiers: Vec<Staged<Classifier>>,
    /// Stage 3.
    pub flux_meters: Vec<Staged<FluxMeter>>,
    /// Stage 4.
    pub samplers: Vec<Staged<Sampler>>,
    /// Stage 5, first part.
    pub rate_limiters: Vec<Staged<RateLimiter>>,
    /// Stage 5, second part.
    pub concurrency_limiters: Vec<Staged<ConcurrencyLimiter>>,
    /// Stage 6: concurrency, then quota, then load schedulers.
    pub schedulers: Vec<Staged<AnyScheduler>>,
}

/// One policy, compiled.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// Its name.
    pub name: Arc<str>,
    /// The file it came from.
    pub file: std::path::PathBuf,
    /// Hash of its text.
    pub hash: u64,
    /// Its classifiers.
    pub classifiers: Vec<Arc<Classifier>>,
    /// Its flux meters.
    pub flux_meters: Vec<Arc<FluxMeter>>,
    /// Its samplers.
    pub samplers: Vec<Arc<Sampler>>,
    /// Its rate limiters.
    pub rate_limiters: Vec<Arc<RateLimiter>>,
    /// Its concurrency limiters.
    pub concurrency_limiters: Vec<Arc<ConcurrencyLimiter>>,
    /// Its concurrency schedulers.
    pub concurrency_schedulers: Vec<Arc<ConcurrencyScheduler>>,
    /// Its quota schedulers.
    pub quota_schedulers: Vec<Arc<QuotaScheduler>>,
    /// Its load schedulers.
    pub load_schedulers: Vec<Arc<LoadScheduler>>,
}

impl CompiledPolicy {
    /// The series of every component.
    pub fn series(&self) -> impl Iterator<Item = &Series> {
        self.classifiers
            .iter()
            .map(|c| &c.series)
            .chain(self.flux_meters.iter().map(|f| &f.series))
            .chain(self.samplers.iter().map(|s| &s.series))
            .chain(self.rate_limiters.iter().map(|r| &r.series))
            .chain(self.concurrency_limiters.iter().map(|c| &c.series))
            .chain(
                self.concurrency_schedulers
                    .iter()
                    .map(|c| &c.scheduler.config.series),
            )
            .chain(
                self.quota_schedulers
                    .iter()
                    .map(|q| &q.scheduler.config.series),
            )
            .chain(
                self.load_schedulers
                    .iter()
                    .map(|l| &l.scheduler.config.series),
            )
    }

    /// Its schedulers, in stage order.
    pub fn schedulers(&self) -> impl Iterator<Item = AnyScheduler> + '_ {
        self.concurrency_schedulers
            .iter()
            .map(|c| AnyScheduler::Concurrency(c.clone()))
            .chain(
                self.quota_schedulers
                    .iter()
                    .map(|q| AnyScheduler::Quota(q.clone())),
            )
            .chain(
                self.load_schedulers
                    .iter()
                    .map(|l| AnyScheduler::Load(l.clone())),
            )
    }
}

/// Everything in force.
#[derive(Default, Debug)]
pub struct Plan {
    /// The policies.
    pub policies: Vec<CompiledPolicy>,
    /// Components by control point.
    pub control_points: AHashMap<Box<str>, Stages>,
    /// Flux meters by `policy/name`, for access logs to find.
    pub flux_meters: AHashMap<Box<str>, Arc<FluxMeter>>,
    /// Schedulers by `policy/name`, for access logs to find.
    pub schedulers: AHashMap<Box<str>, AnyScheduler>,
}

impl Plan {
    /// The series of every component of every policy.
    pub fn series(&self) -> impl Iterator<Item = &Series> {
        self.policies.iter().flat_map(CompiledPolicy::series)
    }
}

/// A component's selectors grouped by the control point they name.
fn by_control_point<T>(component: &Arc<T>, selectors: &[Selector]) -> Vec<(Arc<str>, Staged<T>)> {
    let mut cps: Vec<Arc<str>> = selectors.iter().map(|s| s.control_point.clone()).collect();
    cps.sort();
    cps.dedup();
    cps.into_iter()
        .map(|cp| {
            let selectors = selectors
                .iter()
                .filter(|s| s.control_point == cp)
                .cloned()
                .collect();
            let staged = Staged {
                component: component.clone(),
                selectors,
            };
            (cp, staged)
        })
        .collect()
}

/// The component of `old` (a policy of the previous plan) named `name`.
fn previous<'a, T>(
    old: Option<&'a CompiledPolicy>,
    list: impl Fn(&'a CompiledPolicy) -> &'a [Arc<T>],
    name_of: impl Fn(&T) -> &str,
    name: &str,
) -> Option<&'a T> {
    old.and_then(|p| list(p).iter().find(|c| name_of(c) == name).map(|c| &**c))
}

impl Plan {
    /// Compiles `set`, reusing `previous`'s state for unchanged components.
    pub fn compile(
        set: &PolicySet,
        previous_plan: &Plan,
        metrics: &Metrics,
        clock: &Clock,
        max_label_values: usize,
        store: Option<&SharedStore>,
    ) -> Plan {
        let mut plan = Plan::default();
        for loaded in &set.policies {
            let spec = &loaded.policy;
            let name: Arc<str> = spec.name.value.0.as_str().into();
            let old = previous_plan.policies.iter().find(|p| p.name == name);
            let compiled = CompiledPolicy {
                classifiers: spec
                    .classifiers
                    .iter()
                    .enumerate()
                    .map(|(i, c)| Arc::new(Classifier::compile(&name, i, c, metrics)))
                    .collect(),
                flux_meters: spec
                    .flux_meters
                    .iter()
                    .map(|f| {
                        let before =
                            previous(old, |p| &p.flux_meters, |m| &m.name, &f.name.value.0);
                        Arc::new(FluxMeter::compile(&name, f, metrics, before))
                    })
                    .collect(),
                samplers: spec
                    .samplers
                    .iter()
                    .map(|s| Arc::new(Sampler::compile(&name, s, metrics)))
                    .collect(),
                rate_limiters: spec
                    .rate_limiters
                    .iter()
                    .map(|r| {
                        let before =
                            previous(old, |p| &p.rate_limiters, |l| &l.name, &r.name.value.0);
                        Arc::new(RateLimiter::compile(
                            &name,
                            r,
                            metrics,
                            max_label_values,
                            store.map(|s| (s, clock)),
                            before,
                        ))
                    })
                    .collect(),
                concurrency_limiters: spec
                    .concurrency_limiters
                    .iter()
                    .map(|c| {
                        let before = previous(
                            old,
                            |p| &p.concurrency_limiters,
                            |l| &l.name,
                            &c.name.value.0,
                        );
                        Arc::new(ConcurrencyLimiter::compile(
                            &name,
                            c,
                            metrics,
                            max_label_values,
                            store,
                            before,
                        ))
                    })
                    .collect(),
                concurrency_schedulers: spec
                    .concurrency_schedulers
                    .iter()
                    .map(|c| {
                        let before = previous(
                            old,
                            |p| &p.concurrency_schedulers,
                            |s| &s.scheduler.name,
                            &c.name.value.0,
                        );
                        Arc::new(ConcurrencyScheduler::compile(
                            &name, c, metrics, clock, store, before,
                        ))
                    })
                    .collect(),
                quota_schedulers: spec
                    .quota_schedulers
                    .iter()
                    .map(|q| {
                        let before = previous(
                            old,
                            |p| &p.quota_schedulers,
                            |s| &s.scheduler.name,
                            &q.name.value.0,
                        );
                        Arc::new(QuotaScheduler::compile(
                            &name,
                            q,
                            metrics,
                            clock,
                            max_label_values,
                            store,
                            before,
                        ))
                    })
                    .collect(),
                load_schedulers: spec
                    .load_schedulers
                    .iter()
                    .map(|l| {
                        let before = previous(
                            old,
                            |p| &p.load_schedulers,
                            |s| &s.scheduler.name,
                            &l.name.value.0,
                        );
                        Arc::new(LoadScheduler::compile(&name, l, metrics, clock, before))
                    })
                    .collect(),
                name,
                file: loaded.file.clone(),
                hash: loaded.hash,
            };
            for c in &compiled.classifiers {
                for (cp, staged) in by_control_point(c, &c.selectors) {
                    plan.stages(&cp).classifiers.push(staged);
                }
            }
            for f in &compiled.flux_meters {
                for (cp, staged) in by_control_point(f, &f.selectors) {
                    plan.stages(&cp).flux_meters.push(staged);
                }
                plan.flux_meters.insert(f.key.clone(), f.clone());
            }
            for s in &compiled.samplers {
                for (cp, staged) in by_control_point(s, &s.selectors) {
                    plan.stages(&cp).samplers.push(staged);
                }
            }
            for r in &compiled.rate_limiters {
                for (cp, staged) in by_control_point(r, &r.selectors) {
                    plan.stages(&cp).rate_limiters.push(staged);
                }
            }
            for c in &compiled.concurrency_limiters {
                for (cp, staged) in by_control_point(c, &c.selectors) {
                    plan.stages(&cp).concurrency_limiters.push(staged);
                }
            }
            for s in compiled.schedulers() {
                let selectors = match &s {
                    AnyScheduler::Concurrency(c) => c.scheduler.selectors.clone(),
                    AnyScheduler::Quota(q) => q.scheduler.selectors.clone(),
                    AnyScheduler::Load(l) => l.scheduler.selectors.clone(),
                };
                let key: Box<str> = s.key().into();
                let s = Arc::new(s);
                for (cp, staged) in by_control_point(&s, &selectors) {
                    plan.stages(&cp).schedulers.push(staged);
                }
                plan.schedulers.insert(key, (*s).clone());
            }
            plan.policies.push(compiled);
        }
        // Stage 6 runs kind by kind across policies: concurrency, quota, load.
        for stages in plan.control_points.values_mut() {
            stages.schedulers.sort_by_key(|s| match &*s.component {
                AnyScheduler::Concurrency(_) => 0,
                AnyScheduler::Quota(_) => 1,
                AnyScheduler::Load(_) => 2,
            });
        }
        plan
    }

    fn stages(&mut self, control_point: &str) -> &mut Stages {
        self.control_points.entry(control_point.into()).or_default()
    }
}
