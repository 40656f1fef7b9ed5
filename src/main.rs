//! CLI entry point: everything lives in the library; this only hands over to `cli::main`.

fn main() -> std::process::ExitCode {
    mcp_guard::cli::main()
}
