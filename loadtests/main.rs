//! Sluice's load tests: Sluice against the no-op Check server on the same
//! stack, Envoy with Sluice against Envoy alone, and Envoy with Sluice
//! against Envoy with limitador (the peer), side by side in one run. See
//! loadtests/README.md for what each scenario measures and how.
//!
//! ```text
//! loadtests/run [check|http|peer|ingest|mixed|global|controller-scale|all] [--duration 10s] [--smoke]
//!               [--generator rust|k6|h2load] [--users 10000] [--repeat 3] [--out FILE]
//!               [--no-pin] [--server-threads N] [--peer-rate 2000]
//!               [--sidecars 1000] [--sidecars-per-connection 1] [--ticks 20] [--tick 1s]
//! ```
//!
//! Every comparison runs its sides back to back (no-op, Sluice, no-op,
//! Sluice, ...) `--repeat` times; ratios are the median of the per-pair
//! ratios and the summary table holds medians, because the machines this
//! runs on are shared and noisy.
//!
//! `controller-scale` is not a comparison: sluice-controller with
//! `--sidecars` subscriptions, timed tick by tick (`controller_scale.rs`).

mod controller_scale;
mod generate;
mod h2load;
mod k6;
mod overload;
mod shots;
mod target;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use sluice_testkit::repo_root;

use generate::{Load, Stats};
use target::{Placement, Server};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Check,
    Http,
    Peer,
    Ingest,
    Mixed,
    Global,
    /// Runs on its own (`overload_main`), not in `all`.
    Overload,
    ControllerScale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Generator {
    Rust,
    K6,
    H2load,
}

struct Args {
    scenarios: Vec<Scenario>,
    duration: Duration,
    smoke: bool,
    generator: Generator,
    users: u64,
    out: Option<PathBuf>,
    pin: bool,
    server_threads: Option<usize>,
    repeat: usize,
    /// `overload`: the profiles and loops to run (all when none named),
    /// and the short form.
    profiles: Vec<overload::Profile>,
    loops: Vec<overload::Loop>,
    short: bool,
    /// `controller-scale`'s sidecars, ticks and tick.
    scale: controller_scale::Scale,
    /// `peer`'s fixed rate, HTTP requests/s, when given.
    peer_rate: Option<u64>,
}

const USAGE: &str = "usage: loadtest [check|http|peer|ingest|mixed|global|controller-scale|all] [--duration 10s] [--smoke] \
[--generator rust|k6|h2load] [--users 10000] [--repeat 3] [--out FILE] [--no-pin] [--server-threads N] [--peer-rate 2000] \
[--sidecars 1000] [--sidecars-per-connection 1] [--ticks 20] [--tick 1s]
       loadtest overload [--profile growing|workers|halving]... [--loop NAME]... [--repeat 1] [--short] [--out FILE]";

