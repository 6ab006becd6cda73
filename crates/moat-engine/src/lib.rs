//! Runs plans: observes the host through drivers and the network layer, executes actions in dependency order, journals every step
