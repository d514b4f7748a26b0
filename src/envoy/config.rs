//! `sluice envoy-config`: an Envoy bootstrap that asks Envoy for no more
//! than the policies read ([`sluice_engine::reads`]). Envoy serialises
//! every header it sends into each Check, buffers a body it is told to
//! send, and stores and logs dynamic metadata and access logs for every
//! request; a config that sends only what the policies read saves Envoy and
//! Sluice that work. The price: classifiers and preview see only what is
//! sent, so the config is generated again when the policies change what
//! they read (docs/envoy.md, "Asking Envoy for less").

use std::fmt::Write as _;
use std::net::SocketAddr;

use sluice_engine::reads::Reads;

/// Where the generated Envoy listens and what it talks to.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Envoy's HTTP listener.
    pub listen: SocketAddr,
    /// Envoy's admin listener.
    pub admin: SocketAddr,
    /// The one upstream.
    pub upstream: SocketAddr,
    /// Sluice's gRPC listener.
    pub sluice: SocketAddr,
    /// Sent as the `control-point` gRPC metadata of every Check.
    pub control_point: String,
    /// Sent as the `service` context extension, if given.
    pub service: Option<String>,
    /// Let requests through when Sluice cannot answer.
    pub failure_mode_allow: bool,
    /// Largest body buffered for classifiers that read it.
    pub max_request_bytes: u32,
}

/// `s` as a YAML double-quoted scalar (JSON's string syntax is YAML's):
/// policy text never becomes YAML structure.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `s` for a comment line: control characters (a newline would end the
/// comment) shown escaped.
fn comment(s: &str) -> String {
    s.chars().flat_map(char::escape_debug).collect()
}

/// An `allowed_headers` pattern for a header a policy names by its
/// normalized name: `_` stands for `-` or `_` as sent.
fn pattern(normalized: &str) -> String {
    if normalized.contains('_') {
        let regex = normalized
            .split('_')
            .map(regex_escape)
            .collect::<Vec<_>>()
            .join("[-_]");
        format!(
            "{{ safe_regex: {{ regex: {} }} }}",
            quoted(&format!("^{regex}$"))
        )
    } else {
        format!("{{ exact: {} }}", quoted(normalized))
    }
}

/// `s` with RE2's special characters escaped (header names rarely have
/// any).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The bootstrap, as YAML with comments saying why each part is there.
pub fn bootstrap(reads: &Reads, layout: &Layout) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# Envoy bootstrap written by `sluice envoy-config` for the policies given:\n\
         # Envoy sends Sluice only what they read. Generate it again when they\n\
         # change what they read (docs/envoy.md).\n\
         #\n\
         # Headers sent in each Check:"
    );
    if reads.headers.is_empty() && reads.baggage.is_none() {
        let _ = writeln!(
            w,
            "#   none (request attributes only: method, path, host, scheme, addresses)"
        );
    }
    for (header, why) in &reads.headers {
        let _ = writeln!(w, "#   {}: {}", comment(header), comment(why));
    }
    if let Some(why) = &reads.baggage {
        let _ = writeln!(w, "#   baggage: {}", comment(why));
    }
    let _ = writeln!(
        w,
        "# Request body: {}",
        comment(
            reads
                .body
                .as_deref()
                .unwrap_or("not sent (no classifier reads it)")
        )
    );
    let _ = writeln!(
        w,
        "# Access logs to Sluice: {}",
        reads
            .access_logs
            .as_deref()
            .map_or("none (nothing observes how requests end)".to_owned(), |w| {
                format!("yes, {} observes how requests end", comment(w))
            })
    );
    for (key, who) in &reads.extra_attributes {
        let _ = writeln!(
            w,
            "# WARNING: {} observes access-log attribute {}, which the log below does not\n\
             #   send: add it to `attributes` (docs/envoy.md), or the meter observes nothing.",
            comment(who),
            comment(key)
        );
    }
    let ip = |a: &SocketAddr| a.ip().to_string();
    let _ = write!(
        w,
        r#"admin:
  address:
    socket_address: {{ address: {admin_ip}, port_value: {admin_port} }}

static_resources:
  listeners:
    - name: ingress
      address:
        socket_address: {{ address: {listen_ip}, port_value: {listen_port} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
"#,
        admin_ip = ip(&layout.admin),
        admin_port = layout.admin.port(),
        listen_ip = ip(&layout.listen),
        listen_port = layout.listen.port(),
    );
    if reads.access_logs.is_some() {
        w.push_str(ACCESS_LOG);
    }
    let _ = write!(
        w,
        r#"                route_config:
                  name: local
                  virtual_hosts:
                    - name: app
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          route: {{ cluster: upstream, timeout: 15s }}
"#
    );
    if let Some(service) = &layout.service {
        let _ = write!(
            w,
            r#"                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions: {{ service: {service} }}
"#,
            service = quoted(service)
        );
    }
    let _ = write!(
        w,
        r#"                http_filters:
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service:
                        envoy_grpc: {{ cluster_name: sluice }}
                        timeout: 0.5s
                        initial_metadata:
                          - {{ key: control-point, value: {control_point} }}
                      failure_mode_allow: {failure_mode_allow}
                      status_on_error: {{ code: ServiceUnavailable }}
                      allowed_headers:
                        patterns:
"#,
        control_point = quoted(&layout.control_point),
        failure_mode_allow = layout.failure_mode_allow,
    );
    let mut patterns: Vec<String> = reads.headers.keys().map(|h| pattern(h)).collect();
    if reads.baggage.is_some() {
        patterns.push(pattern("baggage"));
    }
    if patterns.is_empty() {
        // Envoy wants one pattern at least; this one matches no header.
        patterns.push(format!(
            "{{ exact: {} }}",
            quoted("x-sluice-reads-no-header")
        ));
    }
    for p in patterns {
        let _ = writeln!(w, "                          - {p}");
    }
    if reads.body.is_some() {
        let _ = write!(
            w,
            r#"                      with_request_body:
                        max_request_bytes: {}
                        allow_partial_message: true
"#,
            layout.max_request_bytes
        );
    }
    let _ = write!(
        w,
        r#"                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router

  clusters:
    - name: upstream
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: {upstream_ip}, port_value: {upstream_port} }}

    - name: sluice
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: sluice
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: {sluice_ip}, port_value: {sluice_port} }}
"#,
        upstream_ip = ip(&layout.upstream),
        upstream_port = layout.upstream.port(),
        sluice_ip = ip(&layout.sluice),
        sluice_port = layout.sluice.port(),
    );
    out
}

