//! A real AWS SDK against the emulator: runs
//! `tests/fidelity/boto3_sso_oidc.py` (boto3's sso-oidc client) on the built
//! binary's `emulator` subcommand. Needs `python3` with `boto3`;
//! `bash scripts/test.sh` installs them when they are missing.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_sso-token-proxy");
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fidelity/boto3_sso_oidc.py"
);

#[test]
fn boto3_agrees_with_the_emulator() {
    let probe = Command::new("python3")
        .args(["-c", "import boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(status) if status.success() => {}
        Ok(_) => panic!(
            "python3 cannot import boto3: run `bash scripts/test.sh` (installs it) or `python3 -m pip install boto3`"
        ),
        Err(e) => panic!("cannot run python3 ({e}): run `bash scripts/test.sh` (installs it)"),
    }
    // Output goes to files, so a chatty script can never block on a pipe.
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .arg(BIN)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn python3");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    // The script bounds its own waits; this only stops a hang.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the boto3 check did not finish within 180 s:\n{}",
                read(&out_path)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    assert!(
        status.success(),
        "boto3 check failed ({status}):\n{stdout}\n{stderr}"
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("boto3 fidelity: "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    assert!(
        !summary.starts_with("boto3 fidelity: 0 passed"),
        "no check ran: {summary}"
    );
}
