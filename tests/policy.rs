//! Policies from the outside: `sluice validate`, hot reload, and the binary
//! refusing to start on a broken policy.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use sluice_testkit::{free_port, http, repo_root};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn validate(paths: &[&std::path::Path]) -> (bool, String) {
    let out = sluice()
        .arg("validate")
        .args(paths)
        .output()
        .expect("run sluice validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn shipped_examples_validate() {
    let dir = repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let paths: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let (ok, text) = validate(&paths);
    assert!(ok, "{text}");
    // The whole directory loads as one set, too (unique names).
    let (ok, text) = validate(&[&dir]);
    assert!(ok, "{text}");
}

/// Broken policies: (text, what the error says, where: `:line:column:`).
const BROKEN: [(&str, &str, &str); 3] = [
    (
        "name: p\nsamplers: [\n",
        "samplers: unclosed bracket",
        ":2:11:",
    ),
    (
        "name: p\nrate_limiters:\n  - name: r\n    selectors: [{control_point: ingress}]\n    bucket_capacity: 5\n    fill_amount: 1\n    interval: 1s\n    burst: 3\n",
        "rate_limiters[0].burst: unknown field",
        ":8:5:",
    ),
    (
        "name: p\nrate_limiters:\n  - name: r\n    selectors: [{control_point: ingress}]\n    bucket_capacity: -5\n    fill_amount: 1\n    interval: 1s\n",
        "rate_limiters[0].bucket_capacity: must be a finite number >= 0, got -5",
        ":5:22:",
    ),
];

#[test]
fn broken_policies_are_named_with_file_line_and_field() {
    for (yaml, expected, location) in BROKEN {
        let file = PolicyFile::new(yaml);
        let (ok, text) = validate(&[&file.path]);
        assert!(!ok, "{yaml} should not validate");
        assert!(text.contains(expected), "expected {expected:?} in {text:?}");
        let at = format!("{}{location}", file.path.display());
        assert!(text.contains(&at), "expected {at:?} in {text:?}");
    }
}

#[test]
fn a_directory_refuses_two_policies_of_one_name() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("a.yaml"), "name: same\n").expect("write");
    std::fs::write(dir.path().join("b.yaml"), "name: same\n").expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not a policy").expect("write");
    let (ok, text) = validate(&[dir.path()]);
    assert!(!ok);
    assert!(
        text.contains("b.yaml:1:7: name: policy \"same\" is already defined in"),
        "{text}"
    );
}

/// Rewrites `file` to the broken `yaml` and waits until the sidecar whose
/// admin listener is `admin` has refused it: its `errors`-th failed reload.
async fn break_policy(file: &PolicyFile, yaml: &str, admin: std::net::SocketAddr, errors: usize) {
    file.rewrite(yaml);
    let reload_errors = || async {
        let text = http::get(admin, "/metrics", &[])
            .await
            .expect("metrics")
            .text();
        metric(&text, r#"policy_reloads_total{result="error"}"#)
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            reload_errors().await == errors as f64
        })
        .await,
        "{yaml} was not refused"
    );
}

const OPEN: &str = "name: gate\nsamplers:\n  - name: s\n    selectors: [{control_point: ingress}]\n    accept_percentage: 100\n";

async fn status(sidecar: &sluice::server::Sidecar) -> u16 {
    let mut c = client(sidecar).await;
    http_status(
        &c.check(check_request("GET", "/", &[]))
            .await
            .expect("check")
            .into_inner(),
    )
}

