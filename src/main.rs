//! The `usbroute` binary: parse arguments, hand them to the library, print, exit.

use std::process::ExitCode;

fn main() -> ExitCode {
    usbroute::cli::main()
}
