"""Read graphs, never run them: invariant checks, pipeline p2p and schedule simulation, collective
fingerprints, the cost and memory models, explain(), plan files."""