#[tokio::test]
async fn hot_reload_applies_valid_changes_and_keeps_the_policy_on_errors() {
    let file = PolicyFile::new(OPEN);
    let sidecar = sidecar(&file).await;
    assert_eq!(status(&sidecar).await, 200);

    file.rewrite(&OPEN.replace("accept_percentage: 100", "accept_percentage: 0"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(&sidecar).await == 403
        })
        .await
    );

    // Broken edits: the closed gate stays closed, and each failure is
    // counted.
    let out_of_range = OPEN.replace("accept_percentage: 100", "accept_percentage: 250");
    let edits = BROKEN
        .iter()
        .map(|(yaml, _, _)| *yaml)
        .chain([out_of_range.as_str()]);
    for (i, yaml) in edits.enumerate() {
        break_policy(&file, yaml, sidecar.admin_addr, i + 1).await;
        assert_eq!(status(&sidecar).await, 403, "after {yaml}");
    }

    file.rewrite(OPEN);
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(&sidecar).await == 200
        })
        .await
    );
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_configmap_style_directory_swap_is_picked_up() {
    // Kubernetes mounts a ConfigMap as links into a timestamped directory
    // and swaps the `..data` link atomically on update.
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path();
    let version = |name: &str, yaml: &str| {
        std::fs::create_dir(root.join(name)).expect("mkdir");
        std::fs::write(root.join(name).join("gate.yaml"), yaml).expect("write");
    };
    version("..v1", OPEN);
    std::os::unix::fs::symlink("..v1", root.join("..data")).expect("link");
    std::os::unix::fs::symlink("..data/gate.yaml", root.join("gate.yaml")).expect("link");
    let config = sluice::server::Config {
        policy: Some(root.to_owned()),
        policy_poll_interval: Duration::from_millis(50),
        ..sluice::server::Config::ephemeral()
    };
    let sidecar = sluice::server::Sidecar::start(&config)
        .await
        .expect("start");
    assert_eq!(status(&sidecar).await, 200);
    version(
        "..v2",
        &OPEN.replace("accept_percentage: 100", "accept_percentage: 0"),
    );
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).expect("link");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(&sidecar).await == 403
        })
        .await
    );
    sidecar.stop(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn the_binary_serves_and_stops_on_sigterm() {
    let (grpc, admin) = (free_port().expect("port"), free_port().expect("port"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env("SLUICE_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args([
            "--policy",
            repo_root()
                .join("examples/bench.yaml")
                .to_str()
                .expect("utf-8 path"),
        ])
        .args(["--log-format", "json"])
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sluice");
    let admin_addr = ([127, 0, 0, 1], admin).into();
    assert!(
        eventually(Duration::from_secs(10), || async {
            http::get(admin_addr, "/readyz", &[])
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
    );
    let metrics = http::get(admin_addr, "/metrics", &[])
        .await
        .expect("metrics")
        .text();
    assert!(
        metrics.contains("flowcontrol_requests_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "{metrics}"
    );
    let pid = child.id().expect("pid");
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("status");
    assert!(exit.success(), "{exit}");
}

#[test]
fn the_binary_refuses_to_start_on_a_broken_policy() {
    let file = PolicyFile::new("name: p\nsamplers: {}\n");
    let out = sluice()
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--policy",
        ])
        .arg(&file.path)
        .output()
        .expect("run sluice");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("policy.yaml:2:") && stderr.contains("samplers"),
        "{stderr}"
    );
}

/// The binary itself, edited into each broken policy in turn: it keeps
/// serving and its log says which file, line and field, and that the policy
/// in force stays.
#[tokio::test]
async fn the_binary_logs_why_a_broken_edit_is_not_reloaded() {
    use sluice_testkit::process::Process;
    let file = PolicyFile::new(OPEN);
    let (grpc, admin) = (free_port().expect("port"), free_port().expect("port"));
    let args: Vec<String> = [
        "--policy",
        &file.path.display().to_string(),
        "--grpc-listen",
        &format!("127.0.0.1:{grpc}"),
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--policy-poll-interval",
        "100ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut process = Process::spawn(
        "sluice",
        std::path::Path::new(env!("CARGO_BIN_EXE_sluice")),
        tempfile::tempdir().expect("dir"),
        &args,
    )
    .expect("spawn");
    let admin = ([127, 0, 0, 1], admin).into();
    process
        .wait_http_ok(admin, "/readyz", Duration::from_secs(20))
        .await
        .expect("ready");
    for (i, (yaml, expected, location)) in BROKEN.iter().enumerate() {
        break_policy(&file, yaml, admin, i + 1).await;
        let log = std::fs::read_to_string(process.log_path()).expect("log");
        let line = log
            .lines()
            .filter(|l| l.contains("policy not reloaded; keeping the one in force"))
            .nth(i)
            .unwrap_or_else(|| panic!("no log line for {yaml:?} in:\n{log}"));
        let at = format!("{}{location}", file.path.display());
        assert!(
            line.contains(expected) && line.contains(&at),
            "expected {expected:?} at {at:?} in {line:?}"
        );
    }
    let text = http::get(admin, "/metrics", &[])
        .await
        .expect("metrics")
        .text();
    assert_eq!(metric(&text, "policy_loaded"), 1.0, "{text}");
    process.kill().await;
}
