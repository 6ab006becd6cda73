fn main() {
    std::process::exit(moat_runtime::supervisor::main_entry());
}
