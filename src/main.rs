fn main() -> std::process::ExitCode {
    cresnet_opt::cli::main()
}
