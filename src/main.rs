//! CLI entry point: everything lives in the library; this only hands over to `cli::main`, on
//! mimalloc (why: Cargo.toml, at the dependency).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mcp_guard::cli::main()
}
