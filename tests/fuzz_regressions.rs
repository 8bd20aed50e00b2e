//! Replays the fuzz seeds (`fuzz/seeds/<target>/`) and every crash input the
//! fuzzers found (`tests/fixtures/fuzz-regressions/<target>/`, copied there
//! by `scripts/fuzz.sh`) through the fuzz targets' own entry points, which
//! live in `fuzz/harness.rs`. Needs no nightly toolchain and no libFuzzer.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::{
    panic,
    path::{Path, PathBuf},
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The regular files directly in `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `target`; reports all that panic, not just the first.
fn replay(target: &str) -> usize {
    let seeds = inputs(&root().join("fuzz/seeds").join(target));
    assert!(
        !seeds.is_empty(),
        "no seeds for {target} in fuzz/seeds/{target}/"
    );
    let regressions = inputs(&root().join("tests/fixtures/fuzz-regressions").join(target));
    let mut failures = Vec::new();
    for path in seeds.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("readable input");
        if panic::catch_unwind(|| harness::run(target, &data)).is_err() {
            failures.push(
                path.strip_prefix(root())
                    .unwrap_or(path)
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(failures.is_empty(), "{target} panicked on: {failures:#?}");
    seeds.len() + regressions.len()
}

#[test]
fn config_parse() {
    replay("config_parse");
}

#[test]
fn sso_cache_parse() {
    replay("sso_cache_parse");
}

#[test]
fn oidc_error_decode() {
    replay("oidc_error_decode");
}

#[test]
fn oidc_response_decode() {
    replay("oidc_response_decode");
}

#[test]
fn request_target() {
    replay("request_target");
}

#[test]
fn path_normalize() {
    replay("path_normalize");
}

#[test]
fn every_target_has_a_test() {
    assert_eq!(
        harness::TARGETS,
        [
            "config_parse",
            "sso_cache_parse",
            "oidc_error_decode",
            "oidc_response_decode",
            "request_target",
            "path_normalize"
        ]
    );
    let regressions = root().join("tests/fixtures/fuzz-regressions");
    if let Ok(entries) = std::fs::read_dir(&regressions) {
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                let name = path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned();
                assert!(
                    harness::TARGETS.contains(&name.as_str()),
                    "{} is not a fuzz target",
                    path.display()
                );
            }
        }
    }
}

/// The seeds are real inputs: the valid ones must be accepted, so that the
/// fuzzers start from inputs that reach deep into the parsers.
#[test]
fn valid_seeds_are_accepted() {
    use sso_token_proxy::{
        __private::parse_config,
        oidc::CreateTokenResponse,
        token::{SsoCacheFile, Token},
    };

    let seeds = root().join("fuzz/seeds");
    for name in ["quickstart.toml", "sso-cache.toml"] {
        let text = std::fs::read_to_string(seeds.join("config_parse").join(name)).expect("seed");
        // Relative paths in the quick-start config resolve against the repo.
        parse_config(&text, &root().join("fuzz.toml")).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for path in inputs(&seeds.join("sso_cache_parse")) {
        if path.extension().is_some_and(|e| e == "json") {
            let file = SsoCacheFile::parse(&std::fs::read(&path).expect("seed"), &path)
                .expect("valid cache seed");
            assert!(file.token().is_some(), "{}", path.display());
        }
    }
    let resp: CreateTokenResponse = serde_json::from_slice(
        &std::fs::read(seeds.join("oidc_response_decode/create-token.json")).expect("seed"),
    )
    .expect("CreateToken seed");
    Token::from_response(&resp).expect("token from the CreateToken seed");
    for path in inputs(&seeds.join("oidc_error_decode")) {
        let data = std::fs::read(&path).expect("seed");
        let case = harness::ErrorCase::decode(&data).expect("seed long enough");
        assert!(
            http::StatusCode::from_u16(case.status).is_ok(),
            "{}",
            path.display()
        );
        assert!(
            serde_json::from_slice::<serde_json::Value>(case.body).is_ok() || case.status == 429,
            "{}",
            path.display()
        );
    }
    for path in inputs(&seeds.join("request_target")) {
        assert!(
            harness::request_target(&std::fs::read(&path).expect("seed")).is_some(),
            "{}",
            path.display()
        );
    }
}