/// The OpenTelemetry access log of Sluice's contract (docs/envoy.md), as
/// `envoy-configs/quickstart.yaml` has it.
const ACCESS_LOG: &str = r#"                access_log:
                  - name: envoy.access_loggers.open_telemetry
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig
                      common_config:
                        log_name: sluice
                        transport_api_version: V3
                        grpc_service:
                          envoy_grpc: { cluster_name: sluice }
                        buffer_flush_interval: 0.01s
                        buffer_size_bytes: 16384
                      attributes:
                        values:
                          - key: sluice.flow
                            value: { string_value: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:sluice.flow)%" }
                          - key: http.status_code
                            value: { string_value: "%RESPONSE_CODE%" }
                          - key: authz_duration
                            value: { string_value: "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:ext_authz_duration)%" }
                          - key: DURATION
                            value: { string_value: "%DURATION%" }
                          - key: REQUEST_DURATION
                            value: { string_value: "%REQUEST_DURATION%" }
                          - key: REQUEST_TX_DURATION
                            value: { string_value: "%REQUEST_TX_DURATION%" }
                          - key: RESPONSE_DURATION
                            value: { string_value: "%RESPONSE_DURATION%" }
                          - key: RESPONSE_TX_DURATION
                            value: { string_value: "%RESPONSE_TX_DURATION%" }
                          - key: BYTES_RECEIVED
                            value: { string_value: "%BYTES_RECEIVED%" }
                          - key: BYTES_SENT
                            value: { string_value: "%BYTES_SENT%" }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_patterns_match_either_spelling() {
        assert_eq!(pattern("baggage"), r#"{ exact: "baggage" }"#);
        assert_eq!(
            pattern("user_id"),
            r#"{ safe_regex: { regex: "^user[-_]id$" } }"#
        );
        // JSON's escaping is YAML's: `\.` in the regex is `\\.` in the file.
        assert_eq!(
            pattern("x_a.b"),
            r#"{ safe_regex: { regex: "^x[-_]a\\.b$" } }"#
        );
    }

    #[test]
    fn policy_text_cannot_become_yaml() {
        let reads = Reads {
            headers: [(
                "x\nnode: {id: \"}".to_owned(),
                "p/c reads\nnode: {}".to_owned(),
            )]
            .into(),
            ..Reads::default()
        };
        let layout = Layout {
            listen: ([127, 0, 0, 1], 1).into(),
            admin: ([127, 0, 0, 1], 2).into(),
            upstream: ([127, 0, 0, 1], 3).into(),
            sluice: ([127, 0, 0, 1], 4).into(),
            control_point: "in\"gress".into(),
            service: Some("a\nb: c".into()),
            failure_mode_allow: false,
            max_request_bytes: 1,
        };
        let text = bootstrap(&reads, &layout);
        let yaml: serde_json::Value = serde_saphyr::from_str(&text).expect("YAML");
        assert!(yaml.get("node").is_none(), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("node:")), "{text}");
        assert!(text.contains(r#"value: "in\"gress""#), "{text}");
    }
}
