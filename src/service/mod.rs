//! Control socket: line-delimited JSON requests from the CLI to `usbroute serve`.