fn args() -> Result<Args, String> {
    let mut a = Args {
        scenarios: Vec::new(),
        duration: Duration::from_secs(10),
        smoke: false,
        generator: Generator::Rust,
        users: 10_000,
        out: None,
        pin: true,
        server_threads: None,
        repeat: 3,
        profiles: Vec::new(),
        loops: Vec::new(),
        short: false,
        scale: controller_scale::Scale::new(false),
        peer_rate: None,
    };
    let mut repeat_given = false;
    // `controller-scale`'s sizes as given; the rest from --smoke.
    let (mut sidecars, mut per_connection, mut ticks, mut tick) = (None, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "check" => a.scenarios.push(Scenario::Check),
            "http" => a.scenarios.push(Scenario::Http),
            "peer" => a.scenarios.push(Scenario::Peer),
            "ingest" => a.scenarios.push(Scenario::Ingest),
            "mixed" => a.scenarios.push(Scenario::Mixed),
            "global" => a.scenarios.push(Scenario::Global),
            "controller-scale" => a.scenarios.push(Scenario::ControllerScale),
            "overload" => a.scenarios.push(Scenario::Overload),
            "--profile" => {
                let v = value()?;
                let p = overload::Profile::ALL.into_iter().find(|p| p.name() == v);
                a.profiles
                    .push(p.ok_or(format!("--profile: growing, workers or halving, not {v}"))?);
            }
            "--loop" => {
                let v = value()?;
                let l = overload::Loop::ALL.into_iter().find(|l| l.name() == v);
                let names: Vec<&str> = overload::Loop::ALL.iter().map(|l| l.name()).collect();
                a.loops
                    .push(l.ok_or(format!("--loop: one of {}, not {v}", names.join(", ")))?);
            }
            "--short" => a.short = true,
            "all" => a.scenarios.extend([
                Scenario::Check,
                Scenario::Http,
                Scenario::Peer,
                Scenario::Ingest,
                Scenario::Mixed,
                Scenario::Global,
                Scenario::ControllerScale,
            ]),
            "--duration" => a.duration = sluice_policy::types::DurationSpec::parse(&value()?)?,
            "--smoke" => a.smoke = true,
            "--generator" => {
                a.generator = match value()?.as_str() {
                    "rust" => Generator::Rust,
                    "k6" => Generator::K6,
                    "h2load" => Generator::H2load,
                    other => {
                        return Err(format!("--generator: rust, k6 or h2load, not {other}"));
                    }
                }
            }
            "--users" => a.users = value()?.parse().map_err(|e| format!("--users: {e}"))?,
            "--peer-rate" => {
                a.peer_rate = Some(
                    value()?
                        .parse::<u64>()
                        .map_err(|e| format!("--peer-rate: {e}"))?
                        .max(1),
                )
            }
            "--out" => a.out = Some(PathBuf::from(value()?)),
            "--no-pin" => a.pin = false,
            "--repeat" => {
                repeat_given = true;
                a.repeat = value()?
                    .parse::<usize>()
                    .map_err(|e| format!("--repeat: {e}"))?
                    .max(1)
            }
            "--server-threads" => {
                a.server_threads = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--server-threads: {e}"))?,
                )
            }
            "--sidecars" => {
                sidecars = Some(
                    value()?
                        .parse::<usize>()
                        .map_err(|e| format!("--sidecars: {e}"))?
                        .max(1),
                )
            }
            "--sidecars-per-connection" => {
                per_connection = Some(
                    value()?
                        .parse::<usize>()
                        .map_err(|e| format!("--sidecars-per-connection: {e}"))?
                        .max(1),
                )
            }
            "--ticks" => {
                ticks = Some(
                    value()?
                        .parse::<usize>()
                        .map_err(|e| format!("--ticks: {e}"))?
                        .max(1),
                )
            }
            "--tick" => tick = Some(sluice_policy::types::DurationSpec::parse(&value()?)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if a.scenarios.is_empty() {
        a.scenarios.push(Scenario::Check);
    }
    if a.scenarios.contains(&Scenario::Overload) {
        if a.scenarios.len() > 1 {
            return Err("overload runs on its own".to_owned());
        }
        // A minute a run, nine runs: once each unless asked.
        if !repeat_given {
            a.repeat = 1;
        }
    }
    if a.smoke {
        a.duration = a.duration.min(Duration::from_secs(1));
        a.repeat = 1;
    }
    let scale = &mut a.scale;
    *scale = controller_scale::Scale::new(a.smoke);
    scale.sidecars = sidecars.unwrap_or(scale.sidecars);
    scale.per_connection = per_connection.unwrap_or(scale.per_connection);
    scale.ticks = ticks.unwrap_or(scale.ticks);
    scale.tick = tick.unwrap_or(scale.tick);
    Ok(a)
}

/// One measured run: client-side figures and the servers' costs.
#[derive(Clone, Debug, Serialize)]
struct Run {
    scenario: &'static str,
    /// What was loaded: `noop`, `sluice`, `envoy alone`, ...
    target: String,
    /// `max(64)` or `5000/s`.
    load: String,
    generator: &'static str,
    /// Answered requests per second (records per second for ingest).
    throughput: f64,
    ok: u64,
    denied: u64,
    errors: u64,
    mean_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// CPU seconds per 1,000 requests (records for ingest) of the Check
    /// server (Sluice or the no-op); 0 where there is none.
    server_cpu_s_per_1k: f64,
    /// Cores the Check server used on average.
    server_cores: f64,
    /// Same for Envoy, in the scenarios through Envoy.
    envoy_cpu_s_per_1k: Option<f64>,
    envoy_cores: Option<f64>,
    /// Cores the load generator used (near 1 at "max": generator-bound).
    generator_cores: f64,
    /// The Check server's peak resident set so far, MiB.
    server_peak_rss_mib: f64,
}

impl Run {
    fn show(&self) {
        let envoy = self
            .envoy_cores
            .zip(self.envoy_cpu_s_per_1k)
            .map(|(c, s)| format!(" envoy {c:.2} cores ({s:.3} s/1k)"))
            .unwrap_or_default();
        println!(
            "  {:<7} {:<14} {:<10} {:>9.0}/s  mean {:>7.0}µs p50 {:>7.0}µs p90 {:>7.0}µs p99 {:>7.0}µs p99.9 {:>7.0}µs  ok {} denied {} errors {}  server {:.2} cores ({:.3} s/1k){envoy}  generator {:.2} cores  rss {:.1} MiB",
            self.scenario,
            self.target,
            self.load,
            self.throughput,
            self.mean_us,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.ok,
            self.denied,
            self.errors,
            self.server_cores,
            self.server_cpu_s_per_1k,
            self.generator_cores,
            self.server_peak_rss_mib,
        );
    }
}

/// CPU used by the server, Envoy and the generator while `work` ran.
struct Costs {
    server: Duration,
    envoy: Option<Duration>,
    generator: Duration,
}

async fn measured<T>(
    server: Option<&Server>,
    envoy: Option<&Server>,
    work: impl Future<Output = T>,
) -> (T, Costs) {
    let cpu = |s: Option<&Server>| s.map(Server::cpu).unwrap_or_default();
    let (s0, e0, g0) = (cpu(server), envoy.map(Server::cpu), target::own_cpu());
    let out = work.await;
    let costs = Costs {
        server: cpu(server).saturating_sub(s0),
        envoy: envoy
            .map(Server::cpu)
            .zip(e0)
            .map(|(a, b)| a.saturating_sub(b)),
        generator: target::own_cpu().saturating_sub(g0),
    };
    (out, costs)
}

/// The run's row, `units` per answered request (records per Export).
#[allow(clippy::too_many_arguments)]
fn row(
    scenario: &'static str,
    target: &str,
    load: Load,
    generator: Generator,
    stats: &Stats,
    costs: &Costs,
    units: f64,
    server: Option<&Server>,
) -> Run {
    let answered = (stats.ok + stats.denied) as f64 * units;
    let secs = stats.elapsed.as_secs_f64().max(1e-9);
    let per_1k = |d: Duration| d.as_secs_f64() * 1000.0 / answered.max(1.0);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Run {
        scenario,
        target: target.to_owned(),
        load: match load {
            Load::Rate(r) => format!("{r}/s"),
            Load::Max(n) => format!("max({n})"),
        },
        generator: match generator {
            Generator::Rust => "rust",
            Generator::K6 => "k6",
            Generator::H2load => "h2load",
        },
        throughput: stats.throughput() * units,
        ok: stats.ok,
        denied: stats.denied,
        errors: stats.errors,
        mean_us: us(stats.mean),
        p50_us: us(stats.p50),
        p90_us: us(stats.p90),
        p99_us: us(stats.p99),
        p999_us: us(stats.p999),
        server_cpu_s_per_1k: per_1k(costs.server),
        server_cores: costs.server.as_secs_f64() / secs,
        envoy_cpu_s_per_1k: costs.envoy.map(per_1k),
        envoy_cores: costs.envoy.map(|d| d.as_secs_f64() / secs),
        generator_cores: costs.generator.as_secs_f64() / secs,
        server_peak_rss_mib: server.map_or(0.0, |s| s.peak_rss() as f64 / (1024.0 * 1024.0)),
    }
}

/// The median of `values` (the mean of the middle two for an even count);
/// 0 for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Everything one invocation measured.
#[derive(Default, Serialize)]
struct Report {
    machine: Machine,
    command: String,
    runs: Vec<Run>,
    /// Named ratios and figures the targets are judged on.
    figures: Vec<Figure>,
}

#[derive(Serialize)]
struct Figure {
    name: &'static str,
    value: f64,
    /// `<= 1.5`, `>= 0.85`, ...: the target, when there is one.
    target: Option<&'static str>,
    met: Option<bool>,
}

#[derive(Default, Serialize)]
struct Machine {
    cores: usize,
    cpu: String,
    kernel: String,
    servers_on: Option<String>,
    generator_on: Option<String>,
}

impl Report {
    /// The runs of `scenario` (all when `None`) grouped by (scenario,
    /// target, load), in the order first run.
    fn groups(&self, scenario: Option<&str>) -> Vec<(&Run, Vec<&Run>)> {
        let mut groups: Vec<(&Run, Vec<&Run>)> = Vec::new();
        for run in &self.runs {
            if scenario.is_some_and(|s| s != run.scenario) {
                continue;
            }
            let same = |r: &Run| {
                r.scenario == run.scenario && r.target == run.target && r.load == run.load
            };
            match groups.iter_mut().find(|(first, _)| same(first)) {
                Some((_, all)) => all.push(run),
                None => groups.push((run, vec![run])),
            }
        }
        groups
    }

    /// Medians per (scenario, target, load), in the order first run, as a
    /// Markdown table.
    fn table(&self) -> String {
        let groups = self.groups(None);
        let mut out = String::from(
            "| scenario | target | load | throughput/s | p50 µs | p99 µs | p99.9 µs | server CPU s/1k | server cores | Envoy cores | generator cores | server peak RSS MiB | runs |\n\
             | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for (first, all) in groups {
            let m = |f: fn(&Run) -> f64| median(all.iter().map(|r| f(r)));
            let envoy = if first.envoy_cores.is_some() {
                format!("{:.2}", m(|r| r.envoy_cores.unwrap_or(0.0)))
            } else {
                "-".to_owned()
            };
            out.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.4} | {:.2} | {envoy} | {:.2} | {:.1} | {} |\n",
                first.scenario,
                first.target,
                first.load,
                m(|r| r.throughput),
                m(|r| r.p50_us),
                m(|r| r.p99_us),
                m(|r| r.p999_us),
                m(|r| r.server_cpu_s_per_1k),
                m(|r| r.server_cores),
                m(|r| r.generator_cores),
                m(|r| r.server_peak_rss_mib),
                all.len(),
            ));
        }
        out
    }

    /// `peer`'s runs in full: medians of the mean and four percentiles,
    /// and Envoy's and the server's CPU apart and together. Empty when
    /// `peer` did not run.
    fn peer_table(&self) -> String {
        let groups = self.groups(Some("peer"));
        if groups.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "| target | load | throughput/s | mean µs | p50 µs | p90 µs | p99 µs | p99.9 µs | Envoy CPU s/1k | Envoy cores | server CPU s/1k | server cores | Envoy + server CPU s/1k | generator cores | runs |\n\
             | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for (first, all) in groups {
            let m = |f: fn(&Run) -> f64| median(all.iter().map(|r| f(r)));
            // Envoy alone has no server: its columns say so.
            let server = |v: f64, digits: usize| {
                if first.target.contains('+') {
                    format!("{v:.digits$}")
                } else {
                    "-".to_owned()
                }
            };
            out.push_str(&format!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.4} | {:.2} | {} | {} | {:.4} | {:.2} | {} |\n",
                first.target,
                first.load,
                m(|r| r.throughput),
                m(|r| r.mean_us),
                m(|r| r.p50_us),
                m(|r| r.p90_us),
                m(|r| r.p99_us),
                m(|r| r.p999_us),
                m(|r| r.envoy_cpu_s_per_1k.unwrap_or(0.0)),
                m(|r| r.envoy_cores.unwrap_or(0.0)),
                server(m(|r| r.server_cpu_s_per_1k), 4),
                server(m(|r| r.server_cores), 2),
                m(total_cpu_s_per_1k),
                m(|r| r.generator_cores),
                all.len(),
            ));
        }
        out
    }

    fn figure(&mut self, name: &'static str, value: f64, target: Option<(&'static str, bool)>) {
        self.figures.push(Figure {
            name,
            value,
            target: target.map(|t| t.0),
            met: target.map(|t| t.1),
        });
    }
}

