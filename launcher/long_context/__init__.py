"""Long rows: sequence parallelism, the tiled loss, the tiled MLP, activation-checkpoint offload."""
