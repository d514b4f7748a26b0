//! A load ramp's place along its steps: Aperture's signal generator
//! (`signal-generator.go`), counted in ticks.
//!
//! The ramp is a line of `total` ticks, the sum of its steps' lengths
//! (each step's duration in ticks, at least one). At tick `t` of step `i`
//! (`0 <= t < len_i`) the value is the previous step's target plus `t /
//! len_i` of the way to step `i`'s; the first step holds its own target.
//! At the end (`position == total`) it is the last step's target.
//!
//! As Aperture's: a tick forward moves one tick along, a tick back one
//! tick back, a reset goes back to the start. Unlike Aperture's, whose
//! generator stops one tick short of the last target (it sets `at_end` at
//! the last step's tick `len - 1`), the ramp reaches the last step's
//! target, and `at_start` is simply being at the start (Aperture's needs
//! one more tick back there).

/// One ramp's steps and place.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Ramp {
    /// (target, length in ticks, at least 1) of each step.
    steps: Vec<(f64, u64)>,
    /// Ticks along the ramp, 0 to `total`.
    position: u64,
    /// The sum of the steps' lengths.
    total: u64,
}

impl Ramp {
    /// A ramp at its start.
    pub(super) fn new(steps: impl IntoIterator<Item = (f64, u64)>) -> Ramp {
        let steps: Vec<(f64, u64)> = steps.into_iter().map(|(t, l)| (t, l.max(1))).collect();
        let total = steps.iter().map(|(_, l)| l).sum();
        Ramp {
            steps,
            position: 0,
            total,
        }
    }

    /// One tick: back to the start on `reset`, else one tick forward or
    /// back when exactly one of them is asked for.
    pub(super) fn tick(&mut self, forward: bool, backward: bool, reset: bool) {
        if reset {
            self.position = 0;
        } else if forward && !backward {
            self.position = (self.position + 1).min(self.total);
        } else if backward && !forward {
            self.position = self.position.saturating_sub(1);
        }
    }

    /// The value at its place.
    pub(super) fn value(&self) -> f64 {
        let mut start = 0;
        let mut previous = None;
        for &(target, len) in &self.steps {
            if self.position < start + len {
                return match previous {
                    None => target,
                    Some(from) if from == target => target,
                    Some(from) => {
                        from + (target - from) * (self.position - start) as f64 / len as f64
                    }
                };
            }
            start += len;
            previous = Some(target);
        }
        previous.unwrap_or(0.0)
    }

    /// Whether it is at its start.
    pub(super) fn at_start(&self) -> bool {
        self.position == 0
    }

    /// Whether it has reached the last step's target.
    pub(super) fn at_end(&self) -> bool {
        self.position == self.total
    }

    /// Whether `other` has the same steps.
    pub(super) fn same_steps(&self, other: &Ramp) -> bool {
        self.steps == other.steps
    }

    /// Takes `other`'s place.
    pub(super) fn take_place(&mut self, other: &Ramp) {
        self.position = other.position.min(self.total);
    }
}
