//! The toggle service: a line protocol that switches routing profiles.
