"""The training layer: the loop (trainer), resumable checkpoints, log-probs, the losses as plain
functions, memory-lean layers, the allocator, and one file per objective (objectives/)."""
