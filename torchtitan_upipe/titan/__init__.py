"""Everything that imports TorchTitan: the config sections, the style registry, config
checks, the job's shape, process groups, sequence sharding, the attention module, the Llama3
model, the memory stack, the parallelize hook, the trainer and its train spec, metrics, CPU
compatibility and the fake-rank helper."""
