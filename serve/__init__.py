"""serve/: K members packed as ONE vLLM model (logit or probability averaging), served by Ray Serve as an
OpenAI-compatible endpoint; `ReferenceEnsemble` computes the same log-probabilities in PyTorch."""
