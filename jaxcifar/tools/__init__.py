"""Tools beside the product: the benchmark's parts (timing, FLOPs, the PyTorch side) and the pages generated from results/."""
