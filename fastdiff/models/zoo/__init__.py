"""Small real models trained in this repository, with their weights committed (loaded offline).

- :mod:`fastdiff.models.zoo.digits`: a class-conditional denoiser for scikit-learn's 8x8 handwritten
  digits, a noise-conditional digit classifier (classifier guidance) and a clean-digit classifier
  (features for a Fréchet distance, accuracy of class-conditional samples).

Every weights file is recorded with its SHA-256 in the JSON written next to it; loading checks it,
and any missing, corrupt, truncated or mismatched file raises :class:`WeightsError`.
"""

from __future__ import annotations

__all__ = ["WeightsError"]


class WeightsError(ValueError):
    """A weights file or its JSON config is missing, unreadable, corrupt, truncated, does not match its
    recorded SHA-256, or does not fit the architecture it records.

    The message is one line naming the file (:attr:`path`) and how to restore or retrain it.
    A ``ValueError``, so callers that refuse bad input by ``ValueError`` refuse this too.
    """

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"weights {path}: {problem}; {fix}")

    def __reduce__(self):
        return type(self), (self.path, self.problem, self.fix)