/// Knobs derived from the arguments.
struct Plan {
    duration: Duration,
    warmup: Duration,
    users: u64,
    generator: Generator,
    /// gRPC connections (Envoy keeps one per worker).
    connections: usize,
    /// Closed-loop workers for the gRPC maximum.
    grpc_workers: usize,
    /// Closed-loop workers for the HTTP maximum (keep-alive connections).
    http_workers: usize,
    /// Fixed rates: Checks/s for `mixed`, HTTP requests/s.
    check_rate: u64,
    http_rate: u64,
    /// `peer`'s fixed rate, HTTP requests/s.
    peer_rate: u64,
    /// Records per Export, and records/s in `mixed`.
    records: usize,
    record_rate: u64,
    smoke: bool,
    /// Interleaved repetitions of every comparison.
    repeat: usize,
    /// `controller-scale`'s sizes.
    scale: controller_scale::Scale,
}

impl Plan {
    fn new(a: &Args) -> Plan {
        Plan {
            duration: a.duration,
            warmup: if a.smoke {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(2)
            },
            users: a.users,
            generator: a.generator,
            connections: 2,
            grpc_workers: if a.smoke { 4 } else { 64 },
            http_workers: if a.smoke { 4 } else { 32 },
            check_rate: if a.smoke { 200 } else { 5000 },
            http_rate: if a.smoke { 100 } else { 1000 },
            peer_rate: a.peer_rate.unwrap_or(if a.smoke { 100 } else { 2000 }),
            records: 50,
            record_rate: if a.smoke { 200 } else { 5000 },
            smoke: a.smoke,
            repeat: a.repeat,
            scale: a.scale,
        }
    }
}

/// One run of Checks against `server`, from the chosen generator, as a
/// row of `scenario`.
async fn check_run(
    scenario: &'static str,
    plan: &Plan,
    server: &Server,
    shot: &shots::Grpc<shots::CheckVerdict>,
    load: Load,
) -> anyhow::Result<Run> {
    let (stats, costs) = measured(Some(server), None, async {
        match plan.generator {
            Generator::Rust => Ok(generate::run(shot, load, plan.duration, 1 << 32).await),
            Generator::K6 => k6::checks(server.addr, load, plan.duration, plan.users).await,
            Generator::H2load => {
                h2load::checks(server.addr, load, plan.duration, plan.connections).await
            }
        }
    })
    .await;
    let run = row(
        scenario,
        server.name,
        load,
        plan.generator,
        &stats?,
        &costs,
        1.0,
        Some(server),
    );
    run.show();
    if run.errors > 0 {
        eprintln!("{} log:\n{}", server.name, server.log_tail());
    }
    Ok(run)
}

