//! The `cresnet-opt` command line (`src/cli`, one module per subcommand).
mod cli;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    cli::main()
}

/// glibc returns freed blocks above 128 KB to the kernel at once, so every
/// replaced weight tensor is faulted in afresh (page faults were a quarter
/// of a data-free `fold,prune,dw` on ResNet-50). Serve them from the heap
/// instead, where freed tensors are reused.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
