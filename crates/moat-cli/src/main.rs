fn main() {
    println!("moat: under construction");
}
