"""Models: manifests, fetching and converting weights, the hub, weight diffs, quantized loading."""
