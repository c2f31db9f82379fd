"""The embedded demo: a tiny class-conditional DiT on scikit-learn's 8x8 digits, trained, sampled and
judged by a digit classifier in a few minutes on a CPU (`fastdit demo`).

run.py orchestrates (and documents which real digits are used where), classifier.py is the judge,
report.py holds the numbers (accuracy, class match, Frechet distance), plots.py the pictures.
"""

from .run import DemoConfig, DemoResult, evaluate_samples, run_demo

__all__ = ["DemoConfig", "DemoResult", "evaluate_samples", "run_demo"]
