//! `sso-token-proxy`: see the crate docs and `--help`.

fn main() -> std::process::ExitCode {
    sso_token_proxy::__private::main()
}
