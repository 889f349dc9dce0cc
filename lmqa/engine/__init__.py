"""The landmark inference engine: block stores, grouped softmax, retrieval, prefill and decoding."""
