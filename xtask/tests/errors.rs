//! How the xtask binary reports a usage error.

use std::process::Command;

#[test]
fn usage_error_prints_the_chain_without_a_backtrace() {
    let out = tempfile::tempdir().unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["run-analysis", "--layers", "x", "--out"])
        .arg(out.path().join("run"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: in --layers: invalid layers"),
        "{stderr}"
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
}
