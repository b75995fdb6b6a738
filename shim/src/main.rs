//! containerd shim v2 for husk: not implemented yet (the shim issue). It refuses clearly
//! instead of pretending, so containerd reports a readable error.

fn main() -> std::process::ExitCode {
    eprintln!(
        "containerd-shim-husk-v2: not implemented yet; use `husk` (runc-compatible CLI) for now"
    );
    std::process::ExitCode::FAILURE
}
