fn main() -> std::process::ExitCode {
    replog_bench::main_entry()
}
