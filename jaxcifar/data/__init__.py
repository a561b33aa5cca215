"""The data path on the host, in the order data flows: the archive, tfds's cifar10, provider.lua's preprocessing, the cache (and fake archives for tests). Knows nothing of jit."""
