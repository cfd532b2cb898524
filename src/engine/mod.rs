//! Engine: diff desired against actual, act through backends, retry with backoff.
