fn main() -> std::process::ExitCode {
    replog_cli::main_entry()
}
