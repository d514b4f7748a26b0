// gRPC ext_authz Check load, as Envoy's ext_authz filter would send it.
//
// Driven by loadtests/main.rs through environment variables:
//   TARGET     host:port of the Check server
//   RATE       requests per second (constant-arrival-rate); 0 = as fast as
//              VUS virtual users can go, each waiting for its answer
//   DURATION   e.g. 10s
//   VUS        virtual users (connections); at a fixed rate, the most k6
//              may use
//   USERS      distinct user-id values (the benchmark policy rate-limits
//              and samples per user)
//   SUMMARY    where to write the end-of-test summary (JSON)
import grpc from 'k6/net/grpc';
import { check } from 'k6';

const TARGET = __ENV.TARGET;
const RATE = parseInt(__ENV.RATE || '0', 10);
const DURATION = __ENV.DURATION || '10s';
const VUS = parseInt(__ENV.VUS || '16', 10);
const USERS = parseInt(__ENV.USERS || '10000', 10);

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'p(50)', 'p(90)', 'p(99)', 'p(99.9)', 'max', 'count'],
  scenarios: {
    check: RATE > 0
      ? {
        executor: 'constant-arrival-rate',
        rate: RATE,
        timeUnit: '1s',
        duration: DURATION,
        preAllocatedVUs: VUS,
        maxVUs: VUS,
      }
      : {
        executor: 'constant-vus',
        vus: VUS,
        duration: DURATION,
      },
  },
};

const client = new grpc.Client();
client.load(['.'], 'check.proto');

let connected = false;

export default function () {
  if (!connected) {
    client.connect(TARGET, { plaintext: true, timeout: '5s' });
    connected = true;
  }
  const user = `user-${Math.floor(Math.random() * USERS)}`;
  const request = {
    attributes: {
      source: { address: { socket_address: { address: '127.0.0.1', port_value: 40000 } } },
      destination: { address: { socket_address: { address: '127.0.0.1', port_value: 10000 } } },
      request: {
        http: {
          id: `${__VU}-${__ITER}`,
          method: 'GET',
          path: '/api/items?page=2',
          host: 'service.local',
          scheme: 'http',
          protocol: 'HTTP/1.1',
          headers: {
            ':method': 'GET',
            ':path': '/api/items?page=2',
            ':authority': 'service.local',
            'user-agent': 'k6',
            'accept': '*/*',
            'user-id': user,
            'user-type': Math.random() < 0.2 ? 'subscriber' : 'guest',
            'x-request-id': `${__VU}-${__ITER}`,
          },
        },
      },
      context_extensions: { 'control-point': 'ingress' },
    },
  };
  const response = client.invoke('envoy.service.auth.v3.Authorization/Check', request);
  check(response, {
    'gRPC OK': (r) => r && r.status === grpc.StatusOK,
    'allowed': (r) => r && r.message && r.message.status && (r.message.status.code || 0) === 0,
  });
}

export function handleSummary(data) {
  const out = {};
  if (__ENV.SUMMARY) {
    out[__ENV.SUMMARY] = JSON.stringify(data, null, 1);
  }
  return out;
}