async fn check_scenario(place: &Placement, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    println!("check: gRPC Checks straight to the no-op server and to Sluice (benchmark policy)");
    let noop = Server::noop(place).await?;
    let sluice = Server::sluice(place, &repo_root().join("examples/bench.yaml")).await?;
    let servers = [&noop, &sluice];
    let mut shots = Vec::new();
    for s in servers {
        let shot = shots::checks(shots::connect(s.addr, plan.connections).await?, plan.users);
        // Connections up, every user's state in place.
        generate::run(&shot, Load::Rate(1000), plan.warmup, 0).await;
        shots.push(shot);
    }
    // Each pair: (no-op, Sluice), run back to back.
    let shots = &shots;
    let pairs = |load: Load| async move {
        let mut pairs = Vec::new();
        for _ in 0..plan.repeat {
            let mut pair = Vec::new();
            for (s, shot) in servers.iter().zip(shots) {
                pair.push(check_run("check", plan, s, shot, load).await?);
            }
            pairs.push((pair[0].clone(), pair[1].clone()));
        }
        anyhow::Ok(pairs)
    };
    let max = pairs(Load::Max(plan.grpc_workers)).await?;
    let noop_max = median(max.iter().map(|p| p.0.throughput));
    let half = ((noop_max / 2.0 / 100.0).round() as u64 * 100).max(100);
    let at_half = pairs(Load::Rate(half)).await?;
    let at_rate = if plan.check_rate < half {
        pairs(Load::Rate(plan.check_rate)).await?
    } else {
        Vec::new()
    };
    for (a, b) in max.iter().chain(&at_half).chain(&at_rate) {
        report.runs.extend([a.clone(), b.clone()]);
    }
    let throughput = median(
        max.iter()
            .map(|(n, s)| s.throughput / n.throughput.max(1e-9)),
    );
    report.figure(
        "check: Sluice ÷ no-op throughput at the maximum",
        throughput,
        Some((">= 0.85", throughput >= 0.85)),
    );
    let p99_ratio = median(at_half.iter().map(|(n, s)| s.p99_us / n.p99_us.max(1e-9)));
    report.figure(
        "check: Sluice ÷ no-op p99 at half the no-op's maximum",
        p99_ratio,
        Some(("<= 1.5", p99_ratio <= 1.5)),
    );
    if !at_rate.is_empty() {
        report.figure(
            "check: Sluice ÷ no-op CPU per Check at the fixed rate",
            median(
                at_rate
                    .iter()
                    .map(|(n, s)| s.server_cpu_s_per_1k / n.server_cpu_s_per_1k.max(1e-9)),
            ),
            None,
        );
    }
    let rss = sluice.peak_rss() as f64 / 1e6;
    let users_note = plan.users >= 10_000;
    report.figure(
        "check: Sluice peak RSS (MB) with the benchmark policy's users active",
        rss,
        users_note.then_some(("<= 30", rss <= 30.0)),
    );
    Ok(())
}

async fn http_scenario(place: &Placement, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    println!(
        "http: through Envoy alone, Envoy + ext_authz to the no-op, Envoy + ext_authz + access log to Sluice"
    );
    let noop = Server::noop(place).await?;
    let sluice = Server::sluice(place, &repo_root().join("examples/bench.yaml")).await?;
    let setups = [
        (
            Server::envoy(place, "envoy alone", "loadtests/envoy/alone.yaml", None).await?,
            None,
        ),
        (
            Server::envoy(
                place,
                "envoy + noop",
                "loadtests/envoy/noop-authz.yaml",
                Some(noop.addr),
            )
            .await?,
            Some(&noop),
        ),
        (
            Server::envoy(
                place,
                "envoy + sluice",
                "loadtests/envoy/sluice.yaml",
                Some(sluice.addr),
            )
            .await?,
            Some(&sluice),
        ),
    ];
    let mut shots = Vec::new();
    for (envoy, _) in &setups {
        let shot = shots::HttpGet::new(envoy.addr, plan.users)?;
        generate::run(&shot, Load::Rate(500), plan.warmup, 0).await;
        shots.push(shot);
    }
    // Per repetition and load: (alone, + no-op, + Sluice), back to back.
    let mut triples: Vec<(Load, Vec<Run>)> = Vec::new();
    for load in [Load::Max(plan.http_workers), Load::Rate(plan.http_rate)] {
        for _ in 0..plan.repeat {
            let mut triple = Vec::new();
            for ((envoy, server), shot) in setups.iter().zip(&shots) {
                let (stats, costs) = measured(
                    *server,
                    Some(envoy),
                    generate::run(shot, load, plan.duration, 1 << 32),
                )
                .await;
                let run = row(
                    "http",
                    envoy.name,
                    load,
                    Generator::Rust,
                    &stats,
                    &costs,
                    1.0,
                    *server,
                );
                run.show();
                if run.errors > 0 {
                    eprintln!("{} log:\n{}", envoy.name, envoy.log_tail());
                }
                triple.push(run);
            }
            report.runs.extend(triple.iter().cloned());
            triples.push((load, triple));
        }
    }
    let at = |fixed: bool, f: fn(&[Run]) -> f64| {
        median(
            triples
                .iter()
                .filter(|(l, _)| matches!(l, Load::Rate(_)) == fixed)
                .map(|(_, t)| f(t)),
        )
    };
    report.figure(
        "http: Envoy + Sluice ÷ Envoy alone p50 at the fixed rate",
        at(true, |t| t[2].p50_us / t[0].p50_us.max(1e-9)),
        None,
    );
    report.figure(
        "http: Envoy + Sluice ÷ Envoy + no-op p50 at the fixed rate",
        at(true, |t| t[2].p50_us / t[1].p50_us.max(1e-9)),
        None,
    );
    report.figure(
        "http: Envoy + Sluice ÷ Envoy + no-op throughput at the maximum",
        at(false, |t| t[2].throughput / t[1].throughput.max(1e-9)),
        None,
    );
    Ok(())
}

/// CPU seconds per 1,000 requests of Envoy and the server together.
fn total_cpu_s_per_1k(run: &Run) -> f64 {
    run.envoy_cpu_s_per_1k.unwrap_or(0.0) + run.server_cpu_s_per_1k
}

/// Envoy's counter of errors of its rate-limit filter (the route's
/// cluster is `app` in every peer config), and of its answers.
const LIMIT_ERRORS: &str = "cluster.app.ratelimit.error";
const LIMIT_OK: &str = "cluster.app.ratelimit.ok";

