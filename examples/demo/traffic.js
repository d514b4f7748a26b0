// The demo's traffic (`make demo`, examples/demo/main.rs): one k6 scenario
// per source of traffic, each an open-loop constant arrival rate through
// Envoy's listener on loopback, and nothing else.
//
// The demo passes, as k6 `-e` variables:
//   TARGET       host:port of Envoy's listener (must be on 127.0.0.0/8)
//   TARGET_B     host:port of the second Envoy's listener (the same)
//   SOURCES      JSON list of the sources (examples/demo/lib.rs, SOURCES):
//                {name, path, per_second, user_type, ids, crowd, user, via}
//                (`via`: "a" sends to TARGET, "b" to TARGET_B; `user`: the
//                user-id of all its requests, else its name)
//   DURATION     seconds of traffic in all
//   CROWD_START  second at which the crowd sources start ...
//   CROWD_END    ... and stop (the phases: calm, crowd, recovery)
//
// Every answer is recorded in the Trend `demo_answers` (value: its duration
// in ms) tagged with its status `code`, `by` (Sluice's
// `x-sluice-rejected-by` header: which policy/component rejected it),
// `retry_after` (yes/no) and `upstream_ms` (Envoy's
// `x-envoy-upstream-service-time`: the upstream's own time, "" when it was
// not asked), plus k6's own `scenario` tag (the source). The demo reads them
// from k6's CSV output as they come.
import http from 'k6/http';
import exec from 'k6/execution';
import { Trend } from 'k6/metrics';

const LOOPBACK = /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$/;
const TARGETS = { a: __ENV.TARGET || '', b: __ENV.TARGET_B || '' };
for (const [via, target] of Object.entries(TARGETS)) {
  if (!LOOPBACK.test(target)) {
    throw new Error(`target ${via} must be a loopback host:port, got ${JSON.stringify(target)}`);
  }
}
const SOURCES = JSON.parse(__ENV.SOURCES || '[]');
const DURATION = Number(__ENV.DURATION);
const CROWD_START = Number(__ENV.CROWD_START);
const CROWD_END = Number(__ENV.CROWD_END);

const answers = new Trend('demo_answers', true);

// Virtual users ready for a second's worth of requests, and enough for
// every request to wait up to about 4 s (the upstream slows down under the
// crowd) before k6 has to skip some (counted as `dropped_iterations`).
function scenario(source) {
  const [start, end] = source.crowd ? [CROWD_START, CROWD_END] : [0, DURATION];
  return {
    executor: 'constant-arrival-rate',
    exec: 'send',
    rate: source.per_second,
    timeUnit: '1s',
    startTime: `${start}s`,
    duration: `${end - start}s`,
    preAllocatedVUs: source.per_second + 1,
    maxVUs: source.per_second * 4 + 2,
    gracefulStop: '3s',
  };
}

export const options = {
  discardResponseBodies: true,
  scenarios: Object.fromEntries(SOURCES.map((s) => [s.name, scenario(s)])),
};

const BY_NAME = Object.fromEntries(SOURCES.map((s) => [s.name, s]));

// The test starts right after setup(): the demo anchors its clock here.
export function setup() {
  console.log(`demo-start ${Date.now()}`);
}

export function send() {
  const source = BY_NAME[exec.scenario.name];
  const n = exec.scenario.iterationInTest;
  const headers = {
    'user-id': source.user || (source.ids > 1 ? `${source.name}-${n % source.ids}` : source.name),
  };
  if (source.user_type) {
    headers['user-type'] = source.user_type;
  }
  const target = TARGETS[source.via];
  const res = http.get(`http://${target}${source.path}`, { headers, timeout: '5s' });
  answers.add(res.timings.duration, {
    code: String(res.status),
    by: res.headers['X-Sluice-Rejected-By'] || '',
    retry_after: res.headers['Retry-After'] ? 'yes' : 'no',
    upstream_ms: res.headers['X-Envoy-Upstream-Service-Time'] || '',
  });
}
