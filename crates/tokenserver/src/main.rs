//! The `tokenserver` binary.

/// mimalloc instead of glibc's malloc: request handling allocates and frees many small objects
/// on every worker thread, which glibc serves with a lock and consolidation passes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenserver::cli::main()
}
