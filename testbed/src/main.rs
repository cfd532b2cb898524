//! usbroute real-kernel test bed harness.
fn main() {}
