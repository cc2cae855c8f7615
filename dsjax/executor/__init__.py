"""The data plane of one instance: params and KV pages on its devices, jitted steps fed plain
batch descriptions, sampling, attention kernels, and KV movement between instances."""
