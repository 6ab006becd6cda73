include!("../../build/relr.rs");

fn main() {
    relr();
}