/// `peer`: HTTP GETs through Envoy six ways, interleaved (each repetition
/// runs the six in turn): alone; with ext_authz to the no-op; with its
/// rate-limit filter asking limitador (`examples/limitador_rls.rs`, one
/// per-user limit); and with Sluice three ways: `sluice bench` (the
/// benchmark policy, and the shipped ext_authz filter and access log),
/// `sluice limit` (the per-user limit alone, `loadtests/peer.yaml`, behind
/// the same shipped filter and log: every header, and a log nothing
/// reads), and `sluice lean` (that policy behind what `sluice envoy-config`
/// writes for it: one header, no log). `sluice lean` is limitador's like:
/// the targets are judged on it. At `--peer-rate` and at the maximum, over
/// `--users` user ids in the `user-id` header that every limiter keys on.
async fn peer_scenario(place: &Placement, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    println!(
        "peer: through Envoy alone, + ext_authz to the no-op, + rate limit to limitador, + Sluice (bench policy; a per-user limit; the same, lean config)"
    );
    let noop = Server::noop(place).await?;
    let limitador = Server::limitador(place).await?;
    let sluice = Server::sluice(place, &repo_root().join("examples/bench.yaml")).await?;
    let limit = repo_root().join("loadtests/peer.yaml");
    let sluice_limit = Server::sluice_with(place, "sluice limit", &limit, &[]).await?;
    let sluice_lean = Server::sluice_with(place, "sluice lean", &limit, &[]).await?;
    let config = |file: &str| format!("loadtests/envoy/{file}");
    let setups = [
        (
            Server::envoy(place, "envoy alone", &config("peer-alone.yaml"), None).await?,
            None,
        ),
        (
            Server::envoy(
                place,
                "envoy + noop",
                &config("peer-noop-authz.yaml"),
                Some(noop.addr),
            )
            .await?,
            Some(&noop),
        ),
        (
            Server::envoy(
                place,
                "envoy + limitador",
                &config("limitador.yaml"),
                Some(limitador.addr),
            )
            .await?,
            Some(&limitador),
        ),
        (
            Server::envoy(
                place,
                "envoy + sluice bench",
                &config("peer-sluice.yaml"),
                Some(sluice.addr),
            )
            .await?,
            Some(&sluice),
        ),
        (
            Server::envoy(
                place,
                "envoy + sluice limit",
                &config("peer-sluice.yaml"),
                Some(sluice_limit.addr),
            )
            .await?,
            Some(&sluice_limit),
        ),
        (
            Server::envoy(
                place,
                "envoy + sluice lean",
                &config("peer-sluice-lean.yaml"),
                Some(sluice_lean.addr),
            )
            .await?,
            Some(&sluice_lean),
        ),
    ];
    let mut shots = Vec::new();
    for (envoy, _) in &setups {
        let shot = shots::HttpGet::new(envoy.addr, plan.users)?;
        generate::run(&shot, Load::Rate(500), plan.warmup, 0).await;
        shots.push(shot);
    }
    // A rate-limit filter that asks nothing (a direct response, a route
    // without the action) would make limitador's side free.
    let asked = setups[2].0.envoy_counter(LIMIT_OK).await?;
    anyhow::ensure!(
        asked > 0,
        "peer: Envoy's rate-limit filter never asked limitador"
    );
    // Per repetition and load: the four, back to back.
    let mut sets: Vec<(Load, Vec<Run>)> = Vec::new();
    for load in [Load::Max(plan.http_workers), Load::Rate(plan.peer_rate)] {
        for _ in 0..plan.repeat {
            let mut set = Vec::new();
            for ((envoy, server), shot) in setups.iter().zip(&shots) {
                // The rate-limit filter fails open: a request its service
                // did not answer passes unasked, fast. Count those as
                // failed.
                let limit_errors = envoy.envoy_counter(LIMIT_ERRORS).await?;
                let (stats, costs) = measured(
                    *server,
                    Some(envoy),
                    generate::run(shot, load, plan.duration, 1 << 32),
                )
                .await;
                let mut run = row(
                    "peer",
                    envoy.name,
                    load,
                    Generator::Rust,
                    &stats,
                    &costs,
                    1.0,
                    *server,
                );
                run.errors += envoy
                    .envoy_counter(LIMIT_ERRORS)
                    .await?
                    .saturating_sub(limit_errors);
                run.show();
                if run.errors > 0 || run.denied > 0 {
                    eprintln!("{} log:\n{}", envoy.name, envoy.log_tail());
                }
                set.push(run);
            }
            report.runs.extend(set.iter().cloned());
            sets.push((load, set));
        }
    }

    let (alone, noop, limitador, bench, full, lean) = (0, 1, 2, 3, 4, 5);
    let at = |fixed: bool, f: &dyn Fn(&[Run]) -> f64| {
        median(
            sets.iter()
                .filter(|(l, _)| matches!(l, Load::Rate(_)) == fixed)
                .map(|(_, s)| f(s)),
        )
    };
    let ratio =
        |a: usize, b: usize, f: fn(&Run) -> f64| move |s: &[Run]| f(&s[a]) / f(&s[b]).max(1e-9);
    let judged = |value: f64| (!plan.smoke).then_some(("<= 1.0", value <= 1.0));
    let mut judge = |what: &'static str, value: f64| report.figure(what, value, judged(value));
    judge(
        "peer: Envoy + Sluice lean ÷ Envoy + limitador, mean at the fixed rate",
        at(true, &ratio(lean, limitador, |r| r.mean_us)),
    );
    judge(
        "peer: Envoy + Sluice lean ÷ Envoy + limitador, p99 at the fixed rate",
        at(true, &ratio(lean, limitador, |r| r.p99_us)),
    );
    judge(
        "peer: Envoy + Sluice lean ÷ Envoy + limitador, total CPU at the fixed rate",
        at(true, &ratio(lean, limitador, total_cpu_s_per_1k)),
    );
    let throughput = at(false, &ratio(lean, noop, |r| r.throughput));
    report.figure(
        "peer: Envoy + Sluice lean ÷ Envoy + no-op, throughput at the maximum",
        throughput,
        (!plan.smoke).then_some((">= 0.95", throughput >= 0.95)),
    );
    // (name, at the fixed rate or the maximum, of, over, what)
    type Ratio = (&'static str, bool, usize, usize, fn(&Run) -> f64);
    let figures: [Ratio; 10] = [
        (
            "peer: Envoy + Sluice lean ÷ limitador, total CPU at the maximum",
            false,
            lean,
            limitador,
            total_cpu_s_per_1k,
        ),
        (
            "peer: Envoy + Sluice lean ÷ limitador, throughput at the maximum",
            false,
            lean,
            limitador,
            |r| r.throughput,
        ),
        (
            "peer: Envoy + Sluice limit ÷ limitador, mean at the fixed rate",
            true,
            full,
            limitador,
            |r| r.mean_us,
        ),
        (
            "peer: Envoy + Sluice bench ÷ limitador, mean at the fixed rate",
            true,
            bench,
            limitador,
            |r| r.mean_us,
        ),
        (
            "peer: Envoy + Sluice lean ÷ Sluice limit, mean at the fixed rate",
            true,
            lean,
            full,
            |r| r.mean_us,
        ),
        (
            "peer: Envoy + Sluice lean ÷ Sluice limit, total CPU at the fixed rate",
            true,
            lean,
            full,
            total_cpu_s_per_1k,
        ),
        (
            "peer: Envoy + Sluice lean ÷ Sluice limit, Envoy CPU at the fixed rate",
            true,
            lean,
            full,
            |r| r.envoy_cpu_s_per_1k.unwrap_or(0.0),
        ),
        (
            "peer: Envoy + Sluice lean ÷ Sluice limit, throughput at the maximum",
            false,
            lean,
            full,
            |r| r.throughput,
        ),
        (
            "peer: Envoy + no-op ÷ limitador, mean at the fixed rate",
            true,
            noop,
            limitador,
            |r| r.mean_us,
        ),
        (
            "peer: Envoy + limitador ÷ alone, mean at the fixed rate",
            true,
            limitador,
            alone,
            |r| r.mean_us,
        ),
    ];
    for (what, fixed, a, b, f) in figures {
        report.figure(what, at(fixed, &ratio(a, b, f)), None);
    }
    Ok(())
}

async fn ingest_scenario(
    place: &Placement,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    println!(
        "ingest: OTLP access-log Exports of {} records to Sluice, as fast as it takes them",
        plan.records
    );
    let sluice = Server::sluice(place, &repo_root().join("examples/bench.yaml")).await?;
    let shot = shots::exports(
        shots::connect(sluice.addr, plan.connections).await?,
        &sluice.flow_key.context("Sluice's flow key")?,
        plan.records,
    );
    generate::run(&shot, Load::Rate(20), plan.warmup, 0).await;
    let load = Load::Max(plan.connections * 2);
    let mut runs = Vec::new();
    for _ in 0..plan.repeat {
        let (stats, costs) = measured(
            Some(&sluice),
            None,
            generate::run(&shot, load, plan.duration, 0),
        )
        .await;
        let run = row(
            "ingest",
            "sluice",
            load,
            Generator::Rust,
            &stats,
            &costs,
            plan.records as f64,
            Some(&sluice),
        );
        run.show();
        runs.push(run);
    }
    report.figure(
        "ingest: records/s at the maximum",
        median(runs.iter().map(|r| r.throughput)),
        None,
    );
    report.figure(
        "ingest: Sluice CPU seconds per 1,000 records",
        median(runs.iter().map(|r| r.server_cpu_s_per_1k)),
        None,
    );
    report.runs.extend(runs);
    Ok(())
}

async fn mixed_scenario(place: &Placement, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    println!(
        "mixed: Sluice at {} Checks/s, alone and with {} access-log records/s",
        plan.check_rate, plan.record_rate
    );
    let sluice = Server::sluice(place, &repo_root().join("examples/bench.yaml")).await?;
    let checks = shots::checks(
        shots::connect(sluice.addr, plan.connections).await?,
        plan.users,
    );
    let exports = shots::exports(
        shots::connect(sluice.addr, plan.connections).await?,
        &sluice.flow_key.context("Sluice's flow key")?,
        plan.records,
    );
    generate::run(&checks, Load::Rate(1000), plan.warmup, 0).await;
    let load = Load::Rate(plan.check_rate);
    let export_rate = (plan.record_rate / plan.records as u64).max(1);
    let mut pairs = Vec::new();
    for _ in 0..plan.repeat {
        let (alone, costs) = measured(
            Some(&sluice),
            None,
            generate::run(&checks, load, plan.duration, 1 << 32),
        )
        .await;
        let alone = row(
            "mixed",
            "checks alone",
            load,
            Generator::Rust,
            &alone,
            &costs,
            1.0,
            Some(&sluice),
        );
        alone.show();
        let ((both, logs), costs) = measured(Some(&sluice), None, async {
            tokio::join!(
                generate::run(&checks, load, plan.duration, 2 << 32),
                generate::run(&exports, Load::Rate(export_rate), plan.duration, 0),
            )
        })
        .await;
        let mut both = row(
            "mixed",
            "checks + logs",
            load,
            Generator::Rust,
            &both,
            &costs,
            1.0,
            Some(&sluice),
        );
        // A failed Export is a failed request of this run too.
        both.errors += logs.errors;
        both.show();
        report.runs.extend([alone.clone(), both.clone()]);
        pairs.push((alone, both));
    }
    let cores = median(pairs.iter().map(|(_, b)| b.server_cores));
    let label = if plan.smoke {
        "mixed: Sluice cores (smoke rates)"
    } else {
        "mixed: Sluice cores at 5,000 Checks/s + 5,000 records/s"
    };
    report.figure(
        label,
        cores,
        (!plan.smoke).then_some(("<= 0.1", cores <= 0.1)),
    );
    report.figure(
        "mixed: Sluice cores for the Checks alone",
        median(pairs.iter().map(|(a, _)| a.server_cores)),
        None,
    );
    report.figure(
        "mixed: Check p99 with ÷ without concurrent ingest",
        median(pairs.iter().map(|(a, b)| b.p99_us / a.p99_us.max(1e-9))),
        None,
    );
    Ok(())
}

/// A pair of runs (the benchmark policy per sidecar, then with its rate
/// limiter global), with what Redis spent during the global one.
struct GlobalPair {
    local: Run,
    global: Run,
    /// Redis CPU seconds during the global run.
    redis_cpu_s: f64,
    /// Redis commands during the global run.
    redis_commands: u64,
}

/// Commands Redis ran so far, but for the `INFO` that asks.
async fn redis_commands(redis: &sluice_testkit::redis::Redis) -> anyhow::Result<u64> {
    let calls = redis.command_calls().await?;
    Ok(calls
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(_, n)| n)
        .sum())
}

