"""The valid range of every numeric flag of the command line, declared once.

A flag means the same thing in every command that has it, so its range is declared by flag
(:data:`BOUNDS`), with a per-command entry where one command needs another range
(:data:`OVERRIDES`). :class:`medscalpel.cli.common.PlainCommand` checks every parsed value
against this table before the command's body runs (so nothing is loaded, trained or written
for a bad value) and appends the range to the flag's help. Upper bounds on sizes are
memory bounds: past them a run cannot fit a workstation, and the refusal happens at once
instead of after an epoch. ``tests/test_cli_truth.py`` fails for a numeric flag missing here.
"""

from __future__ import annotations

from medscalpel.validation import Constraint, Interval, OneOf

INF = None  #: no upper bound (the value must still be finite)


def _int(low: int, high: int | None) -> Interval:
    return Interval(low, high, integer=True)


def _real(low: float | None, high: float | None, *, open_low: bool = False,
          open_high: bool = False) -> Interval:
    return Interval(low, high, low_inclusive=not open_low, high_inclusive=not open_high)


FRACTION = _real(0.0, 1.0)
OPEN_FRACTION = _real(0.0, 1.0, open_low=True, open_high=True)
POSITIVE = _real(0.0, INF, open_low=True)
NON_NEGATIVE = _real(0.0, INF)
LEARNING_RATE = _real(0.0, 10.0, open_low=True)
EPOCHS = _int(1, 10_000)
IMAGES = _int(1, 10_000_000)

#: flag -> its valid values, for every command that has the flag
BOUNDS: dict[str, Constraint] = {
    # integers: counts, sizes (memory bounds), seeds
    "--seed": _int(0, 2**32 - 1),             # NumPy's seed range
    "--workers": _int(0, 256),
    "--threads": _int(1, 1024),
    "--max-workers": _int(1, 1024),
    "--world-size": _int(1, 1024),
    "--batch-size": _int(1, 4096),            # one batch of 4096 224-px images is ~2.5 GB
    "--size": _int(8, 2048),                  # 2048 px: the largest CXR models take
    "--channels": OneOf((1, 3)),
    "--epochs": EPOCHS,
    "--teacher-epochs": EPOCHS,
    "--sparsify-epochs": EPOCHS,
    "--proxy-epochs": EPOCHS,
    "--finetune-epochs": _int(0, 10_000),
    "--recovery-epochs": _int(0, 10_000),
    "--patience": _int(1, 10_000),
    "--steps": _int(1, 10_000_000),
    "--proxy-steps": _int(1, 10_000_000),
    "--search-subnets": _int(0, 100_000),
    "--max-steps-per-epoch": _int(1, 10_000_000),
    "--n-boot": _int(0, 100_000),
    "--n-perm": _int(0, 1_000_000),
    "--n-null": _int(1, 100_000),
    "--n-calib": _int(1, 100_000),
    "--calib": _int(1, 100_000),
    "--calib-images": _int(1, 100_000),
    "--n-images": IMAGES,
    "--heldout-images": IMAGES,
    "--n-faithfulness": _int(0, 1_000_000),
    "--saliency-images": _int(0, 100_000),
    "--random-inputs": _int(0, 100_000),
    "--k": _int(1, 100_000),
    "--max-weights": _int(1, 1_000_000),
    "--tp-loss-budget": _int(0, 1_000_000_000),
    "--min-subgroup": _int(1, 1_000_000_000),
    "--min-images": _int(0, 1_000_000_000),
    "--min-cam-size": _int(1, 4096),
    "--top": _int(1, 100_000),
    "--top-channels": _int(1, 100_000),
    "--round-to": _int(1, 1024),
    "--rounds": _int(1, 10_000),
    "--repeats": _int(1, 10_000),
    "--opset": _int(7, 23),
    "--severities": _int(1, 3),
    # real numbers
    "--lr": LEARNING_RATE,
    "--finetune-lr": LEARNING_RATE,
    "--teacher-lr": LEARNING_RATE,
    "--sparsify-lr": LEARNING_RATE,
    "--weight-decay": NON_NEGATIVE,
    "--sparsify-lam": NON_NEGATIVE,
    "--atol": NON_NEGATIVE,
    "--rank-rtol": FRACTION,
    "--weight-rtol": FRACTION,
    "--feature-weight": NON_NEGATIVE,
    "--attention-weight": NON_NEGATIVE,
    "--soft-weight": FRACTION,
    "--temperature": POSITIVE,
    "--budget": NON_NEGATIVE,
    "--delta-prob": OPEN_FRACTION,
    "--drop-threshold": _real(0.0, 1.0, open_low=True),
    "--floor-macro": _real(-1.0, 0.0),  # a non-inferiority margin: the loss allowed
    "--floor-class": _real(-1.0, 0.0),
    "--min-positives": _int(1, 100000),
    "--label-noise": _real(0.0, 0.5),
    "--tube-pos": FRACTION,
    "--tube-neg": FRACTION,
    "--quantile": OPEN_FRACTION,
    "--target-sensitivity": OPEN_FRACTION,
    "--alpha": OPEN_FRACTION,  # a probability that a guarantee fails
    "--holdout": OPEN_FRACTION,  # a share of patients held out
    "--ratio": _real(0.0, 1.0, open_high=True),
    "--sparsify-ratio": OPEN_FRACTION,
    "--tolerance": FRACTION,
    "--target-speedup": _real(1.0, 1000.0),
    "--target-speedup-measured": _real(0.0, 1000.0, open_low=True),
    "--target-latency": POSITIVE,
    "--latency-budget-ms": POSITIVE,
    "--max-lift-upper": POSITIVE,
    "--min-expected": NON_NEGATIVE,
    "--jaccard-exclusion": FRACTION,
}

#: (command path without the program name, flag) -> valid values, where a command differs
OVERRIDES: dict[tuple[str, str], Constraint] = {
    # the phantom is generated in memory: 1e6 images of 64 px is ~4 GB
    ("data phantom", "--n-images"): _int(1, 1_000_000),
    ("data phantom", "--n"): _int(1, 1_000_000),
    ("data phantom", "--size"): _int(16, 1024),
    # lossless --tolerance is a fraction of the parameters to remove
    ("compress lossless", "--tolerance"): OPEN_FRACTION,
}


def constraint_for(command: str, opts: list[str]) -> Constraint | None:
    """The constraint of the option spelled ``opts`` in ``command`` ('compress prune')."""
    for flag in opts:
        if (command, flag) in OVERRIDES:
            return OVERRIDES[(command, flag)]
    for flag in opts:
        if flag in BOUNDS:
            return BOUNDS[flag]
    return None
