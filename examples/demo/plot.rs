//! The picture of a run: three panels over time, the crowd's phase shaded
//! in each. (a) the upstream latency the controller sees and its setpoint,
//! (b) the load multiplier in force in Sluice, (c) the share of requests
//! admitted per workload, by the load scheduler and as the crowd's k6
//! scenarios saw it.
//!
//! SVG only, drawn by `plotters` without font libraries: text goes into the
//! SVG as `<text>`, laid out with plotters' own size estimate.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::{Decisions, Phase, Summary};

/// The crowd's phase, shaded.
const CROWD: RGBColor = RGBColor(255, 170, 60);
const LATENCY: RGBColor = RGBColor(200, 30, 30);
const MULTIPLIER: RGBColor = RGBColor(30, 80, 200);
const SUBSCRIBERS: RGBColor = RGBColor(20, 140, 60);
const GUESTS: RGBColor = RGBColor(220, 110, 0);
const FONT: &str = "sans-serif";
/// Seconds over which panel (c) sums.
const WINDOW: usize = 3;

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws `summary` into an SVG file at `path`.
pub fn svg(path: &Path, summary: &Summary) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 1150)).into_drawing_area();
    root.fill(&WHITE)?;
    let p = summary.phases;
    let ran = summary.seconds.len() as u64;
    let mut title = format!(
        "Sluice demo: {} s of k6 traffic through Envoy, the crowd from {} s to {} s",
        p.duration, p.crowd_start, p.crowd_end
    );
    if summary.interrupted {
        title.push_str(&format!(" (interrupted after {ran} s)"));
    }
    let root = root.titled(&title, (FONT, 24))?;
    let panels = root.split_evenly((3, 1));
    let x_max = ran.max(1) as f64;
    let at = |t: u64| t as f64 + 0.5;

    // (a) Latency and setpoint.
    let highest = summary
        .seconds
        .iter()
        .flat_map(|s| [s.latency_ms, s.setpoint_ms])
        .flatten()
        .fold(0.0, f64::max);
    let mut chart = panel(
        &panels[0],
        "(a) Upstream latency: sluice-controller's signal and its setpoint",
        x_max,
        (highest * 1.15).max(50.0),
        "latency (ms)",
    )?;
    shade_crowd(&mut chart, summary, true)?;
    let latency: Vec<(f64, Option<f64>)> = summary
        .seconds
        .iter()
        .map(|s| (at(s.t), s.latency_ms))
        .collect();
    line(
        &mut chart,
        &latency,
        LATENCY.stroke_width(3),
        "latency (average over the signal window)",
    )?;
    let setpoint: Vec<(f64, f64)> = summary
        .seconds
        .iter()
        .filter_map(|s| Some((at(s.t), s.setpoint_ms?)))
        .collect();
    chart
        .draw_series(DashedLineSeries::new(setpoint, 8, 5, BLACK.stroke_width(2)))?
        .label("setpoint (1.5 x the long-term average)")
        .legend(|(x, y)| {
            DashedPathElement::new(vec![(x, y), (x + 24, y)], 8, 5, BLACK.stroke_width(2))
        });
    legend(&mut chart, SeriesLabelPosition::MiddleRight)?;

    // (b) The load multiplier.
    let mut chart = panel(
        &panels[1],
        "(b) Load multiplier (lm) in force in Sluice: the share of the observed request rate the load scheduler admits",
        x_max,
        1.1,
        "multiplier",
    )?;
    shade_crowd(&mut chart, summary, false)?;
    let lm: Vec<(f64, Option<f64>)> = summary.seconds.iter().map(|s| (at(s.t), s.lm)).collect();
    line(
        &mut chart,
        &lm,
        MULTIPLIER.stroke_width(3),
        "lm (1 = pass-through)",
    )?;
    legend(&mut chart, SeriesLabelPosition::LowerLeft)?;

    // (c) Share admitted per workload, over a few seconds: outside the
    // crowd a workload sees two or three requests a second.
    let mut chart = panel(
        &panels[2],
        &format!(
            "(c) Share admitted per workload over {WINDOW} s (solid: the load scheduler's decisions; dashed: the crowd's answers in k6)"
        ),
        x_max,
        105.0,
        "% admitted",
    )?;
    shade_crowd(&mut chart, summary, false)?;
    for (name, color) in [("subscribers", SUBSCRIBERS), ("guests", GUESTS)] {
        let scheduler: Vec<Option<Decisions>> = summary
            .seconds
            .iter()
            .map(|s| s.workloads.get(name).copied())
            .collect();
        line(
            &mut chart,
            &windowed(&scheduler),
            color.stroke_width(3),
            &format!("{name} (priority {})", priority(name)),
        )?;
        let crowd: Vec<Option<Decisions>> = summary
            .seconds
            .iter()
            .map(|s| {
                let answers = s.answers.get(name).filter(|_| s.phase == Phase::Crowd)?;
                let ok = answers.get(&200).copied().unwrap_or(0);
                Some(Decisions {
                    accepted: ok,
                    rejected: answers.values().sum::<u64>() - ok,
                })
            })
            .collect();
        let crowd: Vec<(f64, f64)> = windowed(&crowd)
            .into_iter()
            .filter_map(|(x, y)| Some((x, y?)))
            .collect();
        chart.draw_series(DashedLineSeries::new(crowd, 5, 4, color.stroke_width(2)))?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    root.present()?;
    Ok(())
}