async fn global_scenario(
    place: &Placement,
    plan: &Plan,
    report: &mut Report,
) -> anyhow::Result<()> {
    println!(
        "global: the benchmark policy with its per-user rate limiter per sidecar, and with scope: global on Redis"
    );
    let redis = sluice_testkit::redis::Redis::start(&[]).await?;
    let redis_pid = redis.pid().context("redis-server has no pid")?;
    // On the servers' core: Sluice with a global limiter pays for Redis
    // there too (a pessimistic placement; in production Redis is elsewhere).
    place.pin(redis_pid)?;
    let bench = std::fs::read_to_string(repo_root().join("examples/bench.yaml"))?;
    let global_policy = bench.replace(
        "    limit_by_label_key: user\n",
        "    limit_by_label_key: user\n    scope: global\n",
    );
    anyhow::ensure!(
        global_policy != bench,
        "examples/bench.yaml has no per-user limiter"
    );
    let dir = tempfile::tempdir()?;
    let (local_path, global_path) = (
        dir.path().join("local.yaml"),
        dir.path().join("global.yaml"),
    );
    std::fs::write(&local_path, &bench)?;
    std::fs::write(&global_path, &global_policy)?;
    let local = Server::sluice_with(place, "sluice", &local_path, &[]).await?;
    let redis_url = ["--redis-url".to_owned(), redis.url()];
    let global = Server::sluice_with(place, "sluice-global", &global_path, &redis_url).await?;
    let servers = [&local, &global];

    // 10,000 users: half of the Checks for 10 hot ones (the cold half
    // each waits for a round trip to Redis), or nine in ten; and one hot
    // user alone.
    let mut skewed = Vec::new();
    let mut mostly_hot = Vec::new();
    let mut hot = Vec::new();
    for s in servers {
        let channels = shots::connect(s.addr, plan.connections).await?;
        let shot = shots::skewed_checks(channels.clone(), plan.users, 10, 5);
        generate::run(&shot, Load::Rate(1000), plan.warmup, 0).await;
        skewed.push(shot);
        mostly_hot.push(shots::skewed_checks(channels.clone(), plan.users, 10, 9));
        hot.push(shots::checks(channels, 1));
    }
    let pairs = async |shots: &[shots::Grpc<shots::CheckVerdict>], load: Load| {
        let mut pairs = Vec::new();
        for _ in 0..plan.repeat {
            let local = check_run("global", plan, &local, &shots[0], load).await?;
            let (cpu0, calls0) = (target::cpu_of_pid(redis_pid), redis_commands(&redis).await?);
            let global = check_run("global", plan, &global, &shots[1], load).await?;
            let (cpu1, calls1) = (target::cpu_of_pid(redis_pid), redis_commands(&redis).await?);
            pairs.push(GlobalPair {
                local,
                global,
                redis_cpu_s: cpu1.saturating_sub(cpu0).as_secs_f64(),
                redis_commands: calls1.saturating_sub(calls0),
            });
        }
        anyhow::Ok(pairs)
    };
    let max = pairs(&skewed, Load::Max(plan.grpc_workers)).await?;
    let max_mostly_hot = pairs(&mostly_hot, Load::Max(plan.grpc_workers)).await?;
    let local_max = median(max.iter().map(|p| p.local.throughput));
    let half = ((local_max / 2.0 / 100.0).round() as u64 * 100).max(100);
    let at_half = pairs(&skewed, Load::Rate(half)).await?;
    let hot_runs = pairs(&hot, Load::Rate(plan.check_rate)).await?;
    for p in max
        .iter()
        .chain(&max_mostly_hot)
        .chain(&at_half)
        .chain(&hot_runs)
    {
        report.runs.extend([p.local.clone(), p.global.clone()]);
    }
    let answered = |r: &Run| (r.ok + r.denied) as f64;
    let ratio = |pairs: &[GlobalPair], f: fn(&Run) -> f64| {
        median(pairs.iter().map(|p| f(&p.global) / f(&p.local).max(1e-9)))
    };
    let throughput = ratio(&max, |r| r.throughput);
    report.figure(
        "global: global ÷ per-sidecar throughput at the maximum (half the Checks cold)",
        throughput,
        Some((">= 0.8", throughput >= 0.8)),
    );
    let mostly_hot_throughput = ratio(&max_mostly_hot, |r| r.throughput);
    report.figure(
        "global: global ÷ per-sidecar throughput at the maximum (one Check in ten cold)",
        mostly_hot_throughput,
        Some((">= 0.8", mostly_hot_throughput >= 0.8)),
    );
    report.figure(
        "global: global ÷ per-sidecar p50 at half the per-sidecar maximum",
        ratio(&at_half, |r| r.p50_us),
        None,
    );
    report.figure(
        "global: global ÷ per-sidecar p99 at half the per-sidecar maximum",
        ratio(&at_half, |r| r.p99_us),
        None,
    );
    let hot_p99 = ratio(&hot_runs, |r| r.p99_us);
    report.figure(
        "global: a hot key's p99, global ÷ per-sidecar, at the fixed rate",
        hot_p99,
        Some(("<= 1.2", hot_p99 <= 1.2)),
    );
    let per_1k = |pairs: &[GlobalPair], f: fn(&GlobalPair) -> f64| {
        median(
            pairs
                .iter()
                .map(|p| f(p) * 1000.0 / answered(&p.global).max(1.0)),
        )
    };
    let hot_commands = per_1k(&hot_runs, |p| p.redis_commands as f64);
    report.figure(
        "global: Redis commands per 1,000 Checks of a hot key",
        hot_commands,
        Some(("<= 50", hot_commands <= 50.0)),
    );
    report.figure(
        "global: Redis commands per 1,000 Checks at the maximum (half the Checks cold)",
        per_1k(&max, |p| p.redis_commands as f64),
        None,
    );
    report.figure(
        "global: Redis CPU ms per 1,000 Checks at the maximum",
        per_1k(&max, |p| p.redis_cpu_s * 1000.0),
        None,
    );
    report.figure(
        "global: Redis cores at the maximum",
        median(max.iter().map(|p| {
            let secs = answered(&p.global) / p.global.throughput.max(1e-9);
            p.redis_cpu_s / secs.max(1e-9)
        })),
        None,
    );
    Ok(())
}

