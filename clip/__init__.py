"""The model side of RAFT: the frozen CLIP backbone, the region pool, the text classifier."""