/// Per second, the share accepted (%) over the last [`WINDOW`] seconds;
/// none for a second without decisions.
fn windowed(seconds: &[Option<Decisions>]) -> Vec<(f64, Option<f64>)> {
    (0..seconds.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(WINDOW);
            let sum = seconds[from..=i]
                .iter()
                .flatten()
                .fold(Decisions::default(), |a, d| Decisions {
                    accepted: a.accepted + d.accepted,
                    rejected: a.rejected + d.rejected,
                });
            let share = seconds[i].and(sum.share()).map(|v| 100.0 * v);
            (i as f64 + 0.5, share)
        })
        .collect()
}

fn priority(workload: &str) -> u32 {
    if workload == "subscribers" { 200 } else { 20 }
}

/// A panel with its caption, axes and grid.
fn panel<'a>(
    area: &DrawingArea<SVGBackend<'a>, Shift>,
    caption: &str,
    x_max: f64,
    y_max: f64,
    y_desc: &str,
) -> anyhow::Result<Chart<'a>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the traffic started")
        .y_desc(y_desc)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if y_max < 10.0 {
                format!("{y:.1}")
            } else {
                format!("{y:.0}")
            }
        })
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    Ok(chart)
}

/// Shades the crowd's phase; with `named`, writes each phase's name at
/// the top.
fn shade_crowd(chart: &mut Chart<'_>, summary: &Summary, named: bool) -> anyhow::Result<()> {
    let p = summary.phases;
    let (x_range, y_range) = (chart.x_range(), chart.y_range());
    let clamp = |t: u64| (t as f64).clamp(x_range.start, x_range.end);
    let (from, to) = (clamp(p.crowd_start), clamp(p.crowd_end));
    if from < to {
        chart.draw_series(std::iter::once(Rectangle::new(
            [(from, y_range.start), (to, y_range.end)],
            CROWD.mix(0.18).filled(),
        )))?;
    }
    if named {
        let top = y_range.end * 0.97;
        let style = (FONT, 15).into_font().color(&RGBColor(90, 90, 90));
        for (name, start, end) in [
            ("calm", 0, p.crowd_start),
            ("crowd", p.crowd_start, p.crowd_end),
            ("recovery", p.crowd_end, p.duration),
        ] {
            let (start, end) = (clamp(start), clamp(end));
            if end - start >= 2.0 {
                chart.draw_series(std::iter::once(Text::new(
                    name,
                    (start + 0.4, top),
                    style.clone(),
                )))?;
            }
        }
    }
    Ok(())
}

/// A line with gaps where there is no value, labelled once.
fn line(
    chart: &mut Chart<'_>,
    points: &[(f64, Option<f64>)],
    style: ShapeStyle,
    label: &str,
) -> anyhow::Result<()> {
    let mut segments: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for &(x, y) in points {
        match y {
            Some(y) => current.push((x, y)),
            None if !current.is_empty() => segments.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    segments.push(current);
    let mut labelled = false;
    for segment in segments.into_iter().filter(|s| !s.is_empty()) {
        let drawn = chart.draw_series(LineSeries::new(segment, style))?;
        if !labelled {
            drawn
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            labelled = true;
        }
    }
    Ok(())
}

fn legend(chart: &mut Chart<'_>, position: SeriesLabelPosition) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()?;
    Ok(())
}
