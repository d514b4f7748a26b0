//! `sluice import-aperture` as users run it: the real binary on Aperture
//! policies written for the tests (`crates/policy/tests/aperture/`, whose
//! conversion `crates/policy/tests/aperture.rs` checks field by field), its
//! exit status, what it lists, and what it writes (or does not).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sluice_testkit::repo_root;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("crates/policy/tests/aperture").join(name)
}

fn import(args: &[&std::ffi::OsStr]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("import-aperture")
        .args(args)
        .output()
        .expect("run sluice import-aperture");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn validate(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("validate")
        .arg(path)
        .output()
        .expect("run sluice validate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn policies_that_carry_over_in_full_are_written_and_validate() {
    let dir = tempfile::tempdir().expect("dir");
    let inputs = [
        fixture("flow-control.yaml"),
        fixture("search.yaml"),
        fixture("circuit.yaml"),
    ];
    let mut args: Vec<&std::ffi::OsStr> = inputs.iter().map(|p| p.as_os_str()).collect();
    args.extend(["--out".as_ref(), dir.path().as_os_str()]);
    let (out, stderr) = import(&args);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("not carried over"), "{stderr}");
    assert_eq!(
        files_in(dir.path()),
        ["api-guard.yaml", "checkout.yaml", "search.yaml"],
        "each policy under its name, no temporary file left"
    );
    let (ok, text) = validate(dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("api-guard, checkout, search"), "{text}");

    // To stdout: the policy with a header naming its source.
    let (out, stderr) = import(&[fixture("search.yaml").as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        text.starts_with("# Converted from Aperture's policy "),
        "{text}"
    );
    assert!(text.contains("search.yaml"), "{text}");
    let policy = sluice_policy::parse_policy(Path::new("stdout.yaml"), &text).expect("loads");
    assert_eq!(policy.name.value.0, "search");
}

#[test]
fn a_partial_conversion_lists_what_is_missing_and_writes_only_when_allowed() {
    let dir = tempfile::tempdir().expect("dir");
    let target = dir.path().join("storefront.yaml");
    let partial = fixture("partial.yaml");
    let listed = [
        "spec.resources.flow_control.classifiers[1].rego",
        "spec.resources.flow_control.classifiers[0].rules.peer.extractor.address",
        "spec.circuit.components[0].flow_control.rate_limiter.in_ports.bucket_capacity",
        "spec.circuit.components[2].ema",
        "dynamicConfig",
    ];

    let (out, stderr) = import(&[partial.as_os_str(), "--out".as_ref(), target.as_os_str()]);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for path in listed {
        assert!(
            stderr.contains(&format!("partial.yaml: not carried over: {path}: ")),
            "{path} in {stderr}"
        );
    }
    assert!(stderr.contains("nothing written"), "{stderr}");
    assert!(!target.exists(), "nothing written without --allow-partial");
    assert_eq!(files_in(dir.path()), Vec::<String>::new());

    let (out, stderr) = import(&[
        partial.as_os_str(),
        "--allow-partial".as_ref(),
        "--out".as_ref(),
        target.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for path in listed {
        assert!(stderr.contains(path), "{path} in {stderr}");
    }
    let (ok, text) = validate(&target);
    assert!(ok, "{text}");
    let written = std::fs::read_to_string(&target).expect("written");
    assert!(
        written.contains("# - spec.resources.flow_control.classifiers[1].rego: "),
        "the file lists what it lacks: {written}"
    );
}

#[test]
fn a_file_that_is_not_an_aperture_policy_is_an_error_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("dir");
    let deployment = dir.path().join("web.yaml");
    std::fs::write(
        &deployment,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 2}\n",
    )
    .expect("write");
    let target = dir.path().join("out.yaml");
    std::fs::write(&target, "# an older file\n").expect("write");

    // With a good file beside it: still nothing written, the old file
    // untouched.
    let (out, stderr) = import(&[
        fixture("search.yaml").as_os_str(),
        deployment.as_os_str(),
        "--out".as_ref(),
        target.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("web.yaml: not an Aperture policy: apiVersion \"apps/v1\""),
        "{stderr}"
    );
    assert!(stderr.contains("nothing written"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&target).expect("still there"),
        "# an older file\n"
    );

    // Into a directory: nothing either.
    let out_dir = dir.path().join("policies");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let (out, _) = import(&[
        fixture("search.yaml").as_os_str(),
        deployment.as_os_str(),
        "--allow-partial".as_ref(),
        "--out".as_ref(),
        out_dir.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(files_in(&out_dir), Vec::<String>::new());

    // Not YAML at all, and a file that is not there.
    let junk = dir.path().join("junk.yaml");
    std::fs::write(&junk, "{: nope").expect("write");
    let (out, stderr) = import(&[junk.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a YAML document"), "{stderr}");
    assert!(out.stdout.is_empty());
    let (out, _) = import(&[dir.path().join("missing.yaml").as_os_str()]);
    assert_eq!(out.status.code(), Some(1));

    // Several policies need a directory.
    let (out, stderr) = import(&[
        fixture("search.yaml").as_os_str(),
        fixture("circuit.yaml").as_os_str(),
        "--out".as_ref(),
        dir.path().join("one.yaml").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!dir.path().join("one.yaml").exists());
}
