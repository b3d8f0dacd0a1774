fn main() -> std::process::ExitCode {
    acr_task::cli::main()
}
