//! score-sim: replays the paper's evaluation on score-core.
fn main() {}
