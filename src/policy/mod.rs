//! Policy: rules from the config file and the pure `plan` that decides where each device belongs.
