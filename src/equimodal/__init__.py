"""equimodal: balanced multimodal learning.

Shapley-guided alternating training with cross-modal memory (arXiv 2506.00030), the
methods it is compared against, balance diagnostics (Shapley contributions, EDM) and an
honest benchmark protocol.
"""

__version__ = "0.1.0"
