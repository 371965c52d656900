//! The `wgbond` command.
fn main() {
    println!("wgbond {}", env!("CARGO_PKG_VERSION"));
}