fn machine(cores: usize, servers_on: Option<String>, generator_on: Option<String>) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    Machine {
        cores,
        cpu,
        kernel,
        servers_on,
        generator_on,
    }
}

/// Pins this process (and the threads it starts later) to `cpus`.
fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-cp", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("taskset")?;
    anyhow::ensure!(status.success(), "taskset -cp {cpus} failed");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = args().map_err(anyhow::Error::msg)?;
    if args.scenarios == [Scenario::Overload] {
        return overload_main(&args);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Two cores or more: the generator on the first, the servers on the
    // second, so neither steals the other's time. Before any thread starts.
    let (generator_on, servers_on) =
        if args.pin && cores >= 2 && PathBuf::from("/usr/bin/taskset").exists() {
            pin_self("0")?;
            (Some("0".to_owned()), Some("1".to_owned()))
        } else {
            (None, None)
        };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let place = Placement::new(servers_on.clone(), args.server_threads)?;
        let plan = Plan::new(&args);
        let mut report = Report {
            machine: machine(cores, servers_on, generator_on),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            ..Report::default()
        };
        println!(
            "{} cores ({}), servers on {}, generator on {}; {:?} per run{}",
            report.machine.cores,
            report.machine.cpu,
            report.machine.servers_on.as_deref().unwrap_or("any core"),
            report.machine.generator_on.as_deref().unwrap_or("any core"),
            plan.duration,
            if plan.smoke { " (smoke)" } else { "" }
        );
        for scenario in &args.scenarios {
            match scenario {
                Scenario::Check => check_scenario(&place, &plan, &mut report).await?,
                Scenario::Http => http_scenario(&place, &plan, &mut report).await?,
                Scenario::Peer => peer_scenario(&place, &plan, &mut report).await?,
                Scenario::Ingest => ingest_scenario(&place, &plan, &mut report).await?,
                Scenario::Mixed => mixed_scenario(&place, &plan, &mut report).await?,
                Scenario::Global => global_scenario(&place, &plan, &mut report).await?,
                Scenario::Overload => unreachable!("runs on its own"),
                Scenario::ControllerScale => {
                    controller_scale::scenario(&place, &plan, &mut report).await?
                }
            }
        }
        println!();
        if !report.runs.is_empty() {
            println!("{}", report.table());
        }
        let peer = report.peer_table();
        if !peer.is_empty() {
            println!("peer, in full:\n\n{peer}");
        }
        for f in &report.figures {
            let verdict = match (f.target, f.met) {
                (Some(t), Some(true)) => format!("  (target {t}: met)"),
                (Some(t), Some(false)) => format!("  (target {t}: MISSED)"),
                _ => String::new(),
            };
            println!("{:<70} {:>10.3}{verdict}", f.name, f.value);
        }
        let out = args.out.clone().unwrap_or_else(|| {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            repo_root().join(format!("loadtests/results/{stamp}.json"))
        });
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
        println!("results: {}", out.display());
        let failed: u64 = report.runs.iter().map(|r| r.errors).sum();
        anyhow::ensure!(failed == 0, "{failed} requests failed");
        // A run that got no answer at all measured nothing: fail, so that a
        // smoke run proves the generators reach their targets.
        let silent: Vec<String> = report
            .runs
            .iter()
            .filter(|r| r.ok + r.denied == 0)
            .map(|r| format!("{} {} {}", r.scenario, r.target, r.load))
            .collect();
        anyhow::ensure!(silent.is_empty(), "no answers in: {}", silent.join(", "));
        // Neither of `peer`'s limiters comes near its limit: a refusal
        // there means a config or a limit is wrong, and the comparison
        // with it.
        let refused: Vec<String> = report
            .runs
            .iter()
            .filter(|r| r.scenario == "peer" && r.denied > 0)
            .map(|r| format!("{} {} ({})", r.target, r.load, r.denied))
            .collect();
        anyhow::ensure!(
            refused.is_empty(),
            "refused in peer: {}",
            refused.join(", ")
        );
        anyhow::Ok(())
    })
}

