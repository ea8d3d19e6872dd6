"""Process groups, parallel regions and the DeepSpeed engine: everything that makes one model run on many ranks."""
