"""Landmark settings for a model that does not state them, one statement
each: LandmarkConfig and model manifests read them here (a module without
torch, so reading a manifest does not import it)."""

BLOCK_SIZE = 63  # ordinary tokens per block
TOP_K = 5  # blocks retrieved per head and step (the paper's LLaMA tests)
TRAIN_CONTEXT = 1024  # positions, landmarks included, the model was trained on