/// `loadtest overload`: every loop on every profile (or those named),
/// `--repeat` times, interleaved; the runs and a table of medians.
///
/// Not pinned: Envoy, Sluice, the controller, Prometheus, the upstream and
/// the generator all share the machine, as they would share a node.
fn overload_main(args: &Args) -> anyhow::Result<()> {
    let profiles = if args.profiles.is_empty() {
        overload::Profile::ALL.to_vec()
    } else {
        args.profiles.clone()
    };
    let loops = if args.loops.is_empty() {
        overload::Loop::ALL.to_vec()
    } else {
        args.loops.clone()
    };
    let plan = if args.short {
        overload::Plan::short()
    } else {
        overload::Plan::full()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcomes = runtime.block_on(async {
        let mut outcomes = Vec::new();
        for _ in 0..args.repeat {
            for &profile in &profiles {
                for &lp in &loops {
                    let outcome = overload::run(profile, lp, plan).await?;
                    println!("{}", overload::trace(&outcome));
                    println!("{}", overload::summary(&outcome));
                    outcomes.push(outcome);
                }
            }
        }
        anyhow::Ok(outcomes)
    })?;
    println!();
    println!("{}", overload_table(&outcomes));
    let out = args.out.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        repo_root().join(format!("loadtests/results/overload-{stamp}.json"))
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    #[derive(Serialize)]
    struct OverloadReport<'a> {
        command: String,
        plan: overload::Plan,
        objective_ms: u128,
        runs: &'a [overload::Outcome],
    }
    let report = OverloadReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        plan,
        objective_ms: overload::OBJECTIVE.as_millis(),
        runs: &outcomes,
    };
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", out.display());
    Ok(())
}

/// Medians per (profile, loop) as a Markdown table.
fn overload_table(outcomes: &[overload::Outcome]) -> String {
    let mut out = String::from(
        "| profile | loop | goodput | protected after s | s above 1.5× after | lm spread | latency spread | recovered after s | high-priority share admitted / offered | end-to-end ÷ objective | runs |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut seen: Vec<(overload::Profile, overload::Loop)> = Vec::new();
    for o in outcomes {
        if !seen.contains(&(o.profile, o.control)) {
            seen.push((o.profile, o.control));
        }
    }
    for (profile, lp) in seen {
        let runs: Vec<&overload::Outcome> = outcomes
            .iter()
            .filter(|o| o.profile == profile && o.control == lp)
            .collect();
        let m = |f: fn(&sluice_testkit::overload::Figures) -> Option<f64>| {
            let values: Vec<f64> = runs.iter().filter_map(|o| f(&o.figures)).collect();
            if values.len() < runs.len() {
                // Some run never got there: say so rather than hide it.
                format!("never in {} of {}", runs.len() - values.len(), runs.len())
            } else {
                format!("{:.2}", median(values.into_iter()))
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |\n",
            profile.name(),
            lp.name(),
            m(|f| f.goodput),
            m(|f| f.protected_after_s.map(|s| s as f64)),
            m(|f| Some(f.seconds_above_1_5x as f64)),
            m(|f| f.lm_spread),
            m(|f| f.latency_spread),
            m(|f| f.recovered_after_s.map(|s| s as f64)),
            m(|f| f.priority_admitted_share),
            m(|f| f.priority_offered_share),
            m(|f| f.e2e_latency_ratio),
            runs.len(),
        ));
    }
    out
}
