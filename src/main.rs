//! `sso-token-proxy`: see the crate docs and `--help`.

fn main() {}
