# Two commands matter (see README): `make demo` and `make test`.
# Each first runs scripts/bootstrap.sh, which installs Envoy, Prometheus,
# Redis, k6 and h2load if they are missing (idempotent).

CARGO ?= cargo
DEMO_ARGS ?=

.PHONY: demo test lint unit bench bootstrap loadtest-smoke fuzz

bootstrap:
	./scripts/bootstrap.sh

## The demo: Envoy, an upstream, Sluice, Prometheus and sluice-controller on loopback,
## with traffic from k6; draws target/demo/demo.svg (README, Quick start).
demo: bootstrap
	$(CARGO) run --release --example demo -- $(DEMO_ARGS)

## Every test, with the real Envoy and Prometheus, plus format and lint checks,
## and a smoke run of the load tests (a few seconds each, debug build: it
## proves the scripts and generators work; figures come from loadtests/run).
## Tests that run sluice-controller or sluice as processes find them in
## target/debug: cargo builds a package's own binaries for its tests, not
## another package's, so every binary is built first.
test: bootstrap lint
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc
	$(MAKE) loadtest-smoke

# The driver starts Sluice, the no-op server, the limitador peer and
# sluice-controller as processes: build them (`cargo test` builds examples only as test harnesses).
loadtest-smoke:
	$(CARGO) build --quiet --bin sluice --bin sluice-controller --example noop_check --example limitador_rls --example loadtest
	$(CARGO) run --quiet --example loadtest -- all --smoke --out target/loadtest-smoke/rust.json
	$(CARGO) run --quiet --example loadtest -- check --smoke --generator k6 --out target/loadtest-smoke/k6.json
	$(CARGO) run --quiet --example loadtest -- check --smoke --generator h2load --out target/loadtest-smoke/h2load.json

## Longer fuzzing than `make test` does (tests/fuzz.rs): 200,000 cases per target.
fuzz:
	SLUICE_FUZZ_CASES=200000 $(CARGO) test --release --test fuzz

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Criterion benchmarks of the engine (figures in BENCHMARKS.md).
bench:
	$(CARGO) bench --bench engine
